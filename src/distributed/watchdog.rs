//! The collective watchdog: a rank that waits too long in one collective ends the whole job.
//!
//! Why a thread watching a timestamp: a blocking collective (an MPI all-reduce, the CUDA
//! synchronize after an NCCL one) takes no timeout, and a peer that stopped answering (a
//! SIGSTOP, a hung GPU or file system, a node that froze) never lets it return, so the other
//! ranks would wait, silently, for as long as the job lives — and a SIGTERM cannot reach them
//! either, since they never get back to the step loop. So [`Watched`] stamps "in collective X of
//! step s since t" before each collective and clears the stamp after it (two atomic stores on
//! the hot path), and a thread that is never blocked checks the stamp a few times a second.
//! Past the limit it prints which collective of which step stalled and ends every rank from
//! outside the blocked call: NCCL's communicator aborted first (it frees the kernels that spin
//! on the GPU), then MPI_Abort; if even that hangs, the process leaves with `_exit(1)` so the
//! launcher (`mpirun`, `srun --kill-on-bad-exit`) ends the rest.
//!
//! While it waits, the thread also looks for peers on this machine that died ([`super::peers`]):
//! a rank killed under `srun` would otherwise leave the others waiting, with no word of which
//! rank went, until Slurm ends the step.
//!
//! A wait is only a stall when no rank reaches the collective for that long: the limit
//! (`--collective-timeout`, default 600 s as NCCL's own watchdog) must exceed the longest time
//! one rank works alone while the others wait (rank 0 writing a checkpoint, creating the
//! built-in dataset).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tch::{Device, Tensor};

use super::peers::{local_peers, Peer};
use super::{AbortHandle, Communicator, World};

/// The collectives, by the name the message gives.
const NAMES: [&str; 8] = [
    "all_reduce_sum",
    "all_gather_rows",
    "broadcast",
    "all_reduce_f64",
    "all_gather_f64",
    "barrier",
    "reduce_sum",
    "all_reduce_sum (overlapped, waiting for it)",
];

/// What the watched rank is doing, shared with the watchdog thread.
struct Stamp {
    origin: Instant,
    /// Milliseconds since `origin` + 1 when the current collective began; 0 = in none.
    since_ms: AtomicU64,
    what: AtomicUsize,
    step: AtomicU64,
    done: AtomicBool,
}

impl Stamp {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }
}

/// A communicator whose every collective is timed by a watchdog thread (see the module doc).
pub struct Watched {
    inner: Box<dyn Communicator>,
    stamp: Arc<Stamp>,
    /// The CUDA device to wait for after an NCCL collective (NCCL only queues the work, so
    /// the wait, where a stall shows, must happen inside the watched region).
    cuda_sync: Option<i64>,
}

/// Wraps `inner` in a watchdog of `timeout` (a world of one, or a zero timeout, is returned
/// as it is: nothing to wait for, or no limit asked). `device` is this rank's device. Every
/// rank calls it (it exchanges the pids that [`super::peers`] checks).
pub fn watch(
    inner: Box<dyn Communicator>,
    timeout: Duration,
    device: Device,
) -> Result<Box<dyn Communicator>> {
    let world = inner.world();
    if world.size == 1 || timeout.is_zero() {
        return Ok(inner);
    }
    let peers = local_peers(inner.as_ref())?;
    let stamp = Arc::new(Stamp {
        origin: Instant::now(),
        since_ms: AtomicU64::new(0),
        what: AtomicUsize::new(0),
        step: AtomicU64::new(0),
        done: AtomicBool::new(false),
    });
    let abort = inner.abort_handle();
    let watched = Arc::clone(&stamp);
    std::thread::Builder::new()
        .name("collective-watchdog".into())
        .spawn(move || watchdog(&watched, world, timeout, &peers, abort))
        .expect("spawning the watchdog thread");
    let cuda_sync = match (inner.name(), device) {
        ("nccl", Device::Cuda(i)) => Some(i as i64),
        _ => None,
    };
    Ok(Box::new(Watched {
        inner,
        stamp,
        cuda_sync,
    }))
}

/// The stall message (the same on every rank that sees one).
pub fn stall_message(world: World, what: &str, step: u64, waited: Duration) -> String {
    format!(
        "error on rank {} of {}: no progress in {what} of step {step} for {} s — a rank stopped \
         answering (stopped, swapping, or a GPU or file system hung). Every rank ends now; \
         resume from the last checkpoint with --resume, or raise --collective-timeout if a rank \
         legitimately works alone that long",
        world.rank,
        world.size,
        waited.as_secs()
    )
}

/// The message when a peer on this machine died during a collective.
pub fn dead_peer_message(world: World, peer: &Peer, what: &str, step: u64) -> String {
    format!(
        "error on rank {} of {}: rank {} (pid {}) ended while this rank waited for it in {what} \
         of step {step} — it was killed or crashed (its own error, if it printed one, and the \
         launcher's log say why; out of memory is the usual cause). Every rank ends now; resume \
         from the last checkpoint with --resume",
        world.rank, world.size, peer.rank, peer.pid
    )
}

