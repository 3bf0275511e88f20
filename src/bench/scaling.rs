//! `bench scaling`: launches `fsct-dist bench step` under mpirun for each (sharding mode,
//! optimizer sharding, micro-steps, W), then reports per setting the step time split into phases, throughput,
//! scaling efficiency against W = 1 of the same mode and micro-steps, and the bytes each rank
//! sends per step; as markdown, JSON and a PNG chart.
//!
//! Efficiency is throughput(W) / (W · throughput(1)): with `images` (a fixed episode split over
//! more ranks) that is strong scaling, T₁ / (W·T_W); with `episodes` (an episode per rank) weak
//! scaling, T₁ / T_W.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::measure::Measured;
use super::{command_line, machine_line, write_outputs};
use crate::config::ShardMode;
use crate::files::write_atomic_with;
use crate::memory::Phase;

#[derive(Debug, Args)]
pub struct ScalingArgs {
    /// World sizes to run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub ranks: Vec<usize>,
    /// Sharding modes to run.
    #[arg(long, value_delimiter = ',', default_value = "images,episodes")]
    pub shards: Vec<ShardMode>,
    /// `--shard-optimizer` values to run (off, on: ZeRO stage 1).
    #[arg(long = "shard-optimizers", value_delimiter = ',', default_value = "off", value_parser = crate::config::parse_switch)]
    pub shard_optimizers: Vec<bool>,
    /// `--overlap` values to run (on: gradient all-reduce during the backward; off: after it).
    #[arg(long = "overlaps", value_delimiter = ',', default_value = "on", value_parser = crate::config::parse_switch)]
    pub overlaps: Vec<bool>,
    /// Micro-steps per rank to run.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub micro: Vec<u64>,
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    #[arg(long, default_value_t = 4)]
    pub steps: u64,
    /// Markdown result (JSON and PNG beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The launcher (given `-n W` then the fsct-dist arguments).
    #[arg(long, default_value = "launch/mpirun.sh")]
    pub launcher: PathBuf,
    /// Training flags for every run (after `--`), e.g. `-- --config configs/quickstart.toml`.
    #[arg(last = true)]
    pub train_args: Vec<String>,
}

/// One measured setting and what follows from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub shard: ShardMode,
    /// `--shard-optimizer` (absent in results written before it: off).
    #[serde(default)]
    pub shard_optimizer: bool,
    /// `--overlap` (absent in results written before it: off, the only behaviour then).
    #[serde(default)]
    pub overlap: bool,
    pub micro_steps: i64,
    pub ranks: usize,
    pub step_seconds: f64,
    /// Median seconds per step of each phase (Data, BackboneForward, Head, Backward,
    /// Communication, GradientSync, Optimizer).
    pub phases: Vec<(Phase, f64)>,
    pub episodes_per_s: f64,
    pub images_per_s: f64,
    pub efficiency: Option<f64>,
    pub bytes_sent_per_step: f64,
    pub images_per_episode: i64,
    pub episodes_per_step: u64,
    /// Rank 0's memory held at the start of a step (absent in older results).
    #[serde(default)]
    pub held_bytes: u64,
}

pub const PHASES: [Phase; 7] = [
    Phase::Data,
    Phase::BackboneForward,
    Phase::Head,
    Phase::Backward,
    Phase::Communication,
    Phase::GradientSync,
    Phase::Optimizer,
];

impl Point {
    pub fn from_measured(m: &Measured) -> Self {
        let step = m.step_seconds();
        let eps = m.episodes_per_step as f64 / step;
        Point {
            shard: m.shard,
            shard_optimizer: m.shard_optimizer,
            overlap: m.overlap,
            micro_steps: m.micro_steps,
            ranks: m.ranks,
            step_seconds: step,
            phases: PHASES.iter().map(|&p| (p, m.phase_seconds(p))).collect(),
            episodes_per_s: eps,
            images_per_s: eps * m.images_per_episode as f64,
            efficiency: None,
            bytes_sent_per_step: m.bytes_sent_per_step,
            images_per_episode: m.images_per_episode,
            episodes_per_step: m.episodes_per_step,
            held_bytes: m.held_bytes(),
        }
    }

