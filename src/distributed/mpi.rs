//! The MPI backend (rsmpi over the system MPI): rank discovery, and collectives on tensors
//! moved through host memory as f32 (f64 for Double tensors). GPU tensors are staged through
//! the host, so this backend works everywhere but NCCL is the fast path on GPUs.

use anyhow::Result;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
// rsmpi's trait has the same name as ours; bring its methods in under another name.
use mpi::topology::Communicator as _;
use tch::Tensor;

use super::host_sum::{displacements, sum_into, Host};
use super::mpi_background::Background;
use super::{per_bucket, ByteCounter, Communicator, DistError, World};

pub struct MpiComm {
    // Field order: the reduction thread ends and the communicators are freed before the
    // universe finalizes MPI.
    /// The overlapped gradient all-reduces (None when MPI grants less than
    /// `MPI_THREAD_MULTIPLE`: then they run at once, on this thread).
    background: Option<Background>,
    world_comm: SimpleCommunicator,
    world: World,
    sent: ByteCounter,
    _universe: Universe,
}

impl MpiComm {
    /// Initialises MPI (once per process) and finds this rank's place, the local rank from a
    /// shared-memory split of the world. Asks for `MPI_THREAD_MULTIPLE`, which the overlapped
    /// gradient all-reduce needs ([`super::mpi_background`]).
    pub fn init() -> Result<Self, DistError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or(DistError::MpiInitialisedTwice)?;
        let world_comm = universe.world();
        // Every rank of one MPI library gets the same level, so all or none duplicate.
        let background = (threading == Threading::Multiple).then(|| Background::spawn(&world_comm));
        if background.is_none() {
            tracing::warn!(
                "MPI grants {threading:?} threading, not Multiple: gradients are all-reduced \
                 after the backward (no --overlap)"
            );
        }
        let node = world_comm.split_shared(world_comm.rank());
        let world = World {
            rank: world_comm.rank() as usize,
            size: world_comm.size() as usize,
            local_rank: node.rank() as usize,
            local_size: node.size() as usize,
        };
        Ok(Self {
            background,
            world_comm,
            world,
            sent: ByteCounter::default(),
            _universe: universe,
        })
    }

    /// Broadcasts raw bytes from `root` (the NCCL unique id).
    pub fn broadcast_bytes(&self, bytes: &mut [u8], root: usize) {
        self.world_comm
            .process_at_rank(root as i32)
            .broadcast_into(bytes);
    }
}

/// Ends the whole job now (MPI_Abort on the world). Only call while MPI is initialised.
pub fn abort_world(code: i32) -> ! {
    // SAFETY: MPI is initialised (the caller holds or held an MpiComm); MPI_Abort does not
    // return, the exit below is never reached.
    unsafe {
        ::mpi::ffi::MPI_Abort(::mpi::ffi::RSMPI_COMM_WORLD, code);
    }
    std::process::exit(code)
}

impl Communicator for MpiComm {
    fn world(&self) -> World {
        self.world
    }

    fn name(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        per_bucket(tensors, |flat| {
            let send = Host::from(flat)?;
            let mut recv = send.zeros_like(flat.numel());
            sum_into(&self.world_comm, None, &send, &mut recv);
            self.sent.add(&[flat]);
            Ok(recv.tensor(flat.kind(), flat.device()))
        })
    }

    fn overlaps(&self) -> bool {
        self.background.is_some()
    }

    fn start_all_reduce_sum(&self, tensors: Vec<Tensor>) -> Result<()> {
        match &self.background {
            Some(b) => b.start(tensors, None, &self.sent),
            None => self.all_reduce_sum(&tensors),
        }
    }

    fn start_reduce_sum(&self, tensors: Vec<Tensor>, root: usize) -> Result<()> {
        match &self.background {
            Some(b) => b.start(tensors, Some(root), &self.sent),
            None => self.reduce_sum(&tensors, root),
        }
    }

    fn finish_all_reduces(&self) -> Result<()> {
        match &self.background {
            Some(b) => b.finish(),
            None => Ok(()),
        }
    }

    fn reduce_sum(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        per_bucket(tensors, |flat| {
            let send = Host::from(flat)?;
            if self.world.rank != root {
                sum_into(&self.world_comm, Some(root), &send, &mut send.zeros_like(0));
                self.sent.add(&[flat]);
                return Ok(flat.shallow_clone());
            }
            let mut recv = send.zeros_like(flat.numel());
            sum_into(&self.world_comm, Some(root), &send, &mut recv);
            Ok(recv.tensor(flat.kind(), flat.device()))
        })
    }

    fn all_gather_rows(&self, local: &Tensor, rows: &[i64]) -> Result<Tensor> {
        let size = local.size();
        let row: i64 = size[1..].iter().product();
        let counts: Vec<i32> = rows.iter().map(|&r| (r * row) as i32).collect();
        let displs = displacements(&counts);
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let send = Host::from(local)?;
        let mut recv = send.zeros_like(total);
        match (&send, &mut recv) {
            (Host::F32(s), Host::F32(r)) => {
                let mut part = PartitionMut::new(&mut r[..], &counts[..], &displs[..]);
                self.world_comm.all_gather_varcount_into(&s[..], &mut part);
            }
            (Host::F64(s), Host::F64(r)) => {
                let mut part = PartitionMut::new(&mut r[..], &counts[..], &displs[..]);
                self.world_comm.all_gather_varcount_into(&s[..], &mut part);
            }
            _ => unreachable!("zeros_like keeps the precision"),
        }
        self.sent.add(&[local]);
        let mut shape = vec![rows.iter().sum::<i64>()];
        shape.extend_from_slice(&size[1..]);
        Ok(recv
            .tensor(local.kind(), local.device())
            .reshape(&shape[..]))
    }

    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let root_proc = self.world_comm.process_at_rank(root as i32);
        per_bucket(tensors, |flat| {
            let mut host = Host::from(flat)?;
            match &mut host {
                Host::F32(v) => root_proc.broadcast_into(&mut v[..]),
                Host::F64(v) => root_proc.broadcast_into(&mut v[..]),
            }
            if self.world.rank == root {
                self.sent.add(&[flat]);
            }
            Ok(host.tensor(flat.kind(), flat.device()))
        })
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        self.world_comm
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        self.sent.add_bytes(8 * send.len());
        Ok(())
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        let n = self.world.size;
        let mut counts = vec![0i32; n];
        self.world_comm
            .all_gather_into(&(values.len() as i32), &mut counts[..]);
        let displs = displacements(&counts);
        let mut out = vec![0.0; counts.iter().map(|&c| c as usize).sum()];
        {
            let mut part = PartitionMut::new(&mut out[..], &counts[..], &displs[..]);
            self.world_comm.all_gather_varcount_into(values, &mut part);
        }
        self.sent.add_bytes(8 * values.len());
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        self.world_comm.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world_comm.abort(code)
    }

    fn abort_handle(&self) -> super::AbortHandle {
        Box::new(|code| abort_world(code))
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.get()
    }
}
