//! The closed sets a run chooses from. Spellings follow the official FS-CT code (`FSCT_cosine`,
//! `Conv4`, `miniImagenet`) so its scripts keep working; lower-case aliases are accepted too.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Few-shot method: the head that turns support/query embeddings into logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
pub enum Method {
    /// FS-CT with cosine attention (the paper's method).
    #[serde(rename = "FSCT_cosine", alias = "fsct_cosine")]
    #[value(name = "FSCT_cosine", alias = "fsct_cosine")]
    FsctCosine,
    /// FS-CT with scaled dot-product attention (softmax over a single key, as in the official code).
    #[serde(rename = "FSCT_softmax", alias = "fsct_softmax")]
    #[value(name = "FSCT_softmax", alias = "fsct_softmax")]
    FsctSoftmax,
    /// CrossTransformer baseline, cosine variant.
    #[serde(rename = "CTX_cosine", alias = "ctx_cosine")]
    #[value(name = "CTX_cosine", alias = "ctx_cosine")]
    CtxCosine,
    /// CrossTransformer baseline, softmax variant.
    #[serde(rename = "CTX_softmax", alias = "ctx_softmax")]
    #[value(name = "CTX_softmax", alias = "ctx_softmax")]
    CtxSoftmax,
    /// Prototypical network: mean prototype, negative squared Euclidean logits.
    #[serde(rename = "ProtoNet", alias = "protonet")]
    #[value(name = "ProtoNet", alias = "protonet")]
    ProtoNet,
}

impl Method {
    pub fn is_ctx(self) -> bool {
        matches!(self, Method::CtxCosine | Method::CtxSoftmax)
    }
    pub fn official_name(self) -> &'static str {
        match self {
            Method::FsctCosine => "FSCT_cosine",
            Method::FsctSoftmax => "FSCT_softmax",
            Method::CtxCosine => "CTX_cosine",
            Method::CtxSoftmax => "CTX_softmax",
            Method::ProtoNet => "ProtoNet",
        }
    }
}

/// Feature extractor. The ResNets come in two layouts, as in the official code:
/// * `TvResNet18/34`: torchvision's layout (7×7 stride-2 stem + max-pool, no pool at the end;
///   512×7×7 at 224 px), the official `--FETI 0` network, which starts from ImageNet weights;
/// * `FetiResNet10/12/18/34`: the simple-cnaps layout (5×5 stride-2 stem, no max-pool, adaptive
///   pool to 7×7), the official `--FETI 1` network, which starts from the FETI checkpoint.
///
/// `ResNet12/18/34` are the official names, whose layout the official `--FETI` flag picks (config
/// key `feti`): [`Backbone::with_feti`], applied by `RunConfig::resolve`, so a resolved config
/// always names the layout. Without `--FETI 1` they are the torchvision layout (official default
/// `--FETI 0`; `ResNet12` then becomes torchvision's ResNet18, as the official code does).
/// `ResNet10` (not in the official code) exists in the FETI layout only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
pub enum Backbone {
    #[serde(rename = "Conv4", alias = "conv4")]
    #[value(name = "Conv4", alias = "conv4")]
    Conv4,
    #[serde(rename = "Conv6", alias = "conv6")]
    #[value(name = "Conv6", alias = "conv6")]
    Conv6,
    /// Omniglot's Conv4 without the last two pools, on channel 0 only (official `Conv4SNP`).
    #[serde(rename = "Conv4SNP", alias = "conv4snp")]
    #[value(name = "Conv4SNP", alias = "conv4snp")]
    Conv4Snp,
    /// Official name: the layout follows `--FETI` (default: torchvision's ResNet18).
    #[serde(rename = "ResNet12", alias = "resnet12")]
    #[value(name = "ResNet12", alias = "resnet12")]
    ResNet12,
    /// Official name: the layout follows `--FETI` (default: torchvision).
    #[serde(rename = "ResNet18", alias = "resnet18")]
    #[value(name = "ResNet18", alias = "resnet18")]
    ResNet18,
    /// Official name: the layout follows `--FETI` (default: torchvision).
    #[serde(rename = "ResNet34", alias = "resnet34")]
    #[value(name = "ResNet34", alias = "resnet34")]
    ResNet34,
    #[serde(
        rename = "FetiResNet10",
        alias = "fetiresnet10",
        alias = "ResNet10",
        alias = "resnet10"
    )]
    #[value(
        name = "FetiResNet10",
        alias = "fetiresnet10",
        alias = "ResNet10",
        alias = "resnet10"
    )]
    FetiResNet10,
    #[serde(rename = "FetiResNet12", alias = "fetiresnet12")]
    #[value(name = "FetiResNet12", alias = "fetiresnet12")]
    FetiResNet12,
    #[serde(rename = "FetiResNet18", alias = "fetiresnet18")]
    #[value(name = "FetiResNet18", alias = "fetiresnet18")]
    FetiResNet18,
    #[serde(rename = "FetiResNet34", alias = "fetiresnet34")]
    #[value(name = "FetiResNet34", alias = "fetiresnet34")]
    FetiResNet34,
    #[serde(rename = "TvResNet18", alias = "tvresnet18")]
    #[value(name = "TvResNet18", alias = "tvresnet18")]
    TvResNet18,
    #[serde(rename = "TvResNet34", alias = "tvresnet34")]
    #[value(name = "TvResNet34", alias = "tvresnet34")]
    TvResNet34,
}

