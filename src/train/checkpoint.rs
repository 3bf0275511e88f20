//! Resumable checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holds `model.safetensors` (weights
//! and BatchNorm statistics), `optimizer.safetensors` (moments and step counts) and
//! `checkpoint.json` (position in the run, best validation, loss-scaler state, micro-steps, the
//! config). Episodes and augmentations are functions of (seed, epoch, index) and training
//! draws nothing else at random, so this is everything a run needs to continue bit for bit.
//!
//! A checkpoint is written into a temp folder, every file fsynced, then renamed into place:
//! it exists whole or not at all. The newest `keep` are kept.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use super::amp::GradScalerState;
use super::eval::Accuracy;
use super::optim::Optimizer;
use crate::config::{Backbone, RunConfig};

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
pub fn save(
    run: &Path,
    vs: &VarStore,
    opt: &Optimizer,
    state: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = run.join(DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("step-{:08}", state.step);
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        fs::create_dir_all(&tmp)?;
        vs.save(tmp.join(MODEL))?;
        Tensor::write_safetensors(&opt.state_tensors(), tmp.join(OPTIMIZER))?;
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
        let hint = crate::files::disk_hint_for::<()>(&Err(anyhow::anyhow!("{e:#}")));
        return Err(e.context(format!(
            "writing checkpoint {}{hint}; the previous checkpoints are intact",
            final_dir.display()
        )));
    }
    for old in list(run).into_iter().rev().skip(keep.max(1)) {
        let _ = fs::remove_dir_all(old);
    }
    Ok(final_dir)
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
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    match list(path).pop() {
        Some(p) => Ok(p),
        None => bail!(
            "{} holds no checkpoint to resume from (expected {}/step-*/ or a checkpoint folder); \
             start a new run without --resume",
            path.display(),
            DIR
        ),
    }
}

/// Reads a checkpoint's state, refusing other formats and other models.
pub fn read_state(ckpt: &Path) -> Result<CheckpointState> {
    let path = ckpt.join(STATE);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let version: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is damaged (not JSON); resume from an older checkpoint",
            path.display()
        )
    })?;
    let v = version["format_version"].as_u64().unwrap_or(0);
    if v > u64::from(FORMAT_VERSION) {
        bail!(
            "{} was written by a newer fsct-dist (checkpoint format {v}; this one reads up to \
             {FORMAT_VERSION}); upgrade fsct-dist to resume it",
            ckpt.display()
        );
    }
    serde_json::from_str(&text)
        .map(ModelSignature::upgrade_legacy)
        .with_context(|| {
            format!(
                "{} is damaged; resume from an older checkpoint",
                path.display()
            )
        })
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
) -> Result<()> {
    let images = config.episode_images().unwrap_or(i64::MAX);
    if state.micro_steps < 1 || state.micro_steps > images {
        bail!(
            "{} says {} micro-steps, impossible for an episode of {images} images; the file is \
             damaged: resume from another checkpoint",
            ckpt.join(STATE).display(),
            state.micro_steps
        );
    }
    let per_epoch = config.steps_per_epoch(world);
    let expected = state
        .epoch
        .checked_mul(per_epoch)
        .and_then(|s| s.checked_add(state.steps_in_epoch));
    if state.steps_in_epoch > per_epoch || expected != Some(state.step) {
        bail!(
            "{} is at step {} = epoch {} + {} steps, which does not fit {per_epoch} steps per \
             epoch; resume with the run's own --episodes-per-epoch/--episodes-per-step (and \
             the same number of ranks with --shard episodes), or from another checkpoint",
            ckpt.join(STATE).display(),
            state.step,
            state.epoch,
            state.steps_in_epoch
        );
    }
    if state.best_epoch.is_some_and(|b| b > state.epoch) {
        bail!(
            "{} names best epoch {:?} after its own epoch {}; the file is damaged: resume from \
             another checkpoint",
            ckpt.join(STATE).display(),
            state.best_epoch,
            state.epoch
        );
    }
    Ok(())
}

/// Loads weights and optimizer state after checking the checkpoint fits `config`'s model.
pub fn load(
    ckpt: &Path,
    state: &CheckpointState,
    config: &RunConfig,
    vs: &mut VarStore,
    opt: &mut Optimizer,
) -> Result<()> {
    let want = ModelSignature::of(config);
    if state.model != want {
        bail!(
            "checkpoint {} is of another model ({:?}) than this run ({:?}); resume with the \
             run's own settings or start a new run",
            ckpt.display(),
            state.model,
            want
        );
    }
    let older = || {
        let all = list(ckpt.parent().and_then(Path::parent).unwrap_or(ckpt));
        let names: Vec<String> = all
            .iter()
            .filter(|p| p.as_path() != ckpt)
            .map(|p| p.display().to_string())
            .collect();
        if names.is_empty() {
            String::new()
        } else {
            format!("; older checkpoints: {}", names.join(", "))
        }
    };
    // The checked load: a file with missing, extra or misshapen tensors is refused whole.
    crate::model::load_checked(vs, &ckpt.join(MODEL), crate::model::WeightsSource::Run).map_err(
        |e| {
            anyhow::anyhow!(
                "{} cannot be loaded ({e}): the file is damaged or truncated{}",
                ckpt.join(MODEL).display(),
                older()
            )
        },
    )?;
    let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(ckpt.join(OPTIMIZER))
        .map_err(|e| {
            anyhow::anyhow!(
                "{} cannot be loaded ({e}): the file is damaged or truncated{}",
                ckpt.join(OPTIMIZER).display(),
                older()
            )
        })?
        .into_iter()
        .collect();
    opt.load_state(&saved)
}
