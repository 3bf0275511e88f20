//! Datasets on disk, the episode sampler, image transforms, loader threads, the built-in dataset.
