//! The supervisor: the one privileged process.
//!
//! It binds every listening socket (one SO_REUSEPORT socket per listener and worker slot, kept
//! for the supervisor's whole life so that a respawned worker gets the same accept queue),
//! creates the command socket (mode 0600 from the start), spawns the jailed workers and then
//! runs one mio loop over: the command socket and its clients, each worker's channel and stderr,
//! and signals (signalfd). It holds the authoritative state: a request is validated and applied
//! here first, then sent to every worker, and answered when every worker acknowledged it.

mod clients;
mod dispatch;
mod fanout;
mod keys;
mod metrics;
mod prometheus;
mod query;
mod rejail;
mod resources;
mod start;
mod statsd;
mod upgrade;
mod workers;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use rampart_command::channel::{Channel, ChannelError};
use rampart_command::config::Config;
use rampart_command::framing::{FrameError, FrameReader, decode_request, encode_frame};
use rampart_command::keyfile::KeyFile;
use rampart_command::kinds::Handler;
use rampart_command::proto::{
    self, SupervisorToKeyring, SupervisorToWorker, WorkerToSupervisor, request::Kind,
    supervisor_to_keyring as to_keyring, supervisor_to_worker as to_worker, worker_to_supervisor,
};
use rampart_command::state::{State, certificate_fingerprint};
use rampart_policy::profile::{ConnectRule, Profile, ProfileOptions, WorkerJailParams};
use rampart_worker::{CHANNEL_FD, WorkerLaunch};

use crate::audit::{Auditor, Completion};
use crate::log::Log;
use keys::{check_key, visit_certificates};
use rampart_audit::Outcome;
use rampart_audit::record::{ProcessOutcome, ProcessResult};
use resources::{bind_listener, command_socket, write_private_file};

const COMMAND: Token = Token(0);
const SIGNALS: Token = Token(1);
/// The handover channel to the new supervisor, during an upgrade.
const UPGRADE: Token = Token(2);
const WORKER_BASE: usize = 100;
const CLIENT_BASE: usize = 100_000;
/// How long a request waits for every worker's acknowledgement.
const WORKER_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// More time per request of a large batch: a worker applying 100,000 frontends is slow, not stuck.
const WORKER_ACK_PER_THOUSAND: Duration = Duration::from_millis(200);

/// How long the processes have to acknowledge `request`.
fn ack_timeout(request: &proto::Request) -> Duration {
    let requests = match &request.kind {
        Some(Kind::Apply(batch)) => batch.requests.len(),
        _ => 1,
    };
    WORKER_ACK_TIMEOUT + WORKER_ACK_PER_THOUSAND * u32::try_from(requests / 1000).unwrap_or(u32::MAX)
}
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] rampart_command::config::ConfigError),
    #[error("metrics.statsd: {0}")]
    Statsd(String),
    #[error("cannot bind listener {address}: {source}")]
    Bind { address: String, source: nix::Error },
    #[error("cannot create the command socket {}: {source}", path.display())]
    CommandSocket { path: PathBuf, source: io::Error },
    #[error("another rampart is already listening on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error(
        "listener {address} is taken: {local} is already listened on by {holder}; a second instance on one address \
         would silently split its traffic: stop the other one, choose another address, or set `share_listeners = true` \
         to share it on purpose"
    )]
    ListenerTaken {
        address: String,
        local: String,
        holder: String,
    },
    #[error(
        "cannot check who else listens on {address}: {source}; mount /proc, or set `share_listeners = true` to skip \
         the check"
    )]
    ListenerCheck { address: String, source: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(nix::Error),
    #[error("cannot create the event loop: {0}")]
    Poll(io::Error),
    #[error("cannot open the rampart binary through /proc/self/exe: {0}")]
    SelfExe(io::Error),
    #[error("--sandbox-off is refused: the configuration requires the sandbox (sandbox.require_landlock = true)")]
    SandboxRequired,
    #[error("invalid certificate in the configuration: {0}")]
    Certificate(String),
    #[error("the audit log cannot be opened: {0}")]
    Audit(crate::audit::AuditorError),
    #[error("cannot create {}: {source}", path.display())]
    Directory { path: PathBuf, source: io::Error },
    #[error("the upgrade handover failed: {0}")]
    Handover(upgrade::HandoverError),
    #[error("the supervisor cannot narrow its own privileges: {0}")]
    Narrow(rampart_sandbox::JailError),
    #[error("the saved state {} cannot be loaded: {reason}; move it away to start from the configuration file", path.display())]
    SavedState { path: PathBuf, reason: String },
    #[error("cannot make a TLS session ticket key: the kernel's random source failed: {0}")]
    Random(getrandom::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Starting,
    Running,
    Stopping,
    Dead,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Stopping => "stopping",
            RunState::Dead => "dead",
        }
    }
}

