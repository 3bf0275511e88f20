//! Loader threads: workers sample, decode, transform and stack whole episodes ahead of the
//! trainer; the iterator yields them in index order.
//!
//! Each worker takes the next episode index from a job channel and builds that episode alone, so
//! the tensors do not depend on the number of workers. At most `workers + prefetch` episodes
//! are in flight or waiting; a new job is issued each time one is yielded. Dropping the loader
//! closes the job channel: each worker finishes the episode it holds and exits, and the drop
//! joins them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{unbounded, Receiver, Sender};
use tch::Tensor;

use super::{
    aug_seed_for, load_images, sample_episode, DataError, Episode, EpisodeShape, SplitIndex,
    TransformConfig,
};

/// Loader settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Worker threads; 0 loads each episode in the calling thread when it is asked for.
    pub workers: usize,
    /// Episodes finished ahead of the trainer, beyond the ones being built.
    pub prefetch: usize,
    pub transform: TransformConfig,
    /// Run seed: episode sampling and augmentation derive from (seed, epoch, index).
    pub seed: u64,
    /// Load only the images at these flat positions (start, end) of each episode — a rank's
    /// slice under `--shard images`; `images` is then flat (end − start, 3, S, S).
    pub slice: Option<(usize, usize)>,
}

impl LoaderConfig {
    /// The loader of run `r`, with or without training augmentation.
    pub fn for_run(r: &crate::config::Resolved, augment: bool) -> Self {
        Self {
            workers: r.workers,
            prefetch: r.config.data.prefetch,
            transform: TransformConfig {
                image_size: r.config.data.image_size as u32,
                augment,
            },
            seed: r.config.run.seed,
            slice: None,
        }
    }
}

/// One episode, ready for the model.
#[derive(Debug)]
pub struct LoadedEpisode {
    pub epoch: u64,
    pub index: u64,
    pub episode: Episode,
    /// (n_way, k_shot + n_query, 3, S, S) f32, support before query within each class; with
    /// [`LoaderConfig::slice`], only those flat positions: (len, 3, S, S).
    pub images: Tensor,
}

/// Builds episode `index` of `epoch` completely: sample, load every image, shape as
/// (n_way, k_shot + n_query, 3, S, S).
pub fn load_episode(
    split: &SplitIndex,
    shape: EpisodeShape,
    cfg: &LoaderConfig,
    epoch: u64,
    index: u64,
) -> Result<LoadedEpisode, DataError> {
    let episode = sample_episode(split, shape, cfg.seed, epoch, index)?;
    let (start, end) = cfg.slice.unwrap_or((0, episode.len()));
    let positions: Vec<usize> = (start..end.min(episode.len())).collect();
    let aug = aug_seed_for(cfg.seed, epoch, index);
    let flat = load_images(split, &episode, &positions, &cfg.transform, aug)?;
    let s = cfg.transform.image_size as i64;
    let images = if cfg.slice.is_some() {
        flat
    } else {
        flat.f_reshape([shape.n_way as i64, shape.images_per_class() as i64, 3, s, s])
            .map_err(|e| DataError::Tensor(e.to_string()))?
    };
    Ok(LoadedEpisode {
        epoch,
        index,
        episode,
        images,
    })
}

type Job = u64;
type Done = (u64, Result<LoadedEpisode, DataError>);

/// Iterator over episodes of one epoch (a range, or any list of indices), loaded by worker
/// threads, yielded in list order.
pub struct EpisodeLoader {
    split: Arc<SplitIndex>,
    shape: EpisodeShape,
    cfg: LoaderConfig,
    epoch: u64,
    /// Episode indices to yield, in order; `next` and `issued` are positions in it.
    order: Vec<u64>,
    next: usize,
    issued: usize,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    ready: BTreeMap<u64, Result<LoadedEpisode, DataError>>,
    stop: Arc<AtomicBool>,
    /// Set from outside (SIGTERM/SIGINT): a wait for an episode gives up with
    /// [`DataError::Interrupted`] instead of blocking on a worker that may never finish (a
    /// file system that stopped answering).
    interrupt: Option<fn() -> bool>,
    handles: Vec<JoinHandle<()>>,
}

