//! One training epoch: which episodes this rank takes ([`EpochPlan`], shared with `bench`), the
//! optimizer steps over them, the training metrics, and the periodic checkpoints.

use std::time::Instant;

use anyhow::{Context, Result};
use tch::nn::VarStore;

use super::dumps::save_grads;
use super::metrics::Metric;
use super::optimizer_step::{optimizer_step, reload_episode, StepHooks, Trainee};
use super::run_state::Position;
use super::signals::StopFlag;
use super::{checkpoint, step, Trainer};
use crate::config::{RunConfig, ShardMode};
use crate::data::{self, EpisodeLoader, LoadedEpisode, LoaderConfig};
use crate::distributed::World;
use crate::memory::{NoProfile, Phase, PhaseSink};

/// Which episodes of an epoch this rank trains on, step by step. Every step takes
/// `per_step` episodes of the epoch's sequence: under `--shard images` each rank loads its
/// slice of the same `per_rank` episodes; under `--shard episodes` rank r takes its own
/// `per_rank` of them.
#[derive(Debug, Clone, Copy)]
pub struct EpochPlan {
    shard: ShardMode,
    rank: u64,
    /// Episodes this rank takes per step (`--episodes-per-step`).
    pub per_rank: u64,
    /// Episodes per optimizer step over all ranks.
    pub per_step: u64,
    pub steps_per_epoch: u64,
    pub epochs: u64,
    /// `--max-steps` (u64::MAX: none).
    pub max_steps: u64,
}

impl EpochPlan {
    pub fn new(c: &RunConfig, world: World) -> Self {
        Self {
            shard: c.train.shard,
            rank: world.rank as u64,
            per_rank: c.train.episodes_per_step,
            per_step: c.episodes_per_step_over(world.size),
            steps_per_epoch: c.steps_per_epoch(world.size),
            epochs: c.train.epochs,
            max_steps: match c.train.max_steps {
                0 => u64::MAX,
                n => n,
            },
        }
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        (self.epochs * self.steps_per_epoch).min(self.max_steps)
    }

    /// Steps of an epoch entered `skip` steps in (a resume), `done` steps into the run.
    pub fn steps_of_epoch(&self, skip: u64, done: u64) -> u64 {
        let left = self.max_steps.saturating_sub(done);
        self.steps_per_epoch.min(skip.saturating_add(left))
    }

    /// This rank's episode indices for the first `steps` steps of an epoch, in the order its
    /// steps take them.
    pub fn episodes(&self, steps: u64) -> Vec<u64> {
        let k = self.per_rank;
        (0..steps)
            .flat_map(|s| {
                let first = s * self.per_step
                    + match self.shard {
                        ShardMode::Images => 0,
                        ShardMode::Episodes => self.rank * k,
                    };
                first..first + k
            })
            .collect()
    }
}

/// How an epoch's training ended.
pub(super) enum EpochEnd {
    /// Its steps are done (this many: fewer than an epoch under `--max-steps`).
    Trained(u64),
    /// A stop signal (or an interrupted loader wait): checkpoint here.
    Stopped(Position),
}

