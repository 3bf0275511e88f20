//! CPU training-step time: fsct-dist vs PyTorch eager, side by side in one run, same threads.
//!
//! Each case is one FSCT_cosine training step (forward, cross-entropy, backward, AdamW) on a
//! random 5-way 5-shot 16-query episode: Conv4 at 84 px and the official (torchvision-layout,
//! FETI=0) ResNet34 at 112 px. Ours runs in this process; the comparators run in a Python with
//! the full torch 2.11.0 wheel: bench/train_step_pytorch.py (the model re-written like the
//! official code) always, and bench/train_step_official.py (the official classes themselves)
//! when FSCT_OFFICIAL_REPO names a checkout of vinuni-vishc/Few-Shot-Cosine-Transformer. Ours
//! and the comparators alternate, twice, so all see the same machine load; medians over all
//! measured steps. Ours runs twice per round, channels-last (as `train`) and NCHW, so the
//! lever's gain is measured side by side too.
//!
//! Run: `FSCT_OFFICIAL_REPO=/path/to/checkout cargo bench --bench train_step`. Python:
//! FSCT_TORCH_PYTHON, default `.venv-torch/bin/python` (make it with `python3 -m venv .venv-torch
//! && .venv-torch/bin/pip install torch==2.11.0 torchvision einops tqdm numpy`). FSCT_BENCH_QUICK=1
//! runs one short round; FSCT_BENCH_ROUNDS=N runs N rounds (default 2). Writes
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

/// Seconds of one step's parts: backbone forward, the rest of the forward (head, loss;
/// zero_grad), backward, optimizer (CPU ops are synchronous, so each is its own time).
type Phases = [f64; 4];
const PHASE_NAMES: [&str; 4] = ["backbone_forward", "head_forward", "backward", "optimizer"];

/// Our step; `channels_last` as `train --channels-last on` (the default) or off (NCHW, the
/// layout of the official code). Per measured step: its seconds and its phases.
fn ours(case: &Case, steps: usize, channels_last: bool) -> (Vec<f64>, Vec<Phases>) {
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
    if channels_last {
        fsct_dist::model::use_channels_last(&vs);
    }
    let mut opt = nn::adamw(0.9, 0.999, 1e-5)
        .build(&vs, 1e-3)
        .expect("optimizer");
    let x = Tensor::randn(
        [WAY, SHOT + QUERY, 3, case.size, case.size],
        (Kind::Float, Device::Cpu),
    );
    let flat = x.flatten(0, 1);
    let (mut times, mut phases) = (Vec::new(), Vec::new());
    for i in 0..steps + 1 {
        let t0 = Instant::now();
        opt.zero_grad();
        let emb = model.embed(&flat, true);
        let t1 = Instant::now();
        let out = model.head(&emb);
        let t2 = Instant::now();
        out.loss.backward();
        let t3 = Instant::now();
        opt.step();
        let _ = out.loss.double_value(&[]);
        let t4 = Instant::now();
        if i >= 1 {
            // One warm-up step, as in the Python script.
            times.push((t4 - t0).as_secs_f64());
            let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
            phases.push([s(t0, t1), s(t1, t2), s(t2, t3), s(t3, t4)]);
        }
    }
    (times, phases)
}

/// One Python comparator run: `script` with `args`, printing `{"torch": .., "step_s": [..]}` and
/// optionally `"phases": [{name: seconds}]`.
fn python_steps(
    python: &str,
    script: &str,
    args: &[String],
) -> Result<(Vec<f64>, Vec<Phases>, String), String> {
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
    let phases = v["phases"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| PHASE_NAMES.map(|n| p[n].as_f64().unwrap_or(f64::NAN)))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        times,
        phases,
        v["torch"].as_str().unwrap_or("?").to_string(),
    ))
}

/// The comparators: the re-implementation always, the official code when a checkout is given.
fn comparators(
    case: &Case,
    threads: i32,
    official: Option<&str>,
) -> Vec<(&'static str, String, Vec<String>)> {
    let shape = [
        case.name.to_string(),
        case.size.to_string(),
        WAY.to_string(),
        SHOT.to_string(),
        QUERY.to_string(),
        case.steps.to_string(),
        threads.to_string(),
    ];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bench");
    let mut out = vec![(
        "PyTorch re-impl.",
        format!("{dir}/train_step_pytorch.py"),
        shape.to_vec(),
    )];
    if let Some(repo) = official {
        let mut args = vec![repo.to_string()];
        args.extend(shape);
        out.push((
            "official FS-CT",
            format!("{dir}/train_step_official.py"),
            args,
        ));
    }
    out
}

fn median_or_nan(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        fsct_dist::bench::measure::median(v.iter().copied())
    }
}

