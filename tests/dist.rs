//! Multi-rank training under a real `mpirun` (launch/mpirun.sh: root and oversubscription
//! handled), checked against single-process runs of the same objective.
//!
//! Gradients are compared per tensor as architecture.md prescribes:
//! ‖a − b‖ / max(‖b‖, 1e-3·‖all grads‖) ≤ 1e-5. Conv biases that feed a BatchNorm have a true
//! gradient of zero; in fp32 both sides hold rounding noise of about 1e-6 there that no
//! ordering of the sums reproduces, so a tensor whose reference is below 1e-5·‖all grads‖ must
//! be below it on the other side too (noise, not signal) instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

mod common;
use common::{
    assert_bit_identical, rank_pids, synth_dataset as dataset, train_args, wait_with_limit, BIN,
};

fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("launch/mpirun.sh")
}

fn run_single(args: &[String]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "single process failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mpirun(n: usize, args: &[String]) -> Output {
    let out = Command::new("bash")
        .arg(launcher())
        .args(["-n", &n.to_string()])
        .args(args)
        .env("FSCT", BIN)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("bash runs launch/mpirun.sh");
    assert!(
        out.status.success(),
        "mpirun -n {n} failed (is OpenMPI installed? launch/setup.sh installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn norm(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

/// The worst of `error(a_t, b_t, ‖all of b‖)` over the tensors of `b`, with its name.
fn worst_by(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    error: impl Fn(&Tensor, &Tensor, f64) -> f64,
) -> (f64, String) {
    assert_eq!(a.len(), b.len(), "same tensors");
    let total = b.values().map(|t| norm(t).powi(2)).sum::<f64>().sqrt();
    let mut worst = (0.0, String::new());
    for (name, rb) in b {
        let e = error(&a[name], rb, total);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    worst
}

/// Worst per-tensor error of `a` against the reference `b` (see the module doc).
fn worst_error(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f64, String) {
    worst_by(a, b, |ra, rb, total| {
        assert!(total > 0.0);
        if norm(rb) < 1e-5 * total {
            norm(ra) / (1e-5 * total) * 1e-5 // both noise: ≤ 1e-5 when ‖a‖ < 1e-5·total
        } else {
            norm(&(ra - rb)) / norm(rb).max(1e-3 * total)
        }
    })
}

fn test_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("Test Acc"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn images_mode_gradients_equal_one_process_with_the_same_batchnorm_groups() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    // (ranks, micro-steps per rank): every row has W·M = G BatchNorm groups, and is compared
    // with one process running G micro-steps.
    for (w, m) in [(2, 1), (3, 1), (4, 1), (2, 2)] {
        let g = w * m;
        let single = dir.path().join(format!("single{g}.safetensors"));
        if !single.exists() {
            run_single(&train_args(
                &ds,
                &dir.path().join(format!("s{g}")),
                &[
                    "--max-steps",
                    "1",
                    "--gradient-accumulation-steps",
                    &g.to_string(),
                    "--dump-grads",
                    single.to_str().unwrap(),
                    "--dump-params",
                    dir.path()
                        .join(format!("single{g}.params.safetensors"))
                        .to_str()
                        .unwrap(),
                ],
            ));
        }
        let multi = dir.path().join(format!("w{w}m{m}.safetensors"));
        let params = dir.path().join(format!("w{w}m{m}.params.safetensors"));
        mpirun(
            w,
            &train_args(
                &ds,
                &dir.path().join(format!("w{w}m{m}")),
                &[
                    "--max-steps",
                    "1",
                    "--gradient-accumulation-steps",
                    &m.to_string(),
                    "--dump-grads",
                    multi.to_str().unwrap(),
                    "--dump-params",
                    params.to_str().unwrap(),
                ],
            ),
        );
        let (err, name) = worst_error(&read(&multi), &read(&single));
        assert!(
            err <= 1e-5,
            "W={w} M={m}: gradient of {name} differs by {err:.2e}"
        );
        // Running statistics after the step: the same as one process updating group by group.
        let (a, b) = (
            read(&params),
            read(&dir.path().join(format!("single{g}.params.safetensors"))),
        );
        for (name, t) in b.iter().filter(|(n, _)| n.contains("running_")) {
            let e = norm(&(&a[name] - t)) / norm(t);
            assert!(e < 1e-5, "W={w} M={m}: {name} differs by {e:.2e}");
        }
    }
}

#[test]
fn episodes_mode_equals_the_mean_of_the_single_process_episode_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    // One process stepping every 2 episodes averages episodes 0 and 1: what 2 ranks with one
    // episode each do.
    let single = dir.path().join("single.safetensors");
    run_single(&train_args(
        &ds,
        &dir.path().join("s"),
        &[
            "--max-steps",
            "1",
            "--episodes-per-step",
            "2",
            "--dump-grads",
            single.to_str().unwrap(),
        ],
    ));
    let multi = dir.path().join("multi.safetensors");
    mpirun(
        2,
        &train_args(
            &ds,
            &dir.path().join("m"),
            &[
                "--max-steps",
                "1",
                "--shard",
                "episodes",
                "--dump-grads",
                multi.to_str().unwrap(),
            ],
        ),
    );
    let (err, name) = worst_error(&read(&multi), &read(&single));
    assert!(err <= 1e-5, "gradient of {name} differs by {err:.2e}");
}

/// How many gradient groups rank 0 says it all-reduced during the first step's backward.
fn overlapped_groups(out: &Output) -> usize {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .find(|l| l.contains("rank{r=0}") && l.contains("gradient all-reduce: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no 'gradient all-reduce:' line of rank 0 in the log:\n{err}"));
    let after = line.split("gradient all-reduce: ").nth(1).unwrap();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_overlapped_all_reduce_benchmark_checks_its_sums_on_every_rank() {
    // `bench allreduce --overlap` runs the overlapped all-reduce beside a compute and fails if
    // any sum is wrong (the GPU check runs the same over NCCL's side stream); here over MPI's
    // background thread, W = 2.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("allreduce.md");
    let args: Vec<String> = [
        "bench",
        "allreduce",
        "--overlap",
        "--min-bytes",
        "4096",
        "--max-bytes",
        "4194304",
        "--iters",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    mpirun(2, &args);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "4 KiB to 4 MiB in steps of 4");
    for r in rows {
        let o = &r["overlap"];
        let hidden = o["hidden"].as_f64().expect("an overlap column per size");
        assert!((0.0..=1.0).contains(&hidden), "{r}");
        assert!(o["overlapped_seconds"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn overlapped_gradients_equal_the_all_reduce_after_the_backward() {
    // --overlap on launches the head's and each backbone segment's all-reduce during the
    // backward; the reduced gradients must be those of --overlap off (one all-reduce after the
    // backward), per tensor to 1e-6, in both shard modes, with and without micro-steps. The
    // other multi-rank tests (exactness against one process, the bit-identical resume) run
    // with the default, overlap on.
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    for (w, m, shard) in [
        (2, 1, "images"),
        (2, 2, "images"),
        (4, 1, "images"),
        (4, 2, "images"),
        (2, 1, "episodes"),
        (2, 2, "episodes"),
        (4, 1, "episodes"),
        (4, 2, "episodes"),
    ] {
        let run = |overlap: &str| {
            let grads = dir
                .path()
                .join(format!("{shard}-w{w}m{m}-{overlap}.safetensors"));
            let out = mpirun(
                w,
                &train_args(
                    &ds,
                    &dir.path().join(format!("{shard}-w{w}m{m}-{overlap}")),
                    &[
                        "--max-steps",
                        "1",
                        "--episodes-per-epoch",
                        "8",
                        "--shard",
                        shard,
                        "--gradient-accumulation-steps",
                        &m.to_string(),
                        "--overlap",
                        overlap,
                        "--dump-grads",
                        grads.to_str().unwrap(),
                    ],
                ),
            );
            (read(&grads), overlapped_groups(&out))
        };
        let ((on, early), (off, none)) = (run("on"), run("off"));
        // Conv4: the head and 4 segments, all launched before the backward ended.
        assert_eq!(early, 5, "{shard} W={w} M={m}: groups overlapped");
        assert_eq!(
            none, 0,
            "{shard} W={w} M={m}: nothing overlapped with --overlap off"
        );
        let (err, name) = worst_error(&on, &off);
        assert!(
            err <= 1e-6,
            "{shard} W={w} M={m}: gradient of {name} differs by {err:.2e} with overlap"
        );
    }
}

#[test]
fn parameters_are_identical_on_every_rank_after_three_steps() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    for shard in ["images", "episodes"] {
        let params = dir.path().join(format!("{shard}.safetensors"));
        mpirun(
            3,
            &train_args(
                &ds,
                &dir.path().join(shard),
                &[
                    "--max-steps",
                    "3",
                    "--episodes-per-epoch",
                    "9",
                    "--shard",
                    shard,
                    "--dump-params",
                    params.to_str().unwrap(),
                ],
            ),
        );
        let p0 = read(&params);
        for rank in [1, 2] {
            let pr = read(&fsct_dist::train::rank_path(&params, rank));
            for (name, t) in &p0 {
                assert!(t.equal(&pr[name]), "{shard}: {name} differs on rank {rank}");
            }
        }
    }
}

#[test]
fn distributed_test_accuracy_equals_single_process() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let run = dir.path().join("run");
    let trained = mpirun(2, &train_args(&ds, &run, &["--max-steps", "2"]));
    let test_args: Vec<String> = [
        "test",
        "--run",
        run.to_str().unwrap(),
        "--test-iter",
        "7",
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let one = run_single(&test_args);
    let three = mpirun(3, &test_args);
    assert!(
        !test_line(&one).is_empty(),
        "{}",
        String::from_utf8_lossy(&one.stdout)
    );
    assert_eq!(
        test_line(&one),
        test_line(&three),
        "7 episodes over 3 ranks (3, 2, 2)"
    );
    assert_eq!(
        String::from_utf8_lossy(&three.stdout)
            .matches("Test Acc")
            .count(),
        1,
        "only rank 0 prints"
    );
    assert!(test_line(&trained).contains("6 Test Acc"));
}

/// Runs `mpirun -n 2` training long enough to be interrupted; returns the child and the time
/// it started.
fn long_run(dir: &Path, ds: &Path, extra: &[&str]) -> (std::process::Child, Instant) {
    let args = train_args(
        ds,
        &dir.join("long"),
        &[&["--episodes-per-epoch", "100000"], extra].concat(),
    );
    let child = Command::new("bash")
        .arg(launcher())
        .args(["-n", "2"])
        .args(&args)
        .env("FSCT", BIN)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, Instant::now())
}

#[test]
fn a_killed_rank_ends_the_whole_job_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let (child, _) = long_run(dir.path(), &ds, &[]);
    let pid = child.id();
    // Wait until both ranks are training.
    let start = Instant::now();
    let ranks = loop {
        let r = rank_pids(pid);
        if r.len() == 2 || start.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ranks.len(), 2, "two ranks started");
    std::thread::sleep(Duration::from_secs(2));
    Command::new("kill")
        .args(["-9", &ranks[1].to_string()])
        .status()
        .unwrap();
    let (out, took) = wait_with_limit(child, Duration::from_secs(30));
    assert!(!out.status.success(), "a job that lost a rank must fail");
    assert!(took < Duration::from_secs(15), "ended after {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("signal") || err.contains("killed") || err.contains("exited"),
        "{err}"
    );
}

#[test]
fn an_error_on_one_rank_ends_the_job_with_that_ranks_message() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    // Truncate every image of one base class: the rank whose slice holds it fails to decode.
    let class = std::fs::read_dir(ds.join("images/base"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .min()
        .unwrap();
    for img in std::fs::read_dir(&class).unwrap().flatten() {
        std::fs::write(img.path(), b"\xff\xd8\xff").unwrap();
    }
    let (child, _) = long_run(dir.path(), &ds, &["--workers", "0"]);
    let (out, took) = wait_with_limit(child, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error on rank"), "{err}");
    assert!(
        err.contains(&*class.file_name().unwrap().to_string_lossy()),
        "names the file: {err}"
    );
    assert!(took < Duration::from_secs(45), "ended after {took:?}");
}

#[test]
fn a_multi_rank_run_stopped_by_sigterm_and_resumed_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let whole = dir.path().join("whole.safetensors");
    let long = [
        "--max-steps",
        "30",
        "--epochs",
        "10",
        "--checkpoint-every",
        "1",
    ];
    mpirun(
        2,
        &train_args(
            &ds,
            &dir.path().join("a"),
            &[&long[..], &["--dump-params", whole.to_str().unwrap()]].concat(),
        ),
    );

    let b = dir.path().join("b");
    let child = Command::new("bash")
        .arg(launcher())
        .args(["-n", "2"])
        .args(train_args(&ds, &b, &long))
        .env("FSCT", BIN)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !b.join("checkpoints/step-00000002").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // As SLURM does on preemption: every rank gets SIGTERM.
    for pid in rank_pids(child.id()) {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
    }
    let (out, _) = wait_with_limit(child, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "exit code 3 (preempted): {err}");

    let resumed = dir.path().join("resumed.safetensors");
    mpirun(
        2,
        &[
            "train".to_string(),
            "--resume".into(),
            b.to_string_lossy().into_owned(),
            "--dump-params".into(),
            resumed.to_string_lossy().into_owned(),
        ],
    );
    assert_bit_identical(&resumed, &whole);
    assert_bit_identical(
        &dir.path().join("resumed.rank1.safetensors"),
        &dir.path().join("whole.rank1.safetensors"),
    );
}

#[test]
fn an_out_of_memory_on_some_ranks_makes_every_rank_retry_with_more_micro_steps() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    // 2 ranks × 8 or 7 images of 4800 bytes: above 20000 bytes fails, so both ranks go to
    // M = 2 (chunks of 4 and 3-4 images) together, as if started there.
    let dynamic = dir.path().join("dynamic.safetensors");
    let out = mpirun(
        2,
        &train_args(
            &ds,
            &dir.path().join("d"),
            &[
                "--max-steps",
                "2",
                "--gradient-accumulation-steps",
                "dynamic",
                "--simulate-oom-above-bytes",
                "20000",
                "--dump-params",
                dynamic.to_str().unwrap(),
            ],
        ),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("rank{r=0}: out of memory with 1 micro-steps"),
        "{log}"
    );
    assert!(
        log.contains("rank{r=1}: out of memory with 1 micro-steps"),
        "{log}"
    );
    let fixed = dir.path().join("fixed.safetensors");
    mpirun(
        2,
        &train_args(
            &ds,
            &dir.path().join("f"),
            &[
                "--max-steps",
                "2",
                "--gradient-accumulation-steps",
                "2",
                "--dump-params",
                fixed.to_str().unwrap(),
            ],
        ),
    );
    assert_bit_identical(&dynamic, &fixed);
}

#[test]
fn nccl_asked_for_without_a_gpu_ends_every_rank_with_a_message() {
    if tch::Cuda::is_available() {
        return; // the message is for machines without CUDA
    }
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let (child, _) = long_run(dir.path(), &ds, &["--comm", "nccl"]);
    let (out, took) = wait_with_limit(child, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("error on rank") && err.contains("--comm mpi"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(took < Duration::from_secs(30), "ended after {took:?}");
}

#[test]
fn ranks_without_queries_of_their_own_contribute_zero_and_the_gradient_stays_exact() {
    // 2-way 1-shot 1-query: 4 images, 2 queries, on 3 ranks: rank 2 holds an image but no
    // query. Its loss is a constant; it must still take part, adding nothing.
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let episode = [
        "--n-way",
        "2",
        "--k-shot",
        "1",
        "--n-query",
        "1",
        "--max-steps",
        "1",
    ];
    let single = dir.path().join("single.safetensors");
    run_single(&train_args(
        &ds,
        &dir.path().join("s"),
        &[
            &episode[..],
            &[
                "--gradient-accumulation-steps",
                "3",
                "--dump-grads",
                single.to_str().unwrap(),
            ],
        ]
        .concat(),
    ));
    let multi = dir.path().join("multi.safetensors");
    mpirun(
        3,
        &train_args(
            &ds,
            &dir.path().join("m"),
            &[&episode[..], &["--dump-grads", multi.to_str().unwrap()]].concat(),
        ),
    );
    let (err, name) = worst_error(&read(&multi), &read(&single));
    // fp32 sums of three ranks' parts in another order than one process's: on an AVX-512 CPU
    // the weight-norm gain of the head's last Linear (a gradient with much cancellation, from
    // 2 queries) differs by 1.2e-5; a rank that added anything but zero would differ by ~1.
    assert!(err <= 3e-5, "gradient of {name} differs by {err:.2e}");
}

#[test]
fn more_batchnorm_groups_than_images_is_refused_by_dry_run_under_a_launcher() {
    // The launcher's world size is read before MPI starts, so --dry-run sees it.
    let dry_run_on = |ranks: &str| {
        Command::new(BIN)
            .args([
                "train",
                "--dry-run",
                "--n-way",
                "2",
                "--k-shot",
                "1",
                "--n-query",
                "1",
            ])
            .env("OMPI_COMM_WORLD_SIZE", ranks)
            .output()
            .unwrap()
    };
    let out = dry_run_on("6");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("6 ranks") && err.contains("--shard episodes"),
        "{err}"
    );
    let out = dry_run_on("4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Worst per-tensor relative difference of parameters (or optimizer state) `a` against `b`:
/// ‖a − b‖ / max(‖b‖, 1e-3·‖all of b‖), the module doc's rule (0 when bit-identical, which the
/// rank-order sums make a sharded optimizer against an unsharded one).
fn worst_relative(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f64, String) {
    worst_by(a, b, |ra, rb, total| {
        norm(&(ra - rb)) / norm(rb).max(1e-3 * total)
    })
}

/// Every rank's `--dump-params` file beside rank 0's equals rank 0's, bit for bit.
fn ranks_agree(params: &Path, w: usize) {
    for rank in 1..w {
        assert_bit_identical(&fsct_dist::train::rank_path(params, rank), params);
    }
}

/// AdamW at every W: it divides by √v, which turns any rounding difference of tiny gradient
/// elements into whole learning-rate steps (seen before the rank-order sums: 1.3e-5 relative in
/// a BatchNorm bias at W = 3, where MPI's reduce and all-reduce added in other orders). Every
/// MPI sum now adds the ranks in rank order, so the parameters must be the same to the last bit.
#[test]
fn a_sharded_optimizer_takes_the_same_steps_as_an_unsharded_one() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    // 3 ranks own the tensors unevenly. The reference all-reduces after the backward; the
    // sharded runs reduce to the owners after it, or during it (--overlap on).
    for w in [2, 3, 4] {
        let dump = |name: &str| dir.path().join(format!("{name}{w}.safetensors"));
        for (name, on, overlap) in [
            ("plain", "off", "off"),
            ("sharded", "on", "off"),
            ("overlapped", "on", "on"),
        ] {
            let params = dump(name);
            mpirun(
                w,
                &train_args(
                    &ds,
                    &dir.path().join(format!("{name}{w}")),
                    &[
                        "--max-steps",
                        "3",
                        "--optimizer",
                        "AdamW",
                        "--shard-optimizer",
                        on,
                        "--overlap",
                        overlap,
                        "--dump-params",
                        params.to_str().unwrap(),
                    ],
                ),
            );
            ranks_agree(&params, w);
        }
        let plain = read(&dump("plain"));
        for name in ["sharded", "overlapped"] {
            let (err, tensor) = worst_relative(&read(&dump(name)), &plain);
            assert!(
                err == 0.0,
                "W={w} AdamW {name}: {tensor} differs by {err:.2e} (relative)"
            );
        }
    }
}

/// The optimizer state of a checkpoint, by name.
fn optimizer_state(run: &Path, step: u32) -> HashMap<String, Tensor> {
    read(&run.join(format!("checkpoints/step-{step:08}/optimizer.safetensors")))
}

/// Resumes `run` with `w` ranks (1: one process) up to 4 steps, the optimizer sharded or not;
/// returns the final parameters.
fn resume_to_4(run: &Path, w: usize, shard: &str, dump: &Path) -> HashMap<String, Tensor> {
    let args: Vec<String> = [
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--max-steps",
        "4",
        "--shard-optimizer",
        shard,
        "--dump-params",
        dump.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if w == 1 {
        run_single(&args);
    } else {
        mpirun(w, &args);
        ranks_agree(dump, w);
    }
    read(dump)
}

#[test]
fn sharded_checkpoints_are_whole_and_resume_at_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let two = ["--max-steps", "2"];
    // W=2 sharded and unsharded, stopped after step 2: the same checkpoint (gathered on save).
    let (sharded, plain) = (dir.path().join("sharded"), dir.path().join("plain"));
    mpirun(
        2,
        &train_args(
            &ds,
            &sharded,
            &[&two[..], &["--shard-optimizer", "on"]].concat(),
        ),
    );
    mpirun(2, &train_args(&ds, &plain, &two));
    let (s, p) = (optimizer_state(&sharded, 2), optimizer_state(&plain, 2));
    assert!(
        p.keys().any(|k| k.ends_with(".exp_avg_sq")),
        "AdamW moments"
    );
    let (err, name) = worst_relative(&s, &p);
    assert!(err == 0.0, "optimizer state {name} differs by {err:.2e}");
    // Resumed in one process: as the unsharded checkpoint resumed there.
    let a = resume_to_4(&sharded, 1, "off", &dir.path().join("a.safetensors"));
    let b = resume_to_4(&plain, 1, "off", &dir.path().join("b.safetensors"));
    let (err, name) = worst_relative(&a, &b);
    assert!(err == 0.0, "W=2 sharded → W=1: {name} differs by {err:.2e}");

    // One process, stopped after step 2, resumed on 3 ranks sharded: as resumed unsharded.
    let single = dir.path().join("single");
    run_single(&train_args(&ds, &single, &two));
    let copy = dir.path().join("single-copy");
    let status = Command::new("cp")
        .args(["-r", single.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let c = resume_to_4(&single, 3, "on", &dir.path().join("c.safetensors"));
    let d = resume_to_4(&copy, 3, "off", &dir.path().join("d.safetensors"));
    let (err, name) = worst_relative(&c, &d);
    assert!(err == 0.0, "W=1 → W=3 sharded: {name} differs by {err:.2e}");
}
