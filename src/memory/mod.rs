//! Memory measurement: resident set of this process, and the per-phase step profiler.

pub mod profiler;
pub mod rss;

pub use profiler::{MemoryProfiler, NoProfile, Phase, PhaseSink, StepMemory};
