//! Measured training steps: the real loader, step engine and optimizer of `train`, without
//! validation or files, every step profiled per phase (time, and memory on the run's meter).

use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::config::{Resolved, ShardMode, Split};
use crate::data::{EpisodeLoader, LoadedEpisode, LoaderConfig};
use crate::distributed::Communicator;
use crate::memory::{MemoryProfiler, Meter, Phase, PhaseSink, StepMemory};
use crate::train::amp::{AmpMode, GradScaler};
use crate::train::optimizer_step::{optimizer_step, reload_episode, StepHooks, StepPlan, Trainee};
use crate::train::{build_on, dataset_root_on, open_split, Built, EpochPlan};

/// Per-step numbers of one measured setting (steps after the warm-up).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub device: String,
    pub meter: String,
    pub ranks: usize,
    pub shard: ShardMode,
    /// `--shard-optimizer` (absent in results written before it: off).
    #[serde(default)]
    pub shard_optimizer: bool,
    /// `--overlap` (absent in results written before it: off).
    #[serde(default)]
    pub overlap: bool,
    pub micro_steps: i64,
    pub amp: AmpMode,
    pub checkpoint: bool,
    /// Episodes one optimizer step trains on (over all ranks), and their images.
    pub episodes_per_step: u64,
    pub images_per_episode: i64,
    pub steps: Vec<StepMemory>,
    /// Tensor bytes this rank sent into collectives per step (mean over measured steps).
    pub bytes_sent_per_step: f64,
}

impl Measured {
    /// Median seconds of a whole step.
    pub fn step_seconds(&self) -> f64 {
        median(
            self.steps
                .iter()
                .map(|s| s.phases.iter().map(|p| p.seconds).sum()),
        )
    }

    /// Median seconds spent in `phase` per step (all its entries summed).
    pub fn phase_seconds(&self, phase: Phase) -> f64 {
        median(self.steps.iter().map(|s| {
            s.phases
                .iter()
                .filter(|p| p.phase == phase)
                .map(|p| p.seconds)
                .sum::<f64>()
                + 0.0 // an empty sum is -0.0
        }))
    }

    /// The largest memory held at the start of a measured step (weights, gradients,
    /// optimizer state).
    pub fn held_bytes(&self) -> u64 {
        self.steps.iter().map(|s| s.held_bytes).max().unwrap_or(0)
    }

    /// The largest working memory of a measured step (peak − held).
    pub fn step_bytes(&self) -> u64 {
        self.steps.iter().map(|s| s.step_bytes).max().unwrap_or(0)
    }

    pub fn peak_bytes(&self) -> u64 {
        self.steps.iter().map(|s| s.peak_bytes).max().unwrap_or(0)
    }
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Trains `warmup + steps` optimizer steps of `r` on this rank of `comm` and returns the
/// profile of the last `steps`.
pub fn measure_steps(
    r: &Resolved,
    comm: &dyn Communicator,
    warmup: u64,
    steps: u64,
) -> Result<Measured> {
    let c = &r.config;
    let world = comm.world();
    let device = world.device_for(r.device);
    let root = dataset_root_on(r, comm)?;
    let Built { vs, model, shape } = build_on(r, device)?;
    let base = open_split(&root, Split::Base, shape)?;
    let mut opt = crate::train::optim::build(&c.train, &vs)?;
    if c.train.shard_optimizer && world.size > 1 {
        let own = crate::train::zero::Ownership::of(&opt.numels(), world.rank, world.size);
        opt.shard(own);
    }
    let mut plan = StepPlan {
        dynamic: false,
        ..StepPlan::for_run(r, comm, device, shape.total() as i64)
    };
    let amp = plan.amp;
    let k = c.train.episodes_per_step;
    let epochs = EpochPlan::new(c, world);
    let per_step = epochs.per_step;
    let total = warmup + steps;
    // The trainer's order: the first `total` steps of an epoch.
    let order = epochs.episodes(total);
    let cfg = LoaderConfig::for_run(r, c.data.train_aug);
    let mut loader = EpisodeLoader::with_indices(
        Arc::clone(&base),
        shape,
        LoaderConfig {
            slice: plan.slice(),
            ..cfg
        },
        0,
        order,
    );
    let meter = Meter::for_device(device);
    let mut profiler = MemoryProfiler::new(meter);
    let mut scaler = GradScaler::for_mode(amp, device);
    let mut measured = Vec::new();
    let mut bytes = 0u64;
    for s in 0..total {
        profiler.begin_step(s + 1);
        profiler.enter(Phase::Data);
        let episodes: Vec<LoadedEpisode> = (0..k)
            .map(|_| loader.next().expect("the order holds whole steps"))
            .collect::<Result<_, _>>()?;
        let sent_before = comm.bytes_sent();
        let reload = |e: &LoadedEpisode, slice| reload_episode(&base, shape, &cfg, e, slice);
        let trainee = Trainee {
            model: &model,
            vs: &vs,
            opt: &mut opt,
            scaler: &mut scaler,
        };
        let hooks = StepHooks {
            reload: &reload,
            before_optimizer: &mut |_| Ok(()),
            full_grads: false,
            phases: &mut profiler,
        };
        optimizer_step(&mut plan, trainee, episodes, hooks)?;
        if device.is_cuda() && plan.empty_cache_every > 0 {
            crate::ffi::cuda::empty_cache()?;
        }
        profiler.end_step();
        if s >= warmup {
            bytes += comm.bytes_sent() - sent_before;
            measured.extend(profiler.last().cloned());
        }
    }
    Ok(Measured {
        device: format!("{device:?}"),
        meter: meter.describe().to_owned(),
        ranks: world.size,
        shard: plan.shard,
        shard_optimizer: opt.shards().is_some(),
        overlap: plan.overlaps(),
        micro_steps: plan.micro_steps,
        amp,
        checkpoint: plan.checkpoint,
        episodes_per_step: per_step,
        images_per_episode: plan.total_images,
        bytes_sent_per_step: bytes as f64 / steps.max(1) as f64,
        steps: measured,
    })
}
