//! The command line. Flags mirror the TOML keys; the official FS-CT spellings (`--n_way`,
//! `--train_aug 1`, `--lambda_I`, ...) are accepted as aliases so existing scripts keep working.
//! Parsing only records what was typed: `RunArgs::apply` lays it over the config file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::bench;
use crate::config::{Backbone, ConfigError, Method, Optimizer, RunConfig, Split};
use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "fsct-dist",
    // Says which libtorch the binary was built against and whether libtorch_cuda is linked: a
    // binary built with the CPU wheel set sees no GPU even on a GPU machine.
    version = concat!(
        env!("CARGO_PKG_VERSION"),
        " (libtorch ",
        env!("FSCT_LIBTORCH_VERSION"),
        ", CUDA linked: ",
        env!("FSCT_CUDA_LINKED"),
        ")"
    ),
    about = "Few-Shot Cosine Transformer trainer (CPU, or MPI ranks on GPUs)"
)]
#[command(after_help = "Start with: fsct-dist train --config configs/quickstart.toml")]
// A flag given twice: the last one wins (scripts append overrides), and in subcommands too.
#[command(args_override_self = true)]
pub struct Cli {
    /// Log lines as text (default) or JSON objects.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train on the base split, validate each epoch on val, keep the best, then test.
    Train(RunArgs),
    /// Evaluate a trained run (its best weights) on a split: mean accuracy ± 95% CI.
    Test(TestArgs),
    /// Dataset tools: create the built-in dataset, or check a dataset folder.
    #[command(subcommand)]
    Data(DataCommand),
    /// Benchmarks: memory sweep, step phases, all-reduce bandwidth, scaling and its model.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// A run folder written by `train` (its config and best weights are used). Without it, the
    /// model comes from the flags and `--official FILE`.
    #[arg(long)]
    pub run: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the built-in procedural dataset (official JSON format, real PNG files).
    Synth {
        #[arg(long)]
        out: PathBuf,
        /// Classes in the base, val and novel splits.
        #[arg(long, value_parser = parse_three, default_value = "16,8,8")]
        classes: [usize; 3],
        #[arg(long, default_value_t = 30)]
        images_per_class: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 84)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Validate a dataset folder (every split, every image) and print a summary.
    Check {
        dir: PathBuf,
        /// The input size images will be resized to (the resize limit depends on it).
        #[arg(long, default_value_t = crate::data::CHECK_IMAGE_SIZE)]
        image_size: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Peak memory and time per episode for each amp × micro-steps × checkpointing setting of
    /// one model and episode (the table to choose memory settings from).
    Memory(BenchMemoryArgs),
    /// Time per optimizer step split into phases (data, backbone, head, backward,
    /// communication, optimizer) and bytes sent, for this world (run it under mpirun).
    Step(BenchStepArgs),
    /// All-reduce bus bandwidth for message sizes 1 KiB … 512 MiB (run it under mpirun).
    Allreduce(bench::allreduce::AllreduceArgs),
    /// Runs `bench step` under mpirun for W ranks × sharding modes × micro-steps: step time
    /// split, throughput, strong/weak scaling efficiency, bytes all-reduced; table, JSON, PNG.
    Scaling(bench::scaling::ScalingArgs),
    /// Predicts step time and efficiency for W up to 1024 from a `bench scaling` result and a
    /// link (measured, NVLink, InfiniBand, Ethernet); checks itself against the measurements.
    Model(bench::scaling_model::ModelArgs),
}

/// `bench memory`: the run flags give the model and episode, the bench's own flags the sweep.
#[derive(Debug, Args)]
pub struct BenchMemoryArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub sweep: bench::MemoryArgs,
}

/// `bench step`: the run flags give the setting, the bench's own flags the steps measured.
#[derive(Debug, Args)]
pub struct BenchStepArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub steps: bench::StepArgs,
}

