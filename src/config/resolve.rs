//! From what the user wrote to what the run uses: dataset defaults, auto rules, validation.

use std::path::PathBuf;

use tch::Device;

use super::{Accumulation, AmpMode, Backbone, ConfigError, DatasetName, RunConfig};

/// Where the images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSource {
    /// A folder the user named (or an official name resolved under the data root).
    Folder(PathBuf),
    /// The built-in procedural dataset, created in this folder on first use.
    Builtin(PathBuf),
}

impl DatasetSource {
    pub fn path(&self) -> &PathBuf {
        match self {
            DatasetSource::Folder(p) | DatasetSource::Builtin(p) => p,
        }
    }
}

/// The validated run: `config` holds the effective values (auto rules applied, so saving it
/// reproduces the run), the other fields what had to be derived from it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: RunConfig,
    pub dataset: DatasetSource,
    /// The official dataset this run follows, when it was named (decides its defaults).
    pub dataset_name: Option<DatasetName>,
    pub device: Device,
    /// Micro-steps per episode after the auto rule (with `dynamic`: the start before the
    /// memory probe).
    pub micro_steps: u64,
    /// `gradient_accumulation_steps = "dynamic"`.
    pub dynamic_micro_steps: bool,
    /// Loader threads after the auto rule.
    pub workers: usize,
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl RunConfig {
    /// Applies the official dataset defaults and the auto rules, then validates every value.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let mut c = self.clone();
        // The official `--FETI` picks the ResNet layout; afterwards the name alone says it.
        if let Some(feti) = c.model.feti.take() {
            c.model.backbone = c
                .model
                .backbone
                .with_feti(feti)
                .map_err(|m| invalid("feti", m))?;
        }
        c.model.backbone = c.model.backbone.explicit();
        let named = parse_dataset_name(&c.data.dataset);
        let dataset = match named {
            Some(DatasetName::Synthetic) => DatasetSource::Builtin(c.data.root.join("synthetic")),
            Some(name) => DatasetSource::Folder(c.data.root.join(name.folder())),
            None => DatasetSource::Folder(PathBuf::from(&c.data.dataset)),
        };
        if named == Some(DatasetName::Omniglot) {
            // As train_test.py: 15 queries and the no-pool single-channel Conv4.
            c.episode.n_query = c.episode.n_query.min(15);
            if c.model.backbone == Backbone::Conv4 {
                c.model.backbone = Backbone::Conv4Snp;
            }
        }
        if c.data.image_size == 0 {
            let name = named.unwrap_or(DatasetName::MiniImagenet);
            c.data.image_size = name.default_image_size(c.model.backbone);
        }
        validate(&c)?;
        let dynamic_micro_steps = c.train.gradient_accumulation_steps.is_dynamic();
        let micro_steps = match c.train.gradient_accumulation_steps {
            Accumulation::Steps(n) => micro_steps(n, c.model.backbone),
            Accumulation::Named(_) => micro_steps(0, c.model.backbone),
        };
        let images = c.episode_images().unwrap_or(i64::MAX);
        if micro_steps > images.max(1) as u64 {
            return Err(invalid(
                "gradient_accumulation_steps",
                format!("{micro_steps} micro-steps for an episode of {images} images leave empty groups; use at most {images}"),
            ));
        }
        let workers = match c.data.workers {
            0 => std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8),
            w => w,
        };
        let device = parse_device(&c.run.device)?;
        // fp16 + loss scaling is CUDA's usual choice; on CPU fp32 stays the default (see README).
        c.train.amp.get_or_insert(if device.is_cuda() {
            AmpMode::Fp16
        } else {
            AmpMode::Off
        });
        Ok(Resolved {
            config: c,
            dataset,
            dataset_name: named,
            device,
            micro_steps,
            dynamic_micro_steps,
            workers,
        })
    }
}

impl RunConfig {
    /// Episodes one optimizer step takes from an epoch, over all `world` ranks: K, or K per
    /// rank with `--shard episodes`.
    pub fn episodes_per_step_over(&self, world: usize) -> u64 {
        let k = self.train.episodes_per_step;
        match self.train.shard {
            super::ShardMode::Images => k,
            super::ShardMode::Episodes => k.saturating_mul(world as u64),
        }
    }

    /// Optimizer steps in one epoch on `world` ranks.
    pub fn steps_per_epoch(&self, world: usize) -> u64 {
        self.train.episodes_per_epoch / self.episodes_per_step_over(world).max(1)
    }

