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
    let start = Instant::now();
    while !b.join("checkpoints/step-00000002").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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
