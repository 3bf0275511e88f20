//! Everything a run builds before its first step: the dataset and its splits, the model (with
//! pretrained weights, identical on every rank), the optimizer, the resumed state, the step
//! plan, and the run's logs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use tch::nn::VarStore;
use tracing::info;

use super::amp::GradScaler;
use super::checkpoint::{self, CheckpointState};
use super::epoch::EpochPlan;
use super::optimizer_step::{probe_micro_steps, StepPlan};
use super::progress::Progress;
use super::run_state::{CONFIG_FILE, METRICS_FILE};
use super::{metrics, optim, run_folder, Dumps, Start, TrainSummary, Trainer};
use crate::config::{DatasetSource, Resolved, Split};
use crate::data::{self, EpisodeShape, SplitIndex};
use crate::distributed::{Communicator, World};
use crate::files;
use crate::files::JsonLines;
use crate::memory::{MemoryProfiler, Meter};
use crate::model::{self, FewShotModel, ModelConfig};
use crate::plot::Curves;

/// The model, its variables and the episode shape, built from a resolved config.
pub struct Built {
    pub vs: VarStore,
    pub model: FewShotModel,
    pub shape: EpisodeShape,
}

pub fn model_config(r: &Resolved) -> ModelConfig {
    ModelConfig::from_run(r)
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
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(c.train.cudnn_benchmark);
    }
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
    if c.train.channels_last {
        model::use_channels_last(&vs);
    }
    Ok(Built {
        vs,
        model,
        shape: episode_shape(r),
    })
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

/// Opens a split and checks up front that it can hold the episode (a clear error now beats one
/// in the middle of epoch 3).
pub fn open_split(root: &Path, split: Split, shape: EpisodeShape) -> Result<Arc<SplitIndex>> {
    let index = data::open_split(root, split)?;
    data::sample_episode(&index, shape, 0, 0, 0)?;
    Ok(Arc::new(index))
}

/// Claims the output folder (rank 0: a fresh one, or the run's own on resume, locked), clears
/// stale temporary files and checks the dump paths. The lock is held while the value lives.
pub(super) fn claim_output(
    r: &Resolved,
    dumps: &Dumps,
    comm: &dyn Communicator,
    start: Start<'_>,
) -> Result<Option<run_folder::RunLock>> {
    if !comm.world().is_root() {
        return Ok(None);
    }
    let out = &r.config.run.output;
    let lock = match start {
        Start::Fresh { overwrite } => run_folder::claim_fresh(out, overwrite)?,
        Start::Resume(_) => run_folder::lock(out)?,
    };
    files::prepare_output(out)?;
    run_folder::remove_stale_temps(out);
    dumps.check_paths()?;
    Ok(Some(lock))
}

/// The dataset a run trains on: its folder, the episode shape, the base and val splits.
pub(super) struct TrainData {
    pub root: PathBuf,
    pub shape: EpisodeShape,
    pub base: Arc<SplitIndex>,
    pub val: Arc<SplitIndex>,
}

impl TrainData {
    /// Opens every split the run will use, the test split too (so a missing one fails now, not
    /// after training), then writes the effective config (rank 0).
    pub fn open(r: &Resolved, comm: &dyn Communicator) -> Result<Self> {
        let c = &r.config;
        let root = dataset_root_on(r, comm)?;
        let shape = episode_shape(r);
        let base = open_split(&root, Split::Base, shape)?;
        let val = open_split(&root, Split::Val, shape)?;
        open_split(&root, c.test.split, shape)?;
        if comm.world().is_root() {
            let out = &c.run.output;
            files::write_atomic(&out.join(CONFIG_FILE), c.to_toml().as_bytes())?;
            info!(
                "effective config (saved as {}):\n{}",
                out.join(CONFIG_FILE).display(),
                c.to_toml()
            );
        }
        Ok(Self {
            root,
            shape,
            base,
            val,
        })
    }
}

/// The episode shape of a run.
pub fn episode_shape(r: &Resolved) -> EpisodeShape {
    let e = &r.config.episode;
    EpisodeShape {
        n_way: e.n_way as usize,
        k_shot: e.k_shot as usize,
        n_query: e.n_query as usize,
    }
}

