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

use tch::Tensor;

use crate::memory::{Phase, PhaseSink};
use crate::model::{BnMode, FewShotModel, HeadOutput};

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
    /// BatchNorm groups / micro-chunks of the episode (1 = the official single batch).
    pub micro_steps: i64,
    /// Recompute the backbone segment by segment in the backward, keeping only the segment
    /// boundaries (activation checkpointing).
    pub checkpoint: bool,
    /// Multiplies the loss before backward (1/K for K episodes per step; the AMP scale).
    pub loss_scale: f64,
}

impl StepOptions {
    pub fn plain() -> Self {
        Self {
            micro_steps: 1,
            checkpoint: false,
            loss_scale: 1.0,
        }
    }
}

/// Forward and backward of one episode `x` (N, 3, S, S) in class-major order, accumulating
/// gradients into the model's parameters (`.grad`). Returns the head output.
/// Phase boundaries are reported to `phases` (the memory profiler, or [`crate::memory::NoProfile`]).
pub fn forward_backward(
    model: &FewShotModel,
    x: &Tensor,
    opts: StepOptions,
    phases: &mut dyn PhaseSink,
) -> HeadOutput {
    if opts.micro_steps <= 1 && !opts.checkpoint {
        // The fast path: one graph, one backward, nothing recomputed.
        phases.enter(Phase::BackboneForward);
        let emb = model.embed(x, true);
        phases.enter(Phase::Head);
        let out = model.head(&emb);
        phases.enter(Phase::Backward);
        scaled(&out.loss, opts.loss_scale).backward();
        return out;
    }
    let groups = balanced_groups(x.size()[0], opts.micro_steps);
    let chunk = |r: &Range<i64>| x.narrow(0, r.start, r.end - r.start);
    // Running statistics are updated here, once per group.
    phases.enter(Phase::BackboneForward);
    let emb = tch::no_grad(|| {
        let parts: Vec<Tensor> = groups
            .iter()
            .map(|r| model.embed_t(&chunk(r), BnMode::Train))
            .collect();
        Tensor::cat(&parts, 0)
    })
    .set_requires_grad(true);
    phases.enter(Phase::Head);
    let out = model.head(&emb);
    phases.enter(Phase::Backward);
    scaled(&out.loss, opts.loss_scale).backward();
    let grad_emb = emb.grad();
    for r in &groups {
        let seed = grad_emb.narrow(0, r.start, r.end - r.start);
        if opts.checkpoint {
            backward_by_segments(model, &chunk(r), &seed);
        } else {
            let e = model.embed_t(&chunk(r), BnMode::TrainNoStats);
            let kind = e.kind();
            (e * seed).sum(kind).backward();
        }
    }
    out
}

/// Backpropagates `seed` = dL/d(embedding of `x`) through the backbone one segment at a time:
/// a no-grad pass keeps each segment's input, then from the last segment back each one is
/// recomputed with grad and backpropagated, its input gradient seeding the one before. Only
/// one segment's activations are alive at a time.
fn backward_by_segments(model: &FewShotModel, x: &Tensor, seed: &Tensor) {
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
        if i > 0 {
            seed = input.grad();
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
        assert_eq!((g[0].start, g[3].end), (0, 105));
        assert!(g.windows(2).all(|w| w[0].end == w[1].start));
    }
}
