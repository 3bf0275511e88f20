//! The single-process training protocol of the official `train_test.py`: one optimizer step per
//! episode, validation after every epoch, the best validation model kept, then the test.

pub mod amp;
pub mod bn_sync;
pub mod checkpoint;
pub mod eval;
pub mod files;
mod metrics;
pub mod optim;
pub mod optimizer_step;
pub mod plot;
mod progress;
pub mod run_folder;
pub mod signals;
pub mod step;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::nn::VarStore;
use tracing::info;

use crate::config::{DatasetSource, Resolved, ShardMode, Split};
use crate::data::{self, EpisodeLoader, EpisodeShape, LoaderConfig, SplitIndex, TransformConfig};
use crate::distributed::Communicator;
use crate::memory::{MemoryProfiler, Meter, NoProfile, Phase, PhaseSink};
use crate::model::{self, FewShotModel, ModelConfig};
use amp::{AmpMode, GradScaler};
pub use eval::{evaluate, Accuracy, EvalEpisodes, TEST_EPOCH, VAL_EPOCH};
use files::{save_weights, write_json, JsonLines};
use metrics::Metric;
use optimizer_step::{optimizer_step, probe_micro_steps, reload_episode, StepPlan};
use plot::Curves;
use progress::Progress;

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

/// Optional tensor dumps for users comparing runs (and for tests), and the test hook.
#[derive(Debug, Default, Clone)]
pub struct Dumps {
    /// Final parameters and BatchNorm buffers.
    pub params: Option<PathBuf>,
    /// Gradients of the first optimizer step (reduced over ranks, unscaled), before the
    /// optimizer; written by rank 0.
    pub grads: Option<PathBuf>,
    /// Test hook: backbone chunks with more input bytes than this fail as out of memory.
    pub simulate_oom_above_bytes: Option<u64>,
}

impl Dumps {
    /// Refuses dump paths whose folder is missing, before training instead of after it.
    pub fn check_paths(&self) -> Result<()> {
        for (flag, path) in [
            ("--dump-params", &self.params),
            ("--dump-grads", &self.grads),
        ] {
            let Some(path) = path else { continue };
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            anyhow::ensure!(
                folder.is_dir(),
                "{flag} {}: the folder {} does not exist; create it or pass another path",
                path.display(),
                folder.display()
            );
            anyhow::ensure!(
                !path.is_dir(),
                "{flag} {} is a folder; pass a file path such as {}",
                path.display(),
                path.join("params.safetensors").display()
            );
        }
        Ok(())
    }
}

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

/// The model, its variables and the episode shape, built from a resolved config.
pub struct Built {
    pub vs: VarStore,
    pub model: FewShotModel,
    pub shape: EpisodeShape,
}

pub fn model_config(r: &Resolved) -> ModelConfig {
    let c = &r.config;
    let mut m = ModelConfig::new(
        c.model.method,
        c.model.backbone,
        c.episode.n_way,
        c.episode.k_shot,
        c.episode.n_query,
        c.data.image_size,
    );
    m.depth = c.model.depth;
    m.heads = c.model.heads;
    m.dim_head = c.model.dim_head;
    m.mlp_dim = c.model.mlp_dim;
    m.dim_attn = c.model.dim_attn;
    m.lambda_i = c.model.lambda_i;
    m.lambda_v = c.model.lambda_v;
    m.lambda_c = c.model.lambda_c;
    m.fp32_modules = c.model.fp32_modules.clone();
    m
}

/// Seeds libtorch and builds the model (with local pretrained weights and freezing if asked).
pub fn build(r: &Resolved) -> Result<Built> {
    build_on(r, r.device)
}

