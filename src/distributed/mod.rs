//! Ranks and collectives (architecture.md, "Distributed").
//!
//! A run is a world of `size` ranks. Under `mpirun` (or `srun` with PMI) the world comes from MPI;
//! a plain `fsct-dist train` is a world of one and never touches MPI. Collectives go through a
//! [`Communicator`]: [`Local`] (one rank: every collective is the identity), [`mpi::MpiComm`]
//! (CPU tensors; GPU tensors staged through host memory), or [`nccl::NcclComm`] (GPU tensors on
//! libtorch's stream, with MPI for the unique id and for host-side values).

mod error;
mod host_sum;
pub mod mpi;
mod mpi_background;
pub mod nccl;
pub mod peers;
pub mod watchdog;

pub use error::DistError;

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use tch::{Device, Kind, Tensor};

pub use crate::config::CommKind;

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes of this node (selects the GPU).
    pub local_rank: usize,
    pub local_size: usize,
}

impl World {
    pub const SINGLE: World = World {
        rank: 0,
        size: 1,
        local_rank: 0,
        local_size: 1,
    };

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// The device of this rank: `cuda:(local_rank mod visible GPUs)` when `base` is CUDA (so
    /// one-GPU-per-rank `CUDA_VISIBLE_DEVICES` set-ups map every rank to its `cuda:0`).
    pub fn device_for(&self, base: Device) -> Device {
        match base {
            Device::Cuda(_) if self.size > 1 => {
                let visible = tch::Cuda::device_count().max(1) as usize;
                Device::Cuda(self.local_rank % visible)
            }
            other => other,
        }
    }
}

/// The number of ranks a launcher says this job has, from its environment (OpenMPI, MPICH/PMI,
/// PMIx, SLURM's srun), or None when not launched by one.
pub fn launcher_world_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MV2_COMM_WORLD_SIZE",
        "SLURM_STEP_NUM_TASKS",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Whether a launcher variable names this process's rank (so MPI must be initialised).
fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "PMIX_RANK",
        "MV2_COMM_WORLD_RANK",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Collectives over the ranks of a job. Tensor arguments are on this rank's device; every rank
/// calls the same collectives in the same order (an MPI rule). Errors from a collective are
/// fatal for the job: callers should [`Communicator::abort`] rather than continue.
pub trait Communicator {
    fn world(&self) -> World;
    /// The backend, for logs and benchmarks ("local", "mpi", "nccl").
    fn name(&self) -> &'static str;
    /// Sums each tensor over ranks, in place. Tensors of one kind are flattened into buckets
    /// of about [`BUCKET_BYTES`], so many small gradients cost few messages.
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()>;
    /// Sums each tensor over ranks into `root`'s tensors, in place, bucketed as
    /// [`Communicator::all_reduce_sum`]. The other ranks' tensors are left as they were (they
    /// only send): half an all-reduce, for a sharded optimizer whose `root` alone steps them.
    fn reduce_sum(&self, tensors: &[Tensor], root: usize) -> Result<()>;
    /// Whether [`Communicator::start_all_reduce_sum`] runs beside the caller (an MPI world with
    /// a thread of its own for it); when false it sums at once and `--overlap` gains nothing.
    fn overlaps(&self) -> bool {
        false
    }
    /// Starts summing `tensors` over ranks, in place and bucketed as
    /// [`Communicator::all_reduce_sum`], and returns while the sums are still in flight; the
    /// tensors hold them after [`Communicator::finish_all_reduces`] and must not be written
    /// before. Every rank starts the same tensors in the same order.
    fn start_all_reduce_sum(&self, tensors: Vec<Tensor>) -> Result<()> {
        self.all_reduce_sum(&tensors)
    }
    /// Starts [`Communicator::reduce_sum`] of `tensors` to `root` the same way (a sharded
    /// optimizer's overlapped reduce to the owners); finished by
    /// [`Communicator::finish_all_reduces`] too.
    fn start_reduce_sum(&self, tensors: Vec<Tensor>, root: usize) -> Result<()> {
        self.reduce_sum(&tensors, root)
    }
    /// Waits for every reduction started since the last call and writes its sums in place.
    fn finish_all_reduces(&self) -> Result<()> {
        Ok(())
    }
    /// Concatenates along dim 0 the `local` tensors of all ranks (rank order); `rows[r]` is the
    /// number of rows rank r contributes (sizes may differ by rank).
    fn all_gather_rows(&self, local: &Tensor, rows: &[i64]) -> Result<Tensor>;
    /// Overwrites each tensor with its value on `root`.
    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()>;
    /// Sums host values over ranks, in place (losses, counts, flags).
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Concatenates every rank's host values in rank order (sizes may differ by rank).
    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job now with `code` (MPI_Abort); a world of one just exits.
    fn abort(&self, code: i32) -> !;
    /// [`Communicator::abort`] callable from another thread (the watchdog) while this one is
    /// blocked in a collective.
    fn abort_handle(&self) -> AbortHandle;
    /// Which optimizer step the next collectives belong to (named by the watchdog).
    fn note_step(&self, _step: u64) {}
    /// Tensor bytes this rank has sent into collectives so far.
    fn bytes_sent(&self) -> u64;
}

