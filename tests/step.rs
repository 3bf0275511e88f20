//! Micro-steps are exact: the recompute-with-embedding-gradient step gives the gradient of one
//! plain forward/backward over the same BatchNorm groups, and the same running statistics.

mod common;
use common::worst_grad_error;
use fsct_dist::config::{Backbone, Method};
use fsct_dist::distributed::{AbortHandle, Communicator, Local, World};
use fsct_dist::memory::NoProfile;
use fsct_dist::model::{BnMode, FewShotModel, ModelConfig};
use fsct_dist::train::overlap::Overlap;
use fsct_dist::train::step::{balanced_groups, forward_backward, StepOptions, StepOutcome};
use tch::{nn, Device, Kind, Tensor};

const N_WAY: i64 = 3;
const K_SHOT: i64 = 2;
const N_QUERY: i64 = 3; // 15 images: uneven groups for M = 2 (8, 7) and M = 4 (4, 4, 4, 3)
const SIZE: i64 = 20;

fn opts(micro_steps: i64, checkpoint: bool, loss_scale: f64) -> StepOptions {
    StepOptions {
        micro_steps,
        checkpoint,
        loss_scale,
        oom_above_bytes: None,
        total_images: 0, // set from the episode by step_alone
        agree: false,
    }
}

/// The trainer's step engine on one process (the `Local` communicator), on the whole episode `x`.
fn step_alone(model: &FewShotModel, x: &Tensor, opts: StepOptions) -> StepOutcome {
    let opts = StepOptions {
        total_images: x.size()[0],
        ..opts
    };
    forward_backward(model, x, opts, &Local, &mut NoProfile, None).expect("a step on the CPU")
}

fn build(method: Method, seed: i64) -> (nn::VarStore, FewShotModel) {
    build_with(method, Backbone::Conv4, SIZE, seed)
}

/// Held while a test seeds and draws from libtorch's global generator.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds a model. Tests run on parallel threads sharing libtorch's global generator, so a
/// seed alone does not make two models equal: the second of a pair copies the first ([`twin`]).
fn build_with(
    method: Method,
    backbone: Backbone,
    size: i64,
    seed: i64,
) -> (nn::VarStore, FewShotModel) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = ModelConfig::new(method, backbone, N_WAY, K_SHOT, N_QUERY, size);
    (cfg.model.heads, cfg.model.dim_head, cfg.model.mlp_dim) = (2, 8, 16);
    (cfg.model.lambda_v, cfg.model.lambda_c) = (0.5, 0.1); // the VIC terms backpropagate through the support rows too
    let model = FewShotModel::new(&vs.root(), &cfg).unwrap();
    (vs, model)
}

/// A second model with exactly the weights and buffers of `of`.
fn twin(
    of: &nn::VarStore,
    method: Method,
    backbone: Backbone,
    size: i64,
) -> (nn::VarStore, FewShotModel) {
    let (mut vs, model) = build_with(method, backbone, size, 0);
    vs.copy(of).unwrap();
    (vs, model)
}

/// The reference: each group one BatchNorm batch, all in one autograd graph, one backward.
fn plain_backward_over_groups(model: &FewShotModel, x: &Tensor, m: i64) {
    let parts: Vec<Tensor> = balanced_groups(x.size()[0], m)
        .iter()
        .map(|r| model.embed_t(&x.narrow(0, r.start, r.end - r.start), BnMode::Train))
        .collect();
    model.head(&Tensor::cat(&parts, 0)).loss.backward();
}

