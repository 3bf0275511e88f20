//! `bench allreduce`: time of our all-reduce path (buckets, staging and all) on f32 tensors of
//! growing size, reported as nccl-tests does: algbw = bytes / time and
//! busbw = algbw · 2(W−1)/W (the per-link traffic of a ring, comparable across W).
//!
//! `--overlap` also runs each all-reduce the way `train --overlap` does (started, then compute
//! on the same device, then finished) beside a compute of about the same length, and reports
//! how much of the all-reduce the compute hid. It checks every overlapped sum too, which on a
//! GPU is the test that the side stream's events order the reduction after the kernels that
//! wrote its input and before those that read its result (a one-GPU NCCL world runs it).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::measure::median;
use super::{command_line, machine_line, write_outputs};
use crate::config::CommKind;
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
    /// Backend: auto (NCCL for cuda under MPI), mpi, nccl (a world of one works without MPI).
    #[arg(long, value_enum, default_value_t = CommKind::Auto)]
    pub comm: CommKind,
    /// Also time the overlapped all-reduce beside a compute of the same length, and check it.
    #[arg(long)]
    pub overlap: bool,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub bytes: usize,
    pub seconds: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
    /// With `--overlap`: the compute alone, the overlapped all-reduce + compute, and the
    /// share of the all-reduce hidden: (all-reduce + compute − overlapped) / all-reduce.
    pub overlap: Option<OverlapRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverlapRow {
    pub compute_seconds: f64,
    pub overlapped_seconds: f64,
    pub hidden: f64,
}

pub fn run(args: &AllreduceArgs, comm: &dyn Communicator) -> Result<Vec<Row>> {
    anyhow::ensure!(
        !args.overlap || comm.overlaps(),
        "--overlap needs a backend that reduces beside the compute: MPI with 2 or more ranks \
         (launch/mpirun.sh -n 2 ...) or NCCL (--comm nccl on a GPU); the {} backend sums at once",
        comm.name()
    );
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
            synchronize(device);
            if i >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let seconds = slowest_median(comm, times)?;
        let overlap = if args.overlap {
            Some(overlapped(comm, &t, seconds, iters)?)
        } else {
            None
        };
        let algbw = bytes as f64 / seconds / 1e9;
        rows.push(Row {
            bytes,
            seconds,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (w - 1.0) / w,
            overlap,
        });
        bytes *= 4;
    }
    if comm.world().is_root() {
        let mut text = format!(
            "# All-reduce bandwidth ({} backend, {} ranks, {})\n\nCommand: `{}`\nMachine: {}; date {}\n\n\
             | bytes | time µs | algbw GB/s | busbw GB/s |{}\n|---:|---:|---:|---:|{}\n",
            comm.name(),
            comm.world().size,
            args.device,
            command_line(),
            machine_line(),
            crate::files::today(),
            if args.overlap {
                " compute µs | overlapped µs | hidden |"
            } else {
                ""
            },
            if args.overlap { "---:|---:|---:|" } else { "" },
        );
        for r in &rows {
            text += &format!(
                "| {} | {:.1} | {:.3} | {:.3} |",
                r.bytes,
                r.seconds * 1e6,
                r.algbw_gbs,
                r.busbw_gbs
            );
            if let Some(o) = &r.overlap {
                text += &format!(
                    " {:.1} | {:.1} | {:.0}% |",
                    o.compute_seconds * 1e6,
                    o.overlapped_seconds * 1e6,
                    o.hidden * 100.0
                );
            }
            text.push('\n');
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

fn synchronize(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Every rank reports its median; the slowest rank is the collective's time.
fn slowest_median(comm: &dyn Communicator, times: Vec<f64>) -> Result<f64> {
    let mine = median(times.into_iter());
    Ok(comm
        .all_gather_f64(&[mine])?
        .into_iter()
        .fold(0.0, f64::max))
}

/// The overlapped all-reduce of `t` beside a compute sized to take about `reduce_seconds`
/// (whole 128×128 matmuls, on the same device), timed and checked: `t` is refilled with ones
/// before each start, so every element must come back equal to the world size. A reduction
/// that read `t` before the fill (or a result read before the reduction ended) fails here.
fn overlapped(
    comm: &dyn Communicator,
    t: &Tensor,
    reduce_seconds: f64,
    iters: usize,
) -> Result<OverlapRow> {
    let device = t.device();
    let a = Tensor::randn([128, 128], (Kind::Float, device)) / 11.3;
    let compute = |n: usize| {
        let mut x = a.shallow_clone();
        for _ in 0..n {
            x = x.matmul(&a);
        }
        x
    };
    // One matmul's time, then as many as the all-reduce takes (the same count on every rank).
    let probe = 64;
    let start = Instant::now();
    let _ = compute(probe);
    synchronize(device);
    let per_matmul = start.elapsed().as_secs_f64() / probe as f64;
    let n = comm.all_gather_f64(&[reduce_seconds / per_matmul.max(1e-9)])?;
    let n = (n.iter().copied().fold(f64::INFINITY, f64::min).round() as usize).max(1);

    let want = comm.world().size as f64;
    let (mut alone, mut both) = (Vec::new(), Vec::new());
    let mut t = t.shallow_clone();
    for i in 0..iters + 2 {
        comm.barrier()?;
        let start = Instant::now();
        let _ = compute(n);
        synchronize(device);
        let compute_s = start.elapsed().as_secs_f64();

        let _ = t.fill_(1.0);
        comm.barrier()?;
        let start = Instant::now();
        comm.start_all_reduce_sum(vec![t.shallow_clone()])?;
        let _ = compute(n);
        comm.finish_all_reduces()?;
        synchronize(device);
        let both_s = start.elapsed().as_secs_f64();
        let off = (&t - want).abs().max().double_value(&[]);
        anyhow::ensure!(
            off == 0.0,
            "the overlapped all-reduce ({} backend) returned wrong sums: off by up to {off} from {want}",
            comm.name()
        );
        if i >= 2 {
            alone.push(compute_s);
            both.push(both_s);
        }
    }
    let compute_seconds = slowest_median(comm, alone)?;
    let overlapped_seconds = slowest_median(comm, both)?;
    Ok(OverlapRow {
        compute_seconds,
        overlapped_seconds,
        hidden: ((reduce_seconds + compute_seconds - overlapped_seconds) / reduce_seconds)
            .clamp(0.0, 1.0),
    })
}
