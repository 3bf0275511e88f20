//! Parity with the official FS-CT code: every `*.safetensors` fixture in tests/fixtures (or the
//! folder named by `FSCT_FIXTURES`) is one official training step (train-mode forward, loss,
//! backward, BatchNorm running statistics, one AdamW step), produced by running the official
//! `methods/transformer.py` / `methods/CTX.py` on CPU in fp32; see ../shared/fixtures/README.md.
//!
//! Tolerances (fixture README): scores and loss ≤ 1e-5 relative; gradients and AdamW results
//! ≤ 1e-4, each tensor's error being ‖a − b‖ / max(‖b‖, 1e-3·G) with G the norm of all expected
//! gradients together (a conv bias before BatchNorm has a true gradient of 0: only noise).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fsct_dist::config::{Backbone, Method};
use fsct_dist::model::{load_official, read_safetensors_metadata, FewShotModel, ModelConfig};
use tch::{nn, Device, Kind, Tensor};

const TOL_FWD: f64 = 1e-5;
const TOL_GRAD: f64 = 1e-4;
const TOL_ADAMW: f64 = 1e-4;
const TOL_BUFFER: f64 = 1e-5;
/// Rounding noise around a true 0 stays below NOISE·G, the floor of the error measure (the
/// full-size fixture's first-layer conv bias: 5.6e-5·G on both sides; a real bias gradient is
/// orders of magnitude larger).
const NOISE: f64 = 1e-3;

/// The official ConvBlock's conv bias (`feature.trunk.i.C.bias`), always followed by BatchNorm.
fn is_conv_bias_before_bn(name: &str) -> bool {
    name.starts_with("feature.trunk.") && name.ends_with(".C.bias")
}

fn fixture_dir() -> PathBuf {
    match std::env::var_os("FSCT_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

fn norm(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

fn err(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    norm(&(&a - &b)) / norm(&b).max(floor).max(f64::MIN_POSITIVE)
}

/// One row of the per-tensor report.
struct Row {
    category: &'static str,
    name: String,
    err: f64,
    tol: f64,
}

fn meta_i64(meta: &std::collections::BTreeMap<String, String>, key: &str) -> Option<i64> {
    meta.get(key).map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("metadata {key}={v:?} is not an integer"))
    })
}

fn config_from_metadata(path: &Path) -> ModelConfig {
    let meta = read_safetensors_metadata(path).expect("read metadata");
    let s = |k: &str| -> String {
        meta.get(k)
            .unwrap_or_else(|| panic!("{path:?}: metadata lacks {k:?}"))
            .clone()
    };
    let method: Method =
        serde_json::from_value(serde_json::Value::String(s("method"))).expect("method");
    let backbone: Backbone =
        serde_json::from_value(serde_json::Value::String(s("backbone"))).expect("backbone");
    // Fixtures made before the explicit names recorded the FETI ResNets as "ResNet12" etc.
    let feti = meta
        .get("official_backbone")
        .is_some_and(|b| b.contains("FETI=1"));
    let backbone = if feti {
        backbone.with_feti(true).expect("a FETI ResNet")
    } else {
        backbone
    };
    let req =
        |k: &str| meta_i64(&meta, k).unwrap_or_else(|| panic!("{path:?}: metadata lacks {k:?}"));
    let mut cfg = ModelConfig::new(
        method,
        backbone,
        req("n_way"),
        req("k_shot"),
        req("n_query"),
        req("image_size"),
    );
    if let Some(v) = meta_i64(&meta, "depth") {
        cfg.depth = v;
    }
    if let Some(v) = meta_i64(&meta, "heads") {
        cfg.heads = v;
    }
    if let Some(v) = meta_i64(&meta, "dim_head") {
        cfg.dim_head = v;
    }
    if let Some(v) = meta_i64(&meta, "mlp_dim") {
        cfg.mlp_dim = v;
    }
    if let Some(v) = meta_i64(&meta, "dim_attn") {
        cfg.dim_attn = v;
    }
    cfg
}

