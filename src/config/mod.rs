//! Run configuration: TOML files in configs/, CLI overrides, validation and the auto rules.

pub mod kinds;

pub use kinds::{Backbone, DatasetName, Method, Optimizer, Split};