/// Peers are looked at only in a collective that has lasted this long (a normal one is shorter).
const PEER_CHECK_AFTER_MS: u64 = 1000;
/// A peer found dead must still be missed this long later, in the same collective: a peer may
/// exit normally just after a collective that this rank has not returned from yet.
const DEAD_PEER_GRACE_MS: u64 = 2000;

fn watchdog(stamp: &Stamp, world: World, timeout: Duration, peers: &[Peer], abort: AbortHandle) {
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let limit = timeout.as_millis() as u64;
    // (the collective's stamp, the peer, when it was found dead)
    let mut dead: Option<(u64, Peer, u64)> = None;
    while !stamp.done.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        let since = stamp.since_ms.load(Ordering::Acquire);
        if since == 0 {
            dead = None;
            continue;
        }
        let now = stamp.now_ms();
        let waited = now.saturating_sub(since);
        let what = NAMES[stamp.what.load(Ordering::Acquire)];
        let step = stamp.step.load(Ordering::Acquire);
        if waited > limit {
            let waited = Duration::from_millis(waited);
            end_job(&stall_message(world, what, step, waited), &abort);
        }
        if waited < PEER_CHECK_AFTER_MS {
            continue;
        }
        match dead {
            Some((at, peer, found)) if at == since => {
                if now.saturating_sub(found) >= DEAD_PEER_GRACE_MS {
                    end_job(&dead_peer_message(world, &peer, what, step), &abort);
                }
            }
            _ => dead = peers.iter().find(|p| !p.alive()).map(|p| (since, *p, now)),
        }
    }
}

/// Prints `message` and ends every rank: MPI_Abort, or `_exit(1)` should that block (it needs
/// the MPI runtime, which a dead peer may have left waiting).
fn end_job(message: &str, abort: &AbortHandle) -> ! {
    eprintln!("{message}");
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(10));
        signal_hook::low_level::exit(1);
    });
    abort(1);
    signal_hook::low_level::exit(1);
}

impl Watched {
    /// Runs one collective inside the watched region.
    fn timed<T>(
        &self,
        what: usize,
        call: impl FnOnce(&dyn Communicator) -> Result<T>,
    ) -> Result<T> {
        self.stamp.what.store(what, Ordering::Release);
        self.stamp
            .since_ms
            .store(self.stamp.now_ms(), Ordering::Release);
        let out = call(self.inner.as_ref());
        if let Some(i) = self.cuda_sync {
            tch::Cuda::synchronize(i);
        }
        self.stamp.since_ms.store(0, Ordering::Release);
        out
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.stamp.done.store(true, Ordering::Release);
    }
}

impl Communicator for Watched {
    fn world(&self) -> World {
        self.inner.world()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.timed(0, |c| c.all_reduce_sum(tensors))
    }
    fn reduce_sum(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        self.timed(6, |c| c.reduce_sum(tensors, root))
    }
    fn overlaps(&self) -> bool {
        self.inner.overlaps()
    }
    fn start_all_reduce_sum(&self, tensors: Vec<Tensor>) -> Result<()> {
        self.timed(0, |c| c.start_all_reduce_sum(tensors))
    }
    fn start_reduce_sum(&self, tensors: Vec<Tensor>, root: usize) -> Result<()> {
        self.timed(6, |c| c.start_reduce_sum(tensors, root))
    }
    fn finish_all_reduces(&self) -> Result<()> {
        self.timed(7, |c| c.finish_all_reduces())
    }
    fn all_gather_rows(&self, local: &Tensor, rows: &[i64]) -> Result<Tensor> {
        self.timed(1, |c| c.all_gather_rows(local, rows))
    }
    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        self.timed(2, |c| c.broadcast(tensors, root))
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        self.timed(3, |c| c.all_reduce_f64(values))
    }
    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        self.timed(4, |c| c.all_gather_f64(values))
    }
    fn barrier(&self) -> Result<()> {
        self.timed(5, |c| c.barrier())
    }
    fn abort(&self, code: i32) -> ! {
        self.stamp.done.store(true, Ordering::Release);
        self.inner.abort(code)
    }
    fn abort_handle(&self) -> AbortHandle {
        self.inner.abort_handle()
    }
    fn note_step(&self, step: u64) {
        self.stamp.step.store(step, Ordering::Release);
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_rank_collective_step_and_wait() {
        let w = World {
            rank: 1,
            size: 4,
            local_rank: 1,
            local_size: 4,
        };
        let m = stall_message(w, "all_reduce_sum", 7, Duration::from_millis(5400));
        assert!(
            m.starts_with(
                "error on rank 1 of 4: no progress in all_reduce_sum of step 7 for 5 s — a rank stopped answering"
            ),
            "{m}"
        );
    }
}
