//! Resumable checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holds `model.safetensors` (weights
//! and BatchNorm statistics), `optimizer.safetensors` (moments and step counts) and
//! `checkpoint.json` (position in the run, best validation, loss-scaler state, micro-steps, the
//! config). Episodes and augmentations are functions of (seed, epoch, index) and training
//! draws nothing else at random, so this is everything a run needs to continue bit for bit.
//!
//! A checkpoint is written into a temp folder, every file fsynced, then renamed into place:
//! it exists whole or not at all. The newest `keep` are kept.
//!
//! Failures are [`CheckpointError`]s (`save` and `load` return them inside `anyhow::Error`,
//! where callers can downcast).

mod error;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use super::amp::GradScalerState;
use super::eval::Accuracy;
use super::optim::Optimizer;
use crate::config::{Backbone, RunConfig};
pub use error::CheckpointError;

/// Bumped when the layout changes; a newer checkpoint is refused by an older binary.
pub const FORMAT_VERSION: u32 = 1;
pub const DIR: &str = "checkpoints";
const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "checkpoint.json";

/// Where the run stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps done in the whole run.
    pub step: u64,
    /// The epoch in progress, and its optimizer steps done (== steps per epoch once its
    /// validation is done too: the next epoch starts on resume).
    pub epoch: u64,
    pub steps_in_epoch: u64,
    pub epoch_validated: bool,
    pub best_val: Option<Accuracy>,
    pub best_epoch: Option<u64>,
    pub scaler: Option<GradScalerState>,
    /// Micro-steps in use (they may have grown under `dynamic`).
    pub micro_steps: i64,
    /// What the weights belong to; compared before loading.
    pub model: ModelSignature,
    pub config: RunConfig,
}

/// The parts of a config that decide the shapes of the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSignature {
    pub method: String,
    pub backbone: String,
    pub n_way: i64,
    pub k_shot: i64,
    pub image_size: i64,
}

impl ModelSignature {
    pub fn of(c: &RunConfig) -> Self {
        Self {
            method: c.model.method.official_name().to_owned(),
            backbone: format!("{:?}", c.model.backbone),
            n_way: c.episode.n_way,
            k_shot: c.episode.k_shot,
            image_size: c.data.image_size,
        }
    }
}

impl ModelSignature {
    /// Checkpoints written before `ResNet34` meant the torchvision layout recorded the FETI
    /// ResNets as "ResNet10/12/18/34" (today's names are explicit: `FetiResNet34`,
    /// `TvResNet34`): such a checkpoint is read as the FETI network it holds.
    fn upgrade_legacy(mut state: CheckpointState) -> CheckpointState {
        if let Some(b) = Backbone::from_legacy_signature(&state.model.backbone) {
            state.model.backbone = format!("{b:?}");
            state.config.model.backbone = b;
        }
        state
    }
}

/// The FETI backbone an old run recorded under its official name (see
/// [`ModelSignature::upgrade_legacy`]), from its newest checkpoint: its `config.toml` says
/// "ResNet34", which today means the torchvision layout.
pub fn legacy_backbone(run: &Path) -> Option<Backbone> {
    let text = fs::read_to_string(list(run).pop()?.join(STATE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Backbone::from_legacy_signature(v["model"]["backbone"].as_str()?)
}

/// Writes a checkpoint of step `state.step` under `run/checkpoints/` and keeps the newest `keep`.
/// `optimizer` is the whole optimizer state ([`Optimizer::state_tensors`], or a sharded
/// optimizer's gathered by [`crate::train::zero::gather_state`]: the same format).
pub fn save(
    run: &Path,
    vs: &VarStore,
    optimizer: &[(String, Tensor)],
    state: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = run.join(DIR);
    let name = format!("step-{:08}", state.step);
    let final_dir = dir.join(&name);
    fs::create_dir_all(&dir).map_err(|e| write_error(&final_dir, e.into()))?;
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        fs::create_dir_all(&tmp)?;
        let model: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        crate::files::write_tensors(&model, &tmp.join(MODEL))?;
        crate::files::write_tensors(optimizer, &tmp.join(OPTIMIZER))?;
        let mut text = serde_json::to_string_pretty(state)?;
        text.push('\n');
        fs::write(tmp.join(STATE), text)?;
        for f in [MODEL, OPTIMIZER, STATE] {
            fs::File::open(tmp.join(f))?.sync_all()?;
        }
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir)?;
        }
        fs::rename(&tmp, &final_dir)?;
        fs::File::open(&dir)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(write_error(&final_dir, e).into());
    }
    for old in list(run).into_iter().rev().skip(keep.max(1)) {
        let _ = fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// A failed checkpoint write, with the disk-full hint when that is the cause.
fn write_error(path: &Path, e: anyhow::Error) -> CheckpointError {
    let cause = format!("{e:#}");
    let hint = match crate::files::disk_hint_for::<()>(&Err(e)) {
        "" => " (check that the run folder is writable)",
        disk => disk,
    };
    CheckpointError::Write {
        path: path.to_path_buf(),
        hint,
        cause,
    }
}

/// For an error message: "; the last checkpoint … is kept: resume with …", or that there is
/// none yet (then there is nothing to resume).
pub fn what_is_kept(run: &Path) -> String {
    match list(run).pop() {
        Some(last) => format!(
            "; the last checkpoint {} is kept: after fixing the cause, resume with --resume {}",
            last.display(),
            run.display()
        ),
        None => "; no checkpoint was written yet".into(),
    }
}

/// The checkpoint folders of a run, oldest first.
pub fn list(run: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(run.join(DIR)) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    v.sort();
    v
}

/// `path` is a run folder (its newest checkpoint) or one checkpoint folder.
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    list(path).pop().ok_or_else(|| CheckpointError::NotFound {
        path: path.to_path_buf(),
        dir: DIR,
    })
}

