//! `bench model`: an analytic model of one optimizer step on W ranks, fitted to W = 1
//! measurements, checked against W > 1 measurements, and extrapolated to W = 1024.
//!
//! From a W = 1 run of a mode and M: data D, backbone forward F, head H (forward; its backward
//! is taken as 2H inside the measured backward B), optimizer O. Backbone work X = F + B − 2H,
//! of which the backward part (≈ 2/3) can overlap the gradient all-reduce.
//!
//! - `images` (one episode over W ranks): T = s·(D + X + 3H)/W + s·O + C_img, where
//!   C_img = all-gather(N·e) + all-reduce(N·e) + all-reduce(G) (e: embedding bytes per image,
//!   G: gradient bytes), one episode per T.
//! - `episodes` (an episode per rank): T = s·(D + X + 3H + O) + all-reduce(G), W episodes per T.
//! - ring collectives (as NCCL): all-reduce(B) = 2(W−1)·α + 2(W−1)/W·B/β,
//!   all-gather(B) = (W−1)·α + (W−1)/W·B/β, for link latency α and bandwidth β.
//! - s = 1 when every rank has its own device (GPUs). When the ranks share the C cores of one
//!   machine (this CPU box), a rank has C/W cores: s = W^(ln G / ln C) for W ≤ C and G·W/C
//!   beyond, where G is the measured speed of C threads over one (`--thread-gain`; G = C would
//!   be perfect threading, s = W).
//! - the gradient sync after the backward ([`GradSync`]): all of all-reduce(G) without overlap;
//!   with `--overlap` it hides behind the backbone backward (the head's gradients go out when
//!   the head's backward ends, the segments' while the backbone's goes on):
//!   exposed = all-reduce(G) − min(h·all-reduce(G), s·(2/3)·X/W) (images; X without /W for
//!   episodes). h is the share the overlap hides when the backward is long enough: never all,
//!   since the first segment's bucket is final only when the backward ends and the sums are
//!   copied back after it. It is `--overlap-hidden` when given (a GPU's figure, from
//!   `bench allreduce --overlap` there), else fitted from overlap off/on pairs of the
//!   measurements (the mean of 1 − exposed(on)/exposed(off)), else 1. ZeRO-1
//!   (`--shard-optimizer on`) reduces and broadcasts the same bytes as one all-reduce, each half
//!   of it; with `--overlap` the reduce runs in the backward (hiding at most h of its half), the
//!   broadcast of the stepped parameters follows the optimizer. It steps 1/W of the optimizer:
//!   s·O/W.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use plotters::prelude::*;
use serde::Serialize;

use super::scaling::{Point, ScalingResult};
use super::{command_line, write_outputs};
use crate::config::ShardMode;
use crate::files::write_atomic_with;
use crate::memory::Phase;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[value(rename_all = "lower")]
pub enum Link {
    /// α, β fitted from a `bench allreduce` JSON (--allreduce).
    Measured,
    /// NVLink 4 within 8-GPU nodes (≈ 300 GB/s bus bandwidth, 5 µs), InfiniBand NDR between
    /// nodes beyond 8 ranks (≈ 45 GB/s, 8 µs).
    Nvlink,
    /// InfiniBand NDR 400 Gb/s (≈ 45 GB/s, 8 µs).
    Infiniband,
    /// 25 Gb Ethernet (≈ 2.8 GB/s, 30 µs).
    Ethernet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[value(rename_all = "kebab-case")]
pub enum Compute {
    /// Every rank has its own device (GPU clusters).
    PerRank,
    /// Ranks share one machine's cores (the CPU measurements here).
    Shared,
}

/// How ranks get compute: their own device, or a share of `cores` cores whose threads together
/// run `gain` times faster than one.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Machine {
    pub compute: Compute,
    pub cores: usize,
    pub gain: f64,
}

impl Machine {
    pub fn per_rank() -> Self {
        Machine {
            compute: Compute::PerRank,
            cores: 1,
            gain: 1.0,
        }
    }

