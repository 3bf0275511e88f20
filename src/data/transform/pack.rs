//! Batch packing: an episode's images (or one rank's slice of them) decoded and transformed
//! straight into one (n, 3, S, S) tensor.

use tch::{Device, Kind, Tensor};

use super::{decode_image_for, transform_into, TransformConfig};
use crate::data::{DataError, Episode, SplitIndex};

/// Loads the images at `positions` (indices into `episode.flat()`) and returns a
/// (positions.len(), 3, S, S) f32 tensor. A rank passes its own slice of positions; the pixels of
/// each image do not depend on which other positions are loaded. `aug_seed` should come from
/// [`crate::data::aug_seed_for`]`(seed, epoch, index)`.
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