/// A message the supervisor sends the process of a slot, in the type of its link.
enum Outgoing {
    Worker(SupervisorToWorker),
    Keyring(SupervisorToKeyring),
}

fn to_worker(kind: to_worker::Kind) -> Outgoing {
    Outgoing::Worker(SupervisorToWorker { kind: Some(kind) })
}

fn to_keyring(kind: to_keyring::Kind) -> Outgoing {
    Outgoing::Keyring(SupervisorToKeyring { kind: Some(kind) })
}

struct WorkerSlot {
    id: u32,
    pid: Option<Pid>,
    channel: Option<Channel>,
    stderr: Option<std::fs::File>,
    stderr_buf: Vec<u8>,
    outbox: VecDeque<(Outgoing, Option<RawFd>, Option<OwnedFd>)>,
    run_state: RunState,
    keyring: bool,
    jail: Option<proto::JailReport>,
    started: Instant,
    respawn_at: Option<Instant>,
    backoff: Duration,
    /// Deaths since it last lived more than 10 s.
    quick_deaths: u32,
}

/// Deaths in a row respawned without delay before the backoff starts.
const QUICK_RESPAWNS: u32 = 3;

use rampart_policy::access::Peer;

struct Client {
    stream: UnixStream,
    peer: Peer,
    reader: FrameReader,
    out: Vec<u8>,
    closing: bool,
    last_active: Instant,
    idle_timeout: Duration,
    serial: u64,
    /// In the queue of clients with input to serve.
    queued: bool,
    /// Holds the admin role's reserved connection (not counted against its uid's limit).
    reserved: bool,
    /// Not read while its answers pile up unread (see [`MAX_CLIENT_BACKLOG`]).
    stalled: bool,
}

/// Bytes of answers a client may leave unread before the supervisor stops reading its
/// requests: a client that sends without reading cannot make the supervisor buffer forever.
const MAX_CLIENT_BACKLOG: usize = 1024 * 1024;

/// Frames a client may have handled per turn before the others get theirs.
const FRAMES_PER_TURN: usize = 1;

/// A state change the supervisor applied and sent to every process, waiting for their answers.
struct Pending {
    client: usize,
    /// The client connection's serial: a slab key is reused after a disconnect, and an answer
    /// must never reach the connection that took the key over.
    serial: u64,
    peer: Peer,
    request: proto::Request,
    received_seq: u64,
    state_before: String,
    state_after: String,
    /// Slot id and pid of every process that has not answered yet.
    waiting: BTreeMap<u32, i32>,
    results: Vec<ProcessOutcome>,
    deadline: Instant,
    message: String,
    content: Option<proto::response::Content>,
}

/// A worker replaced by a new one in its slot, draining its connections until it exits or its
/// deadline passes (then it is killed). Its channel stays open: a worker whose channel closes
/// takes the supervisor for gone and exits at once, dropping its connections.
struct Retiring {
    id: u32,
    pid: Pid,
    /// Not watched while it drains; what it said (how its drain ended) is read when it exits.
    channel: Channel,
    _stderr: Option<std::fs::File>,
    deadline: Instant,
}

