//! `--pretrained` proven against the code that defines the weights: a torchvision ResNet-18
//! `state_dict` and the official FETI ResNet-18 `state_dict` (in the FETI checkpoint's naming)
//! load into `TvResNet18` / `FetiResNet18`, and our forward then equals torchvision's / the
//! official `ResNet`'s forward on the same input, in eval and in train mode.
//!
//! The fixtures (tests/fixtures/pretrained/{tv,feti}-resnet18-64.safetensors, made by
//! tests/fixtures/pretrained/make_fixtures.py with torch 2.11 + torchvision 0.26 and the official
//! backbone.py) hold the input, the expected features and the state_dict's names, shapes and
//! dtypes as torchvision / the official module produced them — not the 44.7 MB of weights. The
//! weights are a counter hash (splitmix64) turned into exact float32 values by integer and
//! correctly rounded float32 arithmetic, so this file rebuilds the very tensors the generator
//! loaded into torchvision, writes them under the file's names (with torchvision's `fc.*` and
//! `num_batches_tracked`, which the load must skip), and loads that file as a user's would be.
//! The per-tensor sums stored by the generator check the rebuild itself.

use std::path::{Path, PathBuf};

use fsct_dist::config::{Backbone, Method, Pretrained, RunConfig};
use fsct_dist::model::{
    load_checked, read_safetensors_metadata, BnMode, FewShotModel, ModelConfig, WeightsSource,
};
use tch::{nn, Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pretrained")
        .join(name)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator's `fill`: exact float32 values in [-1, 1), scaled by tensor kind.
fn fill(seed: u64, index: u64, name: &str, shape: &[i64]) -> Vec<f32> {
    let n: i64 = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap();
    let scale_conv = (shape.len() >= 2).then(|| (3.0f64 / (n / shape[0]) as f64).sqrt() as f32);
    (0..n as u64)
        .map(|j| {
            let k = (splitmix64((seed << 48) | (index << 32) | j) >> 40) as i64;
            let x = (k - (1 << 23)) as f32 / 8_388_608.0;
            match (scale_conv, leaf) {
                (Some(s), _) => x * s,
                (None, "weight") => 1.0 + x * 0.25,
                (None, "running_var") => 1.0 + x * 0.5,
                _ => x * 0.25,
            }
        })
        .collect()
}

/// Rebuilds the fixture's state_dict into `out`; returns the tensor count.
fn rebuild_state_dict(meta: &std::collections::BTreeMap<String, String>, out: &Path) -> usize {
    let entries: Vec<(String, Vec<i64>, String)> =
        serde_json::from_str(&meta["state_dict"]).unwrap();
    let sums: Vec<f64> = serde_json::from_str(&meta["sums"]).unwrap();
    let seed: u64 = meta["seed"].parse().unwrap();
    let mut named = Vec::new();
    for (i, ((name, shape, dtype), sum)) in entries.iter().zip(&sums).enumerate() {
        let t = match dtype.as_str() {
            "float32" => {
                let v = fill(seed, i as u64, name, shape);
                let got: f64 = v.iter().map(|&x| f64::from(x)).sum();
                assert!(
                    (got - sum).abs() <= 1e-9 * (1.0 + sum.abs()),
                    "rebuilt {name}: sum {got}, the generator's {sum}"
                );
                Tensor::from_slice(&v).reshape(&shape[..])
            }
            "int64" => Tensor::zeros(&shape[..], (Kind::Int64, Device::Cpu)),
            other => panic!("{name}: dtype {other}"),
        };
        named.push((name.clone(), t));
    }
    Tensor::write_safetensors(&named, out).unwrap();
    named.len()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Loads the rebuilt file through `--pretrained`'s load and compares the features.
fn check(case: &str, backbone: Backbone, layout: &str, prefix: &str) {
    let path = fixture(&format!("{case}.safetensors"));
    let meta = read_safetensors_metadata(&path).unwrap();
    assert_eq!(meta["layout"], layout);
    let data: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights.safetensors");
    let count = rebuild_state_dict(&meta, &weights);
    let names: Vec<(String, Tensor)> = Tensor::read_safetensors(&weights).unwrap();
    assert!(names.iter().all(|(n, _)| n.starts_with(prefix)));

    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = ModelConfig::new(Method::ProtoNet, backbone, 2, 1, 1, 64);
    let model = FewShotModel::new(&vs.root(), &cfg).unwrap();
    let report = load_checked(&mut vs, &weights, WeightsSource::Pretrained(backbone)).unwrap();
    assert_eq!(report.warning, None);
    assert_eq!(report.loaded.len(), vs.variables().len(), "every variable");
    assert_eq!(report.loaded.len() + report.skipped.len(), count);

    let x = &data["input"];
    for (mode, key) in [
        (BnMode::Eval, "expected.eval"),
        (BnMode::Train, "expected.train"),
    ] {
        let ours = tch::no_grad(|| model.feature().forward(x, mode));
        let want = &data[key];
        let err = max_abs_diff(&ours, want);
        let scale = want.abs().max().double_value(&[]);
        eprintln!(
            "{case} {key}: max |ours - reference| = {err:.3e} (max |reference| = {scale:.2})"
        );
        // Bit-identical on the AVX2 CPU the fixtures were made on; other CPUs' kernels (AVX-512)
        // round differently, by up to 1.2e-5 of the features' scale measured (it varies with how
        // the threads split the work). A tensor loaded into the wrong place is off by the scale
        // itself.
        assert!(
            err <= 5e-5 * scale,
            "{case} {key}: {err:.3e} (scale {scale:.2})"
        );
    }
}

#[test]
fn torchvision_resnet18_weights_give_torchvisions_features() {
    check("tv-resnet18-64", Backbone::TvResNet18, "torchvision", "");
}

#[test]
fn feti_checkpoint_weights_give_the_official_resnets_features() {
    check(
        "feti-resnet18-64",
        Backbone::FetiResNet18,
        "FETI",
        "module.resnet.",
    );
}

/// The run's own path: `backbone = "ResNet18"` (no --FETI: torchvision's layout) with
/// `pretrained = FILE` builds the model with the file's weights.
#[test]
fn a_run_with_pretrained_starts_from_the_file() {
    let path = fixture("tv-resnet18-64.safetensors");
    let meta = read_safetensors_metadata(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("resnet18.safetensors");
    rebuild_state_dict(&meta, &weights);
    let mut c = RunConfig::default();
    c.model.method = Method::ProtoNet;
    c.model.backbone = Backbone::ResNet18;
    c.model.pretrained = Some(Pretrained::File(weights.clone()));
    c.data.image_size = 64;
    let r = c.resolve().unwrap();
    assert_eq!(r.config.model.backbone, Backbone::TvResNet18);
    let built = fsct_dist::train::build(&r).unwrap();
    let file: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .collect();
    for (name, v) in built.vs.variables() {
        let bare = name.strip_prefix("feature.").unwrap();
        assert!(v.equal(&file[bare]), "{name}");
    }
}
