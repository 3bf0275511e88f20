//! One optimizer step of a world of ranks: the episodes of the step (each rank's share, per
//! `--shard`), micro-steps with an out-of-memory retry under `dynamic`, BatchNorm statistics
//! combined across ranks, gradients all-reduced once (or, with a sharded optimizer, reduced to
//! their owners, stepped there and the parameters broadcast back: [`super::zero`]), then the
//! AMP-aware optimizer step and cache clearing.

use anyhow::{bail, Result};
use tch::{nn, Device, Tensor};

use super::optim::Optimizer;
use super::overlap::Overlap;
use tracing::{info, warn};

use super::amp::{AmpMode, Autocast, GradScaler};
use super::bn_sync;
use super::grads::defined_grads;
use super::step::{self, rank_groups, StepError, StepOptions, StepOutcome};
use super::zero;
use crate::config::ShardMode;
use crate::data::{self, LoadedEpisode, LoaderConfig, SplitIndex};
use crate::distributed::{Communicator, Local};
use crate::memory::{Meter, Phase, PhaseSink};
use crate::model::FewShotModel;

/// How the run's optimizer steps are taken: fixed for the run except `micro_steps`, which
/// dynamic micro-steps raise after an out-of-memory (and a resume restores).
pub struct StepPlan<'a> {
    pub comm: &'a dyn Communicator,
    pub shard: ShardMode,
    pub device: Device,
    pub amp: AmpMode,
    /// Micro-steps now (may grow under `dynamic`).
    pub micro_steps: i64,
    pub dynamic: bool,
    pub checkpoint: bool,
    /// 1/K for K episodes per step.
    pub episode_scale: f64,
    pub oom_above_bytes: Option<u64>,
    /// Images in one episode.
    pub total_images: i64,
    pub empty_cache_every: u64,
    /// `--overlap`: all-reduce gradient buckets during the backward ([`super::overlap`]).
    pub overlap: bool,
}

impl<'a> StepPlan<'a> {
    /// The plan of run `r` on `device` for episodes of `total_images` images.
    pub fn for_run(
        r: &crate::config::Resolved,
        comm: &'a dyn Communicator,
        device: Device,
        total_images: i64,
    ) -> Self {
        let c = &r.config;
        StepPlan {
            comm,
            shard: c.train.shard,
            device,
            amp: c.train.amp.unwrap_or(AmpMode::Off),
            micro_steps: r.micro_steps as i64,
            dynamic: r.dynamic_micro_steps,
            checkpoint: c.train.checkpoint_activations,
            episode_scale: 1.0 / c.train.episodes_per_step as f64,
            oom_above_bytes: None,
            total_images,
            empty_cache_every: c.train.empty_cache_every,
            overlap: c.train.overlap,
        }
    }

    /// The flat image positions this rank loads from each episode (None: all of them).
    pub fn slice(&self) -> Option<(usize, usize)> {
        let w = self.comm.world();
        if self.shard == ShardMode::Episodes || w.size == 1 {
            return None;
        }
        let (_, s) = rank_groups(self.total_images, w.size, w.rank, self.micro_steps);
        Some((s.start as usize, s.end as usize))
    }

    /// The communicator that shares one episode: the world under `--shard images`, this rank
    /// alone under `--shard episodes`.
    fn episode_comm(&self) -> &dyn Communicator {
        match self.shard {
            ShardMode::Images => self.comm,
            ShardMode::Episodes => &Local,
        }
    }

    /// Images of an episode one rank embeds (at least 1): its share under `--shard images`,
    /// the whole episode under `--shard episodes`. Micro-steps never exceed it.
    pub fn images_per_rank(&self) -> i64 {
        let per_rank = match self.shard {
            ShardMode::Images => self.total_images / self.comm.world().size as i64,
            ShardMode::Episodes => self.total_images,
        };
        per_rank.max(1)
    }

    /// Whether the gradient exchange runs during the backward: `--overlap` with more than one
    /// rank and a communicator that runs beside the backward; off under dynamic micro-steps,
    /// where an out-of-memory redoes the step, which buckets already on the wire would not follow.
    pub fn overlaps(&self) -> bool {
        self.overlap && self.comm.world().size > 1 && !self.dynamic && self.comm.overlaps()
    }

    /// Logs the BatchNorm groups the run uses (the objective depends on them).
    pub fn log_groups(&self) {
        let w = self.comm.world();
        let (ranks, per_episode) = match self.shard {
            ShardMode::Images => (w.size, self.micro_steps * w.size as i64),
            ShardMode::Episodes => (1, self.micro_steps),
        };
        let groups = step::balanced_groups(self.total_images, per_episode);
        let sizes: Vec<i64> = groups.iter().map(|g| g.end - g.start).collect();
        info!(
            "BatchNorm groups per episode: {:?} ({} rank(s) × {} micro-step(s), shard {:?}; one group = the official single batch)",
            sizes, ranks, self.micro_steps, self.shard
        );
    }
}

