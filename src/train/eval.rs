//! Evaluation as in the official `val_loop` / `direct_test`: per-episode accuracy in %, mean and
//! 95% interval 1.96·std/√n with the population std (numpy's default ddof 0).

use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::signals::StopFlag;
use super::step::balanced_groups;
use crate::data::{EpisodeLoader, EpisodeShape, LoaderConfig, SplitIndex};
use crate::distributed::Communicator;
use crate::model::{correct, FewShotModel};

/// Episode-key "epochs" reserved for evaluation, so validation draws the same episodes every
/// epoch (a fair comparison for model selection) and never the training ones.
pub const VAL_EPOCH: u64 = u64::MAX - 1;
pub const TEST_EPOCH: u64 = u64::MAX;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accuracy {
    pub episodes: usize,
    /// Mean accuracy in percent.
    pub mean: f64,
    /// Half-width of the 95% interval, in percent.
    pub ci95: f64,
}

impl Accuracy {
    pub fn from_episodes(acc: &[f64]) -> Self {
        let n = acc.len().max(1) as f64;
        let mean = acc.iter().sum::<f64>() / n;
        let var = acc.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
        Self {
            episodes: acc.len(),
            mean,
            ci95: 1.96 * var.sqrt() / n.sqrt(),
        }
    }

    /// The official line, e.g. `600 Test Acc = 60.38% +- 0.66%`.
    pub fn official_line(&self, what: &str) -> String {
        format!(
            "{} {what} Acc = {:4.2}% +- {:4.2}%",
            self.episodes, self.mean, self.ci95
        )
    }
}

/// Which episodes to evaluate on.
pub struct EvalEpisodes {
    pub split: Arc<SplitIndex>,
    pub shape: EpisodeShape,
    pub loader: LoaderConfig,
    /// [`VAL_EPOCH`] or [`TEST_EPOCH`]: fixes the episodes drawn.
    pub epoch_key: u64,
    pub count: u64,
}

/// Accuracy of `model` (eval mode: BatchNorm running statistics, no graph) on `set`;
/// `on_episode` runs after each episode (a progress bar). The episodes are split across the
/// ranks of `comm` in contiguous balanced ranges and the per-episode accuracies gathered in
/// episode order, so the result is the single-process one for every world size.
///
/// With `stop`, the ranks agree before every episode whether a stop signal arrived (one tiny
/// all-reduce per episode, taken by every rank the same number of times even when its range is
/// one shorter) and return `None` at once if so: a stop is honoured within one episode.
pub fn evaluate(
    model: &FewShotModel,
    set: EvalEpisodes,
    device: Device,
    comm: &dyn Communicator,
    stop: Option<&StopFlag>,
    mut on_episode: impl FnMut(),
) -> Result<Option<Accuracy>> {
    let _guard = tch::no_grad_guard();
    let world = comm.world();
    let groups = balanced_groups(set.count as i64, world.size as i64);
    let rounds = groups.iter().map(|g| g.end - g.start).max().unwrap_or(0);
    let mine = groups.get(world.rank).cloned().unwrap_or(0..0);
    let mut acc = Vec::with_capacity((mine.end - mine.start) as usize);
    let mut episodes = EpisodeLoader::new(
        set.split,
        set.shape,
        set.loader,
        set.epoch_key,
        mine.start as u64..mine.end as u64,
    );
    for _ in 0..rounds {
        if let Some(stop) = stop {
            if stop.requested(comm)? {
                return Ok(None);
            }
        }
        let Some(batch) = episodes.next() else {
            continue;
        };
        let batch = batch?;
        let out = model.forward(&batch.images.to_device(device), false);
        let queries = out.logits.size()[0];
        let hits = correct(&out.logits, set.shape.n_query as i64, 0);
        acc.push(100.0 * hits as f64 / queries as f64);
        on_episode();
    }
    let all = comm.all_gather_f64(&acc)?;
    Ok(Some(Accuracy::from_episodes(&all)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_uses_population_std() {
        // numpy: np.mean([50,100]) = 75, np.std = 25, 1.96*25/sqrt(2) = 34.648...
        let a = Accuracy::from_episodes(&[50.0, 100.0]);
        assert_eq!(a.mean, 75.0);
        assert!((a.ci95 - 1.96 * 25.0 / 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(Accuracy::from_episodes(&[60.0; 4]).ci95, 0.0);
    }

    #[test]
    fn official_line_format() {
        let a = Accuracy {
            episodes: 600,
            mean: 60.3812,
            ci95: 0.6649,
        };
        assert_eq!(a.official_line("Test"), "600 Test Acc = 60.38% +- 0.66%");
    }
}
