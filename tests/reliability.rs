//! Reliability: exact resume, preemption by signal, and a catalogue of bad inputs. Every bad
//! input must end with a message that names the problem, a non-zero exit code, no panic, and
//! no half-written file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{assert_bit_identical as assert_identical, synth_dataset as dataset, BIN};

/// A tiny run (tests/common) of up to 10 epochs of 4 steps: long enough to stop mid-run.
fn args(ds: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    common::train_args(
        ds,
        out,
        &[&["--epochs", "10", "--test-iter", "4"], extra].concat(),
    )
}
const EXIT_PREEMPTED: i32 = 3;

fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A failure the user can act on: exit code 1, one `error:` message containing `needle`, no
/// panic.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr:\n{err}");
    assert!(err.contains("error:"), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
    assert!(
        !err.contains("panicked"),
        "a panic is not a message:\n{err}"
    );
}

/// No temp file (`.tmp-*`) anywhere under `dir`.
fn no_partial_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(".tmp-"),
            "partial file left: {}",
            e.path().display()
        );
        if e.path().is_dir() {
            no_partial_files(&e.path());
        }
    }
}

// ---------- resume ----------

#[test]
fn a_run_stopped_and_resumed_ends_bit_identical_to_one_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let whole = dir.path().join("whole.safetensors");
    ok(run(&args(
        &ds,
        &dir.path().join("a"),
        &["--max-steps", "6", "--dump-params", whole.to_str().unwrap()],
    )));
    // Stopped at step 3, inside the first epoch (4 steps), then resumed across the epoch end.
    let b = dir.path().join("b");
    ok(run(&args(&ds, &b, &["--max-steps", "3"])));
    let resumed = dir.path().join("resumed.safetensors");
    let out = ok(run(&[
        "train".into(),
        "--resume".into(),
        b.to_string_lossy().into_owned(),
        "--max-steps".into(),
        "6".into(),
        "--dump-params".into(),
        resumed.to_string_lossy().into_owned(),
    ]));
    assert_identical(&resumed, &whole);
    // The same best model, so the same test result.
    let a_out = std::fs::read_to_string(dir.path().join("a/test.json")).unwrap();
    assert_eq!(std::fs::read_to_string(b.join("test.json")).unwrap(), a_out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    // Only the newest checkpoints are kept (3 by default).
    let ckpts: Vec<_> = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        ckpts.len() <= 3 && !ckpts.is_empty(),
        "{} checkpoints",
        ckpts.len()
    );
    no_partial_files(&b);
}

#[test]
fn sigterm_writes_a_checkpoint_exits_3_and_the_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let whole = dir.path().join("whole.safetensors");
    ok(run(&args(
        &ds,
        &dir.path().join("a"),
        &[
            "--max-steps",
            "40",
            "--dump-params",
            whole.to_str().unwrap(),
        ],
    )));

    let b = dir.path().join("b");
    let mut child = Command::new(BIN)
        .args(args(
            &ds,
            &b,
            &["--max-steps", "40", "--checkpoint-every", "1"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Signal once training is under way (its second checkpoint exists).
    common::wait_for(
        &b.join("checkpoints/step-00000002"),
        Duration::from_secs(60),
        "training did not start",
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(EXIT_PREEMPTED), "{err}");
    assert!(
        err.contains("--resume"),
        "the message says how to continue: {err}"
    );
    no_partial_files(&b);

    let resumed = dir.path().join("resumed.safetensors");
    ok(run(&[
        "train".into(),
        "--resume".into(),
        b.to_string_lossy().into_owned(),
        "--dump-params".into(),
        resumed.to_string_lossy().into_owned(),
    ]));
    assert_identical(&resumed, &whole);
}

#[test]
fn checkpoints_of_another_model_truncated_or_from_the_future_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    ok(run(&args(&ds, &b, &["--max-steps", "2"])));
    let resume = |extra: &[&str]| {
        let mut v = vec![
            "train".to_string(),
            "--resume".into(),
            b.to_string_lossy().into_owned(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        run(&v)
    };
    fails_with(&resume(&["--backbone", "Conv6"]), "another model");
    fails_with(&resume(&["--n-way", "4"]), "another model");

    let ckpt = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    let state_path = ckpt.join("checkpoint.json");
    let state = std::fs::read_to_string(&state_path).unwrap();
    std::fs::write(
        &state_path,
        state.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    fails_with(&resume(&[]), "newer fsct-dist");
    std::fs::write(&state_path, &state).unwrap();

    let model = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&resume(&[]), "damaged or truncated");

    fails_with(
        &run(&[
            "train".into(),
            "--resume".into(),
            dir.path().join("nothing").to_string_lossy().into_owned(),
        ]),
        "no checkpoint",
    );
}

#[test]
fn a_non_finite_fp32_loss_stops_naming_the_step_before_the_weights_are_spoiled() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    let out = run(&args(
        &ds,
        &b,
        &[
            "--learning-rate",
            "1e30",
            "--optimizer",
            "SGD",
            "--momentum",
            "0",
            "--checkpoint-every",
            "1",
        ],
    ));
    fails_with(&out, "the loss became");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("optimizer step"), "names the step: {err}");
    no_partial_files(&b);
}

// ---------- bad inputs ----------

#[test]
fn missing_empty_and_corrupt_dataset_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    fails_with(
        &run(&args(&dir.path().join("no-such-dataset"), &out, &[])),
        "no-such-dataset",
    );

    let ds = dataset(dir.path());
    std::fs::write(ds.join("base.json"), b"").unwrap();
    fails_with(&run(&args(&ds, &out, &[])), "base.json");
    std::fs::write(
        ds.join("base.json"),
        b"{\"image_names\": [1, 2], \"image_labels\": \"x\"}",
    )
    .unwrap();
    fails_with(&run(&args(&ds, &out, &[])), "base.json");
    std::fs::write(ds.join("base.json"), b"{not json").unwrap();
    fails_with(&run(&args(&ds, &out, &[])), "base.json");
    no_partial_files(&out);
}