impl<'a> Trainer<'a> {
    /// Builds the model (the same weights on every rank), the optimizer and the step plan,
    /// restores the checkpoint of a resumed run, and opens the run's logs.
    pub(super) fn new(
        r: &'a Resolved,
        comm: &'a dyn Communicator,
        dumps: &'a Dumps,
        data: TrainData,
        start: Start<'_>,
    ) -> Result<Self> {
        let c = &r.config;
        let world = comm.world();
        let device = world.device_for(r.device);
        let Built { mut vs, model, .. } = build_on(r, device)?;
        if world.size > 1 {
            // Identical initial weights and buffers everywhere, whatever each rank drew.
            let mut named: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let tensors: Vec<tch::Tensor> = named.into_iter().map(|(_, t)| t).collect();
            comm.broadcast(&tensors, 0)?;
        }
        let mut opt = optim::build(&c.train, &vs)?;
        let resumed = match start {
            Start::Resume(path) => Some(resume(r, world, path, &mut vs, &mut opt)?),
            Start::Fresh { .. } => None,
        };
        if c.train.shard_optimizer && world.size > 1 {
            // After a resume: the checkpoint's whole state was loaded, the owned part stays.
            opt.shard(super::zero::Ownership::of(
                &opt.numels(),
                world.rank,
                world.size,
            ));
        }
        log_start(r, &data, comm);
        let mut plan = StepPlan {
            oom_above_bytes: dumps.simulate_oom_above_bytes,
            ..StepPlan::for_run(r, comm, device, data.shape.total() as i64)
        };
        if let Some(state) = &resumed {
            plan.micro_steps = state.micro_steps;
        } else if plan.dynamic {
            let per_rank = plan.images_per_rank();
            let m = probe_micro_steps(&model, &mut opt, device, c.data.image_size, per_rank);
            // Every rank must use the same groups: take the largest choice.
            plan.micro_steps = comm
                .all_gather_f64(&[m as f64])?
                .into_iter()
                .fold(1.0, f64::max) as i64;
        }
        plan.log_groups();
        // --memory-report: every step is profiled; the last one is reported (its optimizer
        // state exists, unlike the first step's).
        let meter = Meter::for_device(device);
        let profiler = c.train.memory_report.then(|| MemoryProfiler::new(meter));
        let mut scaler = GradScaler::for_mode(plan.amp, device);
        if let Some(s) = resumed.as_ref().and_then(|s| s.scaler.as_ref()) {
            scaler.load_state(s);
        }
        let started = Instant::now();
        let (metrics, curves) = open_logs(r, comm, resumed.is_some())?;
        let summary = TrainSummary {
            steps: resumed.as_ref().map_or(0, |s| s.step),
            epochs_completed: 0,
            best_val: resumed.as_ref().and_then(|s| s.best_val.clone()),
            best_epoch: resumed.as_ref().and_then(|s| s.best_epoch),
            test: None,
            seconds: 0.0,
            preempted: None,
        };
        let epochs = EpochPlan::new(c, world);
        let progress = Progress::new_on(world.is_root(), epochs.total_steps(), "train");
        Ok(Self {
            r,
            comm,
            dumps,
            data,
            device,
            vs,
            model,
            opt,
            scaler,
            plan,
            epochs,
            meter,
            profiler,
            metrics,
            curves,
            summary,
            progress,
            started,
            resumed,
        })
    }
}

/// Restores a checkpoint into `vs` and `opt` after checking that it belongs to this run and
/// world, and cuts metrics.jsonl back to it (rank 0).
fn resume(
    r: &Resolved,
    world: World,
    path: &Path,
    vs: &mut VarStore,
    opt: &mut optim::Optimizer,
) -> Result<CheckpointState> {
    let c = &r.config;
    let ckpt = checkpoint::resolve(path)?;
    let state = checkpoint::read_state(&ckpt)?;
    checkpoint::check_position(&ckpt, &state, c, world.size)?;
    checkpoint::load(&ckpt, &state, c, vs, opt)?;
    if world.is_root() {
        let dropped = metrics::rewind(&c.run.output.join(METRICS_FILE), &state)?;
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
    Ok(state)
}

/// The one start-up line: what trains on what, where, on how many ranks.
fn log_start(r: &Resolved, data: &TrainData, comm: &dyn Communicator) {
    let c = &r.config;
    let world = comm.world();
    info!(
        "{} {} on {} ({} base / {} val classes), {}-way {}-shot {}-query, {} px, {} episodes/epoch × {} epochs, device {:?}, {} rank(s) over {}",
        c.model.method.official_name(),
        c.model.backbone.describe(),
        data.root.display(),
        data.base.classes.len(),
        data.val.classes.len(),
        data.shape.n_way,
        data.shape.k_shot,
        data.shape.n_query,
        c.data.image_size,
        c.train.episodes_per_epoch,
        c.train.epochs,
        world.device_for(r.device),
        world.size,
        comm.name()
    );
}

/// metrics.jsonl (rank 0; appended to on resume) and the curves drawn from it.
fn open_logs(
    r: &Resolved,
    comm: &dyn Communicator,
    resumed: bool,
) -> Result<(Option<JsonLines>, Curves)> {
    let path = r.config.run.output.join(METRICS_FILE);
    let curves = if resumed {
        Curves::from_metrics(&path)
    } else {
        Curves::default()
    };
    let metrics = match (comm.world().is_root(), resumed) {
        (false, _) => None,
        (true, true) => Some(JsonLines::append(&path)?),
        (true, false) => Some(JsonLines::create(&path)?),
    };
    Ok((metrics, curves))
}

/// The checks of a start that `--dry-run` makes without starting: the output folder, the dump
/// paths, and every split holding the episode (when the dataset is there: the built-in one is
/// created at the first start). Returns lines for the dry-run's report.
pub fn preflight(r: &Resolved, dumps: &Dumps, start: Start<'_>) -> Result<Vec<String>> {
    let c = &r.config;
    if let Start::Fresh { overwrite } = start {
        run_folder::check_fresh(&c.run.output, overwrite)?;
    }
    dumps.check_paths()?;
    let root = r.dataset.path();
    if matches!(r.dataset, DatasetSource::Builtin(_)) && !root.is_dir() {
        return Ok(vec![format!(
            "dataset: the built-in one, created in {} at the first start",
            root.display()
        )]);
    }
    let shape = episode_shape(r);
    let classes = [Split::Base, Split::Val, c.test.split]
        .into_iter()
        .map(|split| Ok(open_split(root, split, shape)?.classes.len()))
        .collect::<Result<Vec<_>>>()?;
    Ok(vec![format!(
        "dataset: {} ({} base / {} val / {} {:?} classes, each split holds the episode)",
        root.display(),
        classes[0],
        classes[1],
        classes[2],
        c.test.split
    )])
}
