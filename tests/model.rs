//! Model tests that need no fixture: VIC formulas, finite-difference gradient checks of every
//! head, backbone output shapes, parameter counts (fsct-reference.md §2–3), checkpoint import
//! errors, BatchNorm modes, freezing. Small and CPU-only.

use fsct_dist::config::{Backbone, Method};
use fsct_dist::model::{
    freeze_backbone, labels, load_checked, load_official, vic, BnMode, FewShotModel, ModelConfig,
    ModelError, WeightsSource,
};
use tch::{nn, Device, Kind, Tensor};

fn f64_randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Double, Device::Cpu))
}

fn count(vs: &nn::VarStore, pred: impl Fn(&str) -> bool) -> i64 {
    let vars = vs.variables();
    vs.trainable_variables()
        .iter()
        .map(|t| {
            let name = vars
                .iter()
                .find(|(_, v)| v.is_set_to(t))
                .map(|(k, _)| k.clone())
                .unwrap();
            if pred(&name) {
                t.numel() as i64
            } else {
                0
            }
        })
        .sum()
}

#[test]
fn vic_gram_covariance_equals_naive_dxd() {
    tch::manual_seed(1);
    for (n, d) in [(6, 5), (10, 40), (25, 17), (3, 64)] {
        let z = f64_randn(&[n, d]) * 3.0 + 0.5;
        let a = vic::covariance_term(&z).double_value(&[]);
        let b = vic::covariance_term_naive(&z).double_value(&[]);
        assert!(
            (a - b).abs() <= 1e-12 * b.abs().max(1e-12),
            "N={n} d={d}: gram {a} vs naive {b}"
        );
        // Gradients agree too.
        let z1 = z.detach().set_requires_grad(true);
        let z2 = z.detach().set_requires_grad(true);
        vic::covariance_term(&z1).backward();
        vic::covariance_term_naive(&z2).backward();
        let diff = (z1.grad() - z2.grad()).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-12 * z2.grad().abs().max().double_value(&[]).max(1e-12),
            "N={n} d={d}: grad diff {diff}"
        );
    }
}