fn main() {
    let quick = std::env::var("FSCT_BENCH_QUICK").is_ok();
    let python = std::env::var("FSCT_TORCH_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-torch/bin/python").to_string()
    });
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
    tch::set_num_threads(threads);
    let official = std::env::var("FSCT_OFFICIAL_REPO").ok();
    let cases = [
        Case {
            backbone: Backbone::Conv4,
            name: "Conv4",
            size: 84,
            steps: if quick { 2 } else { 5 },
        },
        Case {
            backbone: Backbone::TvResNet34,
            name: "TvResNet34",
            size: 112,
            steps: if quick { 1 } else { 3 },
        },
    ];
    // More rounds when the machine is noisy: each round alternates all sides once.
    let rounds = match std::env::var("FSCT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        Some(r) if r > 0 => r,
        _ if quick => 1,
        _ => 2,
    };
    let mut rows = Vec::new();
    let mut lever_rows = Vec::new();
    let mut phase_rows = Vec::new();
    let mut torch_version = String::from("?");
    for case in &cases {
        let sides = comparators(case, threads, official.as_deref());
        let (mut ours_s, mut ours_nchw) = (Vec::new(), Vec::new());
        let (mut ours_p, mut nchw_p) = (Vec::new(), Vec::new());
        let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
        let mut theirs_p: Vec<Vec<Phases>> = vec![Vec::new(); sides.len()];
        for _ in 0..rounds {
            // Alternate ours and each comparator within a round: all see the same machine load.
            let (t, p) = ours(case, case.steps, true);
            ours_s.extend(t);
            ours_p.extend(p);
            let (t, p) = ours(case, case.steps, false);
            ours_nchw.extend(t);
            nchw_p.extend(p);
            for (((label, script, args), times), phases) in
                sides.iter().zip(theirs.iter_mut()).zip(theirs_p.iter_mut())
            {
                match python_steps(&python, script, args) {
                    Ok((t, p, v)) => {
                        times.extend(t);
                        phases.extend(p);
                        torch_version = v;
                    }
                    Err(e) => eprintln!(
                        "{label} side failed ({e}); see the header of bench/train_step.rs"
                    ),
                }
            }
        }
        let ma = median_or_nan(&ours_s);
        let mn = median_or_nan(&ours_nchw);
        let mut breakdown = vec![
            ("fsct-dist (channels-last)", &ours_p),
            ("fsct-dist NCHW", &nchw_p),
        ];
        breakdown.extend(
            sides
                .iter()
                .zip(&theirs_p)
                .filter(|(_, p)| !p.is_empty())
                .map(|((label, _, _), p)| (*label, p)),
        );
        for (label, p) in breakdown {
            let m: Vec<f64> = (0..4)
                .map(|k| median_or_nan(&p.iter().map(|s| s[k]).collect::<Vec<_>>()))
                .collect();
            phase_rows.push(format!(
                "| {} {} px | {label} | {:.3} | {:.3} | {:.3} | {:.3} |",
                case.name, case.size, m[0], m[1], m[2], m[3]
            ));
        }
        lever_rows.push(format!(
            "| {} {} px | channels-last (`--channels-last on`, the default) | {mn:.3} | {ma:.3} | {:.2} |",
            case.name,
            case.size,
            mn / ma
        ));
        for ((label, _, _), times) in sides.iter().zip(&theirs) {
            let mb = median_or_nan(times);
            let row = format!(
                "| {} {} px, 5-way 5-shot 16-query | {label} | {:.3} | {:.3} | {:.2} | {} / {} |",
                case.name,
                case.size,
                ma,
                mb,
                mb / ma,
                ours_s.len(),
                times.len()
            );
            println!("{row}");
            rows.push(row);
        }
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
         Command: `{}cargo bench --bench train_step`\n\
         Machine: {cpu}, {threads} threads for both (libtorch intra-op), date {date}; PyTorch {torch_version}.\n\
         One step = forward + cross-entropy + backward + AdamW on a random episode (FSCT_cosine, official head).\n\
         Medians over {rounds} alternating rounds (one warm-up step each). Ratio > 1: fsct-dist is faster.\n\n\
         | case | compared with | fsct-dist s/step | PyTorch s/step | ratio PyTorch/ours | steps measured (ours / PyTorch) |\n\
         |---|---|---|---|---|---|\n{}\n\n\
         Levers, fsct-dist against itself in the same rounds:\n\n\
         | case | lever | without s/step | with s/step | gain |\n|---|---|---|---|---|\n{}\n\n\
         Where the time goes (medians per part of a step, seconds; the official backbone forward is \
         timed where its head calls it):\n\n\
         | case | code | backbone forward | head forward + loss | backward | optimizer |\n|---|---|---|---|---|---|\n{}\n",
        [
            (official.is_some(), "FSCT_OFFICIAL_REPO=<checkout> ".to_string()),
            (quick, "FSCT_BENCH_QUICK=1 ".to_string()),
            (rounds != 2, format!("FSCT_BENCH_ROUNDS={rounds} ")),
        ]
        .iter()
        .filter_map(|(on, env)| on.then_some(env.as_str()))
        .collect::<String>(),
        rows.join("\n"),
        lever_rows.join("\n"),
        phase_rows.join("\n")
    );
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/results");
    let _ = std::fs::create_dir_all(dir);
    let path = format!("{dir}/train_step_{}.md", date.replace('-', ""));
    std::fs::write(&path, &table).expect("writing the result");
    println!("\n{table}\nwritten to {path}");
}
