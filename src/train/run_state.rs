//! What a run leaves in its folder to survive a restart: the file names, `state.json` after
//! every epoch, and the checkpoint at a [`Position`] (rank 0 writes; the others wait at the
//! next collective).

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::checkpoint::{self, CheckpointState, ModelSignature};
use super::{zero, Accuracy, Trainer};

/// File names inside the run folder.
pub const CONFIG_FILE: &str = "config.toml";
pub const BEST_WEIGHTS: &str = "best.safetensors";
pub const LAST_WEIGHTS: &str = "last.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Written beside `last.safetensors` after every epoch: where the run is and what it reached.
#[derive(Debug, Clone, Serialize)]
pub struct RunState {
    pub epoch: u64,
    pub step: u64,
    pub best_val: Option<Accuracy>,
    pub best_epoch: Option<u64>,
    pub config: crate::config::RunConfig,
}

/// Where a checkpoint is taken.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    pub epoch: u64,
    pub steps_in_epoch: u64,
    /// The epoch is complete and validated (resume starts the next one).
    pub validated: bool,
    pub micro_steps: i64,
}

impl Trainer<'_> {
    /// The position after `steps_in_epoch` steps of `epoch`, validated or not.
    pub(super) fn position(&self, epoch: u64, steps_in_epoch: u64, validated: bool) -> Position {
        Position {
            epoch,
            steps_in_epoch,
            validated,
            micro_steps: self.plan.micro_steps,
        }
    }

    /// Writes a checkpoint at `at` (rank 0; `None` on the others), keeping the newest
    /// `keep_checkpoints`. Every rank calls it: a sharded optimizer's state is gathered on
    /// rank 0 first (held there only until written).
    pub(super) fn checkpoint(&self, at: Position) -> Result<Option<PathBuf>> {
        let optimizer = match self.opt.shards() {
            Some(own) => zero::gather_state(self.comm, own, &self.opt)?,
            None => self
                .comm
                .world()
                .is_root()
                .then(|| self.opt.state_tensors()),
        };
        // Both are Some on rank 0 only.
        let Some(optimizer) = optimizer else {
            return Ok(None);
        };
        let c = &self.r.config;
        let state = CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.summary.steps,
            epoch: at.epoch,
            steps_in_epoch: at.steps_in_epoch,
            epoch_validated: at.validated,
            best_val: self.summary.best_val.clone(),
            best_epoch: self.summary.best_epoch,
            scaler: self.scaler.state(),
            micro_steps: at.micro_steps,
            model: ModelSignature::of(c),
            config: c.clone(),
        };
        let keep = c.train.keep_checkpoints as usize;
        checkpoint::save(&c.run.output, &self.vs, &optimizer, &state, keep).map(Some)
    }

    /// Where to start: the epoch in progress at the checkpoint, and the steps it had done.
    pub(super) fn first_position(&self) -> (u64, u64) {
        match &self.resumed {
            Some(s) if s.epoch_validated => (s.epoch + 1, 0),
            Some(s) => (s.epoch, s.steps_in_epoch),
            None => (0, 0),
        }
    }
}
