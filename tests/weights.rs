//! The binary, end to end, on what a run's weights are and where they come from: the official
//! `--backbone ResNet34` / `--FETI` meaning, the explicit start of a ResNet run, the checked load
//! of every weights file, and old runs that recorded the FETI ResNets under official names.
//! Tiny runs on CPU.

use std::path::Path;
use std::process::{Command, Output};

use tch::{Device, Kind, Tensor};

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

fn assert_ok(o: &Output) -> String {
    let all = text(o);
    assert!(o.status.success(), "{all}");
    all
}

/// Exit 1, the needles in one message, no panic trace.
fn assert_user_error(o: &Output, needles: &[&str]) {
    let all = text(o);
    assert_eq!(o.status.code(), Some(1), "exit code for:\n{all}");
    for n in needles {
        assert!(all.contains(n), "expected {n:?} in:\n{all}");
    }
    assert!(
        !all.contains("panicked"),
        "a panic reached the user:\n{all}"
    );
}

fn tiny_dataset(dir: &Path) {
    assert_ok(&fsct(
        &[
            "data",
            "synth",
            "--out",
            "ds",
            "--classes",
            "4,3,3",
            "--images-per-class",
            "4",
            "--size",
            "32",
        ],
        dir,
    ));
}

/// One optimizer step of a 2-way 1-shot 1-query episode at 32 px, then 1 val and 1 test episode.
fn tiny_run(dir: &Path, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--dataset",
        "ds",
        "--output",
        out,
        "--image-size",
        "32",
        "--n-way",
        "2",
        "--k-shot",
        "1",
        "--n-query",
        "1",
        "--epochs",
        "1",
        "--episodes-per-epoch",
        "1",
        "--val-episodes",
        "1",
        "--test-iter",
        "1",
        "--workers",
        "1",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    fsct(&args, dir)
}

#[test]
fn official_resnet_names_mean_the_official_networks_and_say_their_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // No --FETI: torchvision's layout, which officially starts from ImageNet weights.
    let o = fsct(&["train", "--backbone", "ResNet34", "--dry-run"], d);
    assert_user_error(
        &o,
        &[
            "ImageNet weights of resnet34",
            "--pretrained FILE",
            "--pretrained none",
        ],
    );
    let o = fsct(
        &[
            "train",
            "--backbone",
            "ResNet34",
            "--pretrained",
            "none",
            "--dry-run",
        ],
        d,
    );
    let all = assert_ok(&o);
    assert!(
        all.contains("# backbone TvResNet34: torchvision layout")
            && all.contains("# start: random weights")
            && all.contains("backbone = \"TvResNet34\"")
            && all.contains("pretrained = \"none\""),
        "{all}"
    );
    // --FETI 1: the FETI layout and its checkpoint.
    let o = fsct(
        &[
            "train",
            "--backbone",
            "ResNet34",
            "--FETI",
            "1",
            "--dry-run",
        ],
        d,
    );
    assert_user_error(&o, &["FetiResNet34", "FETI checkpoint"]);
    // The dry run checks the file is there (as a start does), not what it holds.
    std::fs::write(d.join("w.safetensors"), b"").unwrap();
    let o = fsct(
        &[
            "train",
            "--backbone",
            "ResNet34",
            "--FETI",
            "1",
            "--pretrained",
            "w.safetensors",
            "--dry-run",
        ],
        d,
    );
    let all = assert_ok(&o);
    assert!(
        all.contains("# backbone FetiResNet34: FETI layout")
            && all.contains("# start: pretrained weights from w.safetensors")
            && all.contains("backbone = \"FetiResNet34\""),
        "{all}"
    );
    // A file that is not there stops the run before any work, and the dry run says so too.
    for dry in [false, true] {
        let mut args = vec![
            "train",
            "--backbone",
            "ResNet18",
            "--pretrained",
            "nosuch.safetensors",
            "--output",
            "o",
        ];
        if dry {
            args.push("--dry-run");
        }
        assert_user_error(
            &fsct(&args, d),
            &["nosuch.safetensors is not a file", "--pretrained none"],
        );
    }
    assert!(!d.join("o").exists(), "nothing written");
    // Conv backbones have no pretrained weights.
    let o = fsct(
        &[
            "train",
            "--backbone",
            "Conv4",
            "--pretrained",
            "w.safetensors",
            "--dry-run",
        ],
        d,
    );
    assert_user_error(&o, &["applies to ResNets only"]);
}

#[test]
fn a_resnet_from_random_weights_warns_once_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_dataset(d);
    let args = [
        "--method",
        "ProtoNet",
        "--backbone",
        "FetiResNet10",
        "--pretrained",
        "none",
    ];
    let all = assert_ok(&tiny_run(d, "r", &args));
    let warnings: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("the official setting starts from"))
        .collect();
    assert_eq!(warnings.len(), 1, "{all}");
    assert!(warnings[0].contains("--pretrained FILE"), "{all}");
}

#[test]
fn test_run_checks_the_best_weights_and_refuses_a_second_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_dataset(d);
    assert_ok(&tiny_run(d, "run", &["--method", "ProtoNet"]));
    assert_ok(&fsct(&["test", "--run", "run"], d));

    // --run and --official both name weights: one of them would be ignored.
    std::fs::write(d.join("official.safetensors"), b"x").unwrap();
    assert_user_error(
        &fsct(
            &["test", "--run", "run", "--official", "official.safetensors"],
            d,
        ),
        &["--run run and --official official.safetensors", "pass one"],
    );

    // A best.safetensors with a tensor the model does not have (the old load ignored it).
    let best = d.join("run/best.safetensors");
    let mut named = Tensor::read_safetensors(&best).unwrap();
    named.push((
        "ATTN.stray.weight".into(),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&named, &best).unwrap();
    assert_user_error(
        &fsct(&["test", "--run", "run"], d),
        &[
            "best.safetensors",
            "1 tensor(s) the model does not have (ATTN.stray.weight)",
        ],
    );
}

/// Before `ResNet12/18/34` meant the official `--FETI 0` network, they were the FETI layout, and
/// runs recorded them so (checkpoint.json, config.toml). Such a run still resumes and tests.
#[test]
fn an_old_run_with_a_feti_resnet_under_its_official_name_resumes_and_tests() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_dataset(d);
    let args = [
        "--method",
        "ProtoNet",
        "--backbone",
        "ResNet12",
        "--FETI",
        "1",
        "--pretrained",
        "none",
    ];
    assert_ok(&tiny_run(d, "old", &args));
    // Rewrite the run as the old binary wrote it: "ResNet12" wherever it said FetiResNet12.
    let ckpts: Vec<_> = std::fs::read_dir(d.join("old/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let mut files = vec![d.join("old/config.toml")];
    files.extend(ckpts.iter().map(|c| c.join("checkpoint.json")));
    for f in &files {
        let t = std::fs::read_to_string(f).unwrap();
        assert!(t.contains("FetiResNet12"), "{}", f.display());
        std::fs::write(f, t.replace("FetiResNet12", "ResNet12")).unwrap();
    }
    // Today "ResNet12" alone is torchvision's ResNet18: without the mapping this test would load
    // 5×5-stem weights into a 7×7 stem, and the resume would be refused as another model.
    assert_ok(&fsct(&["test", "--run", "old"], d));
    let all = assert_ok(&fsct(&["train", "--resume", "old", "--epochs", "2"], d));
    assert!(all.contains("FetiResNet12: FETI layout"), "{all}");
}
