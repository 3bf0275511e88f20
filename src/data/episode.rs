//! The episode sampler: which classes and which images make up episode `index` of `epoch`.
//!
//! An episode is a pure function of (seed, epoch, index): every rank draws the same one without
//! talking to the others, and a resumed run draws the same episodes again.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{DataError, SplitIndex};

/// n_way classes, each with k_shot support and n_query query images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeShape {
    pub n_way: usize,
    pub k_shot: usize,
    pub n_query: usize,
}

impl EpisodeShape {
    /// k_shot + n_query.
    pub fn images_per_class(&self) -> usize {
        self.k_shot + self.n_query
    }
    /// n_way · (k_shot + n_query).
    pub fn total(&self) -> usize {
        self.n_way * self.images_per_class()
    }
}

/// One episode: `classes[c]` is a class index in the split, `images[c]` its k_shot + n_query
/// distinct image indices (support first, then query).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Episode {
    pub classes: Vec<usize>,
    pub images: Vec<Vec<usize>>,
}

impl Episode {
    /// (class index in split, image index) in class-major order: support then query of class 0,
    /// then class 1, ... Positions into this list are what [`super::load_images`] takes.
    pub fn flat(&self) -> Vec<(usize, usize)> {
        self.classes
            .iter()
            .zip(&self.images)
            .flat_map(|(&c, imgs)| imgs.iter().map(move |&i| (c, i)))
            .collect()
    }
    pub fn len(&self) -> usize {
        self.images.iter().map(Vec::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Random-stream domains, so the sampler and the augmentation never share a stream.
pub(crate) const DOMAIN_SAMPLER: u64 = 0x5341_4d50_4c45_5221; // "SAMPLER!"
pub(crate) const DOMAIN_AUGMENT: u64 = 0x4155_474d_454e_5421; // "AUGMENT!"

/// A ChaCha8 generator keyed by (a, b, c, domain): the 256-bit key holds the four words
/// verbatim, so distinct inputs never collide.
pub(crate) fn keyed_rng(a: u64, b: u64, c: u64, domain: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (i, w) in [a, b, c, domain].into_iter().enumerate() {
        key[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// The augmentation seed of episode (seed, epoch, index), to pass to [`super::load_images`].
/// Augmentation then depends only on (seed, epoch, index, flat position).
pub fn aug_seed_for(seed: u64, epoch: u64, index: u64) -> u64 {
    keyed_rng(seed, epoch, index, DOMAIN_AUGMENT).random()
}

/// Checks that `split` can supply episodes of `shape`: enough classes, and every class with at
/// least k_shot + n_query images (the policy is to fail early, not to skip classes).
pub fn validate_shape(split: &SplitIndex, shape: EpisodeShape) -> Result<(), DataError> {
    if shape.n_way == 0 || shape.images_per_class() == 0 {
        return Err(DataError::BadRequest(format!(
            "n_way ({}) and k_shot + n_query ({}) must be at least 1",
            shape.n_way,
            shape.images_per_class()
        )));
    }
    if split.classes.len() < shape.n_way {
        return Err(DataError::TooFewClasses {
            need: shape.n_way,
            have: split.classes.len(),
            split: split.split.file_stem(),
            root: split.root.clone(),
        });
    }
    if let Some(c) = split
        .classes
        .iter()
        .find(|c| c.images.len() < shape.images_per_class())
    {
        return Err(DataError::TooFewImages {
            need: shape.images_per_class(),
            have: c.images.len(),
            class: c.name.clone(),
            split: split.split.file_stem(),
            root: split.root.clone(),
        });
    }
    Ok(())
}

/// The first `k` entries of a uniform random permutation of 0..n (partial Fisher–Yates).
fn choose(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = rng.random_range(i..n);
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

/// Draws episode `index` of `epoch`: n_way classes without replacement, then k_shot + n_query
/// distinct images of each, from a ChaCha8 stream keyed by (seed, epoch, index) alone.
pub fn sample_episode(
    split: &SplitIndex,
    shape: EpisodeShape,
    seed: u64,
    epoch: u64,
    index: u64,
) -> Result<Episode, DataError> {
    validate_shape(split, shape)?;
    let mut rng = keyed_rng(seed, epoch, index, DOMAIN_SAMPLER);
    let classes = choose(&mut rng, split.classes.len(), shape.n_way);
    let images = classes
        .iter()
        .map(|&c| {
            choose(
                &mut rng,
                split.classes[c].images.len(),
                shape.images_per_class(),
            )
        })
        .collect();
    Ok(Episode { classes, images })
}
