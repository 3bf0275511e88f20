//! `bench allreduce`: time of our all-reduce path (buckets, staging and all) on f32 tensors of
//! growing size, reported as nccl-tests does: algbw = bytes / time and
//! busbw = algbw · 2(W−1)/W (the per-link traffic of a ring, comparable across W).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::measure::median;
use super::{command_line, machine_line, write_outputs};
use crate::distributed::Communicator;

#[derive(Debug, Args)]
pub struct AllreduceArgs {
    /// cpu, cuda (each rank its local GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Smallest and largest message in bytes (sizes grow ×4).
    #[arg(long, default_value_t = 1 << 10)]
    pub min_bytes: usize,
    #[arg(long, default_value_t = 512 << 20)]
    pub max_bytes: usize,
    /// Timed repetitions per size (after 2 warm-up calls); fewer for sizes above 64 MiB.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub bytes: usize,
    pub seconds: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
}

pub fn run(args: &AllreduceArgs, comm: &dyn Communicator) -> Result<Vec<Row>> {
    let device = comm
        .world()
        .device_for(crate::config::parse_device(&args.device)?);
    let w = comm.world().size as f64;
    let mut rows = Vec::new();
    let mut bytes = args.min_bytes.max(4);
    while bytes <= args.max_bytes {
        let t = Tensor::ones([(bytes / 4) as i64], (Kind::Float, device));
        let iters = if bytes > 64 << 20 {
            args.iters.min(3)
        } else {
            args.iters
        };
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters + 2 {
            comm.barrier()?;
            let start = Instant::now();
            comm.all_reduce_sum(&[t.shallow_clone()])?;
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            if i >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        // Every rank reports its median; the slowest rank is the collective's time.
        let mine = median(times.into_iter());
        let seconds = comm
            .all_gather_f64(&[mine])?
            .into_iter()
            .fold(0.0, f64::max);
        let algbw = bytes as f64 / seconds / 1e9;
        rows.push(Row {
            bytes,
            seconds,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (w - 1.0) / w,
        });
        bytes *= 4;
    }
    if comm.world().is_root() {
        let mut text = format!(
            "# All-reduce bandwidth ({} backend, {} ranks, {})\n\nCommand: `{}`\nMachine: {}; date {}\n\n\
             | bytes | time µs | algbw GB/s | busbw GB/s |\n|---:|---:|---:|---:|\n",
            comm.name(),
            comm.world().size,
            args.device,
            command_line(),
            machine_line(),
            crate::files::today()
        );
        for r in &rows {
            text += &format!(
                "| {} | {:.1} | {:.3} | {:.3} |\n",
                r.bytes,
                r.seconds * 1e6,
                r.algbw_gbs,
                r.busbw_gbs
            );
        }
        print!("{text}");
        if let Some(out) = &args.out {
            let json = serde_json::json!({
                "backend": comm.name(), "ranks": comm.world().size, "device": args.device, "rows": rows,
            });
            write_outputs(out, &text, &json)?;
        }
    }
    Ok(rows)
}
