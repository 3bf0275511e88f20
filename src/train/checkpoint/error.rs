//! One error type for resumable checkpoints. Every message names the file and what to do: most
//! often resume from another checkpoint, or start the run over.

use std::path::PathBuf;

use super::ModelSignature;

/// What can go wrong writing, finding or reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    // === Writing ===
    #[error(
        "writing checkpoint {}{hint}: {cause}; the previous checkpoints are intact",
        .path.display()
    )]
    Write {
        path: PathBuf,
        /// " (the disk is full …)" when it is, else what to check.
        hint: &'static str,
        cause: String,
    },

    // === Finding ===
    #[error(
        "{} holds no checkpoint to resume from (expected {dir}/step-*/ or a checkpoint folder); \
         start a new run without --resume",
        .path.display()
    )]
    NotFound { path: PathBuf, dir: &'static str },

    // === Reading ===
    // The I/O error is part of the message, not a `source`: a chain printer would repeat it.
    #[error(
        "cannot read {}: {cause}; check that it exists and is readable, or resume from an older \
         checkpoint",
        .path.display()
    )]
    Unreadable {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{} is damaged ({reason}); resume from an older checkpoint", .path.display())]
    Damaged { path: PathBuf, reason: String },

    #[error(
        "{} was written by a newer fsct-dist (checkpoint format {found}; this one reads up to \
         {supported}); upgrade fsct-dist to resume it",
        .path.display()
    )]
    FormatVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },

    #[error(
        "{} cannot be loaded ({cause}): the file is damaged or truncated; {}",
        .path.display(),
        fall_back(.others)
    )]
    Truncated {
        path: PathBuf,
        cause: String,
        /// The run's other checkpoints, to resume from instead.
        others: Vec<PathBuf>,
    },

    #[error(
        "{} does not fit this run's optimizer ({cause}); {}",
        .path.display(),
        fall_back(.others)
    )]
    OptimizerMismatch {
        path: PathBuf,
        cause: String,
        others: Vec<PathBuf>,
    },

    // === Fitting this run ===
    #[error(
        "checkpoint {} is of another model ({found:?}) than this run ({want:?}); resume with \
         the run's own settings or start a new run",
        .path.display()
    )]
    OtherModel {
        path: PathBuf,
        // Boxed: they would make every checkpoint `Result` large.
        found: Box<ModelSignature>,
        want: Box<ModelSignature>,
    },

    #[error(
        "{} says {micro_steps} micro-steps, impossible for an episode of {images} images; the \
         file is damaged: resume from another checkpoint",
        .path.display()
    )]
    BadMicroSteps {
        path: PathBuf,
        micro_steps: i64,
        images: i64,
    },

    #[error(
        "{} is at step {step} = epoch {epoch} + {steps_in_epoch} steps, which does not fit \
         {per_epoch} steps per epoch; resume with the run's own \
         --episodes-per-epoch/--episodes-per-step (and the same number of ranks with --shard \
         episodes), or from another checkpoint",
        .path.display()
    )]
    BadPosition {
        path: PathBuf,
        step: u64,
        epoch: u64,
        steps_in_epoch: u64,
        per_epoch: u64,
    },

    #[error(
        "{} names best epoch {best_epoch:?} after its own epoch {epoch}; the file is damaged: \
         resume from another checkpoint",
        .path.display()
    )]
    BadBestEpoch {
        path: PathBuf,
        best_epoch: Option<u64>,
        epoch: u64,
    },
}

/// The fix for an unusable checkpoint: the run's other checkpoints, or starting over.
fn fall_back(others: &[PathBuf]) -> String {
    if others.is_empty() {
        return "the run has no other checkpoint: start it over with its config.toml and \
                --overwrite"
            .into();
    }
    let names: Vec<String> = others.iter().map(|p| p.display().to_string()).collect();
    format!(
        "resume from another checkpoint of the run (pass its folder to --resume): {}",
        names.join(", ")
    )
}
