//! fsct-dist: a trainer for few-shot image classification with the Few-Shot Cosine Transformer.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod distributed;
pub mod ffi;
pub mod files;
pub mod host_read;
pub mod logging;
pub mod memory;
pub mod model;
pub mod oom;
pub mod plot;
pub mod regular_file;
pub mod signals;
pub mod train;

use std::process::ExitCode;

use anyhow::Result;

use cli::{Cli, Command, DataCommand};

/// Exit code of a run that failed with an error message.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of a run stopped by SIGTERM/SIGINT after writing a checkpoint (resume it with
/// `--resume`).
pub const EXIT_PREEMPTED: u8 = 3;

/// Runs one command; every user error comes back as a message that names the fix.
pub fn run(cli: Cli) -> Result<ExitCode> {
    oom::install_quiet_hook();
    match cli.command {
        Command::Train(args) => {
            let (config, resume) = match &args.resume {
                Some(path) => resume_config(&args, path)?,
                None => (args.to_config()?, None),
            };
            let resolved = config.resolve()?;
            // Under a launcher the world size is known before MPI starts: refuse now what
            // would fail on the ranks.
            resolved
                .config
                .check_world(distributed::launcher_world_size().unwrap_or(1))?;
            // A fresh run says where its weights start (a ResNet must; see config::Start).
            let start = match resume {
                None => Some(resolved.start()?),
                Some(_) => None,
            };
            let about = config::start::summary(&resolved, start.as_ref());
            anyhow::ensure!(
                !(args.overwrite && resume.is_some()),
                "--overwrite starts a new run and --resume continues one; pass only one of them"
            );
            if let Some(s) = &start {
                s.check_file()?;
            }
            let begin = match &resume {
                Some(ckpt) => train::Start::Resume(ckpt),
                None => train::Start::Fresh {
                    overwrite: args.overwrite,
                },
            };
            let dumps = train::Dumps {
                params: args.dump_params.clone(),
                grads: args.dump_grads.clone(),
                simulate_oom_above_bytes: args.simulate_oom_above_bytes,
            };
            if args.dry_run {
                // Every check a start makes before its first step, nothing written.
                let checked = train::preflight(&resolved, &dumps, begin)?;
                about.iter().chain(&checked).for_each(|l| println!("# {l}"));
                print!("{}", resolved.config.to_toml());
                return Ok(ExitCode::SUCCESS);
            }
            about.iter().for_each(|l| tracing::info!("{l}"));
            if let Some(config::Start::RandomAsked { warning }) = &start {
                tracing::warn!("{warning}");
            }
            let mut preempted = None;
            on_every_rank(&resolved, |comm| {
                let summary = train::train(&resolved, &dumps, comm, begin)?;
                if let Some(ckpt) = &summary.preempted {
                    // Every rank exits 3; rank 0 alone says where the checkpoint is, before
                    // any rank exits (a launcher may end the others once one has).
                    if comm.world().is_root() {
                        eprintln!(
                            "stopped by a signal; checkpoint {} written. Resume with: fsct-dist train --resume {}",
                            ckpt.display(),
                            resolved.config.run.output.display()
                        );
                    }
                    comm.barrier()?;
                }
                preempted = summary.preempted;
                Ok(())
            })?;
            match preempted {
                Some(_) => Ok(ExitCode::from(EXIT_PREEMPTED)),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Test(args) => test_run(&args),
        Command::Data(DataCommand::Synth {
            out,
            classes,
            images_per_class,
            size,
            seed,
        }) => {
            let opts = data::SynthOptions {
                classes,
                images_per_class,
                size,
                seed,
            };
            let summary = data::write_dataset(&out, &opts)?;
            println!(
                "wrote {} images in {}/{}/{} base/val/novel classes to {}",
                summary.images,
                summary.classes[0],
                summary.classes[1],
                summary.classes[2],
                summary.root.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(b) => bench_run(&b).map(|()| ExitCode::SUCCESS),
        Command::Data(DataCommand::Check { dir, image_size }) => {
            let report = data::check_dataset(&dir, image_size)?;
            print!("{report}");
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_ERROR)
            })
        }
    }
}

/// The config of a run to resume (the checkpoint's own, with the given flags over it) and the
/// checkpoint to load. The run folder is where the checkpoint lives.
fn resume_config(
    args: &cli::RunArgs,
    path: &std::path::Path,
) -> Result<(config::RunConfig, Option<std::path::PathBuf>)> {
    anyhow::ensure!(
        args.config.is_none(),
        "--resume uses the run's own config; drop --config (flags given with --resume still apply)"
    );
    let ckpt = train::checkpoint::resolve(path)?;
    let state = train::checkpoint::read_state(&ckpt)?;
    let mut c = state.config;
    args.apply(&mut c);
    // The run folder: RUN for RUN/checkpoints/step-N. A resumed run continues in place.
    let run = ckpt
        .parent()
        .and_then(std::path::Path::parent)
        .map_or_else(|| path.to_path_buf(), std::path::Path::to_path_buf);
    if let Some(other) = &args.output {
        let same = |p: &std::path::Path| std::fs::canonicalize(p).ok();
        anyhow::ensure!(
            same(other).is_some() && same(other) == same(&run),
            "--resume continues the run in its own folder {}, but --output names {}; drop \
             --output (or pass the same folder), or copy the run folder first and resume the copy",
            run.display(),
            other.display()
        );
    }
    c.run.output = run;
    Ok((c, Some(ckpt)))
}

fn bench_run(b: &cli::BenchCommand) -> Result<()> {
    use cli::BenchCommand;
    match b {
        BenchCommand::Memory(a) => bench::memory(&a.run.to_config()?, &a.sweep),
        BenchCommand::Step(a) => {
            let resolved = a.run.to_config()?.resolve()?;
            on_every_rank(&resolved, |comm| bench::step(&resolved, &a.steps, comm))
        }
        BenchCommand::Allreduce(a) => {
            let device = config::parse_device(&a.device)?;
            let comm = distributed::init(a.comm, device, a.overlap)?;
            bench::allreduce::run(a, comm.as_ref()).map(|_| ())
        }
        BenchCommand::Scaling(a) => bench::scaling::run(a).map(|_| ()),
        BenchCommand::Model(a) => bench::scaling_model::run(a),
    }
}

/// Runs `job` on this rank's communicator (a world of one without a launcher). Under MPI, an
/// error or a panic on any rank ends the whole job at once with that rank's message, instead
/// of leaving the other ranks waiting in a collective.
fn on_every_rank(
    resolved: &config::Resolved,
    job: impl FnOnce(&dyn distributed::Communicator) -> Result<()>,
) -> Result<()> {
    let comm = distributed::init(
        resolved.config.run.comm,
        resolved.device,
        resolved.config.train.overlap,
    )?;
    let world = comm.world();
    let comm = distributed::watchdog::watch(
        comm,
        std::time::Duration::from_secs(resolved.config.run.collective_timeout),
        world.device_for(resolved.device),
    )?;
    if world.size == 1 {
        return job(comm.as_ref());
    }
    distributed::abort_on_panic(world.rank);
    let _span = tracing::info_span!("rank", r = world.rank).entered();
    if let Err(e) = job(comm.as_ref()) {
        eprintln!("error on rank {} of {}: {e:#}", world.rank, world.size);
        comm.abort(i32::from(EXIT_ERROR));
    }
    Ok(())
}

/// `fsct-dist test`: a finished run (its config, flags may override, its best weights), or a
/// model from the flags with `--official FILE`.
fn test_run(args: &cli::TestArgs) -> Result<ExitCode> {
    let (mut config, weights) = match &args.run {
        Some(run) => {
            if let Some(official) = &args.overrides.official {
                anyhow::bail!(
                    "--run {} and --official {} both name the weights to test; pass one: --run for the run's best weights, --official for an official state_dict (with the model from the flags or --config)",
                    run.display(),
                    official.display()
                );
            }
            let config_file = run.join(train::CONFIG_FILE);
            let weights = run.join(train::BEST_WEIGHTS);
            anyhow::ensure!(
                config_file.is_file() && weights.is_file(),
                "{} is not a finished training run (it needs {} and {}); pass the --output folder of `fsct-dist train`",
                run.display(),
                train::CONFIG_FILE,
                train::BEST_WEIGHTS
            );
            let mut config = config::RunConfig::from_file(&config_file)?;
            config.run.output = run.clone();
            if let Some(b) = train::checkpoint::legacy_backbone(run) {
                config.model.backbone = b;
            }
            // The run's weights replace whatever it started from.
            (config.model.pretrained, config.model.official) = (None, None);
            (config, Some(weights))
        }
        None => {
            anyhow::ensure!(
                args.overrides.official.is_some(),
                "nothing to test: pass --run DIR (a training run) or --official FILE (an official checkpoint)"
            );
            (args.overrides.to_config()?, None)
        }
    };
    args.overrides.apply(&mut config);
    let resolved = config.resolve()?;
    files::prepare_output(&resolved.config.run.output)?;
    let root = train::dataset_root(&resolved)?;
    let mut built = train::build(&resolved)?;
    if let Some(weights) = weights {
        model::load_checked(&mut built.vs, &weights, model::WeightsSource::Run)?;
    }
    on_every_rank(&resolved, |comm| {
        // test.json is written into the run folder: not while a training run writes there.
        let _lock = comm
            .world()
            .is_root()
            .then(|| train::run_folder::lock(&resolved.config.run.output))
            .transpose()?;
        let device = comm.world().device_for(resolved.device);
        built.vs.set_device(device);
        train::test_split(&resolved, &built.model, &root, comm, None).map(|_| ())
    })?;
    Ok(ExitCode::SUCCESS)
}
