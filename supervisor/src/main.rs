//! `rampart`: one binary, four roles. Each process's privileges, at its door:
//!
//! - **supervisor** (`rampart start`, [`server`]): starts as root (or with
//!   CAP_NET_BIND_SERVICE). It reads the configuration, the certificates and keys, opens the
//!   audit log, binds every listener and the command socket, then narrows itself
//!   ([`rampart_policy::supervisor`]): seven capabilities kept, landlock to its own directories
//!   and binary. It holds the authoritative state, authorizes and records every request, and
//!   starts, verifies, replaces and respawns the other processes.
//! - **worker** (`rampart worker`, [`rampart_worker::run`]): started by the supervisor with an
//!   empty environment and one descriptor, its channel. Before it reads a byte it drops to
//!   `worker_user` with no capability, and enters landlock (no file, no bind, connect to backend
//!   ports only) and a seccomp allow-list. It proxies the traffic of the listening sockets it is
//!   handed; it holds no private key under key isolation.
//! - **keyring** (`rampart keyring`, [`rampart_worker::keyring::run`]): jailed like a worker but
//!   with no network system call at all; holds the private keys and signs for the workers.
//! - **client** (every other subcommand, [`cli`]): an ordinary peer of the command socket,
//!   authorized by the supervisor's access policy like any other; `audit`, `config`, `policy` and
//!   `sandbox` work offline.
//!
//! Exit codes: [`Exit`].

mod args;
mod audit;
mod cli;
mod log;
mod notify;
mod server;
mod wipe;

use std::path::PathBuf;
use std::process::ExitCode;

use args::{Cli, Command, ConfigAction, PolicyAction, SandboxAction};
use clap::Parser;
use rampart_command::config::Config;
use rampart_policy::profile::{Profile, ProfileOptions};

#[global_allocator]
static ALLOCATOR: wipe::WipingAllocator = wipe::WipingAllocator;

/// The exit codes of every role of the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Success = 0,
    /// The supervisor refused a request, a check found a problem, or the supervisor could not
    /// start.
    Failed = 1,
    /// Unusable input: a configuration or launch parameters that do not parse, an unreadable
    /// file, no connection to the command socket.
    BadInput = 2,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

pub(crate) const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("RAMPART_GIT_REVISION"), ")");

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Worker { .. }) {
        // Every process but a worker may hold a private key at some point.
        wipe::enable();
    }
    let (config, json) = (cli.config, cli.json);
    match cli.command {
        Command::Start {
            sandbox_off,
            handover_fd,
        } => start(config, sandbox_off, handover_fd),
        Command::Worker { channel_fd, launch } => worker(channel_fd, &launch, false),
        Command::Keyring { channel_fd, launch } => worker(channel_fd, &launch, true),
        Command::Audit { command } => rampart_audit::cli::run(command),
        Command::Config {
            action: ConfigAction::Check,
        } => config_check(config, json),
        Command::Policy {
            action: PolicyAction::Show { keyring, supervisor },
        } => policy_show(config, json, keyring, supervisor),
        Command::Sandbox {
            action: SandboxAction::Check,
        } => sandbox_check(config, json),
        Command::Client(command) => {
            let socket = match cli.socket {
                Some(s) => s,
                None => match load_config(&config) {
                    Ok(c) => c.command_socket,
                    Err(code) => return code,
                },
            };
            cli::run(command, &socket, json)
        }
    }
}

fn start(path: Option<PathBuf>, sandbox_off: bool, handover_fd: Option<i32>) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut log = log::Log::new(&config.log_target, &config.log_level);
    raise_nofile(&mut log);
    // SAFETY: the supervisor that started this one for an upgrade put the handover channel at
    // this descriptor, for this process alone.
    let handover = handover_fd.map(|fd| {
        rampart_command::channel::Channel::from(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        })
    });
    let mut supervisor = match server::Supervisor::start(config, sandbox_off, log, handover) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Failed.into();
        }
    };
    ExitCode::from(u8::try_from(supervisor.run()).unwrap_or(Exit::Failed as u8))
}

/// The supervisor holds a descriptor per listener and worker slot, per command connection, and
/// one per private key under key isolation: thousands of certificates need more than the usual
/// soft limit of 1024. The soft limit goes up to the hard one (workers set their own in the jail).
fn raise_nofile(log: &mut log::Log) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // Some containers set the hard limit near 2^30; a million is plenty.
    let target = hard.min(1 << 20);
    if soft < target {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => log.info(&format!("open-file limit raised from {soft} to {target}")),
            Err(e) => log.warn(&format!(
                "open-file limit stays at {soft} (raising it to {target} failed: {e})"
            )),
        }
    }
}