/// Replaces every image of the first base class with `bytes`; returns that class folder.
fn spoil_class(ds: &Path, bytes: &[u8]) -> PathBuf {
    let class = std::fs::read_dir(ds.join("images/base"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .min()
        .unwrap();
    for img in std::fs::read_dir(&class).unwrap().flatten() {
        std::fs::write(img.path(), bytes).unwrap();
    }
    class
}

/// A valid 16×16 JPEG with the frame header's size replaced.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut bytes)
        .encode(
            &[128u8; 16 * 16 * 3],
            16,
            16,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    let sof = bytes
        .windows(2)
        .position(|m| m == [0xFF, 0xC0])
        .expect("baseline SOF0");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

#[test]
fn images_that_do_not_decode_are_named_with_the_fix() {
    // A JPEG cut short, a zero-byte file, text in a .png, and a real JPEG whose header was
    // edited to claim 60000×60000 pixels.
    let huge = jpeg_claiming(60000, 60000);
    for (bytes, needle) in [
        (&b"\xff\xd8\xff\xe0\x00\x10JFIF"[..], "cannot load image"),
        (&b""[..], "empty"),
        (&b"not an image at all"[..], "cannot load image"),
        (&huge[..], "limit"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path());
        let class = spoil_class(&ds, bytes);
        let out = run(&args(
            &ds,
            &dir.path().join("out"),
            &["--episodes-per-epoch", "30", "--epochs", "1"],
        ));
        fails_with(&out, needle);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&*class.file_name().unwrap().to_string_lossy()),
            "names the file: {err}"
        );
        assert!(err.contains("data check"), "names the fix: {err}");
        no_partial_files(&dir.path().join("out"));
    }
}

#[test]
fn an_image_path_that_is_a_symlink_loop_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let class = std::fs::read_dir(ds.join("images/base"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .min()
        .unwrap();
    for img in std::fs::read_dir(&class).unwrap().flatten() {
        let p = img.path();
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&p, &p).unwrap(); // points at itself
    }
    let out = run(&args(
        &ds,
        &dir.path().join("out"),
        &["--episodes-per-epoch", "30", "--epochs", "1"],
    ));
    fails_with(&out, "symbolic links");
}

#[test]
fn config_errors_name_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[train]\nlearnin_rate = 0.1\n").unwrap();
    fails_with(
        &run(&[
            "train".into(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
        ]),
        "learning_rate",
    );
    std::fs::write(&cfg, "[episode]\nn_way = \"five\"\n").unwrap();
    fails_with(
        &run(&[
            "train".into(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
        ]),
        "n_way",
    );
    let ds = dataset(dir.path());
    fails_with(
        &run(&args(&ds, &dir.path().join("o"), &["--n-way", "1"])),
        "--n-way",
    );
    fails_with(
        &run(&args(&ds, &dir.path().join("o"), &["--k-shot", "0"])),
        "k_shot",
    );
    fails_with(
        &run(&args(
            &ds,
            &dir.path().join("o"),
            &["--gradient-accumulation-steps", "99"],
        )),
        "gradient_accumulation_steps",
    );
}

#[test]
fn an_output_folder_that_cannot_be_created_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    fails_with(&run(&args(&ds, &file.join("run"), &[])), "--output");
}

#[test]
fn a_full_disk_fails_cleanly_and_keeps_the_older_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    // Files above 64 KiB cannot be written (EFBIG, as a full disk's ENOSPC would; SIGXFSZ
    // ignored): the weights no longer fit.
    // Write one good checkpoint, then resume under the limit: the next checkpoint fails.
    ok(run(&args(&ds, &b, &["--max-steps", "1"])));
    let before = std::fs::read_dir(b.join("checkpoints")).unwrap().count();
    let resume = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{BIN}' train --resume '{}' --max-steps 2",
        b.display()
    );
    let out = Command::new("bash").args(["-c", &resume]).output().unwrap();
    fails_with(&out, "disk is full");
    assert_eq!(
        std::fs::read_dir(b.join("checkpoints")).unwrap().count(),
        before,
        "older checkpoints kept"
    );
    no_partial_files(&b);
}

