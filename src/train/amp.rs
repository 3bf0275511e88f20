//! Mixed precision (architecture.md, "Memory features": AMP): the `--amp` mode, the autocast
//! region it opens (through the shim, so CPU bf16 autocast is real), and a dynamic loss scaler
//! that follows PyTorch's `torch.amp.GradScaler` step for step.
//!
//! One optimizer step with fp16 (the order PyTorch prescribes):
//!
//! ```no_run
//! # use fsct_dist::train::amp::{AmpMode, Autocast, GradScaler};
//! # use tch::{nn, Device, Tensor};
//! # fn episode(_: f64) {}
//! # let vs = nn::VarStore::new(Device::Cpu);
//! # let mut opt = nn::OptimizerConfig::build(nn::adamw(0.9, 0.999, 1e-5), &vs, 1e-3).unwrap();
//! let mode = AmpMode::Fp16;
//! let mut scaler = GradScaler::for_mode(mode, Device::Cpu);
//! opt.zero_grad();
//! {
//!     let _amp = mode.autocast(Device::Cpu).unwrap(); // forward (and backward) under autocast
//!     episode(scaler.scale_factor()); // StepOptions { loss_scale: scaler.scale_factor() * 1/K, .. }
//! }
//! // (all-reduce gradients across ranks here)
//! scaler.unscale_(&opt.trainable_variables()).unwrap(); // grads now true fp32 gradients
//! // (clip gradients here; all-reduce scaler.found_inf() if gradients differ across ranks)
//! let stepped = scaler.step(&mut opt).unwrap(); // skipped when inf/NaN was found
//! scaler.update().unwrap(); // back off or grow the scale
//! # let _ = stepped;
//! ```
//!
//! With `--amp off` or `bf16` the scaler is disabled: a pass-through with scale 1 (bf16 has the
//! exponent range of fp32 and needs no loss scaling).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

use super::optim::Step;
use crate::ffi::{AutocastGuard, ShimError};

pub use crate::config::AmpMode;

/// What an [`AmpMode`] means to libtorch: the dtype autocast computes in and the autocast region
/// itself. A trait here rather than methods on the enum: the mode is configuration (defined in
/// `config`, which stays below the training machinery), the region is AMP's business.
pub trait Autocast {
    /// The lower-precision dtype autocast computes in, `None` for `Off`.
    fn kind(self) -> Option<Kind>;

    /// Opens this mode's autocast region on `device` (CPU or CUDA) for as long as the returned
    /// guard lives; `None` for `Off`.
    fn autocast(self, device: Device) -> Result<Option<AutocastGuard>, ShimError>;
}

impl Autocast for AmpMode {
    fn kind(self) -> Option<Kind> {
        match self {
            AmpMode::Off => None,
            AmpMode::Fp16 => Some(Kind::Half),
            AmpMode::Bf16 => Some(Kind::BFloat16),
        }
    }

    fn autocast(self, device: Device) -> Result<Option<AutocastGuard>, ShimError> {
        self.kind()
            .map(|kind| crate::ffi::autocast(device, kind))
            .transpose()
    }
}

/// GradScaler hyper-parameters; the defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    /// Consecutive steps without inf/NaN before the scale grows.
    pub growth_interval: i64,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The scaler's checkpointed state, PyTorch's `GradScaler.state_dict()` with the same keys.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
    #[serde(rename = "_growth_tracker")]
    pub growth_tracker: i64,
}

/// A misuse of the scaler (the errors PyTorch raises) or a failing libtorch kernel.
#[derive(Debug, thiserror::Error)]
pub enum AmpError {
    #[error("unscale_() has already been called since the last update()")]
    AlreadyUnscaled,
    #[error("unscale_() is being called after step()")]
    AfterStep,
    #[error("step() has already been called since the last update()")]
    AlreadyStepped,
    #[error("no inf checks were recorded before update(): call unscale_() or step() first")]
    NoInfChecks,
    #[error("attempting to unscale FP16 gradients (keep the parameters in fp32 under autocast)")]
    Fp16Gradients,
    #[error(transparent)]
    Torch(#[from] TchError),
}

/// Where the scaler is within one optimizer step (PyTorch's `OptState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Ready,
    Unscaled,
    Stepped,
}

