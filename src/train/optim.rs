//! The optimizers of the official code (AdamW, Adam, SGD with momentum), written over tensors we
//! own so that their state can be checkpointed and restored exactly (libtorch's C++ optimizers,
//! which tch wraps, keep their state out of reach). The update rules and their order of
//! operations follow torch.optim: AdamW decays the weights before the moment update, Adam adds
//! L2 weight decay to the gradient, SGD keeps a momentum buffer started from the first
//! gradient. Every parameter counts its own steps, and a parameter without a gradient is left
//! alone, as in PyTorch. BatchNorm running statistics are not trainable, so never stepped.
//!
//! Under `--shard-optimizer on` ([`super::zero`]) an optimizer steps, and holds state for, the
//! variables its rank owns only.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::Tensor;

use super::ownership::Ownership;
use crate::config::{Optimizer as Kind_, TrainConfig};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Per-parameter state.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) step: i64,
    /// Adam/AdamW first and second moments; SGD momentum buffer in `exp_avg`.
    pub(crate) exp_avg: Option<Tensor>,
    pub(crate) exp_avg_sq: Option<Tensor>,
}

#[derive(Debug)]
pub struct Optimizer {
    kind: Kind_,
    lr: f64,
    weight_decay: f64,
    momentum: f64,
    /// Trainable variables by name (name order: the checkpoint order).
    vars: Vec<(String, Tensor)>,
    state: Vec<State>,
    /// Which variables this rank steps (None: all of them, unsharded).
    shards: Option<Ownership>,
}

pub fn build(c: &TrainConfig, vs: &VarStore) -> Result<Optimizer> {
    let mut vars: Vec<(String, Tensor)> = vs
        .trainable_variables_named()
        .into_iter()
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let state = vars
        .iter()
        .map(|_| State {
            step: 0,
            exp_avg: None,
            exp_avg_sq: None,
        })
        .collect();
    Ok(Optimizer {
        kind: c.optimizer,
        lr: c.learning_rate,
        weight_decay: c.weight_decay,
        momentum: c.momentum,
        vars,
        state,
        shards: None,
    })
}

/// The trainable variables of a VarStore with their names (tch keeps names only on
/// `variables()`; trainable ones are those that require grad).
trait NamedTrainable {
    fn trainable_variables_named(&self) -> Vec<(String, Tensor)>;
}

impl NamedTrainable for VarStore {
    fn trainable_variables_named(&self) -> Vec<(String, Tensor)> {
        self.variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }
}

/// What the loss scaler needs of an optimizer: its variables and a step. Implemented by ours and
/// by tch's (tests of the scaler use the latter).
pub trait Step {
    fn trainable_variables(&self) -> Vec<Tensor>;
    fn step(&mut self);
}

impl Step for Optimizer {
    fn trainable_variables(&self) -> Vec<Tensor> {
        Optimizer::trainable_variables(self)
    }
    fn step(&mut self) {
        Optimizer::step(self)
    }
}

impl Step for tch::nn::Optimizer {
    fn trainable_variables(&self) -> Vec<Tensor> {
        tch::nn::Optimizer::trainable_variables(self)
    }
    fn step(&mut self) {
        tch::nn::Optimizer::step(self)
    }
}