#[test]
fn vic_variance_term_is_zero_and_finite_at_one_shot() {
    let support = f64_randn(&[5, 1, 32]).set_requires_grad(true);
    let v = vic::variance_term(&support);
    assert_eq!(v.double_value(&[]), 0.0);
    // A model with λ_V > 0 at 1-shot gives a finite loss and finite gradients.
    let vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 3, 1, 2, 16);
    let m = &mut cfg.model;
    (m.heads, m.dim_head, m.mlp_dim, m.lambda_v, m.lambda_c) = (2, 8, 16, 1.0, 0.5);
    let model = FewShotModel::new(&vs.root(), &cfg).unwrap();
    let emb = Tensor::randn([9, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let out = model.head(&emb);
    out.loss.backward();
    assert!(out.loss.double_value(&[]).is_finite());
    assert_eq!(out.var_term.double_value(&[]), 0.0);
    assert!(bool::try_from(emb.grad().isfinite().all()).unwrap());
    // With 2 shots the unbiased form: ReLU(1 − √(var + 1e-4)) averaged.
    let s = Tensor::from_slice(&[0.0f64, 0.2, 3.0, 0.4]).view([1, 2, 2]);
    // Per dim over the 2 shots: var(0, 3) = 4.5, var(0.2, 0.4) = 0.02.
    let expect = ((1.0 - (4.5f64 + 1e-4).sqrt()).max(0.0) + (1.0 - (0.02f64 + 1e-4).sqrt())) / 2.0;
    assert!((vic::variance_term(&s).double_value(&[]) - expect).abs() < 1e-12);
}

/// Central finite differences of `f` at a few entries of `x` versus `grad`.
fn check_fd(what: &str, x: &Tensor, grad: &Tensor, f: &dyn Fn() -> f64, picks: &[i64]) {
    let flat = x.view([-1]);
    let g = grad.view([-1]);
    let h = 1e-6;
    let scale = g.abs().max().double_value(&[]).max(1e-8);
    for &i in picks {
        let i = i % flat.size()[0];
        let orig = flat.double_value(&[i]);
        let set = |v: f64| {
            let _ = tch::no_grad(|| flat.get(i).fill_(v));
        };
        set(orig + h);
        let fp = f();
        set(orig - h);
        let fm = f();
        set(orig);
        let fd = (fp - fm) / (2.0 * h);
        let ad = g.double_value(&[i]);
        // The absolute 1e-8 covers gradients that are exactly 0 (the softmax head's bias shifts
        // every class score alike): there the central difference holds only its rounding
        // noise, about ε·|f|/h ≈ 1e-10, while `scale` is 0 too.
        assert!(
            (fd - ad).abs() <= 1e-6 * scale + 1e-7 * ad.abs() + 1e-8,
            "{what}[{i}]: finite difference {fd} vs autograd {ad}"
        );
    }
}

fn fd_head(method: Method, image: i64, vic_on: bool, params: &[&str]) {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = ModelConfig::new(method, Backbone::Conv4, 2, 2, 2, image);
    let m = &mut cfg.model;
    (m.heads, m.dim_head, m.mlp_dim, m.dim_attn) = (2, 4, 8, 6);
    if vic_on {
        (m.lambda_v, m.lambda_c) = (0.5, 0.3);
    }
    let model = FewShotModel::new(&vs.root(), &cfg).unwrap();
    vs.double();
    let mut shape = vec![8];
    shape.extend(model.feature_dim());
    let emb = f64_randn(&shape).set_requires_grad(true);
    let loss = || model.head(&emb).loss;
    let out = model.head(&emb);
    if vic_on {
        assert!(out.var_term.double_value(&[]) > 0.0 && out.cov_term.double_value(&[]) > 0.0);
    }
    out.loss.backward();
    let f = || tch::no_grad(|| loss().double_value(&[]));
    let picks: Vec<i64> = (0..24).map(|i| i * 37 + 3).collect();
    check_fd(&format!("{method:?} d/demb"), &emb, &emb.grad(), &f, &picks);
    let vars = vs.variables();
    for p in params {
        let v = vars.get(*p).unwrap_or_else(|| panic!("no variable {p}"));
        check_fd(
            &format!("{method:?} d/d{p}"),
            v,
            &v.grad(),
            &f,
            &[0, 1, 5, 11, 29],
        );
    }
}

#[test]
fn finite_differences_fsct_cosine_with_vic() {
    fd_head(
        Method::FsctCosine,
        16,
        true,
        &[
            "proto_weight",
            "ATTN.input_linear.1.weight",
            "ATTN.output_linear.bias",
            "FFN.1.weight",
            "linear.1.weight",
            "linear.2.L.weight_g",
            "linear.2.L.weight_v",
        ],
    );
}

#[test]
fn finite_differences_fsct_softmax() {
    fd_head(
        Method::FsctSoftmax,
        16,
        false,
        &[
            "proto_weight",
            "ATTN.input_linear.0.weight",
            "ATTN.output_linear.weight",
            "FFN.3.bias",
            "linear.2.weight",
            "linear.2.bias",
        ],
    );
}

#[test]
fn finite_differences_ctx_cosine() {
    fd_head(Method::CtxCosine, 32, false, &["linear_attn.weight"]);
}

#[test]
fn finite_differences_ctx_softmax() {
    fd_head(Method::CtxSoftmax, 32, true, &["linear_attn.weight"]);
}

#[test]
fn finite_differences_protonet() {
    fd_head(Method::ProtoNet, 16, false, &[]);
}

fn embed_shape(backbone: Backbone, method: Method, size: i64) -> Vec<i64> {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = FewShotModel::new(
        &vs.root(),
        &ModelConfig::new(method, backbone, 5, 5, 16, size),
    )
    .unwrap();
    let x = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
    let y = tch::no_grad(|| model.embed(&x, true));
    assert_eq!(
        y.size()[1..],
        model.feature_dim()[..],
        "{backbone:?} @{size}: feature_dim() disagrees with embed"
    );
    y.size()
}

#[test]
fn backbone_output_shapes() {
    let fsct = Method::FsctCosine;
    assert_eq!(embed_shape(Backbone::Conv4, fsct, 84), [2, 1600]);
    assert_eq!(embed_shape(Backbone::Conv4, fsct, 64), [2, 1024]);
    assert_eq!(embed_shape(Backbone::Conv6, fsct, 84), [2, 1600]);
    assert_eq!(embed_shape(Backbone::Conv6, fsct, 64), [2, 1024]);
    assert_eq!(embed_shape(Backbone::Conv4Snp, fsct, 84), [2, 23104]);
    assert_eq!(
        embed_shape(Backbone::Conv4, Method::CtxCosine, 84),
        [2, 64, 5, 5]
    );
    assert_eq!(
        embed_shape(Backbone::Conv4, Method::ProtoNet, 64),
        [2, 1024]
    );
    for b in [
        Backbone::FetiResNet10,
        Backbone::FetiResNet12,
        Backbone::FetiResNet18,
        Backbone::FetiResNet34,
    ] {
        assert_eq!(embed_shape(b, fsct, 84), [2, 25088], "{b:?}");
        assert_eq!(embed_shape(b, fsct, 112), [2, 25088], "{b:?}");
    }
    assert_eq!(
        embed_shape(Backbone::FetiResNet18, Method::CtxSoftmax, 112),
        [2, 512, 7, 7]
    );
    // The official names without --FETI are the torchvision layout (official default FETI=0).
    for b in [
        Backbone::TvResNet18,
        Backbone::TvResNet34,
        Backbone::ResNet18,
        Backbone::ResNet34,
    ] {
        assert_eq!(embed_shape(b, fsct, 112), [2, 8192], "{b:?}");
        assert_eq!(embed_shape(b, fsct, 224), [2, 25088], "{b:?}");
    }
}

#[test]
fn image_too_small_is_a_clear_error() {
    let vs = nn::VarStore::new(Device::Cpu);
    let err = FewShotModel::new(
        &vs.root(),
        &ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 5, 5, 16, 8),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::ImageTooSmall { .. }), "{err}");
    assert!(err.to_string().contains("too small"), "{err}");
}

