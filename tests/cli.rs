//! The real binary, end to end, in temp folders: a tiny training run and its files, the test
//! command, dataset tools, and the messages users see for bad input.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn fsct(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fsct-dist"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A user error: exit code 1, a message, never a panic trace.
fn assert_user_error(o: &Output, needle: &str) {
    let all = text(o);
    assert_eq!(o.status.code(), Some(1), "exit code for:\n{all}");
    assert!(all.contains(needle), "expected {needle:?} in:\n{all}");
    assert!(
        !all.contains("panicked"),
        "a panic reached the user:\n{all}"
    );
}

fn tiny_dataset(dir: &Path) {
    let o = fsct(
        &[
            "data",
            "synth",
            "--out",
            "ds",
            "--classes",
            "6,5,5",
            "--images-per-class",
            "8",
            "--size",
            "32",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", text(&o));
}

const TINY: &[&str] = &[
    "--dataset",
    "ds",
    "--image-size",
    "32",
    "--n-way",
    "3",
    "--k-shot",
    "2",
    "--n-query",
    "2",
    "--epochs",
    "2",
    "--episodes-per-epoch",
    "3",
    "--val-episodes",
    "4",
    "--test-iter",
    "6",
    "--workers",
    "2",
    "--threads",
    "1",
];

#[test]
fn train_writes_the_run_files_and_test_reproduces_its_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    let mut args = vec!["train", "--output", "run"];
    args.extend_from_slice(TINY);
    let o = fsct(&args, dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("run");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "best.safetensors",
        "last.safetensors",
        "curves.png",
        "summary.json",
        "test.json",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let lines: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["train", "val", "train", "val", "test"]);
    assert_eq!(lines[2]["step"], 6);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("6 Test Acc = "))
        .expect("official test line");
    assert!(line.ends_with('%'), "{line}");

    // The saved config reproduces the run's settings; `test --run` evaluates the best weights on
    // the same test episodes, so it prints the same line.
    let o = fsct(&["test", "--run", "run"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l == line),
        "test --run: {}",
        text(&o)
    );
}

/// `--version` names the libtorch and whether libtorch_cuda is linked, and that answer agrees with
/// what the dynamic loader resolves for the binary (`ldd`): "no" for a CPU wheel-set build.
#[test]
fn version_says_whether_cuda_is_linked() {
    let exe = env!("CARGO_BIN_EXE_fsct-dist");
    let o = Command::new(exe)
        .arg("--version")
        .output()
        .expect("binary runs");
    assert!(o.status.success(), "{}", text(&o));
    let line = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let prefix = format!("fsct-dist {} (libtorch 2.", env!("CARGO_PKG_VERSION"));
    assert!(line.starts_with(&prefix), "version line: {line}");
    let ldd = Command::new("ldd").arg(exe).output().expect("ldd runs");
    let linked = String::from_utf8_lossy(&ldd.stdout).contains("libtorch_cuda.so");
    let answer = if linked { "yes" } else { "no" };
    assert!(
        line.ends_with(&format!(", CUDA linked: {answer})")),
        "ldd {} libtorch_cuda.so, but: {line}",
        if linked { "lists" } else { "does not list" }
    );
}

#[test]
fn every_shipped_config_resolves() {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        let o = fsct(
            &[
                "train",
                "--config",
                path.to_str().unwrap(),
                "--device",
                "cpu",
                "--dry-run",
            ],
            &configs,
        );
        // The dry run checks the files a start needs too: a shipped config whose dataset or
        // pretrained weights are not downloaded here may fail only on those.
        let all = text(&o);
        let not_downloaded = all.contains("pass an existing dataset folder")
            || all.contains("is not a file; make it with the one-line conversion");
        assert!(
            o.status.success() || not_downloaded,
            "{}: {}",
            path.display(),
            text(&o)
        );
        n += 1;
    }
    assert!(n >= 10, "expected the published settings, found {n}");
}

#[test]
fn bad_input_gets_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("typo.toml"), "[train]\nepoch = 3\n").unwrap();
    assert_user_error(
        &fsct(&["train", "--config", "typo.toml", "--dry-run"], d),
        "did you mean `epochs`",
    );
    assert_user_error(
        &fsct(&["train", "--config", "missing.toml"], d),
        "missing.toml",
    );
    assert_user_error(&fsct(&["train", "--n-way", "1", "--dry-run"], d), "n_way");
    assert_user_error(
        &fsct(&["train", "--device", "cuda", "--dry-run"], d),
        "--device cpu",
    );
    assert_user_error(
        &fsct(
            &["train", "--dataset", "no/such/folder", "--output", "o"],
            d,
        ),
        "no/such/folder",
    );
    assert_user_error(
        &fsct(&["test", "--run", "nothing-here"], d),
        "not a finished training run",
    );

    tiny_dataset(d);
    // 6 base classes cannot make a 7-way episode: the message says how many there are.
    let mut args = vec!["train", "--output", "o2"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--n-way", "7"]);
    assert_user_error(&fsct(&args, d), "6");
}

#[test]
fn data_check_reports_a_corrupt_image() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    let o = fsct(&["data", "check", "ds"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    // Corrupt one image of the novel split.
    let novel: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("ds/novel.json")).unwrap())
            .unwrap();
    let first = novel["image_names"][0].as_str().unwrap();
    let path = if Path::new(first).is_absolute() {
        first.into()
    } else {
        dir.path().join("ds").join(first)
    };
    std::fs::write(&path, b"not a png").unwrap();
    let o = fsct(&["data", "check", "ds"], dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(text(&o).contains(&name), "names the file: {}", text(&o));
}

#[test]
fn memory_report_writes_the_phase_profile_of_a_later_step() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    let mut args = vec![
        "train",
        "--output",
        "run",
        "--memory-report",
        "--max-steps",
        "2",
        "--gradient-accumulation-steps",
        "2",
    ];
    args.extend_from_slice(TINY);
    let o = fsct(&args, dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/memory.json")).unwrap())
            .unwrap();
    assert_eq!(m["step"], 2, "the last measured step, not the first");
    let (held, peak, step) = (
        m["held_bytes"].as_u64().unwrap(),
        m["peak_bytes"].as_u64().unwrap(),
        m["step_bytes"].as_u64().unwrap(),
    );
    assert!(held > 0 && peak >= held && step == peak - held, "{m}");
    let phases: Vec<&str> = m["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["data", "backbone_forward", "head", "backward", "optimizer"]
    );
    assert!(dir.path().join("run/memory.png").is_file());
}

#[test]
fn mixed_precision_runs_train_end_to_end_and_records_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path());
    for (amp, micro) in [("bf16", "1"), ("fp16", "2")] {
        let out = format!("run-{amp}");
        let mut args = vec![
            "train",
            "--output",
            &out,
            "--amp",
            amp,
            "--max-steps",
            "2",
            "--gradient-accumulation-steps",
            micro,
        ];
        args.extend_from_slice(TINY);
        let o = fsct(&args, dir.path());
        assert!(o.status.success(), "{amp}: {}", text(&o));
        let config = std::fs::read_to_string(dir.path().join(&out).join("config.toml")).unwrap();
        assert!(config.contains(&format!("amp = \"{amp}\"")), "{config}");
    }
    // On CPU the default is fp32, and the effective config says so.
    let o = fsct(&["train", "--dry-run"], dir.path());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("amp = \"off\""),
        "{}",
        text(&o)
    );
}