/// Reloads an episode with another slice of its images (after the micro-steps changed).
pub type Reload<'a> = dyn Fn(&LoadedEpisode, Option<(usize, usize)>) -> Result<LoadedEpisode> + 'a;

/// One finished optimizer step.
pub struct StepReport {
    pub outcomes: Vec<StepOutcome>,
    pub stepped: bool,
    /// Gradient groups all-reduced while the backward went on (0 without overlap).
    pub overlapped_groups: usize,
}

/// What an optimizer step changes: the model's parameters (through `vs`), the optimizer's and
/// the loss scaler's state.
pub struct Trainee<'a> {
    pub model: &'a FewShotModel,
    pub vs: &'a nn::VarStore,
    pub opt: &'a mut Optimizer,
    pub scaler: &'a mut GradScaler,
}

/// What the caller adds to a step: how to reload an episode with another slice, a look at the
/// reduced gradients before the optimizer (`--dump-grads`), and where phases are reported.
pub struct StepHooks<'a> {
    pub reload: &'a Reload<'a>,
    pub before_optimizer: &'a mut dyn FnMut(&nn::VarStore) -> Result<()>,
    /// `before_optimizer` reads every reduced gradient (`--dump-grads`): a sharded optimizer
    /// all-reduces this step instead of reducing each gradient to its owner alone (the
    /// simplest way to have them all on rank 0; the update is the same).
    pub full_grads: bool,
    pub phases: &'a mut dyn PhaseSink,
}

/// Runs one optimizer step over `episodes` (this rank's share, already loaded with
/// [`StepPlan::slice`]). Under `dynamic`, an out-of-memory anywhere doubles the micro-steps,
/// restores the BatchNorm statistics and redoes the step's episodes (reloaded through
/// `hooks.reload` with the new slice).
pub fn optimizer_step(
    plan: &mut StepPlan,
    t: Trainee,
    mut episodes: Vec<LoadedEpisode>,
    hooks: StepHooks,
) -> Result<StepReport> {
    let Trainee {
        model,
        vs,
        opt,
        scaler,
    } = t;
    let StepHooks {
        reload,
        before_optimizer,
        full_grads,
        phases,
    } = hooks;
    let world = plan.comm.world();
    let bn = bn_sync::buffers(vs);
    let start = if plan.dynamic {
        Some(bn_sync::snapshot(&bn))
    } else {
        None
    };
    let shards = opt.shards().filter(|_| world.size > 1).cloned();
    // Gradients go to their owners only, unless the hook needs them all on this step.
    let to_owners = shards.as_ref().filter(|_| !full_grads);
    let overlapping = plan.overlaps();
    let mut overlap = None;
    let outcomes = 'attempt: loop {
        opt.zero_grad();
        let mut outcomes = Vec::with_capacity(episodes.len());
        for (e, ep) in episodes.iter().enumerate() {
            let round = (world.size > 1).then(|| bn_sync::snapshot(&bn));
            let x = ep.images.to_device(plan.device);
            let x = if x.dim() == 5 { x.flatten(0, 1) } else { x };
            let opts = StepOptions {
                micro_steps: plan.micro_steps,
                checkpoint: plan.checkpoint,
                loss_scale: scaler.scale_factor() * plan.episode_scale,
                oom_above_bytes: plan.oom_above_bytes,
                total_images: plan.total_images,
                agree: plan.dynamic,
            };
            if overlapping && e + 1 == episodes.len() {
                let named = opt.named_variables();
                overlap = Some(Overlap::new(plan.comm, model, &named, to_owners));
            }
            let autocast = plan.amp.autocast(plan.device)?;
            let result = step::forward_backward(
                model,
                &x,
                opts,
                plan.episode_comm(),
                phases,
                overlap.as_mut(),
            );
            drop(autocast);
            match result {
                Ok(o) => outcomes.push(o),
                Err(StepError::OutOfMemory(why)) if plan.dynamic => {
                    let per_rank = plan.images_per_rank();
                    if plan.micro_steps >= per_rank {
                        bail!(
                            "out of memory with {} micro-steps (one image per chunk): {why}. \
                             Lower --image-size, use --amp bf16/fp16 or --checkpoint-activations",
                            plan.micro_steps
                        );
                    }
                    let next = (plan.micro_steps * 2).min(per_rank);
                    warn!(
                        "out of memory with {} micro-steps ({why}); redoing the step's {} episode(s) with {next}",
                        plan.micro_steps,
                        episodes.len()
                    );
                    plan.micro_steps = next;
                    plan.log_groups();
                    if let Some(s) = &start {
                        bn_sync::restore(&bn, s);
                    }
                    if plan.device.is_cuda() {
                        let _ = crate::ffi::cuda::empty_cache();
                    }
                    let slice = plan.slice();
                    episodes = episodes
                        .iter()
                        .map(|e| reload(e, slice))
                        .collect::<Result<_>>()?;
                    continue 'attempt;
                }
                Err(StepError::OutOfMemory(why)) => bail!(
                    "out of memory: {why}. Use --gradient-accumulation-steps dynamic (or a larger \
                     N), --amp, or --checkpoint-activations"
                ),
                Err(StepError::Other(e)) => return Err(e),
            }
            if let Some(r0) = round {
                bn_sync::combine(plan.comm, &bn, &r0, plan.micro_steps)?;
            }
        }
        break outcomes;
    };

    // fp32 has no loss scaler to absorb an overflow: a non-finite loss is a diverged run, and
    // stepping would write NaN into the weights.
    if !scaler.is_enabled() {
        if let Some(o) = outcomes.iter().find(|o| !o.loss.is_finite()) {
            bail!(
                "the loss became {} (fp32); the step was not taken. Lower --learning-rate, or \
                 check the data",
                o.loss
            );
        }
    }
    let vars = opt.trainable_variables();
    // What this rank checks for inf/NaN: its own variables when only the owners hold reduced
    // gradients (the others' here are partial sums), otherwise all.
    let owned: Vec<Tensor>;
    let checked: &[Tensor] = match to_owners {
        Some(own) => {
            owned = own
                .of_rank(own.rank)
                .into_iter()
                .map(|i| vars[i].shallow_clone())
                .collect();
            &owned
        }
        None => &vars,
    };
    let mut overlapped_groups = 0;
    if world.size > 1 {
        phases.enter(Phase::GradientSync);
        let grads = defined_grads(&vars);
        match (overlap, to_owners) {
            (Some(o), _) => overlapped_groups = o.finish()?,
            (None, Some(own)) => zero::reduce_to_owners(plan.comm, own, &grads)?,
            (None, None) => plan.comm.all_reduce_sum(&grads)?,
        }
        if plan.shard == ShardMode::Episodes {
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.f_div_scalar_(world.size as f64)?;
            }
        }
    }
    phases.enter(Phase::Optimizer);
    scaler.unscale_(checked)?;
    if world.size > 1 && scaler.is_enabled() {
        // Unsharded, gradients are identical after the all-reduce, so this agrees already;
        // sharded, each owner checked its own: every rank must take the same decision.
        let any = crate::distributed::sum_f64(plan.comm, f64::from(u8::from(scaler.found_inf())))?;
        scaler.set_found_inf(any > 0.0);
    }
    before_optimizer(vs)?;
    let stepped = scaler.step(opt)?;
    scaler.update()?;
    if let (Some(own), true) = (&shards, stepped) {
        // A skipped step changed nothing anywhere: nothing to send.
        phases.enter(Phase::Communication);
        zero::broadcast_from_owners(plan.comm, own, &vars)?;
    }
    Ok(StepReport {
        outcomes,
        stepped,
        overlapped_groups,
    })
}