#[test]
fn parameter_counts_match_the_official_model() {
    let vs = nn::VarStore::new(Device::Cpu);
    FewShotModel::new(
        &vs.root(),
        &ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 5, 5, 16, 84),
    )
    .unwrap();
    assert_eq!(
        count(&vs, |n| !n.starts_with("feature.")),
        3_392_666,
        "FS-CT head, d = 1600"
    );
    assert_eq!(
        count(&vs, |n| n.starts_with("feature.")),
        113_088,
        "Conv4 backbone"
    );
    // BatchNorm running statistics are variables but not trainable.
    assert_eq!(
        vs.variables()
            .keys()
            .filter(|k| k.contains("running_"))
            .count(),
        8
    );
    let vs = nn::VarStore::new(Device::Cpu);
    FewShotModel::new(
        &vs.root(),
        &ModelConfig::new(Method::CtxCosine, Backbone::TvResNet18, 5, 5, 16, 224),
    )
    .unwrap();
    assert_eq!(
        count(&vs, |n| !n.starts_with("feature.")),
        65_536,
        "CTX head on ResNet"
    );
}

#[test]
fn labels_are_class_major() {
    assert_eq!(
        Vec::<i64>::try_from(labels(3, 2)).unwrap(),
        [0, 0, 1, 1, 2, 2]
    );
}

fn small_fsct(vs: &nn::VarStore, mlp: i64) -> FewShotModel {
    let mut cfg = ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 2, 2, 2, 16);
    (cfg.model.heads, cfg.model.dim_head, cfg.model.mlp_dim) = (2, 4, mlp);
    FewShotModel::new(&vs.root(), &cfg).unwrap()
}

