//! A stop signal (SIGTERM, SIGUSR1, SIGINT: SLURM preemption, Ctrl-C; see [`crate::signals`]) as
//! a request to stop at the next step or evaluation episode: the trainer checkpoints and exits
//! with [`crate::EXIT_PREEMPTED`]. Under MPI every rank learns of a signal that reached any
//! rank, so they all stop at the same point.

use anyhow::Result;

use crate::distributed::{sum_f64, Communicator};
use crate::signals::{stop_requested, Catch};

pub struct StopFlag {
    _catch: Catch,
}

impl StopFlag {
    /// Catches the stop signals until dropped (then they end the process again).
    pub fn install() -> Result<Self> {
        Ok(Self {
            _catch: Catch::new()?,
        })
    }

    /// Whether to stop now: a signal reached this rank or (under MPI) any rank. Every rank
    /// must call this at the same points (it is a collective under MPI).
    pub fn requested(&self, comm: &dyn Communicator) -> Result<bool> {
        let here = stop_requested();
        if comm.world().size == 1 {
            return Ok(here);
        }
        Ok(sum_f64(comm, f64::from(u8::from(here)))? > 0.0)
    }
}
