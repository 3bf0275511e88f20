//! One error type for the data module. Every message names the file or folder and the fix.

use std::path::PathBuf;

/// What can go wrong with a dataset on disk or an episode request.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // === Dataset layout ===
    #[error(
        "dataset folder {path:?} does not exist or is not a folder; pass an existing dataset \
         folder, or create the built-in one with `fsct-dist data synth --out DIR`"
    )]
    MissingRoot { path: PathBuf },

    #[error(
        "no {split} split in {root:?}: looked for {tried}; add the split file or folder, \
         or check the dataset with `fsct-dist data check {root:?}`"
    )]
    MissingSplit {
        root: PathBuf,
        split: &'static str,
        tried: String,
    },

    // The I/O error is part of the message, not a `source`: a chain printer would repeat it.
    #[error("cannot read {path:?}: {cause}; check that it exists and is readable")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path:?} is not a valid split file: {reason}; fix or regenerate the file")]
    BadSplitFile { path: PathBuf, reason: String },

    #[error("split {split} in {root:?} has no images; check the dataset with `fsct-dist data check {root:?}`")]
    EmptySplit { root: PathBuf, split: &'static str },

    #[error(
        "the {split} split in {root:?} lists {count} image file(s) more than once: {examples}; \
         a picture must appear once (support and query could be the same image): remove the \
         repeated entries (`fsct-dist data check {root:?}` lists every split's problems)"
    )]
    DuplicateImages {
        root: PathBuf,
        split: &'static str,
        count: usize,
        examples: String,
    },

    // === Images ===
    #[error(
        "cannot load image {path:?}: {reason}; find every bad image with \
         `fsct-dist data check {root:?}` and replace or remove them"
    )]
    BadImage {
        path: PathBuf,
        root: PathBuf,
        reason: String,
    },

    // === Episode requests ===
    #[error(
        "episode needs {need} images per class (k_shot + n_query) but class {class:?} of the \
         {split} split in {root:?} has {have}; lower --k_shot/--n_query or pick another dataset"
    )]
    TooFewImages {
        need: usize,
        have: usize,
        class: String,
        split: &'static str,
        root: PathBuf,
    },

    #[error("{}", too_few_classes(*.need, *.have, .split, .root))]
    TooFewClasses {
        need: usize,
        have: usize,
        split: &'static str,
        root: PathBuf,
    },

    #[error("invalid episode request: {0}")]
    BadRequest(String),

    #[error("stopped by a signal while waiting for images")]
    Interrupted,

    // === Internal ===
    #[error("building the image tensor failed: {0}")]
    Tensor(String),

    #[error("a data loader worker panicked on episode {index}: {message}; this is a bug, please report it")]
    WorkerPanic { index: u64, message: String },

    #[error(
        "cannot write the built-in dataset to {path:?}: {reason}; check free space and permissions"
    )]
    Synth { path: PathBuf, reason: String },

    #[error("stopped by a signal while writing the built-in dataset {path:?}; nothing was left behind, run the command again")]
    SynthStopped { path: PathBuf },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            cause: source,
        }
    }
}

/// The fix depends on how few: a split of 0 or 1 classes cannot hold any episode.
fn too_few_classes(need: usize, have: usize, split: &str, root: &std::path::Path) -> String {
    let fix = if have < 2 {
        format!(
            "a few-shot episode needs at least 2; add classes to the {split} split (or test on \
             another split with --split)"
        )
    } else {
        format!("lower --n_way to at most {have}")
    };
    format!(
        "episode needs {need} classes (n_way) but the {split} split in {root:?} has {have}; {fix}"
    )
}