impl Trainer<'_> {
    /// Trains `epoch` from step `skip` on (0 unless resumed inside it).
    pub(super) fn train_epoch(
        &mut self,
        epoch: u64,
        skip: u64,
        stop: &StopFlag,
    ) -> Result<EpochEnd> {
        let k = self.epochs.per_rank as usize;
        let steps = self.epochs.steps_of_epoch(skip, self.summary.steps);
        let order = self.epochs.episodes(steps);
        let mut stats = EpochStats::new();
        let mut next = skip as usize * k;
        while next < order.len() {
            // A fresh loader whenever the slice changed (dynamic micro-steps regroup the images).
            let slice = self.plan.slice();
            let mut loader = self.loader(epoch, slice, order[next..].to_vec());
            while next < order.len() && self.plan.slice() == slice {
                self.comm.note_step(self.summary.steps + 1);
                if let Some(p) = self.profiler.as_mut() {
                    p.begin_step(self.summary.steps + 1);
                    p.enter(Phase::Data);
                }
                let loaded: Result<Vec<LoadedEpisode>, _> = (0..k)
                    .map(|_| loader.next().expect("the order holds whole steps"))
                    .collect();
                if let Err(data::DataError::Interrupted) = loaded {
                    let at = self.position(epoch, (next / k) as u64, false);
                    return Ok(EpochEnd::Stopped(at));
                }
                next += k;
                self.step(epoch, loaded?, &mut stats)?;
                if self
                    .summary
                    .steps
                    .is_multiple_of(self.r.config.train.log_every)
                    || next == order.len()
                {
                    self.log_window(epoch, &mut stats)?;
                }
                let at = self.position(epoch, (next / k) as u64, false);
                if stop.requested(self.comm)? {
                    return Ok(EpochEnd::Stopped(at));
                }
                let every = self.r.config.train.checkpoint_every;
                if every > 0
                    && self.summary.steps.is_multiple_of(every)
                    && at.steps_in_epoch < self.epochs.steps_per_epoch
                {
                    self.checkpoint(at)?;
                }
            }
        }
        if let Some(acc) = stats.epoch_acc() {
            self.curves.train_acc.push((epoch as f64, acc));
        }
        Ok(EpochEnd::Trained((order.len() / k) as u64))
    }

    /// The loader of this rank's `episodes` of `epoch`, each cut to `slice`.
    fn loader(
        &self,
        epoch: u64,
        slice: Option<(usize, usize)>,
        episodes: Vec<u64>,
    ) -> EpisodeLoader {
        let cfg = LoaderConfig::for_run(self.r, self.r.config.data.train_aug);
        let loader = EpisodeLoader::with_indices(
            self.data.base.clone(),
            self.data.shape,
            LoaderConfig { slice, ..cfg },
            epoch,
            episodes,
        );
        if self.comm.world().size == 1 {
            // Alone, a signal may end a wait for images at once. Under MPI every rank must
            // stop after the same step, so the ranks agree on it after each step instead (and
            // the collective watchdog ends a rank stuck in its loader).
            loader.interrupted_by(crate::signals::stop_requested)
        } else {
            loader
        }
    }

    /// One optimizer step over `episodes`, and its bookkeeping (step count, cache, progress).
    fn step(
        &mut self,
        epoch: u64,
        episodes: Vec<LoadedEpisode>,
        stats: &mut EpochStats,
    ) -> Result<()> {
        let c = &self.r.config;
        let (base, shape) = (&self.data.base, self.data.shape);
        let train_cfg = LoaderConfig::for_run(self.r, c.data.train_aug);
        let reload = |e: &LoadedEpisode, slice| reload_episode(base, shape, &train_cfg, e, slice);
        let first_step_on_root = self.summary.steps == 0 && self.comm.world().is_root();
        let grads = self.dumps.grads.as_ref().filter(|_| first_step_on_root);
        let mut dump = |vs: &VarStore| grads.map_or(Ok(()), |path| save_grads(vs, path));
        let phases: &mut dyn PhaseSink = match self.profiler.as_mut() {
            Some(p) => p,
            None => &mut NoProfile,
        };
        let trainee = Trainee {
            model: &self.model,
            vs: &self.vs,
            opt: &mut self.opt,
            scaler: &mut self.scaler,
        };
        let hooks = StepHooks {
            reload: &reload,
            before_optimizer: &mut dump,
            // The same on every rank: whether rank 0 dumps this step's gradients.
            full_grads: self.dumps.grads.is_some() && self.summary.steps == 0,
            phases,
        };
        let report =
            optimizer_step(&mut self.plan, trainee, episodes, hooks).with_context(|| {
                format!(
                    "optimizer step {} (epoch {epoch}){}",
                    self.summary.steps + 1,
                    checkpoint::what_is_kept(&c.run.output)
                )
            })?;
        self.summary.steps += 1;
        if self.summary.steps == 1 && self.comm.world().size > 1 {
            tracing::info!(
                "gradient all-reduce: {} group(s) of the first step went out during the backward \
                 (--overlap {}; overlapping needs the MPI backend with MPI_THREAD_MULTIPLE and \
                 fixed micro-steps)",
                report.overlapped_groups,
                if self.plan.overlap { "on" } else { "off" }
            );
        }
        if !report.stepped {
            tracing::warn!(
                "step {}: inf/NaN gradients, step skipped; loss scale now {}",
                self.summary.steps,
                self.scaler.scale_factor()
            );
        }
        let every = self.plan.empty_cache_every;
        if self.device.is_cuda() && every > 0 && self.summary.steps.is_multiple_of(every) {
            crate::ffi::cuda::empty_cache()?;
        }
        if let Some(p) = self.profiler.as_mut() {
            p.end_step();
        }
        let mut loss = 0.0;
        for o in &report.outcomes {
            loss = stats.add(o);
        }
        self.progress.step(format!(
            "epoch {epoch} step {} loss {loss:.3}",
            self.summary.steps
        ));
        Ok(())
    }

    /// Writes the logging window's training line and restarts the window.
    fn log_window(&mut self, epoch: u64, stats: &mut EpochStats) -> Result<()> {
        let (loss, acc, episodes_per_s) = stats.take_window();
        let scale = self.epochs.per_step as f64 / self.epochs.per_rank as f64;
        if let Some(m) = self.metrics.as_mut() {
            m.write(&Metric::Train {
                epoch,
                step: self.summary.steps,
                loss,
                acc,
                episodes_per_s: episodes_per_s * scale,
            })?;
        }
        self.curves.loss.push((self.summary.steps as f64, loss));
        Ok(())
    }
}

/// Running means for the metrics: a logging window (loss, speed) and the epoch (accuracy).
struct EpochStats {
    window_loss: f64,
    window_n: u64,
    window_start: Instant,
    acc_sum: f64,
    acc_n: u64,
}

impl EpochStats {
    fn new() -> Self {
        Self {
            window_loss: 0.0,
            window_n: 0,
            window_start: Instant::now(),
            acc_sum: 0.0,
            acc_n: 0,
        }
    }

    /// Records one episode; returns its loss.
    fn add(&mut self, out: &step::StepOutcome) -> f64 {
        let loss = out.loss;
        self.acc_sum += out.accuracy();
        self.acc_n += 1;
        self.window_loss += loss;
        self.window_n += 1;
        loss
    }

    /// (mean loss, epoch accuracy so far, episodes/s) of the window, which then restarts.
    fn take_window(&mut self) -> (f64, f64, f64) {
        let n = self.window_n.max(1) as f64;
        let speed = n / self.window_start.elapsed().as_secs_f64().max(1e-9);
        let out = (
            self.window_loss / n,
            self.acc_sum / self.acc_n.max(1) as f64,
            speed,
        );
        (self.window_loss, self.window_n, self.window_start) = (0.0, 0, Instant::now());
        out
    }

    fn epoch_acc(&self) -> Option<f64> {
        (self.acc_n > 0).then(|| self.acc_sum / self.acc_n as f64)
    }
}