    /// How much slower one rank computes at W ranks than the single process does.
    pub fn slowdown(&self, w: usize) -> f64 {
        let (wf, c) = (w as f64, self.cores.max(1) as f64);
        match self.compute {
            Compute::PerRank => 1.0,
            Compute::Shared if c <= 1.0 => wf,
            Compute::Shared if wf <= c => wf.powf(self.gain.ln() / c.ln()),
            Compute::Shared => self.gain * wf / c,
        }
    }
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A `bench scaling` JSON: W = 1 points fit the model, W > 1 points check it.
    #[arg(long)]
    pub from: PathBuf,
    #[arg(long, value_enum, default_value = "measured")]
    pub link: Link,
    /// `bench allreduce` JSON files for --link measured (one per world size measured; a W
    /// without its own file uses the α-β fit of the largest one).
    #[arg(long)]
    pub allreduce: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "shared")]
    pub compute: Compute,
    /// With --compute shared: the machine's cores, and how much faster the W = 1 run's threads
    /// (one per core) are than one thread (`bench step --threads 1` against the default).
    #[arg(long, default_value_t = 2)]
    pub cores: usize,
    #[arg(long)]
    pub thread_gain: Option<f64>,
    /// Largest W to predict (powers of two).
    #[arg(long, default_value_t = 1024)]
    pub max_ranks: usize,
    /// Override the fitted per-image backbone time (ms, forward + backward incl. recompute),
    /// head time (ms, forward) and optimizer time (ms): to predict another device, e.g. a GPU.
    #[arg(long)]
    pub per_image_ms: Option<f64>,
    #[arg(long)]
    pub head_ms: Option<f64>,
    #[arg(long)]
    pub optimizer_ms: Option<f64>,
    /// Override the images per episode (e.g. 105 for 5-way 5-shot 16-query) and the gradient
    /// and embedding bytes (e.g. of ResNet34 + FS-CT at 224 px).
    #[arg(long)]
    pub images: Option<i64>,
    #[arg(long)]
    pub grad_bytes: Option<f64>,
    #[arg(long)]
    pub embedding_bytes: Option<f64>,
    /// h, the share of the gradient all-reduce `--overlap` hides when the backward is long
    /// enough (0–1); default: fitted from overlap off/on pairs of --from, else 1.
    #[arg(long)]
    pub overlap_hidden: Option<f64>,
    /// Markdown result (JSON and PNG beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Fitted terms of one (mode, M), in seconds and bytes.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    pub shard: ShardMode,
    pub micro_steps: i64,
    pub data: f64,
    pub backbone: f64,
    pub head: f64,
    pub optimizer: f64,
    pub images: i64,
    pub grad_bytes: f64,
    pub embedding_bytes: f64,
    /// h: the share of the all-reduce the overlap hides when the backward is long enough.
    pub overlap_hidden: f64,
}

/// How the gradients are exchanged after (or during) the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GradSync {
    /// One all-reduce after the backward (`--overlap off`).
    AfterBackward,
    /// All-reduced during the backward (`--overlap on`).
    Overlap,
    /// ZeRO-1: reduced to owners and broadcast back after the backward, 1/W of the optimizer.
    Zero1,
    /// ZeRO-1 with the reduce to the owners during the backward (both switches on).
    Zero1Overlap,
}

