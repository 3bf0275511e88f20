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

use std::path::Path;

use rand::Rng;
use tch::{Device, Kind, Tensor};

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
///
/// JPEGs (recognised by their content) go through libjpeg-turbo, the decoder PIL uses, at full
/// resolution with its default settings (accurate integer IDCT, fancy upsampling), so the pixels
/// are PIL's. Anything libjpeg-turbo rejects or only decodes with a warning (CMYK/YCCK, truncated
/// or slightly corrupt files) and every other format go through the `image` crate, as before.
pub fn decode_image(path: &Path, root: &Path) -> Result<Rgb, DataError> {
    decode_image_for(path, root, None)
}

/// [`decode_image`] for a transform to `image_size` px: also refuses an image whose resize
/// would allocate more than the pixel limit (an extreme aspect ratio such as 170,000,000×1 is
/// small on disk but resizes to billions of pixels). Loading and `data check` both call this,
/// so they refuse exactly the same files.
pub fn decode_image_for(
    path: &Path,
    root: &Path,
    image_size: Option<u32>,
) -> Result<Rgb, DataError> {
    let bad = |reason: String| DataError::BadImage {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        reason,
    };
    let bytes = crate::regular_file::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.is_empty() {
        return Err(bad("the file is empty (0 bytes)".into()));
    }
    // Refuse absurd sizes from the header alone, before any decoder allocates for them.
    if let Ok((w, h)) = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .into_dimensions()
    {
        if (w as usize).saturating_mul(h as usize) > MAX_PIXELS {
            return Err(bad(format!(
                "the image claims {w}×{h} pixels, above the {MAX_PIXELS}-pixel limit (a corrupt or hostile file?)"
            )));
        }
        check_resize(w as u64, h as u64, image_size).map_err(&bad)?;
    }
    let img = match decode_jpeg_turbo(&bytes) {
        Some(img) => img,
        None => {
            let img = image::load_from_memory(&bytes).map_err(|e| bad(e.to_string()))?;
            let rgb = img.into_rgb8();
            let (w, h) = rgb.dimensions();
            Rgb {
                width: w as usize,
                height: h as usize,
                data: rgb.into_raw(),
            }
        }
    };
    if img.width == 0 || img.height == 0 {
        return Err(bad("the image has no pixels".into()));
    }
    // Again on the decoded size, for formats whose header could not be read up front.
    check_resize(img.width as u64, img.height as u64, image_size).map_err(bad)?;
    Ok(img)
}

/// Refuses a w×h image whose resize to `image_size` on its short side (torchvision `Resize`)
/// needs more than [`MAX_PIXELS`] pixels.
fn check_resize(w: u64, h: u64, image_size: Option<u32>) -> Result<(), String> {
    let Some(s) = image_size else { return Ok(()) };
    let (short, long) = (w.min(h).max(1) as u128, w.max(h) as u128);
    let s = u128::from(s);
    let resized = s * (s * long / short);
    if resized > MAX_PIXELS as u128 {
        return Err(format!(
            "the image is {w}×{h} pixels: resizing it to {s} px on its short side needs \
             {resized} pixels, above the {MAX_PIXELS}-pixel limit (an extreme aspect ratio; \
             crop or remove the file)"
        ));
    }
    Ok(())
}

thread_local! {
    /// One TurboJPEG handle per thread (loader workers decode many files each).
    static TURBO: std::cell::RefCell<Option<turbojpeg::Decompressor>> =
        const { std::cell::RefCell::new(None) };
}

/// Images above this many pixels are refused before decoding (PIL's decompression-bomb error
/// threshold): a corrupt or hostile header must not make a loader thread allocate gigabytes.
pub const MAX_PIXELS: usize = 2 * 89_478_485;

/// Full-resolution RGB decode of a JPEG by libjpeg-turbo; `None` if it is not a JPEG, is
/// CMYK/YCCK, or libjpeg-turbo reports any error or warning (the caller then falls back).
fn decode_jpeg_turbo(bytes: &[u8]) -> Option<Rgb> {
    use turbojpeg::{Colorspace, Image, PixelFormat};
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return None;
    }
    TURBO.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(turbojpeg::Decompressor::new().ok()?);
        }
        let tj = slot.as_mut()?;
        let header = tj.read_header(bytes).ok()?;
        if !matches!(
            header.colorspace,
            Colorspace::YCbCr | Colorspace::RGB | Colorspace::Gray
        ) {
            return None;
        }
        let (width, height) = (header.width, header.height);
        if width == 0 || height == 0 {
            return None;
        }
        let mut data = vec![0u8; width * height * 3];
        let out = Image {
            pixels: data.as_mut_slice(),
            width,
            pitch: width * 3,
            height,
            format: PixelFormat::RGB,
        };
        tj.decompress(bytes, out).ok()?;
        Some(Rgb {
            width,
            height,
            data,
        })
    })
}

