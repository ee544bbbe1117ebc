//! The command-line client of the command socket: `rampart status`, `rampart cluster add`,
//! `rampart apply -f`, ...
//!
//! Each invocation opens one connection, sends one request (`apply -f` sends the file's whole
//! state; the supervisor computes the difference) and prints the answer as a table or as JSON. The client is an ordinary peer of the
//! supervisor: it writes delimited `Request` frames and reads `Response` frames, skipping
//! `PROCESSING` ones until the final `OK` or `FAILURE`.
//!
//! The client reads the files a person names on its own command line (certificates, the file of
//! `apply -f`) and sends their contents, because the supervisor's jail may not let it read them.
//! `state save|load` paths are the exception: they name files in the supervisor's state
//! directory, so they are sent as given.
//!
//! Exit codes ([`crate::Exit`]): 0 when the supervisor answered OK, 1 when it answered FAILURE
//! (its message on stderr), 2 for unreadable files, connection and protocol errors.
//!
//! Layout: `connection` (the socket, requests, typed errors), one module per verb group
//! (`cluster`, `frontend`, `backend`, `listener`, `certificate`, `health`, `apply` for state and
//! apply), `render` (tables, one line per request), and this module: the grammar's top and
//! `run`.

mod apply;
mod backend;
mod certificate;
mod cluster;
mod connection;
mod frontend;
mod health;
mod listener;
mod render;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::{Args, Subcommand, ValueEnum};
use rampart_command::config::{self, Config, ConfigError};
use rampart_command::framing::{self, FrameError, FrameReader};
use rampart_command::proto::{self, Request, Response, ResponseStatus, request::Kind, response::Content};
use rampart_command::request_kind_name;
use rampart_command::state::{self, FrontendKey};

use apply::*;
use backend::*;
use certificate::*;
use cluster::*;
use connection::*;
pub use connection::{Client, ClientError, expect_ok};
use frontend::*;
use health::*;
use listener::*;
use render::*;

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Subcommand, Debug, Clone)]
pub enum ClientCommand {
    /// Show the supervisor's version, state hash and what the state holds.
    Status,
    /// List the workers and what their jails enforce.
    Workers,
    /// Add, remove or list clusters.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Add, remove or list frontends: the rules that route requests to clusters.
    Frontend {
        #[command(subcommand)]
        action: FrontendAction,
    },
    /// Add or remove the servers of a cluster.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Add, remove, activate, deactivate or list listeners.
    Listener {
        #[command(subcommand)]
        action: ListenerAction,
    },
    /// Add, replace, remove or list the certificates of HTTPS listeners.
    Certificate {
        #[command(subcommand)]
        action: CertificateAction,
    },
    /// Save, load or dump the whole configuration.
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// Make the running configuration match a configuration file, in one atomic batch that adds,
    /// updates and removes (listeners included).
    Apply {
        /// The configuration file.
        #[arg(short, long)]
        file: PathBuf,
        /// Print the changes the supervisor computed, and the state they apply to, without
        /// applying them.
        #[arg(long)]
        dry_run: bool,
        /// Apply only if the running state still has this hash (the `base` a dry run printed),
        /// so that what is applied is exactly what was reviewed.
        #[arg(long, value_name = "HASH")]
        expect_state: Option<String>,
    },
    /// Stop the supervisor and its workers, letting in-flight requests finish.
    Shutdown {
        /// Stop now, closing in-flight connections.
        #[arg(long, conflicts_with = "grace")]
        hard: bool,
        /// Seconds tunnels may run on while the workers drain (default: timeouts.shutdown_grace).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..=86400))]
        grace: Option<u32>,
    },
    /// Hand the supervisor over to the binary now at its path (a package upgrade) without
    /// closing a connection: the new one takes the sockets, state and keys, its workers are
    /// verified, then the old generation drains. `--worker N` replaces one worker in place.
    Upgrade {
        /// Replace only this worker (slot id, see `rampart workers`).
        #[arg(long, value_name = "N")]
        worker: Option<u32>,
        /// Seconds the old workers' tunnels (WebSocket, TCP) may run on before they are closed
        /// (default: timeouts.upgrade_grace).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..=86400))]
        grace: Option<u32>,
    },
    /// Set, remove or list active health checks.
    HealthCheck {
        #[command(subcommand)]
        action: HealthCheckAction,
    },
    /// Print the access policy and worker profile the running supervisor enforces.
    #[command(name = "access")]
    Policy,
    /// Read the access policy file again (admin only; audited).
    ReloadPolicy,
    /// Change the log filter of the supervisor and its workers.
    Logging {
        /// A filter such as `info` or `debug`.
        filter: String,
    },
    /// Send the merged metrics to statsd (IP:PORT over UDP, every second), or stop.
    Statsd {
        /// Where to send, such as 127.0.0.1:8125.
        #[arg(
            long,
            value_name = "IP:PORT",
            required_unless_present = "off",
            conflicts_with = "off"
        )]
        address: Option<String>,
        /// Prefix of every name (default: rampart).
        #[arg(long, default_value = "")]
        prefix: String,
        /// DogStatsD tags for the labels.
        #[arg(long)]
        tags: bool,
        /// Stop sending.
        #[arg(long)]
        off: bool,
    },
    /// Query the workers' metrics.
    Metrics {
        /// Only the series of this cluster (and of its backends).
        #[arg(long)]
        cluster: Option<String>,
        /// Only the series of this backend.
        #[arg(long)]
        backend: Option<String>,
    },
}