/// The two ResNet layouts (see [`Backbone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResNetLayout {
    Torchvision,
    Feti,
}

impl Backbone {
    pub fn is_resnet(self) -> bool {
        !matches!(self, Backbone::Conv4 | Backbone::Conv6 | Backbone::Conv4Snp)
    }
    /// Smallest input side the backbone accepts (below it a pool or stride reaches zero size).
    pub fn min_image_size(self) -> i64 {
        match self {
            Backbone::Conv4 | Backbone::Conv6 => 16,
            Backbone::Conv4Snp => 12,
            _ => 32,
        }
    }

    /// The explicit network an official name stands for without `--FETI` (the official
    /// default `--FETI 0`); explicit names are returned as they are.
    pub fn explicit(self) -> Backbone {
        match self {
            Backbone::ResNet12 | Backbone::ResNet18 => Backbone::TvResNet18,
            Backbone::ResNet34 => Backbone::TvResNet34,
            b => b,
        }
    }

    /// The layout `--FETI 0|1` asks for, at the same depth. Explicit names are converted too
    /// (the flag names the layout), except where that layout does not exist.
    pub fn with_feti(self, feti: bool) -> Result<Backbone, String> {
        use Backbone::*;
        Ok(match (self, feti) {
            (ResNet12 | FetiResNet12, true) => FetiResNet12,
            (ResNet18 | FetiResNet18 | TvResNet18, true) => FetiResNet18,
            (ResNet34 | FetiResNet34 | TvResNet34, true) => FetiResNet34,
            (FetiResNet10, true) => FetiResNet10,
            (ResNet12 | FetiResNet12 | ResNet18 | FetiResNet18 | TvResNet18, false) => TvResNet18,
            (ResNet34 | FetiResNet34 | TvResNet34, false) => TvResNet34,
            (FetiResNet10, false) => {
                return Err("there is no torchvision ResNet10; use --FETI 1 (or drop --FETI), or --backbone ResNet18".into())
            }
            (Conv4 | Conv6 | Conv4Snp, _) => {
                return Err(format!(
                    "--FETI picks a ResNet layout and does not apply to {self:?}; drop --FETI (or the config key `feti`)"
                ))
            }
        })
    }

    /// The layout of an explicit ResNet (None for the Conv backbones).
    pub fn layout(self) -> Option<ResNetLayout> {
        match self.explicit() {
            Backbone::TvResNet18 | Backbone::TvResNet34 => Some(ResNetLayout::Torchvision),
            Backbone::FetiResNet10
            | Backbone::FetiResNet12
            | Backbone::FetiResNet18
            | Backbone::FetiResNet34 => Some(ResNetLayout::Feti),
            _ => None,
        }
    }

    /// One line on what the network is, for the start-up log and `--dry-run`.
    pub fn describe(self) -> String {
        let b = self.explicit();
        match b.layout() {
            Some(ResNetLayout::Torchvision) => format!(
                "{b:?}: torchvision layout (7×7 stride-2 stem + max-pool, no final pool), the official --FETI 0 network"
            ),
            Some(ResNetLayout::Feti) => format!(
                "{b:?}: FETI layout (5×5 stride-2 stem, no max-pool, adaptive pool to 7×7), the official --FETI 1 network"
            ),
            None => format!("{b:?}"),
        }
    }