    /// The checks that depend on the number of ranks, so that `--dry-run` under a launcher (and
    /// every rank before any work) refuses what would fail later.
    pub fn check_world(&self, world: usize) -> Result<(), ConfigError> {
        let world = world.max(1);
        if self.steps_per_epoch(world) == 0 {
            return Err(invalid(
                "episodes_per_epoch",
                format!(
                    "an epoch of {} episodes is less than one optimizer step ({} episodes: {} per step × {world} rank(s) with --shard episodes); raise --episodes-per-epoch",
                    self.train.episodes_per_epoch,
                    self.episodes_per_step_over(world),
                    self.train.episodes_per_step
                ),
            ));
        }
        if self.train.shard == super::ShardMode::Images && world > 1 {
            let images = self.episode_images().unwrap_or(i64::MAX);
            let m = match self.train.gradient_accumulation_steps {
                Accumulation::Steps(n) => micro_steps(n, self.model.backbone),
                Accumulation::Named(_) => 1,
            }
            .min(i64::MAX as u64) as i64;
            let groups = (world as i64).saturating_mul(m);
            if groups > images {
                return Err(invalid(
                    "shard",
                    format!(
                        "{world} ranks × {m} micro-step(s) make {groups} BatchNorm groups, more than the episode's {images} images, so some ranks would get no image; use at most {} ranks with --shard images, fewer micro-steps, or --shard episodes",
                        (images / m).max(1)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// n_way · (k_shot + n_query), or None when that overflows.
    pub fn episode_images(&self) -> Option<i64> {
        let e = &self.episode;
        e.k_shot.checked_add(e.n_query)?.checked_mul(e.n_way)
    }
}

/// The documented rule for `gradient_accumulation_steps = 0`: ResNet 4, everything else 2.
pub fn micro_steps(requested: u64, backbone: Backbone) -> u64 {
    match requested {
        0 if backbone.is_resnet() => 4,
        0 => 2,
        m => m,
    }
}

/// Official names (any case) and `synthetic`; anything else is a folder.
fn parse_dataset_name(s: &str) -> Option<DatasetName> {
    use clap::ValueEnum;
    DatasetName::from_str(s, true).ok()
}

/// The largest `--image-size` accepted: 4.6× the official 224 px. Above it one episode's
/// activations outgrow any machine, and checking here gives one clear message instead of an
/// allocation failure deep in libtorch.
pub const MAX_IMAGE_SIZE: i64 = 1024;
/// Images in one episode (n_way · (k_shot + n_query)) at most: far above any few-shot setting,
/// low enough that every derived size fits its integer type.
pub const MAX_EPISODE_IMAGES: i64 = 100_000;
/// Threads (libtorch's and the loader's) and prefetched episodes at most.
pub const MAX_THREADS: usize = 1024;
/// Any count of epochs, episodes or steps at most (2^53: exact as a JSON number, and no
/// product of two of them in the trainer's arithmetic can overflow a u64 past a check).
pub const MAX_COUNT: u64 = 1 << 53;

fn validate(c: &RunConfig) -> Result<(), ConfigError> {
    validate_limits(c)?;
    let e = &c.episode;
    if e.n_way < 2 {
        return Err(invalid(
            "n_way",
            format!(
                "{} ways cannot be classified; use --n-way 2 or more",
                e.n_way
            ),
        ));
    }
    if e.k_shot < 1 {
        return Err(invalid(
            "k_shot",
            format!(
                "{} shots leave no support image; use --k-shot 1 or more",
                e.k_shot
            ),
        ));
    }
    if e.n_query < 1 {
        return Err(invalid(
            "n_query",
            format!(
                "{} queries leave nothing to classify; use --n-query 1 or more",
                e.n_query
            ),
        ));
    }
    let min = c.model.backbone.min_image_size();
    if c.data.image_size < min {
        return Err(invalid(
            "image_size",
            format!(
                "{} px is too small for {:?} (it needs at least {min} px); raise --image-size",
                c.data.image_size, c.model.backbone
            ),
        ));
    }
    if c.data.prefetch == 0 {
        return Err(invalid(
            "prefetch",
            "the loader needs at least 1 episode of prefetch",
        ));
    }
    let m = &c.model;
    for (key, v) in [
        ("depth", m.depth),
        ("heads", m.heads),
        ("dim_head", m.dim_head),
        ("mlp_dim", m.mlp_dim),
        ("dim_attn", m.dim_attn),
    ] {
        if v < 1 {
            return Err(ConfigError::Invalid {
                key,
                message: format!("{v} must be at least 1"),
            });
        }
    }
    for (key, v) in [
        ("lambda_I", m.lambda_i),
        ("lambda_V", m.lambda_v),
        ("lambda_C", m.lambda_c),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(ConfigError::Invalid {
                key,
                message: format!("{v} must be a finite number ≥ 0"),
            });
        }
    }
    if m.lambda_i + m.lambda_v + m.lambda_c == 0.0 {
        return Err(invalid(
            "lambda_I",
            "all loss weights are 0, so nothing would be learned; set --lambda_I 1",
        ));
    }
    let t = &c.train;
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
        return Err(invalid(
            "learning_rate",
            format!("{} must be a positive number", t.learning_rate),
        ));
    }
    if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
        return Err(invalid(
            "weight_decay",
            format!("{} must be ≥ 0", t.weight_decay),
        ));
    }
    if !(0.0..1.0).contains(&t.momentum) {
        return Err(invalid(
            "momentum",
            format!("{} must be in [0, 1)", t.momentum),
        ));
    }
    if t.epochs == 0 || t.episodes_per_epoch == 0 {
        return Err(invalid(
            "epochs",
            "epochs and episodes per epoch must both be at least 1",
        ));
    }
    if t.val_episodes == 0 {
        return Err(invalid(
            "val_episodes",
            "at least 1 validation episode is needed to pick the best model",
        ));
    }
    if t.episodes_per_step == 0 || !t.episodes_per_epoch.is_multiple_of(t.episodes_per_step) {
        return Err(invalid(
            "episodes_per_step",
            format!(
                "{} must be at least 1 and divide the {} episodes per epoch",
                t.episodes_per_step, t.episodes_per_epoch
            ),
        ));
    }
    if t.log_every == 0 {
        return Err(invalid("log_every", "must be at least 1"));
    }
    if c.test.episodes == 0 {
        return Err(invalid("test_iter", "at least 1 test episode is needed"));
    }
    Ok(())
}

/// Every number within the range the trainer can honour (so nothing overflows or asks the
/// allocator for an impossible size later), each refusal naming its flag.
fn validate_limits(c: &RunConfig) -> Result<(), ConfigError> {
    let e = &c.episode;
    for (key, flag, v) in [
        ("n_way", "--n-way", e.n_way),
        ("k_shot", "--k-shot", e.k_shot),
        ("n_query", "--n-query", e.n_query),
    ] {
        if v > MAX_EPISODE_IMAGES {
            return Err(invalid(
                key,
                format!("{v} is more than an episode can hold (at most {MAX_EPISODE_IMAGES} images in all); lower {flag}"),
            ));
        }
    }
    match c.episode_images() {
        Some(n) if n <= MAX_EPISODE_IMAGES => {}
        _ if e.n_way < 1 || e.k_shot < 0 || e.n_query < 0 => {} // refused below, with its own message
        _ => {
            return Err(invalid(
                "n_way",
                format!(
                    "{} ways × ({} shots + {} queries) is more than {MAX_EPISODE_IMAGES} images in one episode; lower --n-way, --k-shot or --n-query",
                    e.n_way, e.k_shot, e.n_query
                ),
            ))
        }
    }
    if c.data.image_size > MAX_IMAGE_SIZE {
        return Err(invalid(
            "image_size",
            format!(
                "{} px is above the {MAX_IMAGE_SIZE} px this trainer accepts (the official settings use 84–224 px); lower --image-size",
                c.data.image_size
            ),
        ));
    }
    for (key, flag, v) in [
        ("threads", "--threads", c.run.threads),
        ("workers", "--workers", c.data.workers),
        ("prefetch", "prefetch", c.data.prefetch),
    ] {
        if v > MAX_THREADS {
            return Err(invalid(
                key,
                format!("{v} is more than the {MAX_THREADS} this trainer accepts; lower {flag} (0 = automatic)"),
            ));
        }
    }
    let t = &c.train;
    for (key, flag, v) in [
        ("epochs", "--epochs", t.epochs),
        (
            "episodes_per_epoch",
            "--episodes-per-epoch",
            t.episodes_per_epoch,
        ),
        ("val_episodes", "--val-episodes", t.val_episodes),
        ("max_steps", "--max-steps", t.max_steps),
        (
            "episodes_per_step",
            "--episodes-per-step",
            t.episodes_per_step,
        ),
        ("log_every", "log_every", t.log_every),
        (
            "empty_cache_every",
            "--empty-cache-every",
            t.empty_cache_every,
        ),
        ("checkpoint_every", "--checkpoint-every", t.checkpoint_every),
        ("keep_checkpoints", "--keep-checkpoints", t.keep_checkpoints),
        ("test_iter", "--test-iter", c.test.episodes),
    ] {
        if v > MAX_COUNT {
            return Err(invalid(
                key,
                format!("{v} is above the largest count accepted ({MAX_COUNT}); lower {flag}"),
            ));
        }
    }
    if c.model.freeze_backbone && c.model.method == super::Method::ProtoNet {
        return Err(invalid(
            "freeze_backbone",
            "ProtoNet has no head parameters, so with a frozen backbone nothing would be trained; drop --freeze-backbone or choose a method with a head (e.g. --method FSCT_cosine)",
        ));
    }
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N`, checked against what this machine has.
pub fn parse_device(s: &str) -> Result<Device, ConfigError> {
    let s = s.trim().to_ascii_lowercase();
    let device = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => {
                return Err(invalid(
                    "device",
                    format!("`{s}` is not a device; use cpu, cuda or cuda:N"),
                ))
            }
        },
    };
    let Device::Cuda(i) = device else {
        unreachable!()
    };
    let count = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    if i >= count {
        return Err(invalid(
            "device",
            format!("`{s}` was asked for but this machine has {count} usable CUDA device(s); use --device cpu"),
        ));
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut RunConfig)) -> RunConfig {
        let mut c = RunConfig::default();
        f(&mut c);
        c
    }

    #[test]
    fn impossible_values_are_rejected_naming_the_key() {
        let cases: Vec<(RunConfig, &str)> = vec![
            (with(|c| c.episode.n_way = 1), "n_way"),
            (with(|c| c.episode.k_shot = 0), "k_shot"),
            (with(|c| c.episode.n_query = 0), "n_query"),
            (with(|c| c.data.image_size = 8), "image_size"),
            (with(|c| c.train.learning_rate = -1.0), "learning_rate"),
            (with(|c| c.model.lambda_v = f64::NAN), "lambda_V"),
            (with(|c| c.run.device = "tpu".into()), "device"),
            (with(|c| c.run.device = "cuda:7".into()), "device"),
        ];
        for (c, key) in cases {
            match c.resolve() {
                Err(ConfigError::Invalid { key: k, message }) => {
                    assert_eq!(k, key, "{message}");
                    assert!(!message.is_empty());
                }
                other => panic!("expected {key} to be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn official_dataset_defaults() {
        let r = with(|c| c.data.dataset = "CIFAR".into()).resolve().unwrap();
        assert_eq!(r.config.data.image_size, 64);
        assert_eq!(
            r.dataset,
            DatasetSource::Folder(PathBuf::from("data/CIFAR_FS"))
        );
        let r = with(|c| {
            c.data.dataset = "cifar".into();
            c.model.backbone = Backbone::ResNet34;
        })
        .resolve()
        .unwrap();
        assert_eq!(r.config.data.image_size, 112);
        assert_eq!(r.config.model.backbone, Backbone::TvResNet34);
        let r = with(|c| c.data.dataset = "Omniglot".into())
            .resolve()
            .unwrap();
        assert_eq!(r.config.episode.n_query, 15);
        assert_eq!(r.config.model.backbone, Backbone::Conv4Snp);
        let r = with(|c| c.data.dataset = "some/folder".into())
            .resolve()
            .unwrap();
        assert_eq!(
            r.dataset,
            DatasetSource::Folder(PathBuf::from("some/folder"))
        );
        assert_eq!(r.config.data.image_size, 84);
    }

    #[test]
    fn official_resnet_names_follow_feti() {
        let resolve = |b: Backbone, feti: Option<bool>| {
            with(|c| (c.model.backbone, c.model.feti) = (b, feti)).resolve()
        };
        use Backbone::*;
        for (b, feti, want) in [
            (ResNet34, None, TvResNet34),
            (ResNet34, Some(false), TvResNet34),
            (ResNet34, Some(true), FetiResNet34),
            (ResNet18, None, TvResNet18),
            (ResNet18, Some(true), FetiResNet18),
            // As the official code: torchvision has no ResNet12, ResNet18 instead.
            (ResNet12, None, TvResNet18),
            (ResNet12, Some(true), FetiResNet12),
            (TvResNet34, Some(true), FetiResNet34),
            (FetiResNet34, Some(false), TvResNet34),
            (FetiResNet34, None, FetiResNet34),
            (FetiResNet10, None, FetiResNet10),
        ] {
            let r = resolve(b, feti).unwrap();
            assert_eq!(r.config.model.backbone, want, "{b:?} FETI {feti:?}");
            assert_eq!(r.config.model.feti, None, "the name alone says the layout");
        }
        for (b, feti) in [(FetiResNet10, false), (Conv4, true)] {
            match resolve(b, Some(feti)) {
                Err(ConfigError::Invalid {
                    key: "feti",
                    message,
                }) => {
                    assert!(message.contains("--FETI"), "{message}")
                }
                other => panic!("{b:?} --FETI {feti}: {other:?}"),
            }
        }
    }

    #[test]
    fn auto_micro_steps_follow_the_documented_rule() {
        assert_eq!(micro_steps(0, Backbone::Conv4), 2);
        assert_eq!(micro_steps(0, Backbone::FetiResNet34), 4);
        assert_eq!(micro_steps(0, Backbone::TvResNet18), 4);
        assert_eq!(micro_steps(3, Backbone::FetiResNet34), 3);
        assert_eq!(RunConfig::default().resolve().unwrap().micro_steps, 1);
    }
}
