//! The end of a run: the final dumps, memory report and curves, the test of the best model,
//! and the end of a run stopped by a signal.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::dumps::rank_path;
use super::metrics::Metric;
use super::progress::Progress;
use super::run_state::{Position, BEST_WEIGHTS};
use super::setup::{episode_shape, open_split};
use super::signals::StopFlag;
use super::{checkpoint, evaluate, Accuracy, EvalEpisodes, TrainSummary, Trainer, TEST_EPOCH};
use crate::config::Resolved;
use crate::data::LoaderConfig;
use crate::distributed::Communicator;
use crate::files::{save_weights, write_json};
use crate::memory::MemoryProfiler;
use crate::model::{self, FewShotModel};
use crate::plot;

impl Trainer<'_> {
    /// After the last epoch: `--dump-params`, the memory report and curves.png (rank 0).
    pub(super) fn finish_training(&self) -> Result<()> {
        self.progress.finish();
        let world = self.comm.world();
        let c = &self.r.config;
        let out = &c.run.output;
        if let Some(path) = &self.dumps.params {
            // Rank 0 writes the file asked for, the others beside it (to check they agree).
            save_weights(&self.vs, &rank_path(path, world.rank))?;
        }
        // Every rank's held memory and optimizer state (what a sharded optimizer divides),
        // for rank 0's report: pairs (held, state) in rank order.
        let held = self
            .profiler
            .as_ref()
            .and_then(MemoryProfiler::last)
            .map_or(0.0, |m| m.held_bytes as f64);
        let mine = [held, self.opt.state_bytes() as f64];
        let per_rank: Vec<(u64, u64)> = match &self.profiler {
            Some(_) if world.size > 1 => self.comm.all_gather_f64(&mine)?,
            _ => mine.to_vec(),
        }
        .chunks(2)
        .map(|p| (p[0] as u64, p[1] as u64))
        .collect();
        if !world.is_root() {
            return Ok(());
        }
        if let Some(m) = self.profiler.as_ref().and_then(MemoryProfiler::last) {
            self.progress
                .println(&crate::memory::profiler::table(m, self.meter));
            self.progress
                .println(&crate::memory::profiler::held_per_rank(&per_rank));
            let device = format!("{:?}", self.device);
            let report = crate::memory::profiler::Report {
                device: &device,
                held_per_rank: &per_rank,
            };
            if let Err(e) = crate::memory::profiler::write_report(m, self.meter, report, out) {
                tracing::warn!("memory report not written: {e:#}");
            }
        }
        // A picture is a convenience: failing to draw it must not fail the run.
        let title = format!("{} {:?}", c.model.method.official_name(), c.model.backbone);
        if let Err(e) = plot::plot_curves(&self.curves, &title, &out.join("curves.png")) {
            tracing::warn!("curves.png not drawn: {e:#}");
        }
        Ok(())
    }

    /// Tests the best model on every rank; `None` when a stop signal ended it early.
    pub(super) fn test(&mut self, stop: &StopFlag) -> Result<Option<Accuracy>> {
        let c = &self.r.config;
        // Every rank needs the best weights for the distributed test: rank 0 wrote them.
        self.comm.barrier()?;
        let best = c.run.output.join(BEST_WEIGHTS);
        model::load_checked(&mut self.vs, &best, model::WeightsSource::Run)?;
        let test = test_split(self.r, &self.model, &self.data.root, self.comm, Some(stop))?;
        let Some(test) = test else {
            return Ok(None);
        };
        if let Some(m) = self.metrics.as_mut() {
            m.write(&Metric::Test {
                split: c.test.split,
                episodes: test.episodes,
                acc: test.mean,
                ci95: test.ci95,
            })?;
        }
        self.summary.test = Some(test.clone());
        self.summary.seconds = self.started.elapsed().as_secs_f64();
        if self.comm.world().is_root() {
            write_json(&c.run.output.join("summary.json"), &self.summary)?;
        }
        Ok(Some(test))
    }

    /// Ends a run stopped by a signal at `at`: its checkpoint, then the summary naming it.
    pub(super) fn stop_at(self, at: Position) -> Result<TrainSummary> {
        self.progress.finish();
        let checkpoint = self.checkpoint(at)?;
        self.stopped(checkpoint)
    }

    /// Ends a run stopped by a signal once rank 0 has written `checkpoint` (None on other
    /// ranks, or for the newest checkpoint of the run folder).
    pub(super) fn stopped(self, checkpoint: Option<PathBuf>) -> Result<TrainSummary> {
        self.comm.barrier()?;
        let out = &self.r.config.run.output;
        let mut summary = self.summary;
        summary.preempted = Some(checkpoint.unwrap_or_else(|| out.join(checkpoint::DIR)));
        summary.seconds = self.started.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// Evaluates `model` on the configured test split and prints the official line; `None` when
/// `stop` ended it early (nothing printed or written).
pub fn test_split(
    r: &Resolved,
    model: &FewShotModel,
    root: &Path,
    comm: &dyn Communicator,
    stop: Option<&StopFlag>,
) -> Result<Option<Accuracy>> {
    let c = &r.config;
    let shape = episode_shape(r);
    let device = comm.world().device_for(r.device);
    let split = open_split(root, c.test.split, shape)?;
    let prog = Progress::new_on(comm.world().is_root(), c.test.episodes, "test");
    let set = EvalEpisodes {
        split,
        shape,
        loader: LoaderConfig::for_run(r, false),
        epoch_key: TEST_EPOCH,
        count: c.test.episodes,
    };
    let acc = evaluate(model, set, device, comm, stop, || prog.step(String::new()))?;
    prog.finish();
    let Some(acc) = acc else {
        return Ok(None);
    };
    if comm.world().is_root() {
        println!("{}", acc.official_line("Test"));
        write_json(
            &c.run.output.join("test.json"),
            &serde_json::json!({
                "split": c.test.split, "episodes": acc.episodes, "acc": acc.mean, "ci95": acc.ci95,
            }),
        )?;
    }
    Ok(Some(acc))
}
