//! SIGTERM / SIGINT (SLURM preemption, Ctrl-C) as a request to stop at the next step boundary:
//! the trainer checkpoints and exits with [`crate::EXIT_PREEMPTED`]. Under MPI every rank
//! learns of a signal that reached any rank, so they all stop after the same step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::dist::{sum_f64, Communicator};

pub struct StopFlag {
    flag: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

impl StopFlag {
    /// Catches SIGTERM and SIGINT until dropped (then the default actions return).
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let ids = [SIGTERM, SIGINT]
            .into_iter()
            .map(|s| signal_hook::flag::register(s, Arc::clone(&flag)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { flag, ids })
    }

    /// The flag itself, for waits that must give up when a signal arrives (the loader).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }

    /// Whether to stop now: a signal reached this rank or (under MPI) any rank.
    pub fn requested(&self, comm: &dyn Communicator) -> Result<bool> {
        let here = self.flag.load(Ordering::Relaxed);
        if comm.world().size == 1 {
            return Ok(here);
        }
        Ok(sum_f64(comm, f64::from(u8::from(here)))? > 0.0)
    }
}

impl Drop for StopFlag {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