/// Every run option. `None` means "as the config file (or the default) says".
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// TOML config file (configs/*.toml); flags given here override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dataset folder, an official name (miniImagenet, CUB, CIFAR, Omniglot) under --data-root,
    /// or `synthetic` (the built-in dataset).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Folder holding the official datasets and the built-in one.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Folder for all files of the run.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// libtorch intra-op threads (0 = its default).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Image loader threads (0 = one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Input side in pixels (0 = the dataset's official size).
    #[arg(long)]
    pub image_size: Option<i64>,
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    #[arg(long, value_enum)]
    pub backbone: Option<Backbone>,
    /// Official flag: the ResNet layout. 1 = FETI (5×5 stem, no max-pool), 0 = torchvision
    /// (7×7 stem + max-pool; the official default for ResNet12/18/34).
    #[arg(long = "FETI", alias = "feti", value_parser = crate::config::parse_switch)]
    pub feti: Option<bool>,
    #[arg(long = "n-way", alias = "n_way")]
    pub n_way: Option<i64>,
    #[arg(long = "k-shot", alias = "k_shot", alias = "n_shot")]
    pub k_shot: Option<i64>,
    #[arg(long = "n-query", alias = "n_query")]
    pub n_query: Option<i64>,
    /// Training augmentation: 1/true or 0/false.
    #[arg(long = "train-aug", alias = "train_aug", value_parser = crate::config::parse_switch)]
    pub train_aug: Option<bool>,
    #[arg(long, alias = "num_epoch", alias = "num-epoch")]
    pub epochs: Option<u64>,
    #[arg(long = "episodes-per-epoch", alias = "n_episode", alias = "n-episode")]
    pub episodes_per_epoch: Option<u64>,
    #[arg(long = "val-episodes", alias = "val_episodes")]
    pub val_episodes: Option<u64>,
    /// Test episodes.
    #[arg(long = "test-iter", alias = "test_iter")]
    pub test_iter: Option<u64>,
    /// Split evaluated by the test phase.
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    /// Stop after N optimizer steps in all (the run's files are still written).
    #[arg(long = "max-steps", alias = "max_steps")]
    pub max_steps: Option<u64>,
    #[arg(long = "learning-rate", alias = "learning_rate", alias = "lr")]
    pub learning_rate: Option<f64>,
    #[arg(long = "weight-decay", alias = "weight_decay")]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub momentum: Option<f64>,
    #[arg(long, alias = "optimization", value_enum)]
    pub optimizer: Option<Optimizer>,
    #[arg(long = "lambda-i", alias = "lambda_I")]
    pub lambda_i: Option<f64>,
    #[arg(long = "lambda-v", alias = "lambda_V")]
    pub lambda_v: Option<f64>,
    #[arg(long = "lambda-c", alias = "lambda_C")]
    pub lambda_c: Option<f64>,
    /// Micro-steps per episode: N, 0 = auto (ResNet 4, others 2), or dynamic (from the memory
    /// available; doubled on out-of-memory and the episode redone).
    #[arg(
        long = "gradient-accumulation-steps",
        alias = "gradient_accumulation_steps"
    )]
    pub gradient_accumulation_steps: Option<crate::config::Accumulation>,
    /// Empty the CUDA allocator cache after every N optimizer steps (1 = every step, 0 = never).
    #[arg(long = "empty-cache-every", alias = "empty_cache_every")]
    pub empty_cache_every: Option<u64>,
    /// How ranks share a step: images (slices of one episode) or episodes (one each).
    #[arg(long, value_enum)]
    pub shard: Option<crate::config::ShardMode>,
    /// on: shard the optimizer state over the ranks (ZeRO stage 1; each rank holds ~1/W of
    /// the moments, same steps); off (default): every rank holds all of it.
    #[arg(long = "shard-optimizer", alias = "shard_optimizer", value_parser = crate::config::parse_switch)]
    pub shard_optimizer: Option<bool>,
    /// on (default): all-reduce gradient buckets during the backward, as soon as each is
    /// final; off: all of them after the backward. The same sums either way.
    #[arg(long, value_parser = crate::config::parse_switch)]
    pub overlap: Option<bool>,
    /// on (default): convolution weights and activations channels-last (faster on oneDNN and
    /// cuDNN, the same values); off: NCHW, as the official code.
    #[arg(long = "channels-last", alias = "channels_last", value_parser = crate::config::parse_switch)]
    pub channels_last: Option<bool>,
    /// Collective backend between ranks: auto (NCCL on CUDA, else MPI), nccl or mpi.
    #[arg(long, value_enum)]
    pub comm: Option<crate::config::CommKind>,
    /// Seconds a rank may wait in one collective before ending the job (0 = forever).
    #[arg(long = "collective-timeout", alias = "collective_timeout")]
    pub collective_timeout: Option<u64>,
    /// Continue a run from its newest checkpoint (RUN) or a given one (RUN/checkpoints/step-N):
    /// the run's own config, with the flags given here laid over it (e.g. a larger --max-steps).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start a fresh run in an --output folder that already holds files: they are moved aside
    /// whole to OUTPUT.old-DATE-TIME (nothing is deleted). Without it such a folder is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// Write a resumable checkpoint every N optimizer steps (0 = at epoch ends only).
    #[arg(long = "checkpoint-every", alias = "checkpoint_every")]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints to keep (the newest).
    #[arg(long = "keep-checkpoints", alias = "keep_checkpoints")]
    pub keep_checkpoints: Option<u64>,
    /// Test hook: a backbone chunk whose input exceeds this many bytes fails as out of memory.
    #[arg(long = "simulate-oom-above-bytes", hide = true)]
    pub simulate_oom_above_bytes: Option<u64>,
    /// Mixed precision: off, fp16 (with loss scaling) or bf16 (default: fp16 on CUDA, off on CPU).
    #[arg(long, value_enum)]
    pub amp: Option<crate::config::AmpMode>,
    /// FS-CT modules kept in fp32 under --amp, comma-separated: ATTN, FFN, linear.
    #[arg(long = "fp32-modules", value_delimiter = ',')]
    pub fp32_modules: Option<Vec<String>>,
    /// Activation checkpointing of backbone stages (less memory, one more forward).
    #[arg(long = "checkpoint-activations")]
    pub checkpoint_activations: bool,
    /// Memory per phase of a step (after the first): table, memory.json and memory.png.
    #[arg(long = "memory-report")]
    pub memory_report: bool,
    /// cuDNN benchmark mode on CUDA, 1 or 0 (default 1: fixed episode shapes; 0 for
    /// bit-identical GPU runs).
    #[arg(long = "cudnn-benchmark", value_parser = crate::config::parse_switch)]
    pub cudnn_benchmark: Option<bool>,
    /// Optimizer step every K episodes (their gradients averaged).
    #[arg(long = "episodes-per-step", alias = "episodes_per_step")]
    pub episodes_per_step: Option<u64>,
    /// Initial ResNet weights: a local safetensors file (torchvision's resnet18/34 state_dict
    /// for TvResNet*, the FETI checkpoint's for FetiResNet*), or `none` for random weights.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    #[arg(long = "freeze-backbone")]
    pub freeze_backbone: bool,
    /// Start from (train) or evaluate (test) an official FS-CT state_dict saved as safetensors
    /// with the official parameter names.
    #[arg(long)]
    pub official: Option<PathBuf>,
    /// Write the gradients of the first optimizer step (before the optimizer) to this
    /// safetensors file, named like the parameters.
    #[arg(long = "dump-grads")]
    pub dump_grads: Option<PathBuf>,
    /// Write the final parameters and BatchNorm buffers to this safetensors file.
    #[arg(long = "dump-params")]
    pub dump_params: Option<PathBuf>,
    /// Resolve and print the configuration, then exit without training.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
}