/// How often a waiting `next` looks at the interrupt flag.
const INTERRUPT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl EpisodeLoader {
    pub fn new(
        split: Arc<SplitIndex>,
        shape: EpisodeShape,
        cfg: LoaderConfig,
        epoch: u64,
        indices: Range<u64>,
    ) -> Self {
        Self::with_indices(split, shape, cfg, epoch, indices.collect())
    }

    /// Loads the episodes `order` (e.g. every W-th one for a rank under `--shard episodes`).
    pub fn with_indices(
        split: Arc<SplitIndex>,
        shape: EpisodeShape,
        cfg: LoaderConfig,
        epoch: u64,
        order: Vec<u64>,
    ) -> Self {
        let (job_tx, job_rx) = unbounded::<Job>();
        let (done_tx, done_rx) = unbounded::<Done>();
        let stop = Arc::new(AtomicBool::new(false));
        // A thread that cannot be spawned (resource limits) just means fewer workers; with none,
        // episodes are loaded in the calling thread.
        let mut handles = Vec::with_capacity(cfg.workers);
        for w in 0..cfg.workers {
            let (split, jobs, done) = (split.clone(), job_rx.clone(), done_tx.clone());
            let stop = stop.clone();
            match std::thread::Builder::new()
                .name(format!("fsct-loader-{w}"))
                .spawn(move || {
                    let source = Source {
                        split: &split,
                        shape,
                        cfg,
                        epoch,
                    };
                    worker(&source, jobs, done, &stop)
                }) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    tracing::warn!(
                        "could only start {w} of {} loader threads: {e}",
                        cfg.workers
                    );
                    break;
                }
            }
        }
        let mut cfg = cfg;
        cfg.workers = handles.len();
        let mut loader = EpisodeLoader {
            split,
            shape,
            cfg,
            epoch,
            order,
            next: 0,
            issued: 0,
            jobs: Some(job_tx),
            done: done_rx,
            ready: BTreeMap::new(),
            stop,
            interrupt: None,
            handles,
        };
        loader.top_up();
        loader
    }

    /// Makes every wait for an episode also poll `stop` (e.g. [`crate::signals::stop_requested`]):
    /// once it says so, `next` yields [`DataError::Interrupted`] instead of waiting on.
    pub fn interrupted_by(mut self, stop: fn() -> bool) -> Self {
        self.interrupt = Some(stop);
        self
    }

    fn interrupted(&self) -> bool {
        self.interrupt.is_some_and(|stop| stop())
    }

    /// Issues jobs until `workers + prefetch` episodes are in flight or waiting.
    fn top_up(&mut self) {
        if self.cfg.workers == 0 {
            return;
        }
        let window = self.cfg.workers + self.cfg.prefetch;
        while self.issued < self.order.len() && self.issued < self.next + window {
            if let Some(tx) = &self.jobs {
                // Workers only stop once this sender is dropped, so the send cannot fail here.
                let _ = tx.send(self.order[self.issued]);
            }
            self.issued += 1;
        }
    }
}

/// What a worker builds its episodes from: one epoch of one split.
struct Source<'a> {
    split: &'a SplitIndex,
    shape: EpisodeShape,
    cfg: LoaderConfig,
    epoch: u64,
}

/// Builds the episodes whose indices arrive on `jobs` until the loader is dropped.
fn worker(src: &Source<'_>, jobs: Receiver<Job>, done: Sender<Done>, stop: &AtomicBool) {
    while let Ok(index) = jobs.recv() {
        if stop.load(Ordering::Relaxed) {
            break; // the loader was dropped: skip the queued jobs
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load_episode(src.split, src.shape, &src.cfg, src.epoch, index)
        }))
        .unwrap_or_else(|p| {
            let message = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(DataError::WorkerPanic { index, message })
        });
        if done.send((index, result)).is_err() {
            break; // the loader is gone
        }
    }
}

impl Iterator for EpisodeLoader {
    type Item = Result<LoadedEpisode, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let index = *self.order.get(self.next)?;
        if self.cfg.workers == 0 {
            self.next += 1;
            return Some(load_episode(
                &self.split,
                self.shape,
                &self.cfg,
                self.epoch,
                index,
            ));
        }
        let item = loop {
            if let Some(r) = self.ready.remove(&index) {
                break r;
            }
            if self.interrupted() {
                return Some(Err(DataError::Interrupted));
            }
            match self.done.recv_timeout(INTERRUPT_POLL) {
                Ok((i, r)) => {
                    self.ready.insert(i, r);
                }
                Err(crossbeam::channel::RecvTimeoutError::Timeout) => {}
                // Unreachable while we hold a job sender and workers are alive; report, not hang.
                Err(crossbeam::channel::RecvTimeoutError::Disconnected) => {
                    break Err(DataError::WorkerPanic {
                        index,
                        message: "all loader threads exited".into(),
                    })
                }
            }
        };
        self.next += 1;
        self.top_up();
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.order.len() - self.next;
        (n, Some(n))
    }
}

impl Drop for EpisodeLoader {
    fn drop(&mut self) {
        // Workers finish the episode they hold, then skip queued jobs and see the closed channel.
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        if self.interrupted() {
            // A worker may be stuck in a read that never returns; the process is about to
            // exit, so leave the threads behind rather than wait for them.
            return;
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