/// Ends the job with the given code, from any thread.
pub type AbortHandle = Box<dyn Fn(i32) + Send + Sync>;

/// Target size of one all-reduce bucket (PyTorch DDP's default is 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// A world of one: every collective is the identity, nothing is loaded.
#[derive(Debug, Default)]
pub struct Local;

impl Communicator for Local {
    fn world(&self) -> World {
        World::SINGLE
    }
    fn name(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum(&self, _: &[Tensor]) -> Result<()> {
        Ok(())
    }
    fn reduce_sum(&self, _: &[Tensor], _: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather_rows(&self, local: &Tensor, _: &[i64]) -> Result<Tensor> {
        Ok(local.shallow_clone())
    }
    fn broadcast(&self, _: &[Tensor], _: usize) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        Ok(values.to_vec())
    }
    fn barrier(&self) -> Result<()> {
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

/// Counts bytes handed to collectives (for the benchmarks' "bytes moved per step").
#[derive(Debug, Default)]
pub(crate) struct ByteCounter(AtomicU64);

impl ByteCounter {
    pub(crate) fn add(&self, tensors: &[&Tensor]) {
        let n: u64 = tensors
            .iter()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_bytes(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs `op` once per bucket of `tensors` (see [`buckets`]) on the bucket flattened into one
/// tensor, then copies the tensor `op` returns back into the bucket's tensors: the loop every
/// backend's in-place collective shares.
pub(crate) fn per_bucket(
    tensors: &[Tensor],
    mut op: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<()> {
    for bucket in buckets(tensors, BUCKET_BYTES) {
        let group: Vec<&Tensor> = bucket.iter().map(|&i| &tensors[i]).collect();
        let flat = flat_cat(&group);
        let result = op(&flat)?;
        scatter_back(&result, &group);
    }
    Ok(())
}

/// The flat concatenation of `tensors` (all of one kind).
pub(crate) fn flat_cat(tensors: &[&Tensor]) -> Tensor {
    let parts: Vec<Tensor> = tensors.iter().map(|t| t.flatten(0, -1)).collect();
    Tensor::cat(&parts, 0)
}

/// Copies consecutive pieces of `flat` back into `tensors`.
pub(crate) fn scatter_back(flat: &Tensor, tensors: &[&Tensor]) {
    let mut offset = 0;
    for t in tensors {
        let n = t.numel() as i64;
        let mut dst = t.shallow_clone();
        tch::no_grad(|| dst.copy_(&flat.narrow(0, offset, n).view_as(t)));
        offset += n;
    }
}

/// Groups tensors of the same kind into buckets of about `bytes` (a tensor larger than a
/// bucket is a bucket alone), keeping their order: what to flatten into one message.
pub fn buckets(tensors: &[Tensor], bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let (mut size, mut kind): (usize, Option<Kind>) = (0, None);
    for (i, t) in tensors.iter().enumerate() {
        let b = t.numel() * t.kind().elt_size_in_bytes();
        if !current.is_empty() && (Some(t.kind()) != kind || size + b > bytes) {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        kind = Some(t.kind());
        current.push(i);
        size += b;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The world and communicator of this process: MPI when a launcher started it (the backend
/// chosen by `kind` and `device`), [`Local`] otherwise. Refuses a launcher that says N ranks
/// while MPI reports one (a binary built against another MPI than the `mpirun` used).
/// `overlap` (`--overlap`): NCCL queues its collectives on a side stream that can run beside
/// the backward (off: on the default stream, in order with the compute).
pub fn init(kind: CommKind, device: Device, overlap: bool) -> Result<Box<dyn Communicator>> {
    let launched = launched_by_mpi();
    if !launched {
        if kind == CommKind::Nccl {
            // NCCL with one rank still works (the GPU check exercises it); it needs no MPI.
            return Ok(Box::new(nccl::NcclComm::single(device, overlap)?));
        }
        return Ok(Box::new(Local));
    }
    let mpi = mpi::MpiComm::init()?;
    let world = mpi.world();
    if let Some(n) = launcher_world_size() {
        if n != world.size && world.size == 1 {
            return Err(DistError::LauncherMismatch {
                launched: n,
                mpi: world.size,
            }
            .into());
        }
    }
    let use_nccl = match kind {
        CommKind::Mpi => false,
        CommKind::Nccl => true,
        CommKind::Auto => matches!(device, Device::Cuda(_)) && nccl::available(),
    };
    if use_nccl {
        let dev = world.device_for(device);
        // MPI is up: a rank that cannot join NCCL must end the job, not leave the others
        // waiting for it in the id broadcast or the communicator's set-up.
        return match nccl::NcclComm::new(mpi, dev, overlap) {
            Ok(c) => Ok(Box::new(c)),
            Err(e) => {
                eprintln!("error on rank {} of {}: {e:#}", world.rank, world.size);
                mpi::abort_world(1)
            }
        };
    }
    Ok(Box::new(mpi))
}

/// Makes a panic on this rank end the whole MPI job (MPI_Abort) after printing it, so no other
/// rank waits forever in a collective for this one.
pub fn abort_on_panic(rank: usize) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if crate::oom::is_caught(info) {
            return; // the step engine turns it into an error every rank agrees on
        }
        eprintln!("rank {rank} panicked; ending the job");
        default(info);
        mpi::abort_world(101);
    }));
}

/// Sum of one host value over ranks.
pub fn sum_f64(comm: &dyn Communicator, v: f64) -> Result<f64> {
    let mut x = [v];
    comm.all_reduce_f64(&mut x)?;
    Ok(x[0])
}

/// Whether every rank says `ok` (one tiny all-reduce).
pub fn all_ok(comm: &dyn Communicator, ok: bool) -> Result<bool> {
    Ok(sum_f64(comm, if ok { 0.0 } else { 1.0 })? == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_order_split_by_size_and_kind() {
        let f = |n: i64, k: Kind| Tensor::zeros([n], (k, Device::Cpu));
        let ts = vec![
            f(10, Kind::Float),
            f(10, Kind::Float),
            f(30, Kind::Float),
            f(5, Kind::Double),
            f(1, Kind::Float),
        ];
        // 100 bytes: 40 + 40 fit, 120 alone, kind change, kind change.
        assert_eq!(
            buckets(&ts, 100),
            vec![vec![0, 1], vec![2], vec![3], vec![4]]
        );
        assert_eq!(buckets(&ts[..2], 1 << 20), vec![vec![0, 1]]);
        assert!(buckets(&[], 10).is_empty());
    }

    #[test]
    fn local_is_a_world_of_one_and_collectives_are_identities() {
        let c = Local;
        assert_eq!(c.world(), World::SINGLE);
        let t = Tensor::from_slice(&[1f32, 2.0]);
        c.all_reduce_sum(&[t.shallow_clone()]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0]);
        c.reduce_sum(&[t.shallow_clone()], 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0]);
        let mut v = [3.0];
        c.all_reduce_f64(&mut v).unwrap();
        assert_eq!(v, [3.0]);
        assert!(all_ok(&c, true).unwrap() && !all_ok(&c, false).unwrap());
    }
}
