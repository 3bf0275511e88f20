//! Run configuration: TOML files in configs/, CLI overrides, validation and the auto rules.
//!
//! What the user wrote (`RunConfig`, every field with a default) is kept apart from what the run
//! uses (`Resolved`): `RunConfig::resolve` applies the dataset defaults and the auto rules once,
//! and rejects impossible values with one message each.

pub mod kinds;
mod resolve;
pub mod start;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use kinds::{
    parse_switch, Accumulation, AmpMode, Backbone, CommKind, DatasetName, Method, Optimizer,
    Pretrained, ResNetLayout, ShardMode, Split,
};
pub use resolve::{parse_device, DatasetSource, Resolved};
pub use start::Start;

/// Everything a run can be told, in TOML sections. Unknown keys are errors (typos fail loudly).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub data: DataConfig,
    pub episode: EpisodeConfig,
    pub model: ModelSection,
    pub train: TrainConfig,
    pub test: TestConfig,
    pub run: RuntimeConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A dataset folder (official JSON lists, mini-ImageNet CSV, or split/class folders), or an
    /// official name (miniImagenet, CUB, CIFAR, Omniglot) resolved under `root`, or `synthetic`
    /// for the built-in dataset (created under `root` on first use).
    pub dataset: String,
    /// Where official dataset names live: `<root>/<name>/` (official `configs.data_dir`).
    pub root: PathBuf,
    /// Input side in pixels; 0 = the official size for the dataset and backbone (84 / 224; CIFAR 64 / 112).
    pub image_size: i64,
    /// Training augmentation (RandomResizedCrop + horizontal flip), official `--train_aug`.
    pub train_aug: bool,
    /// Loader threads decoding images; 0 = one per core (at most 8).
    pub workers: usize,
    /// Episodes decoded ahead of the trainer.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: "synthetic".into(),
            root: PathBuf::from("data"),
            image_size: 0,
            train_aug: false,
            workers: 0,
            prefetch: 2,
        }
    }
}

/// The episode: n_way classes, k_shot support and n_query query images each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpisodeConfig {
    pub n_way: i64,
    pub k_shot: i64,
    /// Query images per class; Omniglot forces 15 as the official code does.
    pub n_query: i64,
}

impl Default for EpisodeConfig {
    fn default() -> Self {
        Self {
            n_way: 5,
            k_shot: 5,
            n_query: 16,
        }
    }
}

