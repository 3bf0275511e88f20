//! Per-phase memory of a training step (`--memory-report`): for each phase the bytes in use at
//! its end and the peak during it, plus what the step started with (`held_bytes`: weights,
//! optimizer state, runtime) and its overall peak. On CUDA the numbers are the caching
//! allocator's allocated bytes (reserved bytes alongside); on CPU the process's resident set.
//! The peak counter is reset at every phase boundary.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::meter::Meter;
use crate::files::{write_atomic_with, write_json};

/// The phases of one optimizer step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for the next episode from the loader, moving it to the device.
    Data,
    /// Backbone forward (under no_grad when micro-steps recompute later).
    BackboneForward,
    /// Head forward and loss.
    Head,
    /// Every backward: head, then backbone (recomputed chunks or segments when asked).
    Backward,
    /// Exchanges between ranks inside the step (embeddings, their gradients, parameters
    /// broadcast by a sharded optimizer).
    Communication,
    /// From the end of the backward to the optimizer: the parameter-gradient all-reduce (or
    /// reduce to owners) still on the critical path — all of it without `--overlap`, what is
    /// still in flight with it.
    GradientSync,
    /// Unscale, optimizer step, cache clearing.
    Optimizer,
}

/// Where the step engine reports phase boundaries; [`NoProfile`] ignores them.
pub trait PhaseSink {
    fn enter(&mut self, phase: Phase);
}

/// The sink of a run without `--memory-report`.
pub struct NoProfile;

impl PhaseSink for NoProfile {
    fn enter(&mut self, _: Phase) {}
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseRow {
    pub phase: Phase,
    /// Bytes in use when the phase ended.
    pub current_bytes: u64,
    /// Peak bytes in use during the phase.
    pub peak_bytes: u64,
    /// CUDA only: the allocator's reserved bytes (tensors plus cache) at the end and peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_peak_bytes: Option<u64>,
    pub seconds: f64,
}

/// One measured step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMemory {
    pub step: u64,
    /// Resident at the start of the step.
    pub held_bytes: u64,
    /// Peak during the step.
    pub peak_bytes: u64,
    /// peak − held: the working memory the step needs.
    pub step_bytes: u64,
    pub phases: Vec<PhaseRow>,
}

/// Collects phase rows for the current step and keeps the last finished one.
pub struct MemoryProfiler {
    meter: Meter,
    open: Option<(Phase, Instant)>,
    step: u64,
    held: u64,
    rows: Vec<PhaseRow>,
    last: Option<StepMemory>,
}

impl PhaseSink for MemoryProfiler {
    fn enter(&mut self, phase: Phase) {
        self.close_phase();
        self.meter.reset_peak();
        self.open = Some((phase, Instant::now()));
    }
}

impl MemoryProfiler {
    /// A profiler that measures with `meter` (see [`Meter::for_device`]).
    pub fn new(meter: Meter) -> Self {
        Self {
            meter,
            open: None,
            step: 0,
            held: 0,
            rows: Vec::new(),
            last: None,
        }
    }

    pub fn meter(&self) -> Meter {
        self.meter
    }

    /// Starts step `step`: what is in use now is what the step holds before it works.
    pub fn begin_step(&mut self, step: u64) {
        self.open = None;
        self.rows.clear();
        self.step = step;
        self.meter.reset_peak();
        self.held = self.meter.read().current;
    }

