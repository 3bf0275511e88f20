//! Tensors on the host for MPI, and their sum over the ranks in rank order: the one reduction
//! under every MPI tensor collective, blocking or on the overlap thread, so that all of them
//! round alike.

use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

use super::DistError;

/// A tensor's values on the host, in the precision MPI carries them.
pub(super) enum Host {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Host {
    /// Collectives move floating-point tensors only (gradients, embeddings, weights, statistics).
    pub(super) fn from(t: &Tensor) -> Result<Self, DistError> {
        let mut host = if t.kind() == Kind::Double {
            Host::F64(vec![0.0; t.numel()])
        } else {
            Host::F32(vec![0.0; t.numel()])
        };
        host.fill_from(t)?;
        Ok(host)
    }

    /// Overwrites this buffer (of `t`'s length and precision) with `t`'s values.
    pub(super) fn fill_from(&mut self, t: &Tensor) -> Result<(), DistError> {
        match t.kind() {
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => {}
            kind => {
                return Err(DistError::NotFloat {
                    backend: "MPI",
                    kind,
                })
            }
        }
        let flat = t.flatten(0, -1).to_device(Device::Cpu);
        let n = flat.numel();
        let copied = match self {
            Host::F64(v) => flat.f_copy_data(v, n),
            Host::F32(v) => flat.to_kind(Kind::Float).f_copy_data(v, n),
        };
        copied.map_err(|e| DistError::HostCopy {
            cause: e.to_string(),
        })
    }

    /// Whether this buffer can carry `t`: the same length and precision.
    pub(super) fn fits(&self, t: &Tensor) -> bool {
        self.len() == t.numel() && matches!(self, Host::F64(_)) == (t.kind() == Kind::Double)
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Host::F32(v) => v.len(),
            Host::F64(v) => v.len(),
        }
    }

    pub(super) fn zeros_like(&self, n: usize) -> Self {
        match self {
            Host::F32(_) => Host::F32(vec![0.0; n]),
            Host::F64(_) => Host::F64(vec![0.0; n]),
        }
    }

    pub(super) fn tensor(&self, kind: Kind, device: Device) -> Tensor {
        match self {
            Host::F32(v) => Tensor::from_slice(v),
            Host::F64(v) => Tensor::from_slice(v),
        }
        .to_device(device)
        .to_kind(kind)
    }
}

/// Sums `send` over the ranks of `comm` into `sum`: on every rank (`root` None: an all-reduce)
/// or on `root` alone (a reduce: the other ranks only send, and their `sum` is not touched). The
/// one collective of MPI's blocking path ([`super::mpi`]) and of its reduction thread
/// ([`super::mpi_background`]).
///
/// Every element is summed in rank order, ((x₀ + x₁) + x₂) + …, whatever the buffer, its
/// length, the root or the path: MPI_Allreduce and MPI_Reduce choose their algorithm (and so
/// the order of the additions) by message size and root, so a sharded optimizer's reduce to the
/// owners and the all-reduce it replaces would round differently (AdamW's m/√v turns those
/// last bits of near-zero gradients into whole learning-rate steps). In rank order they are
/// bit-identical, with the bytes of MPI's own: the all-reduce is a reduce-scatter (each rank
/// sums its 1/W of the buffer, received with one MPI_Alltoallv) and an all-gather of the sums,
/// a ring all-reduce's traffic; the reduce gathers the buffers on the root, what the other
/// ranks send to a linear MPI_Reduce.
pub(super) fn sum_into(
    comm: &SimpleCommunicator,
    root: Option<usize>,
    send: &Host,
    sum: &mut Host,
) {
    match (send, sum) {
        (Host::F32(s), Host::F32(r)) => sum_in_rank_order(comm, root, s, r),
        (Host::F64(s), Host::F64(r)) => sum_in_rank_order(comm, root, s, r),
        _ => unreachable!("a bucket's two buffers have its precision"),
    }
}

fn sum_in_rank_order<T>(comm: &SimpleCommunicator, root: Option<usize>, send: &[T], sum: &mut [T])
where
    T: Equivalence + Copy + Default + std::ops::Add<Output = T>,
{
    let w = comm.size() as usize;
    let me = comm.rank() as usize;
    let n = send.len();
    if let Some(root) = root {
        let root_proc = comm.process_at_rank(root as i32);
        if me != root {
            root_proc.gather_into(send);
            return;
        }
        let mut all = vec![T::default(); w * n];
        root_proc.gather_into_root(send, &mut all[..]);
        add_in_rank_order(&all, n, &mut sum[..n]);
        return;
    }
    // Rank r sums elements chunks[r]: balanced contiguous ranges.
    let counts: Vec<i32> = (0..w)
        .map(|r| (n * (r + 1) / w - n * r / w) as i32)
        .collect();
    let displs = displacements(&counts);
    let mine = counts[me] as usize;
    let mut parts = vec![T::default(); w * mine];
    {
        let from_all = vec![mine as i32; w];
        let at: Vec<i32> = (0..w).map(|q| (q * mine) as i32).collect();
        let out = Partition::new(send, &counts[..], &displs[..]);
        let mut into = PartitionMut::new(&mut parts[..], &from_all[..], &at[..]);
        comm.all_to_all_varcount_into(&out, &mut into);
    }
    let mut reduced = vec![T::default(); mine];
    add_in_rank_order(&parts, mine, &mut reduced);
    let mut into = PartitionMut::new(&mut sum[..], &counts[..], &displs[..]);
    comm.all_gather_varcount_into(&reduced[..], &mut into);
}

/// `out[i] = ((parts[0][i] + parts[1][i]) + …)`, `parts` being consecutive runs of `n`.
fn add_in_rank_order<T>(parts: &[T], n: usize, out: &mut [T])
where
    T: Copy + std::ops::Add<Output = T>,
{
    if n == 0 {
        return;
    }
    let mut runs = parts.chunks_exact(n);
    if let Some(first) = runs.next() {
        out.copy_from_slice(first);
    }
    for run in runs {
        for (o, &x) in out.iter_mut().zip(run) {
            *o = *o + x;
        }
    }
}

/// Where each rank's part starts in a gathered buffer: the prefix sums of `counts`.
pub(super) fn displacements(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_added_left_to_right() {
        // Three ranks' buffers of two elements; in f32, (1e8 + 1) − 1e8 is 0 but 1e8 − 1e8 + 1
        // is 1: the sum must be the left fold in rank order, element by element.
        let parts = [1e8f32, 2.0, 1.0, 3.0, -1e8, 4.0];
        let mut out = [f32::NAN; 2];
        add_in_rank_order(&parts, 2, &mut out);
        let naive = |i: usize| (parts[i] + parts[2 + i]) + parts[4 + i];
        assert_eq!(out, [naive(0), naive(1)]);
        assert_eq!(out, [0.0, 9.0]);
    }

    #[test]
    fn displacements_are_the_prefix_sums() {
        assert_eq!(displacements(&[3, 0, 2, 5]), vec![0, 3, 3, 5]);
    }
}
