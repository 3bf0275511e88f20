//! The single-process training protocol of the official `train_test.py`: one optimizer step per
//! episode, validation after every epoch, the best validation model kept, then the test.

pub mod amp;
pub mod eval;
pub mod files;
mod optim;
pub mod plot;
mod progress;
pub mod step;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::nn::VarStore;
use tracing::info;

use crate::config::{DatasetSource, Resolved, Split};
use crate::data::{self, EpisodeLoader, EpisodeShape, LoaderConfig, SplitIndex, TransformConfig};
use crate::memory::{MemoryProfiler, NoProfile, Phase, PhaseSink};
use crate::model::{self, FewShotModel, ModelConfig};
use amp::{AmpMode, GradScaler};
pub use eval::{evaluate, Accuracy, EvalEpisodes, TEST_EPOCH, VAL_EPOCH};
use files::{save_weights, write_json, JsonLines};
use plot::Curves;
use progress::Progress;

/// File names inside the run folder.
pub const CONFIG_FILE: &str = "config.toml";
pub const BEST_WEIGHTS: &str = "best.safetensors";
pub const LAST_WEIGHTS: &str = "last.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Written beside `last.safetensors` after every epoch: where the run is and what it reached.
#[derive(Debug, Clone, Serialize)]
pub struct RunState {
    pub epoch: u64,
    pub step: u64,
    pub best_val: Option<Accuracy>,
    pub best_epoch: Option<u64>,
    pub config: crate::config::RunConfig,
}

/// Optional tensor dumps for users comparing runs (and for tests).
#[derive(Debug, Default, Clone)]
pub struct Dumps {
    /// Final parameters and BatchNorm buffers.
    pub params: Option<PathBuf>,
    /// Gradients of the first optimizer step, before the optimizer.
    pub grads: Option<PathBuf>,
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
}

