//! fsct-dist: a trainer for few-shot image classification with the Few-Shot Cosine Transformer.

pub mod config;
pub mod data;
pub mod model;
