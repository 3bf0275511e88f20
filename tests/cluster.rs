//! What clusters do to a run: stop signals at any point (training, validation, test, dataset
//! generation) through `launch/mpirun.sh` or straight to the process, and a rank that stops
//! answering (SIGSTOP) caught by the collective watchdog. Tiny runs; each test a few seconds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{rank_pids, synth_dataset, train_args, wait_with_limit, BIN};

fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("launch/mpirun.sh")
}

/// `fsct-dist ARGS` on `ranks` ranks (1: the bare binary, else launch/mpirun.sh), running.
fn spawn(ranks: usize, args: &[String]) -> Child {
    let mut cmd = if ranks == 1 {
        Command::new(BIN)
    } else {
        let mut c = Command::new("bash");
        c.arg(launcher()).args(["-n", &ranks.to_string()]);
        c
    };
    cmd.args(args)
        .env("FSCT", BIN)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Output {
    let (out, _) = wait_with_limit(child, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Waits until `metrics.jsonl` of `run` holds `count` lines of `kind` (training reached them).
fn wait_for_metric(run: &Path, kind: &str, count: usize) {
    let start = Instant::now();
    let needle = format!("\"kind\":\"{kind}\"");
    while std::fs::read_to_string(run.join("metrics.jsonl"))
        .map_or(0, |m| m.matches(&needle).count())
        < count
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run never wrote a {kind} metric"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn test_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("Test Acc"))
        .unwrap_or_default()
        .to_owned()
}

/// Two epochs of 2 steps, 200 validation and 150 test episodes (a few seconds each).
const LONG_EVAL: [&str; 8] = [
    "--epochs",
    "2",
    "--episodes-per-epoch",
    "2",
    "--val-episodes",
    "200",
    "--test-iter",
    "150",
];

/// Stops a run with `sig` once its metrics hold `count` lines of `metric` (1 "train": validating
/// epoch 0; 2 "val": testing), checks it ends at once with exit 3 and one checkpoint line, resumes
/// it, and checks the result equals `whole`'s (a run never stopped): same weights bit for bit
/// and the same test line.
fn stop_and_resume(ranks: usize, sig: &str, metric: &str, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let ds = synth_dataset(dir.path());
    let whole = dir.path().join("whole");
    let reference = finish(spawn(ranks, &train_args(&ds, &whole, &LONG_EVAL)));

    let run = dir.path().join("stopped");
    let child = spawn(ranks, &train_args(&ds, &run, &LONG_EVAL));
    wait_for_metric(&run, metric, count);
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id();
    signal(pid, sig);
    let (out, took) = wait_with_limit(child, Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "exit 3 (stopped): {err}");
    assert!(took < Duration::from_secs(10), "stopped after {took:?}");
    assert_eq!(
        err.matches("stopped by a signal; checkpoint").count(),
        1,
        "rank 0 alone prints the checkpoint line: {err}"
    );
    assert!(test_line(&out).is_empty(), "stopped before the test ended");

    let resumed = finish(spawn(
        ranks,
        &[
            "train".into(),
            "--resume".into(),
            run.to_string_lossy().into(),
        ],
    ));
    assert_eq!(test_line(&resumed), test_line(&reference));
    assert_eq!(
        std::fs::read(run.join("last.safetensors")).unwrap(),
        std::fs::read(whole.join("last.safetensors")).unwrap(),
        "resumed weights equal the uninterrupted run's"
    );
}

#[test]
fn sigterm_to_the_launcher_during_validation_checkpoints_exits_3_and_resumes_exactly() {
    stop_and_resume(2, "TERM", "train", 1);
}

#[test]
fn sigusr1_during_the_test_exits_3_and_the_resumed_run_prints_the_same_line() {
    stop_and_resume(1, "USR1", "val", 2);
}

#[test]
fn a_stopped_rank_ends_the_job_through_the_watchdog_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let ds = synth_dataset(dir.path());
    let args = train_args(
        &ds,
        &dir.path().join("run"),
        &[
            "--episodes-per-epoch",
            "100000",
            "--collective-timeout",
            "5",
        ],
    );
    let child = spawn(2, &args);
    let start = Instant::now();
    let ranks = loop {
        let r = rank_pids(child.id());
        if r.len() == 2 || start.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ranks.len(), 2, "two ranks started");
    wait_for_metric(&dir.path().join("run"), "train", 1);
    // A stand-in for a GPU or file system that stops answering.
    signal(ranks[1], "STOP");
    let (out, took) = wait_with_limit(child, Duration::from_secs(60));
    let err = stderr(&out);
    // Whatever happens, never leave a stopped process behind.
    let _ = Command::new("kill")
        .args(["-KILL", &ranks[1].to_string()])
        .status();
    assert!(!out.status.success(), "a stalled job must fail: {err}");
    assert!(
        took < Duration::from_secs(5 + 15),
        "ended {took:?} after the stop"
    );
    assert!(
        err.contains("error on rank 0 of 2: no progress in ")
            && err.contains("for 5 s — a rank stopped answering"),
        "{err}"
    );
}

#[test]
fn a_stop_signal_during_dataset_generation_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big");
    let child = Command::new(BIN)
        .args(["data", "synth", "--classes", "40,20,20"])
        .args(["--images-per-class", "200", "--size", "84", "--out"])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it is writing images, then stop it.
    let start = Instant::now();
    while std::fs::read_dir(dir.path()).unwrap().count() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "synth never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id(), "TERM");
    let (result, took) = wait_with_limit(child, Duration::from_secs(30));
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{err}");
    assert!(err.contains("stopped by a signal"), "{err}");
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
