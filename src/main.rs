//! `fsct-dist`: parse the command line, run, and turn errors into one clear message and a
//! non-zero exit code (never a panic trace for a user error).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fsct_dist::cli::Cli::parse();
    fsct_dist::logging::init(cli.log_format);
    match fsct_dist::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(fsct_dist::EXIT_ERROR)
        }
    }
}
