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

    #[error("{path:?} lacks {count} tensor(s) the model needs, e.g. {names:?}; is it a checkpoint of this method/backbone (and, for official files, saved with the official state_dict names)?")]
    MissingTensors {
        path: PathBuf,
        count: usize,
        names: Vec<String>,
    },

    #[error("{path:?} has {count} tensor(s) this model does not have, e.g. {names:?}; it is probably a checkpoint of another method or backbone")]
    UnexpectedTensors {
        path: PathBuf,
        count: usize,
        names: Vec<String>,
    },

    #[error("tensor {name:?} in {path:?} has shape {got:?} but the model expects {expected:?}; check --method, --backbone, n_way/k_shot and the head sizes (heads, dim_head, mlp_dim, dim_attn, image size)")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },

    #[error("copying {name:?} from {path:?}: {msg}")]
    Copy {
        path: PathBuf,
        name: String,
        msg: String,
    },
}
