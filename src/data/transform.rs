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
//! images; PIL rounds to u8 after each pass and so do we. It is hand-written rather than
//! `image::imageops::resize` because only the centre-crop window needs computing and the result
//! then matches PIL to ±1 grey level. Grayscale and alpha images become RGB as PIL's
//! `convert('RGB')` does (alpha dropped). Randomness comes from a ChaCha8 stream keyed by
//! (aug_seed, flat position), so a rank that loads a slice gets the same pixels as one that
//! loads the whole episode.

use std::path::Path;

use rand::Rng;
use tch::Tensor;

use super::episode::keyed_rng;
use super::{DataError, Episode, SplitIndex};

/// ImageNet statistics used by the official code for every dataset.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

const DOMAIN_IMAGE: u64 = 0x494d_4147_4541_5547; // "IMAGEAUG"

/// Output side length and whether to augment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransformConfig {
    /// Output is S×S pixels.
    pub image_size: u32,
    /// RandomResizedCrop + flip (training with `train_aug`); else resize + centre crop.
    pub augment: bool,
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Reads and decodes a JPEG or PNG file to RGB. `root` is only used in the error message.
pub fn decode_image(path: &Path, root: &Path) -> Result<Rgb, DataError> {
    let bad = |reason: String| DataError::BadImage {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.is_empty() {
        return Err(bad("the file is empty (0 bytes)".into()));
    }
    let img = image::load_from_memory(&bytes).map_err(|e| bad(e.to_string()))?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(bad("the image has no pixels".into()));
    }
    Ok(Rgb {
        width: w as usize,
        height: h as usize,
        data: rgb.into_raw(),
    })
}

/// Taps of a 1-D resampling: output `o` reads `len[o]` inputs from `start[o]` with
/// `weights[o * stride ..]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<f32>,
    stride: usize,
}

/// PIL's `precompute_coeffs` for the bilinear filter: the box [lo, lo + box_len) is mapped onto
/// `out_full` outputs, of which outputs `out0 .. out0 + n` are computed.
fn taps(lo: usize, box_len: usize, out_full: usize, out0: usize, n: usize) -> Taps {
    let scale = box_len as f64 / out_full as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // triangle filter of support 1, widened when downscaling
    let stride = (support.ceil() as usize) * 2 + 1;
    let mut t = Taps {
        start: Vec::with_capacity(n),
        len: Vec::with_capacity(n),
        weights: vec![0.0; n * stride],
        stride,
    };
    for (k, o) in (out0..out0 + n).enumerate() {
        let center = (o as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).floor() as usize).min(box_len);
        let w = &mut t.weights[k * stride..(k + 1) * stride];
        let mut sum = 0.0;
        for (j, x) in (xmin..xmax).enumerate() {
            let v = (1.0 - ((x as f64 - center + 0.5) / filterscale).abs()).max(0.0);
            w[j] = v as f32;
            sum += v;
        }
        if sum > 0.0 {
            for v in &mut w[..xmax - xmin] {
                *v = (*v as f64 / sum) as f32;
            }
        }
        t.start.push(lo + xmin);
        t.len.push(xmax - xmin);
    }
    t
}

#[inline]
fn to_u8(v: f32) -> u8 {
    (v + 0.5).clamp(0.0, 255.0) as u8
}

/// A box of the source (x, y, w, h) resampled to `out_w`×`out_h`, of which only the window
/// (wx, wy, ww, wh) is computed: horizontal pass first, rounded to u8, then vertical, as PIL.
#[allow(clippy::too_many_arguments)]
fn resample(
    src: &Rgb,
    bx: (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
    win: (usize, usize, usize, usize),
) -> Rgb {
    let (x0, y0, bw, bh) = bx;
    let (wx, wy, ww, wh) = win;
    let th = taps(x0, bw, out_w, wx, ww);
    let tv = taps(y0, bh, out_h, wy, wh);
    // Source rows the vertical pass reads.
    let r0 = tv.start.iter().copied().min().unwrap_or(0);
    let r1 = tv
        .start
        .iter()
        .zip(&tv.len)
        .map(|(s, l)| s + l)
        .max()
        .unwrap_or(0);
    let mut mid = vec![0u8; (r1 - r0) * ww * 3];
    for y in r0..r1 {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        let out = &mut mid[(y - r0) * ww * 3..(y - r0 + 1) * ww * 3];
        for o in 0..ww {
            let s = th.start[o];
            let w = &th.weights[o * th.stride..o * th.stride + th.len[o]];
            let px = &row[s * 3..(s + w.len()) * 3];
            let (mut r, mut g, mut b) = (0f32, 0f32, 0f32);
            for (k, &wk) in w.iter().enumerate() {
                r += px[3 * k] as f32 * wk;
                g += px[3 * k + 1] as f32 * wk;
                b += px[3 * k + 2] as f32 * wk;
            }
            out[3 * o] = to_u8(r);
            out[3 * o + 1] = to_u8(g);
            out[3 * o + 2] = to_u8(b);
        }
    }
    let mut dst = vec![0u8; wh * ww * 3];
    let mut acc = vec![0f32; ww * 3];
    for o in 0..wh {
        acc.iter_mut().for_each(|a| *a = 0.0);
        let s = tv.start[o];
        let w = &tv.weights[o * tv.stride..o * tv.stride + tv.len[o]];
        for (k, &wk) in w.iter().enumerate() {
            let row = &mid[(s + k - r0) * ww * 3..(s + k - r0 + 1) * ww * 3];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as f32 * wk;
            }
        }
        for (d, &a) in dst[o * ww * 3..(o + 1) * ww * 3].iter_mut().zip(&acc) {
            *d = to_u8(a);
        }
    }
    Rgb {
        width: ww,
        height: wh,
        data: dst,
    }
}