fn build(path: &Path, cfg: &ModelConfig) -> (nn::VarStore, FewShotModel) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = FewShotModel::new(&vs.root(), cfg).expect("build model");
    load_official(&mut vs, path).unwrap_or_else(|e| panic!("load_official: {e}"));
    (vs, model)
}

/// Runs one fixture; returns the per-tensor rows.
fn check_fixture(path: &Path) -> Vec<Row> {
    let cfg = config_from_metadata(path);
    let file: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .expect("read fixture")
        .into_iter()
        .collect();
    let get = |k: &str| {
        file.get(k)
            .unwrap_or_else(|| panic!("{path:?} lacks {k}"))
            .shallow_clone()
    };
    let mut rows = Vec::new();

    let (vs, model) = build(path, &cfg);
    let vars = vs.variables();
    let trainable = vs.trainable_variables().len();
    let n_grads = file
        .keys()
        .filter(|k| k.starts_with("expected.grad."))
        .count();
    assert_eq!(
        trainable, n_grads,
        "{path:?}: trainable variables ({trainable}) ≠ expected gradients ({n_grads})"
    );

    // Forward (train mode: batch statistics, running statistics updated).
    let out = model.forward(&get("input.x"), true);
    rows.push(Row {
        category: "scores",
        name: "scores".into(),
        err: err(&out.logits, &get("expected.scores"), 0.0),
        tol: TOL_FWD,
    });
    rows.push(Row {
        category: "loss",
        name: "loss".into(),
        err: err(&out.loss.reshape([1]), &get("expected.loss"), 0.0),
        tol: TOL_FWD,
    });

    // Backward.
    out.loss.backward();
    let expected_grads: Vec<(String, Tensor)> = file
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("expected.grad.")
                .map(|n| (n.to_string(), v.shallow_clone()))
        })
        .collect();
    let g_all = expected_grads
        .iter()
        .map(|(_, g)| norm(g).powi(2))
        .sum::<f64>()
        .sqrt();
    // A conv bias followed by train-mode BatchNorm (the ConvBlock's `C.bias`) has a true gradient
    // of 0 (the batch mean removes it): both sides hold only rounding noise of the BatchNorm
    // backward, whose value depends on the kernel's reduction order. There we check that both
    // gradients are noise (≤ NOISE·G), not that the two noises agree.
    let mut noise_only = std::collections::HashSet::new();
    for (name, g) in &expected_grads {
        let var = vars
            .get(name)
            .unwrap_or_else(|| panic!("model has no variable {name}"));
        let ours = var.grad();
        assert!(ours.defined(), "{name}: no gradient");
        if is_conv_bias_before_bn(name) {
            noise_only.insert(name.clone());
            let e = norm(&ours).max(norm(g)) / g_all;
            rows.push(Row {
                category: "grad(zero: noise)",
                name: name.clone(),
                err: e,
                tol: NOISE,
            });
        } else {
            rows.push(Row {
                category: "grad",
                name: name.clone(),
                err: err(&ours, g, 1e-3 * g_all),
                tol: TOL_GRAD,
            });
        }
    }

    // BatchNorm running statistics after the forward.
    for (k, v) in &file {
        if let Some(name) = k.strip_prefix("expected.buffer.") {
            if name.ends_with("num_batches_tracked") {
                continue; // not kept: unused with a fixed momentum
            }
            let var = vars
                .get(name)
                .unwrap_or_else(|| panic!("model has no buffer {name}"));
            rows.push(Row {
                category: "buffer",
                name: name.to_string(),
                err: err(var, v, 0.0),
                tol: TOL_BUFFER,
            });
        }
    }

    // One AdamW step (libtorch's AdamW through tch) with our gradients. Error floor 1e-3·P, P the
    // norm of all expected parameters: Adam's first step is ±lr wherever |g| ≫ eps, so a tensor
    // initialised at 0 (a LayerNorm bias) is only ±lr after it and a plain relative error would
    // measure the conditioning of g/|g| at tiny g rather than our implementation.
    let before: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.detach().copy()))
        .collect();
    let p_all = file
        .iter()
        .filter(|(k, _)| k.starts_with("expected.adamw."))
        .map(|(_, v)| norm(v).powi(2))
        .sum::<f64>()
        .sqrt();
    let mut opt = adamw(&vs);
    opt.step();
    for (k, v) in &file {
        if let Some(name) = k.strip_prefix("expected.adamw.") {
            let var = vars
                .get(name)
                .unwrap_or_else(|| panic!("model has no variable {name}"));
            if noise_only.contains(name) {
                // The step is ±lr by the sign of rounding noise on both sides: check it is an
                // AdamW step, |p' − p·(1 − lr·wd)| ≤ lr, reported in units of lr.
                let decayed = &before[name] * (1.0 - 1e-3 * 1e-5);
                let step = (var - decayed).abs().max().double_value(&[]) / 1e-3;
                rows.push(Row {
                    category: "adamw(zero grad)",
                    name: name.to_string(),
                    err: step,
                    tol: 1.0 + 1e-4,
                });
            } else {
                rows.push(Row {
                    category: "adamw",
                    name: name.to_string(),
                    err: err(var, v, 1e-3 * p_all),
                    tol: TOL_ADAMW,
                });
            }
        }
    }

    // The optimizer alone: the official gradients fed to our AdamW must give the official step.
    let (vs2, _model2) = build(path, &cfg);
    let vars2 = vs2.variables();
    let surrogate = expected_grads
        .iter()
        .map(|(name, g)| (&vars2[name] * g).sum(Kind::Float))
        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    surrogate.backward(); // d/dp Σ p·g = g exactly
    let mut opt2 = adamw(&vs2);
    opt2.step();
    for (k, v) in &file {
        if let Some(name) = k.strip_prefix("expected.adamw.") {
            rows.push(Row {
                category: "adamw(official grads)",
                name: name.to_string(),
                err: err(&vars2[name], v, 1e-3 * p_all),
                tol: TOL_ADAMW,
            });
        }
    }
    rows
}