// ---------- out of memory ----------

#[test]
fn a_simulated_out_of_memory_doubles_the_micro_steps_and_ends_as_if_started_there() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    // 15 images of 3×20×20 f32 = 4800 bytes each: chunks above 20000 bytes (5+ images) fail,
    // so dynamic goes 1 → 2 → 4 micro-steps on the first step and keeps 4.
    let dynamic = dir.path().join("dynamic.safetensors");
    let out = ok(run(&args(
        &ds,
        &dir.path().join("d"),
        &[
            "--max-steps",
            "3",
            "--gradient-accumulation-steps",
            "dynamic",
            "--simulate-oom-above-bytes",
            "20000",
            "--dump-params",
            dynamic.to_str().unwrap(),
        ],
    )));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("out of memory with 1 micro-steps"), "{log}");
    assert!(log.contains("out of memory with 2 micro-steps"), "{log}");
    assert!(!log.contains("out of memory with 4 micro-steps"), "{log}");
    let fixed = dir.path().join("fixed.safetensors");
    ok(run(&args(
        &ds,
        &dir.path().join("f"),
        &[
            "--max-steps",
            "3",
            "--gradient-accumulation-steps",
            "4",
            "--dump-params",
            fixed.to_str().unwrap(),
        ],
    )));
    assert_identical(&dynamic, &fixed);
}

#[test]
fn out_of_memory_without_dynamic_names_the_options() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let out = run(&args(
        &ds,
        &dir.path().join("o"),
        &["--simulate-oom-above-bytes", "20000"],
    ));
    fails_with(&out, "--gradient-accumulation-steps dynamic");
}

// ---------- the run folder: never overwritten, never shared ----------

fn train_cmd(extra: &[&str]) -> Vec<String> {
    extra.iter().map(|s| s.to_string()).collect()
}

