//! The training protocol of the official `train_test.py`: one optimizer step per episode,
//! validation after every epoch, the best validation model kept, then the test — on one
//! process or on every rank of a world. [`train`] is the whole run on one screen; each phase
//! lives in its own file: set-up (`setup`), an epoch (`epoch`), its validation and what it
//! leaves on disk (`validation`), the restart state (`run_state`), the end (`finish`).

pub mod amp;
pub mod bn_sync;
pub mod checkpoint;
mod dumps;
mod epoch;
pub mod eval;
mod finish;
mod grads;
mod metrics;
pub mod optim;
pub mod optimizer_step;
pub mod overlap;
mod ownership;
mod progress;
pub mod run_folder;
mod run_state;
mod setup;
pub mod signals;
pub mod step;
mod validation;
pub mod zero;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tch::nn::VarStore;

use crate::config::Resolved;
use crate::distributed::Communicator;
use crate::files::JsonLines;
use crate::memory::{MemoryProfiler, Meter};
use crate::model::FewShotModel;
use crate::plot::Curves;
use amp::GradScaler;
use epoch::EpochEnd;
use optimizer_step::StepPlan;
use progress::Progress;
use setup::{claim_output, TrainData};

pub use dumps::{rank_path, save_grads, Dumps};
pub use epoch::EpochPlan;
pub use eval::{evaluate, Accuracy, EvalEpisodes, TEST_EPOCH, VAL_EPOCH};
pub use finish::test_split;
pub use run_state::{RunState, BEST_WEIGHTS, CONFIG_FILE, LAST_WEIGHTS, METRICS_FILE, STATE_FILE};
pub use setup::{
    build, build_on, dataset_root, dataset_root_on, episode_shape, model_config, open_split,
    preflight, Built,
};

/// Where training stopped and what it reached.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub epochs_completed: u64,
    pub best_val: Option<Accuracy>,
    pub best_epoch: Option<u64>,
    pub test: Option<Accuracy>,
    pub seconds: f64,
    /// Set when SIGTERM/SIGINT stopped the run: the checkpoint to resume from.
    pub preempted: Option<PathBuf>,
}

/// How a training run begins.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// A new run in an empty or new output folder; `overwrite` moves an existing one aside.
    Fresh { overwrite: bool },
    /// Continue from this checkpoint (a run folder or one checkpoint folder).
    Resume(&'a Path),
}

/// Trains, validates every epoch, keeps the best, then tests it. Writes into the run folder
/// (rank 0 only, holding its lock): config.toml, metrics.jsonl, best/last weights, curves.png,
/// summary.json, test.json. Every rank of `comm` calls this with the same config. Everything
/// that can be checked before the first step is (splits, output paths, the world size), so a
/// bad setting fails in seconds, not after training.
pub fn train(
    r: &Resolved,
    dumps: &Dumps,
    comm: &dyn Communicator,
    start: Start<'_>,
) -> Result<TrainSummary> {
    r.config.check_world(comm.world().size)?;
    // Caught from the start: a stop during dataset generation or set-up ends the run cleanly.
    let stop = signals::StopFlag::install()?;
    let _lock = claim_output(r, dumps, comm, start)?;
    let data = TrainData::open(r, comm)?;
    let mut t = Trainer::new(r, comm, dumps, data, start)?;
    let (first_epoch, mut skip) = t.first_position();
    for epoch in first_epoch..t.epochs.epochs {
        let done = match t.train_epoch(epoch, std::mem::take(&mut skip), &stop)? {
            EpochEnd::Trained(done) => done,
            EpochEnd::Stopped(at) => return t.stop_at(at),
        };
        let Some(acc) = t.validate(&stop)? else {
            // Stopped during validation: the epoch's steps are done; resume validates it.
            let at = t.position(epoch, done, false);
            return t.stop_at(at);
        };
        t.end_epoch(epoch, done, acc)?;
        if t.summary.steps >= t.epochs.max_steps {
            break;
        }
    }
    t.finish_training()?;
    if t.test(&stop)?.is_none() {
        // Stopped during the test: training ended with a checkpoint, which resume starts from.
        let out = &r.config.run.output;
        let newest = comm.world().is_root().then(|| checkpoint::resolve(out));
        return t.stopped(newest.transpose()?);
    }
    Ok(t.summary)
}

/// Everything a run holds from its set-up to its end (built by `Trainer::new` in `setup`).
struct Trainer<'a> {
    r: &'a Resolved,
    comm: &'a dyn Communicator,
    dumps: &'a Dumps,
    data: TrainData,
    device: tch::Device,
    vs: VarStore,
    model: FewShotModel,
    opt: optim::Optimizer,
    scaler: GradScaler,
    plan: StepPlan<'a>,
    epochs: EpochPlan,
    meter: Meter,
    /// `--memory-report`: every step is profiled, the last one reported.
    profiler: Option<MemoryProfiler>,
    /// metrics.jsonl, on rank 0 only.
    metrics: Option<JsonLines>,
    curves: Curves,
    summary: TrainSummary,
    progress: Progress,
    started: Instant,
    resumed: Option<checkpoint::CheckpointState>,
}