/// PIL's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Taps of a 1-D resampling: output `o` reads `len[o]` inputs from `start[o]` with the
/// fixed-point `weights[o * stride ..]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
    stride: usize,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter, same arithmetic:
/// the box [lo, lo + box_len) is mapped onto `out_full` outputs, of which outputs
/// `out0 .. out0 + n` are computed; taps are clamped to the box.
fn taps(lo: usize, box_len: usize, out_full: usize, out0: usize, n: usize) -> Taps {
    let scale = box_len as f64 / out_full as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // triangle filter of support 1, widened when downscaling
    let ss = 1.0 / filterscale;
    let stride = (support.ceil() as usize) * 2 + 1;
    let mut t = Taps {
        start: Vec::with_capacity(n),
        len: Vec::with_capacity(n),
        weights: vec![0; n * stride],
        stride,
    };
    let mut k = vec![0f64; stride];
    for (j, o) in (out0..out0 + n).enumerate() {
        let center = (o as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).floor() as usize).min(box_len);
        let len = xmax.saturating_sub(xmin).min(stride);
        let mut sum = 0.0;
        for (i, kx) in k[..len].iter_mut().enumerate() {
            let x = (i + xmin) as f64 - center + 0.5;
            let v = 1.0 - (x * ss).abs();
            *kx = if v > 0.0 { v } else { 0.0 };
            sum += *kx;
        }
        let w = &mut t.weights[j * stride..j * stride + len];
        for (wi, &kx) in w.iter_mut().zip(&k[..len]) {
            let kx = if sum != 0.0 { kx / sum } else { kx };
            let f = kx * (1u32 << PRECISION_BITS) as f64;
            *wi = if f < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        t.start.push(lo + xmin);
        t.len.push(len);
    }
    t
}

/// PIL's `clip8`: fixed-point sum → u8.
#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Taps of one pass padded to a fixed count `k` (zero weights), each start moved left where
/// needed so that `start + k` stays inside the box `[lo, lo + box_len)`. `None` if the box is
/// shorter than `k` (tiny images; the unpadded path handles them).
fn padded(t: &Taps, k: usize, lo: usize, box_len: usize) -> Option<(Vec<usize>, Vec<i32>)> {
    if box_len < k {
        return None;
    }
    let end = lo + box_len;
    let mut starts = Vec::with_capacity(t.start.len());
    let mut weights = vec![0i32; t.start.len() * k];
    for (o, (&s, &n)) in t.start.iter().zip(&t.len).enumerate() {
        let s2 = if s + k > end { end - k } else { s };
        let shift = s - s2;
        weights[o * k + shift..o * k + shift + n]
            .copy_from_slice(&t.weights[o * t.stride..o * t.stride + n]);
        starts.push(s2);
    }
    Some((starts, weights))
}

/// Horizontal pass with exactly `K` taps per output (zero-padded): rows `rows` of `src` into
/// `mid`, one RGB triple per entry of `starts`. The fixed count lets the compiler unroll the
/// taps and drop the bounds checks.
#[inline(never)]
fn h_pass_fixed<const K: usize>(
    src: &Rgb,
    rows: std::ops::Range<usize>,
    starts: &[usize],
    weights: &[i32],
    mid: &mut [u8],
) {
    let line = starts.len() * 3;
    let stride = src.width * 3;
    for (y, out) in rows.zip(mid.chunks_exact_mut(line)) {
        let row = &src.data[y * stride..(y + 1) * stride];
        for ((px_out, &s), w) in out
            .chunks_exact_mut(3)
            .zip(starts)
            .zip(weights.chunks_exact(K))
        {
            let px = &row[s * 3..s * 3 + 3 * K];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for k in 0..K {
                r += px[3 * k] as i32 * w[k];
                g += px[3 * k + 1] as i32 * w[k];
                b += px[3 * k + 2] as i32 * w[k];
            }
            px_out[0] = clip8(r);
            px_out[1] = clip8(g);
            px_out[2] = clip8(b);
        }
    }
}

/// Horizontal pass, any tap counts (the fallback of [`h_pass_fixed`]).
fn h_pass_any(src: &Rgb, rows: std::ops::Range<usize>, th: &Taps, mid: &mut [u8]) {
    let line = th.start.len() * 3;
    let stride = src.width * 3;
    for (y, out) in rows.zip(mid.chunks_exact_mut(line)) {
        let row = &src.data[y * stride..(y + 1) * stride];
        for (o, px_out) in out.chunks_exact_mut(3).enumerate() {
            let (s, n) = (th.start[o], th.len[o]);
            let w = &th.weights[o * th.stride..o * th.stride + n];
            let px = &row[s * 3..(s + n) * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &wk) in px.chunks_exact(3).zip(w) {
                r += p[0] as i32 * wk;
                g += p[1] as i32 * wk;
                b += p[2] as i32 * wk;
            }
            px_out[0] = clip8(r);
            px_out[1] = clip8(g);
            px_out[2] = clip8(b);
        }
    }
}