pub struct Supervisor {
    config: Config,
    state: State,
    poll: Poll,
    command: UnixListener,
    command_path: PathBuf,
    signals: SignalFd,
    self_exe: OwnedFd,
    launch: WorkerLaunch,
    worker_uid: Option<u32>,
    workers: Vec<WorkerSlot>,
    /// Listening sockets by address, one per worker slot.
    listeners: BTreeMap<String, Vec<OwnedFd>>,
    clients: slab::Slab<Client>,
    /// Clients that may have more input, served round-robin (a client pipelining requests
    /// cannot hold the loop).
    ready_clients: VecDeque<usize>,
    pending: HashMap<u64, Pending>,
    next_sequence: u64,
    log: Log,
    audit: Auditor,
    stop_deadline: Option<Instant>,
    /// Listeners bound by the last change, to hand to the workers once they have the change.
    fresh_listeners: Vec<String>,
    /// The TLS session ticket key all workers share, and when it was made.
    ticket_key: Vec<u8>,
    ticket_key_made: Instant,
    /// Under key isolation, the private keys by certificate fingerprint, each in a memory file
    /// the supervisor does not map: the state holds certificates without keys.
    vault: BTreeMap<String, KeyFile>,
    /// The fingerprints whose keys the running keyring was given.
    keyring_keys: BTreeSet<String>,
    /// `state.hash_hex()`, computed once per change (it reads the whole state).
    state_hash: String,
    /// Workers replaced in their slot, draining.
    retiring: Vec<Retiring>,
    /// The workers' figures, merged.
    metrics: metrics::MetricsStore,
    /// `GET /metrics`, when `metrics.prometheus` is set.
    prometheus: Option<prometheus::Exporter>,
    /// Where statsd lines go, when set (configuration or `configure_metrics`).
    statsd: Option<statsd::Statsd>,
    /// Where every acknowledged change is saved, when configured.
    saved_state: Option<PathBuf>,
    /// What the supervisor's own narrowing holds (see `start::narrow`).
    supervisor_jail: proto::JailReport,
    /// Where its landlock rules let it write, for error messages.
    landlock_paths: Vec<String>,
    /// The binary at its path on disk: what an upgrade starts.
    binary_path: PathBuf,
    /// An upgrade this supervisor started, until the new one confirms or fails.
    upgrade: Option<upgrade::OldSide>,
    /// A supervisor started by a handover, until it confirms.
    handover: Option<upgrade::NewSide>,
    /// The new generation serves: this one only drains.
    handed_over: bool,
    /// Set to end the loop with this code.
    exit_code: Option<i32>,
    notifier: crate::notify::Notifier,
    /// `READY=1` was sent.
    ready_notified: bool,
    /// Workers being replaced with wider landlock rules for a backend change that waits.
    rejail: Option<rejail::Rejail>,
}

/// How long a session ticket key is used before a new one replaces it.
const TICKET_KEY_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A new session ticket key (key name, HMAC key, AES key) from the kernel's random source. A
/// failure is an error: a predictable ticket key would let anyone decrypt resumed sessions.
fn new_ticket_key() -> Result<Vec<u8>, getrandom::Error> {
    let mut key = vec![0u8; 48];
    getrandom::fill(&mut key)?;
    Ok(key)
}