    /// The weights the official code starts this ResNet from (None: a Conv backbone, which
    /// starts from random weights).
    pub fn official_start(self) -> Option<&'static str> {
        match self.explicit() {
            Backbone::TvResNet18 => Some("torchvision's ImageNet weights of resnet18"),
            Backbone::TvResNet34 => Some("torchvision's ImageNet weights of resnet34"),
            Backbone::FetiResNet12 | Backbone::FetiResNet18 | Backbone::FetiResNet34 => {
                Some("the FETI checkpoint (Pretrained_ResNet_FETI.pt.tar)")
            }
            // Not in the official code; its layout is the FETI one.
            Backbone::FetiResNet10 => Some("the FETI checkpoint (Pretrained_ResNet_FETI.pt.tar)"),
            _ => None,
        }
    }

    /// Checkpoints before the torchvision layout became the default recorded the FETI ResNets
    /// under their official names (`"ResNet34"` was the FETI layout): the explicit backbone a
    /// recorded name meant, when it is such an old name.
    pub fn from_legacy_signature(name: &str) -> Option<Backbone> {
        match name {
            "ResNet10" => Some(Backbone::FetiResNet10),
            "ResNet12" => Some(Backbone::FetiResNet12),
            "ResNet18" => Some(Backbone::FetiResNet18),
            "ResNet34" => Some(Backbone::FetiResNet34),
            _ => None,
        }
    }
}

/// `pretrained`: a local weights file, or `none` to start from random weights on purpose.
/// Unset means "not decided": a ResNet run is refused then (see `Resolved::start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "std::path::PathBuf", into = "std::path::PathBuf")]
pub enum Pretrained {
    /// Random initial weights, asked for explicitly.
    None,
    /// A safetensors file: torchvision's resnet18/34 `state_dict` or the FETI checkpoint's.
    File(std::path::PathBuf),
}

impl From<std::path::PathBuf> for Pretrained {
    fn from(p: std::path::PathBuf) -> Self {
        if p.as_os_str().eq_ignore_ascii_case("none") {
            Pretrained::None
        } else {
            Pretrained::File(p)
        }
    }
}

impl From<Pretrained> for std::path::PathBuf {
    fn from(p: Pretrained) -> Self {
        match p {
            Pretrained::None => "none".into(),
            Pretrained::File(p) => p,
        }
    }
}

/// The official dataset names, resolved under the data root with the official defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
pub enum DatasetName {
    #[serde(rename = "miniImagenet", alias = "miniimagenet")]
    #[value(name = "miniImagenet", alias = "miniimagenet")]
    MiniImagenet,
    #[serde(rename = "CUB", alias = "cub")]
    #[value(name = "CUB", alias = "cub")]
    Cub,
    #[serde(rename = "CIFAR", alias = "cifar", alias = "CIFAR-FS")]
    #[value(name = "CIFAR", alias = "cifar", alias = "CIFAR-FS")]
    Cifar,
    #[serde(rename = "Omniglot", alias = "omniglot")]
    #[value(name = "Omniglot", alias = "omniglot")]
    Omniglot,
    /// The built-in procedural dataset (`fsct-dist data synth`), created on first use.
    #[serde(rename = "synthetic", alias = "builtin")]
    #[value(name = "synthetic", alias = "builtin")]
    Synthetic,
}

impl DatasetName {
    /// Folder under the data root, as in the official `configs.data_dir`.
    pub fn folder(self) -> &'static str {
        match self {
            DatasetName::MiniImagenet => "miniImagenet",
            DatasetName::Cub => "CUB",
            DatasetName::Cifar => "CIFAR_FS",
            DatasetName::Omniglot => "Omniglot",
            DatasetName::Synthetic => "synthetic",
        }
    }
    /// Official input size: CIFAR 112 (ResNet) / 64 (Conv), everything else 224 / 84.
    pub fn default_image_size(self, backbone: Backbone) -> i64 {
        match (self, backbone.is_resnet()) {
            (DatasetName::Cifar, true) => 112,
            (DatasetName::Cifar, false) => 64,
            (_, true) => 224,
            (_, false) => 84,
        }
    }
}

