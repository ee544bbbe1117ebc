//! The command line's grammar (clap): the subcommands of every role.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{VERSION, cli};

#[derive(Parser)]
#[command(name = "rampart", version = VERSION, about = "A reverse proxy whose workers run jailed")]
pub(crate) struct Cli {
    /// The configuration file (the embedded default when absent); clients find the command
    /// socket in it.
    #[arg(short, long, global = true)]
    pub(crate) config: Option<PathBuf>,
    /// The command socket (overrides the configuration's `command_socket`).
    #[arg(short = 's', long, global = true)]
    pub(crate) socket: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Start the supervisor and its workers.
    Start {
        /// Run the workers WITHOUT their jail, to measure what the jail costs. Refused when the
        /// configuration requires landlock.
        #[arg(long)]
        sandbox_off: bool,
        /// The handover channel from the supervisor being upgraded (set by `rampart upgrade`,
        /// never by hand).
        #[arg(long, hide = true)]
        handover_fd: Option<i32>,
    },
    /// A worker process (started by the supervisor, never by hand).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        channel_fd: i32,
        #[arg(long)]
        launch: String,
    },
    /// The keyring process (started by the supervisor, never by hand).
    #[command(hide = true)]
    Keyring {
        #[arg(long)]
        channel_fd: i32,
        #[arg(long)]
        launch: String,
    },
    /// The audit trail: verify, show, export, keygen.
    Audit {
        #[command(subcommand)]
        command: rampart_audit::cli::AuditCommand,
    },
    /// Validate a configuration file.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// What a jailed worker may do.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    #[command(flatten)]
    Client(cli::ClientCommand),
    /// What this kernel can enforce.
    Sandbox {
        #[command(subcommand)]
        action: SandboxAction,
    },
}

#[derive(Subcommand)]
pub(crate) enum PolicyAction {
    /// Print the effective worker sandbox profile of a configuration.
    Show {
        /// The keyring's profile instead (the process that holds private keys).
        #[arg(long, conflicts_with = "supervisor")]
        keyring: bool,
        /// What the supervisor keeps after start instead: capabilities and landlock paths.
        #[arg(long)]
        supervisor: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum SandboxAction {
    /// Enter the worker jail in a throwaway process and report which layers hold; exits 1 when
    /// a layer the configuration requires is missing.
    Check,
}

#[derive(Subcommand)]
pub(crate) enum ConfigAction {
    /// Validate a configuration file: print its first error with file and line, or a summary.
    Check,
}