/// The request a command sends, or `None` for `apply`, which needs the running state first.
/// Reads the files the command names.
pub(super) fn to_request(command: &ClientCommand) -> Result<Option<Request>, ClientError> {
    let kind = match command {
        ClientCommand::Status => Kind::Status(proto::Empty {}),
        ClientCommand::Workers => Kind::ListWorkers(proto::Empty {}),
        ClientCommand::Cluster { action } => cluster_kind(action),
        ClientCommand::Frontend { action } => frontend_kind(action),
        ClientCommand::Backend { action } => backend_kind(action),
        ClientCommand::Listener { action } => listener_kind(action)?,
        ClientCommand::Certificate { action } => certificate_kind(action)?,
        ClientCommand::State { action } => match action {
            StateAction::Save { path } => Kind::SaveState(proto::StatePath { path: path.clone() }),
            StateAction::Load { path } => Kind::LoadState(proto::StatePath { path: path.clone() }),
            StateAction::Dump => Kind::DumpState(proto::Empty {}),
        },
        ClientCommand::Apply { .. } => return Ok(None),
        ClientCommand::Shutdown { hard: false, grace } => Kind::SoftStop(proto::SoftStop {
            grace_seconds: grace.unwrap_or(0),
        }),
        ClientCommand::Shutdown { hard: true, .. } => Kind::HardStop(proto::Empty {}),
        ClientCommand::Upgrade { worker: None, grace } => Kind::UpgradeMain(proto::UpgradeMain {
            grace_seconds: grace.unwrap_or(0),
        }),
        ClientCommand::Upgrade {
            worker: Some(id),
            grace,
        } => Kind::UpgradeWorker(proto::UpgradeWorker {
            id: *id,
            grace_seconds: grace.unwrap_or(0),
        }),
        ClientCommand::HealthCheck { action } => health_check_kind(action),
        ClientCommand::Statsd {
            address,
            prefix,
            tags,
            off,
        } => Kind::ConfigureMetrics(proto::MetricsConfig {
            enabled: !off,
            statsd_address: address.clone().unwrap_or_default(),
            prefix: prefix.clone(),
            dogstatsd_tags: *tags,
        }),
        ClientCommand::Policy => Kind::ShowPolicy(proto::Empty {}),
        ClientCommand::ReloadPolicy => Kind::ReloadPolicy(proto::Empty {}),
        ClientCommand::Logging { filter } => Kind::SetLoggingLevel(proto::LoggingLevel { filter: filter.clone() }),
        ClientCommand::Metrics { cluster, backend } => Kind::QueryMetrics(proto::MetricsQuery {
            cluster_id: cluster.clone().unwrap_or_default(),
            names: Vec::new(),
            backend_id: backend.clone().unwrap_or_default(),
        }),
    };
    Ok(Some(request_of(kind)))
}

// ---------------------------------------------------------------------------------------------
// Running a command

/// Runs one client command against `socket`; prints a readable table (or JSON with `json`).
/// Exit codes: 0 OK, 1 FAILURE answered by the server (message on stderr), 2 usage/connection errors.
pub fn run(command: ClientCommand, socket: &Path, json: bool) -> ExitCode {
    match execute(&command, socket, json, &mut io::stdout().lock()) {
        Ok(()) => crate::Exit::Success.into(),
        Err(e) => {
            warn(&format!("error: {e}"));
            e.exit_code().into()
        }
    }
}

/// Runs `command`, writing its output on `out`.
pub(super) fn execute(
    command: &ClientCommand,
    socket: &Path,
    json: bool,
    out: &mut dyn io::Write,
) -> Result<(), ClientError> {
    if let ClientCommand::Apply {
        file,
        dry_run,
        expect_state,
    } = command
    {
        return apply(file, *dry_run, expect_state.as_deref(), socket, json, out);
    }
    // Files are read before connecting: a typo in a path is not the supervisor's business.
    let Some(request) = to_request(command)? else {
        return Ok(());
    };
    let mut client = Client::connect(socket)?;
    client.show_progress(!json);
    let response = client.call(request)?;
    if json {
        // `state dump --json` prints the dump itself, without the response around it.
        let text = match (&response.content, response.status == ResponseStatus::Ok as i32) {
            (Some(Content::State(dump)), true) => serde_json::to_string_pretty(dump)?,
            _ => serde_json::to_string_pretty(&response)?,
        };
        print_out(out, &format!("{text}\n"))?;
        expect_ok(response)?;
    } else {
        let response = expect_ok(response)?;
        let detail = matches!(
            command,
            ClientCommand::Cluster {
                action: ClusterAction::List { id: Some(_) }
            }
        );
        print_out(out, &render(&response, detail))?;
    }
    Ok(())
}

/// Writes output; a reader that went away (`rampart cluster list | head`) is not an error.
pub(super) fn print_out(out: &mut dyn io::Write, text: &str) -> Result<(), ClientError> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(ClientError::Output),
    }
}

pub(super) fn warn(text: &str) {
    // Nowhere left to report a failure to write on stderr.
    let _ = writeln!(io::stderr().lock(), "{text}");
}

// ---------------------------------------------------------------------------------------------
// apply
