//! Makes the binaries (and test binaries) find libtorch at run time without LD_LIBRARY_PATH.
//! torch-sys links libtorch but leaves no rpath; we add one to the torch/lib folder it used.
//! Also compiles the C++ shim (csrc/shim.cpp: CPU/CUDA autocast control that tch lacks) against
//! the headers of that same libtorch.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report its libtorch (DEP_TCH_LIBTORCH_LIB); run launch/setup.sh");
    };
    compile_shim(Path::new(&lib));
    // The symlink .venv/libtorch is what the repo names; resolve it so the rpath survives a re-run
    // of setup.sh that swaps the venv, and still points at a real folder.
    let lib = Path::new(&lib)
        .canonicalize()
        .unwrap_or_else(|_| Path::new(&lib).to_path_buf());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // Where the NCCL backend looks for the wheel's libnccl.so.2 if it is not loaded already.
    println!("cargo:rustc-env=FSCT_TORCH_LIB={}", lib.display());
    // `--as-needed` would drop libtorch_cuda.so (no symbol is referenced directly) and CUDA would
    // look absent on a GPU machine. Keep it only with the full wheel set: the CPU-minimal install
    // ships libtorch_cuda.so without cuDNN/cuBLAS, and linking it there fails at load time.
    let site = lib.parent().and_then(Path::parent); // site-packages
    let full_cuda = site.is_some_and(|s| has_file_starting(&s.join("nvidia"), "libcublas.so", 3));
    let cuda_linked = full_cuda && lib.join("libtorch_cuda.so").exists();
    if cuda_linked {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    // For `fsct-dist --version`: tch::Cuda::is_available() is false on a machine without a GPU,
    // so only the build knows whether a binary carried to a GPU machine will see CUDA.
    println!(
        "cargo:rustc-env=FSCT_CUDA_LINKED={}",
        if cuda_linked { "yes" } else { "no" }
    );
    println!(
        "cargo:rustc-env=FSCT_LIBTORCH_VERSION={}",
        libtorch_version(&lib)
    );
}

/// The libtorch release, from the torch wheel's `torch/version.py` (`__version__ = '2.11.0+cu130'`,
/// local part dropped) or a standalone libtorch's `build-version`; "unknown" when neither is there.
fn libtorch_version(lib: &Path) -> String {
    let Some(root) = lib.parent() else {
        return "unknown".to_owned();
    };
    let from_wheel = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_owned())
        });
    let version = from_wheel
        .or_else(|| std::fs::read_to_string(root.join("build-version")).ok())
        .unwrap_or_else(|| "unknown".to_owned());
    let version = version.trim();
    version.split('+').next().unwrap_or(version).to_owned()
}

/// csrc/shim.cpp as a static library, with torch-sys's include folders and C++ ABI. It declares
/// the few libtorch functions it calls itself instead of including ATen (about 1 s to compile
/// instead of about 10 s).
fn compile_shim(lib: &Path) {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys: headers in $LIBTORCH_INCLUDE/include, else next to lib/ (torch/include).
    let root = std::env::var("LIBTORCH_INCLUDE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| lib.parent().unwrap_or(lib).to_path_buf());
    let include = root.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        // -isystem: libtorch's headers are not ours to warn about.
        .flag("-isystem")
        .flag(include.to_string_lossy().as_ref())
        .flag("-isystem")
        .flag(
            include
                .join("torch/csrc/api/include")
                .to_string_lossy()
                .as_ref(),
        )
        .file("csrc/shim.cpp")
        .compile("fsct_shim");
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
