//! Per-module precision under autocast (`fp32_modules`). In its own test binary: it draws from
//! libtorch's global generator, which the seeded tests of tests/amp.rs must have to themselves.

use fsct_dist::config::{Backbone, Method};
use fsct_dist::ffi::autocast;
use fsct_dist::model::{FewShotModel, ModelConfig};
use tch::{nn, Device, Kind, Tensor};

/// Per-module precision: under bf16 autocast the output head normally yields bf16 logits; with
/// `linear` (and the other head modules) listed in `fp32_modules` it computes in fp32, and the
/// fp32 run is closer to a plain fp32 forward than the bf16 one.
#[test]
fn fp32_modules_compute_in_float_under_autocast() {
    let build = |fp32: &[&str]| {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut cfg = ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 3, 2, 2, 20);
        (cfg.model.heads, cfg.model.dim_head, cfg.model.mlp_dim) = (2, 8, 16);
        cfg.model.fp32_modules = fp32.iter().map(|s| s.to_string()).collect();
        let model = FewShotModel::new(&vs.root(), &cfg).unwrap();
        (vs, model)
    };
    let (vs_a, plain) = build(&[]);
    let (mut vs_b, kept) = build(&["ATTN", "FFN", "linear"]);
    vs_b.copy(&vs_a).unwrap();
    let emb = Tensor::randn([12, 64], (Kind::Float, Device::Cpu));
    let reference = tch::no_grad(|| plain.head(&emb).logits);
    let (low, high) = {
        let _bf16 = autocast(Device::Cpu, Kind::BFloat16).unwrap();
        tch::no_grad(|| (plain.head(&emb).logits, kept.head(&emb).logits))
    };
    assert_eq!(low.kind(), Kind::BFloat16);
    assert_eq!(high.kind(), Kind::Float);
    let err = |t: &Tensor| {
        (t.to_kind(Kind::Float) - &reference)
            .abs()
            .max()
            .double_value(&[])
    };
    assert!(
        err(&high) < 1e-5,
        "all head modules in fp32 reproduce the fp32 logits: {}",
        err(&high)
    );
    assert!(
        err(&low) > err(&high),
        "bf16 {} vs fp32 modules {}",
        err(&low),
        err(&high)
    );

    let vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 3, 2, 2, 20);
    cfg.model.fp32_modules = vec!["attention".into()];
    let err = FewShotModel::new(&vs.root(), &cfg).unwrap_err().to_string();
    assert!(err.contains("attention") && err.contains("ATTN"), "{err}");
}