/// Which split of a dataset: the official JSON names are base / val / novel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[value(alias = "train")]
    Base,
    #[value(alias = "validation")]
    Val,
    #[value(alias = "test")]
    Novel,
}

impl Split {
    pub fn file_stem(self) -> &'static str {
        match self {
            Split::Base => "base",
            Split::Val => "val",
            Split::Novel => "novel",
        }
    }
}

/// Optimizer, official spellings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
pub enum Optimizer {
    #[serde(rename = "AdamW", alias = "adamw")]
    #[value(name = "AdamW", alias = "adamw")]
    AdamW,
    #[serde(rename = "Adam", alias = "adam")]
    #[value(name = "Adam", alias = "adam")]
    Adam,
    #[serde(rename = "SGD", alias = "sgd")]
    #[value(name = "SGD", alias = "sgd")]
    Sgd,
}

/// `gradient_accumulation_steps`: a number of micro-steps per episode (0 = the documented auto
/// rule), or `dynamic`: chosen from the memory available and doubled on out-of-memory.
/// In TOML an integer or the string "dynamic".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Accumulation {
    Steps(u64),
    Named(AccumulationName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccumulationName {
    Dynamic,
}

impl Accumulation {
    pub const DYNAMIC: Accumulation = Accumulation::Named(AccumulationName::Dynamic);

    pub fn is_dynamic(self) -> bool {
        self == Self::DYNAMIC
    }
}

impl Default for Accumulation {
    fn default() -> Self {
        Accumulation::Steps(1)
    }
}

impl std::str::FromStr for Accumulation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("dynamic") {
            return Ok(Self::DYNAMIC);
        }
        s.parse().map(Accumulation::Steps).map_err(|_| {
            format!("`{s}` is not a number of micro-steps; use 1, 2, 4, …, 0 (auto) or dynamic")
        })
    }
}

impl std::fmt::Display for Accumulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Accumulation::Steps(n) => write!(f, "{n}"),
            Accumulation::Named(_) => f.write_str("dynamic"),
        }
    }
}

/// `--shard`: how ranks share the work of an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum ShardMode {
    /// Every rank takes a slice of the same episode's images (exact: the single-process
    /// gradient of the same BatchNorm groups).
    #[default]
    Images,
    /// Every rank its own episode; gradients averaged (classic data parallelism).
    Episodes,
}

/// `--amp`: the autocast dtype, or none. What each mode does at run time (the dtype, the
/// autocast region, the loss scaler) lives in `train::amp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum AmpMode {
    /// Full fp32.
    Off,
    /// Autocast to float16 with a dynamic loss scaler (CUDA's usual choice).
    Fp16,
    /// Autocast to bfloat16, no loss scaling (CPU autocast's dtype; also Ampere+ GPUs).
    Bf16,
}

impl AmpMode {
    /// Whether this mode needs the dynamic loss scaler (fp16 only).
    pub fn uses_scaler(self) -> bool {
        self == AmpMode::Fp16
    }
}

impl std::fmt::Display for AmpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AmpMode::Off => "off",
            AmpMode::Fp16 => "fp16",
            AmpMode::Bf16 => "bf16",
        })
    }
}

/// `--comm`: which backend carries tensors between ranks (opened by `distributed::init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum CommKind {
    /// NCCL when the device is CUDA and libnccl loads, else MPI (a world of one needs neither).
    #[default]
    Auto,
    Nccl,
    Mpi,
}

impl std::fmt::Display for CommKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CommKind::Auto => "auto",
            CommKind::Nccl => "nccl",
            CommKind::Mpi => "mpi",
        })
    }
}

/// The one spelling of a yes/no flag value on the command line: 1/0, true/false, yes/no, on/off
/// (any case), so `--train_aug 1` (the official form) and `--sweep-ckpt off,on` read alike.
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not 1/0, true/false, yes/no or on/off")),
    }
}

#[cfg(test)]
mod switch_tests {
    use super::parse_switch;

    #[test]
    fn every_spelling_of_a_switch_reads_alike_and_others_are_refused() {
        for on in ["1", "true", "Yes", "ON"] {
            assert_eq!(parse_switch(on), Ok(true), "{on}");
        }
        for off in ["0", "FALSE", "no", "off"] {
            assert_eq!(parse_switch(off), Ok(false), "{off}");
        }
        assert!(parse_switch("2").unwrap_err().contains("on/off"));
    }
}
