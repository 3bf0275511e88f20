// The few libtorch C++ calls tch does not expose (toolchain.md, "What tch does not give").
//
// Autocast state is per thread (libtorch keeps it in thread-local dispatch-key sets), so every
// call here acts on the calling thread only. Every function is `extern "C"`, catches every C++
// exception and reports it as a non-zero return code; the message is kept per thread and read
// with `fsct_shim_last_error`.
//
// Build time: instead of <ATen/autocast_mode.h> (which pulls in ATen.h, NativeFunctions.h,
// Operators.h and torch/library.h: tens of seconds per compile), we declare the handful of
// functions we call exactly as that header does (torch 2.11). A drifted signature would fail at
// link time, never silently. Define FSCT_SHIM_FULL_HEADERS to compile against the real header.

#ifdef FSCT_SHIM_FULL_HEADERS
#include <ATen/autocast_mode.h>
#else
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Export.h>

namespace at::autocast {
TORCH_API bool is_autocast_enabled(at::DeviceType device_type);
TORCH_API void set_autocast_enabled(at::DeviceType device_type, bool enabled);
TORCH_API at::ScalarType get_autocast_dtype(at::DeviceType device_type);
TORCH_API void set_autocast_dtype(at::DeviceType device_type, at::ScalarType dtype);
TORCH_API void clear_cache();
TORCH_API int increment_nesting();
TORCH_API int decrement_nesting();
}  // namespace at::autocast
#endif

// The device allocator interface (c10, no CUDA headers needed): CUDA's caching allocator
// registers itself here when libtorch_cuda is loaded, so the same code reports "not available"
// on a CPU-only build instead of failing to link.
#include <c10/core/CachingDeviceAllocator.h>

namespace at::accelerator {
// As in <ATen/DeviceAccelerator.h> (torch 2.11), declared here for the same build-time reason.
TORCH_API void setDeviceIndex(c10::DeviceIndex device_index);
}  // namespace at::accelerator

// Streams and events through the backend-generic c10 interface (CUDA registers its
// implementation when libtorch_cuda is loaded): again no CUDA headers.
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <exception>
#include <string>

namespace {

thread_local std::string last_error;

// Return codes.
constexpr int OK = 0;
constexpr int ERR_EXCEPTION = 1;
constexpr int ERR_BAD_ARGUMENT = 2;

// Device codes shared with src/ffi/mod.rs.
bool device_from_code(int code, c10::DeviceType* out) {
  switch (code) {
    case 0: *out = c10::DeviceType::CPU; return true;
    case 1: *out = c10::DeviceType::CUDA; return true;
    default: return false;
  }
}

// Dtype codes shared with src/ffi/mod.rs: 0 Float, 1 Half, 2 BFloat16, 3 Double.
bool dtype_from_code(int code, c10::ScalarType* out) {
  switch (code) {
    case 0: *out = c10::ScalarType::Float; return true;
    case 1: *out = c10::ScalarType::Half; return true;
    case 2: *out = c10::ScalarType::BFloat16; return true;
    case 3: *out = c10::ScalarType::Double; return true;
    default: return false;
  }
}

int dtype_to_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return 0;
    case c10::ScalarType::Half: return 1;
    case c10::ScalarType::BFloat16: return 2;
    case c10::ScalarType::Double: return 3;
    default: return -1;
  }
}

template <class F>
int guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return ERR_EXCEPTION;
}

int bad_argument(const char* what, int code) {
  last_error = std::string("invalid ") + what + " code " + std::to_string(code);
  return ERR_BAD_ARGUMENT;
}

}  // namespace

