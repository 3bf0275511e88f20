//! Which rank owns each trainable tensor under `--shard-optimizer` (ZeRO stage 1, see
//! [`super::zero`]): a fact about shapes and the world size only, so the optimizer (which steps
//! what it owns) and the collectives (which move each tensor to and from its owner) share it
//! without depending on each other.

/// Which rank owns (steps, and holds the state of) each trainable tensor, in the optimizer's
/// name order. The same on every rank: it depends on the shapes and the world size only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub owner: Vec<usize>,
    pub rank: usize,
    pub world: usize,
}

/// Greedy balance by element count: tensors in decreasing size (name order among equal
/// sizes), each to the rank that owns the fewest elements so far (the lowest such rank). The
/// largest-first order keeps the heaviest rank within one tensor of the mean.
pub fn balance(numels: &[i64], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..numels.len()).collect();
    order.sort_by(|&a, &b| numels[b].cmp(&numels[a]).then(a.cmp(&b)));
    let mut load = vec![0i64; world.max(1)];
    let mut owner = vec![0; numels.len()];
    for i in order {
        let r = (0..load.len())
            .min_by_key(|&r| (load[r], r))
            .expect("one rank at least");
        owner[i] = r;
        load[r] += numels[i];
    }
    owner
}

impl Ownership {
    /// The split over `world` ranks of tensors of `numels` elements (the optimizer's
    /// variables, in its order), seen from `rank`.
    pub fn of(numels: &[i64], rank: usize, world: usize) -> Self {
        Self {
            owner: balance(numels, world),
            rank,
            world,
        }
    }

    pub fn owns(&self, i: usize) -> bool {
        self.owner[i] == self.rank
    }

    /// The indices owned by `rank`, in name order.
    pub fn of_rank(&self, rank: usize) -> Vec<usize> {
        (0..self.owner.len())
            .filter(|&i| self.owner[i] == rank)
            .collect()
    }
}
