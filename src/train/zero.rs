//! ZeRO stage 1 (`--shard-optimizer on`): the optimizer state sharded over the ranks.
//!
//! Every trainable tensor has one owner rank. A step reduces each gradient to its owner only
//! (instead of all-reducing it), the owner alone steps it (so only the owner holds its moments:
//! the optimizer state per rank is about 1/W of the whole), then each owner broadcasts its
//! updated parameters. Reduce + broadcast move the bytes of one all-reduce.
//!
//! Why whole tensors and not a flat 1/W slice of every tensor: AdamW, Adam and SGD update each
//! element from that element's gradient and state alone (and one step count per tensor), so a
//! tensor-granular split gives exactly the unsharded result with no flattening, no
//! re-chunking on a world-size change, and checkpoints in the unsharded per-tensor format. The
//! price is a balance to within one tensor, which the greedy split below keeps small.
//!
//! Checkpoints are written unsharded: [`gather_state`] brings every owner's state to rank 0
//! for the save (and drops it after), and a load reads the whole state and then keeps the
//! owned part ([`super::optim::Optimizer::shard`]), so a checkpoint resumes at any world size,
//! sharded or not.

use anyhow::Result;
use tch::Tensor;

use super::optim::Optimizer;
use crate::distributed::Communicator;

pub use super::ownership::{balance, Ownership};

fn pick(tensors: &[Tensor], idx: &[usize]) -> Vec<Tensor> {
    idx.iter().map(|&i| tensors[i].shallow_clone()).collect()
}

/// Sums every gradient into its owner (one bucketed reduce per owner rank); the other ranks'
/// copies keep their local values and must not be used.
pub fn reduce_to_owners(comm: &dyn Communicator, own: &Ownership, grads: &[Tensor]) -> Result<()> {
    for r in 0..own.world {
        let mine = pick(grads, &own.of_rank(r));
        if !mine.is_empty() {
            comm.reduce_sum(&mine, r)?;
        }
    }
    Ok(())
}

/// Overwrites every parameter with its owner's (one bucketed broadcast per owner rank).
pub fn broadcast_from_owners(
    comm: &dyn Communicator,
    own: &Ownership,
    params: &[Tensor],
) -> Result<()> {
    for r in 0..own.world {
        let theirs = pick(params, &own.of_rank(r));
        if !theirs.is_empty() {
            tch::no_grad(|| comm.broadcast(&theirs, r))?;
        }
    }
    Ok(())
}

/// The whole optimizer state, as [`Optimizer::state_tensors`] of an unsharded run names and
/// orders it, on rank 0 (None elsewhere). Every rank calls it. Each owner broadcasts its
/// moments (the other ranks receive into temporary buffers, dropped on return except rank
/// 0's, which live until the checkpoint is written); step counts and which moments exist go
/// through one host all-reduce.
pub fn gather_state(
    comm: &dyn Communicator,
    own: &Ownership,
    opt: &Optimizer,
) -> Result<Option<Vec<(String, Tensor)>>> {
    let n = own.owner.len();
    // Per variable: step, has exp_avg, has exp_avg_sq (the owner's; zeros elsewhere).
    let mut meta = vec![0.0; 3 * n];
    for i in (0..n).filter(|&i| own.owns(i)) {
        let s = opt.var_state(i);
        meta[3 * i] = s.step as f64;
        meta[3 * i + 1] = f64::from(u8::from(s.exp_avg.is_some()));
        meta[3 * i + 2] = f64::from(u8::from(s.exp_avg_sq.is_some()));
    }
    comm.all_reduce_f64(&mut meta)?;
    let mut moments: Vec<[Option<Tensor>; 2]> = (0..n).map(|_| [None, None]).collect();
    for r in 0..own.world {
        let mut sent = Vec::new();
        for i in own.of_rank(r) {
            for (k, slot) in moments[i].iter_mut().enumerate() {
                if meta[3 * i + 1 + k] == 0.0 {
                    continue;
                }
                let t = if r == own.rank {
                    let s = opt.var_state(i);
                    let m = if k == 0 { &s.exp_avg } else { &s.exp_avg_sq };
                    m.as_ref()
                        .expect("the owner has what it announced")
                        .shallow_clone()
                } else {
                    opt.var(i).zeros_like().detach()
                };
                sent.push(t.shallow_clone());
                *slot = Some(t);
            }
        }
        if !sent.is_empty() {
            comm.broadcast(&sent, r)?;
        }
    }
    if own.rank != 0 {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (i, [m, v]) in moments.into_iter().enumerate() {
        let name = opt.var_name(i);
        out.push((format!("{name}.step"), Tensor::from(meta[3 * i] as i64)));
        if let Some(m) = m {
            out.push((format!("{name}.exp_avg"), m));
        }
        if let Some(v) = v {
            out.push((format!("{name}.exp_avg_sq"), v));
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tensor_is_owned_once_deterministically_and_balanced() {
        let numels = [100, 3, 3, 50, 50, 7, 1, 64, 64, 2];
        for world in 1..=5 {
            let owner = balance(&numels, world);
            assert_eq!(owner, balance(&numels, world), "deterministic");
            assert_eq!(owner.len(), numels.len(), "one owner per tensor");
            assert!(owner.iter().all(|&r| r < world));
            let mut load = vec![0; world];
            for (i, &r) in owner.iter().enumerate() {
                load[r] += numels[i];
            }
            let total: i64 = numels.iter().sum();
            let largest = *numels.iter().max().unwrap();
            let (lo, hi) = (*load.iter().min().unwrap(), *load.iter().max().unwrap());
            // Greedy largest-first: no rank is more than one (largest) tensor above the mean.
            assert!(
                hi * world as i64 <= total + largest * world as i64,
                "{load:?}"
            );
            assert!(hi - lo <= largest, "{world}: {load:?}");
        }
        // The two largest go to different ranks; ties break towards the lower rank and name.
        assert_eq!(balance(&[10, 10, 1], 2), vec![0, 1, 0]);
        assert_eq!(balance(&[1, 1, 1], 3), vec![0, 1, 2]);
        // More ranks than tensors: some own nothing.
        assert_eq!(balance(&[5, 9], 4), vec![1, 0]);
    }
}