/// `train --resume RUN` with `extra` flags.
fn resume_args(run: &Path, extra: &[&str]) -> Vec<String> {
    [&["train", "--resume", run.to_str().unwrap()][..], extra]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The files of a folder, name → bytes (one level, plus checkpoints/), to show nothing changed.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("checkpoints")] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if p.is_file() && name != ".lock" {
                v.push((name, std::fs::read(&p).unwrap()));
            } else if p.is_dir() {
                v.push((name, Vec::new()));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn a_fresh_run_into_an_existing_run_is_refused_and_overwrite_moves_the_old_one_aside_whole() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    ok(run(&args(&ds, &b, &["--max-steps", "2"])));
    let before = snapshot(&b);
    // Another model into the same folder: refused, nothing touched.
    let out = run(&args(&ds, &b, &["--max-steps", "2", "--backbone", "Conv6"]));
    fails_with(&out, "holds another training run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(snapshot(&b), before, "the old run is untouched");
    // A folder that is not a run is not ours to fill either.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    fails_with(
        &run(&args(&ds, &foreign, &[])),
        "not an fsct-dist run folder",
    );
    assert_eq!(std::fs::read(foreign.join("notes.txt")).unwrap(), b"mine");
    // --overwrite: the old run moves aside whole, the new one starts clean.
    ok(run(&args(
        &ds,
        &b,
        &["--max-steps", "1", "--backbone", "Conv6", "--overwrite"],
    )));
    let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("b.old-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(snapshot(&aside[0]), before, "moved whole, byte for byte");
    let new_ckpts: Vec<_> = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        new_ckpts,
        ["step-00000001"],
        "only the new run's checkpoints"
    );
    // A run that failed before its first step left only its config: the same folder is reusable.
    let c = dir.path().join("c");
    fails_with(&run(&args(&ds, &c, &["--pretrained", "/no/such/file"])), "");
    if c.join("config.toml").exists() {
        ok(run(&args(&ds, &c, &["--max-steps", "1"])));
    }
}

#[test]
fn a_run_folder_in_use_is_refused_to_a_second_train_resume_or_test() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    ok(run(&args(&ds, &b, &["--max-steps", "1"])));
    let mut first = Command::new(BIN)
        .args(resume_args(&b, &["--max-steps", "400"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(
        &b.join("checkpoints/step-00000004"),
        Duration::from_secs(60),
        "the first run did not start",
    );
    // Held still (a stopped process keeps its lock), so that it cannot finish its short run
    // before the three refusals below have been tried, however loaded the machine.
    let stopped = Command::new("kill")
        .args(["-STOP", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let resume = run(&resume_args(&b, &[]));
    fails_with(&resume, "in use by another fsct-dist process");
    assert!(String::from_utf8_lossy(&resume.stderr).contains(&format!("pid {}", first.id())));
    fails_with(&run(&args(&ds, &b, &["--overwrite"])), "in use");
    fails_with(
        &run(&train_cmd(&["test", "--run", b.to_str().unwrap()])),
        "in use",
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // The kernel released the lock with the process: the run can be continued.
    ok(run(&resume_args(&b, &["--max-steps", "6"])));
}

#[test]
fn resume_with_another_output_folder_is_refused_and_the_same_one_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    ok(run(&args(&ds, &b, &["--max-steps", "1"])));
    let before = snapshot(&b);
    let other = dir.path().join("other");
    let out = run(&resume_args(&b, &["--output", other.to_str().unwrap()]));
    fails_with(&out, "continues the run in its own folder");
    assert_eq!(snapshot(&b), before);
    assert!(!other.exists());
    fails_with(&run(&resume_args(&b, &["--overwrite"])), "only one of them");
    ok(run(&resume_args(
        &b,
        &["--output", b.to_str().unwrap(), "--max-steps", "2"],
    )));
}

/// (kind, step or epoch) of every metrics line: what the log says happened, without timings.
fn metric_events(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let kind = v["kind"].as_str().unwrap().to_owned();
            let at = v["step"].as_u64().or(v["epoch"].as_u64()).unwrap_or(0);
            (kind, at)
        })
        .collect()
}

#[test]
fn after_a_kill_and_resume_metrics_hold_every_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let a = dir.path().join("a");
    ok(run(&args(&ds, &a, &["--max-steps", "6"])));
    // b did the same, then "was killed" after its step-5 checkpoint: the step-6 checkpoint
    // is gone but the log already holds step 6, the validation of epoch 1 and the test.
    let b = dir.path().join("b");
    ok(run(&args(
        &ds,
        &b,
        &["--max-steps", "6", "--checkpoint-every", "1"],
    )));
    std::fs::remove_dir_all(b.join("checkpoints/step-00000006")).unwrap();
    ok(run(&resume_args(&b, &["--max-steps", "6"])));
    assert_eq!(
        metric_events(&b.join("metrics.jsonl")),
        metric_events(&a.join("metrics.jsonl"))
    );
}

#[test]
fn checkpoint_positions_that_cannot_be_right_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    ok(run(&args(&ds, &b, &["--max-steps", "2"])));
    let state_path = b.join("checkpoints/step-00000002/checkpoint.json");
    let state = std::fs::read_to_string(&state_path).unwrap();
    let resume = || run(&resume_args(&b, &[]));
    for (from, to, needle) in [
        ("\"micro_steps\": 1", "\"micro_steps\": 0", "micro-steps"),
        (
            "\"micro_steps\": 1",
            "\"micro_steps\": 100000",
            "micro-steps",
        ),
        ("\"step\": 2", "\"step\": 999", "does not fit"),
        (
            "\"steps_in_epoch\": 2",
            "\"steps_in_epoch\": 77",
            "does not fit",
        ),
    ] {
        assert!(state.contains(from), "{from} in {state}");
        std::fs::write(&state_path, state.replacen(from, to, 1)).unwrap();
        fails_with(&resume(), needle);
    }
    std::fs::write(&state_path, &state).unwrap();
    // Resuming with another epoch length moves every position: refused too.
    fails_with(
        &run(&resume_args(&b, &["--episodes-per-epoch", "1"])),
        "episodes-per-epoch",
    );
}

