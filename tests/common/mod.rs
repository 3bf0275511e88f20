//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use tch::{nn, Kind, Tensor};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fsct-dist");

/// A small built-in dataset under `dir` (6 base, 5 val, 5 novel classes of 12 images, 24 px).
pub fn synth_dataset(dir: &Path) -> PathBuf {
    let ds = dir.join("ds");
    let out = Command::new(BIN)
        .args([
            "data",
            "synth",
            "--classes",
            "6,5,5",
            "--images-per-class",
            "12",
        ])
        .args(["--size", "24", "--out"])
        .arg(&ds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ds
}

/// `fsct-dist train` arguments of a tiny run on `ds` into `out`: 3-way 2-shot 3-query (15
/// images), 20 px, one epoch of 4 episodes, 4 validation and 6 test episodes, one thread.
/// `extra` comes last, so its flags override these.
pub fn train_args(ds: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let fixed = "train --image-size 20 --n-way 3 --k-shot 2 --n-query 3 --epochs 1 \
                 --episodes-per-epoch 4 --val-episodes 4 --test-iter 6 --workers 1 --threads 1 \
                 --log-format text";
    let mut v: Vec<String> = fixed.split_whitespace().map(str::to_owned).collect();
    v.extend(["--dataset".into(), ds.to_string_lossy().into_owned()]);
    v.extend(["--output".into(), out.to_string_lossy().into_owned()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Asserts two safetensors files hold the same tensors, bit for bit.
pub fn assert_bit_identical(a: &Path, b: &Path) {
    let sorted = |p: &Path| {
        let mut v = Tensor::read_safetensors(p).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (ta, tb) = (sorted(a), sorted(b));
    assert_eq!(ta.len(), tb.len(), "{} vs {}", a.display(), b.display());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(xa.equal(xb), "{na} differs");
    }
}

/// The worst per-tensor gradient error between two twin stores, with its name:
/// ‖a − b‖ / max(‖b‖, 1e-3·G), G the norm of all of `b`'s gradients (architecture.md: a conv
/// bias before BatchNorm has a true gradient of 0, so a plain relative error would be noise).
/// A parameter with a gradient in `b` but none in `a` counts as infinitely wrong.
pub fn worst_grad_error(a: &nn::VarStore, b: &nn::VarStore) -> (f64, String) {
    let (va, vb) = (a.variables(), b.variables());
    let total = vb
        .values()
        .filter(|t| t.grad().defined())
        .map(|t| {
            t.grad()
                .pow_tensor_scalar(2)
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        .sqrt();
    let mut worst = (0.0, String::new());
    for (name, tb) in &vb {
        let gb = tb.grad();
        if !gb.defined() {
            continue;
        }
        let ga = va[name].grad();
        let err = if ga.defined() {
            (&ga - &gb).norm().double_value(&[]) / gb.norm().double_value(&[]).max(1e-3 * total)
        } else {
            f64::INFINITY
        };
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    worst
}

/// Waits until `path` exists (a run got that far), failing the test after `limit` with `what`.
pub fn wait_for(path: &Path, limit: Duration, what: &str) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < limit,
            "{what}: {} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` at most `limit` (killing it and failing past that); its output and the time
/// it took.
pub fn wait_with_limit(mut child: Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pids of the fsct-dist processes that are descendants of `parent`.
pub fn rank_pids(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut frontier = vec![parent];
    while let Some(p) = frontier.pop() {
        let Ok(out) = Command::new("pgrep").args(["-P", &p.to_string()]).output() else {
            break;
        };
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "fsct-dist" {
                found.push(pid);
            }
            frontier.push(pid);
        }
    }
    found
}
