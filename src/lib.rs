//! fsct-dist: a trainer for few-shot image classification with the Few-Shot Cosine Transformer.

pub mod cli;
pub mod config;
pub mod data;
pub mod logging;
pub mod model;

use std::process::ExitCode;

use anyhow::Result;

use cli::{Cli, Command};

/// Exit code of a run that failed with an error message.
pub const EXIT_ERROR: u8 = 1;

/// Runs one command; every user error comes back as a message that names the fix.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train(args) => {
            let resolved = args.to_config()?.resolve()?;
            if args.dry_run {
                print!("{}", resolved.config.to_toml());
                return Ok(ExitCode::SUCCESS);
            }
            anyhow::bail!("training is not wired yet")
        }
        Command::Test(_) | Command::Data(_) => anyhow::bail!("not wired yet"),
    }
}