/// Vertical pass: output row `o` is the weighted sum of rows `start[o] - r0 ..` of `mid`
/// (each `line` bytes). Columns go in blocks of `B` so the sums stay in registers. Compiled
/// twice: for AVX2 (8-lane 32-bit multiplies) where the CPU has it, else for the baseline
/// (SSE2 has no 32-bit lane multiply).
fn v_pass(tv: &Taps, r0: usize, mid: &[u8], line: usize, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { v_pass_avx2(tv, r0, mid, line, dst) };
    }
    v_pass_body(tv, r0, mid, line, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn v_pass_avx2(tv: &Taps, r0: usize, mid: &[u8], line: usize, dst: &mut [u8]) {
    v_pass_body(tv, r0, mid, line, dst)
}

#[inline(always)]
fn v_pass_body(tv: &Taps, r0: usize, mid: &[u8], line: usize, dst: &mut [u8]) {
    const B: usize = 32;
    for (o, d) in dst.chunks_exact_mut(line).enumerate() {
        let s = tv.start[o] - r0;
        let w = &tv.weights[o * tv.stride..o * tv.stride + tv.len[o]];
        let rows = &mid[s * line..(s + w.len()) * line];
        let mut x = 0;
        while x + B <= line {
            let mut acc = [HALF; B];
            for (k, &wk) in w.iter().enumerate() {
                let r: &[u8; B] = rows[k * line + x..k * line + x + B].try_into().unwrap();
                for (a, &p) in acc.iter_mut().zip(r) {
                    *a += p as i32 * wk;
                }
            }
            for (dd, &a) in d[x..x + B].iter_mut().zip(&acc) {
                *dd = clip8(a);
            }
            x += B;
        }
        for (xx, dd) in d.iter_mut().enumerate().skip(x) {
            let mut a = HALF;
            for (k, &wk) in w.iter().enumerate() {
                a += rows[k * line + xx] as i32 * wk;
            }
            *dd = clip8(a);
        }
    }
}

/// A box of the source (x, y, w, h) resampled to `out_w`×`out_h`, of which only the window
/// (wx, wy, ww, wh) is computed: horizontal pass first on the source rows the window needs,
/// rounded to u8, then vertical, in PIL's fixed-point arithmetic (so the pixels are PIL's).
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
        .unwrap_or(0)
        .max(r0);
    let line = ww * 3;
    let mut dst = vec![0u8; wh * line];
    if line == 0 || wh == 0 {
        return Rgb {
            width: ww,
            height: wh,
            data: dst,
        };
    }
    let mut mid = vec![0u8; (r1 - r0) * line];
    let k = th.len.iter().copied().max().unwrap_or(0);
    let fixed = padded(&th, k, x0, bw);
    macro_rules! by_taps {
        ($($n:literal)*) => {
            match (k, &fixed) {
                $(($n, Some((st, w))) => h_pass_fixed::<$n>(src, r0..r1, st, w, &mut mid),)*
                _ => h_pass_any(src, r0..r1, &th, &mut mid),
            }
        };
    }
    by_taps!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    v_pass(&tv, r0, &mid, line, &mut dst);
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

/// u8 value → normalised f32, per channel (built once).
fn lut() -> &'static [[f32; 256]; 3] {
    static LUT: std::sync::OnceLock<[[f32; 256]; 3]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = (v as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
        t
    })
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
        write_chw(&crop, false, lut, out);
    } else {
        let resized = resample(img, full, rw, rh, (0, 0, rw, rh));
        let mut rng = keyed_rng(aug_seed, position, 0, DOMAIN_IMAGE);
        let bx = random_resized_crop(&mut rng, rw, rh);
        let crop = resample(&resized, bx, s, s, (0, 0, s, s));
        let flip = rng.random::<f64>() < 0.5;
        write_chw(&crop, flip, lut, out);
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
    let n = positions.len();
    // Images are written straight into the tensor's memory: no second buffer of n·3·S·S floats
    // to fill, fault in and copy (60 MB per 100 images at 224 px).
    let t = Tensor::f_empty(
        [n as i64, 3, s as i64, s as i64],
        (Kind::Float, Device::Cpu),
    )
    .map_err(|e| DataError::Tensor(e.to_string()))?;
    if n == 0 {
        return Ok(t);
    }
    let base = t.data_ptr() as *mut f32;
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
        let img = decode_image_for(path, &split.root, Some(tf.image_size))?;
        // SAFETY: `t` is a new contiguous CPU f32 tensor of n·per elements that nothing else
        // references while this function runs; image k's block [k·per, (k+1)·per) is in bounds,
        // is zeroed (so initialised) before the slice is formed, and the slice ends with this
        // iteration, before `t` is returned.
        let out = unsafe {
            let p = base.add(k * per);
            std::ptr::write_bytes(p, 0, per);
            std::slice::from_raw_parts_mut(p, per)
        };
        transform_into(&img, tf, aug_seed, p as u64, out);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::ExtendedColorType;

    fn jpeg(w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
        let ch = if color == ExtendedColorType::L8 { 1 } else { 3 };
        let px: Vec<u8> = (0..w * h * ch)
            .map(|i| ((i * 7 + (i / (w * ch)) * 13) % 251) as u8)
            .collect();
        let mut buf = Vec::new();
        JpegEncoder::new_with_quality(&mut buf, 90)
            .encode(&px, w, h, color)
            .unwrap();
        buf
    }

    #[test]
    fn jpegs_go_through_libjpeg_turbo_and_agree_with_the_image_crate() {
        for (color, w, h) in [
            (ExtendedColorType::Rgb8, 37, 21),
            (ExtendedColorType::L8, 16, 9),
        ] {
            let bytes = jpeg(w, h, color);
            let ours = decode_jpeg_turbo(&bytes).expect("libjpeg-turbo decodes it");
            let theirs = image::load_from_memory(&bytes).unwrap().into_rgb8();
            assert_eq!((ours.width, ours.height), (w as usize, h as usize));
            // Two IDCT implementations: a grey level or two apart at most.
            let worst = ours
                .data
                .iter()
                .zip(theirs.as_raw())
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .max()
                .unwrap();
            assert!(worst <= 3, "{color:?}: {worst}");
            if color == ExtendedColorType::L8 {
                assert!(ours.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
            }
        }
        assert!(decode_jpeg_turbo(b"\x89PNG\r\n\x1a\n").is_none());
    }

    #[test]
    fn files_libjpeg_turbo_rejects_fall_back_to_the_image_crate() {
        // Truncated JPEGs: libjpeg-turbo warns (we do not take its output); whatever the `image`
        // crate made of such a file before is what decode_image still gives.
        let tmp = tempfile::tempdir().unwrap();
        let bytes = jpeg(64, 48, ExtendedColorType::Rgb8);
        for cut in [bytes.len() - 2, bytes.len() / 2, 20] {
            let p = tmp.path().join(format!("cut{cut}.jpg"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let before = image::load_from_memory(&bytes[..cut]).map(|i| i.into_rgb8());
            match (decode_image(&p, tmp.path()), before) {
                (Ok(a), Ok(b)) => assert_eq!(a.data, b.into_raw(), "cut at {cut}"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("cut at {cut}: now {:?}, before {:?}", a.is_ok(), b.is_ok()),
            }
        }
    }

    #[test]
    fn resampling_is_pils_fixed_point_exactly() {
        // PIL 13.0: b[y,x] = ((x*40+y*7)%256, (y*60)%256, (x*y*23)%256), 7×5,
        // Image.fromarray(b).resize((4, 3), Image.BILINEAR).
        let (w, h) = (7, 5);
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend(
                    [(x * 40 + y * 7) % 256, (y * 60) % 256, (x * y * 23) % 256].map(|v| v as u8),
                );
            }
        }
        let img = Rgb {
            width: w,
            height: h,
            data,
        };
        let pil: [[u8; 12]; 3] = [
            [24, 26, 5, 86, 26, 21, 160, 26, 39, 222, 26, 54],
            [35, 120, 24, 97, 120, 96, 171, 120, 139, 203, 120, 121],
            [46, 214, 43, 108, 214, 130, 182, 214, 97, 110, 214, 117],
        ];
        let full = resample(&img, (0, 0, w, h), 4, 3, (0, 0, 4, 3));
        assert_eq!(full.data, pil.concat());
        // A window of the same resize gives the same pixels.
        let win = resample(&img, (0, 0, w, h), 4, 3, (1, 1, 2, 2));
        assert_eq!(win.data, [&pil[1][3..9], &pil[2][3..9]].concat());
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn a_header_claiming_too_many_pixels_is_refused_before_decoding() {
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut bytes)
            .encode(
                &[128u8; 16 * 16 * 3],
                16,
                16,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        let sof = bytes.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
        bytes[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.jpg");
        std::fs::write(&path, &bytes).unwrap();
        let err = decode_image(&path, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("60000×60000") && err.contains("limit"),
            "{err}"
        );
    }
}