    pub fn phase(&self, p: Phase) -> f64 {
        self.phases
            .iter()
            .find(|(q, _)| *q == p)
            .map_or(0.0, |x| x.1)
    }
}

/// The whole result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalingResult {
    pub command: String,
    pub machine: String,
    pub date: String,
    pub train_args: Vec<String>,
    pub points: Vec<Point>,
}

pub fn run(args: &ScalingArgs) -> Result<ScalingResult> {
    let exe = std::env::current_exe().context("finding this binary")?;
    if !args.launcher.exists() {
        bail!(
            "launcher {} not found: run from the repository root or pass --launcher",
            args.launcher.display()
        );
    }
    let tmp = tempfile_dir()?;
    let mut points = Vec::new();
    for &shard in &args.shards {
        for &zero in &args.shard_optimizers {
            for &micro in &args.micro {
                for &w in &args.ranks {
                    // Side by side: each overlap value right after the other, at the same W
                    // (one rank has nothing to overlap: it runs once).
                    let overlaps = if w == 1 {
                        &args.overlaps[..args.overlaps.len().min(1)]
                    } else {
                        &args.overlaps[..]
                    };
                    for &overlap in overlaps {
                        let setting = Setting {
                            shard,
                            zero,
                            overlap,
                            micro,
                            w,
                        };
                        points.push(measure(args, &exe, &tmp, setting)?);
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    with_efficiency(&mut points);
    let result = ScalingResult {
        command: command_line(),
        machine: machine_line(),
        date: crate::files::today(),
        train_args: args.train_args.clone(),
        points,
    };
    let text = table(&result);
    print!("{text}");
    if let Some(out) = &args.out {
        write_outputs(out, &text, &result)?;
        chart(&result, &out.with_extension("png"))?;
    }
    Ok(result)
}

/// One point of the grid.
#[derive(Debug, Clone, Copy)]
struct Setting {
    shard: ShardMode,
    zero: bool,
    overlap: bool,
    micro: u64,
    w: usize,
}

/// Runs `bench step` for one setting under the launcher and reads its measurement.
fn measure(args: &ScalingArgs, exe: &Path, tmp: &Path, s: Setting) -> Result<Point> {
    let Setting {
        shard,
        zero,
        overlap,
        micro,
        w,
    } = s;
    let on_off = if zero { "on" } else { "off" };
    let overlap = if overlap { "on" } else { "off" };
    let json = tmp.join(format!("{shard:?}-{on_off}-{overlap}-{micro}-{w}.json"));
    let status = Command::new("bash")
        .arg(&args.launcher)
        .args(["-n", &w.to_string()])
        .env("FSCT", exe)
        .args(["bench", "step"])
        .args(&args.train_args)
        .args(["--shard", &format!("{shard:?}").to_lowercase()])
        .args(["--shard-optimizer", on_off])
        .args(["--overlap", overlap])
        .args(["--gradient-accumulation-steps", &micro.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .arg("--json")
        .arg(&json)
        .status()
        .with_context(|| format!("running {}", args.launcher.display()))?;
    if !status.success() {
        bail!(
            "bench step with {w} ranks ({shard:?}, shard-optimizer {on_off}, overlap {overlap}, M={micro}) failed: {status}"
        );
    }
    let m: Measured = serde_json::from_slice(&std::fs::read(&json)?)
        .map_err(|e| anyhow!("reading {}: {e}", json.display()))?;
    Ok(Point::from_measured(&m))
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fsct-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Fills `efficiency` against the W = 1 point of the same mode and micro-steps (and optimizer
/// sharding when there is one: with one rank it changes nothing).
pub fn with_efficiency(points: &mut [Point]) {
    let base: Vec<Point> = points.iter().filter(|p| p.ranks == 1).cloned().collect();
    for p in points.iter_mut() {
        let same = |b: &&Point| b.shard == p.shard && b.micro_steps == p.micro_steps;
        p.efficiency = base
            .iter()
            .filter(same)
            .find(|b| b.shard_optimizer == p.shard_optimizer && b.overlap == p.overlap)
            .or_else(|| base.iter().find(same))
            .map(|b| p.episodes_per_s / (p.ranks as f64 * b.episodes_per_s));
    }
}

pub fn table(r: &ScalingResult) -> String {
    let mut s = format!(
        "# Scaling\n\nCommand: `{}`\nTraining flags: `{}`\nMachine: {}; date {}\n\n\
         | shard | shard optimizer | overlap | M | W | step s | data | backbone fwd | head | backward | comm | exposed grad comm | optimizer | episodes/s | images/s | efficiency | MiB sent/step | MiB held |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.command,
        r.train_args.join(" "),
        r.machine,
        r.date
    );
    for p in &r.points {
        s += &format!(
            "| {:?} | {} | {} | {} | {} | {:.3} | {} | {:.2} | {:.1} | {:.0}% | {:.1} | {:.1} |\n",
            p.shard,
            if p.shard_optimizer { "on" } else { "off" },
            if p.overlap { "on" } else { "off" },
            p.micro_steps,
            p.ranks,
            p.step_seconds,
            PHASES
                .iter()
                .map(|&ph| format!("{:.3}", p.phase(ph)))
                .collect::<Vec<_>>()
                .join(" | "),
            p.episodes_per_s,
            p.images_per_s,
            100.0 * p.efficiency.unwrap_or(f64::NAN),
            p.bytes_sent_per_step / (1u64 << 20) as f64,
            super::mib(p.held_bytes)
        );
    }
    s += "\nPhase columns: median seconds per optimizer step on rank 0. Efficiency: \
          throughput(W) / (W · throughput(1)) of the same mode and M (strong scaling for \
          `images`, weak for `episodes`). Exposed grad comm: from the end of the backward to the \
          optimizer (the gradient all-reduce left on the critical path). MiB sent: tensor bytes \
          rank 0 put into collectives. MiB held: rank 0's memory at the \
          start of a step (weights, gradients, optimizer state).\n";
    s += &hidden_table(&r.points);
    s
}

/// Exposed gradient communication with overlap off and on, side by side, for every multi-rank
/// setting measured both ways, and the share of it the overlap hid.
fn hidden_table(points: &[Point]) -> String {
    let pairs: Vec<(&Point, &Point)> = points
        .iter()
        .filter(|p| p.ranks > 1 && !p.overlap)
        .filter_map(|off| {
            let on = points.iter().find(|p| {
                p.overlap
                    && (p.shard, p.shard_optimizer, p.micro_steps, p.ranks)
                        == (off.shard, off.shard_optimizer, off.micro_steps, off.ranks)
            })?;
            Some((off, on))
        })
        .collect();
    if pairs.is_empty() {
        return String::new();
    }
    let mut s = "\n## Overlap\n\n\
                 | shard | shard optimizer | M | W | exposed off s | exposed on s | hidden | step off s | step on s | speed-up |\n\
                 |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        .to_owned();
    for (off, on) in pairs {
        let (a, b) = (
            off.phase(Phase::GradientSync),
            on.phase(Phase::GradientSync),
        );
        s += &format!(
            "| {:?} | {} | {} | {} | {a:.3} | {b:.3} | {:.0}% | {:.3} | {:.3} | {:.2}× |\n",
            off.shard,
            if off.shard_optimizer { "on" } else { "off" },
            off.micro_steps,
            off.ranks,
            100.0 * (1.0 - b / a.max(1e-9)),
            off.step_seconds,
            on.step_seconds,
            off.step_seconds / on.step_seconds.max(1e-9)
        );
    }
    s += "\nHidden: 1 − exposed(on) / exposed(off), where exposed(off) is the whole all-reduce \
          after the backward.\n";
    s
}

/// Left: episodes/s against W per (mode, M), with the ideal line of each. Right: the phase
/// split of every setting's step, stacked.
pub fn chart(r: &ScalingResult, path: &Path) -> Result<()> {
    crate::plot::register_font();
    let e = |x: &dyn std::fmt::Display| anyhow!("{x}");
    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1400, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (left, right) = root.split_horizontally(560);
        let max_w = r.points.iter().map(|p| p.ranks).max().unwrap_or(1) as f64;
        let max_eps = r
            .points
            .iter()
            .map(|p| p.episodes_per_s)
            .fold(0.0, f64::max);
        let base_max = r
            .points
            .iter()
            .filter(|p| p.ranks == 1)
            .map(|p| p.episodes_per_s * max_w)
            .fold(max_eps, f64::max);
        let mut c = ChartBuilder::on(&left)
            .margin(12)
            .caption("throughput vs ranks (dashed: ideal)", ("sans-serif", 17))
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.8..max_w + 0.2, 0.0..base_max * 1.1)
            .map_err(|x| e(&x))?;
        c.configure_mesh()
            .x_desc("ranks W")
            .y_desc("episodes / s")
            .draw()
            .map_err(|x| e(&x))?;
        let mut series: Vec<(ShardMode, i64, bool, bool)> = Vec::new();
        for p in &r.points {
            let key = (p.shard, p.micro_steps, p.shard_optimizer, p.overlap);
            if !series.contains(&key) {
                series.push(key);
            }
        }
        for (i, (shard, m, zero, overlap)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = r
                .points
                .iter()
                .filter(|p| {
                    (p.shard, p.micro_steps, p.shard_optimizer, p.overlap)
                        == (*shard, *m, *zero, *overlap)
                })
                .map(|p| (p.ranks as f64, p.episodes_per_s))
                .collect();
            if let Some(&(w1, e1)) = pts.iter().find(|p| p.0 == 1.0) {
                c.draw_series(DashedLineSeries::new(
                    [(w1, e1), (max_w, e1 * max_w)],
                    5,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(|x| e(&x))?;
            }
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(format!(
                    "{shard:?} M={m}{}{}",
                    if *zero { " ZeRO-1" } else { "" },
                    if *overlap { " overlap" } else { "" }
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|x| e(&x))?;
        }
        crate::plot::draw_legend(&mut c, SeriesLabelPosition::UpperLeft)?;

        let n = r.points.len().max(1);
        let top = r.points.iter().map(|p| p.step_seconds).fold(0.0, f64::max) * 1.15;
        let labels: Vec<String> = r
            .points
            .iter()
            .map(|p| {
                format!(
                    "{} M{} W{}{}{}",
                    if p.shard == ShardMode::Images {
                        "img"
                    } else {
                        "ep"
                    },
                    p.micro_steps,
                    p.ranks,
                    if p.shard_optimizer { " Z" } else { "" },
                    if p.overlap { " O" } else { "" }
                )
            })
            .collect();
        let mut c = ChartBuilder::on(&right)
            .margin(12)
            .caption("step time by phase (rank 0)", ("sans-serif", 17))
            .x_label_area_size(60)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..n as f64, 0.0..top.max(1e-3))
            .map_err(|x| e(&x))?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 1e-6 && i < labels.len() {
                    labels[i].clone()
                } else {
                    String::new()
                }
            })
            .x_label_style(("sans-serif", 11))
            .y_desc("seconds per step")
            .draw()
            .map_err(|x| e(&x))?;
        for (k, &phase) in PHASES.iter().enumerate() {
            let color = Palette99::pick(k + 3).to_rgba();
            c.draw_series(r.points.iter().enumerate().map(|(i, p)| {
                let below: f64 = PHASES[..k].iter().map(|&q| p.phase(q)).sum();
                Rectangle::new(
                    [
                        (i as f64 + 0.15, below),
                        (i as f64 + 0.85, below + p.phase(phase)),
                    ],
                    color.filled(),
                )
            }))
            .map_err(|x| e(&x))?
            .label(format!("{phase:?}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
        }
        crate::plot::draw_legend(&mut c, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(|x| e(&x))?;
        Ok(())
    })
}