#[test]
fn load_official_round_trips_and_names_bad_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ckpt.safetensors");
    let vs_a = nn::VarStore::new(Device::Cpu);
    let a = small_fsct(&vs_a, 8);
    vs_a.save(&file).unwrap();

    // Same architecture: loads and reproduces the outputs.
    let mut vs_b = nn::VarStore::new(Device::Cpu);
    let b = small_fsct(&vs_b, 8);
    let report = load_official(&mut vs_b, &file).unwrap();
    assert_eq!(report.loaded.len(), vs_b.variables().len());
    let emb = Tensor::randn([8, 64], (Kind::Float, Device::Cpu));
    assert!(a
        .head(&emb)
        .logits
        .allclose(&b.head(&emb).logits, 0.0, 0.0, false));

    // Another FFN width: a shape error that names the tensor.
    let mut vs_c = nn::VarStore::new(Device::Cpu);
    small_fsct(&vs_c, 16);
    let err = load_official(&mut vs_c, &file).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::WeightsMismatch { .. }), "{msg}");
    assert!(msg.contains("FFN.1.") && msg.contains("[16"), "{msg}");

    // Another method: missing tensors are named.
    let mut vs_d = nn::VarStore::new(Device::Cpu);
    let mut cfg = ModelConfig::new(Method::FsctSoftmax, Backbone::Conv4, 2, 2, 2, 16);
    (cfg.model.heads, cfg.model.dim_head, cfg.model.mlp_dim) = (2, 4, 8);
    FewShotModel::new(&vs_d.root(), &cfg).unwrap();
    let msg = load_official(&mut vs_d, &file).unwrap_err().to_string();
    assert!(msg.contains("linear.2"), "{msg}");
}

#[test]
fn load_official_accepts_the_conv_block_duplicates() {
    // Only the `feature.trunk.i.trunk.{0,1}` spelling of the ConvBlock in the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dup.safetensors");
    let vs_a = nn::VarStore::new(Device::Cpu);
    small_fsct(&vs_a, 8);
    let renamed: Vec<(String, Tensor)> = vs_a
        .variables()
        .into_iter()
        .map(|(k, v)| {
            (
                k.replace(".C.", ".trunk.0.").replace(".BN.", ".trunk.1."),
                v,
            )
        })
        .collect();
    Tensor::write_safetensors(&renamed, &file).unwrap();
    let mut vs_b = nn::VarStore::new(Device::Cpu);
    small_fsct(&vs_b, 8);
    load_official(&mut vs_b, &file).unwrap();
    let (va, vb) = (vs_a.variables(), vs_b.variables());
    for (k, v) in &va {
        assert!(v.equal(&vb[k]), "{k}");
    }
}

