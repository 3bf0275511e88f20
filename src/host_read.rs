//! Every value a training step copies from a device tensor to the host goes through here, and is
//! counted.
//!
//! Why: on a GPU each such read is a synchronisation — the host waits until the queue of
//! kernels before it has run, and the GPU then idles until the host queues more. A step should
//! read only what it must (the README lists them); the count lets a test hold the step to that
//! number on any machine, the CPU included, where the same reads happen but cost nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use tch::{Kind, Tensor};

static READS: AtomicU64 = AtomicU64::new(0);

/// The values of `t` (any shape, any floating or integer kind) as f64, in one copy.
pub fn values(t: &Tensor) -> Result<Vec<f64>> {
    READS.fetch_add(1, Ordering::Relaxed);
    let flat = t.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

/// The one value of a single-element tensor.
pub fn value(t: &Tensor) -> Result<f64> {
    Ok(values(t)?[0])
}

/// Device-to-host reads so far in this process (all threads).
pub fn count() -> u64 {
    READS.load(Ordering::Relaxed)
}
