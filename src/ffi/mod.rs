//! Safe wrappers over the C++ shim (csrc/shim.cpp, compiled by build.rs): the libtorch calls
//! that tch does not expose.
//!
//! Autocast: tch's own `autocast` is CUDA-only, fp16-only and a no-op without CUDA. Here the
//! device type and the dtype are chosen, so CPU autocast really runs eligible ops (convolutions,
//! linear layers, matmuls) in bfloat16. Autocast state is per thread in libtorch: a guard acts on
//! the thread that made it, and is therefore neither `Send` nor `Sync`.
//!
//! ```
//! use fsct_dist::ffi::autocast;
//! use tch::{Device, Kind, Tensor};
//! let (x, w) = (Tensor::ones([2, 3], (Kind::Float, Device::Cpu)), Tensor::ones([3, 4], (Kind::Float, Device::Cpu)));
//! {
//!     let _amp = autocast(Device::Cpu, Kind::BFloat16).unwrap();
//!     assert_eq!(x.matmul(&w).kind(), Kind::BFloat16);
//! }
//! assert_eq!(x.matmul(&w).kind(), Kind::Float);
//! ```

pub mod cuda;

use std::ffi::CStr;
use std::marker::PhantomData;
use std::os::raw::c_int;

use tch::{Device, Kind};

mod sys {
    use std::os::raw::{c_char, c_int};

    // Defined in csrc/shim.cpp (static library `fsct_shim`, linked by build.rs).
    extern "C" {
        pub fn fsct_shim_last_error() -> *const c_char;
        pub fn fsct_autocast_is_enabled(device: c_int, enabled: *mut c_int) -> c_int;
        pub fn fsct_autocast_set_enabled(device: c_int, enabled: c_int) -> c_int;
        pub fn fsct_autocast_get_dtype(device: c_int, dtype: *mut c_int) -> c_int;
        pub fn fsct_autocast_set_dtype(device: c_int, dtype: c_int) -> c_int;
        pub fn fsct_autocast_increment_nesting(depth: *mut c_int) -> c_int;
        pub fn fsct_autocast_decrement_nesting(depth: *mut c_int) -> c_int;
        pub fn fsct_autocast_clear_cache() -> c_int;
    }
}

/// A failed shim call: a C++ exception from libtorch (caught in the shim) or an argument the
/// shim does not support.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShimError {
    #[error("libtorch: {0}")]
    Torch(String),
    #[error("autocast supports CPU and CUDA devices, not {0:?}")]
    Device(Device),
    #[error("autocast dtype must be Half, BFloat16, Float or Double, not {0:?}")]
    Kind(Kind),
}

fn check(rc: c_int) -> Result<(), ShimError> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to its thread-local message, valid until the next
    // failing call on this thread; we copy it at once.
    let msg = unsafe { CStr::from_ptr(sys::fsct_shim_last_error()) };
    let text = msg.to_string_lossy().into_owned();
    Err(ShimError::Torch(if text.is_empty() {
        format!("shim call failed with code {rc}")
    } else {
        text
    }))
}

/// The shim's device code (c10::DeviceType CPU / CUDA; autocast state is per device type, so
/// every CUDA ordinal shares one).
fn device_code(device: Device) -> Result<c_int, ShimError> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(ShimError::Device(other)),
    }
}

fn kind_code(kind: Kind) -> Result<c_int, ShimError> {
    match kind {
        Kind::Float => Ok(0),
        Kind::Half => Ok(1),
        Kind::BFloat16 => Ok(2),
        Kind::Double => Ok(3),
        other => Err(ShimError::Kind(other)),
    }
}

