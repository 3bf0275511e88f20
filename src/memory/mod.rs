//! Memory measurement: resident set of this process, CUDA allocator counters, and the per-phase
//! step profiler.

pub mod meter;
pub mod profiler;
pub mod rss;

pub use meter::Meter;
pub use profiler::{MemoryProfiler, NoProfile, Phase, PhaseSink, StepMemory};
