//! Tensor dumps for users comparing runs (and for tests): the final parameters, the first
//! step's reduced gradients, and the out-of-memory test hook.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tch::nn::VarStore;

use crate::files;

/// Optional tensor dumps for users comparing runs (and for tests), and the test hook.
#[derive(Debug, Default, Clone)]
pub struct Dumps {
    /// Final parameters and BatchNorm buffers.
    pub params: Option<PathBuf>,
    /// Gradients of the first optimizer step (reduced over ranks, unscaled), before the
    /// optimizer; written by rank 0.
    pub grads: Option<PathBuf>,
    /// Test hook: backbone chunks with more input bytes than this fail as out of memory.
    pub simulate_oom_above_bytes: Option<u64>,
}

impl Dumps {
    /// Refuses dump paths whose folder is missing, before training instead of after it.
    pub fn check_paths(&self) -> Result<()> {
        for (flag, path) in [
            ("--dump-params", &self.params),
            ("--dump-grads", &self.grads),
        ] {
            let Some(path) = path else { continue };
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            anyhow::ensure!(
                folder.is_dir(),
                "{flag} {}: the folder {} does not exist; create it or pass another path",
                path.display(),
                folder.display()
            );
            anyhow::ensure!(
                !path.is_dir(),
                "{flag} {} is a folder; pass a file path such as {}",
                path.display(),
                path.join("params.safetensors").display()
            );
        }
        Ok(())
    }
}

/// `path` for rank 0; `stem.rankR.ext` beside it for rank R.
pub fn rank_path(path: &Path, rank: usize) -> PathBuf {
    if rank == 0 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.rank{rank}.{}", ext.to_string_lossy()),
        None => format!("{stem}.rank{rank}"),
    };
    path.with_file_name(name)
}

/// Every parameter's current gradient, under the parameter's name, as safetensors.
pub fn save_grads(vs: &VarStore, path: &Path) -> Result<()> {
    let grads: Vec<(String, tch::Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| Some(name).zip(Some(t.grad()).filter(|g| g.defined())))
        .collect();
    files::write_atomic_with(path, |tmp| files::write_tensors(&grads, tmp))
}