fn kind_from_code(code: c_int) -> Option<Kind> {
    match code {
        0 => Some(Kind::Float),
        1 => Some(Kind::Half),
        2 => Some(Kind::BFloat16),
        3 => Some(Kind::Double),
        _ => None,
    }
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn autocast_is_enabled(device: Device) -> Result<bool, ShimError> {
    let d = device_code(device)?;
    let mut out: c_int = 0;
    // SAFETY: `out` is a valid pointer for the duration of the call.
    check(unsafe { sys::fsct_autocast_is_enabled(d, &mut out) })?;
    Ok(out != 0)
}

/// Turns autocast on or off for `device`'s type on this thread (prefer [`autocast`]).
pub fn autocast_set_enabled(device: Device, enabled: bool) -> Result<(), ShimError> {
    let d = device_code(device)?;
    // SAFETY: plain values.
    check(unsafe { sys::fsct_autocast_set_enabled(d, c_int::from(enabled)) })
}

/// The autocast dtype for `device`'s type on this thread (libtorch defaults: CPU BFloat16,
/// CUDA Half); `None` for a dtype outside Half/BFloat16/Float/Double.
pub fn autocast_dtype(device: Device) -> Result<Option<Kind>, ShimError> {
    let d = device_code(device)?;
    let mut out: c_int = -1;
    // SAFETY: `out` is a valid pointer for the duration of the call.
    check(unsafe { sys::fsct_autocast_get_dtype(d, &mut out) })?;
    Ok(kind_from_code(out))
}

/// Sets the autocast dtype for `device`'s type on this thread (prefer [`autocast`]).
pub fn autocast_set_dtype(device: Device, kind: Kind) -> Result<(), ShimError> {
    let (d, k) = (device_code(device)?, kind_code(kind)?);
    // SAFETY: plain values.
    check(unsafe { sys::fsct_autocast_set_dtype(d, k) })
}

/// Enters one autocast nesting level; returns the depth after.
pub fn autocast_increment_nesting() -> Result<i32, ShimError> {
    let mut depth: c_int = 0;
    // SAFETY: `depth` is a valid pointer for the duration of the call.
    check(unsafe { sys::fsct_autocast_increment_nesting(&mut depth) })?;
    Ok(depth)
}

/// Leaves one autocast nesting level; returns the depth after.
pub fn autocast_decrement_nesting() -> Result<i32, ShimError> {
    let mut depth: c_int = 0;
    // SAFETY: `depth` is a valid pointer for the duration of the call.
    check(unsafe { sys::fsct_autocast_decrement_nesting(&mut depth) })?;
    Ok(depth)
}

/// Drops the autocast cast cache (the lower-precision copies of fp32 leaf parameters that
/// autocast keeps while enabled).
pub fn autocast_clear_cache() -> Result<(), ShimError> {
    // SAFETY: no arguments.
    check(unsafe { sys::fsct_autocast_clear_cache() })
}

/// An autocast region, like `with torch.autocast(device_type, dtype, enabled)`: entering sets
/// the dtype and the enabled flag of the device type and one nesting level; dropping restores
/// both as they were and, when the outermost region ends (nesting back to 0), clears the cast
/// cache. Regions nest (an inner `enabled = false` region keeps a module in fp32). Drop guards
/// in reverse order of creation, as scopes do. Per thread: not `Send`.
#[must_use = "autocast is on only while the guard lives"]
#[derive(Debug)]
pub struct AutocastGuard {
    device: Device,
    prev_enabled: bool,
    prev_kind: Option<Kind>,
    _not_send: PhantomData<*const ()>,
}

impl AutocastGuard {
    /// Enters an autocast region for `device`'s type with `kind` (Half or BFloat16 in
    /// practice), enabled or (for an fp32 island inside a region) disabled.
    pub fn new(device: Device, kind: Kind, enabled: bool) -> Result<Self, ShimError> {
        let prev_enabled = autocast_is_enabled(device)?;
        let prev_kind = autocast_dtype(device)?;
        kind_code(kind)?;
        autocast_set_dtype(device, kind)?;
        autocast_set_enabled(device, enabled)?;
        autocast_increment_nesting()?;
        Ok(Self {
            device,
            prev_enabled,
            prev_kind,
            _not_send: PhantomData,
        })
    }

    /// The device (type) this region controls.
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // Errors cannot surface from drop; these calls only fail on a corrupt runtime.
        if autocast_decrement_nesting().is_ok_and(|depth| depth == 0) {
            let _ = autocast_clear_cache();
        }
        let _ = autocast_set_enabled(self.device, self.prev_enabled);
        if let Some(kind) = self.prev_kind {
            let _ = autocast_set_dtype(self.device, kind);
        }
    }
}

/// Enables autocast to `kind` on `device`'s type until the guard drops.
pub fn autocast(device: Device, kind: Kind) -> Result<AutocastGuard, ShimError> {
    AutocastGuard::new(device, kind, true)
}

/// Disables autocast on `device`'s type until the guard drops: an fp32 region inside an autocast
/// region (cast the region's inputs to Float yourself, as PyTorch requires).
pub fn autocast_disabled(device: Device) -> Result<AutocastGuard, ShimError> {
    let kind = autocast_dtype(device)?.unwrap_or(Kind::BFloat16);
    AutocastGuard::new(device, kind, false)
}
