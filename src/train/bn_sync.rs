//! BatchNorm running statistics across ranks, exactly as one process would have them.
//!
//! One process updates a running statistic once per BatchNorm group, in order:
//! r ← a·r + m·μ_g with a = 1 − m (μ_g the group's batch mean, or unbiased variance). The update
//! is linear, so after rank k ran its M groups from the common start r₀,
//! r_k = a^M·r₀ + Σ_j m·a^(M−1−j)·μ_(kM+j), and the sequential result over all G = W·M groups is
//! a^G·r₀ + Σ_k a^(M·(W−1−k))·(r_k − a^M·r₀): one all-reduce of the bracketed terms. Every rank
//! then holds the single-process statistics (up to float rounding), not an average of them.

use anyhow::Result;
use tch::nn::VarStore;
use tch::Tensor;

use crate::distributed::Communicator;

/// `nn.BatchNorm2d`'s default momentum, used by every backbone here.
pub const MOMENTUM: f64 = 0.1;

/// The running mean and variance tensors of the model, in a fixed (name) order.
pub fn buffers(vs: &VarStore) -> Vec<Tensor> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.ends_with("running_mean") || n.ends_with("running_var"))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, t)| t).collect()
}

/// Copies of the buffers' current values (the common start r₀ of a round).
pub fn snapshot(bufs: &[Tensor]) -> Vec<Tensor> {
    bufs.iter().map(|t| t.detach().copy()).collect()
}

/// Puts the snapshot back (a retried step must not count its failed attempt).
pub fn restore(bufs: &[Tensor], saved: &[Tensor]) {
    for (b, s) in bufs.iter().zip(saved) {
        let mut b = b.shallow_clone();
        tch::no_grad(|| b.copy_(s));
    }
}

/// After rank `rank` of `comm` ran its `micro` groups of a round starting from `start` (equal on
/// every rank), makes `bufs` on every rank the statistics one process would have after all
/// W·`micro` groups in rank order.
pub fn combine(
    comm: &dyn Communicator,
    bufs: &[Tensor],
    start: &[Tensor],
    micro: i64,
) -> Result<()> {
    let world = comm.world();
    if world.size == 1 || bufs.is_empty() {
        return Ok(());
    }
    let a = 1.0 - MOMENTUM;
    let a_m = a.powi(micro as i32);
    let weight = a.powi((micro * (world.size - 1 - world.rank) as i64) as i32);
    let terms: Vec<Tensor> = bufs
        .iter()
        .zip(start)
        .map(|(r, r0)| (r - r0 * a_m) * weight)
        .collect();
    comm.all_reduce_sum(&terms)?;
    let a_g = a.powi((micro * world.size as i64) as i32);
    for ((b, r0), d) in bufs.iter().zip(start).zip(&terms) {
        let mut b = b.shallow_clone();
        tch::no_grad(|| b.copy_(&(r0 * a_g + d)));
    }
    Ok(())
}