extern "C" {

// The message of the last failed call on this thread (empty if none). Valid until the next
// failing call on this thread.
const char* fsct_shim_last_error() { return last_error.c_str(); }

int fsct_autocast_is_enabled(int device, int* enabled) {
  c10::DeviceType d;
  if (!device_from_code(device, &d)) return bad_argument("device", device);
  return guarded([&] {
    *enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    return OK;
  });
}

int fsct_autocast_set_enabled(int device, int enabled) {
  c10::DeviceType d;
  if (!device_from_code(device, &d)) return bad_argument("device", device);
  return guarded([&] {
    at::autocast::set_autocast_enabled(d, enabled != 0);
    return OK;
  });
}

// `*dtype` receives a dtype code, or -1 for a dtype outside the codes.
int fsct_autocast_get_dtype(int device, int* dtype) {
  c10::DeviceType d;
  if (!device_from_code(device, &d)) return bad_argument("device", device);
  return guarded([&] {
    *dtype = dtype_to_code(at::autocast::get_autocast_dtype(d));
    return OK;
  });
}

int fsct_autocast_set_dtype(int device, int dtype) {
  c10::DeviceType d;
  c10::ScalarType t;
  if (!device_from_code(device, &d)) return bad_argument("device", device);
  if (!dtype_from_code(dtype, &t)) return bad_argument("dtype", dtype);
  return guarded([&] {
    at::autocast::set_autocast_dtype(d, t);
    return OK;
  });
}

// `*depth` receives the nesting depth after the call.
int fsct_autocast_increment_nesting(int* depth) {
  return guarded([&] {
    *depth = at::autocast::increment_nesting();
    return OK;
  });
}

int fsct_autocast_decrement_nesting(int* depth) {
  return guarded([&] {
    *depth = at::autocast::decrement_nesting();
    return OK;
  });
}

int fsct_autocast_clear_cache() {
  return guarded([&] {
    at::autocast::clear_cache();
    return OK;
  });
}

// CUDA caching-allocator statistics of device `index`, in bytes (the AGGREGATE pool):
// out[0] allocated now, out[1] allocated peak, out[2] reserved now, out[3] reserved peak,
// out[4] number of OOMs so far. Fails with a message when no CUDA allocator is registered.
int fsct_cuda_memory_stats(int index, long long* out) {
  return guarded([&] {
    auto* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    const auto s = a->getDeviceStats(static_cast<c10::DeviceIndex>(index));
    constexpr auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[agg].current;
    out[1] = s.allocated_bytes[agg].peak;
    out[2] = s.reserved_bytes[agg].current;
    out[3] = s.reserved_bytes[agg].peak;
    out[4] = s.num_ooms;
    return OK;
  });
}

// Resets the peak statistics of device `index` to the current values.
int fsct_cuda_reset_peak(int index) {
  return guarded([&] {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)
        ->resetPeakStats(static_cast<c10::DeviceIndex>(index));
    return OK;
  });
}

// Returns every unused cached block to the driver (torch.cuda.empty_cache()).
int fsct_cuda_empty_cache() {
  return guarded([&] {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->emptyCache();
    return OK;
  });
}

// Free and total device memory of device `index` (cudaMemGetInfo), in bytes.
int fsct_cuda_memory_info(int index, long long* free_bytes, long long* total_bytes) {
  return guarded([&] {
    const auto [free, total] =
        c10::getDeviceAllocator(c10::DeviceType::CUDA)
            ->getMemoryInfo(static_cast<c10::DeviceIndex>(index));
    *free_bytes = static_cast<long long>(free);
    *total_bytes = static_cast<long long>(total);
    return OK;
  });
}

// Makes CUDA device `index` current on this thread (NCCL creates its communicator there).
int fsct_cuda_set_device(int index) {
  return guarded([&] {
    at::accelerator::setDeviceIndex(static_cast<c10::DeviceIndex>(index));
    return OK;
  });
}

// A side stream for gradient reductions that overlap the backward (NCCL's own stream in
// PyTorch DDP). `ready` orders the side stream after the gradients the compute stream has
// produced so far; `done` orders the compute stream after everything queued on the side stream.
struct SideStream {
  c10::Stream side;
  c10::Stream saved;  // the compute stream, current again after `leave`
  c10::Event ready{c10::DeviceType::CUDA};
  c10::Event done{c10::DeviceType::CUDA};
};

static const c10::impl::DeviceGuardImplInterface* cuda_impl() {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

// A non-blocking stream from libtorch's high-priority pool on device `index` (high priority so
// the reductions are not starved by the backward's kernels). Fails with a message on a build or
// machine without CUDA.
int fsct_cuda_side_stream_new(int index, void** out) {
  return guarded([&] {
    const c10::Device device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
    const auto* impl = cuda_impl();
    auto side = impl->getStreamFromGlobalPool(device, /*isHighPriority=*/true);
    *out = new SideStream{side, impl->getStream(device)};
    return OK;
  });
}

// Makes the side stream wait for the work queued so far on the current (compute) stream, then
// current, so that the caller's tensor operations (bucket copies) queue there too; `*native`
// receives its cudaStream_t for NCCL. Undone by fsct_cuda_side_stream_leave.
int fsct_cuda_side_stream_enter(void* handle, void** native) {
  return guarded([&] {
    auto* s = static_cast<SideStream*>(handle);
    const auto* impl = cuda_impl();
    s->ready.record(impl->getStream(s->side.device()));
    s->ready.block(s->side);
    s->saved = impl->exchangeStream(s->side);
    *native = s->side.native_handle();
    return OK;
  });
}

// Makes the compute stream current again.
int fsct_cuda_side_stream_leave(void* handle) {
  return guarded([&] {
    auto* s = static_cast<SideStream*>(handle);
    cuda_impl()->exchangeStream(s->saved);
    return OK;
  });
}

// Makes the current (compute) stream wait for everything queued on the side stream; the host
// does not wait.
int fsct_cuda_side_stream_join(void* handle) {
  return guarded([&] {
    auto* s = static_cast<SideStream*>(handle);
    s->done.record(s->side);
    s->done.block(cuda_impl()->getStream(s->side.device()));
    return OK;
  });
}

void fsct_cuda_side_stream_free(void* handle) { delete static_cast<SideStream*>(handle); }

}  // extern "C"
