//! The CUDA caching allocator through the shim: statistics (what `torch.cuda.memory_stats`
//! reports), peak reset, `empty_cache` and free/total device memory. On a build or machine
//! without CUDA every call returns [`ShimError::Torch`] with libtorch's own reason, so callers
//! fall back (the memory profiler to the resident set) instead of failing.

use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;

use super::{check, ShimError};

mod sys {
    use std::os::raw::{c_int, c_longlong, c_void};

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
        pub fn fsct_cuda_side_stream_new(index: c_int, out: *mut *mut c_void) -> c_int;
        pub fn fsct_cuda_side_stream_enter(handle: *mut c_void, native: *mut *mut c_void) -> c_int;
        pub fn fsct_cuda_side_stream_leave(handle: *mut c_void) -> c_int;
        pub fn fsct_cuda_side_stream_join(handle: *mut c_void) -> c_int;
        pub fn fsct_cuda_side_stream_free(handle: *mut c_void);
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

/// A CUDA stream beside libtorch's current (compute) stream, for gradient reductions that run
/// while the backward goes on (PyTorch DDP queues NCCL on a stream of its own the same way).
/// Ordering is by CUDA events, so the host never waits: work given to [`SideStream::run`] starts
/// after everything queued on the compute stream before it, and the compute stream resumes
/// after [`SideStream::join`] only once the side stream's work is done.
///
/// Memory: tensors allocated inside `run` belong to the side stream in the caching allocator
/// (reused only in its order); tensors from the compute stream that `run` reads or writes must
/// stay alive until `join`, which gradients do.
pub struct SideStream {
    handle: NonNull<c_void>,
}

impl SideStream {
    /// A high-priority stream from libtorch's pool on CUDA device `index`; an error without
    /// CUDA.
    pub fn new(index: usize) -> Result<Self, ShimError> {
        let mut out = std::ptr::null_mut();
        // SAFETY: `out` receives a heap object that this value owns and frees on drop.
        check(unsafe { sys::fsct_cuda_side_stream_new(index as c_int, &mut out) })?;
        let handle = NonNull::new(out).ok_or_else(|| ShimError::Torch("no side stream".into()))?;
        Ok(Self { handle })
    }

    /// Runs `queue` with the side stream current (libtorch operations inside queue there) and
    /// its `cudaStream_t` as argument (for NCCL), ordered after the compute stream's work so far.
    /// The compute stream is current again afterwards, whatever `queue` returned.
    pub fn run<T>(&self, queue: impl FnOnce(*mut c_void) -> T) -> Result<T, ShimError> {
        let mut native = std::ptr::null_mut();
        // SAFETY: the handle is live; `native` receives a non-owning stream handle.
        check(unsafe { sys::fsct_cuda_side_stream_enter(self.handle.as_ptr(), &mut native) })?;
        let out = queue(native);
        // SAFETY: the handle is live; restores the stream saved by `enter`.
        check(unsafe { sys::fsct_cuda_side_stream_leave(self.handle.as_ptr()) })?;
        Ok(out)
    }

    /// Makes the compute stream wait (on the GPU) for everything queued by [`SideStream::run`].
    pub fn join(&self) -> Result<(), ShimError> {
        // SAFETY: the handle is live.
        check(unsafe { sys::fsct_cuda_side_stream_join(self.handle.as_ptr()) })
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: made by fsct_cuda_side_stream_new, freed once here.
        unsafe { sys::fsct_cuda_side_stream_free(self.handle.as_ptr()) }
    }
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
        assert!(matches!(SideStream::new(0), Err(ShimError::Torch(_))));
    }

    #[test]
    fn side_stream_work_follows_the_compute_stream_and_the_compute_stream_waits_for_it() {
        if !tch::Cuda::is_available() {
            return;
        }
        let on = (tch::Kind::Float, tch::Device::Cuda(0));
        let a = tch::Tensor::randn([2048, 2048], on);
        let side = SideStream::new(0).unwrap();
        for _ in 0..3 {
            // A long kernel on the compute stream, then its result read and rewritten on the side.
            let t = a.matmul(&a).matmul(&a);
            let want = t.copy();
            side.run(|_| {
                let doubled = &t * 2.0;
                let mut t = t.shallow_clone();
                t.copy_(&doubled);
            })
            .unwrap();
            side.join().unwrap();
            let diff = (&t - &want * 2.0).abs().max().double_value(&[]);
            assert_eq!(diff, 0.0, "the side stream raced the compute stream");
        }
    }
}