fn buffers_equal(a: &nn::VarStore, b: &nn::VarStore) -> f64 {
    let (va, vb) = (a.variables(), b.variables());
    va.iter()
        .filter(|(n, _)| n.contains("running_"))
        .map(|(n, t)| (t - &vb[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn micro_steps_equal_one_plain_backward_over_the_same_groups() {
    let x = Tensor::randn(
        [N_WAY * (K_SHOT + N_QUERY), 3, SIZE, SIZE],
        (Kind::Float, Device::Cpu),
    );
    for method in [Method::FsctCosine, Method::ProtoNet] {
        for m in [1, 2, 4] {
            let (vs_ref, reference) = build(method, 11);
            let (vs, model) = twin(&vs_ref, method, Backbone::Conv4, SIZE);
            plain_backward_over_groups(&reference, &x, m);
            let out = step_alone(&model, &x, opts(m, false, 1.0));
            assert!(out.loss.is_finite());
            let (err, name) = worst_grad_error(&vs, &vs_ref);
            assert!(
                err <= 1e-5,
                "{method:?} M={m}: gradient of {name} differs by {err:.2e}"
            );
            let stats = buffers_equal(&vs, &vs_ref);
            assert!(
                stats <= 1e-6,
                "{method:?} M={m}: running statistics differ by {stats:.2e}"
            );
        }
    }
}

#[test]
fn activation_checkpointing_gives_the_same_gradients_and_statistics() {
    // Conv4 (a segment per block), CTX on Conv4 (map embeddings), and a FETI ResNet10 (stem +
    // four stages, the last with the adaptive pool) at a small size.
    for (method, backbone, size) in [
        (Method::FsctCosine, Backbone::Conv4, SIZE),
        (Method::CtxCosine, Backbone::Conv4, SIZE),
        (Method::FsctCosine, Backbone::FetiResNet10, 32),
    ] {
        let x = Tensor::randn(
            [N_WAY * (K_SHOT + N_QUERY), 3, size, size],
            (Kind::Float, Device::Cpu),
        );
        for m in [1, 2] {
            let (vs_ref, reference) = build_with(method, backbone, size, 21);
            let (vs, model) = twin(&vs_ref, method, backbone, size);
            step_alone(&reference, &x, opts(m, false, 1.0));
            step_alone(&model, &x, opts(m, true, 1.0));
            let (err, name) = worst_grad_error(&vs, &vs_ref);
            assert!(err <= 1e-5, "{method:?}/{backbone:?} M={m}: checkpointed gradient of {name} differs by {err:.2e}");
            let stats = buffers_equal(&vs, &vs_ref);
            assert!(
                stats <= 1e-6,
                "{method:?}/{backbone:?} M={m}: running statistics differ by {stats:.2e}"
            );
        }
    }
}

#[test]
fn batchnorm_groups_change_the_objective() {
    // Guard against a "micro-step" that silently equals the single-batch gradient: with
    // per-group statistics the gradient must differ from the one-group gradient.
    let x = Tensor::randn(
        [N_WAY * (K_SHOT + N_QUERY), 3, SIZE, SIZE],
        (Kind::Float, Device::Cpu),
    );
    let (vs1, m1) = build(Method::FsctCosine, 5);
    let (vs4, m4) = twin(&vs1, Method::FsctCosine, Backbone::Conv4, SIZE);
    step_alone(&m1, &x, opts(1, false, 1.0));
    step_alone(&m4, &x, opts(4, false, 1.0));
    let (err, _) = worst_grad_error(&vs4, &vs1);
    assert!(
        err > 1e-3,
        "4 BatchNorm groups should change the gradient, got {err:.2e}"
    );
}

#[test]
fn loss_scale_scales_every_gradient() {
    let x = Tensor::randn(
        [N_WAY * (K_SHOT + N_QUERY), 3, SIZE, SIZE],
        (Kind::Float, Device::Cpu),
    );
    let (vs_a, a) = build(Method::FsctCosine, 3);
    let (vs_b, b) = twin(&vs_a, Method::FsctCosine, Backbone::Conv4, SIZE);
    step_alone(&a, &x, opts(2, false, 0.5));
    step_alone(&b, &x, opts(2, false, 1.0));
    for t in vs_a.variables().values() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.g_mul_scalar_(2.0);
        }
    }
    let (err, name) = worst_grad_error(&vs_a, &vs_b);
    assert!(
        err <= 1e-6,
        "2 × (gradient at scale 0.5) differs from scale 1 in {name}: {err:.2e}"
    );
}

/// `--episodes-per-step 2` through the real training loop (with `--dump-grads`) equals the mean
/// of the two episodes' gradients computed here one by one from the same initial weights.
#[test]
fn episodes_per_step_averages_the_episode_gradients() {
    use fsct_dist::config::{RunConfig, Split};
    use fsct_dist::data::{self, synth::SynthOptions};
    use fsct_dist::train::{self, Dumps};

    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    data::write_dataset(
        &ds,
        &SynthOptions {
            classes: [4, 3, 3],
            images_per_class: 6,
            size: 24,
            seed: 1,
        },
    )
    .unwrap();
    let mut c = RunConfig::default();
    c.data.dataset = ds.to_string_lossy().into_owned();
    c.data.image_size = 24;
    (c.episode.n_way, c.episode.k_shot, c.episode.n_query) = (3, 2, 2);
    (c.model.heads, c.model.dim_head, c.model.mlp_dim) = (2, 8, 16);
    (
        c.train.epochs,
        c.train.episodes_per_epoch,
        c.train.val_episodes,
        c.train.max_steps,
    ) = (1, 2, 1, 1);
    c.train.episodes_per_step = 2;
    c.test.episodes = 1;
    c.run.output = dir.path().join("run");
    let r = c.resolve().unwrap();
    let dumped = dir.path().join("grads.safetensors");
    // Both runs seed and then draw the initial weights: keep other tests' draws out of the way.
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    train::train(
        &r,
        &Dumps {
            grads: Some(dumped.clone()),
            ..Dumps::default()
        },
        &fsct_dist::distributed::Local,
        train::Start::Fresh { overwrite: false },
    )
    .unwrap();
    let dumped: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&dumped)
        .unwrap()
        .into_iter()
        .collect();

    // The same two episodes, one backward each, from the same initial weights.
    let built = train::build(&r).unwrap();
    let split = data::open_split(&ds, Split::Base).unwrap();
    let cfg = data::LoaderConfig::for_run(&r, false);
    for index in 0..2 {
        let ep = data::load_episode(&split, built.shape, &cfg, 0, index).unwrap();
        step_alone(&built.model, &ep.images.flatten(0, 1), opts(1, false, 0.5));
    }
    let vars = built.vs.variables();
    let total: f64 = dumped
        .values()
        .map(|g| g.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    assert!(total > 0.0);
    assert_eq!(
        dumped.len(),
        vars.values().filter(|t| t.grad().defined()).count()
    );
    for (name, g) in &dumped {
        let mine = vars[name].grad();
        let err =
            (&mine - g).norm().double_value(&[]) / g.norm().double_value(&[]).max(1e-3 * total);
        assert!(err <= 1e-5, "{name}: {err:.2e}");
    }
}

/// A communicator that keeps a copy of every tensor handed to
/// [`Communicator::start_all_reduce_sum`], as it was at that moment, and the order of the calls.
/// In a world of one by default; in a larger one it plays rank 0 and the other ranks add
/// nothing (zero embeddings).
#[derive(Default)]
struct Recorder {
    started: std::cell::RefCell<Vec<Tensor>>,
    calls: std::cell::RefCell<Vec<&'static str>>,
    world: Option<World>,
}

impl Communicator for Recorder {
    fn world(&self) -> World {
        self.world.unwrap_or(World::SINGLE)
    }
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn overlaps(&self) -> bool {
        true
    }
    fn start_all_reduce_sum(&self, tensors: Vec<Tensor>) -> anyhow::Result<()> {
        self.calls.borrow_mut().push("start_all_reduce_sum");
        let mut started = self.started.borrow_mut();
        started.extend(tensors.iter().map(|t| t.copy()));
        Ok(())
    }
    fn all_reduce_sum(&self, _: &[Tensor]) -> anyhow::Result<()> {
        self.calls.borrow_mut().push("all_reduce_sum");
        Ok(())
    }
    fn reduce_sum(&self, _: &[Tensor], _: usize) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_gather_rows(&self, local: &Tensor, rows: &[i64]) -> anyhow::Result<Tensor> {
        self.calls.borrow_mut().push("all_gather_rows");
        let mut shape = local.size();
        shape[0] = rows[1..].iter().sum();
        let others = Tensor::zeros(&shape[..], (local.kind(), local.device()));
        Ok(Tensor::cat(&[local.shallow_clone(), others], 0))
    }
    fn broadcast(&self, _: &[Tensor], _: usize) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_gather_f64(&self, values: &[f64]) -> anyhow::Result<Vec<f64>> {
        Ok(values.to_vec())
    }
    fn barrier(&self) -> anyhow::Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn abort_handle(&self) -> AbortHandle {
        Box::new(|code| std::process::exit(code))
    }
    fn bytes_sent(&self) -> u64 {
        0
    }
}

#[test]
fn overlap_launches_every_gradient_once_and_only_when_it_is_final() {
    // Each group's gradients, copied when the step engine hands them to the all-reduce, must
    // equal the gradients at the end of the step (nothing added after launch), every trainable
    // tensor must be launched exactly once, and the gradients must equal those of the step
    // without overlap (the graph cut at segment boundaries changes nothing).
    for (backbone, size) in [(Backbone::Conv4, SIZE), (Backbone::FetiResNet10, 32)] {
        let x = Tensor::randn(
            [N_WAY * (K_SHOT + N_QUERY), 3, size, size],
            (Kind::Float, Device::Cpu),
        );
        for (m, checkpoint) in [(1, false), (2, false), (1, true), (2, true)] {
            let method = Method::FsctCosine;
            let (vs_ref, reference) = build_with(method, backbone, size, 31);
            let (vs, model) = twin(&vs_ref, method, backbone, size);
            step_alone(&reference, &x, opts(m, checkpoint, 1.0));

            let recorder = Recorder::default();
            let mut named: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let mut overlap = Overlap::new(&recorder, &model, &named, None);
            let o = StepOptions {
                total_images: x.size()[0],
                ..opts(m, checkpoint, 1.0)
            };
            forward_backward(&model, &x, o, &Local, &mut NoProfile, Some(&mut overlap)).unwrap();
            let segments = model.feature().num_segments();
            assert_eq!(
                overlap.finish().unwrap(),
                1 + segments,
                "{backbone:?} M={m} checkpoint={checkpoint}: the head and every segment go out during the backward"
            );
            let started = recorder.started.into_inner();
            assert_eq!(started.len(), named.len(), "every gradient once");
            for (copy, (name, var)) in started.iter().zip(launch_order(&model, &named)) {
                assert!(
                    copy.equal(&var.grad()),
                    "{backbone:?} M={m} checkpoint={checkpoint}: {name} changed after it was launched"
                );
            }
            let (err, name) = worst_grad_error(&vs, &vs_ref);
            assert!(
                err <= 1e-6,
                "{backbone:?} M={m} checkpoint={checkpoint}: gradient of {name} differs by {err:.2e} with overlap"
            );
        }
    }
}

#[test]
fn in_images_mode_the_embedding_all_reduce_goes_out_before_the_head_gradients() {
    // The all-reduce of the embeddings' gradients sits inside the backward (the backbone's
    // backward waits for it). A backend that runs its collectives in order on one stream (NCCL)
    // would queue it behind the head's gradients (200 MB for ResNet34 FS-CT) if those went out
    // first, and the backbone backward, which the overlap is meant to run beside them, would
    // wait for them all.
    let (vs, model) = build_with(Method::FsctCosine, Backbone::Conv4, SIZE, 31);
    let total = N_WAY * (K_SHOT + N_QUERY);
    let world = World {
        rank: 0,
        size: 2,
        local_rank: 0,
        local_size: 2,
    };
    let recorder = Recorder {
        world: Some(world),
        ..Recorder::default()
    };
    let (_, mine) = fsct_dist::train::step::rank_groups(total, 2, 0, 1);
    let x = Tensor::randn(
        [mine.end - mine.start, 3, SIZE, SIZE],
        (Kind::Float, Device::Cpu),
    );
    let named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let mut overlap = Overlap::new(&recorder, &model, &named, None);
    let o = StepOptions {
        total_images: total,
        ..opts(1, false, 1.0)
    };
    forward_backward(&model, &x, o, &recorder, &mut NoProfile, Some(&mut overlap)).unwrap();
    overlap.finish().unwrap();
    let calls = recorder.calls.into_inner();
    let embeddings = calls.iter().position(|&c| c == "all_reduce_sum");
    let first_start = calls.iter().position(|&c| c == "start_all_reduce_sum");
    assert!(
        matches!((embeddings, first_start), (Some(e), Some(h)) if e < h),
        "the embeddings' all-reduce must precede every overlapped launch: {calls:?}"
    );
}

/// The variables in the order the step engine launches them: the head, then the backbone's
/// segments from the last to the first (the naive reading of the variable names).
fn launch_order(model: &FewShotModel, named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let segment = |name: &str| -> Option<usize> {
        let rest = name.strip_prefix("feature.")?;
        let first = rest.split('.').next().unwrap();
        Some(match first {
            "trunk" => rest.split('.').nth(1).unwrap().parse().unwrap(),
            "conv1" | "bn1" => 0,
            layer => layer.strip_prefix("layer").unwrap().parse().unwrap(),
        })
    };
    let n = model.feature().num_segments();
    let mut out: Vec<(String, Tensor)> = named
        .iter()
        .filter(|(n, _)| segment(n).is_none())
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    for i in (0..n).rev() {
        out.extend(
            named
                .iter()
                .filter(|(n, _)| segment(n) == Some(i))
                .map(|(n, t)| (n.clone(), t.shallow_clone())),
        );
    }
    out
}