/// Dynamic loss scaling, PyTorch's `torch.amp.GradScaler` algorithm: the loss is multiplied by
/// the scale before backward; [`unscale_`](Self::unscale_) divides the gradients by it and
/// records whether any is inf/NaN ([`found_inf`](Self::found_inf)); [`step`](Self::step) skips
/// the optimizer step when one was; [`update`](Self::update) multiplies the scale by the backoff
/// factor after such a step (and resets the growth tracker), or by the growth factor after
/// `growth_interval` consecutive clean steps. The scale, the growth tracker and the inf flag are
/// one-element tensors on the gradients' device (f32, i32, f32), updated by libtorch's own
/// `_amp_foreach_non_finite_check_and_unscale_` and `_amp_update_scale_` kernels.
///
/// A disabled scaler (`--amp off|bf16`) is a pass-through: scale 1, nothing unscaled, every
/// step taken.
#[derive(Debug)]
pub struct GradScaler {
    enabled: bool,
    cfg: GradScalerConfig,
    device: Device,
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    stage: Stage,
}

impl GradScaler {
    /// A scaler on `device` (where the gradients live), enabled or a pass-through.
    pub fn new(cfg: GradScalerConfig, device: Device, enabled: bool) -> Self {
        Self {
            enabled,
            cfg,
            device,
            scale: Tensor::full([1], cfg.init_scale, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
            found_inf: Tensor::zeros([1], (Kind::Float, device)),
            stage: Stage::Ready,
        }
    }

    /// The scaler `mode` needs with PyTorch's defaults: enabled for fp16 only.
    pub fn for_mode(mode: AmpMode, device: Device) -> Self {
        Self::new(GradScalerConfig::default(), device, mode.uses_scaler())
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn config(&self) -> GradScalerConfig {
        self.cfg
    }

    /// The current scale (PyTorch's `get_scale()`): 1 when disabled. This is the factor for the
    /// step engine's `StepOptions::loss_scale` (times 1/K for K episodes per step). Reads the
    /// device tensor (a sync on CUDA).
    pub fn scale_factor(&self) -> f64 {
        if self.enabled {
            crate::host_read::value(&self.scale).unwrap_or(f64::NAN)
        } else {
            1.0
        }
    }

    /// `loss` times the scale (PyTorch's `scale(outputs)`); `loss` itself when disabled.
    pub fn scale(&self, loss: &Tensor) -> Tensor {
        if !self.enabled {
            return loss.shallow_clone();
        }
        let s = self.scale.to_device(loss.device());
        loss * s.view([]) // fp32 scale: an fp16 loss is promoted, as in PyTorch
    }

    /// The growth tracker: consecutive clean steps since the scale last changed.
    pub fn growth_tracker(&self) -> i64 {
        crate::host_read::value(&self.growth_tracker).map_or(0, |v| v as i64)
    }

    /// Divides the gradients of `vars` by the scale in place and records whether any is
    /// inf/NaN. Call once per optimizer step, after backward (and after gradients are reduced
    /// across ranks) and before clipping; [`step`](Self::step) calls it if you did not.
    /// Variables without a gradient are skipped. fp16 gradients are refused, as in PyTorch.
    pub fn unscale_(&mut self, vars: &[Tensor]) -> Result<(), AmpError> {
        if !self.enabled {
            return Ok(());
        }
        match self.stage {
            Stage::Ready => {}
            Stage::Unscaled => return Err(AmpError::AlreadyUnscaled),
            Stage::Stepped => return Err(AmpError::AfterStep),
        }
        // PyTorch: inv_scale = scale.double().reciprocal().float()
        let inv_scale = self
            .scale
            .f_to_kind(Kind::Double)?
            .f_reciprocal()?
            .f_to_kind(Kind::Float)?;
        for var in vars {
            let mut grad = var.grad();
            if !grad.defined() {
                continue;
            }
            if grad.kind() == Kind::Half {
                return Err(AmpError::Fp16Gradients);
            }
            let inv = if grad.device() == self.device {
                inv_scale.shallow_clone()
            } else {
                inv_scale.f_to_device(grad.device())?
            };
            if grad.device() == self.device {
                grad.f_internal_amp_non_finite_check_and_unscale(&mut self.found_inf, &inv)?;
            } else {
                let mut found = self.found_inf.f_to_device(grad.device())?;
                grad.f_internal_amp_non_finite_check_and_unscale(&mut found, &inv)?;
                let merged = self.found_inf.f_maximum(&found.f_to_device(self.device)?)?;
                self.found_inf.f_copy_(&merged)?;
            }
        }
        self.stage = Stage::Unscaled;
        Ok(())
    }

    /// Whether the last [`unscale_`](Self::unscale_) found an inf/NaN gradient (false when
    /// disabled). With gradients that differ across ranks, all-reduce this (any rank) and
    /// [`set_found_inf`](Self::set_found_inf) the result before [`step`](Self::step), so every
    /// rank takes the same decision.
    pub fn found_inf(&self) -> bool {
        self.enabled && crate::host_read::value(&self.found_inf).map_or(true, |v| v != 0.0)
    }

    /// Overrides the inf flag of this step (the all-reduced decision).
    pub fn set_found_inf(&mut self, found: bool) {
        if self.enabled {
            let _ = self.found_inf.fill_(if found { 1.0 } else { 0.0 });
        }
    }

    /// The optimizer step unless an inf/NaN gradient was found (unscaling first if
    /// [`unscale_`](Self::unscale_) was not called this step). Returns whether the step was
    /// taken. Disabled: always steps.
    pub fn step(&mut self, opt: &mut impl Step) -> Result<bool, AmpError> {
        if !self.enabled {
            opt.step();
            return Ok(true);
        }
        match self.stage {
            Stage::Ready => self.unscale_(&opt.trainable_variables())?,
            Stage::Unscaled => {}
            Stage::Stepped => return Err(AmpError::AlreadyStepped),
        }
        let skip = self.found_inf();
        if !skip {
            opt.step();
        }
        self.stage = Stage::Stepped;
        Ok(!skip)
    }

    /// Ends the step: backs the scale off (and resets the growth tracker) if inf/NaN was found,
    /// otherwise counts a clean step and grows the scale after `growth_interval` of them
    /// (PyTorch's `_amp_update_scale_`). Clears the inf flag. No-op when disabled.
    pub fn update(&mut self) -> Result<(), AmpError> {
        if !self.enabled {
            return Ok(());
        }
        if self.stage == Stage::Ready {
            return Err(AmpError::NoInfChecks);
        }
        let _ = self.scale.f_internal_amp_update_scale_(
            &self.growth_tracker,
            &self.found_inf,
            self.cfg.growth_factor,
            self.cfg.backoff_factor,
            self.cfg.growth_interval,
        )?;
        let _ = self.found_inf.f_zero_()?;
        self.stage = Stage::Ready;
        Ok(())
    }

    /// The state to checkpoint; `None` when disabled (PyTorch's empty state dict).
    pub fn state(&self) -> Option<GradScalerState> {
        self.enabled.then(|| GradScalerState {
            scale: self.scale_factor(),
            growth_factor: self.cfg.growth_factor,
            backoff_factor: self.cfg.backoff_factor,
            growth_interval: self.cfg.growth_interval,
            growth_tracker: self.growth_tracker(),
        })
    }

    /// Restores a checkpointed state (scale, growth tracker and hyper-parameters). Ignored when
    /// disabled.
    pub fn load_state(&mut self, state: &GradScalerState) {
        if !self.enabled {
            return;
        }
        self.cfg.growth_factor = state.growth_factor;
        self.cfg.backoff_factor = state.backoff_factor;
        self.cfg.growth_interval = state.growth_interval;
        let _ = self.scale.fill_(state.scale);
        let _ = self.growth_tracker.fill_(state.growth_tracker);
        let _ = self.found_inf.zero_();
        self.stage = Stage::Ready;
    }
}
