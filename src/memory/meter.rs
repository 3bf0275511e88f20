//! What "memory in use" means on each device: the CUDA caching allocator's counters on a GPU
//! (through the shim), the process's resident set on CPU.

use tch::Device;

use super::rss;
use crate::ffi::cuda;

/// A memory counter with a resettable peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    /// Process resident set (VmRSS; peak VmHWM, reset through /proc/self/clear_refs).
    Rss,
    /// Allocated bytes of CUDA device `index` (peak reset through the allocator).
    Cuda(usize),
}

/// One reading, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    pub current: u64,
    pub peak: u64,
    /// CUDA only: reserved (current, peak).
    pub reserved: Option<(u64, u64)>,
}

impl Meter {
    /// The allocator of a CUDA device when its statistics are readable, else the resident set.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(i) if cuda::memory_stats(i).is_ok() => Meter::Cuda(i),
            _ => Meter::Rss,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Meter::Rss => "process resident set (VmRSS, VmHWM reset per phase)",
            Meter::Cuda(_) => "CUDA caching allocator: allocated bytes (reserved alongside)",
        }
    }

    pub fn reset_peak(self) {
        match self {
            Meter::Rss => {
                rss::reset_peak();
            }
            Meter::Cuda(i) => {
                let _ = cuda::reset_peak(i);
            }
        }
    }

    /// Waits for queued device work (CUDA), so that timings and peaks belong to the phase.
    pub fn synchronize(self) {
        if let Meter::Cuda(i) = self {
            tch::Cuda::synchronize(i as i64);
        }
    }

    pub fn read(self) -> Reading {
        match self {
            Meter::Rss => {
                let (current, peak) = rss::rss_bytes().unwrap_or((0, 0));
                Reading {
                    current,
                    peak,
                    reserved: None,
                }
            }
            Meter::Cuda(i) => {
                let s = cuda::memory_stats(i).unwrap_or_default();
                Reading {
                    current: s.allocated,
                    peak: s.allocated_peak,
                    reserved: Some((s.reserved, s.reserved_peak)),
                }
            }
        }
    }

    /// Bytes a step could still use: free device memory plus the allocator's unused cache on
    /// CUDA, MemAvailable on CPU. None when unknown.
    pub fn available(self) -> Option<u64> {
        match self {
            Meter::Rss => rss::mem_available(),
            Meter::Cuda(i) => {
                let (free, _) = cuda::memory_info(i).ok()?;
                let s = cuda::memory_stats(i).ok()?;
                Some(free + s.reserved.saturating_sub(s.allocated))
            }
        }
    }
}
