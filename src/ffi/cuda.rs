//! The CUDA caching allocator through the shim: statistics (what `torch.cuda.memory_stats`
//! reports), peak reset, `empty_cache` and free/total device memory. On a build or machine
//! without CUDA every call returns [`ShimError::Torch`] with libtorch's own reason, so callers
//! fall back (the memory profiler to the resident set) instead of failing.

use std::os::raw::c_int;

use super::{check, ShimError};

mod sys {
    use std::os::raw::{c_int, c_longlong};

    // Defined in csrc/shim.cpp.
    extern "C" {
        pub fn fsct_cuda_memory_stats(index: c_int, out: *mut c_longlong) -> c_int;
        pub fn fsct_cuda_reset_peak(index: c_int) -> c_int;
        pub fn fsct_cuda_empty_cache() -> c_int;
        pub fn fsct_cuda_set_device(index: c_int) -> c_int;
        pub fn fsct_cuda_memory_info(
            index: c_int,
            free: *mut c_longlong,
            total: *mut c_longlong,
        ) -> c_int;
    }
}

/// One device's caching-allocator counters, in bytes (all pools together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaMemoryStats {
    /// Bytes in live tensors.
    pub allocated: u64,
    /// Most bytes in live tensors since the last peak reset.
    pub allocated_peak: u64,
    /// Bytes the allocator holds from the driver (live tensors plus its cache).
    pub reserved: u64,
    pub reserved_peak: u64,
    /// Allocations that failed even after freeing the cache.
    pub num_ooms: u64,
}

/// The allocator counters of CUDA device `index`.
pub fn memory_stats(index: usize) -> Result<CudaMemoryStats, ShimError> {
    let mut out = [0i64; 5];
    // SAFETY: `out` holds the 5 values the shim writes.
    check(unsafe { sys::fsct_cuda_memory_stats(index as c_int, out.as_mut_ptr()) })?;
    let b = |v: i64| v.max(0) as u64;
    Ok(CudaMemoryStats {
        allocated: b(out[0]),
        allocated_peak: b(out[1]),
        reserved: b(out[2]),
        reserved_peak: b(out[3]),
        num_ooms: b(out[4]),
    })
}

/// Resets the peak counters of device `index` to the current values.
pub fn reset_peak(index: usize) -> Result<(), ShimError> {
    // SAFETY: plain value.
    check(unsafe { sys::fsct_cuda_reset_peak(index as c_int) })
}

/// Returns the allocator's unused cached blocks to the driver (`torch.cuda.empty_cache()`).
pub fn empty_cache() -> Result<(), ShimError> {
    // SAFETY: no arguments.
    check(unsafe { sys::fsct_cuda_empty_cache() })
}

/// Makes CUDA device `index` current on this thread.
pub fn set_device(index: usize) -> Result<(), ShimError> {
    // SAFETY: plain value.
    check(unsafe { sys::fsct_cuda_set_device(index as c_int) })
}

/// (free, total) bytes of device `index`, as the driver reports them.
pub fn memory_info(index: usize) -> Result<(u64, u64), ShimError> {
    let (mut free, mut total) = (0i64, 0i64);
    // SAFETY: both pointers are valid for the duration of the call.
    check(unsafe { sys::fsct_cuda_memory_info(index as c_int, &mut free, &mut total) })?;
    Ok((free.max(0) as u64, total.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_cuda_every_call_is_a_clean_error() {
        if tch::Cuda::is_available() {
            let s = memory_stats(0).unwrap();
            assert!(s.reserved >= s.allocated);
            return;
        }
        for r in [
            memory_stats(0).map(|_| ()),
            reset_peak(0),
            empty_cache(),
            memory_info(0).map(|_| ()),
        ] {
            match r {
                Err(ShimError::Torch(msg)) => assert!(!msg.is_empty()),
                other => panic!("expected a libtorch error without CUDA, got {other:?}"),
            }
        }
    }
}