/// Python's `round` (half to even), as torchvision uses for crop offsets and sizes.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        (2.0 * (x / 2.0).round()) as i64
    } else {
        r as i64
    }
}

/// torchvision `Resize(s)` output size: shorter side to s, longer side `int(s * long / short)`.
fn resized_size(w: usize, h: usize, s: usize) -> (usize, usize) {
    if w <= h {
        (s, (s * h / w).max(1))
    } else {
        ((s * w / h).max(1), s)
    }
}

/// torchvision `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio (3/4, 4/3):
/// returns the crop box (x, y, w, h).
fn random_resized_crop(
    rng: &mut impl Rng,
    width: usize,
    height: usize,
) -> (usize, usize, usize, usize) {
    let (scale, ratio) = ((0.08f64, 1.0f64), (3.0f64 / 4.0, 4.0f64 / 3.0));
    let area = (width * height) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..scale.1);
        let aspect = rng.random_range(lr0..lr1).exp();
        let w = round_half_even((target * aspect).sqrt());
        let h = round_half_even((target / aspect).sqrt());
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let (w, h) = (w as usize, h as usize);
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return (x, y, w, h);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, round_half_even(width as f64 / ratio.0) as usize)
    } else if in_ratio > ratio.1 {
        (round_half_even(height as f64 * ratio.1) as usize, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// u8 value → normalised f32, per channel.
fn lut() -> [[f32; 256]; 3] {
    let mut t = [[0f32; 256]; 3];
    for (c, row) in t.iter_mut().enumerate() {
        for (v, x) in row.iter_mut().enumerate() {
            *x = (v as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    t
}

/// Writes an S×S RGB image as normalised CHW f32 into `out` (length 3·S·S), mirrored if `flip`.
fn write_chw(img: &Rgb, flip: bool, lut: &[[f32; 256]; 3], out: &mut [f32]) {
    let (w, h) = (img.width, img.height);
    let plane = w * h;
    for y in 0..h {
        let row = &img.data[y * w * 3..(y + 1) * w * 3];
        for x in 0..w {
            let dx = if flip { w - 1 - x } else { x };
            let o = y * w + dx;
            out[o] = lut[0][row[3 * x] as usize];
            out[plane + o] = lut[1][row[3 * x + 1] as usize];
            out[2 * plane + o] = lut[2][row[3 * x + 2] as usize];
        }
    }
}

/// Transforms one decoded image into `out` (3·S·S floats, CHW). `position` is the image's flat
/// position in its episode; with `aug_seed` it keys the augmentation randomness.
pub fn transform_into(
    img: &Rgb,
    tf: &TransformConfig,
    aug_seed: u64,
    position: u64,
    out: &mut [f32],
) {
    let s = tf.image_size as usize;
    let (rw, rh) = resized_size(img.width, img.height, s);
    let full = (0, 0, img.width, img.height);
    let lut = lut();
    if !tf.augment {
        let left = round_half_even((rw - s) as f64 / 2.0) as usize;
        let top = round_half_even((rh - s) as f64 / 2.0) as usize;
        let crop = resample(img, full, rw, rh, (left, top, s, s));
        write_chw(&crop, false, &lut, out);
    } else {
        let resized = resample(img, full, rw, rh, (0, 0, rw, rh));
        let mut rng = keyed_rng(aug_seed, position, 0, DOMAIN_IMAGE);
        let bx = random_resized_crop(&mut rng, rw, rh);
        let crop = resample(&resized, bx, s, s, (0, 0, s, s));
        let flip = rng.random::<f64>() < 0.5;
        write_chw(&crop, flip, &lut, out);
    }
}

/// Loads the images at `positions` (indices into `episode.flat()`) and returns a
/// (positions.len(), 3, S, S) f32 tensor. A rank passes its own slice of positions; the pixels of
/// each image do not depend on which other positions are loaded. `aug_seed` should come from
/// [`super::aug_seed_for`]`(seed, epoch, index)`.
pub fn load_images(
    split: &SplitIndex,
    episode: &Episode,
    positions: &[usize],
    tf: &TransformConfig,
    aug_seed: u64,
) -> Result<Tensor, DataError> {
    let s = tf.image_size as usize;
    if s == 0 {
        return Err(DataError::BadRequest(
            "image_size must be at least 1".into(),
        ));
    }
    let flat = episode.flat();
    let per = 3 * s * s;
    let mut buf = vec![0f32; positions.len() * per];
    for (k, &p) in positions.iter().enumerate() {
        let &(c, i) = flat.get(p).ok_or_else(|| {
            DataError::BadRequest(format!(
                "position {p} is outside the episode ({} images)",
                flat.len()
            ))
        })?;
        let path = split
            .classes
            .get(c)
            .and_then(|cl| cl.images.get(i))
            .ok_or_else(|| {
                DataError::BadRequest(format!(
                    "episode refers to class {c} image {i}, which the {} split does not have",
                    split.split.file_stem()
                ))
            })?;
        let img = decode_image(path, &split.root)?;
        transform_into(
            &img,
            tf,
            aug_seed,
            p as u64,
            &mut buf[k * per..(k + 1) * per],
        );
    }
    let t = Tensor::f_from_slice(&buf).map_err(|e| DataError::Tensor(e.to_string()))?;
    t.f_reshape([positions.len() as i64, 3, s as i64, s as i64])
        .map_err(|e| DataError::Tensor(e.to_string()))
}
