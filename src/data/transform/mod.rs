//! Image transforms of the official code, written directly on u8 buffers.
//!
//! - Evaluation (`augment = false`): Resize(S) (shorter side to S, bilinear with antialias) →
//!   CenterCrop(S) → to float in [0, 1] → normalise with the ImageNet mean/std.
//! - Training (`augment = true`), as the official `TransformLoader` with `train_aug`: Resize(S) →
//!   RandomResizedCrop(S, scale 0.08–1, ratio 3/4–4/3; torchvision's sampling with 10 tries and the
//!   centre-crop fallback) → horizontal flip with p = 0.5 → to float → normalise. The official
//!   ColorJitter() has default arguments and is a no-op, so it is left out.
//!
//! The resampler is PIL's bilinear filter (a triangle whose support widens with the
//! downscale factor; taps clamped to the image or crop box), which is what torchvision calls on PIL
//! images, in PIL's own fixed-point arithmetic (22-bit integer weights, horizontal pass rounded to
//! u8, then vertical). It is hand-written rather than `image::imageops::resize` because only the
//! centre-crop window needs computing and the result then matches PIL's pixels. JPEGs are decoded
//! by libjpeg-turbo, as in PIL. Grayscale and alpha images become RGB as PIL's
//! `convert('RGB')` does (alpha dropped). Randomness comes from a ChaCha8 stream keyed by
//! (aug_seed, flat position), so a rank that loads a slice gets the same pixels as one that
//! loads the whole episode.
//!
//! One file per idea: `decode` (files to RGB), `resample` (the PIL-exact resampler), `crop`
//! (resize, crop, flip, normalise), `pack` (images into an episode tensor).

mod crop;
mod decode;
mod pack;
mod resample;

pub use crop::{transform_into, TransformConfig, MEAN, STD};
pub use decode::{decode_image, decode_image_for, Rgb};
pub use pack::load_images;
