//! The official transform of one decoded image: resize and centre crop, or the training
//! augmentation (RandomResizedCrop + flip), then normalise to CHW floats.

use rand::Rng;

use super::resample::resample;
use super::Rgb;
use crate::data::episode::keyed_rng;

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