#[test]
fn pretrained_load_maps_torchvision_names_and_skips_fc() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resnet18.safetensors");
    let cfg = ModelConfig::new(Method::FsctCosine, Backbone::TvResNet18, 2, 1, 1, 64);
    let vs_a = nn::VarStore::new(Device::Cpu);
    FewShotModel::new(&vs_a.root(), &cfg).unwrap();
    let mut tv: Vec<(String, Tensor)> = vs_a
        .variables()
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("feature.").map(|n| (n.to_string(), v)))
        .collect();
    tv.push((
        "fc.weight".into(),
        Tensor::zeros([1000, 512], (Kind::Float, Device::Cpu)),
    ));
    tv.push((
        "bn1.num_batches_tracked".into(),
        Tensor::zeros([], (Kind::Int64, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tv, &file).unwrap();
    let mut vs_b = nn::VarStore::new(Device::Cpu);
    FewShotModel::new(&vs_b.root(), &cfg).unwrap();
    let report = load_checked(
        &mut vs_b,
        &file,
        WeightsSource::Pretrained(Backbone::TvResNet18),
    )
    .unwrap();
    assert_eq!(report.skipped.len(), 2);
    assert!(vs_a.variables()["feature.layer4.1.bn2.running_var"]
        .equal(&vs_b.variables()["feature.layer4.1.bn2.running_var"]));
    assert!(vs_a.variables()["feature.layer2.0.downsample.0.weight"]
        .equal(&vs_b.variables()["feature.layer2.0.downsample.0.weight"]));
}

#[test]
fn freeze_backbone_stops_backbone_gradients() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = small_fsct(&vs, 8);
    assert_eq!(freeze_backbone(&vs), 16);
    let x = Tensor::randn([2, 4, 3, 16, 16], (Kind::Float, Device::Cpu));
    model.forward(&x, true).loss.backward();
    let vars = vs.variables();
    assert!(!vars["feature.trunk.0.C.weight"].grad().defined());
    assert!(vars["ATTN.input_linear.1.weight"].grad().defined());
}

#[test]
fn bn_modes_update_running_stats_once() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = small_fsct(&vs, 8);
    let rm = vs.variables()["feature.trunk.0.BN.running_mean"].shallow_clone();
    let x = Tensor::randn([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    let a = tch::no_grad(|| model.embed_t(&x, BnMode::TrainNoStats));
    assert_eq!(
        rm.abs().sum(Kind::Float).double_value(&[]),
        0.0,
        "TrainNoStats must not touch the running stats"
    );
    let b = tch::no_grad(|| model.embed_t(&x, BnMode::Train));
    assert!(a.allclose(&b, 1e-6, 1e-6, false));
    assert!(rm.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let c = tch::no_grad(|| model.embed(&x, false));
    assert!(
        !c.allclose(&b, 1e-3, 1e-3, false),
        "eval mode uses the running statistics"
    );
}

#[test]
fn head_parts_sum_to_the_episode() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = ModelConfig::new(Method::FsctCosine, Backbone::Conv4, 3, 2, 3, 16);
    let m = &mut cfg.model;
    (m.heads, m.dim_head, m.mlp_dim, m.lambda_c) = (2, 4, 8, 0.2);
    let model = FewShotModel::new(&vs.root(), &cfg).unwrap();
    let emb = Tensor::randn([15, 64], (Kind::Float, Device::Cpu));
    let full = model.head(&emb);
    let p1 = model.head_part(&emb, 0..4, true);
    let p2 = model.head_part(&emb, 4..9, false);
    let ce = (&p1.ce + &p2.ce).double_value(&[]);
    assert!((ce - full.ce.double_value(&[])).abs() < 1e-6);
    let loss = (&p1.loss + &p2.loss).double_value(&[]);
    assert!((loss - full.loss.double_value(&[])).abs() < 1e-6);
    assert!(Tensor::cat(&[p1.logits, p2.logits], 0).allclose(&full.logits, 1e-6, 1e-6, false));
}

#[test]
fn run_weights_are_checked_for_extra_missing_and_misshapen_tensors() {
    // tch's VarStore::load, used before for best/last.safetensors, ignored tensors the model
    // lacks and broadcast shapes it could.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("best.safetensors");
    let vs_a = nn::VarStore::new(Device::Cpu);
    small_fsct(&vs_a, 8);
    let mut named: Vec<(String, Tensor)> = vs_a.variables().into_iter().collect();
    named.push((
        "feature.trunk.9.C.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&named, &file).unwrap();
    let mut vs_b = nn::VarStore::new(Device::Cpu);
    small_fsct(&vs_b, 8);
    let before = vs_b.variables()["feature.trunk.0.C.weight"].copy();
    let msg = load_checked(&mut vs_b, &file, WeightsSource::Run)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("best.safetensors")
            && msg.contains("1 tensor(s) the model does not have (feature.trunk.9.C.weight)")
            && msg.contains("drop the flags"),
        "{msg}"
    );
    assert!(
        vs_b.variables()["feature.trunk.0.C.weight"].equal(&before),
        "a refused file leaves the model unchanged"
    );

    // Every tensor missing: a few names, then a count.
    let named: Vec<(String, Tensor)> = vec![(
        "other".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    )];
    Tensor::write_safetensors(&named, &file).unwrap();
    let msg = load_checked(&mut vs_b, &file, WeightsSource::Run)
        .unwrap_err()
        .to_string();
    let n = vs_b.variables().len();
    assert!(
        msg.contains(&format!("{n} tensor(s) the model needs are missing"))
            && msg.contains(&format!("and {} more", n - 4)),
        "{msg}"
    );
}

/// A torchvision-named state_dict of `backbone` (as a FETI checkpoint when `prefix` is
/// `module.resnet.`), from a model built here.
fn backbone_file(backbone: Backbone, prefix: &str, file: &std::path::Path) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = ModelConfig::new(Method::ProtoNet, backbone, 2, 1, 1, 32);
    FewShotModel::new(&vs.root(), &cfg).unwrap();
    let named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("feature.")
                .map(|n| (format!("{prefix}{n}"), v))
        })
        .collect();
    Tensor::write_safetensors(&named, file).unwrap();
    vs
}