/// [`build`] on `device` (a rank's GPU).
pub fn build_on(r: &Resolved, device: tch::Device) -> Result<Built> {
    let c = &r.config;
    if c.run.threads > 0 {
        tch::set_num_threads(c.run.threads as i32);
    }
    tch::manual_seed(c.run.seed as i64);
    let mut vs = VarStore::new(device);
    let model = FewShotModel::new(&vs.root(), &model_config(r))?;
    let pretrained = match &c.model.pretrained {
        Some(crate::config::Pretrained::File(path)) => Some(path),
        _ => None,
    };
    if let Some(path) = pretrained {
        let source = model::WeightsSource::Pretrained(c.model.backbone);
        let report = model::load_checked(&mut vs, path, source)?;
        if let Some(w) = &report.warning {
            tracing::warn!("{w}");
        }
        info!(
            "loaded {} pretrained tensors from {}",
            report.loaded.len(),
            path.display()
        );
    }
    if let Some(path) = &c.model.official {
        let source = model::WeightsSource::Official {
            backbone_loaded: pretrained.is_some(),
        };
        let report = model::load_checked(&mut vs, path, source)?;
        info!(
            "loaded {} tensors from {}",
            report.loaded.len(),
            path.display()
        );
    }
    if c.model.freeze_backbone {
        model::freeze_backbone(&vs);
    }
    let shape = EpisodeShape {
        n_way: c.episode.n_way as usize,
        k_shot: c.episode.k_shot as usize,
        n_query: c.episode.n_query as usize,
    };
    Ok(Built { vs, model, shape })
}

/// The dataset folder, creating the built-in dataset on first use.
pub fn dataset_root(r: &Resolved) -> Result<PathBuf> {
    match &r.dataset {
        DatasetSource::Folder(p) => Ok(p.clone()),
        DatasetSource::Builtin(p) => Ok(data::synth::ensure_builtin(
            p,
            &data::synth::SynthOptions::default(),
        )?),
    }
}

/// [`dataset_root`] for every rank: rank 0 creates the built-in dataset, the others wait.
pub fn dataset_root_on(r: &Resolved, comm: &dyn Communicator) -> Result<PathBuf> {
    let root = if comm.world().is_root() {
        dataset_root(r)
    } else {
        Ok(r.dataset.path().clone())
    };
    comm.barrier()?;
    root
}

pub fn loader_config(r: &Resolved, augment: bool) -> LoaderConfig {
    LoaderConfig {
        workers: r.workers,
        prefetch: r.config.data.prefetch,
        transform: TransformConfig {
            image_size: r.config.data.image_size as u32,
            augment,
        },
        seed: r.config.run.seed,
        slice: None,
    }
}

