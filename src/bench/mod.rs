//! `fsct-dist bench …`: the measurements users choose settings with. Each prints a markdown
//! table and can write it (plus JSON) with `--out`.
//!
//! - `memory`: peak memory and time per episode for amp × micro-steps × checkpointing.
//! - `step`: one setting's time per step split into phases, on this MPI world (under mpirun).
//! - `allreduce`: bus bandwidth of the collective backend, as nccl-tests reports it.
//! - `scaling`: launches `step` for W ranks × sharding modes × micro-steps; efficiency, chart.
//! - `model`: predicts step time and efficiency up to 1024 ranks from a scaling run.

pub mod allreduce;
pub mod measure;
pub mod scaling;
pub mod scaling_model;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::config::{Accumulation, AmpMode, Resolved, RunConfig};
use crate::distributed::Communicator;
use crate::files::{write_atomic, write_json};
use measure::{measure_steps, Measured};

/// `bench memory`'s own flags: the settings swept over one model and episode (which the run
/// flags give; `cli::BenchCommand` puts the two together).
#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// AMP modes to sweep (default: off,bf16 on CPU; off,fp16,bf16 on CUDA).
    #[arg(long, value_delimiter = ',')]
    pub sweep_amp: Option<Vec<AmpMode>>,
    /// Micro-steps to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub sweep_micro: Vec<u64>,
    /// Activation checkpointing settings to sweep: off, on.
    #[arg(long, value_delimiter = ',', default_value = "off,on", value_parser = crate::config::parse_switch)]
    pub sweep_ckpt: Vec<bool>,
    /// Measured optimizer steps per setting (after one warm-up step).
    #[arg(long, default_value_t = 2)]
    pub steps: u64,
    /// Markdown file for the table (JSON beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `bench step`'s own flags: how many steps to measure (the setting comes from the run flags).
#[derive(Debug, Args)]
pub struct StepArgs {
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// JSON file for the measurement (rank 0 writes it).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Writes `text` to `path` and `json` beside it (same stem, .json), atomically.
pub fn write_outputs(path: &Path, text: &str, json: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(path, text.as_bytes())?;
    write_json(&path.with_extension("json"), json)
}

pub fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// A machine line for result files: cores, CPU model, date.
pub fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpu = if tch::Cuda::is_available() {
        format!(", {} CUDA device(s)", tch::Cuda::device_count())
    } else {
        String::new()
    };
    format!("{cores} cores ({cpu}){gpu}")
}

/// The command line that produced a result, for its file.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("fsct-dist {}", args.join(" "))
}

/// `bench memory`: every setting of `args` over `base` (the run's config as given, each setting
/// resolved in turn), in one process, one after the other.
pub fn memory(base: &RunConfig, args: &MemoryArgs) -> Result<()> {
    let device = crate::config::parse_device(&base.run.device)?;
    let amps = args.sweep_amp.clone().unwrap_or_else(|| {
        if device.is_cuda() {
            vec![AmpMode::Off, AmpMode::Fp16, AmpMode::Bf16]
        } else {
            vec![AmpMode::Off, AmpMode::Bf16]
        }
    });
    let mut results: Vec<Measured> = Vec::new();
    let mut text = format!(
        "# Memory sweep\n\nCommand: `{}`\nMachine: {}; date {}\n\n{}, {:?}, {} px, {}-way {}-shot {}-query\n\n\
         | amp | micro-steps | checkpointing | step MiB | peak MiB | held MiB | s / episode |\n|---|---:|---|---:|---:|---:|---:|\n",
        command_line(),
        machine_line(),
        crate::files::today(),
        base.model.method.official_name(),
        base.model.backbone,
        base.data.image_size,
        base.episode.n_way,
        base.episode.k_shot,
        base.episode.n_query
    );
    for &amp in &amps {
        for &micro in &args.sweep_micro {
            for &ckpt in &args.sweep_ckpt {
                let mut c: RunConfig = base.clone();
                c.train.amp = Some(amp);
                c.train.gradient_accumulation_steps = Accumulation::Steps(micro);
                c.train.checkpoint_activations = ckpt;
                c.train.memory_report = false;
                let r = c.resolve()?;
                let m = measure_steps(&r, &crate::distributed::Local, 1, args.steps)?;
                let row = format!(
                    "| {amp} | {micro} | {} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
                    if ckpt { "on" } else { "off" },
                    mib(m.step_bytes()),
                    mib(m.peak_bytes()),
                    mib(m.steps.last().map_or(0, |s| s.held_bytes)),
                    m.step_seconds() / m.episodes_per_step as f64
                );
                eprint!("{row}");
                text += &row;
                results.push(m);
            }
        }
    }
    text += &format!(
        "\nstep = working memory of a step (peak − held; {}); held = at step start (weights, \
         gradients, optimizer state, runtime). Median of {} measured steps after 1 warm-up.\n",
        results.first().map_or("", |m| m.meter.as_str()),
        args.steps
    );
    print!("{text}");
    if let Some(out) = &args.out {
        write_outputs(out, &text, &results)?;
    }
    Ok(())
}

/// `bench step`: the resolved setting `r` on this world; rank 0 prints and writes.
pub fn step(r: &Resolved, args: &StepArgs, comm: &dyn Communicator) -> Result<()> {
    let m = measure_steps(r, comm, args.warmup, args.steps)?;
    if comm.world().is_root() {
        let phases = scaling::PHASES;
        let mut line = format!(
            "W={} shard={:?} shard-optimizer={} M={} step {:.3} s:",
            m.ranks,
            m.shard,
            if m.shard_optimizer { "on" } else { "off" },
            m.micro_steps,
            m.step_seconds()
        );
        for p in phases {
            line += &format!(" {p:?} {:.3}", m.phase_seconds(p));
        }
        line += &format!(
            "; {:.1} MiB sent/step; {:.1} MiB held",
            m.bytes_sent_per_step / (1u64 << 20) as f64,
            mib(m.held_bytes())
        );
        println!("{line}");
        if let Some(path) = &args.json {
            write_json(path, &m)?;
        }
    }
    Ok(())
}