/// The trainer's AdamW with the official settings (lr 1e-3, weight decay 1e-5).
fn adamw(vs: &nn::VarStore) -> fsct_dist::train::optim::Optimizer {
    let c = fsct_dist::config::RunConfig::default().train;
    assert_eq!((c.learning_rate, c.weight_decay), (1e-3, 1e-5));
    fsct_dist::train::optim::build(&c, vs).expect("adamw")
}

#[test]
fn parity_official_fixtures() {
    let dir = fixture_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read fixture folder {dir:?}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.safetensors fixture in {dir:?}");
    let mut failed = Vec::new();
    for f in &files {
        let rows = check_fixture(f);
        let mut cats: Vec<&str> = rows.iter().map(|r| r.category).collect();
        cats.sort();
        cats.dedup();
        println!("{}:", f.display());
        for c in cats {
            let worst = rows
                .iter()
                .filter(|r| r.category == c)
                .max_by(|a, b| a.err.total_cmp(&b.err))
                .unwrap();
            println!(
                "  {c:<22} max error {:.3e} ({}), tolerance {:.0e}",
                worst.err, worst.name, worst.tol
            );
        }
        let bad: Vec<&Row> = rows
            .iter()
            .filter(|r| r.err.is_nan() || r.err > r.tol)
            .collect();
        if !bad.is_empty() {
            println!("  per-tensor errors:");
            for r in &rows {
                let flag = if r.err <= r.tol { "" } else { "  FAIL" };
                println!(
                    "    {:<22} {:<45} {:.3e} (tol {:.0e}){flag}",
                    r.category, r.name, r.err, r.tol
                );
            }
            failed.push(format!(
                "{} ({} tensors over tolerance)",
                f.display(),
                bad.len()
            ));
        }
    }
    assert!(failed.is_empty(), "parity failures: {failed:#?}");
}