/// One metrics line (metrics.jsonl).
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Metric {
    Train {
        epoch: u64,
        step: u64,
        loss: f64,
        acc: f64,
        episodes_per_s: f64,
    },
    Val {
        epoch: u64,
        acc: f64,
        ci95: f64,
        best: bool,
    },
    Test {
        split: Split,
        episodes: usize,
        acc: f64,
        ci95: f64,
    },
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
    let c = &r.config;
    if c.run.threads > 0 {
        tch::set_num_threads(c.run.threads as i32);
    }
    tch::manual_seed(c.run.seed as i64);
    let mut vs = VarStore::new(r.device);
    let model = FewShotModel::new(&vs.root(), &model_config(r))?;
    if let Some(path) = &c.model.pretrained {
        model::load_torchvision(&mut vs, path)
            .with_context(|| format!("loading pretrained weights {}", path.display()))?;
    }
    if let Some(path) = &c.model.official {
        let report = model::load_official(&mut vs, path)
            .with_context(|| format!("loading the official checkpoint {}", path.display()))?;
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

pub fn loader_config(r: &Resolved, augment: bool) -> LoaderConfig {
    LoaderConfig {
        workers: r.workers,
        prefetch: r.config.data.prefetch,
        transform: TransformConfig {
            image_size: r.config.data.image_size as u32,
            augment,
        },
        seed: r.config.run.seed,
    }
}

/// Opens a split and checks up front that it can hold the episode (a clear error now beats one
/// in the middle of epoch 3).
pub fn open_split(root: &Path, split: Split, shape: EpisodeShape) -> Result<Arc<SplitIndex>> {
    let index = data::open_split(root, split)?;
    data::sample_episode(&index, shape, 0, 0, 0)?;
    Ok(Arc::new(index))
}

/// Trains, validates every epoch, keeps the best, then tests it. Writes into the run folder:
/// config.toml, metrics.jsonl, best/last weights, curves.png, summary.json, test.json.
pub fn train(r: &Resolved, dumps: &Dumps) -> Result<TrainSummary> {
    let c = &r.config;
    let out = &c.run.output;
    files::prepare_output(out)?;
    files::write_atomic(&out.join(CONFIG_FILE), c.to_toml().as_bytes())?;
    info!(
        "effective config (saved as {}):\n{}",
        out.join(CONFIG_FILE).display(),
        c.to_toml()
    );
    let root = dataset_root(r)?;
    let Built { vs, model, shape } = build(r)?;
    let base = open_split(&root, Split::Base, shape)?;
    let val = open_split(&root, Split::Val, shape)?;
    let mut opt = optim::build(&c.train, &vs)?;
    info!(
        "{} {:?} on {} ({} base / {} val classes), {}-way {}-shot {}-query, {} px, {} episodes/epoch × {} epochs, device {:?}",
        c.model.method.official_name(),
        c.model.backbone,
        root.display(),
        base.classes.len(),
        val.classes.len(),
        shape.n_way,
        shape.k_shot,
        shape.n_query,
        c.data.image_size,
        c.train.episodes_per_epoch,
        c.train.epochs,
        r.device
    );

    if r.micro_steps > 1 {
        let groups = step::balanced_groups(shape.total() as i64, r.micro_steps as i64);
        let sizes: Vec<i64> = groups.iter().map(|g| g.end - g.start).collect();
        info!(
            "{} micro-steps: the episode's {} images run as BatchNorm groups of {:?} (each its own BN batch; 1 = the official single batch)",
            r.micro_steps,
            shape.total(),
            sizes
        );
    }
    let step_opts = step::StepOptions {
        micro_steps: r.micro_steps as i64,
        checkpoint: c.train.checkpoint_activations,
        loss_scale: 1.0 / c.train.episodes_per_step as f64,
    };
    // --memory-report: every step is profiled; the last one is reported (its optimizer state
    // exists, unlike the first step's).
    let mut profiler = c.train.memory_report.then(MemoryProfiler::new);
    let amp = c.train.amp.unwrap_or(AmpMode::Off);
    let mut scaler = GradScaler::for_mode(amp, r.device);
    let started = Instant::now();
    let mut metrics = JsonLines::create(&out.join("metrics.jsonl"))?;
    let mut curves = Curves::default();
    let mut summary = TrainSummary {
        steps: 0,
        epochs_completed: 0,
        best_val: None,
        best_epoch: None,
        test: None,
        seconds: 0.0,
    };
    let max_steps = if c.train.max_steps == 0 {
        u64::MAX
    } else {
        c.train.max_steps
    };
    let total = (c.train.epochs * c.train.episodes_per_epoch).min(max_steps);
    let progress = Progress::new(total, "train");

    'epochs: for epoch in 0..c.train.epochs {
        let k = c.train.episodes_per_step;
        let remaining = max_steps - summary.steps;
        let episodes = c.train.episodes_per_epoch.min(remaining.saturating_mul(k));
        let mut loader = EpisodeLoader::new(
            base.clone(),
            shape,
            loader_config(r, c.data.train_aug),
            epoch,
            0..episodes,
        );
        let mut stats = EpochStats::new();
        loop {
            let starts_step = profiler.is_some() && stats.episodes() % k == 0;
            if let Some(p) = profiler.as_mut() {
                if starts_step {
                    p.begin_step(summary.steps + 1);
                }
                p.enter(Phase::Data);
            }
            let Some(batch) = loader.next() else { break };
            let batch = batch?;
            let flat = batch.images.to_device(r.device).flatten(0, 1);
            if batch.index % k == 0 {
                opt.zero_grad();
            }
            let sink: &mut dyn PhaseSink = match profiler.as_mut() {
                Some(p) => p,
                None => &mut NoProfile,
            };
            // Autocast covers the forward (and so the backward) of this thread; the guard ends it.
            let autocast = amp.autocast(r.device)?;
            let opts = step::StepOptions {
                loss_scale: scaler.scale_factor() * step_opts.loss_scale,
                ..step_opts
            };
            let out = step::forward_backward(&model, &flat, opts, sink);
            drop(autocast);
            // Host sync: reading the loss waits for the device.
            let loss = stats.add(&out, c.episode.n_query);
            // In fp32 a non-finite loss is fatal; with fp16 the scaler skips the step and backs off.
            anyhow::ensure!(
                loss.is_finite() || scaler.is_enabled(),
                "the loss became {loss} in epoch {epoch}, episode {} (after {} optimizer steps); lower --learning-rate",
                batch.index,
                summary.steps
            );
            progress.step(format!(
                "epoch {epoch} step {} loss {loss:.3}",
                summary.steps
            ));
            if (batch.index + 1) % k != 0 {
                continue; // gradients wait for the rest of this step's episodes
            }
            if let Some(p) = profiler.as_mut() {
                p.enter(Phase::Optimizer);
            }
            scaler.unscale_(&opt.trainable_variables())?;
            if summary.steps == 0 {
                if let Some(path) = &dumps.grads {
                    save_grads(&vs, path)?;
                }
            }
            if !scaler.step(&mut opt)? {
                tracing::warn!(
                    "step {}: inf/NaN gradients at loss scale {}, step skipped",
                    summary.steps + 1,
                    scaler.scale_factor()
                );
            }
            scaler.update()?;
            summary.steps += 1;
            if let Some(p) = profiler.as_mut() {
                p.end_step();
            }
            if summary.steps % c.train.log_every == 0 || batch.index + 1 == episodes {
                let (loss, acc, episodes_per_s) = stats.take_window();
                metrics.write(&Metric::Train {
                    epoch,
                    step: summary.steps,
                    loss,
                    acc,
                    episodes_per_s,
                })?;
                curves.loss.push((summary.steps as f64, loss));
            }
        }
        if let Some(acc) = stats.epoch_acc() {
            curves.train_acc.push((epoch as f64, acc));
        }
        // Validation (the official val_loop): eval mode, fixed episodes, keep the best.
        let vprog = Progress::new(c.train.val_episodes, "val");
        let set = EvalEpisodes {
            split: val.clone(),
            shape,
            loader: loader_config(r, false),
            epoch_key: VAL_EPOCH,
            count: c.train.val_episodes,
        };
        let acc = evaluate(&model, set, r.device, || vprog.step(String::new()))?;
        vprog.finish();
        let best = summary.best_val.as_ref().is_none_or(|b| acc.mean > b.mean);
        progress.println(&format!(
            "epoch {epoch}: {} {}",
            acc.official_line("Val"),
            if best { "(best)" } else { "" }
        ));
        metrics.write(&Metric::Val {
            epoch,
            acc: acc.mean,
            ci95: acc.ci95,
            best,
        })?;
        curves.val_acc.push((epoch as f64, acc.mean));
        if best {
            save_weights(&vs, &out.join(BEST_WEIGHTS))?;
            summary.best_val = Some(acc);
            summary.best_epoch = Some(epoch);
        }
        summary.epochs_completed = epoch + 1;
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
        if summary.steps >= max_steps {
            break 'epochs;
        }
    }
    progress.finish();
    if let Some(path) = &dumps.params {
        save_weights(&vs, path)?;
    }
    if let Some(m) = profiler.as_ref().and_then(MemoryProfiler::last) {
        progress.println(&crate::memory::profiler::table(m));
        crate::memory::profiler::write_report(m, &format!("{:?}", r.device), out)?;
    }
    plot::plot_curves(
        &curves,
        &format!("{} {:?}", c.model.method.official_name(), c.model.backbone),
        &out.join("curves.png"),
    )?;

    // Test the best model, as train_test.py does.
    let mut vs = vs;
    vs.load(out.join(BEST_WEIGHTS))
        .context("reloading the best weights")?;
    let test = test_split(r, &model, &root, shape)?;
    metrics.write(&Metric::Test {
        split: c.test.split,
        episodes: test.episodes,
        acc: test.mean,
        ci95: test.ci95,
    })?;
    summary.test = Some(test);
    summary.seconds = started.elapsed().as_secs_f64();
    write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// Evaluates `model` on the configured test split and prints the official line.
pub fn test_split(
    r: &Resolved,
    model: &FewShotModel,
    root: &Path,
    shape: EpisodeShape,
) -> Result<Accuracy> {
    let c = &r.config;
    let split = open_split(root, c.test.split, shape)?;
    let prog = Progress::new(c.test.episodes, "test");
    let set = EvalEpisodes {
        split,
        shape,
        loader: loader_config(r, false),
        epoch_key: TEST_EPOCH,
        count: c.test.episodes,
    };
    let acc = evaluate(model, set, r.device, || prog.step(String::new()))?;
    prog.finish();
    println!("{}", acc.official_line("Test"));
    write_json(
        &c.run.output.join("test.json"),
        &serde_json::json!({
            "split": c.test.split, "episodes": acc.episodes, "acc": acc.mean, "ci95": acc.ci95,
        }),
    )?;
    Ok(acc)
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
    fn add(&mut self, out: &model::HeadOutput, n_query: i64) -> f64 {
        let loss = out.loss.double_value(&[]);
        let queries = out.logits.size()[0];
        self.acc_sum += 100.0 * model::correct(&out.logits, n_query, 0) as f64 / queries as f64;
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

    /// Episodes recorded this epoch.
    fn episodes(&self) -> u64 {
        self.acc_n
    }

    fn epoch_acc(&self) -> Option<f64> {
        (self.acc_n > 0).then(|| self.acc_sum / self.acc_n as f64)
    }
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