#[test]
fn stale_temp_folders_of_dead_processes_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let b = dir.path().join("b");
    ok(run(&args(&ds, &b, &["--max-steps", "1"])));
    // A pid that has certainly exited: a child we waited for.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale_ckpt = b.join(format!("checkpoints/.tmp-step-00000009-{dead}"));
    std::fs::create_dir_all(&stale_ckpt).unwrap();
    std::fs::write(stale_ckpt.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    let stale_file = b.join(format!(".tmp-{dead}-last.safetensors"));
    std::fs::write(&stale_file, b"half").unwrap();
    ok(run(&resume_args(&b, &["--max-steps", "2"])));
    assert!(!stale_ckpt.exists() && !stale_file.exists());

    let stale_synth = dir.path().join(format!(".ds2.tmp-{dead}-1"));
    std::fs::create_dir_all(&stale_synth).unwrap();
    let synth = Command::new(BIN)
        .args([
            "data",
            "synth",
            "--classes",
            "2,2,2",
            "--images-per-class",
            "2",
        ])
        .args(["--size", "16", "--out"])
        .arg(dir.path().join("ds2"))
        .output()
        .unwrap();
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    assert!(!stale_synth.exists());
}

// ---------- preflight: fail before training, not after ----------

/// Fails within `secs` (a check made before training), with `needle` in the message.
fn fails_early(args: &[String], needle: &str, secs: u64) {
    let start = Instant::now();
    let out = run(args);
    fails_with(&out, needle);
    assert!(
        start.elapsed() < Duration::from_secs(secs),
        "failed only after {:?}",
        start.elapsed()
    );
}

#[test]
fn a_missing_or_too_small_test_split_and_bad_dump_paths_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    // Long enough that failing only after training would take far longer than the limit.
    let long = ["--epochs", "50", "--episodes-per-epoch", "40"];
    let novel = std::fs::read_to_string(ds.join("novel.json")).unwrap();
    std::fs::remove_file(ds.join("novel.json")).unwrap();
    fails_early(&args(&ds, &dir.path().join("o1"), &long), "novel", 20);
    // One class only: the fix cannot be "lower --n_way to at most 1".
    let mut v: serde_json::Value = serde_json::from_str(&novel).unwrap();
    let keep: Vec<usize> = v["image_labels"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, l)| l.as_i64() == Some(0))
        .map(|(i, _)| i)
        .collect();
    v["image_names"] = keep.iter().map(|&i| v["image_names"][i].clone()).collect();
    v["image_labels"] = keep.iter().map(|_| serde_json::json!(0)).collect();
    std::fs::write(ds.join("novel.json"), v.to_string()).unwrap();
    let o2 = dir.path().join("o2");
    fails_early(&args(&ds, &o2, &long), "at least 2", 20);
    let err = String::from_utf8_lossy(&run(&args(&ds, &o2, &long)).stderr).into_owned();
    assert!(!err.contains("at most 1"), "{err}");
    std::fs::write(ds.join("novel.json"), &novel).unwrap();
    let missing = dir.path().join("no/such/folder/p.safetensors");
    fails_early(
        &args(
            &ds,
            &dir.path().join("o3"),
            &[&long[..], &["--dump-params", missing.to_str().unwrap()]].concat(),
        ),
        "does not exist",
        20,
    );
    assert!(!dir.path().join("o3/checkpoints").exists());
}

