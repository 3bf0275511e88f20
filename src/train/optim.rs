//! The optimizers of the official code, backed by libtorch's own implementations (so AdamW is
//! bit-for-bit torch.optim.AdamW). BatchNorm running statistics are not trainable variables,
//! so they are never decayed or stepped.

use anyhow::Result;
use tch::nn::{self, OptimizerConfig, VarStore};

use crate::config::{Optimizer, TrainConfig};

pub fn build(c: &TrainConfig, vs: &VarStore) -> Result<nn::Optimizer> {
    let opt = match c.optimizer {
        Optimizer::AdamW => nn::adamw(0.9, 0.999, c.weight_decay).build(vs, c.learning_rate)?,
        // torch.optim.Adam: L2 weight decay added to the gradient.
        Optimizer::Adam => nn::Adam {
            wd: c.weight_decay,
            ..Default::default()
        }
        .build(vs, c.learning_rate)?,
        Optimizer::Sgd => nn::Sgd {
            momentum: c.momentum,
            wd: c.weight_decay,
            ..Default::default()
        }
        .build(vs, c.learning_rate)?,
    };
    Ok(opt)
}
