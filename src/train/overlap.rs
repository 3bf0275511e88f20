//! `--overlap`: the gradient all-reduce overlapped with the backward (PyTorch DDP's overlap).
//!
//! Why this order: it is the order in which the backward finishes gradients. The head's
//! backward runs first (from the loss down to the embeddings), so the head's gradients are final
//! as soon as it is done, while the whole backbone backward is still ahead (they go out just
//! after the all-reduce of the embeddings' gradients in `--shard images`, the one collective
//! inside the backward, which an in-order backend would otherwise queue behind them); the backbone's
//! segments (Conv blocks; ResNet stem and stages) then finish from the last to the first. Only
//! the optimizer step's last episode, and in it the last micro-step, launches anything: before
//! that every gradient can still grow. For ResNet34 FS-CT the head is 53 M of the 74 M
//! parameters, so most of the bytes are on the wire during the whole backbone backward.
//!
//! Why these buckets: a group (the head, one segment) is launched whole the moment it is final
//! and cut into buckets of about 25 MiB ([`crate::distributed::BUCKET_BYTES`], DDP's default):
//! large enough that each message costs bandwidth rather than latency, small enough that the
//! first of the head's 200 MB is on the wire early and the last segment's bucket ends soon after
//! the backward. The sums are those of the exchange after the backward (elementwise over the
//! same ranks); only the message boundaries differ.
//!
//! With a sharded optimizer (`--shard-optimizer on`, [`super::zero`]) each group's gradients
//! are reduced to their owners instead (one reduce per owner rank that owns some of the group),
//! as ZeRO-1 with DeepSpeed's `overlap_comm` does.
//!
//! Where the reductions run is the communicator's business: MPI sends them from a thread of its
//! own ([`crate::distributed::mpi_background`]), NCCL queues them on its side CUDA stream
//! ([`crate::distributed::nccl`]); this module only says when each group is final.

use anyhow::{anyhow, Result};
use tch::Tensor;

use super::grads::defined_grads;
use super::zero::Ownership;
use crate::distributed::Communicator;
use crate::model::FewShotModel;

/// Parameters whose gradients become final together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Everything outside the backbone: the FS-CT / CTX head and the classifier.
    Head,
    /// Backbone segment i ([`crate::model::FeatureNet::forward_segment`]).
    Segment(usize),
}

/// The buckets of one optimizer step: which variables each group holds, which groups are on
/// the wire, and how many went out before the backward ended.
pub struct Overlap<'a> {
    comm: &'a dyn Communicator,
    vars: Vec<Tensor>,
    /// Variable indices of the head, and of each backbone segment; taken when launched.
    head: Option<Vec<usize>>,
    segments: Vec<Option<Vec<usize>>>,
    /// Backbone variables in no segment (none today): launched by [`Overlap::finish`].
    rest: Vec<usize>,
    /// Each variable's owner under a sharded optimizer (reduce to it instead of all-reduce).
    owners: Option<&'a Ownership>,
    /// Groups launched so far.
    early: usize,
    /// The first failure to launch, reported by [`Overlap::finish`] (the backward that calls
    /// [`Overlap::ready`] cannot return one).
    error: Option<anyhow::Error>,
}

impl<'a> Overlap<'a> {
    /// The groups of `vars` (the optimizer's variables with their VarStore names, in the
    /// optimizer's order, which `owners` indexes).
    pub fn new(
        comm: &'a dyn Communicator,
        model: &FewShotModel,
        vars: &[(String, Tensor)],
        owners: Option<&'a Ownership>,
    ) -> Self {
        let f = model.feature();
        let mut segments: Vec<Vec<usize>> = (0..f.num_segments()).map(|_| Vec::new()).collect();
        let (mut head, mut rest) = (Vec::new(), Vec::new());
        for (i, (name, _)) in vars.iter().enumerate() {
            match name.strip_prefix("feature.") {
                None => head.push(i),
                Some(inner) => match f.segment_of(inner) {
                    Some(s) if s < segments.len() => segments[s].push(i),
                    _ => rest.push(i),
                },
            }
        }
        Self {
            comm,
            vars: vars.iter().map(|(_, t)| t.shallow_clone()).collect(),
            head: Some(head),
            segments: segments.into_iter().map(Some).collect(),
            rest,
            owners,
            early: 0,
            error: None,
        }
    }

    /// Launches `g`'s exchange (once): its gradients are final.
    pub fn ready(&mut self, g: Group) {
        let idx = match g {
            Group::Head => self.head.take(),
            Group::Segment(i) => self.segments.get_mut(i).and_then(Option::take),
        };
        let Some(idx) = idx else { return };
        if idx.is_empty() || self.error.is_some() {
            return;
        }
        match self.launch(&idx) {
            Ok(()) => self.early += 1,
            Err(e) => self.error = Some(e),
        }
    }

    /// Starts the all-reduce (or the reduces to the owners) of the gradients of `idx`.
    fn launch(&self, idx: &[usize]) -> Result<()> {
        let pick = |keep: &dyn Fn(usize) -> bool| -> Vec<Tensor> {
            let vars: Vec<Tensor> = idx
                .iter()
                .filter(|&&i| keep(i))
                .map(|&i| self.vars[i].shallow_clone())
                .collect();
            defined_grads(&vars)
        };
        match self.owners {
            None => self.comm.start_all_reduce_sum(pick(&|_| true)),
            Some(own) => {
                for r in 0..own.world {
                    let mine = pick(&|i| own.owner[i] == r);
                    if !mine.is_empty() {
                        self.comm.start_reduce_sum(mine, r)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Launches what is not yet on the wire (in the same order on every rank), then waits until
    /// every sum is in place. Returns how many groups were launched before it was called.
    pub fn finish(mut self) -> Result<usize> {
        let early = self.early;
        self.ready(Group::Head);
        for i in (0..self.segments.len()).rev() {
            self.ready(Group::Segment(i));
        }
        if !self.rest.is_empty() {
            self.launch(&self.rest)?;
        }
        if let Some(e) = self.error.take() {
            return Err(anyhow!("starting an overlapped gradient exchange: {e:#}"));
        }
        self.comm.finish_all_reduces()?;
        Ok(early)
    }
}