/// `B,V,N`: three counts, for the base, val and novel splits.
fn parse_three(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{s}`: {e}"))?;
    <[usize; 3]>::try_from(parts)
        .map_err(|_| format!("`{s}` must be three counts like 16,8,8 (base,val,novel)"))
}

impl RunArgs {
    /// The config file (or defaults) with every given flag laid over it.
    pub fn to_config(&self) -> Result<RunConfig, ConfigError> {
        let mut c = match &self.config {
            Some(path) => RunConfig::from_file(path)?,
            None => RunConfig::default(),
        };
        self.apply(&mut c);
        Ok(c)
    }

    pub fn apply(&self, c: &mut RunConfig) {
        fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *slot = v.clone();
            }
        }
        set(&mut c.data.dataset, &self.dataset);
        set(&mut c.data.root, &self.data_root);
        set(&mut c.data.image_size, &self.image_size);
        set(&mut c.data.train_aug, &self.train_aug);
        set(&mut c.data.workers, &self.workers);
        set(&mut c.episode.n_way, &self.n_way);
        set(&mut c.episode.k_shot, &self.k_shot);
        set(&mut c.episode.n_query, &self.n_query);
        set(&mut c.model.method, &self.method);
        set(&mut c.model.backbone, &self.backbone);
        set(&mut c.model.lambda_i, &self.lambda_i);
        set(&mut c.model.lambda_v, &self.lambda_v);
        set(&mut c.model.lambda_c, &self.lambda_c);
        set(&mut c.model.fp32_modules, &self.fp32_modules);
        if let Some(p) = &self.pretrained {
            c.model.pretrained = Some(p.clone().into());
        }
        c.model.freeze_backbone |= self.freeze_backbone;
        c.train.checkpoint_activations |= self.checkpoint_activations;
        if self.amp.is_some() {
            c.train.amp = self.amp;
        }
        c.train.memory_report |= self.memory_report;
        set(&mut c.train.cudnn_benchmark, &self.cudnn_benchmark);
        if self.official.is_some() {
            c.model.official = self.official.clone();
        }
        // `--backbone` overrides the file's whole choice, its `feti` included.
        if self.feti.is_some() || self.backbone.is_some() {
            c.model.feti = self.feti;
        }
        set(&mut c.train.epochs, &self.epochs);
        set(&mut c.train.episodes_per_epoch, &self.episodes_per_epoch);
        set(&mut c.train.val_episodes, &self.val_episodes);
        set(&mut c.train.max_steps, &self.max_steps);
        set(&mut c.train.learning_rate, &self.learning_rate);
        set(&mut c.train.weight_decay, &self.weight_decay);
        set(&mut c.train.momentum, &self.momentum);
        set(&mut c.train.optimizer, &self.optimizer);
        set(
            &mut c.train.gradient_accumulation_steps,
            &self.gradient_accumulation_steps,
        );
        set(&mut c.train.episodes_per_step, &self.episodes_per_step);
        set(&mut c.train.empty_cache_every, &self.empty_cache_every);
        set(&mut c.train.shard, &self.shard);
        set(&mut c.train.shard_optimizer, &self.shard_optimizer);
        set(&mut c.train.overlap, &self.overlap);
        set(&mut c.train.channels_last, &self.channels_last);
        set(&mut c.train.checkpoint_every, &self.checkpoint_every);
        set(&mut c.train.keep_checkpoints, &self.keep_checkpoints);
        set(&mut c.run.comm, &self.comm);
        set(&mut c.run.collective_timeout, &self.collective_timeout);
        set(&mut c.test.episodes, &self.test_iter);
        set(&mut c.test.split, &self.split);
        set(&mut c.run.seed, &self.seed);
        set(&mut c.run.device, &self.device);
        set(&mut c.run.threads, &self.threads);
        set(&mut c.run.output, &self.output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        let mut full = vec!["fsct-dist", "train"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Train(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn official_spellings_are_accepted() {
        let a = parse(&[
            "--method",
            "FSCT_softmax",
            "--backbone",
            "ResNet34",
            "--FETI",
            "0",
            "--n_way",
            "3",
            "--k_shot",
            "1",
            "--n_query",
            "15",
            "--train_aug",
            "1",
            "--n_episode",
            "7",
            "--num_epoch",
            "2",
            "--test_iter",
            "10",
            "--learning_rate",
            "0.01",
            "--weight_decay",
            "0.0005",
            "--optimization",
            "SGD",
            "--lambda_I",
            "1.0",
            "--lambda_V",
            "0.5",
            "--lambda_C",
            "0.1",
            "--gradient_accumulation_steps",
            "1",
        ]);
        let mut c = RunConfig::default();
        a.apply(&mut c);
        assert_eq!(c.model.method, Method::FsctSoftmax);
        assert_eq!(
            (c.model.backbone, c.model.feti),
            (Backbone::ResNet34, Some(false))
        );
        assert_eq!(
            (c.episode.n_way, c.episode.k_shot, c.episode.n_query),
            (3, 1, 15)
        );
        assert!(c.data.train_aug);
        assert_eq!(
            (c.train.episodes_per_epoch, c.train.epochs, c.test.episodes),
            (7, 2, 10)
        );
        assert_eq!(
            (c.train.learning_rate, c.train.weight_decay),
            (0.01, 0.0005)
        );
        assert_eq!(c.train.optimizer, Optimizer::Sgd);
        assert_eq!(
            (c.model.lambda_i, c.model.lambda_v, c.model.lambda_c),
            (1.0, 0.5, 0.1)
        );
    }

    #[test]
    fn kebab_spellings_and_common_flags() {
        let a = parse(&[
            "--n-way",
            "4",
            "--dataset",
            "CUB",
            "--output",
            "o",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--image-size",
            "64",
            "--max-steps",
            "5",
            "--epochs",
            "3",
            "--episodes-per-epoch",
            "9",
        ]);
        let mut c = RunConfig::default();
        a.apply(&mut c);
        assert_eq!(c.episode.n_way, 4);
        assert_eq!(c.data.dataset, "CUB");
        assert_eq!(c.run.output, PathBuf::from("o"));
        assert_eq!((c.run.seed, c.run.threads, c.data.image_size), (3, 2, 64));
        assert_eq!(
            (
                c.train.max_steps,
                c.train.epochs,
                c.train.episodes_per_epoch
            ),
            (5, 3, 9)
        );
    }

    #[test]
    fn flags_override_the_config_file_and_unset_flags_keep_it() {
        let dir = std::env::temp_dir().join(format!("fsct-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[episode]\nn_way = 7\nk_shot = 2\n[train]\nepochs = 9\n",
        )
        .unwrap();
        let a = parse(&["--config", file.to_str().unwrap(), "--k-shot", "3"]);
        let c = a.to_config().unwrap();
        assert_eq!(
            (c.episode.n_way, c.episode.k_shot, c.train.epochs),
            (7, 3, 9)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_repeated_flag_takes_the_last_value() {
        let a = parse(&["--n-way", "3", "--n_way", "4"]);
        assert_eq!(a.n_way, Some(4));
    }

    #[test]
    fn unknown_method_is_a_usage_error() {
        let r = Cli::try_parse_from(["fsct-dist", "train", "--method", "MAML"]);
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("FSCT_cosine"),
            "lists the valid methods: {msg}"
        );
    }
}
