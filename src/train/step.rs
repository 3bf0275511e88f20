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
//! [`BnMode::TrainNoStats`].

use std::ops::Range;

use tch::Tensor;

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

/// Forward and backward of one episode `x` (N, 3, S, S) in class-major order, accumulating
/// gradients into the model's parameters (`.grad`, scaled by `loss_scale`). Returns the head
/// output (detached from any graph that was freed).
pub fn forward_backward(
    model: &FewShotModel,
    x: &Tensor,
    micro_steps: i64,
    loss_scale: f64,
) -> HeadOutput {
    if micro_steps <= 1 {
        let out = model.head(&model.embed(x, true));
        scaled(&out.loss, loss_scale).backward();
        return out;
    }
    let groups = balanced_groups(x.size()[0], micro_steps);
    let chunk = |r: &Range<i64>| x.narrow(0, r.start, r.end - r.start);
    let emb = tch::no_grad(|| {
        let parts: Vec<Tensor> = groups
            .iter()
            .map(|r| model.embed_t(&chunk(r), BnMode::Train))
            .collect();
        Tensor::cat(&parts, 0)
    })
    .set_requires_grad(true);
    let out = model.head(&emb);
    scaled(&out.loss, loss_scale).backward();
    let grad_emb = emb.grad();
    for r in &groups {
        let e = model.embed_t(&chunk(r), BnMode::TrainNoStats);
        let kind = e.kind();
        (e * grad_emb.narrow(0, r.start, r.end - r.start))
            .sum(kind)
            .backward();
    }
    out
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