/// The model: method, backbone, head hyper-parameters (each declared here only; the model reads
/// them through `model::ModelConfig`) and where the weights start. The defaults are the
/// official values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub method: Method,
    /// `ResNet12/18/34` are resolved to their layout by `feti` (see [`Backbone`]); the
    /// effective config always holds the explicit name (`TvResNet34`, `FetiResNet34`, ...).
    pub backbone: Backbone,
    /// The official `--FETI` flag: true = the FETI ResNet layout, false = torchvision's. Unset =
    /// the official default (torchvision) for `ResNet12/18/34`; explicit names keep theirs.
    pub feti: Option<bool>,
    /// FS-CT: transformer blocks, attention + FFN (the official code reuses one block's weights
    /// at every depth). Official 1.
    pub depth: i64,
    /// FS-CT: attention heads. Official 8.
    pub heads: i64,
    /// FS-CT: width per head, also the width of the output head's Linear(d, dim_head). Official 64.
    pub dim_head: i64,
    /// FS-CT: FFN hidden width. Official 512.
    pub mlp_dim: i64,
    /// CTX: channels of the shared 1×1 projection (the attention width). Official 128.
    pub dim_attn: i64,
    /// VIC weight of the invariance (cross-entropy) term. 1, with λ_V = λ_C = 0: plain FS-CT.
    pub lambda_i: f64,
    /// VIC weight of the variance term; 0 = not computed.
    pub lambda_v: f64,
    /// VIC weight of the covariance term; 0 = not computed.
    pub lambda_c: f64,
    /// Initial ResNet weights, a local safetensors file (torchvision's resnet18/34 `state_dict`
    /// for `TvResNet*`, the FETI checkpoint's for `FetiResNet*`; nothing is downloaded), or
    /// "none" for random weights. A ResNet run must say which (the official code always starts
    /// from pretrained weights); Conv backbones take none.
    pub pretrained: Option<Pretrained>,
    /// Keep backbone weights fixed (only the head trains).
    pub freeze_backbone: bool,
    /// FS-CT modules kept in fp32 under --amp (official names): `ATTN`, `FFN`, `linear`.
    pub fp32_modules: Vec<String>,
    /// An official FS-CT state_dict (safetensors, official names) to start from.
    pub official: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            method: Method::FsctCosine,
            backbone: Backbone::Conv4,
            feti: None,
            depth: 1,
            heads: 8,
            dim_head: 64,
            mlp_dim: 512,
            dim_attn: 128,
            lambda_i: 1.0,
            lambda_v: 0.0,
            lambda_c: 0.0,
            pretrained: None,
            freeze_backbone: false,
            fp32_modules: Vec::new(),
            official: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: u64,
    /// Training episodes per epoch (official `--n_episode`), one optimizer step each.
    pub episodes_per_epoch: u64,
    /// Validation episodes after each epoch; the best mean accuracy is kept.
    pub val_episodes: u64,
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// SGD only.
    pub momentum: f64,
    /// Stop after this many optimizer steps in total (0 = no limit); the run's files are still written.
    pub max_steps: u64,
    /// Micro-steps per episode: 1 = plain; 0 = auto (ResNet 4, others 2, the documented rule);
    /// "dynamic" = chosen from the memory available, doubled on out-of-memory (the episode is
    /// redone).
    pub gradient_accumulation_steps: Accumulation,
    /// Mixed precision: off, fp16 (autocast + dynamic loss scaler) or bf16 (autocast). Unset =
    /// fp16 on CUDA, off on CPU.
    pub amp: Option<AmpMode>,
    /// Recompute the backbone segment by segment in the backward (activation checkpointing):
    /// less memory, one more backbone forward; same gradient.
    pub checkpoint_activations: bool,
    /// Profile memory per phase of every step; report the last one (table, memory.json,
    /// memory.png in the run folder).
    pub memory_report: bool,
    /// Episodes whose gradients are summed (each loss scaled 1/K) before one optimizer step;
    /// composes with micro-steps. 1 = the official one step per episode.
    pub episodes_per_step: u64,
    /// Write a metrics line every this many steps (and at each epoch end).
    pub log_every: u64,
    /// Return the CUDA caching allocator's unused blocks to the driver after every N optimizer
    /// steps (1 = every step, the documented fix; 0 = never). No effect on CPU.
    pub empty_cache_every: u64,
    /// How ranks share a step: `images` (slices of one episode) or `episodes` (one each).
    pub shard: ShardMode,
    /// ZeRO stage 1 with more than one rank: each trainable tensor's optimizer state lives on
    /// one owner rank (gradients reduced to it, parameters broadcast from it), so each rank
    /// holds about 1/W of it. The same steps as off; checkpoints stay unsharded.
    pub shard_optimizer: bool,
    /// With more than one rank on the MPI backend: all-reduce each bucket of gradients as soon
    /// as the backward has finished them (head first, then the backbone from its last segment
    /// to its first), while the backward of earlier layers goes on; the optimizer waits only
    /// for what is still in flight. The same sums as off. See [`crate::train::overlap`].
    pub overlap: bool,
    /// Keep the convolution weights (and so the backbone's activations) channels-last: the
    /// layout oneDNN and cuDNN run fastest; the same values. Checkpoints and weight files are
    /// written in the usual contiguous layout either way.
    pub channels_last: bool,
    /// Write a resumable checkpoint every N optimizer steps (0 = at epoch ends only; one is
    /// always written at each epoch end, at the end of the run and on SIGTERM/SIGINT).
    pub checkpoint_every: u64,
    /// Checkpoints kept in RUN/checkpoints (the newest).
    pub keep_checkpoints: u64,
    /// cuDNN benchmark mode on CUDA: the fastest convolution algorithms are searched for at the
    /// first steps and kept, which pays off because every episode has the same shape. The
    /// choice can differ between runs, so turn it off for bit-identical GPU runs. No effect on
    /// the CPU.
    pub cudnn_benchmark: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 50,
            episodes_per_epoch: 200,
            val_episodes: 200,
            optimizer: Optimizer::AdamW,
            learning_rate: 1e-3,
            weight_decay: 1e-5,
            momentum: 0.9,
            max_steps: 0,
            gradient_accumulation_steps: Accumulation::Steps(1),
            amp: None,
            checkpoint_activations: false,
            memory_report: false,
            episodes_per_step: 1,
            log_every: 20,
            empty_cache_every: 1,
            shard: ShardMode::Images,
            shard_optimizer: false,
            overlap: true,
            channels_last: true,
            checkpoint_every: 0,
            cudnn_benchmark: true,
            keep_checkpoints: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestConfig {
    /// Test episodes (official `--test_iter`).
    pub episodes: u64,
    pub split: Split,
}

