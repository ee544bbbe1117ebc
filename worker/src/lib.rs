//! The worker: a single-threaded event loop proxying client connections to backends, entered
//! only after the jail holds.
//!
//! `run` is the worker's whole life, and its first lines are the jail: the worker builds its
//! sandbox profile from the values on its command line, creates what it will need (the event
//! loop, BoringSSL's one-time state) and enters the jail before it reads a single byte from its
//! channel. From then on everything arrives over the channel: the configuration as the same
//! validated requests the supervisor applied, and listening sockets as descriptors.
//!
//! The worker never opens a file, binds a port or talks to the audit trail; it never panics on
//! a peer's bytes (a panic is a bug and ends in SIGABRT).
//!
//! The rooms: [`event_loop`] (the loop, the worker's state, draining), [`channel`] (orders from
//! the supervisor, the keyring link), [`listeners`] (listening sockets and accepting),
//! [`tokens`] (which session owns which socket), [`backend`] (backends by id, connecting, the
//! idle connection pool), [`pipe`] (the one byte pipe), [`h1`] (HTTP/1.1), [`tcp`] (TCP
//! listeners), [`tls`] and [`keyring`] (handshakes, signatures by the keyring), and [`record`]
//! (one record per finished request: where access logs and metrics attach). HTTP/2 will live
//! under `h2/`, beside `h1/`, using the same tokens, backends and records.

pub mod answers;
pub mod backend;
pub mod channel;
pub mod event_loop;
pub mod h1;
pub mod keyring;
pub mod listeners;
pub mod pipe;
pub mod pool;
pub mod record;
pub mod router;
pub mod tcp;
pub mod tls;
pub mod tokens;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use mio::Poll;
use rampart_command::channel::Channel;
use rampart_command::proto::{self, WorkerToSupervisor, worker_to_supervisor as to_supervisor};
use rampart_policy::profile::{Profile, WorkerJailParams};
use rampart_sandbox::{Jail, JailSetup};
use serde::{Deserialize, Serialize};

pub use crate::event_loop::Timeouts;
pub use crate::listeners::{ListenerInfo, ListenerTimeouts};

/// The descriptor number of the channel in a worker.
pub const CHANNEL_FD: RawFd = 3;

/// What the supervisor passes on a worker's command line (as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerLaunch {
    pub id: u32,
    pub jail: WorkerJailParams,
    pub buffer_size: u32,
    pub max_connections: u32,
    /// Seconds.
    pub client_idle_timeout: u32,
    pub request_timeout: u32,
    pub backend_connect_timeout: u32,
    pub backend_response_timeout: u32,
    pub shutdown_grace: u32,
    /// Seconds for a client to complete its TLS handshake.
    #[serde(default = "default_tls_handshake_timeout")]
    pub tls_handshake_timeout: u32,
    /// Certificates arrive without their keys; the keyring signs.
    #[serde(default)]
    pub key_isolation: bool,
    /// Test hook: refuse a live order (sequence > 0) that adds this cluster. Set only from the
    /// supervisor's test-only environment variable; a production supervisor never sets it.
    #[serde(default)]
    pub refuse_cluster: Option<String>,
    /// Metric series (listener, cluster, backend) a worker keeps at most (`metrics.max_series`).
    #[serde(default = "default_max_series")]
    pub max_series: u32,
}

fn default_max_series() -> u32 {
    rampart_command::config::defaults::METRICS_MAX_SERIES
}

fn default_tls_handshake_timeout() -> u32 {
    rampart_command::config::defaults::TLS_HANDSHAKE_TIMEOUT
}

/// Log levels on the channel.
pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;

/// The report a jailed process sends the supervisor.
pub fn jail_report(report: &rampart_sandbox::JailReport) -> proto::JailReport {
    proto::JailReport {
        uid: report.uid,
        gid: report.gid,
        privileged_start: report.privileged_start,
        cap_effective: report.cap_effective,
        cap_permitted: report.cap_permitted,
        cap_bounding: report.cap_bounding,
        cap_ambient: report.cap_ambient,
        no_new_privs: report.no_new_privs,
        landlock_abi: report.landlock_abi,
        landlock_status: report.landlock_status.as_str().into(),
        seccomp_mode: report.seccomp_mode.clone(),
        seccomp_rules: u32::try_from(report.seccomp_rules).unwrap_or(u32::MAX),
        notes: report.notes.clone(),
        ..Default::default()
    }
}

/// The worker's whole life. Returns the process exit code.
/// The door of every jailed process (worker and keyring): a panic hook that aborts, the
/// channel made non-blocking (fcntl is forbidden inside), the event loop and BoringSSL's
/// one-time state created, the jail entered, and its report sent to the supervisor. Returns
/// the channel and the event loop, or the exit code.
pub(crate) fn enter_jail(
    channel_fd: RawFd,
    profile: &Profile,
    who: &str,
    panic_message: &'static str,
    notes: Vec<String>,
) -> Result<(Channel, Poll), i32> {
    rampart_sandbox::install_panic_hook(panic_message);
    // SAFETY: the supervisor placed the channel at this descriptor for this process alone.
    let channel = Channel::from(unsafe { OwnedFd::from_raw_fd(channel_fd) });
    if channel.set_nonblocking(true).is_err() {
        return Err(5);
    }
    let mut poll = None;
    let mut prewarm = || {
        poll = Some(Poll::new().map_err(|e| format!("creating the event loop: {e}"))?);
        // BoringSSL's one-time initialisation needs system calls the jail forbids.
        boring::ssl::SslContext::builder(boring::ssl::SslMethod::tls()).map_err(|e| e.to_string())?;
        Ok(())
    };
    let keep = [channel.as_raw_fd()];
    let entered = Jail::enter(
        profile,
        JailSetup {
            keep_fds: &keep,
            prewarm: &mut prewarm,
        },
    );
    let mut report = match entered {
        Ok(r) => r,
        Err(e) => {
            let line = proto::LogLine {
                level: LOG_ERROR,
                target: "jail".into(),
                message: format!("{who} could not enter its jail: {e}"),
            };
            let _ = channel.send(
                &WorkerToSupervisor {
                    kind: Some(to_supervisor::Kind::Log(line)),
                },
                &[],
            );
            return Err(3);
        }
    };
    let Some(poll) = poll else { return Err(3) };
    report.notes.extend(notes);
    let mut jail = jail_report(&report);
    match &profile.landlock.tcp_connect {
        rampart_policy::profile::ConnectRule::Ports(ports) => {
            jail.connect_ports = ports.iter().map(|p| u32::from(*p)).collect()
        }
        rampart_policy::profile::ConnectRule::AnyPort => jail.connect_any_port = true,
    }
    let message = WorkerToSupervisor {
        kind: Some(to_supervisor::Kind::JailReport(jail)),
    };
    if channel.send(&message, &[]).is_err() {
        return Err(4);
    }
    Ok((channel, poll))
}

pub fn run(channel_fd: RawFd, launch: WorkerLaunch) -> i32 {
    let profile = Profile::from_params(&launch.jail);
    let who = format!("worker {}", launch.id);
    let (channel, poll) = match enter_jail(
        channel_fd,
        &profile,
        &who,
        "rampart worker: panic (a bug); aborting\n",
        Vec::new(),
    ) {
        Ok(entered) => entered,
        Err(code) => return code,
    };
    event_loop::Worker::new(&launch, channel, poll).event_loop()
}
