//! Gradient all-reduces that run beside the backward (`--overlap`): a thread of their own with
//! an MPI communicator of their own.
//!
//! Why a thread and not MPI's non-blocking collectives: Open MPI progresses an `MPI_Iallreduce`
//! only while some MPI call runs, and the backward makes none, so a started reduction would
//! mostly wait for the final `MPI_Wait`. A thread blocked in a collective (the rank-order sum
//! of [`super::host_sum::sum_into`]) progresses all the time. It needs `MPI_THREAD_MULTIPLE`
//! (the main thread keeps making its own collectives: the step's totals, BatchNorm statistics)
//! and a duplicated communicator, so that its collectives never pair with the main thread's:
//! MPI matches collectives per communicator, in call order.
//!
//! The thread touches host buffers only, never libtorch: the main thread flattens each bucket
//! to the host when it starts ([`Background::start`]) and copies the sums back when it finishes
//! ([`Background::finish`]), so the two threads never share a tensor. The buffers are kept
//! from one step to the next (every step has the same buckets): after the first step nothing
//! new is kept (the rank-order sum's scratch lives for one bucket), and memory does not drift
//! between the two threads' allocator arenas.

use std::cell::RefCell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

use super::host_sum::{sum_into, Host};
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

/// A bucket in flight: the tensors its sums go back to (none on a rank that only sends to
/// another's reduce).
struct InFlight {
    tensors: Vec<Tensor>,
    kind: Kind,
    device: Device,
    write_back: bool,
}

/// A bucket's values to send, the buffer its sums come back in, and the rank that gets them
/// (None: all, an all-reduce).
struct Job {
    send: Host,
    sum: Host,
    root: Option<usize>,
}

pub struct Background {
    rank: usize,
    jobs: Option<Sender<Job>>,
    done: Receiver<Job>,
    in_flight: RefCell<Vec<InFlight>>,
    /// Buffers of finished buckets, for the next step's.
    free: RefCell<Vec<Host>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Duplicates `world` (a collective: every rank calls it at the same point) and starts the
    /// reduction thread. Only call under `MPI_THREAD_MULTIPLE`.
    pub fn spawn(world: &SimpleCommunicator) -> Self {
        let comm = Owned(world.duplicate());
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("gradient-all-reduce".into())
            .spawn(move || {
                let comm = comm.into_inner();
                for mut job in job_rx {
                    sum_into(&comm, job.root, &job.send, &mut job.sum);
                    if done_tx.send(job).is_err() {
                        break;
                    }
                }
                // `comm` is freed here, on this thread, before `Drop` lets MPI finalize.
            })
            .expect("spawning the gradient all-reduce thread");
        Self {
            rank: world.rank() as usize,
            jobs: Some(jobs),
            done,
            in_flight: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            thread: Some(thread),
        }
    }

    /// A kept buffer that fits `t`, or a new one; holding `t`'s values when `fill`.
    fn buffer(&self, t: &Tensor, fill: bool) -> Result<Host> {
        let mut free = self.free.borrow_mut();
        let mut host = match free.iter().position(|h| h.fits(t)) {
            Some(i) => free.swap_remove(i),
            None => return Ok(Host::from(t)?),
        };
        if fill {
            host.fill_from(t)?;
        }
        Ok(host)
    }

    /// Copies each bucket of `tensors` to the host and queues it for the thread: summed into
    /// every rank (`root` None) or into `root` alone.
    pub fn start(
        &self,
        tensors: Vec<Tensor>,
        root: Option<usize>,
        sent: &ByteCounter,
    ) -> Result<()> {
        let me = self.rank;
        let jobs = self.jobs.as_ref().expect("open until drop");
        for bucket in buckets(&tensors, BUCKET_BYTES) {
            let group: Vec<Tensor> = bucket.iter().map(|&i| tensors[i].shallow_clone()).collect();
            let refs: Vec<&Tensor> = group.iter().collect();
            let flat = flat_cat(&refs);
            let write_back = root.is_none_or(|r| r == me);
            if root != Some(me) {
                sent.add(&[&flat]); // as the blocking collectives count: a reduce's root sends nothing
            }
            let send = self.buffer(&flat, true)?;
            // A rank that only sends to another's reduce gets nothing back: no buffer for it.
            let sum = if write_back {
                self.buffer(&flat, false)?
            } else {
                send.zeros_like(0)
            };
            let job = Job { send, sum, root };
            jobs.send(job)
                .map_err(|_| anyhow!("the gradient all-reduce thread has ended"))?;
            self.in_flight.borrow_mut().push(InFlight {
                tensors: group,
                kind: flat.kind(),
                device: flat.device(),
                write_back,
            });
        }
        Ok(())
    }

    /// Waits for every queued bucket, in order, and writes its sums into its tensors.
    pub fn finish(&self) -> Result<()> {
        for bucket in self.in_flight.borrow_mut().drain(..) {
            let job = self
                .done
                .recv()
                .map_err(|_| anyhow!("the gradient all-reduce thread has ended"))?;
            if bucket.write_back {
                let refs: Vec<&Tensor> = bucket.tensors.iter().collect();
                scatter_back(&job.sum.tensor(bucket.kind, bucket.device), &refs);
            }
            let kept = [job.send, job.sum].into_iter().filter(|h| h.len() > 0);
            self.free.borrow_mut().extend(kept);
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