impl Optimizer {
    pub fn trainable_variables(&self) -> Vec<Tensor> {
        self.vars.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    /// The variables with their VarStore names, in name order.
    pub fn named_variables(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// Element counts of the variables, in name order (what [`super::zero`] balances).
    pub fn numels(&self) -> Vec<i64> {
        self.vars.iter().map(|(_, t)| t.numel() as i64).collect()
    }

    pub(crate) fn var(&self, i: usize) -> &Tensor {
        &self.vars[i].1
    }

    pub(crate) fn var_name(&self, i: usize) -> &str {
        &self.vars[i].0
    }

    pub(crate) fn var_state(&self, i: usize) -> &State {
        &self.state[i]
    }

    /// Bytes of state this rank holds (moments or momentum buffers).
    pub fn state_bytes(&self) -> u64 {
        self.state
            .iter()
            .flat_map(|s| [&s.exp_avg, &s.exp_avg_sq])
            .flatten()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }

    /// The ownership this optimizer steps under (None: unsharded).
    pub fn shards(&self) -> Option<&Ownership> {
        self.shards.as_ref()
    }

    /// From now on steps only the variables `own` gives this rank, and drops the state of the
    /// others (a loaded checkpoint holds all of it).
    pub fn shard(&mut self, own: Ownership) {
        assert_eq!(own.owner.len(), self.vars.len(), "one owner per variable");
        for (i, s) in self.state.iter_mut().enumerate() {
            if !own.owns(i) {
                *s = State {
                    step: 0,
                    exp_avg: None,
                    exp_avg_sq: None,
                };
            }
        }
        self.shards = Some(own);
    }

    fn owns(&self, i: usize) -> bool {
        self.shards.as_ref().is_none_or(|o| o.owns(i))
    }

    /// Sets every existing gradient to zero.
    pub fn zero_grad(&mut self) {
        for (_, v) in &self.vars {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update of every (owned) variable that has a gradient.
    pub fn step(&mut self) {
        let owned: Vec<bool> = (0..self.vars.len()).map(|i| self.owns(i)).collect();
        tch::no_grad(|| {
            for (((_, p), s), owned) in self.vars.iter().zip(self.state.iter_mut()).zip(owned) {
                let grad = p.grad();
                if !owned || !grad.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                s.step += 1;
                match self.kind {
                    Kind_::AdamW | Kind_::Adam => {
                        let grad = if self.kind == Kind_::Adam && self.weight_decay != 0.0 {
                            &grad + &p * self.weight_decay
                        } else {
                            grad
                        };
                        if self.kind == Kind_::AdamW && self.weight_decay != 0.0 {
                            let _ = p.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
                        }
                        let m = s.exp_avg.get_or_insert_with(|| grad.zeros_like());
                        let v = s.exp_avg_sq.get_or_insert_with(|| grad.zeros_like());
                        let _ = m.g_mul_scalar_(BETA1);
                        let _ = m.g_add_(&(&grad * (1.0 - BETA1)));
                        let _ = v.g_mul_scalar_(BETA2);
                        let _ = v.g_add_(&(&grad * &grad * (1.0 - BETA2)));
                        let bc1 = 1.0 - BETA1.powi(s.step as i32);
                        let bc2 = 1.0 - BETA2.powi(s.step as i32);
                        let denom = (v.sqrt() / bc2.sqrt()) + EPS;
                        let _ = p.g_sub_(&((&*m / &denom) * (self.lr / bc1)));
                    }
                    Kind_::Sgd => {
                        let mut d = if self.weight_decay != 0.0 {
                            &grad + &p * self.weight_decay
                        } else {
                            grad
                        };
                        if self.momentum != 0.0 {
                            let buf = match s.exp_avg.take() {
                                None => d.detach().copy(),
                                Some(mut b) => {
                                    let _ = b.g_mul_scalar_(self.momentum);
                                    let _ = b.g_add_(&d);
                                    b
                                }
                            };
                            d = buf.shallow_clone();
                            s.exp_avg = Some(buf);
                        }
                        let _ = p.g_sub_(&(d * self.lr));
                    }
                }
            }
        });
    }

    /// The state as named tensors (for a checkpoint): `NAME.exp_avg`, `NAME.exp_avg_sq`,
    /// `NAME.step` (an Int64 scalar). Unsharded only: a sharded optimizer's whole state is
    /// [`super::zero::gather_state`].
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        debug_assert!(self.shards.is_none(), "gather a sharded state first");
        let mut out = Vec::new();
        for ((name, _), s) in self.vars.iter().zip(&self.state) {
            out.push((format!("{name}.step"), Tensor::from(s.step)));
            if let Some(m) = &s.exp_avg {
                out.push((format!("{name}.exp_avg"), m.shallow_clone()));
            }
            if let Some(v) = &s.exp_avg_sq {
                out.push((format!("{name}.exp_avg_sq"), v.shallow_clone()));
            }
        }
        out
    }

    /// Restores what [`Self::state_tensors`] saved; every variable must be there.
    pub fn load_state(&mut self, saved: &BTreeMap<String, Tensor>) -> Result<()> {
        for ((name, p), s) in self.vars.iter().zip(self.state.iter_mut()) {
            let Some(step) = saved.get(&format!("{name}.step")) else {
                bail!("the checkpoint has no optimizer state for {name}");
            };
            s.step = crate::host_read::value(step)? as i64;
            let load = |key: &str| -> Result<Option<Tensor>> {
                match saved.get(&format!("{name}.{key}")) {
                    None => Ok(None),
                    Some(t) if t.size() == p.size() => {
                        Ok(Some(t.to_device(p.device()).to_kind(p.kind()).detach()))
                    }
                    Some(t) => bail!(
                        "optimizer state {name}.{key} has shape {:?}, the model {:?}",
                        t.size(),
                        p.size()
                    ),
                }
            };
            s.exp_avg = load("exp_avg")?;
            s.exp_avg_sq = load("exp_avg_sq")?;
        }
        Ok(())
    }
}
