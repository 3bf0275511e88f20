//! SIGTERM, SIGUSR1 and SIGINT as one request to stop, for the code that polls for it.
//!
//! Schedulers stop jobs with SIGTERM; SIGUSR1 means the same because `srun` and `mpirun` pass
//! it to the tasks unchanged, while a SIGTERM to `srun` itself makes srun kill its tasks, so a
//! batch script can signal the tasks without going through srun's own TERM handling.
//!
//! The handlers are installed once per process and stay; while no [`Catch`] is alive they do
//! what the signal does by default (end the process), so a command that never polls the flag
//! is not left deaf to SIGTERM. A second Ctrl-C ends the process at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

/// The signals that ask for a stop.
pub const STOP_SIGNALS: [i32; 3] = [SIGTERM, SIGUSR1, SIGINT];

static STOP: AtomicBool = AtomicBool::new(false);
static CATCHERS: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

fn on_signal(sig: i32) {
    let second_interrupt = sig == SIGINT && STOP.load(Ordering::SeqCst);
    if CATCHERS.load(Ordering::SeqCst) == 0 || second_interrupt {
        let _ = signal_hook::low_level::emulate_default_handler(sig);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

fn install() -> Result<()> {
    INSTALLED
        .get_or_init(|| {
            for sig in STOP_SIGNALS {
                // SAFETY: the action only touches atomics and calls emulate_default_handler,
                // which signal-hook documents as async-signal-safe.
                unsafe { signal_hook::low_level::register(sig, move || on_signal(sig)) }
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
        .context("installing the SIGTERM/SIGUSR1/SIGINT handlers")
}

/// While alive, a stop signal sets the flag instead of ending the process.
pub struct Catch(());

impl Catch {
    pub fn new() -> Result<Self> {
        install()?;
        CATCHERS.fetch_add(1, Ordering::SeqCst);
        Ok(Catch(()))
    }
}

impl Drop for Catch {
    fn drop(&mut self) {
        CATCHERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a stop signal reached this process while a [`Catch`] was alive.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
