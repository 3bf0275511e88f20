//! One episode's forward and backward, in micro-steps (architecture.md, "The training step").
//!
//! With M = 1 it is a plain forward/backward: the whole episode is one BatchNorm batch, as in the
//! official code. With M > 1 the episode's images are split into M contiguous balanced groups
//! (sizes differ by at most one, larger first); each group is one BatchNorm batch. The backbone
//! runs group by group under `no_grad`, the head runs on all embeddings (a leaf that requires
//! grad), and each group is then recomputed with grad and backpropagated with its rows of
//! dL/dE. The gradient is exactly that of one plain backward over the same groups, while the
//! backbone's activations are held for one group at a time, at the price of one more backbone
//! forward. Running statistics are updated once per group: the recompute uses
//! [`BnMode::TrainNoStats`]. With activation checkpointing each group's backbone backward is
//! done segment by segment from saved segment inputs (one more forward, the activations of one
//! segment alive at a time); it composes with micro-steps and gives the same gradient.

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::distributed::Communicator;
use crate::memory::{Phase, PhaseSink};
use crate::model::{self, BnMode, FewShotModel};
use crate::oom::catch as guard_oom;

use super::overlap::{Group, Overlap};

/// `n` items in `g` contiguous groups whose sizes differ by at most one, larger groups first.
pub fn balanced_groups(n: i64, g: i64) -> Vec<Range<i64>> {
    let g = g.clamp(1, n.max(1));
    let (base, extra) = (n / g, n % g);
    let mut start = 0;
    (0..g)
        .map(|i| {
            let len = base + i64::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// How one episode's forward/backward runs.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    /// BatchNorm groups / micro-chunks of the episode per rank (1 = the official single batch).
    pub micro_steps: i64,
    /// Recompute the backbone segment by segment in the backward, keeping only the segment
    /// boundaries (activation checkpointing).
    pub checkpoint: bool,
    /// Multiplies the loss before backward (1/K for K episodes per step; the AMP scale).
    pub loss_scale: f64,
    /// Test hook: a backbone chunk whose input tensor exceeds this many bytes fails as if the
    /// allocator ran out of memory.
    pub oom_above_bytes: Option<u64>,
    /// Images in the whole episode (the ranks sharing it each hold a slice).
    pub total_images: i64,
    /// Dynamic micro-steps: every rank learns of an out-of-memory on any rank at the next
    /// collective, so all of them return [`StepError::OutOfMemory`] together instead of
    /// waiting on one that gave up.
    pub agree: bool,
}

/// What one episode's step reports (summed over the ranks that share the episode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The episode loss (unscaled).
    pub loss: f64,
    /// Correct query predictions, and queries.
    pub correct: i64,
    pub queries: i64,
}

impl StepOutcome {
    pub fn accuracy(&self) -> f64 {
        100.0 * self.correct as f64 / self.queries.max(1) as f64
    }
}

/// A step that did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// An allocation failed (on this or another rank): retry with more micro-steps.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The BatchNorm groups of an episode of `total` images over `world` ranks of `micro` micro-steps
/// (G = world·micro contiguous balanced groups), and the images rank `rank` owns: groups
/// rank·micro … rank·micro + micro − 1, one contiguous slice.
pub fn rank_groups(
    total: i64,
    world: usize,
    rank: usize,
    micro: i64,
) -> (Vec<Range<i64>>, Range<i64>) {
    let m = micro.max(1) as usize;
    let groups = balanced_groups(total, (world * m) as i64);
    let mine = groups[(rank * m).min(groups.len())..((rank + 1) * m).min(groups.len())].to_vec();
    let slice = match (mine.first(), mine.last()) {
        (Some(a), Some(b)) => a.start..b.end,
        _ => total..total,
    };
    (mine, slice)
}

/// Embeddings of `x` group by group under `no_grad` (running statistics updated once per group).
fn embed_groups(model: &FewShotModel, x: &Tensor, groups: &[Range<i64>]) -> Tensor {
    tch::no_grad(|| {
        let parts: Vec<Tensor> = groups
            .iter()
            .map(|r| model.embed_t(&x.narrow(0, r.start, r.end - r.start), BnMode::Train))
            .collect();
        Tensor::cat(&parts, 0)
    })
}

/// Recomputes each group with grad and backpropagates its rows of `grad_emb` (dL/dE of `x`).
/// With `overlap`, the last group's backward runs segment by segment and launches each
/// segment's gradients once it is done: no later group adds to them.
fn backward_groups(
    model: &FewShotModel,
    x: &Tensor,
    groups: &[Range<i64>],
    grad_emb: &Tensor,
    checkpoint: bool,
    mut overlap: Option<&mut Overlap>,
) {
    for (k, r) in groups.iter().enumerate() {
        let chunk = x.narrow(0, r.start, r.end - r.start);
        let seed = grad_emb.narrow(0, r.start, r.end - r.start);
        let last = k + 1 == groups.len();
        let cut = last && overlap.is_some();
        let mut done = |i: usize| {
            if let (true, Some(o)) = (last, overlap.as_deref_mut()) {
                o.ready(Group::Segment(i));
            }
        };
        if checkpoint {
            backward_by_segments(model, &chunk, &seed, &mut done);
        } else if cut {
            SegmentGraph::forward(model, &chunk, BnMode::TrainNoStats).backward(&seed, &mut done);
        } else {
            let e = model.embed_t(&chunk, BnMode::TrainNoStats);
            let kind = e.kind();
            (e * seed).sum(kind).backward();
        }
    }
}

/// The step engine: one episode's forward and backward, shared by the ranks of `comm` (the
/// world under `--shard images`; [`crate::distributed::Local`] for one process or
/// `--shard episodes`, where every collective is the identity). `x` (n, 3, S, S) holds this
/// rank's slice of the class-major episode (see [`rank_groups`]; the whole episode alone).
/// Each rank embeds its slice in its micro-steps, the embeddings are all-gathered, each rank
/// computes the head loss of its share of the queries (rank 0 adds the VIC terms), the
/// embedding gradients are summed over ranks, and each rank backpropagates its slice.
/// Parameter gradients accumulate in `.grad`, left for the caller to all-reduce once per
/// optimizer step. Alone with M = 1 and no checkpointing it is one plain graph and backward:
/// no gather, no recompute. Phase boundaries go to `phases` (the memory profiler, or
/// [`crate::memory::NoProfile`]). With `overlap` (the step's last episode under `--overlap`),
/// each parameter group is handed to it as soon as its gradient is final: the head after the
/// head's backward, then each backbone segment, last to first, in the last micro-step.
pub fn forward_backward(
    model: &FewShotModel,
    x: &Tensor,
    opts: StepOptions,
    comm: &dyn Communicator,
    phases: &mut dyn PhaseSink,
    mut overlap: Option<&mut Overlap>,
) -> Result<StepOutcome, StepError> {
    let (total, agree) = (opts.total_images, opts.agree);
    let world = comm.world();
    let (w, rank) = (world.size, world.rank);
    let cfg = model.config();
    let n_query = cfg.n_query;
    let (mine, slice) = rank_groups(total, w, rank, opts.micro_steps);
    let local: Vec<Range<i64>> = mine
        .iter()
        .map(|g| g.start - slice.start..g.end - slice.start)
        .collect();
    // Agreement points: with `agree`, every rank reports whether it got this far.
    let sync = |ok: Result<(), String>| -> Result<(), StepError> {
        let all = if agree && w > 1 {
            crate::distributed::all_ok(comm, ok.is_ok())?
        } else {
            ok.is_ok()
        };
        match (ok, all) {
            (Err(e), _) => Err(StepError::OutOfMemory(e)),
            (Ok(()), false) => Err(StepError::OutOfMemory(
                "another rank ran out of memory".into(),
            )),
            (Ok(()), true) => Ok(()),
        }
    };
    let fast = w == 1 && opts.micro_steps <= 1 && !opts.checkpoint && overlap.is_none();
    let keep_graph = opts.micro_steps <= 1 && !opts.checkpoint;
    // Overlap with one group and no checkpointing: the graph is cut at the segment boundaries
    // so that its backward can go one segment at a time.
    let mut cut: Option<SegmentGraph> = None;

    phases.enter(Phase::BackboneForward);
    let forward = guard_oom(|| {
        for g in &local {
            simulated_oom(x, g, opts.oom_above_bytes)?;
        }
        Ok(if keep_graph && overlap.is_some() {
            let graph = SegmentGraph::forward(model, x, BnMode::Train);
            let e = graph.embedding(model);
            cut = Some(graph);
            e
        } else if keep_graph {
            model.embed_t(x, BnMode::Train)
        } else {
            embed_groups(model, x, &local)
        })
    });
    let emb_local = match forward {
        Ok(e) => {
            sync(Ok(()))?;
            e
        }
        Err(e) => return Err(sync(Err(e)).unwrap_err()),
    };

    phases.enter(Phase::Head);
    let gathered = if w > 1 {
        let rows: Vec<i64> = (0..w)
            .map(|r| rank_groups(total, w, r, opts.micro_steps).1)
            .map(|s| s.end - s.start)
            .collect();
        phases.enter(Phase::Communication);
        let g = comm.all_gather_rows(&emb_local.detach(), &rows)?;
        phases.enter(Phase::Head);
        g
    } else if fast {
        emb_local.shallow_clone()
    } else {
        emb_local.detach()
    };
    let emb = if fast {
        gathered
    } else {
        gathered.set_requires_grad(true)
    };
    let queries = balanced_groups(cfg.n_way * n_query, w as i64)
        .get(rank)
        .cloned()
        .unwrap_or(0..0);
    let head = guard_oom(|| {
        let out = if w == 1 {
            model.head(&emb)
        } else {
            model.head_part(&emb, queries.clone(), rank == 0)
        };
        phases.enter(Phase::Backward);
        let loss = scaled(&out.loss, opts.loss_scale);
        // A rank with no queries of its own (more ranks than queries) and no VIC term has a
        // constant loss: it adds nothing to dL/dE, which stays zero for it below.
        if loss.requires_grad() {
            loss.backward();
        }
        Ok(out)
    });
    let out = match head {
        Ok(o) => {
            sync(Ok(()))?;
            o
        }
        Err(e) => return Err(sync(Err(e)).unwrap_err()),
    };
    // The step's one read to the host: loss and hits together.
    let hits = model::correct_on_device(&out.logits, n_query, queries.start);
    let both = Tensor::stack(
        &[
            out.loss.detach().to_kind(Kind::Double),
            hits.to_kind(Kind::Double),
        ],
        0,
    );
    let read = crate::host_read::values(&both)?;
    let outcome_local = [read[0], read[1], out.logits.size()[0] as f64];
    if !fast {
        let grad = emb.grad();
        let grad = if grad.defined() {
            grad
        } else {
            emb.zeros_like()
        };
        if w > 1 {
            phases.enter(Phase::Communication);
            comm.all_reduce_sum(&[grad.shallow_clone()])?;
            phases.enter(Phase::Backward);
        }
        // The head's gradients are final since the head's backward; they go out after the
        // embeddings' all-reduce above, so that a backend running its collectives in order on
        // one stream (NCCL) does not queue that small one behind them and stall the backbone's
        // backward.
        if let Some(o) = overlap.as_deref_mut() {
            o.ready(Group::Head);
        }
        let seed = grad.narrow(0, slice.start, slice.end - slice.start);
        let backward = guard_oom(|| {
            if let Some(graph) = cut.take() {
                let mut done = |i| {
                    if let Some(o) = overlap.as_deref_mut() {
                        o.ready(Group::Segment(i));
                    }
                };
                graph.backward(&seed, &mut done);
            } else if keep_graph {
                let kind = emb_local.kind();
                (&emb_local * &seed).sum(kind).backward();
            } else {
                backward_groups(model, x, &local, &seed, opts.checkpoint, overlap);
            }
            Ok(())
        });
        sync(backward)?;
    }
    let mut totals = outcome_local;
    if w > 1 {
        comm.all_reduce_f64(&mut totals)?;
    }
    Ok(StepOutcome {
        loss: totals[0],
        correct: totals[1].round() as i64,
        queries: totals[2].round() as i64,
    })
}

/// Fails like an allocator would when the test hook's threshold is below the chunk's input.
fn simulated_oom(x: &Tensor, g: &Range<i64>, limit: Option<u64>) -> Result<(), String> {
    let Some(limit) = limit else { return Ok(()) };
    let per_image = (x.numel() / x.size()[0].max(1) as usize * x.kind().elt_size_in_bytes()) as u64;
    let bytes = per_image * (g.end - g.start) as u64;
    if bytes > limit {
        return Err(format!(
            "simulated: a chunk of {} images ({bytes} bytes) is above the test limit of {limit} bytes",
            g.end - g.start
        ));
    }
    Ok(())
}

/// Backpropagates `seed` = dL/d(embedding of `x`) through the backbone one segment at a time:
/// a no-grad pass keeps each segment's input, then from the last segment back each one is
/// recomputed with grad and backpropagated, its input gradient seeding the one before. Only
/// one segment's activations are alive at a time. `done(i)` follows segment i's backward.
fn backward_by_segments(
    model: &FewShotModel,
    x: &Tensor,
    seed: &Tensor,
    done: &mut dyn FnMut(usize),
) {
    let f = model.feature();
    let n = f.num_segments();
    let mut inputs = Vec::with_capacity(n);
    let maps = tch::no_grad(|| {
        (0..n).fold(x.shallow_clone(), |y, i| {
            let next = f.forward_segment(i, &y, BnMode::TrainNoStats);
            inputs.push(y);
            next
        })
    });
    let mut seed = seed.reshape(maps.size());
    for i in (0..n).rev() {
        let input = if i == 0 {
            inputs[0].shallow_clone()
        } else {
            inputs[i].detach().set_requires_grad(true)
        };
        let out = f.forward_segment(i, &input, BnMode::TrainNoStats);
        let kind = out.kind();
        (out * &seed).sum(kind).backward();
        done(i);
        if i > 0 {
            seed = input.grad();
        }
    }
}

/// The backbone's forward with grad, cut at its segment boundaries: each segment's graph
/// starts at a leaf copy of the previous segment's output, so the backward can run one segment
/// at a time, from the last, and tell when each segment's parameters are final. The same
/// operations and the same memory as one uncut graph, and the same gradients.
struct SegmentGraph {
    /// Segment i's input (the images for i = 0, else a leaf that requires grad).
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

impl SegmentGraph {
    fn forward(model: &FewShotModel, x: &Tensor, mode: BnMode) -> Self {
        let f = model.feature();
        let n = f.num_segments();
        let (mut inputs, mut outputs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut y = x.shallow_clone();
        for i in 0..n {
            let input = if i == 0 {
                y
            } else {
                y.detach().set_requires_grad(true)
            };
            y = f.forward_segment(i, &input, mode);
            inputs.push(input);
            outputs.push(y.shallow_clone());
        }
        Self { inputs, outputs }
    }

    fn embedding(&self, model: &FewShotModel) -> Tensor {
        model.maps_to_embedding(self.outputs.last().expect("a backbone has segments"))
    }

    /// Backpropagates `seed` = dL/d(embedding), segment by segment; `done(i)` follows segment
    /// i's backward. Each segment's graph is freed after its backward.
    fn backward(mut self, seed: &Tensor, done: &mut dyn FnMut(usize)) {
        let last = self.outputs.last().expect("a backbone has segments");
        let mut seed = seed.reshape(last.size());
        for i in (0..self.outputs.len()).rev() {
            let out = self.outputs.pop().expect("one output per segment");
            let kind = out.kind();
            (out * &seed).sum(kind).backward();
            done(i);
            let input = self.inputs.pop().expect("one input per segment");
            if i > 0 {
                seed = input.grad();
            }
        }
    }
}

fn scaled(loss: &Tensor, s: f64) -> Tensor {
    if s == 1.0 {
        loss.shallow_clone()
    } else {
        loss * s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_contiguous_balanced_larger_first() {
        let sizes = |n, g| {
            balanced_groups(n, g)
                .iter()
                .map(|r| r.end - r.start)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(105, 4), [27, 26, 26, 26]);
        assert_eq!(sizes(10, 3), [4, 3, 3]);
        assert_eq!(sizes(8, 1), [8]);
        assert_eq!(sizes(3, 5), [1, 1, 1], "never an empty group");
        let g = balanced_groups(105, 4);
        // W = 2, M = 2: rank 1 owns groups 2 and 3.
        let (mine, slice) = rank_groups(105, 2, 1, 2);
        assert_eq!(mine, vec![53..79, 79..105]);
        assert_eq!(slice, 53..105);
        assert_eq!(rank_groups(105, 4, 0, 1).1, 0..27);
        assert_eq!((g[0].start, g[3].end), (0, 105));
        assert!(g.windows(2).all(|w| w[0].end == w[1].start));
    }
}
