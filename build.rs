//! Makes the binaries (and test binaries) find libtorch at run time without LD_LIBRARY_PATH.
//! torch-sys links libtorch but leaves no rpath; we add one to the torch/lib folder it used.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // The symlink .venv/libtorch is what the repo names; resolve it so the rpath survives a re-run
    // of setup.sh that swaps the venv, and still points at a real folder.
    let lib = Path::new(&lib)
        .canonicalize()
        .unwrap_or_else(|_| Path::new(&lib).to_path_buf());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // `--as-needed` would drop libtorch_cuda.so (no symbol is referenced directly) and CUDA would
    // look absent on a GPU machine. Keep it only with the full wheel set: the CPU-minimal install
    // ships libtorch_cuda.so without cuDNN/cuBLAS, and linking it there fails at load time.
    let site = lib.parent().and_then(Path::parent); // site-packages
    let full_cuda = site.is_some_and(|s| has_file_starting(&s.join("nvidia"), "libcublas.so", 3));
    if full_cuda && lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// Whether a file whose name starts with `prefix` exists under `dir`, at most `depth` levels down.
fn has_file_starting(dir: &Path, prefix: &str, depth: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            depth > 0 && has_file_starting(&path, prefix, depth - 1)
        } else {
            e.file_name().to_string_lossy().starts_with(prefix)
        }
    })
}