fn load_pretrained(backbone: Backbone, file: &std::path::Path) -> Result<String, String> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = ModelConfig::new(Method::ProtoNet, backbone, 2, 1, 1, 32);
    FewShotModel::new(&vs.root(), &cfg).unwrap();
    load_checked(&mut vs, file, WeightsSource::Pretrained(backbone))
        .map(|r| r.warning.unwrap_or_default())
        .map_err(|e| e.to_string())
}

#[test]
fn pretrained_weights_are_checked_against_the_layout_and_depth() {
    let dir = tempfile::tempdir().unwrap();
    let tv18 = dir.path().join("resnet18.safetensors");
    backbone_file(Backbone::TvResNet18, "", &tv18);
    let feti18 = dir.path().join("feti18.safetensors");
    backbone_file(Backbone::FetiResNet18, "module.resnet.", &feti18);

    // A torchvision file into the FETI layout: the stem says which flag to use.
    let msg = load_pretrained(Backbone::FetiResNet18, &tv18).unwrap_err();
    assert!(
        msg.contains("feature.conv1.weight [64, 3, 7, 7] in the file, [64, 3, 5, 5] in the model")
            && msg.contains("--FETI 0"),
        "{msg}"
    );
    let msg = load_pretrained(Backbone::TvResNet18, &feti18).unwrap_err();
    assert!(msg.contains("--FETI 1"), "{msg}");
    // torchvision's resnet18 for a ResNet34: refused, naming the depths.
    let msg = load_pretrained(Backbone::TvResNet34, &tv18).unwrap_err();
    assert!(
        msg.contains("missing") && msg.contains("(ResNet18)") && msg.contains("(ResNet34)"),
        "{msg}"
    );
    // The FETI checkpoint (a ResNet18) into a FETI ResNet34 or ResNet12: as the official
    // strict=False load, whole blocks are left out or ignored, and the run says which.
    let w = load_pretrained(Backbone::FetiResNet34, &feti18).unwrap();
    assert!(
        w.contains("layer1.2") && w.contains("keep their random initial weights"),
        "{w}"
    );
    let w = load_pretrained(Backbone::FetiResNet12, &feti18).unwrap();
    assert!(w.contains("layer2.1") && w.contains("are not used"), "{w}");
    assert_eq!(
        load_pretrained(Backbone::FetiResNet18, &feti18).unwrap(),
        ""
    );

    // A Conv backbone has no pretrained weights.
    let mut vs = nn::VarStore::new(Device::Cpu);
    small_fsct(&vs, 8);
    let err = load_checked(&mut vs, &tv18, WeightsSource::Pretrained(Backbone::Conv4)).unwrap_err();
    assert!(err.to_string().contains("applies to ResNets only"), "{err}");
}

#[test]
fn an_official_feti0_checkpoint_without_backbone_loads_over_pretrained_weights() {
    // The official torchvision backbone is not an nn.Module, so its checkpoints hold the head
    // only; with the backbone from --pretrained that is a complete start.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("official.safetensors");
    let mut cfg = ModelConfig::new(Method::FsctCosine, Backbone::TvResNet18, 2, 1, 1, 32);
    (cfg.model.heads, cfg.model.dim_head, cfg.model.mlp_dim) = (2, 4, 8);
    let vs_a = nn::VarStore::new(Device::Cpu);
    FewShotModel::new(&vs_a.root(), &cfg).unwrap();
    let head: Vec<(String, Tensor)> = vs_a
        .variables()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("feature."))
        .collect();
    Tensor::write_safetensors(&head, &file).unwrap();
    let mut vs_b = nn::VarStore::new(Device::Cpu);
    FewShotModel::new(&vs_b.root(), &cfg).unwrap();
    let alone = WeightsSource::Official {
        backbone_loaded: false,
    };
    let msg = load_checked(&mut vs_b, &file, alone)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("holds no backbone") && msg.contains("--pretrained FILE too"),
        "{msg}"
    );
    let over = WeightsSource::Official {
        backbone_loaded: true,
    };
    let report = load_checked(&mut vs_b, &file, over).unwrap();
    assert_eq!(report.loaded.len(), head.len());
    for (k, v) in &head {
        assert!(v.equal(&vs_b.variables()[k]), "{k}");
    }
}