/// `--dry-run` makes the checks a start makes before its first step — the output folder, the
/// dump paths, every split — and writes nothing.
#[test]
fn dry_run_refuses_what_a_start_would_refuse_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    let dry =
        |out: &Path, extra: &[&str]| run(&args(&ds, out, &[&["--dry-run"][..], extra].concat()));
    let fresh = dir.path().join("fresh");
    let out = ok(dry(&fresh, &[]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("# dataset: "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!fresh.exists(), "a dry run creates no output folder");
    // A folder holding a run: refused as a start would, and left as it was, even with
    // --overwrite (which a dry run only checks).
    let taken = dir.path().join("taken");
    std::fs::create_dir_all(taken.join("checkpoints")).unwrap();
    std::fs::write(taken.join("metrics.jsonl"), b"{}\n").unwrap();
    let before = snapshot(&taken);
    fails_with(&dry(&taken, &[]), "holds another training run");
    ok(dry(&taken, &["--overwrite"]));
    assert_eq!(snapshot(&taken), before);
    let missing = dir.path().join("no/such/folder/g.safetensors");
    fails_with(
        &dry(&fresh, &["--dump-grads", missing.to_str().unwrap()]),
        "does not exist",
    );
    std::fs::remove_file(ds.join("novel.json")).unwrap();
    fails_with(&dry(&fresh, &[]), "novel");
    assert!(!fresh.exists());
}

// ---------- hostile files ----------

/// Replaces the first base class's images with what `make` creates at each path.
fn replace_class_images(ds: &Path, make: impl Fn(&Path)) -> PathBuf {
    let class = std::fs::read_dir(ds.join("images/base"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .min()
        .unwrap();
    for img in std::fs::read_dir(&class).unwrap().flatten() {
        std::fs::remove_file(img.path()).unwrap();
        make(&img.path());
    }
    class
}

#[test]
fn every_kind_of_non_regular_file_named_as_an_image_is_refused_without_hanging() {
    type Make = fn(&Path);
    let kinds: [(&str, Make); 4] = [
        ("FIFO", |p| {
            assert!(Command::new("mkfifo").arg(p).status().unwrap().success())
        }),
        ("socket", |p| {
            // The listener is leaked on purpose: the socket file must outlive this call.
            std::mem::forget(std::os::unix::net::UnixListener::bind(p).unwrap())
        }),
        ("folder", |p| std::fs::create_dir(p).unwrap()),
        ("character device", |p| {
            std::os::unix::fs::symlink("/dev/zero", p).unwrap()
        }),
    ];
    for (what, make) in kinds {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path());
        let class = replace_class_images(&ds, make);
        let mut child = Command::new(BIN)
            .args(args(
                &ds,
                &dir.path().join("out"),
                &["--episodes-per-epoch", "30"],
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("{what}: train hangs");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        fails_with(&out, what);
        let check = Command::new(BIN)
            .args(["data", "check"])
            .arg(&ds)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{what}: {report}");
        assert!(
            report.contains(what)
                && report.contains(&*class.file_name().unwrap().to_string_lossy()),
            "{what}: {report}"
        );
    }
}

/// A PNG file holding only a valid header (IHDR) for a w×h RGB image: enough for any reader to
/// learn the size, which is all a size check may look at.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    // IHDR, then a short IDAT (readers stop at the first one) and IEND.
    let empty_zlib = [0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    for (kind, data) in [
        (&b"IHDR"[..], &ihdr[..]),
        (b"IDAT", &empty_zlib),
        (b"IEND", &[]),
    ] {
        let mut chunk = kind.to_vec();
        chunk.extend(data);
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&chunk);
        png.extend(crc32(&chunk).to_be_bytes());
    }
    png
}

#[test]
fn images_of_extreme_aspect_ratio_are_refused_by_loading_and_by_data_check_alike() {
    for (w, h) in [(170_000_000, 1), (1, 170_000_000), (10_000_000, 10)] {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path());
        let class = spoil_class(&ds, &png_header(w, h));
        let out = run(&args(
            &ds,
            &dir.path().join("out"),
            &["--episodes-per-epoch", "30", "--train-aug", "1"],
        ));
        fails_with(&out, "aspect ratio");
        let check = Command::new(BIN)
            .args(["data", "check", "--image-size", "20"])
            .arg(&ds)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{report}");
        assert!(report.contains("aspect ratio"), "{report}");
        assert!(report.contains(&*class.file_name().unwrap().to_string_lossy()));
    }
}

// ---------- numbers at their limits ----------

#[test]
fn every_integer_flag_at_its_types_limits_is_a_message_or_accepted_never_a_panic() {
    let flags = [
        "--seed",
        "--epochs",
        "--episodes-per-epoch",
        "--val-episodes",
        "--test-iter",
        "--max-steps",
        "--episodes-per-step",
        "--empty-cache-every",
        "--checkpoint-every",
        "--keep-checkpoints",
        "--threads",
        "--workers",
        "--image-size",
        "--n-way",
        "--k-shot",
        "--n-query",
        "--gradient-accumulation-steps",
    ];
    let values = [
        u64::MAX.to_string(),
        (1u64 << 63).to_string(),
        i64::MAX.to_string(),
        (u32::MAX as u64 + 1).to_string(),
        "4000000000".into(),
        "-1".into(),
        i64::MIN.to_string(),
        "0".into(),
        "100000000000000000000000".into(),
    ];
    // Two at a time (each is a process start): the whole table in about a minute on 2 cores.
    let cases: Vec<(&str, &String)> = flags
        .iter()
        .flat_map(|f| values.iter().map(move |v| (*f, v)))
        .collect();
    std::thread::scope(|scope| {
        for half in cases.chunks(cases.len().div_ceil(2)) {
            scope.spawn(move || check_limits(half));
        }
    });
    // Every 64-bit seed is a seed: it is accepted and written back exactly.
    let out = ok(run(&train_cmd(&[
        "train",
        "--dry-run",
        "--seed",
        "10000000000000000000",
    ])));
    assert!(String::from_utf8_lossy(&out.stdout).contains("10000000000000000000"));
}

/// Each (flag, value) under --dry-run ends with exit 0, 1 (a message naming the flag) or 2 (a
/// usage error), never a panic.
fn check_limits(cases: &[(&str, &String)]) {
    for &(flag, v) in cases {
        let out = run(&train_cmd(&["train", "--dry-run", flag, v.as_str()]));
        let err = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        assert!(
            matches!(code, Some(0..=2)),
            "{flag} {v}: exit {code:?}\n{err}"
        );
        assert!(!err.contains("panicked"), "{flag} {v}: {err}");
        assert!(
            !err.contains("-9223372036854775808") || v == &i64::MIN.to_string(),
            "{flag} {v}: {err}"
        );
        if code == Some(1) {
            assert!(
                err.contains("error:") && err.contains("--") || err.contains('`'),
                "{flag} {v}: names the flag: {err}"
            );
        }
    }
}

#[test]
fn impossible_sizes_and_settings_are_refused_up_front_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path());
    for (extra, needle) in [
        (&["--image-size", "3000"][..], "--image-size"),
        (&["--image-size", "10000"][..], "--image-size"),
        (&["--threads", "4000000000"][..], "--threads"),
        (
            &["--freeze-backbone", "--method", "ProtoNet"][..],
            "nothing would be trained",
        ),
        (
            &["--n-way", "4611686018427387904", "--k-shot", "2"][..],
            "--n-way",
        ),
    ] {
        let out = run(&args(&ds, &dir.path().join("o"), extra));
        fails_with(&out, needle);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("frame #"), "no C++ trace: {err}");
        assert!(err.lines().count() <= 3, "one message: {err}");
    }
    // The built-in dataset at an absurd size: refused, and no temp folder left beside it.
    let synth = Command::new(BIN)
        .args(["data", "synth", "--size", "100000", "--out"])
        .arg(dir.path().join("big"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&synth.stderr);
    assert_eq!(synth.status.code(), Some(1), "{err}");
    assert!(err.contains("--size"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".big."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn io_errors_are_said_once_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&train_cmd(&[
        "train",
        "--config",
        dir.path().to_str().unwrap(),
    ]));
    fails_with(&out, "folder");
    let err = String::from_utf8_lossy(&out.stderr);
    let reason = "not a regular file";
    assert_eq!(err.matches(reason).count(), 1, "said once: {err}");
    // A mistyped flag is a usage error: exit 2, as documented (clap's convention).
    let out = run(&train_cmd(&["train", "--no-such-flag"]));
    assert_eq!(out.status.code(), Some(2));
}
