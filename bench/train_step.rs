//! CPU training-step time: fsct-dist vs PyTorch eager, side by side in one run, same threads.
//!
//! Each case is one FSCT_cosine training step (forward, cross-entropy, backward, AdamW) on a
//! random 5-way 5-shot 16-query episode: Conv4 at 84 px and the FETI ResNet34 at 112 px. Ours
//! runs in this process; PyTorch runs bench/train_step_pytorch.py (the same model written like
//! the official code) in a Python with the full torch 2.11.0 wheel. The two alternate, twice, so
//! both see the same machine load; medians over all measured steps.
//!
//! Run: `cargo bench --bench train_step`. Python: FSCT_TORCH_PYTHON, default
//! `.venv-torch/bin/python` (make it with `python3 -m venv .venv-torch && .venv-torch/bin/pip
//! install torch==2.11.0 numpy`). FSCT_BENCH_QUICK=1 runs one short round. Writes
//! bench/results/train_step_<date>.md.

use std::process::Command;
use std::time::Instant;

use fsct_dist::config::{Backbone, Method};
use fsct_dist::model::{FewShotModel, ModelConfig};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

struct Case {
    backbone: Backbone,
    name: &'static str,
    size: i64,
    steps: usize,
}

const WAY: i64 = 5;
const SHOT: i64 = 5;
const QUERY: i64 = 16;

fn ours(case: &Case, steps: usize) -> Vec<f64> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = ModelConfig::new(
        Method::FsctCosine,
        case.backbone,
        WAY,
        SHOT,
        QUERY,
        case.size,
    );
    let model = FewShotModel::new(&vs.root(), &cfg).expect("model");
    let mut opt = nn::adamw(0.9, 0.999, 1e-5)
        .build(&vs, 1e-3)
        .expect("optimizer");
    let x = Tensor::randn(
        [WAY, SHOT + QUERY, 3, case.size, case.size],
        (Kind::Float, Device::Cpu),
    );
    let mut times = Vec::new();
    for i in 0..steps + 1 {
        let t0 = Instant::now();
        opt.zero_grad();
        let out = model.forward(&x, true);
        out.loss.backward();
        opt.step();
        let _ = out.loss.double_value(&[]);
        if i >= 1 {
            times.push(t0.elapsed().as_secs_f64()); // one warm-up step, as in the Python script
        }
    }
    times
}

fn pytorch(
    python: &str,
    case: &Case,
    steps: usize,
    threads: i32,
) -> Result<(Vec<f64>, String), String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/train_step_pytorch.py");
    let args = [
        case.name.to_string(),
        case.size.to_string(),
        WAY.to_string(),
        SHOT.to_string(),
        QUERY.to_string(),
        steps.to_string(),
        threads.to_string(),
    ];
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let times = v["step_s"]
        .as_array()
        .ok_or("no step_s")?
        .iter()
        .filter_map(|t| t.as_f64())
        .collect();
    Ok((times, v["torch"].as_str().unwrap_or("?").to_string()))
}

fn main() {
    let quick = std::env::var("FSCT_BENCH_QUICK").is_ok();
    let python = std::env::var("FSCT_TORCH_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-torch/bin/python").to_string()
    });
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
    tch::set_num_threads(threads);
    let cases = [
        Case {
            backbone: Backbone::Conv4,
            name: "Conv4",
            size: 84,
            steps: if quick { 2 } else { 5 },
        },
        Case {
            backbone: Backbone::FetiResNet34,
            name: "ResNet34",
            size: 112,
            steps: if quick { 1 } else { 2 },
        },
    ];
    let rounds = if quick { 1 } else { 2 };
    let mut rows = Vec::new();
    let mut torch_version = String::from("?");
    for case in &cases {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.extend(ours(case, case.steps));
            match pytorch(&python, case, case.steps, threads) {
                Ok((t, v)) => {
                    b.extend(t);
                    torch_version = v;
                }
                Err(e) => {
                    eprintln!("PyTorch side failed ({e}); see the header of bench/train_step.rs")
                }
            }
        }
        let (ma, mb) = (
            fsct_dist::bench::measure::median(a.iter().copied()),
            if b.is_empty() {
                f64::NAN
            } else {
                fsct_dist::bench::measure::median(b.iter().copied())
            },
        );
        let row = format!(
            "| {} {} px, 5-way 5-shot 16-query | {:.3} | {:.3} | {:.2} | {} / {} |",
            case.name,
            case.size,
            ma,
            mb,
            mb / ma,
            a.len(),
            b.len()
        );
        println!("{row}");
        rows.push(row);
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let table = format!(
        "# CPU training step: fsct-dist vs PyTorch eager\n\n\
         Command: `cargo bench --bench train_step`{}\n\
         Machine: {cpu}, {threads} threads for both (libtorch intra-op), date {date}; PyTorch {torch_version}.\n\
         One step = forward + cross-entropy + backward + AdamW on a random episode (FSCT_cosine, official head).\n\
         Medians over {rounds} alternating rounds (one warm-up step each). Ratio > 1: fsct-dist is faster.\n\n\
         | case | fsct-dist s/step | PyTorch s/step | ratio PyTorch/ours | steps measured (ours / PyTorch) |\n\
         |---|---|---|---|---|\n{}\n",
        if quick { " (FSCT_BENCH_QUICK=1)" } else { "" },
        rows.join("\n")
    );
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/results");
    let _ = std::fs::create_dir_all(dir);
    let path = format!("{dir}/train_step_{}.md", date.replace('-', ""));
    std::fs::write(&path, &table).expect("writing the result");
    println!("\n{table}\nwritten to {path}");
}