impl GradSync {
    /// How a measured setting exchanged its gradients.
    pub fn of(p: &Point) -> Self {
        match (p.shard_optimizer, p.overlap) {
            (true, true) => GradSync::Zero1Overlap,
            (true, false) => GradSync::Zero1,
            (false, true) => GradSync::Overlap,
            (false, false) => GradSync::AfterBackward,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkParams {
    pub alpha_s: f64,
    pub beta_bytes_per_s: f64,
    /// Measured all-reduce times (bytes, seconds) at exactly this W, used instead of the ring
    /// formula: our path's own costs (staging, buckets) at each message size.
    #[serde(skip)]
    pub measured: Option<Vec<(f64, f64)>>,
}

/// Log-log interpolation of a measured (bytes, seconds) table; linear extrapolation in bytes
/// past its ends.
fn interpolate(table: &[(f64, f64)], bytes: f64) -> f64 {
    let (first, last) = (table[0], table[table.len() - 1]);
    if bytes <= first.0 {
        return first.1;
    }
    if bytes >= last.0 {
        return last.1 * bytes / last.0;
    }
    let i = table
        .iter()
        .position(|r| r.0 >= bytes)
        .unwrap_or(table.len() - 1);
    let (a, b) = (table[i - 1], table[i]);
    let t = (bytes.ln() - a.0.ln()) / (b.0.ln() - a.0.ln());
    (a.1.ln() + t * (b.1.ln() - a.1.ln())).exp()
}

fn all_reduce(l: &LinkParams, w: f64, bytes: f64) -> f64 {
    if w <= 1.0 || bytes <= 0.0 {
        return 0.0;
    }
    if let Some(t) = &l.measured {
        return interpolate(t, bytes);
    }
    2.0 * (w - 1.0) * l.alpha_s + 2.0 * (w - 1.0) / w * bytes / l.beta_bytes_per_s
}

/// A ring all-gather moves half the bytes of an all-reduce of the result, in half the steps.
fn all_gather(l: &LinkParams, w: f64, bytes: f64) -> f64 {
    if w <= 1.0 || bytes <= 0.0 {
        return 0.0;
    }
    if l.measured.is_some() {
        return all_reduce(l, w, bytes) / 2.0;
    }
    (w - 1.0) * l.alpha_s + (w - 1.0) / w * bytes / l.beta_bytes_per_s
}

impl Fit {
    /// Predicted seconds per optimizer step on `w` ranks.
    pub fn step_seconds(&self, w: usize, link: &LinkParams, m: Machine, sync: GradSync) -> f64 {
        let wf = w as f64;
        let s = m.slowdown(w);
        let head = 3.0 * self.head;
        let grads = all_reduce(link, wf, self.grad_bytes);
        let per_rank = match self.shard {
            ShardMode::Images => wf,
            ShardMode::Episodes => 1.0,
        };
        let window = s * self.backbone * 2.0 / 3.0 / per_rank;
        let exposed = match sync {
            GradSync::Overlap => grads - (self.overlap_hidden * grads).min(window),
            // Only the reduce half runs in the backward; the broadcast follows the optimizer.
            GradSync::Zero1Overlap => grads - (self.overlap_hidden * grads / 2.0).min(window),
            GradSync::AfterBackward | GradSync::Zero1 => grads,
        };
        let optimizer = match sync {
            GradSync::Zero1 | GradSync::Zero1Overlap => s * self.optimizer / wf,
            GradSync::AfterBackward | GradSync::Overlap => s * self.optimizer,
        };
        match self.shard {
            ShardMode::Images => {
                let work = s * (self.data + self.backbone + head) / wf;
                let emb = self.images as f64 * self.embedding_bytes;
                let comm_e = all_gather(link, wf, emb) + all_reduce(link, wf, emb);
                work + optimizer + comm_e + exposed
            }
            ShardMode::Episodes => s * (self.data + self.backbone + head) + optimizer + exposed,
        }
    }

    /// Episodes per step on `w` ranks.
    pub fn episodes(&self, w: usize) -> f64 {
        match self.shard {
            ShardMode::Images => 1.0,
            ShardMode::Episodes => w as f64,
        }
    }

    pub fn efficiency(&self, w: usize, link: &LinkParams, m: Machine, sync: GradSync) -> f64 {
        let t1 = self.step_seconds(1, link, m, sync);
        let tw = self.step_seconds(w, link, m, sync);
        (self.episodes(w) / tw) / (w as f64 * self.episodes(1) / t1)
    }
}

/// Gradient bytes (from an episodes-mode W = 2 point: it sends the gradients once, plus two
/// scalars per episode) and embedding bytes per image (from the images-mode W = 2, M = 1 point:
/// it also gathers its half of the embeddings and all-reduces all of them).
fn bytes_from(points: &[Point]) -> (Option<f64>, Option<f64>) {
    let grads = points
        .iter()
        .find(|p| p.shard == ShardMode::Episodes && p.ranks == 2)
        .map(|p| p.bytes_sent_per_step);
    let emb = points
        .iter()
        .find(|p| p.shard == ShardMode::Images && p.ranks == 2)
        .zip(grads)
        .map(|(p, g)| {
            let n = p.images_per_episode as f64;
            ((p.bytes_sent_per_step - g) / (n / 2.0 + n)).max(0.0)
        });
    (grads, emb)
}

/// h from every multi-rank setting measured with overlap off and on: the mean of
/// 1 − exposed(on) / exposed(off) (the `GradientSync` phase), or None without pairs.
pub fn fitted_overlap_hidden(points: &[Point]) -> Option<f64> {
    let shares: Vec<f64> = points
        .iter()
        .filter(|on| on.ranks > 1 && on.overlap && !on.shard_optimizer)
        .filter_map(|on| {
            let off = points.iter().find(|p| {
                !p.overlap
                    && !p.shard_optimizer
                    && (p.shard, p.micro_steps, p.ranks) == (on.shard, on.micro_steps, on.ranks)
            })?;
            let exposed = off.phase(Phase::GradientSync);
            (exposed > 0.0).then(|| (1.0 - on.phase(Phase::GradientSync) / exposed).clamp(0.0, 1.0))
        })
        .collect();
    (!shares.is_empty()).then(|| shares.iter().sum::<f64>() / shares.len() as f64)
}

pub fn fits(r: &ScalingResult, args: &ModelArgs) -> Result<Vec<Fit>> {
    let (grads, emb) = bytes_from(&r.points);
    let hidden = args
        .overlap_hidden
        .or_else(|| fitted_overlap_hidden(&r.points))
        .unwrap_or(1.0);
    let mut out = Vec::new();
    // One fit per (mode, M): the W = 1 point without optimizer sharding or overlap (with one
    // rank they change nothing).
    let mut seen = Vec::new();
    for p in r.points.iter().filter(|p| p.ranks == 1) {
        if seen.contains(&(p.shard, p.micro_steps)) {
            continue;
        }
        seen.push((p.shard, p.micro_steps));
        let head = p.phase(Phase::Head);
        let backbone = p.phase(Phase::BackboneForward) + p.phase(Phase::Backward) - 2.0 * head;
        let images = args.images.unwrap_or(p.images_per_episode);
        let per_image = args
            .per_image_ms
            .map_or(backbone / p.images_per_episode as f64, |ms| ms / 1e3);
        out.push(Fit {
            shard: p.shard,
            micro_steps: p.micro_steps,
            data: p.phase(Phase::Data) * images as f64 / p.images_per_episode as f64,
            backbone: per_image * images as f64,
            head: args.head_ms.map_or(head, |ms| ms / 1e3),
            optimizer: args
                .optimizer_ms
                .map_or(p.phase(Phase::Optimizer), |ms| ms / 1e3),
            images,
            grad_bytes: args.grad_bytes.or(grads).unwrap_or(0.0),
            embedding_bytes: args.embedding_bytes.or(emb).unwrap_or(0.0),
            overlap_hidden: hidden,
        });
    }
    if out.is_empty() {
        bail!(
            "{} has no W = 1 points to fit the model to",
            args.from.display()
        );
    }
    Ok(out)
}

pub fn link_params(args: &ModelArgs, w: usize) -> Result<LinkParams> {
    let preset = |alpha_s, beta_bytes_per_s| LinkParams {
        alpha_s,
        beta_bytes_per_s,
        measured: None,
    };
    Ok(match args.link {
        Link::Measured => {
            if args.allreduce.is_empty() {
                bail!("--link measured needs --allreduce FILE (from `bench allreduce --out`)");
            }
            let mut tables = Vec::new();
            for path in &args.allreduce {
                let v: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                )?;
                let ranks = v["ranks"].as_u64().unwrap_or(0) as usize;
                let rows: Vec<(f64, f64, f64)> = v["rows"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|r| {
                                let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
                                (f("bytes"), f("seconds"), f("busbw_gbs"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if rows.is_empty() {
                    bail!("{} holds no all-reduce rows", path.display());
                }
                tables.push((ranks, rows));
            }
            tables.sort_by_key(|t| t.0);
            if let Some((_, rows)) = tables.iter().find(|t| t.0 == w) {
                LinkParams {
                    alpha_s: 0.0,
                    beta_bytes_per_s: 0.0,
                    measured: Some(rows.iter().map(|r| (r.0, r.1)).collect()),
                }
            } else {
                // α from the smallest message (latency-bound), β the best bus bandwidth seen.
                let (ranks, rows) = tables.last().expect("not empty");
                let steps = 2.0 * (*ranks as f64 - 1.0).max(1.0);
                preset(
                    rows[0].1 / steps,
                    rows.iter().map(|r| r.2).fold(1e-9, f64::max) * 1e9,
                )
            }
        }
        Link::Nvlink if w <= 8 => preset(5e-6, 300e9),
        Link::Nvlink | Link::Infiniband => preset(8e-6, 45e9),
        Link::Ethernet => preset(30e-6, 2.8e9),
    })
}

#[derive(Debug, Serialize)]
struct Check {
    shard: ShardMode,
    sync: GradSync,
    micro_steps: i64,
    ranks: usize,
    measured_s: f64,
    predicted_s: f64,
    error: f64,
}

#[derive(Debug, Serialize)]
struct Prediction {
    shard: ShardMode,
    micro_steps: i64,
    ranks: usize,
    step_s: f64,
    step_s_overlap: f64,
    step_s_zero1_overlap: f64,
    efficiency: f64,
    efficiency_overlap: f64,
    efficiency_zero1_overlap: f64,
    episodes_per_s: f64,
}

pub fn run(args: &ModelArgs) -> Result<()> {
    let r: ScalingResult = serde_json::from_slice(
        &std::fs::read(&args.from).with_context(|| format!("reading {}", args.from.display()))?,
    )?;
    let fits = fits(&r, args)?;
    let machine = Machine {
        compute: args.compute,
        cores: args.cores,
        gain: args.thread_gain.unwrap_or(args.cores as f64),
    };
    let mut text = format!(
        "# Scaling model\n\nCommand: `{}`\nFitted to: {} ({}; {})\nLink: {:?}; compute: {:?}\n\n\
         ## Fitted terms (W = 1)\n\n| shard | M | data ms | backbone ms | head ms (fwd) | optimizer ms | images | grad MiB | embedding KiB/image | overlap hides h |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        command_line(),
        args.from.display(),
        r.machine,
        r.date,
        args.link,
        machine
    );
    for f in &fits {
        text += &format!(
            "| {:?} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.2} |\n",
            f.shard,
            f.micro_steps,
            f.data * 1e3,
            f.backbone * 1e3,
            f.head * 1e3,
            f.optimizer * 1e3,
            f.images,
            f.grad_bytes / (1u64 << 20) as f64,
            f.embedding_bytes / 1024.0,
            f.overlap_hidden
        );
    }
    let mut checks = Vec::new();
    for p in r.points.iter().filter(|p| p.ranks > 1) {
        if let Some(f) = fits
            .iter()
            .find(|f| f.shard == p.shard && f.micro_steps == p.micro_steps)
        {
            let sync = GradSync::of(p);
            let predicted = f.step_seconds(p.ranks, &link_params(args, p.ranks)?, machine, sync);
            checks.push(Check {
                shard: p.shard,
                sync,
                micro_steps: p.micro_steps,
                ranks: p.ranks,
                measured_s: p.step_seconds,
                predicted_s: predicted,
                error: predicted / p.step_seconds - 1.0,
            });
        }
    }
    if !checks.is_empty() {
        text += "\n## Check against the measurements (each as it ran)\n\n| shard | gradient sync | M | W | measured s | predicted s | error |\n|---|---|---:|---:|---:|---:|---:|\n";
        for c in &checks {
            text += &format!(
                "| {:?} | {:?} | {} | {} | {:.3} | {:.3} | {:+.0}% |\n",
                c.shard,
                c.sync,
                c.micro_steps,
                c.ranks,
                c.measured_s,
                c.predicted_s,
                100.0 * c.error
            );
        }
    }
    let mut preds = Vec::new();
    let mut w = 1;
    while w <= args.max_ranks {
        for f in &fits {
            let l = link_params(args, w)?;
            let t = f.step_seconds(w, &l, machine, GradSync::AfterBackward);
            preds.push(Prediction {
                shard: f.shard,
                micro_steps: f.micro_steps,
                ranks: w,
                step_s: t,
                step_s_overlap: f.step_seconds(w, &l, machine, GradSync::Overlap),
                step_s_zero1_overlap: f.step_seconds(w, &l, machine, GradSync::Zero1Overlap),
                efficiency: f.efficiency(w, &l, machine, GradSync::AfterBackward),
                efficiency_overlap: f.efficiency(w, &l, machine, GradSync::Overlap),
                efficiency_zero1_overlap: f.efficiency(w, &l, machine, GradSync::Zero1Overlap),
                episodes_per_s: f.episodes(w) / t,
            });
        }
        w *= 2;
    }
    text += "\n## Predictions\n\n| shard | M | W | step ms | step ms (overlap) | step ms (overlap + ZeRO-1) | efficiency | efficiency (overlap) | efficiency (overlap + ZeRO-1) | episodes/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for p in &preds {
        text += &format!(
            "| {:?} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.0}% | {:.0}% | {:.1} |\n",
            p.shard,
            p.micro_steps,
            p.ranks,
            p.step_s * 1e3,
            p.step_s_overlap * 1e3,
            p.step_s_zero1_overlap * 1e3,
            100.0 * p.efficiency,
            100.0 * p.efficiency_overlap,
            100.0 * p.efficiency_zero1_overlap,
            p.episodes_per_s
        );
    }
    print!("{text}");
    if let Some(out) = &args.out {
        let json = serde_json::json!({ "fits": fits, "checks": checks, "predictions": preds, "link": args.link, "machine": machine });
        write_outputs(out, &text, &json)?;
        plot(&preds, &out.with_extension("png"))?;
    }
    Ok(())
}

/// Predicted efficiency against W (log₂ axis), with and without overlap.
fn plot(preds: &[Prediction], path: &std::path::Path) -> Result<()> {
    crate::plot::register_font();
    let e = |x: &dyn std::fmt::Display| anyhow::anyhow!("{x}");
    let max_w = preds.iter().map(|p| p.ranks).max().unwrap_or(1) as f64;
    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut c = ChartBuilder::on(&root)
            .margin(14)
            .caption(
                "predicted scaling efficiency (dashed: with overlap)",
                ("sans-serif", 18),
            )
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_w.log2(), 0.0..1.05)
            .map_err(|x| e(&x))?;
        c.configure_mesh()
            .x_desc("ranks W")
            .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
            .y_desc("efficiency")
            .draw()
            .map_err(|x| e(&x))?;
        let mut keys: Vec<(ShardMode, i64)> =
            preds.iter().map(|p| (p.shard, p.micro_steps)).collect();
        keys.sort_by_key(|k| (k.0 == ShardMode::Episodes, k.1));
        keys.dedup();
        for (i, (shard, m)) in keys.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let sel: Vec<&Prediction> = preds
                .iter()
                .filter(|p| p.shard == *shard && p.micro_steps == *m)
                .collect();
            c.draw_series(LineSeries::new(
                sel.iter().map(|p| ((p.ranks as f64).log2(), p.efficiency)),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(format!("{shard:?} M={m}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            c.draw_series(DashedLineSeries::new(
                sel.iter()
                    .map(|p| ((p.ranks as f64).log2(), p.efficiency_overlap)),
                5,
                4,
                color.stroke_width(1),
            ))
            .map_err(|x| e(&x))?;
        }
        crate::plot::draw_legend(&mut c, SeriesLabelPosition::LowerLeft)?;
        root.present().map_err(|x| e(&x))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(shard: ShardMode) -> Fit {
        Fit {
            shard,
            micro_steps: 1,
            data: 0.0,
            backbone: 1.0,
            head: 0.0,
            optimizer: 0.0,
            images: 100,
            grad_bytes: 0.0,
            embedding_bytes: 0.0,
            overlap_hidden: 1.0,
        }
    }

    #[test]
    fn free_communication_scales_perfectly_per_rank_and_not_at_all_on_shared_cores() {
        let l = LinkParams {
            alpha_s: 0.0,
            beta_bytes_per_s: 1e9,
            measured: None,
        };
        for shard in [ShardMode::Images, ShardMode::Episodes] {
            let f = fit(shard);
            assert!(
                (f.efficiency(8, &l, Machine::per_rank(), GradSync::AfterBackward) - 1.0).abs()
                    < 1e-12
            );
            assert!(
                (f.efficiency(
                    8,
                    &l,
                    Machine {
                        compute: Compute::Shared,
                        cores: 1,
                        gain: 1.0
                    },
                    GradSync::AfterBackward
                ) - 0.125)
                    .abs()
                    < 1e-12
            );
        }
    }

    #[test]
    fn shared_cores_slow_ranks_by_the_thread_gain() {
        let m = Machine {
            compute: Compute::Shared,
            cores: 2,
            gain: 1.6,
        };
        assert!((m.slowdown(1) - 1.0).abs() < 1e-12);
        assert!(
            (m.slowdown(2) - 1.6).abs() < 1e-12,
            "each rank has one core: 1.6× slower"
        );
        assert!(
            (m.slowdown(4) - 3.2).abs() < 1e-12,
            "and half a core beyond"
        );
        let perfect = Machine {
            compute: Compute::Shared,
            cores: 4,
            gain: 4.0,
        };
        assert!((perfect.slowdown(2) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn measured_times_are_interpolated_log_log() {
        let t = [(1e3, 1e-5), (1e6, 1e-3)];
        assert!((interpolate(&t, 1e3) - 1e-5).abs() < 1e-15);
        // Halfway in log bytes is halfway in log time: sqrt(1e-5 · 1e-3) = 1e-4.
        assert!((interpolate(&t, (1e3f64 * 1e6).sqrt()) - 1e-4).abs() < 1e-12);
        assert!(
            (interpolate(&t, 2e6) - 2e-3).abs() < 1e-12,
            "linear past the end"
        );
    }

    #[test]
    fn ring_all_reduce_matches_the_textbook_cost() {
        let l = LinkParams {
            alpha_s: 1e-5,
            beta_bytes_per_s: 1e9,
            measured: None,
        };
        // 4 ranks, 1 GB: 2·3·10 µs + 2·3/4 s.
        assert!((all_reduce(&l, 4.0, 1e9) - (6e-5 + 1.5)).abs() < 1e-12);
        let mut f = fit(ShardMode::Episodes);
        f.grad_bytes = 1e9;
        // Overlap hides up to 2/3 of the backbone time (1 s) behind the 1.5 s all-reduce.
        let t = f.step_seconds(4, &l, Machine::per_rank(), GradSync::Overlap);
        assert!((t - (1.0 + 1.5 + 6e-5 - 2.0 / 3.0)).abs() < 1e-9);
        // h = 0.2: at most a fifth of the all-reduce (0.3 s) hides, however long the backward.
        f.overlap_hidden = 0.2;
        let t = f.step_seconds(4, &l, Machine::per_rank(), GradSync::Overlap);
        assert!((t - (1.0 + 1.5 + 6e-5 - 0.2 * (1.5 + 6e-5))).abs() < 1e-9);
        // ZeRO-1: the same bytes, not overlapped, a quarter of the optimizer.
        f.optimizer = 0.4;
        let t = f.step_seconds(4, &l, Machine::per_rank(), GradSync::Zero1);
        assert!((t - (1.0 + 0.1 + 1.5 + 6e-5)).abs() < 1e-9);
        // With overlap, at most h of the reduce half (0.2 · 0.75 s) hides.
        let t = f.step_seconds(4, &l, Machine::per_rank(), GradSync::Zero1Overlap);
        assert!((t - (1.0 + 0.1 + 1.5 + 6e-5 - 0.2 * (1.5 + 6e-5) / 2.0)).abs() < 1e-9);
    }

    #[test]
    fn the_overlap_hides_the_measured_share_of_the_all_reduce() {
        let point = |overlap: bool, sync: f64| Point {
            shard: ShardMode::Images,
            shard_optimizer: false,
            overlap,
            micro_steps: 1,
            ranks: 2,
            step_seconds: 1.0,
            phases: vec![
                (Phase::Head, 0.05),
                (Phase::Backward, 0.5),
                (Phase::GradientSync, sync),
            ],
            episodes_per_s: 1.0,
            images_per_s: 1.0,
            efficiency: None,
            bytes_sent_per_step: 0.0,
            images_per_episode: 15,
            episodes_per_step: 1,
            held_bytes: 0,
        };
        // 0.2 s exposed without overlap, 0.04 s with: 80% hidden.
        let pts = [point(false, 0.2), point(true, 0.04)];
        assert!((fitted_overlap_hidden(&pts).unwrap() - 0.8).abs() < 1e-12);
        assert!(fitted_overlap_hidden(&pts[..1]).is_none());
    }
}