/// Opens a split and checks up front that it can hold the episode (a clear error now beats one
/// in the middle of epoch 3).
pub fn open_split(root: &Path, split: Split, shape: EpisodeShape) -> Result<Arc<SplitIndex>> {
    let index = data::open_split(root, split)?;
    data::sample_episode(&index, shape, 0, 0, 0)?;
    Ok(Arc::new(index))
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
    let c = &r.config;
    let out = &c.run.output;
    let world = comm.world();
    let root_rank = world.is_root();
    let device = world.device_for(r.device);
    let resume = match start {
        Start::Resume(p) => Some(p),
        Start::Fresh { .. } => None,
    };
    c.check_world(world.size)?;
    // Caught from the start: a stop during dataset generation or set-up ends the run cleanly.
    let stop = signals::StopFlag::install()?;
    let _lock = if root_rank {
        let lock = match start {
            Start::Fresh { overwrite } => run_folder::claim_fresh(out, overwrite)?,
            Start::Resume(_) => run_folder::lock(out)?,
        };
        files::prepare_output(out)?;
        files::remove_stale_temps(out);
        dumps.check_paths()?;
        Some(lock)
    } else {
        None
    };
    let root = dataset_root_on(r, comm)?;
    let shape = EpisodeShape {
        n_way: c.episode.n_way as usize,
        k_shot: c.episode.k_shot as usize,
        n_query: c.episode.n_query as usize,
    };
    let base = open_split(&root, Split::Base, shape)?;
    let val = open_split(&root, Split::Val, shape)?;
    // The test split is only used at the end: open it now so a missing one fails now.
    open_split(&root, c.test.split, shape)?;
    if root_rank {
        files::write_atomic(&out.join(CONFIG_FILE), c.to_toml().as_bytes())?;
        info!(
            "effective config (saved as {}):\n{}",
            out.join(CONFIG_FILE).display(),
            c.to_toml()
        );
    }
    let Built { vs, model, .. } = build_on(r, device)?;
    if world.size > 1 {
        // Identical initial weights and buffers everywhere, whatever each rank drew.
        let mut named: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors: Vec<tch::Tensor> = named.into_iter().map(|(_, t)| t).collect();
        comm.broadcast(&tensors, 0)?;
    }
    let mut opt = optim::build(&c.train, &vs)?;
    let mut vs = vs;
    let resumed = match resume {
        Some(path) => {
            let ckpt = checkpoint::resolve(path)?;
            let state = checkpoint::read_state(&ckpt)?;
            checkpoint::check_position(&ckpt, &state, c, world.size)?;
            checkpoint::load(&ckpt, &state, c, &mut vs, &mut opt)?;
            if root_rank {
                let dropped = metrics::rewind(&out.join(METRICS_FILE), &state)?;
                if dropped > 0 {
                    info!("metrics.jsonl: {dropped} line(s) logged after this checkpoint dropped (their steps are redone)");
                }
            }
            info!(
                "resuming from {} (step {}, epoch {}, {} steps into it)",
                ckpt.display(),
                state.step,
                state.epoch,
                state.steps_in_epoch
            );
            Some(state)
        }
        None => None,
    };
    let vs = vs;
    info!(
        "{} {} on {} ({} base / {} val classes), {}-way {}-shot {}-query, {} px, {} episodes/epoch × {} epochs, device {:?}, {} rank(s) over {}",
        c.model.method.official_name(),
        c.model.backbone.describe(),
        root.display(),
        base.classes.len(),
        val.classes.len(),
        shape.n_way,
        shape.k_shot,
        shape.n_query,
        c.data.image_size,
        c.train.episodes_per_epoch,
        c.train.epochs,
        device,
        world.size,
        comm.name()
    );

    let amp = c.train.amp.unwrap_or(AmpMode::Off);
    let mut plan = StepPlan {
        oom_above_bytes: dumps.simulate_oom_above_bytes,
        ..StepPlan::for_run(r, comm, device, shape.total() as i64)
    };
    if let Some(state) = &resumed {
        plan.micro_steps = state.micro_steps;
    } else if plan.dynamic {
        let per_rank = match plan.shard {
            ShardMode::Images => plan.total_images / world.size as i64,
            ShardMode::Episodes => plan.total_images,
        };
        let m = probe_micro_steps(&model, &mut opt, device, c.data.image_size, per_rank.max(1));
        // Every rank must use the same groups: take the largest choice.
        plan.micro_steps = comm
            .all_gather_f64(&[m as f64])?
            .into_iter()
            .fold(1.0, f64::max) as i64;
    }
    plan.log_groups();
    // --memory-report: every step is profiled; the last one is reported (its optimizer state
    // exists, unlike the first step's).
    let meter = Meter::for_device(device);
    let mut profiler = c.train.memory_report.then(|| MemoryProfiler::new(meter));
    let mut scaler = GradScaler::for_mode(amp, device);
    if let Some(s) = resumed.as_ref().and_then(|s| s.scaler.as_ref()) {
        scaler.load_state(s);
    }
    let started = Instant::now();
    let metrics_path = out.join(METRICS_FILE);
    let mut curves = if resumed.is_some() {
        Curves::from_metrics(&metrics_path)
    } else {
        Curves::default()
    };
    let mut metrics = if !root_rank {
        None
    } else if resumed.is_some() {
        Some(JsonLines::append(&metrics_path)?)
    } else {
        Some(JsonLines::create(&metrics_path)?)
    };
    let mut summary = TrainSummary {
        steps: resumed.as_ref().map_or(0, |s| s.step),
        epochs_completed: 0,
        best_val: resumed.as_ref().and_then(|s| s.best_val.clone()),
        best_epoch: resumed.as_ref().and_then(|s| s.best_epoch),
        test: None,
        seconds: 0.0,
        preempted: None,
    };
    let max_steps = if c.train.max_steps == 0 {
        u64::MAX
    } else {
        c.train.max_steps
    };
    let k = c.train.episodes_per_step;
    let per_step = c.episodes_per_step_over(world.size);
    let steps_per_epoch = c.steps_per_epoch(world.size);
    let total = (c.train.epochs * steps_per_epoch).min(max_steps);
    let progress = Progress::new_on(root_rank, total, "train");
    let train_cfg = loader_config(r, c.data.train_aug);

    // Where to start: the epoch in progress at the checkpoint, past the steps it had done.
    let (first_epoch, mut done_in_epoch) = match &resumed {
        Some(s) if s.epoch_validated => (s.epoch + 1, 0),
        Some(s) => (s.epoch, s.steps_in_epoch),
        None => (0, 0),
    };
    let checkpoint_at = |vs: &VarStore,
                         opt: &optim::Optimizer,
                         summary: &TrainSummary,
                         at: Position,
                         scaler: &GradScaler|
     -> Result<Option<PathBuf>> {
        if !root_rank {
            return Ok(None);
        }
        let state = checkpoint::CheckpointState {
            format_version: checkpoint::FORMAT_VERSION,
            step: summary.steps,
            epoch: at.epoch,
            steps_in_epoch: at.steps_in_epoch,
            epoch_validated: at.validated,
            best_val: summary.best_val.clone(),
            best_epoch: summary.best_epoch,
            scaler: scaler.state(),
            micro_steps: at.micro_steps,
            model: checkpoint::ModelSignature::of(c),
            config: c.clone(),
        };
        checkpoint::save(out, vs, opt, &state, c.train.keep_checkpoints as usize).map(Some)
    };

    'epochs: for epoch in first_epoch..c.train.epochs {
        let skip = std::mem::take(&mut done_in_epoch);
        let steps =
            steps_per_epoch.min(skip.saturating_add(max_steps.saturating_sub(summary.steps)));
        // This rank's episodes of the epoch, in the order its steps take them.
        let order: Vec<u64> = (0..steps)
            .flat_map(|s| {
                let first = s * per_step;
                match plan.shard {
                    ShardMode::Images => (first..first + k).collect::<Vec<_>>(),
                    ShardMode::Episodes => {
                        let mine = first + world.rank as u64 * k;
                        (mine..mine + k).collect()
                    }
                }
            })
            .collect();
        let mut stats = EpochStats::new();
        let mut next = (skip * k) as usize;
        while next < order.len() {
            // A fresh loader whenever the slice changed (dynamic micro-steps regroup the images).
            let slice = plan.slice();
            let mut loader = EpisodeLoader::with_indices(
                base.clone(),
                shape,
                LoaderConfig { slice, ..train_cfg },
                epoch,
                order[next..].to_vec(),
            );
            if world.size == 1 {
                // Alone, a signal may end a wait for images at once. Under MPI every rank must
                // stop after the same step, so the ranks agree on it after each step instead
                // (and the collective watchdog ends a rank stuck in its loader).
                loader = loader.interrupted_by(crate::signals::stop_requested);
            }
            while next < order.len() && plan.slice() == slice {
                comm.note_step(summary.steps + 1);
                if let Some(p) = profiler.as_mut() {
                    p.begin_step(summary.steps + 1);
                    p.enter(Phase::Data);
                }
                let loaded: Result<Vec<data::LoadedEpisode>, _> = (0..k)
                    .map(|_| loader.next().expect("the order holds whole steps"))
                    .collect();
                if let Err(data::DataError::Interrupted) = loaded {
                    let at = Position {
                        epoch,
                        steps_in_epoch: (next / k as usize) as u64,
                        validated: false,
                        micro_steps: plan.micro_steps,
                    };
                    progress.finish();
                    let dir = checkpoint_at(&vs, &opt, &summary, at, &scaler)?;
                    return stopped(summary, dir, comm, out, started);
                }
                let episodes = loaded?;
                next += k as usize;
                let sink: &mut dyn PhaseSink = match profiler.as_mut() {
                    Some(p) => p,
                    None => &mut NoProfile,
                };
                let reload = |e: &data::LoadedEpisode, slice| {
                    reload_episode(&base, shape, &train_cfg, e, slice)
                };
                let first_step = summary.steps == 0;
                let mut dump = |vs: &VarStore| -> Result<()> {
                    match &dumps.grads {
                        Some(path) if first_step && root_rank => save_grads(vs, path),
                        _ => Ok(()),
                    }
                };
                let report = optimizer_step(
                    &mut plan,
                    &model,
                    &vs,
                    &mut opt,
                    &mut scaler,
                    episodes,
                    &reload,
                    &mut dump,
                    sink,
                )
                .with_context(|| {
                    format!(
                        "optimizer step {} (epoch {epoch}){}",
                        summary.steps + 1,
                        checkpoint::what_is_kept(out)
                    )
                })?;
                summary.steps += 1;
                if !report.stepped {
                    tracing::warn!(
                        "step {}: inf/NaN gradients, step skipped; loss scale now {}",
                        summary.steps,
                        scaler.scale_factor()
                    );
                }
                if device.is_cuda()
                    && plan.empty_cache_every > 0
                    && summary.steps.is_multiple_of(plan.empty_cache_every)
                {
                    crate::ffi::cuda::empty_cache()?;
                }
                if let Some(p) = profiler.as_mut() {
                    p.end_step();
                }
                let mut loss = 0.0;
                for o in &report.outcomes {
                    loss = stats.add(o);
                }
                progress.step(format!(
                    "epoch {epoch} step {} loss {loss:.3}",
                    summary.steps
                ));
                if summary.steps.is_multiple_of(c.train.log_every) || next == order.len() {
                    let (loss, acc, episodes_per_s) = stats.take_window();
                    if let Some(m) = metrics.as_mut() {
                        m.write(&Metric::Train {
                            epoch,
                            step: summary.steps,
                            loss,
                            acc,
                            episodes_per_s: episodes_per_s * per_step as f64 / k as f64,
                        })?;
                    }
                    curves.loss.push((summary.steps as f64, loss));
                }
                let at = Position {
                    epoch,
                    steps_in_epoch: (next / k as usize) as u64,
                    validated: false,
                    micro_steps: plan.micro_steps,
                };
                if stop.requested(comm)? {
                    progress.finish();
                    let dir = checkpoint_at(&vs, &opt, &summary, at, &scaler)?;
                    return stopped(summary, dir, comm, out, started);
                }
                if c.train.checkpoint_every > 0
                    && summary.steps.is_multiple_of(c.train.checkpoint_every)
                    && at.steps_in_epoch < steps_per_epoch
                {
                    checkpoint_at(&vs, &opt, &summary, at, &scaler)?;
                }
            }
        }
        if let Some(acc) = stats.epoch_acc() {
            curves.train_acc.push((epoch as f64, acc));
        }
        // Validation (the official val_loop): eval mode, fixed episodes, keep the best.
        let vprog = Progress::new_on(root_rank, c.train.val_episodes, "val");
        let set = EvalEpisodes {
            split: val.clone(),
            shape,
            loader: loader_config(r, false),
            epoch_key: VAL_EPOCH,
            count: c.train.val_episodes,
        };
        let done = order.len() as u64 / k;
        let acc = evaluate(&model, set, device, comm, Some(&stop), || {
            vprog.step(String::new())
        })?;
        vprog.finish();
        let Some(acc) = acc else {
            // Stopped during validation: the epoch's steps are done; resume validates it.
            progress.finish();
            let at = Position {
                epoch,
                steps_in_epoch: done,
                validated: false,
                micro_steps: plan.micro_steps,
            };
            let dir = checkpoint_at(&vs, &opt, &summary, at, &scaler)?;
            return stopped(summary, dir, comm, out, started);
        };
        // An epoch cut short by --max-steps is validated for the user, but only completed
        // epochs compete for "best" (so a resumed run picks the same best model as one that
        // was never stopped); it provides best.safetensors only while no epoch has completed.
        let complete = done == steps_per_epoch;
        let best = if complete {
            summary.best_val.as_ref().is_none_or(|b| acc.mean > b.mean)
        } else {
            summary.best_val.is_none()
        };
        progress.println(&format!(
            "epoch {epoch}: {} {}",
            acc.official_line("Val"),
            match (best, complete) {
                (true, true) => "(best)",
                (true, false) => "(epoch cut short by --max-steps; kept as best for now)",
                _ => "",
            }
        ));
        curves.val_acc.push((epoch as f64, acc.mean));
        if best && complete {
            summary.best_val = Some(acc.clone());
            summary.best_epoch = Some(epoch);
        }
        summary.epochs_completed = epoch + 1;
        if let Some(m) = metrics.as_mut() {
            m.write(&Metric::Val {
                epoch,
                acc: acc.mean,
                ci95: acc.ci95,
                best,
            })?;
            if best {
                save_weights(&vs, &out.join(BEST_WEIGHTS))?;
            }
            save_weights(&vs, &out.join(LAST_WEIGHTS))?;
            write_json(
                &out.join(STATE_FILE),
                &RunState {
                    epoch,
                    step: summary.steps,
                    best_val: summary.best_val.clone(),
                    best_epoch: summary.best_epoch,
                    config: c.clone(),
                },
            )?;
        }
        let at = Position {
            epoch,
            steps_in_epoch: done,
            validated: complete,
            micro_steps: plan.micro_steps,
        };
        checkpoint_at(&vs, &opt, &summary, at, &scaler)?;
        if summary.steps >= max_steps {
            break 'epochs;
        }
    }
    progress.finish();
    if let Some(path) = &dumps.params {
        // Rank 0 writes the file asked for, the others beside it (to check they agree).
        save_weights(&vs, &rank_path(path, world.rank))?;
    }
    if root_rank {
        if let Some(m) = profiler.as_ref().and_then(MemoryProfiler::last) {
            progress.println(&crate::memory::profiler::table(m, meter));
            if let Err(e) =
                crate::memory::profiler::write_report(m, meter, &format!("{device:?}"), out)
            {
                tracing::warn!("memory report not written: {e:#}");
            }
        }
        // A picture is a convenience: failing to draw it must not fail the run.
        if let Err(e) = plot::plot_curves(
            &curves,
            &format!("{} {:?}", c.model.method.official_name(), c.model.backbone),
            &out.join("curves.png"),
        ) {
            tracing::warn!("curves.png not drawn: {e:#}");
        }
    }
    // Every rank needs the best weights for the distributed test: rank 0 wrote them.
    comm.barrier()?;
    let mut vs = vs;
    model::load_checked(&mut vs, &out.join(BEST_WEIGHTS), model::WeightsSource::Run)?;
    let Some(test) = test_split(r, &model, &root, shape, device, comm, Some(&stop))? else {
        // Stopped during the test: training ended with a checkpoint, which resume starts from.
        let newest = root_rank.then(|| checkpoint::resolve(out)).transpose()?;
        return stopped(summary, newest, comm, out, started);
    };
    if let Some(m) = metrics.as_mut() {
        m.write(&Metric::Test {
            split: c.test.split,
            episodes: test.episodes,
            acc: test.mean,
            ci95: test.ci95,
        })?;
    }
    summary.test = Some(test);
    summary.seconds = started.elapsed().as_secs_f64();
    if root_rank {
        write_json(&out.join("summary.json"), &summary)?;
    }
    Ok(summary)
}