    fn close_phase(&mut self) {
        if let Some((phase, start)) = self.open.take() {
            // Device work is asynchronous: wait for it so the time belongs to this phase.
            self.meter.synchronize();
            let r = self.meter.read();
            self.rows.push(PhaseRow {
                phase,
                current_bytes: r.current,
                peak_bytes: r.peak,
                reserved_bytes: r.reserved.map(|x| x.0),
                reserved_peak_bytes: r.reserved.map(|x| x.1),
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }

    /// Ends the step; it becomes the reported one.
    pub fn end_step(&mut self) {
        self.close_phase();
        let peak = self
            .rows
            .iter()
            .map(|r| r.peak_bytes)
            .max()
            .unwrap_or(self.held)
            .max(self.held);
        self.last = Some(StepMemory {
            step: self.step,
            held_bytes: self.held,
            peak_bytes: peak,
            step_bytes: peak - self.held,
            phases: std::mem::take(&mut self.rows),
        });
    }

    pub fn last(&self) -> Option<&StepMemory> {
        self.last.as_ref()
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The table users read: one row per phase.
pub fn table(m: &StepMemory, meter: Meter) -> String {
    let mut s = format!(
        "memory of step {} ({}): held {:.0} MiB, peak {:.0} MiB, step needs {:.0} MiB\n\
         | phase | current MiB | peak MiB | seconds |\n|---|---:|---:|---:|\n",
        m.step,
        meter.describe(),
        mib(m.held_bytes),
        mib(m.peak_bytes),
        mib(m.step_bytes)
    );
    for r in &m.phases {
        s += &format!(
            "| {:?} | {:.0} | {:.0} | {:.3} |\n",
            r.phase,
            mib(r.current_bytes),
            mib(r.peak_bytes),
            r.seconds
        );
    }
    s
}

/// One line: the memory each rank held at the start of the reported step and, of it, the
/// optimizer state (a sharded optimizer holds about 1/W of it on each): (held, state) bytes.
pub fn held_per_rank(bytes: &[(u64, u64)]) -> String {
    let parts: Vec<String> = bytes
        .iter()
        .enumerate()
        .map(|(r, &(h, s))| format!("rank {r} {:.1} MiB (optimizer state {:.1})", mib(h), mib(s)))
        .collect();
    format!("held per rank: {}", parts.join(", "))
}

/// What the run adds to a step's memory report.
pub struct Report<'a> {
    pub device: &'a str,
    /// (held, optimizer state) bytes of every rank, rank order (one entry alone).
    pub held_per_rank: &'a [(u64, u64)],
}

/// Writes memory.json and memory.png (phases in order: current and peak) into `dir`.
pub fn write_report(m: &StepMemory, meter: Meter, report: Report, dir: &Path) -> Result<()> {
    let json = serde_json::json!({
        "device": report.device,
        "held_bytes_per_rank": report.held_per_rank.iter().map(|p| p.0).collect::<Vec<_>>(),
        "optimizer_state_bytes_per_rank": report.held_per_rank.iter().map(|p| p.1).collect::<Vec<_>>(),
        "measure": meter.describe(),
        "step": m.step,
        "held_bytes": m.held_bytes,
        "peak_bytes": m.peak_bytes,
        "step_bytes": m.step_bytes,
        "phases": m.phases,
    });
    write_json(&dir.join("memory.json"), &json)?;
    crate::plot::register_font();
    write_atomic_with(&dir.join("memory.png"), |tmp| {
        let root = BitMapBackend::new(tmp, (900, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let top = m.phases.iter().map(|r| r.peak_bytes).max().unwrap_or(1) as f64
            / (1u64 << 20) as f64
            * 1.1;
        // An empty axis (nothing measured) would give plotters a zero-length range.
        let top = if top > 0.0 { top } else { 1.0 };
        let n = m.phases.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .margin(14)
            .caption(
                format!(
                    "memory per phase, step {} (MiB, {})",
                    m.step,
                    meter.describe()
                ),
                ("sans-serif", 18),
            )
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..n as f64, 0.0..top)
            .map_err(|e| anyhow!("{e}"))?;
        let names: Vec<String> = m.phases.iter().map(|r| format!("{:?}", r.phase)).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 1e-6 && i < names.len() {
                    names[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("MiB")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let held = mib(m.held_bytes);
        chart
            .draw_series(LineSeries::new(
                [(0.0, held), (n as f64, held)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label("held at step start")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
        chart
            .draw_series(m.phases.iter().enumerate().map(|(i, r)| {
                Rectangle::new(
                    [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, mib(r.peak_bytes))],
                    RED.mix(0.35).filled(),
                )
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label("peak during phase")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], RED.mix(0.35).filled()));
        chart
            .draw_series(m.phases.iter().enumerate().map(|(i, r)| {
                Rectangle::new(
                    [
                        (i as f64 + 0.3, 0.0),
                        (i as f64 + 0.7, mib(r.current_bytes)),
                    ],
                    BLUE.mix(0.7).filled(),
                )
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label("at phase end")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], BLUE.mix(0.7).filled()));
        crate::plot::draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        root.present().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_records_its_phases_and_the_peak_of_a_transient_buffer() {
        let _peak = super::super::rss::PEAK_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if super::super::rss::rss_bytes().is_none() || !super::super::rss::reset_peak() {
            return;
        }
        let mut p = MemoryProfiler::new(Meter::Rss);
        p.begin_step(2);
        p.enter(Phase::BackboneForward);
        let big = vec![7u8; 48 << 20];
        std::hint::black_box(&big);
        drop(big);
        p.enter(Phase::Backward);
        p.end_step();
        let m = p.last().unwrap();
        assert_eq!(m.step, 2);
        assert_eq!(
            m.phases.iter().map(|r| r.phase).collect::<Vec<_>>(),
            [Phase::BackboneForward, Phase::Backward]
        );
        assert!(
            m.step_bytes >= 40 << 20,
            "the 48 MiB buffer shows in the step's working memory: {}",
            m.step_bytes
        );
        assert!(
            m.phases[0].peak_bytes > m.phases[1].peak_bytes,
            "the peak is attributed to the phase that allocated"
        );
        assert_eq!(m.peak_bytes, m.held_bytes + m.step_bytes);
    }
}