impl Default for TestConfig {
    fn default() -> Self {
        Self {
            episodes: 600,
            split: Split::Novel,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Seeds episodes, augmentation and initial weights (any 64-bit value).
    #[serde(with = "wide_u64")]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Intra-op threads for libtorch; 0 = libtorch's default.
    pub threads: usize,
    /// Folder for every file of the run (config, metrics, checkpoints, plots).
    pub output: PathBuf,
    /// Collective backend between ranks: auto (NCCL on CUDA, else MPI), nccl or mpi.
    pub comm: CommKind,
    /// Seconds a rank may wait in one collective before it ends the job as stalled (a rank
    /// stopped answering); 0 = wait forever. 600 as NCCL's own watchdog.
    pub collective_timeout: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            seed: 4040,
            device: "cpu".into(),
            threads: 0,
            output: PathBuf::from("runs/latest"),
            comm: CommKind::Auto,
            collective_timeout: 600,
        }
    }
}

/// TOML integers are signed 64-bit: a value above i64::MAX (half of all random 64-bit seeds)
/// is written as a string, so every u64 round-trips through config.toml and checkpoints.
mod wide_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(*v) {
            Ok(i) => s.serialize_i64(i),
            Err(_) => s.serialize_str(&v.to_string()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wide {
            Int(u64),
            Text(String),
        }
        match Wide::deserialize(d)? {
            Wide::Int(v) => Ok(v),
            Wide::Text(t) => t.trim().parse().map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a whole number from 0 to {}",
                    u64::MAX
                ))
            }),
        }
    }
}

/// A config problem, said so that the fix is obvious.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is part of the message, not a `source`: a chain printer would repeat it.
    #[error("cannot read config file {path:?}: {cause}; pass an existing TOML file to --config")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config file {path:?} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl RunConfig {
    /// Reads a TOML file; keys not given keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            crate::regular_file::read_to_string(path).map_err(|cause| ConfigError::Read {
                path: path.to_owned(),
                cause,
            })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| {
            let mut msg = e.message().to_string();
            // Where: the offending line, which names the key.
            if let Some(span) = e.span() {
                let start = span.start.min(text.len());
                let line_no = text[..start].matches('\n').count() + 1;
                if let Some(line) = text.lines().nth(line_no - 1) {
                    msg = format!("{msg}, at line {line_no}: `{}`", line.trim());
                }
            }
            match suggest_key(&msg) {
                Some(hint) => format!("{msg} ({hint})"),
                None => msg,
            }
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" message: the nearest valid key.
fn suggest_key(message: &str) -> Option<String> {
    let unknown = message.strip_prefix("unknown field `")?.split('`').next()?;
    let expected: Vec<&str> = message
        .split("expected")
        .nth(1)?
        .split('`')
        .skip(1)
        .step_by(2)
        .collect();
    let best = expected.iter().min_by_key(|k| edit_distance(unknown, k))?;
    (edit_distance(unknown, best) <= unknown.len().max(3) / 2 + 1)
        .then(|| format!("did you mean `{best}`?"))
}

/// Levenshtein distance, for suggestions only.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_gives_official_defaults() {
        let c = RunConfig::from_toml("").unwrap();
        assert_eq!(c, RunConfig::default());
        assert_eq!(c.train.learning_rate, 1e-3);
        assert_eq!(c.train.weight_decay, 1e-5);
        assert_eq!(
            (c.episode.n_way, c.episode.k_shot, c.episode.n_query),
            (5, 5, 16)
        );
    }

    #[test]
    fn official_spellings_parse_in_toml() {
        let c = RunConfig::from_toml(
            "[model]\nmethod = \"CTX_softmax\"\nbackbone = \"ResNet34\"\n[train]\noptimizer = \"SGD\"\n",
        )
        .unwrap();
        assert_eq!(c.model.method, Method::CtxSoftmax);
        assert_eq!(c.model.backbone, Backbone::ResNet34);
        assert_eq!(c.train.optimizer, Optimizer::Sgd);
    }

    #[test]
    fn unknown_key_is_rejected_with_nearest_valid_key() {
        let err = RunConfig::from_toml("[train]\nlearning_rat = 0.1\n").unwrap_err();
        assert!(err.contains("learning_rat"), "{err}");
        assert!(err.contains("did you mean `learning_rate`"), "{err}");
    }

    #[test]
    fn every_64_bit_seed_round_trips() {
        for seed in [0, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            let mut c = RunConfig::default();
            c.run.seed = seed;
            let back = RunConfig::from_toml(&c.to_toml()).unwrap();
            assert_eq!(back.run.seed, seed);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(
                serde_json::from_str::<RunConfig>(&json).unwrap().run.seed,
                seed
            );
        }
        assert!(RunConfig::from_toml("[run]\nseed = \"-3\"\n").is_err());
    }

    #[test]
    fn toml_round_trips() {
        let mut c = RunConfig::default();
        c.model.lambda_v = 0.5;
        c.data.dataset = "somewhere/else".into();
        assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
    }
}