/// Reads a checkpoint's state, refusing other formats and other models.
pub fn read_state(ckpt: &Path) -> Result<CheckpointState, CheckpointError> {
    let path = ckpt.join(STATE);
    let text = fs::read_to_string(&path).map_err(|cause| CheckpointError::Unreadable {
        path: path.clone(),
        cause,
    })?;
    let damaged = |reason: String| CheckpointError::Damaged {
        path: path.clone(),
        reason,
    };
    let version: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| damaged(format!("not JSON: {e}")))?;
    let v = version["format_version"].as_u64().unwrap_or(0);
    if v > u64::from(FORMAT_VERSION) {
        return Err(CheckpointError::FormatVersion {
            path: ckpt.to_path_buf(),
            found: v,
            supported: FORMAT_VERSION,
        });
    }
    serde_json::from_str(&text)
        .map(ModelSignature::upgrade_legacy)
        .map_err(|e| damaged(e.to_string()))
}

/// Checks that a checkpoint's position is one this run can continue from: micro-steps that
/// make sense for the episode, and a step count that matches its epoch and steps into it under
/// the run's episodes per epoch (a hand-edited or mismatched file would otherwise resume at a
/// silently wrong place).
pub fn check_position(
    ckpt: &Path,
    state: &CheckpointState,
    config: &RunConfig,
    world: usize,
) -> Result<(), CheckpointError> {
    let path = ckpt.join(STATE);
    let images = config.episode_images().unwrap_or(i64::MAX);
    if state.micro_steps < 1 || state.micro_steps > images {
        return Err(CheckpointError::BadMicroSteps {
            path,
            micro_steps: state.micro_steps,
            images,
        });
    }
    let per_epoch = config.steps_per_epoch(world);
    let expected = state
        .epoch
        .checked_mul(per_epoch)
        .and_then(|s| s.checked_add(state.steps_in_epoch));
    if state.steps_in_epoch > per_epoch || expected != Some(state.step) {
        return Err(CheckpointError::BadPosition {
            path,
            step: state.step,
            epoch: state.epoch,
            steps_in_epoch: state.steps_in_epoch,
            per_epoch,
        });
    }
    if state.best_epoch.is_some_and(|b| b > state.epoch) {
        return Err(CheckpointError::BadBestEpoch {
            path,
            best_epoch: state.best_epoch,
            epoch: state.epoch,
        });
    }
    Ok(())
}

/// Loads weights and optimizer state after checking the checkpoint fits `config`'s model.
/// `opt` gets the whole state (a sharded run drops the parts it does not own afterwards).
pub fn load(
    ckpt: &Path,
    state: &CheckpointState,
    config: &RunConfig,
    vs: &mut VarStore,
    opt: &mut Optimizer,
) -> Result<()> {
    let want = ModelSignature::of(config);
    if state.model != want {
        return Err(CheckpointError::OtherModel {
            path: ckpt.to_path_buf(),
            found: Box::new(state.model.clone()),
            want: Box::new(want),
        }
        .into());
    }
    // The run's other checkpoints: what to resume from when this one cannot be read.
    let others = || -> Vec<PathBuf> {
        list(ckpt.parent().and_then(Path::parent).unwrap_or(ckpt))
            .into_iter()
            .filter(|p| p.as_path() != ckpt)
            .collect()
    };
    let truncated = |path: PathBuf, cause: String| CheckpointError::Truncated {
        path,
        cause,
        others: others(),
    };
    // The checked load: a file with missing, extra or misshapen tensors is refused whole.
    let model = ckpt.join(MODEL);
    crate::model::load_checked(vs, &model, crate::model::WeightsSource::Run)
        .map_err(|e| truncated(model.clone(), e.to_string()))?;
    let optimizer = ckpt.join(OPTIMIZER);
    let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(&optimizer)
        .map_err(|e| truncated(optimizer.clone(), e.to_string()))?
        .into_iter()
        .collect();
    opt.load_state(&saved).map_err(|e| {
        CheckpointError::OptimizerMismatch {
            path: optimizer,
            cause: format!("{e:#}"),
            others: others(),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_typed_so_callers_can_tell_them_apart() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve(dir.path()).unwrap_err();
        assert!(matches!(err, CheckpointError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("without --resume"), "{err}");

        let ckpt = dir.path().join("step-00000001");
        fs::create_dir_all(&ckpt).unwrap();
        let err = read_state(&ckpt).unwrap_err();
        assert!(matches!(err, CheckpointError::Unreadable { .. }), "{err}");
        fs::write(ckpt.join(STATE), "{ not json").unwrap();
        let err = read_state(&ckpt).unwrap_err();
        assert!(matches!(err, CheckpointError::Damaged { .. }), "{err}");
        fs::write(ckpt.join(STATE), r#"{"format_version": 99}"#).unwrap();
        let err = anyhow::Error::from(read_state(&ckpt).unwrap_err());
        assert!(
            matches!(
                err.downcast_ref::<CheckpointError>(),
                Some(CheckpointError::FormatVersion { found: 99, .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade fsct-dist"), "{err}");
    }
}
