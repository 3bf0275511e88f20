//! Errors of model construction and checkpoint import. Each message says what is wrong and
//! what to do about it.

use std::path::PathBuf;

use crate::config::Backbone;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("image size {image_size} is too small for {backbone:?} (some layer's output would be empty); use at least {min} px")]
    ImageTooSmall {
        backbone: Backbone,
        image_size: i64,
        min: i64,
    },

    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),

    #[error("cannot read {path:?}: {msg}")]
    Read { path: PathBuf, msg: String },

    #[error("{path:?} does not fit this model: {}; {fix}", mismatch_summary(.missing, .extra, .shapes))]
    WeightsMismatch {
        path: PathBuf,
        /// Model variables the file lacks.
        missing: Vec<String>,
        /// File tensors the model does not have (file names).
        extra: Vec<String>,
        shapes: Vec<ShapeDiff>,
        fix: String,
    },

    #[error("{path:?}: --pretrained applies to ResNets only ({backbone:?} starts from random weights, as in the official code); drop --pretrained")]
    PretrainedNotResNet { path: PathBuf, backbone: Backbone },

    #[error("copying {name:?} from {path:?}: {msg}")]
    Copy {
        path: PathBuf,
        name: String,
        msg: String,
    },
}

/// A tensor whose shape in the file differs from the model's.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeDiff {
    /// The model's name for it.
    pub name: String,
    pub file: Vec<i64>,
    pub model: Vec<i64>,
}

/// A few names, then a count: `a, b, c, d and 7 more`.
fn few(names: impl ExactSizeIterator<Item = String>) -> String {
    const SHOWN: usize = 4;
    let n = names.len();
    let mut s: Vec<String> = names.take(SHOWN).collect::<Vec<_>>();
    if n > SHOWN {
        s.push(format!("and {} more", n - SHOWN));
    }
    s.join(", ")
}

fn mismatch_summary(missing: &[String], extra: &[String], shapes: &[ShapeDiff]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{} tensor(s) the model needs are missing ({})",
            missing.len(),
            few(missing.iter().cloned())
        ));
    }
    if !extra.is_empty() {
        parts.push(format!(
            "{} tensor(s) the model does not have ({})",
            extra.len(),
            few(extra.iter().cloned())
        ));
    }
    if !shapes.is_empty() {
        parts.push(format!(
            "{} tensor(s) of another shape ({})",
            shapes.len(),
            few(shapes.iter().map(|d| format!(
                "{} {:?} in the file, {:?} in the model",
                d.name, d.file, d.model
            )))
        ));
    }
    parts.join("; ")
}