impl Supervisor {
    /// Runs until stopped. Returns the process exit code.
    pub fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(256);
        loop {
            // Clients with input left are served without waiting for new events.
            let timeout = if self.ready_clients.is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                self.log.error(&format!("event loop failed: {e}"));
                return 1;
            }
            let tokens: Vec<(Token, bool, bool)> = events
                .iter()
                .map(|e| (e.token(), e.is_readable() || e.is_read_closed(), e.is_writable()))
                .collect();
            for (token, readable, writable) in tokens {
                match token {
                    COMMAND => self.accept_clients(),
                    prometheus::PROMETHEUS => self.prometheus_accept(),
                    Token(t) if (prometheus::SCRAPE_BASE..WORKER_BASE).contains(&t) => {
                        self.prometheus_event(t - prometheus::SCRAPE_BASE)
                    }
                    UPGRADE => self.upgrade_message(),
                    SIGNALS => {
                        if let Some(code) = self.handle_signals() {
                            return code;
                        }
                    }
                    Token(t) if (WORKER_BASE..CLIENT_BASE).contains(&t) => {
                        let id = ((t - WORKER_BASE) / 2) as u32;
                        if (t - WORKER_BASE).is_multiple_of(2) {
                            if readable {
                                self.worker_messages(id);
                            }
                            if writable {
                                self.flush_worker(id);
                            }
                        } else {
                            self.worker_stderr(id);
                        }
                    }
                    Token(t) if t >= CLIENT_BASE => {
                        let key = t - CLIENT_BASE;
                        if readable {
                            self.queue_client(key);
                        }
                        self.flush_client(key);
                    }
                    _ => {}
                }
            }
            self.serve_clients();
            if let Some(code) = self.tick() {
                return code;
            }
        }
    }

    fn tick(&mut self) -> Option<i32> {
        let now = Instant::now();
        if let Some(code) = self.exit_code {
            return Some(code);
        }
        self.watch_upgrade(None);
        self.prometheus_tick(now);
        if let Some(statsd) = &mut self.statsd {
            let metrics = &self.metrics;
            statsd.tick(now, || metrics.report("", ""));
        }
        self.audit.tick();
        if now.duration_since(self.ticket_key_made) > TICKET_KEY_LIFETIME {
            self.rotate_ticket_key(now);
        }
        // Command connections silent for longer than their idle timeout are closed.
        let idle: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_active) > c.idle_timeout)
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close_client(key);
        }
        // Respawns.
        let due: Vec<u32> = self
            .workers
            .iter()
            .filter(|w| w.run_state == RunState::Dead && w.respawn_at.is_some_and(|t| now >= t))
            .map(|w| w.id)
            .collect();
        if self.stop_deadline.is_none() {
            for id in due {
                self.spawn(id);
            }
        }
        // Replaced workers that drained too long.
        for r in &self.retiring {
            if now >= r.deadline {
                let _ = nix::sys::signal::kill(r.pid, Signal::SIGKILL);
            }
        }
        self.expire_pending(now);
        self.watch_rejail(now);
        if let Some(deadline) = self.stop_deadline {
            // A generation that handed over keeps its keyring until its workers are gone: their
            // handshakes under way still need it.
            if self.handed_over && !self.workers.iter().any(|w| !w.keyring && w.pid.is_some()) {
                for w in self.workers.iter().filter(|w| w.keyring) {
                    if let Some(pid) = w.pid {
                        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    }
                }
            }
            let alive = self.workers.iter().filter(|w| w.pid.is_some()).count() + self.retiring.len();
            if alive == 0 {
                self.log.info("all workers stopped; exiting");
                self.audit.system("supervisor_stop", "all workers stopped");
                self.audit.close();
                let _ = std::fs::remove_file(&self.command_path);
                return Some(0);
            }
            if now >= deadline {
                let pids = self
                    .workers
                    .iter()
                    .filter_map(|w| w.pid)
                    .chain(self.retiring.iter().map(|r| r.pid));
                for pid in pids {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                }
                self.stop_deadline = Some(now + Duration::from_secs(2));
            }
        }
        None
    }

    fn rotate_ticket_key(&mut self, now: Instant) {
        match new_ticket_key() {
            Ok(key) => self.ticket_key = key,
            Err(e) => {
                // The old key stays in use; trying again at the next tick.
                self.log.error(&format!(
                    "TLS session ticket key not rotated: the kernel's random source failed: {e}"
                ));
                return;
            }
        }
        self.ticket_key_made = now;
        for id in self.running_workers() {
            let keys = to_worker(to_worker::Kind::TicketKeys(proto::TicketKeys {
                key: self.ticket_key.clone(),
            }));
            self.send(id, keys, None);
        }
        self.log.info("TLS session ticket key rotated");
    }

    /// The grace period a request asked for (seconds, 0 for the default), else the default:
    /// `timeouts.shutdown_grace` for a stop, `timeouts.upgrade_grace` for an upgrade.
    fn shutdown_grace(&self, asked: u32) -> Duration {
        let seconds = if asked > 0 {
            asked
        } else {
            self.config.timeouts.shutdown_grace
        };
        Duration::from_secs(u64::from(seconds))
    }

    pub(super) fn upgrade_grace(&self, asked: u32) -> Duration {
        let seconds = if asked > 0 {
            asked
        } else {
            self.config.timeouts.upgrade_grace
        };
        Duration::from_secs(u64::from(seconds))
    }

    /// `configure_metrics`: statsd on (to an address, with a prefix) or off, from now on.
    fn configure_metrics(&mut self, m: &proto::MetricsConfig) -> Result<String, String> {
        if !m.enabled {
            return Ok(match self.statsd.take() {
                Some(s) => format!("statsd to {} stopped", s.address),
                None => "statsd was not configured".into(),
            });
        }
        let prefix = if m.prefix.is_empty() {
            rampart_command::config::defaults::STATSD_PREFIX
        } else {
            &m.prefix
        };
        let statsd = statsd::Statsd::open(&m.statsd_address, prefix, m.dogstatsd_tags)?;
        let message = format!(
            "statsd to {} with prefix `{prefix}`{}, every second",
            m.statsd_address,
            if m.dogstatsd_tags { " and DogStatsD tags" } else { "" }
        );
        self.log.info(&message);
        self.statsd = Some(statsd);
        Ok(message)
    }

    /// Starts a soft (draining for `grace`) or hard (`None`) stop. Returns what the stop does,
    /// for the answer or the audit record of whoever asked.
    fn begin_stop(&mut self, grace: Option<Duration>) -> String {
        if self.stop_deadline.is_some() {
            return "already stopping".into();
        }
        let hard = grace.is_none();
        let grace = grace.unwrap_or_default();
        self.log
            .info(&format!("stopping ({})", if hard { "hard" } else { "soft, draining" }));
        self.stop_deadline = Some(Instant::now() + grace + Duration::from_millis(500));
        let kind = if hard {
            Kind::HardStop(proto::Empty {})
        } else {
            Kind::SoftStop(proto::SoftStop {
                grace_seconds: u32::try_from(grace.as_secs()).unwrap_or(u32::MAX),
            })
        };
        let request = proto::Request {
            id: String::new(),
            kind: Some(kind),
        };
        if self.upgrade.is_some() {
            self.abandon_upgrade("the supervisor is stopping");
        }
        self.notifier.send("STOPPING=1");
        for id in 0..self.workers.len() as u32 {
            // After a handover the keyring stays until the workers are gone (see `tick`).
            if self.handed_over && self.workers.get(id as usize).is_some_and(|w| w.keyring) {
                continue;
            }
            self.send_order(id, 0, request.clone());
            if let Some(w) = self.workers.get_mut(id as usize)
                && w.run_state == RunState::Running
            {
                w.run_state = RunState::Stopping;
            }
        }
        if hard {
            "hard stop: exiting now".into()
        } else {
            format!("soft stop: draining for at most {} s, then exiting", grace.as_secs())
        }
    }

    /// Signals, each audited with its sender (uid and pid from signalfd): a reviewer can tell
    /// who stopped rampart from the trail alone.
    fn handle_signals(&mut self) -> Option<i32> {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            let outcome = match signal {
                Signal::SIGCHLD => {
                    self.reap();
                    continue;
                }
                // TERM/INT: drain for at most the grace period, then kill; QUIT: the same soft stop.
                Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => self.begin_stop(Some(self.shutdown_grace(0))),
                Signal::SIGHUP => {
                    self.log.reopen();
                    self.log.info("log reopened (SIGHUP)");
                    "log file reopened".to_string()
                }
                Signal::SIGUSR2 => match self.audit.rotate() {
                    Ok(message) => {
                        self.log.info(&message);
                        message
                    }
                    Err(e) => {
                        let message = format!("audit log rotation failed: {e}");
                        self.log.error(&message);
                        message
                    }
                },
                _ => continue,
            };
            self.log.info(&format!(
                "{} from uid {} pid {}: {outcome}",
                signal.as_str(),
                info.ssi_uid,
                info.ssi_pid
            ));
            self.audit
                .signal(info.ssi_uid, info.ssi_pid as i32, signal.as_str(), &outcome);
        }
        None
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.command_path);
    }
}