/// Ends a run stopped by a signal once rank 0 has written `checkpoint` (None on other ranks).
fn stopped(
    mut summary: TrainSummary,
    checkpoint: Option<PathBuf>,
    comm: &dyn Communicator,
    out: &Path,
    started: Instant,
) -> Result<TrainSummary> {
    comm.barrier()?;
    summary.preempted = Some(checkpoint.unwrap_or_else(|| out.join(checkpoint::DIR)));
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Evaluates `model` on the configured test split and prints the official line; `None` when
/// `stop` ended it early (nothing printed or written).
pub fn test_split(
    r: &Resolved,
    model: &FewShotModel,
    root: &Path,
    shape: EpisodeShape,
    device: tch::Device,
    comm: &dyn Communicator,
    stop: Option<&signals::StopFlag>,
) -> Result<Option<Accuracy>> {
    let c = &r.config;
    let split = open_split(root, c.test.split, shape)?;
    let prog = Progress::new_on(comm.world().is_root(), c.test.episodes, "test");
    let set = EvalEpisodes {
        split,
        shape,
        loader: loader_config(r, false),
        epoch_key: TEST_EPOCH,
        count: c.test.episodes,
    };
    let acc = evaluate(model, set, device, comm, stop, || prog.step(String::new()))?;
    prog.finish();
    let Some(acc) = acc else {
        return Ok(None);
    };
    if comm.world().is_root() {
        println!("{}", acc.official_line("Test"));
        write_json(
            &c.run.output.join("test.json"),
            &serde_json::json!({
                "split": c.test.split, "episodes": acc.episodes, "acc": acc.mean, "ci95": acc.ci95,
            }),
        )?;
    }
    Ok(Some(acc))
}

/// Where a checkpoint is taken.
#[derive(Debug, Clone, Copy)]
struct Position {
    epoch: u64,
    steps_in_epoch: u64,
    /// The epoch is complete and validated (resume starts the next one).
    validated: bool,
    micro_steps: i64,
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

/// `path` for rank 0; `stem.rankR.ext` beside it for rank R.
pub fn rank_path(path: &Path, rank: usize) -> PathBuf {
    if rank == 0 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.rank{rank}.{}", ext.to_string_lossy()),
        None => format!("{stem}.rank{rank}"),
    };
    path.with_file_name(name)
}

/// Every parameter's current gradient, under the parameter's name, as safetensors.
pub fn save_grads(vs: &VarStore, path: &Path) -> Result<()> {
    let grads: Vec<(String, tch::Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| Some(name).zip(Some(t.grad()).filter(|g| g.defined())))
        .collect();
    files::write_atomic_with(path, |tmp| Ok(tch::Tensor::write_safetensors(&grads, tmp)?))
}
