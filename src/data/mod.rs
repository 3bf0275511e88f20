//! Datasets on disk, the episode sampler, image transforms, loader threads, the built-in dataset.
//!
//! - [`open_split`] reads one split of a dataset folder in any of three formats (official JSON
//!   file lists, mini-ImageNet csv + image folder, class folders) into a [`SplitIndex`].
//! - [`sample_episode`] draws episode (seed, epoch, index): n_way classes without replacement,
//!   k_shot + n_query distinct images each, class-major. No state, so every rank agrees.
//! - [`load_images`] decodes and transforms any subset of an episode's images (a rank's slice);
//!   [`EpisodeLoader`] does whole episodes on worker threads ahead of the trainer.
//! - [`synth`] writes the built-in procedural dataset; [`check`] validates a dataset folder.
//!
//! **Bad data policy: error.** A missing split, a malformed split file, an unreadable, corrupt
//! or empty image, a class with fewer than k_shot + n_query images or a split with fewer than
//! n_way classes stops the run with a [`DataError`] naming the file and the fix; nothing is
//! skipped silently. `fsct-dist data check DIR` lists every problem at once. Classes are checked
//! when an episode is drawn (every class, not only the drawn ones); images when they are loaded.

pub mod check;
mod episode;
mod error;
mod index;
mod loader;
pub mod synth;
mod transform;

pub use check::{check_dataset, CheckReport, SplitReport, CHECK_IMAGE_SIZE};
pub use episode::{aug_seed_for, sample_episode, validate_shape, Episode, EpisodeShape};
pub use error::DataError;
pub use index::{open_split, ClassImages, DatasetFormat, SplitIndex};
pub use loader::{load_episode, EpisodeLoader, LoadedEpisode, LoaderConfig};
pub use synth::{ensure_builtin, write_dataset, SynthOptions, SynthSummary};
pub use transform::{
    decode_image, decode_image_for, load_images, transform_into, Rgb, TransformConfig, MEAN, STD,
};
