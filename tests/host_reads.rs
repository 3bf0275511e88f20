//! The device-to-host reads of one training step (W = 1, M = 1), counted through
//! `fsct_dist::host_read`: on a GPU each is a synchronisation, so the step is held to the
//! number the README states. Its own test binary: the count is process-wide.

use fsct_dist::config::{AmpMode, RunConfig};
use fsct_dist::data::{self, synth::SynthOptions, LoaderConfig};
use fsct_dist::distributed::Local;
use fsct_dist::host_read;
use fsct_dist::memory::NoProfile;
use fsct_dist::train::amp::GradScaler;
use fsct_dist::train::optimizer_step::{optimizer_step, StepHooks, StepPlan, Trainee};
use fsct_dist::train::{self, optim};
use tch::Device;

#[test]
fn one_step_reads_the_host_once_in_fp32_and_three_times_with_the_fp16_loss_scaler() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let synth = SynthOptions {
        classes: [4, 3, 3],
        images_per_class: 6,
        size: 24,
        seed: 1,
    };
    data::write_dataset(&ds, &synth).unwrap();
    let mut c = RunConfig::default();
    c.data.dataset = ds.to_string_lossy().into_owned();
    c.data.image_size = 24;
    (c.episode.n_way, c.episode.k_shot, c.episode.n_query) = (3, 2, 2);
    (c.model.heads, c.model.dim_head, c.model.mlp_dim) = (2, 8, 16);
    let r = c.resolve().unwrap();
    let built = train::build(&r).unwrap();
    let split = data::open_split(&ds, fsct_dist::config::Split::Base).unwrap();
    let cfg = LoaderConfig::for_run(&r, false);
    let mut opt = optim::build(&r.config.train, &built.vs).unwrap();
    let total = built.shape.total() as i64;
    // (loss scaler, reads expected): fp32 reads loss and hits of the episode, in one copy;
    // the fp16 scaler adds its scale (the loss multiplier) and its inf/NaN flag (step or skip).
    for (scaler_mode, expected) in [(AmpMode::Off, 1), (AmpMode::Fp16, 3)] {
        let mut plan = StepPlan::for_run(&r, &Local, Device::Cpu, total);
        plan.amp = AmpMode::Off; // autocast off on the CPU: only the scaler differs
        let mut scaler = GradScaler::for_mode(scaler_mode, Device::Cpu);
        for step in 0..2 {
            let episode = data::load_episode(&split, built.shape, &cfg, 0, step).unwrap();
            let before = host_read::count();
            let trainee = Trainee {
                model: &built.model,
                vs: &built.vs,
                opt: &mut opt,
                scaler: &mut scaler,
            };
            let hooks = StepHooks {
                reload: &|_, _| unreachable!("no out-of-memory retry here"),
                before_optimizer: &mut |_| Ok(()),
                full_grads: false,
                phases: &mut NoProfile,
            };
            let report = optimizer_step(&mut plan, trainee, vec![episode], hooks).unwrap();
            assert!(report.stepped);
            let reads = host_read::count() - before;
            assert_eq!(
                reads, expected,
                "{scaler_mode:?} step {step}: {reads} host reads"
            );
        }
    }
}

/// The count above sees only reads made through `host_read`: none of the step's files reads a
/// tensor another way.
#[test]
fn the_step_path_reads_tensors_only_through_host_read() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<_> = ["step", "optimizer_step", "amp", "bn_sync", "optim"]
        .iter()
        .map(|f| src.join("train").join(format!("{f}.rs")))
        .collect();
    files.extend(
        std::fs::read_dir(src.join("model"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for reader in ["double_value(", "int64_value(", "::try_from(&"] {
            assert!(
                !text.contains(reader),
                "{} reads a tensor with {reader} (use fsct_dist::host_read)",
                path.display()
            );
        }
    }
}
