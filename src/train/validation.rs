//! The end of an epoch: the official validation (eval mode, fixed episodes), the best model
//! kept, and what the epoch leaves on disk (metrics, best/last weights, state.json, checkpoint).

use anyhow::Result;

use super::metrics::Metric;
use super::progress::Progress;
use super::run_state::{RunState, BEST_WEIGHTS, LAST_WEIGHTS, STATE_FILE};
use super::signals::StopFlag;
use super::{evaluate, Accuracy, EvalEpisodes, Trainer, VAL_EPOCH};
use crate::data::LoaderConfig;
use crate::files::{save_weights, write_json};

impl Trainer<'_> {
    /// Validates after an epoch; `None` when a stop signal ended it early.
    pub(super) fn validate(&self, stop: &StopFlag) -> Result<Option<Accuracy>> {
        let c = &self.r.config;
        let prog = Progress::new_on(self.comm.world().is_root(), c.train.val_episodes, "val");
        let set = EvalEpisodes {
            split: self.data.val.clone(),
            shape: self.data.shape,
            loader: LoaderConfig::for_run(self.r, false),
            epoch_key: VAL_EPOCH,
            count: c.train.val_episodes,
        };
        let acc = evaluate(&self.model, set, self.device, self.comm, Some(stop), || {
            prog.step(String::new())
        })?;
        prog.finish();
        Ok(acc)
    }

    /// Records epoch `epoch` (`done` steps, validated at `acc`): the best so far, the metrics,
    /// the weights and state.json (rank 0), then its checkpoint.
    pub(super) fn end_epoch(&mut self, epoch: u64, done: u64, acc: Accuracy) -> Result<()> {
        // An epoch cut short by --max-steps is validated for the user, but only completed
        // epochs compete for "best" (so a resumed run picks the same best model as one that
        // was never stopped); it provides best.safetensors only while no epoch has completed.
        let complete = done == self.epochs.steps_per_epoch;
        let best = if complete {
            self.summary
                .best_val
                .as_ref()
                .is_none_or(|b| acc.mean > b.mean)
        } else {
            self.summary.best_val.is_none()
        };
        self.progress.println(&format!(
            "epoch {epoch}: {} {}",
            acc.official_line("Val"),
            match (best, complete) {
                (true, true) => "(best)",
                (true, false) => "(epoch cut short by --max-steps; kept as best for now)",
                _ => "",
            }
        ));
        self.curves.val_acc.push((epoch as f64, acc.mean));
        if best && complete {
            self.summary.best_val = Some(acc.clone());
            self.summary.best_epoch = Some(epoch);
        }
        self.summary.epochs_completed = epoch + 1;
        if let Some(m) = self.metrics.as_mut() {
            m.write(&Metric::Val {
                epoch,
                acc: acc.mean,
                ci95: acc.ci95,
                best,
            })?;
            let c = &self.r.config;
            let out = &c.run.output;
            if best {
                save_weights(&self.vs, &out.join(BEST_WEIGHTS))?;
            }
            save_weights(&self.vs, &out.join(LAST_WEIGHTS))?;
            write_json(
                &out.join(STATE_FILE),
                &RunState {
                    epoch,
                    step: self.summary.steps,
                    best_val: self.summary.best_val.clone(),
                    best_epoch: self.summary.best_epoch,
                    config: c.clone(),
                },
            )?;
        }
        self.checkpoint(self.position(epoch, done, complete))?;
        Ok(())
    }
}
