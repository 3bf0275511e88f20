//! Backbones, FS-CT / CTX / ProtoNet heads, the VIC regulariser, official-checkpoint import.
//! Single-process code: nothing here knows about ranks.
//!
//! Every variable lives in a tch `nn::VarStore` under the official PyTorch `state_dict` name
//! (`feature.trunk.0.C.weight`, `ATTN.input_linear.1.weight`, `linear.2.L.weight_g`, ...), so an
//! official checkpoint loads by name ([`load_official`]). BatchNorm running statistics are
//! non-trainable variables of the same store.
//!
//! ```no_run
//! use fsct_dist::config::{Backbone, Method};
//! use fsct_dist::model::{FewShotModel, ModelConfig};
//! use tch::{nn, Device, Tensor, Kind};
//! let vs = nn::VarStore::new(Device::Cpu);
//! let cfg = ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 5, 5, 16, 84);
//! let model = FewShotModel::new(&vs.root(), &cfg).unwrap();
//! let mut opt = nn::OptimizerConfig::build(nn::adamw(0.9, 0.999, 1e-5), &vs, 1e-3).unwrap();
//! let x = Tensor::randn([5, 21, 3, 84, 84], (Kind::Float, Device::Cpu));
//! let out = model.forward(&x, true);
//! opt.backward_step(&out.loss);
//! ```

mod backbone;
mod ctx;
mod error;
mod fsct;
mod import;
mod layers;
pub mod vic;

use std::ops::Range;

use tch::{nn, Kind, Tensor};

pub use backbone::{output_shape, FeatureNet};
pub use ctx::{protonet_logits, CtxHead};
pub use error::ModelError;
pub use error::ShapeDiff;
pub use fsct::{AttnVariant, Fp32Modules, FsctDims, FsctHead};
pub use import::{
    freeze_backbone, load_checked, load_official, read_safetensors_metadata, use_channels_last,
    LoadReport, WeightsSource,
};
pub use layers::BnMode;

use crate::config::{Backbone, Method, ModelSection, Resolved};

/// Everything that fixes the model's shape: the run config's `[model]` section, where each
/// hyper-parameter is declared and documented once (official values by default), and the
/// episode and input size it is built for.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Method, backbone and head hyper-parameters; the model ignores the keys that only decide
    /// where its weights start (`pretrained`, `official`, `freeze_backbone`).
    pub model: ModelSection,
    pub n_way: i64,
    pub k_shot: i64,
    pub n_query: i64,
    /// Input side in pixels (84 / 64 for Conv, 224 / 112 for ResNet in the official code).
    pub image_size: i64,
}

impl ModelConfig {
    /// The official hyper-parameters (`ModelSection`'s defaults: depth 1, 8 heads × 64, MLP 512,
    /// dim_attn 128, λ = 1/0/0).
    pub fn new(
        method: Method,
        backbone: Backbone,
        n_way: i64,
        k_shot: i64,
        n_query: i64,
        image_size: i64,
    ) -> Self {
        Self {
            model: ModelSection {
                method,
                backbone,
                ..ModelSection::default()
            },
            n_way,
            k_shot,
            n_query,
            image_size,
        }
    }

    /// The model a resolved run describes (resolved: the backbone names its layout and the
    /// image size is the one used).
    pub fn from_run(r: &Resolved) -> Self {
        let c = &r.config;
        Self {
            model: c.model.clone(),
            n_way: c.episode.n_way,
            k_shot: c.episode.k_shot,
            n_query: c.episode.n_query,
            image_size: c.data.image_size,
        }
    }

