//! `rampart`: the supervisor, the worker entry point, and the command-line client, in one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rampart_command::config::Config;

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("RAMPART_GIT_REVISION"), ")");

#[derive(Parser)]
#[command(name = "rampart", version = VERSION, about = "A reverse proxy whose workers run jailed")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate a configuration file: print its first error with file and line, or a summary.
    Check {
        /// The configuration file (the embedded default when absent).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            action: ConfigAction::Check { config, json },
        } => config_check(config, json),
    }
}

fn config_check(path: Option<PathBuf>, json: bool) -> ExitCode {
    let config = match &path {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    };
    let summary = config.and_then(|c| c.check().map(|s| (c, s)));
    match summary {
        Ok((config, s)) => {
            if json {
                let value = serde_json::json!({
                    "file": config.source.display().to_string(),
                    "listeners": s.listeners,
                    "clusters": s.clusters,
                    "frontends": s.frontends,
                    "backends": s.backends,
                    "certificates": s.certificates,
                    "state_hash": s.state_hash,
                });
                println!("{value}");
            } else {
                println!(
                    "{}: valid: {} listener(s), {} cluster(s), {} frontend(s), {} backend(s), {} certificate(s); state {}",
                    config.source.display(),
                    s.listeners,
                    s.clusters,
                    s.frontends,
                    s.backends,
                    s.certificates,
                    s.state_hash
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