/// Micro-steps for `dynamic` from the memory available: measures the backbone's working memory
/// per image with a 2-image forward/backward (no statistics, gradients cleared after), then
/// takes the fewest (a power of two) whose chunk fits in half of what is free.
pub fn probe_micro_steps(
    model: &FewShotModel,
    opt: &mut Optimizer,
    device: Device,
    image_size: i64,
    images: i64,
) -> i64 {
    let meter = Meter::for_device(device);
    let Some(available) = meter.available() else {
        return 1;
    };
    meter.reset_peak();
    let before = meter.read().current;
    {
        let x = Tensor::zeros([2, 3, image_size, image_size], (tch::Kind::Float, device));
        let e = model.embed_t(&x, crate::model::BnMode::TrainNoStats);
        e.sum(e.kind()).backward();
    }
    let per_image = (meter.read().peak.saturating_sub(before) / 2).max(1);
    opt.zero_grad();
    let fit = (available / 2 / per_image).max(1) as i64;
    let mut m = 1;
    while m < images && (images + m - 1) / m > fit {
        m *= 2;
    }
    let m = m.min(images.max(1));
    info!(
        "dynamic micro-steps: about {:.1} MiB per image, {:.0} MiB available → {m} micro-step(s)",
        per_image as f64 / (1u64 << 20) as f64,
        available as f64 / (1u64 << 20) as f64
    );
    m
}

/// Reloads an episode with another slice of its images (same epoch, index, augmentation).
pub fn reload_episode(
    split: &SplitIndex,
    shape: data::EpisodeShape,
    cfg: &LoaderConfig,
    ep: &LoadedEpisode,
    slice: Option<(usize, usize)>,
) -> Result<LoadedEpisode> {
    let cfg = LoaderConfig { slice, ..*cfg };
    Ok(data::load_episode(split, shape, &cfg, ep.epoch, ep.index)?)
}