    fn validate(&self) -> Result<(), ModelError> {
        let m = &self.model;
        /// The first of the named sizes below 1, as the error.
        fn at_least_one(sizes: &[(&str, i64)]) -> Result<(), ModelError> {
            match sizes.iter().find(|(_, v)| *v < 1) {
                Some((what, v)) => Err(ModelError::InvalidConfig(format!(
                    "{what} must be at least 1, got {v}"
                ))),
                None => Ok(()),
            }
        }
        at_least_one(&[
            ("n_way", self.n_way),
            ("k_shot", self.k_shot),
            ("n_query", self.n_query),
            ("image_size", self.image_size),
        ])?;
        if matches!(m.method, Method::FsctCosine | Method::FsctSoftmax) {
            at_least_one(&[
                ("depth", m.depth),
                ("heads", m.heads),
                ("dim_head", m.dim_head),
                ("mlp_dim", m.mlp_dim),
            ])?;
        }
        if m.method.is_ctx() {
            at_least_one(&[("dim_attn", m.dim_attn)])?;
        }
        for (what, v) in [
            ("lambda_I", m.lambda_i),
            ("lambda_V", m.lambda_v),
            ("lambda_C", m.lambda_c),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ModelError::InvalidConfig(format!(
                    "{what} must be a finite number ≥ 0, got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// The output of the head for one episode (or a range of its queries, [`FewShotModel::head_part`]).
#[derive(Debug)]
pub struct HeadOutput {
    /// Logits (queries, n_way), queries in class-major order.
    pub logits: Tensor,
    /// λ_I·ce + λ_V·var_term + λ_C·cov_term (terms with λ = 0 are left out).
    pub loss: Tensor,
    /// Cross-entropy against [`labels`]: the mean over the episode's queries (for a part, that
    /// part's share of it, so the parts sum to the episode mean).
    pub ce: Tensor,
    /// VIC variance term L_V (0 when λ_V = 0 or not included).
    pub var_term: Tensor,
    /// VIC covariance term L_C (0 when λ_C = 0 or not included).
    pub cov_term: Tensor,
}

#[derive(Debug)]
enum Head {
    Fsct(Box<FsctHead>),
    Ctx(CtxHead),
    ProtoNet,
}

/// A few-shot classifier: backbone (`feature.*`) + head.
#[derive(Debug)]
pub struct FewShotModel {
    cfg: ModelConfig,
    feature: FeatureNet,
    head: Head,
    feature_dim: Vec<i64>,
}

impl FewShotModel {
    /// Creates every variable under `root` with its official name and official initialisation.
    /// Fails when the configuration is invalid (e.g. an image too small for the backbone).
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let m = &cfg.model;
        let feature = FeatureNet::new(&(root / "feature"), m.backbone, cfg.image_size)?;
        let [c, h, w] = feature.out_shape();
        let (head, feature_dim) = match m.method {
            Method::FsctCosine | Method::FsctSoftmax => {
                let variant = if m.method == Method::FsctCosine {
                    AttnVariant::Cosine
                } else {
                    AttnVariant::Softmax
                };
                let dims = FsctDims {
                    d: c * h * w,
                    n_way: cfg.n_way,
                    k_shot: cfg.k_shot,
                    depth: m.depth,
                    heads: m.heads,
                    dim_head: m.dim_head,
                    mlp_dim: m.mlp_dim,
                };
                let fp32 = Fp32Modules::from_names(&m.fp32_modules).map_err(|name| {
                    ModelError::InvalidConfig(format!(
                        "fp32_modules: `{name}` is not an FS-CT module; use any of {:?}",
                        Fp32Modules::NAMES
                    ))
                })?;
                let head = FsctHead::new(root, dims, variant).with_fp32(fp32);
                (Head::Fsct(Box::new(head)), vec![c * h * w])
            }
            Method::CtxCosine | Method::CtxSoftmax => {
                let head = CtxHead::new(root, c, m.dim_attn, m.method == Method::CtxCosine);
                (Head::Ctx(head), vec![c, h, w])
            }
            Method::ProtoNet => (Head::ProtoNet, vec![c * h * w]),
        };
        Ok(Self {
            cfg: cfg.clone(),
            feature,
            head,
            feature_dim,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Per-image embedding shape: [d] for FS-CT and ProtoNet (e.g. [1600], [25088]),
    /// [C, H, W] for CTX (e.g. [64, 5, 5]).
    pub fn feature_dim(&self) -> Vec<i64> {
        self.feature_dim.clone()
    }

    /// Backbone on a flat batch (N, 3, S, S) → embeddings (N, feature_dim...). One call is one
    /// BatchNorm batch. `train` selects batch statistics (and updates the running ones).
    pub fn embed(&self, x: &Tensor, train: bool) -> Tensor {
        self.embed_t(x, BnMode::from_train(train))
    }

    /// [`Self::embed`] with an explicit BatchNorm mode ([`BnMode::TrainNoStats`] recomputes a
    /// chunk with batch statistics without counting it in the running statistics again).
    pub fn embed_t(&self, x: &Tensor, mode: BnMode) -> Tensor {
        let _span = tracing::trace_span!("embed", n = x.size()[0]).entered();
        self.maps_to_embedding(&self.feature.forward(x, mode))
    }

    /// The backbone, for activation checkpointing segment by segment (the trainer's job).
    pub fn feature(&self) -> &FeatureNet {
        &self.feature
    }

    /// Backbone output maps (N, C, H, W) → the embedding [`Self::embed`] returns.
    pub fn maps_to_embedding(&self, maps: &Tensor) -> Tensor {
        match self.head {
            Head::Ctx(_) => maps.shallow_clone(),
            _ => maps.flatten(1, -1),
        }
    }

    /// Head + loss from the embeddings of a whole episode in class-major order
    /// (n_way·(k_shot+n_query), feature_dim...). `emb` may be a leaf that requires grad.
    pub fn head(&self, emb: &Tensor) -> HeadOutput {
        self.head_part(emb, 0..self.cfg.n_way * self.cfg.n_query, true)
    }

    /// The head for the queries `queries` (flat class-major query indices, a sub-range of
    /// 0..n_way·n_query) of the episode `emb`. Prototypes use all support embeddings; `ce` is this
    /// part's share of the episode mean (Σ over the part / (n_way·n_query)), so the parts of a
    /// partition sum to the episode's cross-entropy. The VIC terms (which depend on the support
    /// only) are added when `include_vic`, which exactly one part should set.
    pub fn head_part(&self, emb: &Tensor, queries: Range<i64>, include_vic: bool) -> HeadOutput {
        let _span = tracing::trace_span!("head").entered();
        let (n, k, q) = (self.cfg.n_way, self.cfg.k_shot, self.cfg.n_query);
        let total = n * q;
        assert!(
            emb.size()[0] == n * (k + q) && emb.size()[1..] == self.feature_dim[..],
            "head: expected embeddings of shape [{}, {:?}] (n_way·(k_shot+n_query), feature_dim), got {:?}",
            n * (k + q),
            self.feature_dim,
            emb.size()
        );
        assert!(
            queries.start >= 0 && queries.start <= queries.end && queries.end <= total,
            "head_part: query range {queries:?} outside 0..{total}"
        );
        let mut shape = vec![n, k + q];
        shape.extend_from_slice(&self.feature_dim);
        let e = emb.reshape(&shape[..]);
        let support = e.narrow(1, 0, k); // (n, k, ...)
        let mut qshape = vec![n * q];
        qshape.extend_from_slice(&self.feature_dim);
        let query_all = e.narrow(1, k, q).reshape(&qshape[..]);
        let query = query_all.narrow(0, queries.start, queries.end - queries.start);

        let logits = match &self.head {
            Head::Fsct(h) => h.forward(&support, &query),
            Head::Ctx(h) => h.forward(&support, &query),
            Head::ProtoNet => protonet_logits(&support, &query),
        };
        let target = labels(n, q).to_device(logits.device()).narrow(
            0,
            queries.start,
            queries.end - queries.start,
        );
        let ce = if queries.end - queries.start == total {
            // log_softmax + nll_loss (mean) as torch's cross_entropy; tch's
            // `cross_entropy_for_logits` would compute in f32 whatever the input kind.
            logits
                .log_softmax(-1, logits.kind())
                .nll_loss_nd::<&Tensor>(&target, None, tch::Reduction::Mean, -100)
        } else if queries.start == queries.end {
            Tensor::zeros([], (logits.kind(), logits.device()))
        } else {
            let nll = logits
                .log_softmax(-1, logits.kind())
                .nll_loss_nd::<&Tensor>(&target, None, tch::Reduction::Sum, -100);
            nll / (total as f64)
        };
        let m = &self.cfg.model;
        let zero = || Tensor::zeros([], (emb.kind(), emb.device()));
        let flat_support = || support.reshape([n, k, -1]);
        let var_term = if include_vic && m.lambda_v > 0.0 {
            vic::variance_term(&flat_support())
        } else {
            zero()
        };
        let cov_term = if include_vic && m.lambda_c > 0.0 {
            vic::covariance_term(&flat_support().reshape([n * k, -1]))
        } else {
            zero()
        };
        let mut loss = if m.lambda_i == 1.0 {
            ce.shallow_clone()
        } else {
            &ce * m.lambda_i
        };
        if include_vic && m.lambda_v > 0.0 {
            loss += &var_term * m.lambda_v;
        }
        if include_vic && m.lambda_c > 0.0 {
            loss += &cov_term * m.lambda_c;
        }
        HeadOutput {
            logits,
            loss,
            ce,
            var_term,
            cov_term,
        }
    }

    /// Episode `x` (n_way, k_shot+n_query, 3, S, S) → head output; the backbone sees the whole
    /// episode as one BatchNorm batch (the official behaviour).
    pub fn forward(&self, x: &Tensor, train: bool) -> HeadOutput {
        let s = x.size();
        let flat = x.reshape([-1, s[s.len() - 3], s[s.len() - 2], s[s.len() - 1]]);
        self.head(&self.embed(&flat, train))
    }
}

/// Episode labels in class-major query order: [0]·n_query ++ [1]·n_query ++ … (Int64, CPU), as the
/// official `np.repeat(range(n_way), n_query)`.
pub fn labels(n_way: i64, n_query: i64) -> Tensor {
    Tensor::arange(n_way, (Kind::Int64, tch::Device::Cpu))
        .repeat_interleave_self_int(n_query, 0, None)
}

/// Number of correct top-1 predictions of `logits` (queries in class-major order of
/// `n_query` per class, starting at flat query index `first_query`).
pub fn correct(logits: &Tensor, n_query: i64, first_query: i64) -> i64 {
    crate::host_read::value(&correct_on_device(logits, n_query, first_query))
        .map_or(0, |v| v as i64)
}

/// [`correct`] left on the device (a 0-dim int64 tensor), to be read with other values at once.
pub fn correct_on_device(logits: &Tensor, n_query: i64, first_query: i64) -> Tensor {
    let nq = logits.size()[0];
    let target = Tensor::arange_start(
        first_query,
        first_query + nq,
        (Kind::Int64, logits.device()),
    )
    .floor_divide_scalar(n_query);
    logits.argmax(-1, false).eq_tensor(&target).sum(Kind::Int64)
}