fn worker(channel_fd: i32, launch: &str, keyring: bool) -> ExitCode {
    let launch: rampart_worker::WorkerLaunch = match serde_json::from_str(launch) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rampart worker: bad launch parameters: {e}");
            return Exit::BadInput.into();
        }
    };
    let code = if keyring {
        rampart_worker::keyring::run(channel_fd, launch)
    } else {
        rampart_worker::run(channel_fd, launch)
    };
    ExitCode::from(u8::try_from(code).unwrap_or(Exit::Failed as u8))
}

fn load_config(path: &Option<PathBuf>) -> Result<Config, ExitCode> {
    let config = match path {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    };
    config.map_err(|e| {
        eprintln!("error: {e}");
        Exit::BadInput.into()
    })
}

fn policy_show(path: Option<PathBuf>, json: bool, keyring: bool, supervisor: bool) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if supervisor {
        let binary = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("rampart"));
        let profile = rampart_policy::supervisor::SupervisorProfile::from_config(&config, &binary);
        if json {
            let value = serde_json::json!({
                "capabilities": profile.capabilities.iter().map(|c| serde_json::json!({"name": c.name, "reason": c.reason})).collect::<Vec<_>>(),
                "paths": profile.paths.iter().map(|p| serde_json::json!({"path": p.path, "access": p.access.name(), "reason": p.reason})).collect::<Vec<_>>(),
                "require_landlock": profile.require_landlock,
            });
            println!("{value:#}");
        } else {
            print!("{}", profile.to_text());
        }
        return Exit::Success.into();
    }
    let profile = if keyring {
        let params = rampart_policy::profile::WorkerJailParams::from_config(&config, ProfileOptions::default());
        Profile::keyring(&params)
    } else {
        Profile::worker(&config, ProfileOptions::default())
    };
    if json {
        println!("{}", profile.to_json());
    } else if keyring {
        let text = profile.to_text();
        println!("keyring sandbox profile (holds the private keys; no network)");
        print!("{}", text.split_once('\n').map_or(text.as_str(), |(_, rest)| rest));
    } else {
        print!("{}", profile.to_text());
    }
    Exit::Success.into()
}

fn sandbox_check(path: Option<PathBuf>, json: bool) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let profile = Profile::worker(&config, ProfileOptions::default());
    let abi = rampart_sandbox::landlock_abi();
    // Try the best this kernel can do, then judge it against what the configuration requires.
    let mut trial_profile = profile.clone();
    trial_profile.landlock.required = false;
    let trial = rampart_sandbox::probe::trial(&trial_profile);
    let mut missing = Vec::new();
    match &trial {
        Ok(report) => {
            if profile.landlock.required && report.landlock_status != rampart_sandbox::LandlockStatus::FullyEnforced {
                missing.push(format!(
                    "landlock is required (require_landlock = true) but only {} (kernel ABI {abi})",
                    report.landlock_status.as_str()
                ));
            }
        }
        Err(e) => missing.push(format!("the jail cannot be entered: {e}")),
    }
    if json {
        let value = serde_json::json!({
            "landlock_abi": abi,
            "report": trial.as_ref().ok(),
            "missing": missing,
        });
        println!("{value}");
    } else if let Ok(r) = &trial {
        println!(
            "landlock:     ABI {abi}, {}",
            r.landlock_status.as_str().replace('_', " ")
        );
        println!(
            "seccomp:      {}, {} system calls, {} BPF instructions",
            r.seccomp_mode, r.seccomp_rules, r.seccomp_instructions
        );
        if r.privileged_start {
            println!(
                "privileges:   dropped to uid {} gid {}; capabilities eff {:x} prm {:x} bnd {:x} amb {:x}",
                r.uid, r.gid, r.cap_effective, r.cap_permitted, r.cap_bounding, r.cap_ambient
            );
        } else {
            println!("privileges:   started unprivileged (uid {}): nothing to drop", r.uid);
        }
        println!(
            "process:      no_new_privs {}, dumpable {}",
            if r.no_new_privs { "on" } else { "OFF" },
            if r.dumpable { "YES" } else { "no" }
        );
        for note in &r.notes {
            println!("note:         {note}");
        }
    }
    for m in &missing {
        eprintln!("missing: {m}");
    }
    if missing.is_empty() {
        Exit::Success.into()
    } else {
        Exit::Failed.into()
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
            Exit::Success.into()
        }
        Err(e) => {
            eprintln!("error: {e}");
            Exit::Failed.into()
        }
    }
}
