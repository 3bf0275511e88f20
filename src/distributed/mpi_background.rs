//! Gradient all-reduces that run beside the backward (`--overlap`): a thread of their own with
//! an MPI communicator of their own.
//!
//! Why a thread and not MPI's non-blocking collectives: Open MPI progresses an `MPI_Iallreduce`
//! only while some MPI call runs, and the backward makes none, so a started reduction would
//! mostly wait for the final `MPI_Wait`. A thread blocked in `MPI_Allreduce` progresses all the
//! time. It needs `MPI_THREAD_MULTIPLE` (the main thread keeps making its own collectives: the
//! step's totals, BatchNorm statistics) and a duplicated communicator, so that its collectives
//! never pair with the main thread's: MPI matches collectives per communicator, in call order.
//!
//! The thread touches host buffers only, never libtorch: the main thread flattens each bucket
//! to the host when it starts ([`Background::start`]) and copies the sums back when it finishes
//! ([`Background::finish`]), so the two threads never share a tensor.

use std::cell::RefCell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

use super::mpi::Host;
use super::{buckets, flat_cat, scatter_back, ByteCounter, BUCKET_BYTES};

/// A communicator handed to the reduction thread, which alone uses it from then on.
struct Owned(SimpleCommunicator);

// SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE (checked before spawning), under which
// a communicator may be used from any thread; after the move only the reduction thread uses it.
unsafe impl Send for Owned {}

impl Owned {
    /// Takes the communicator out (a method, so that a closure moves the whole `Owned`).
    fn into_inner(self) -> SimpleCommunicator {
        self.0
    }
}

/// A bucket in flight: the tensors its sums go back to.
struct InFlight {
    tensors: Vec<Tensor>,
    kind: Kind,
    device: Device,
}

pub struct Background {
    jobs: Option<Sender<Host>>,
    sums: Receiver<Host>,
    in_flight: RefCell<Vec<InFlight>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Duplicates `world` (a collective: every rank calls it at the same point) and starts the
    /// reduction thread. Only call under `MPI_THREAD_MULTIPLE`.
    pub fn spawn(world: &SimpleCommunicator) -> Self {
        let comm = Owned(world.duplicate());
        let (jobs, job_rx) = channel::<Host>();
        let (sum_tx, sums) = channel::<Host>();
        let thread = std::thread::Builder::new()
            .name("gradient-all-reduce".into())
            .spawn(move || {
                let comm = comm.into_inner();
                for send in job_rx {
                    let sum = all_reduce(&comm, &send);
                    if sum_tx.send(sum).is_err() {
                        break;
                    }
                }
                // `comm` is freed here, on this thread, before `Drop` lets MPI finalize.
            })
            .expect("spawning the gradient all-reduce thread");
        Self {
            jobs: Some(jobs),
            sums,
            in_flight: RefCell::new(Vec::new()),
            thread: Some(thread),
        }
    }

    /// Copies each bucket of `tensors` to the host and queues it for the thread.
    pub fn start(&self, tensors: Vec<Tensor>, sent: &ByteCounter) -> Result<()> {
        let jobs = self.jobs.as_ref().expect("open until drop");
        for bucket in buckets(&tensors, BUCKET_BYTES) {
            let group: Vec<Tensor> = bucket.iter().map(|&i| tensors[i].shallow_clone()).collect();
            let refs: Vec<&Tensor> = group.iter().collect();
            let flat = flat_cat(&refs);
            sent.add(&[&flat]);
            jobs.send(Host::from(&flat)?)
                .map_err(|_| anyhow!("the gradient all-reduce thread has ended"))?;
            self.in_flight.borrow_mut().push(InFlight {
                tensors: group,
                kind: flat.kind(),
                device: flat.device(),
            });
        }
        Ok(())
    }

    /// Waits for every queued bucket, in order, and writes its sums into its tensors.
    pub fn finish(&self) -> Result<()> {
        for bucket in self.in_flight.borrow_mut().drain(..) {
            let sum = self
                .sums
                .recv()
                .map_err(|_| anyhow!("the gradient all-reduce thread has ended"))?;
            let refs: Vec<&Tensor> = bucket.tensors.iter().collect();
            scatter_back(&sum.tensor(bucket.kind, bucket.device), &refs);
        }
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.jobs.take()); // ends the thread's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn all_reduce(comm: &SimpleCommunicator, send: &Host) -> Host {
    let mut recv = send.zeros_like(send.len());
    match (send, &mut recv) {
        (Host::F32(s), Host::F32(r)) => {
            comm.all_reduce_into(&s[..], &mut r[..], SystemOperation::sum())
        }
        (Host::F64(s), Host::F64(r)) => {
            comm.all_reduce_into(&s[..], &mut r[..], SystemOperation::sum())
        }
        _ => unreachable!("zeros_like keeps the precision"),
    }
    recv
}
