//! The supervisor: the one privileged process.
//!
//! It binds every listening socket (one SO_REUSEPORT socket per listener and worker slot, kept
//! for the supervisor's whole life so that a respawned worker gets the same accept queue),
//! creates the command socket (mode 0600 from the start), spawns the jailed workers and then
//! runs one mio loop over: the command socket and its clients, each worker's channel and stderr,
//! and signals (signalfd). It holds the authoritative state: a request is validated and applied
//! here first, then sent to every worker, and answered when every worker acknowledged it.

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
use rampart_command::proto::{self, ChannelMessage, channel_message::Kind as ChannelKind, request::Kind};
use rampart_command::state::{State, certificate_fingerprint, is_state_change};
use rampart_policy::profile::{ConnectRule, Profile, ProfileOptions, WorkerJailParams};
use rampart_worker::{CHANNEL_FD, WorkerLaunch};

use crate::audit::Auditor;
use crate::log::Log;

const COMMAND: Token = Token(0);
const SIGNALS: Token = Token(1);
const WORKER_BASE: usize = 100;
const CLIENT_BASE: usize = 100_000;
/// How long a request waits for every worker's acknowledgement.
const WORKER_ACK_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Seconds since the epoch at which a PEM certificate expires.
fn not_after(pem: &str) -> Option<i64> {
    let cert = boring::x509::X509::from_pem(pem.as_bytes()).ok()?;
    let epoch = boring::asn1::Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(cert.not_after()).ok()?;
    Some(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

/// Checks what the state cannot (it has no TLS library): the key is RSA of 2048 bits or more,
/// or ECDSA on P-256 or P-384, and it matches the certificate.
fn check_key(c: &proto::Certificate) -> Result<(), String> {
    use boring::nid::Nid;
    use boring::pkey::Id;
    let cert = boring::x509::X509::from_pem(c.certificate.as_bytes())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let key = boring::pkey::PKey::private_key_from_pem(c.key.as_bytes())
        .map_err(|e| format!("the key does not parse: {e}"))?;
    match key.id() {
        Id::RSA if key.bits() >= 2048 => {}
        Id::RSA => return Err(format!("RSA keys need 2048 bits or more; this one has {}", key.bits())),
        Id::EC => {
            let curve = key.ec_key().ok().and_then(|k| k.group().curve_name());
            if !matches!(curve, Some(Nid::X9_62_PRIME256V1 | Nid::SECP384R1)) {
                return Err("ECDSA keys must be on P-256 or P-384".into());
            }
        }
        _ => return Err("use an RSA (2048 bits or more) or ECDSA (P-256, P-384) key".into()),
    }
    let public = cert.public_key().map_err(|e| e.to_string())?;
    if !public.public_eq(&key) {
        return Err("the key does not match the certificate".into());
    }
    Ok(())
}

/// Calls `f` on every certificate a request adds.
fn visit_certificates(request: &mut proto::Request, f: &mut impl FnMut(&mut proto::Certificate)) {
    match &mut request.kind {
        Some(Kind::AddCertificate(c)) => f(c),
        Some(Kind::ReplaceCertificate(r)) => {
            if let Some(c) = &mut r.new_certificate {
                f(c);
            }
        }
        Some(Kind::Apply(batch)) => {
            for r in &mut batch.requests {
                visit_certificates(r, f);
            }
        }
        _ => {}
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] rampart_command::config::ConfigError),
    #[error("cannot bind listener {address}: {source}")]
    Bind { address: String, source: nix::Error },
    #[error("cannot create the command socket {}: {source}", path.display())]
    CommandSocket { path: PathBuf, source: io::Error },
    #[error("another rampart is already listening on {}", .0.display())]
    AlreadyRunning(PathBuf),
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
    Audit(String),
    #[error("cannot create {}: {source}", path.display())]
    Directory { path: PathBuf, source: io::Error },
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

struct WorkerSlot {
    id: u32,
    pid: Option<Pid>,
    channel: Option<Channel>,
    stderr: Option<std::fs::File>,
    stderr_buf: Vec<u8>,
    outbox: VecDeque<(ChannelMessage, Option<RawFd>, Option<OwnedFd>)>,
    run_state: RunState,
    keyring: bool,
    jail: Option<proto::JailReport>,
    started: Instant,
    respawn_at: Option<Instant>,
    backoff: Duration,
}

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
}

struct Pending {
    client: usize,
    /// The client connection's serial: a slab key is reused after a disconnect, and an answer
    /// must never reach the connection that took the key over.
    serial: u64,
    request_id: String,
    waiting: HashSet<u32>,
    deadline: Instant,
    message: String,
    failures: Vec<String>,
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
}

/// How long a session ticket key is used before a new one replaces it.
const TICKET_KEY_LIFETIME: Duration = Duration::from_secs(12 * 3600);

fn new_ticket_key() -> Vec<u8> {
    let mut key = vec![0u8; 48];
    // SAFETY: getrandom writes at most key.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
    if n != 48 {
        // Never seen on Linux for 48 bytes; fall back to the OS random file.
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = f.read_exact(&mut key);
        }
    }
    key
}

/// Writes a file only its owner can read (a saved state holds private keys).
fn write_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn bind_listener(address: &str) -> Result<OwnedFd, StartError> {
    let bind_error = |source| StartError::Bind {
        address: address.to_string(),
        source,
    };
    let addr: std::net::SocketAddr = address.parse().map_err(|_| bind_error(nix::Error::EINVAL))?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(bind_error)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(bind_error)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(bind_error)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(bind_error)?;
    }
    let storage = SockaddrStorage::from(addr);
    socket::bind(fd.as_raw_fd(), &storage).map_err(bind_error)?;
    socket::listen(&fd, socket::Backlog::new(1024).unwrap_or(socket::Backlog::MAXCONN)).map_err(bind_error)?;
    Ok(fd)
}

/// Creates the command socket with mode 0600 from the first instant (umask during bind). With
/// an access policy file, other users must be able to connect (the policy decides what they
/// may do), so the socket is then made 0666 once bound.
fn command_socket(path: &Path, open_to_all: bool) -> Result<UnixListener, StartError> {
    let err = |source| StartError::CommandSocket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(err)?;
    if open_to_all {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    }
    Ok(listener)
}

fn signal_name(signal: Signal) -> String {
    match signal {
        Signal::SIGSYS => "SIGSYS (sandbox violation: a forbidden system call)".into(),
        Signal::SIGABRT => "SIGABRT (panic or abort)".into(),
        Signal::SIGKILL => "SIGKILL".into(),
        Signal::SIGSEGV => "SIGSEGV (memory fault)".into(),
        other => format!("{other:?}"),
    }
}

impl Supervisor {
    pub fn start(config: Config, sandbox_off: bool, log: Log) -> Result<Supervisor, StartError> {
        if sandbox_off && config.sandbox.require_landlock {
            return Err(StartError::SandboxRequired);
        }
        let mut state = config.to_state()?;
        for (_, certificate) in state.certificates() {
            check_key(certificate).map_err(StartError::Certificate)?;
        }
        let mut vault = BTreeMap::new();
        if config.key_isolation {
            for (fingerprint, mut key) in state.take_keys() {
                let file = KeyFile::create(&mut key).map_err(|e| {
                    StartError::Certificate(format!(
                        "certificate {fingerprint}: its key cannot be moved to a memory file: {e}"
                    ))
                })?;
                vault.insert(fingerprint, file);
            }
        }

        std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::Directory {
            path: config.state_dir.clone(),
            source,
        })?;
        let audit = Auditor::open(&config).map_err(StartError::Audit)?;
        let self_exe = std::fs::File::open("/proc/self/exe").map_err(StartError::SelfExe)?;
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGHUP,
            Signal::SIGUSR2,
            Signal::SIGCHLD,
            Signal::SIGPIPE,
        ] {
            mask.add(s);
        }
        mask.thread_block().map_err(StartError::Signals)?;
        let signals =
            SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(StartError::Signals)?;
        let poll = Poll::new().map_err(StartError::Poll)?;
        let mut command = command_socket(&config.command_socket, config.access_policy.is_some())?;
        poll.registry()
            .register(&mut command, COMMAND, Interest::READABLE)
            .map_err(StartError::Poll)?;
        poll.registry()
            .register(&mut SourceFd(&signals.as_fd().as_raw_fd()), SIGNALS, Interest::READABLE)
            .map_err(StartError::Poll)?;
        let worker_count = u32::from(config.worker_count);
        let mut listeners = BTreeMap::new();
        for address in state.listeners().keys() {
            let mut fds = Vec::new();
            for _ in 0..worker_count {
                fds.push(bind_listener(address)?);
            }
            listeners.insert(address.clone(), fds);
        }
        let jail = WorkerJailParams::from_config(&config, ProfileOptions { sandbox_off });
        let worker_uid = if nix::unistd::Uid::effective().is_root() && !sandbox_off {
            nix::unistd::User::from_name(&config.worker_user)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw())
        } else {
            None
        };
        let launch = WorkerLaunch {
            id: 0,
            jail,
            buffer_size: config.buffer_size,
            max_connections: config.max_connections,
            client_idle_timeout: config.timeouts.client_idle,
            request_timeout: config.timeouts.request,
            backend_connect_timeout: config.timeouts.backend_connect,
            backend_response_timeout: config.timeouts.backend_response,
            shutdown_grace: config.timeouts.shutdown_grace,
            tls_handshake_timeout: config.timeouts.tls_handshake,
            key_isolation: config.key_isolation,
        };
        // The keyring, when keys are isolated, takes the slot after the workers.
        let slots = worker_count + u32::from(config.key_isolation);
        let workers = (0..slots)
            .map(|id| WorkerSlot {
                keyring: id >= worker_count,
                id,
                pid: None,
                channel: None,
                stderr: None,
                stderr_buf: Vec::new(),
                outbox: VecDeque::new(),
                run_state: RunState::Dead,
                jail: None,
                started: Instant::now(),
                respawn_at: None,
                backoff: Duration::from_millis(100),
            })
            .collect();
        let command_path = config.command_socket.clone();
        let mut supervisor = Supervisor {
            config,
            state,
            poll,
            command,
            command_path,
            signals,
            self_exe: OwnedFd::from(self_exe),
            launch,
            worker_uid,
            workers,
            listeners,
            clients: slab::Slab::new(),
            pending: HashMap::new(),
            next_sequence: 1,
            log,
            audit,
            stop_deadline: None,
            fresh_listeners: Vec::new(),
            ticket_key: new_ticket_key(),
            ticket_key_made: Instant::now(),
            vault,
            keyring_keys: BTreeSet::new(),
            state_hash: String::new(),
        };
        supervisor.state_hash = supervisor.state.hash_hex();
        if let Some(file) = supervisor.vault.values().next() {
            let text = format!(
                "{} private key(s) held for the keyring in {}; none in the supervisor's memory",
                supervisor.vault.len(),
                file.backing().describe()
            );
            supervisor.log.info(&text);
        }
        if sandbox_off {
            supervisor
                .log
                .warn("WORKERS RUN WITHOUT THEIR JAIL (--sandbox-off): for measurements only");
        }
        supervisor.audit.system(
            "supervisor_start",
            &format!("pid {}, state {}", std::process::id(), supervisor.state_hash),
        );
        for id in 0..slots {
            supervisor.spawn(id);
        }
        Ok(supervisor)
    }

    fn spawn(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(id as usize) else {
            return;
        };
        let mut launch = self.launch.clone();
        launch.id = id;
        launch.key_isolation = self.config.key_isolation;
        let Ok(launch_json) = serde_json::to_string(&launch) else {
            return;
        };
        let (ours, theirs) = match Channel::pair() {
            Ok(p) => p,
            Err(e) => {
                self.log.error(&format!("worker {id}: cannot create its channel: {e}"));
                return;
            }
        };
        let (err_read, err_write) =
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
                Ok(p) => p,
                Err(e) => {
                    self.log
                        .error(&format!("worker {id}: cannot create its stderr pipe: {e}"));
                    return;
                }
            };
        let child_fd = theirs.as_raw_fd();
        let exe = format!("/proc/self/fd/{}", self.self_exe.as_raw_fd());
        let mut command = std::process::Command::new(exe);
        command
            .arg0("rampart-worker")
            .args([
                if slot.keyring { "keyring" } else { "worker" },
                "--channel-fd",
                &CHANNEL_FD.to_string(),
                "--launch",
                &launch_json,
            ])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err_write));
        // SAFETY: only async-signal-safe calls between fork and exec: dup2, fcntl and
        // sigprocmask put the channel at fd 3 and give the worker an empty signal mask.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(child_fd, CHANNEL_FD) == -1 || libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.log.error(&format!("worker {id}: spawn failed: {e}"));
                slot.respawn_at = Some(Instant::now() + slot.backoff);
                return;
            }
        };
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        let _ = ours.set_nonblocking(true);
        let token = Token(WORKER_BASE + id as usize * 2);
        let _ = self.poll.registry().register(
            &mut SourceFd(&ours.as_raw_fd()),
            token,
            Interest::READABLE | Interest::WRITABLE,
        );
        let err_file = std::fs::File::from(err_read);
        let _ = self.poll.registry().register(
            &mut SourceFd(&err_file.as_raw_fd()),
            Token(WORKER_BASE + id as usize * 2 + 1),
            Interest::READABLE,
        );
        slot.pid = Some(pid);
        slot.channel = Some(ours);
        slot.stderr = Some(err_file);
        slot.stderr_buf.clear();
        slot.outbox.clear();
        slot.run_state = RunState::Starting;
        slot.jail = None;
        slot.started = Instant::now();
        slot.respawn_at = None;
        self.log.info(&format!("worker {id} spawned (pid {pid})"));
        self.audit.system("worker_spawn", &format!("worker {id} pid {pid}"));
    }

    /// Runs until stopped. Returns the process exit code.
    pub fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(Duration::from_millis(100)))
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
                            self.client_readable(key);
                        }
                        self.flush_client(key);
                    }
                    _ => {}
                }
            }
            if let Some(code) = self.tick() {
                return code;
            }
        }
    }

    fn tick(&mut self) -> Option<i32> {
        let now = Instant::now();
        self.audit.tick();
        if now.duration_since(self.ticket_key_made) > TICKET_KEY_LIFETIME {
            self.ticket_key = new_ticket_key();
            self.ticket_key_made = now;
            for id in self.running_workers() {
                let keys = ChannelMessage {
                    kind: Some(ChannelKind::TicketKeys(proto::TicketKeys {
                        key: self.ticket_key.clone(),
                    })),
                };
                self.send(id, keys, None);
            }
            self.log.info("TLS session ticket key rotated");
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
        // Requests whose workers did not all answer.
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(s, _)| *s)
            .collect();
        for sequence in late {
            if let Some(p) = self.pending.remove(&sequence) {
                let mut missing: Vec<String> = p.waiting.iter().map(|w| format!("worker {w}")).collect();
                missing.sort();
                let message = format!(
                    "{}; but {} did not acknowledge within {}s",
                    p.message,
                    missing.join(", "),
                    WORKER_ACK_TIMEOUT.as_secs()
                );
                if self.client_serial(p.client) == Some(p.serial) {
                    self.respond(p.client, &p.request_id, false, message, None);
                }
            }
            if self.pending.is_empty() {
                self.sync_keyring(true, 0);
            }
        }
        if let Some(deadline) = self.stop_deadline {
            let alive = self.workers.iter().filter(|w| w.pid.is_some()).count();
            if alive == 0 {
                self.log.info("all workers stopped; exiting");
                self.audit.system("supervisor_stop", "all workers stopped");
                self.audit.close();
                let _ = std::fs::remove_file(&self.command_path);
                return Some(0);
            }
            if now >= deadline {
                for w in &self.workers {
                    if let Some(pid) = w.pid {
                        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    }
                }
                self.stop_deadline = Some(now + Duration::from_secs(2));
            }
        }
        None
    }

    fn begin_stop(&mut self, hard: bool) {
        let grace = if hard {
            Duration::from_millis(0)
        } else {
            Duration::from_secs(u64::from(self.config.timeouts.shutdown_grace))
        };
        self.log
            .info(&format!("stopping ({})", if hard { "hard" } else { "soft, draining" }));
        self.stop_deadline = Some(Instant::now() + grace + Duration::from_millis(500));
        let kind = if hard {
            Kind::HardStop(proto::Empty {})
        } else {
            Kind::SoftStop(proto::Empty {})
        };
        let request = proto::Request {
            id: String::new(),
            kind: Some(kind),
        };
        for id in 0..self.workers.len() as u32 {
            self.send_order(id, 0, request.clone());
            if let Some(w) = self.workers.get_mut(id as usize)
                && w.run_state == RunState::Running
            {
                w.run_state = RunState::Stopping;
            }
        }
    }

    fn handle_signals(&mut self) -> Option<i32> {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(),
                // TERM/INT: drain for at most the grace period, then kill; QUIT: the same soft stop.
                Ok(Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT) if self.stop_deadline.is_none() => {
                    self.begin_stop(false);
                }
                Ok(Signal::SIGHUP) => {
                    self.log.reopen();
                    self.log.info("log reopened (SIGHUP)");
                }
                Ok(Signal::SIGUSR2) => match self.audit.rotate() {
                    Ok(message) => self.log.info(&message),
                    Err(e) => self.log.error(&format!("audit log rotation failed: {e}")),
                },
                _ => {}
            }
        }
        None
    }

    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.worker_ended(pid, format!("exited with code {code}"), code == 0)
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    self.worker_ended(pid, format!("killed by signal {}", signal_name(signal)), false)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn worker_ended(&mut self, pid: Pid, how: String, clean: bool) {
        let stopping = self.stop_deadline.is_some();
        let Some(slot) = self.workers.iter_mut().find(|w| w.pid == Some(pid)) else {
            return;
        };
        let id = slot.id;
        if let Some(channel) = slot.channel.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&channel.as_raw_fd()));
        }
        if let Some(err) = slot.stderr.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&err.as_raw_fd()));
        }
        slot.pid = None;
        slot.run_state = RunState::Dead;
        slot.outbox.clear();
        if !stopping {
            // Back off when a worker dies young; a worker that lived a while restarts quickly.
            if slot.started.elapsed() > Duration::from_secs(10) {
                slot.backoff = Duration::from_millis(100);
            }
            slot.respawn_at = Some(Instant::now() + slot.backoff);
            slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
        }
        let message = format!("worker {id} (pid {pid}) {how}");
        if clean || stopping {
            self.log.info(&message);
        } else {
            self.log.error(&format!("{message}; respawning"));
        }
        self.audit
            .system(if clean { "worker_exit" } else { "worker_crash" }, &message);
        // Requests waiting for this worker stop waiting for it.
        let done: Vec<u64> = self
            .pending
            .iter_mut()
            .filter_map(|(s, p)| {
                p.waiting.remove(&id);
                p.waiting.is_empty().then_some(*s)
            })
            .collect();
        for sequence in done {
            self.finish_pending(sequence);
        }
    }

    fn worker_stderr(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(id as usize) else {
            return;
        };
        let Some(err) = &mut slot.stderr else { return };
        let mut buf = [0u8; 4096];
        loop {
            match err.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => slot.stderr_buf.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(_) => break,
            }
        }
        while let Some(nl) = slot.stderr_buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = slot.stderr_buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            self.log.error(&format!("worker {id} stderr: {text}"));
        }
        if slot.stderr_buf.len() > 64 * 1024 {
            slot.stderr_buf.clear();
        }
    }

    fn send(&mut self, id: u32, message: ChannelMessage, fd: Option<RawFd>) {
        if let Some(slot) = self.workers.get_mut(id as usize) {
            slot.outbox.push_back((message, fd, None));
        }
        self.flush_worker(id);
    }

    /// Sends a descriptor the message owns (closed once sent).
    fn send_owned(&mut self, id: u32, message: ChannelMessage, fd: OwnedFd) {
        if let Some(slot) = self.workers.get_mut(id as usize) {
            let raw = fd.as_raw_fd();
            slot.outbox.push_back((message, Some(raw), Some(fd)));
        }
        self.flush_worker(id);
    }

    fn keyring_id(&self) -> Option<u32> {
        self.workers
            .iter()
            .find(|w| w.keyring && w.run_state == RunState::Running)
            .map(|w| w.id)
    }

    /// Gives a worker and the keyring the two ends of a new socketpair.
    fn link_keyring(&mut self, worker: u32) {
        let Some(keyring) = self.keyring_id() else { return };
        let (a, b) = match Channel::pair() {
            Ok(p) => p,
            Err(e) => {
                self.log
                    .error(&format!("worker {worker}: cannot link it to the keyring: {e}"));
                return;
            }
        };
        // Non-blocking from the start: a jailed process cannot change the flag (no fcntl).
        if a.set_nonblocking(true).is_err() || b.set_nonblocking(true).is_err() {
            self.log
                .error(&format!("worker {worker}: cannot make its keyring link non-blocking"));
            return;
        }
        let link = || ChannelMessage {
            kind: Some(ChannelKind::KeyringLink(proto::KeyringLink { worker })),
        };
        self.send_owned(worker, link(), a.into_fd());
        self.send_owned(keyring, link(), b.into_fd());
    }

    /// Gives the running keyring the keys it lacks and, with `forget`, has it forget those no
    /// certificate uses. Called before any order that could need a new key, so that the keyring's
    /// acknowledgement of the order means it holds the key.
    fn sync_keyring(&mut self, forget: bool, sequence: u64) {
        let Some(keyring) = self.keyring_id() else {
            self.keyring_keys.clear();
            return;
        };
        let stale: Vec<String> = if forget {
            self.keyring_keys
                .iter()
                .filter(|fp| !self.vault.contains_key(*fp))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for fingerprint in stale {
            self.keyring_keys.remove(&fingerprint);
            let message = ChannelMessage {
                kind: Some(ChannelKind::KeyForget(proto::KeyForget { fingerprint })),
            };
            self.send(keyring, message, None);
        }
        let missing: Vec<String> = self
            .vault
            .keys()
            .filter(|fp| !self.keyring_keys.contains(*fp))
            .cloned()
            .collect();
        for fingerprint in missing {
            // The message's copies of the key (this one, its encoding, the outbox entry) are
            // wiped when freed, like every block the supervisor frees.
            let key = match self.vault.get(&fingerprint).map(|file| file.with_key(<[u8]>::to_vec)) {
                Some(Ok(key)) => key,
                Some(Err(e)) => {
                    self.log
                        .error(&format!("certificate {fingerprint}: cannot read its key back: {e}"));
                    continue;
                }
                None => continue,
            };
            self.keyring_keys.insert(fingerprint.clone());
            let message = ChannelMessage {
                kind: Some(ChannelKind::KeyMaterial(proto::KeyMaterial {
                    fingerprint,
                    key,
                    sequence,
                })),
            };
            self.send(keyring, message, None);
        }
    }

    /// Drops the keys of certificates the state no longer has (removed, replaced, or never
    /// applied because their request failed).
    fn forget_unused_keys(&mut self) {
        if self.vault.is_empty() {
            return;
        }
        let used: HashSet<&str> = self.state.certificates().map(|(fp, _)| fp).collect();
        self.vault.retain(|fp, _| used.contains(fp.as_str()));
    }

    /// Checks every private key a request carries against its certificate. Under key isolation,
    /// also moves each key into a memory file and wipes it from the request: from here on, the
    /// request, its audit record and the state hold certificates without keys.
    fn take_keys(&mut self, request: &mut proto::Request) -> Result<(), String> {
        let mut first_error = None;
        let isolation = self.config.key_isolation;
        let mut take = |c: &mut proto::Certificate| {
            if c.key.is_empty() {
                // Only a certificate whose key the supervisor already holds may come without it.
                let held =
                    isolation && certificate_fingerprint(&c.certificate).is_ok_and(|fp| self.vault.contains_key(&fp));
                if !held {
                    first_error.get_or_insert("the certificate comes without its private key".into());
                }
                return;
            }
            let checked =
                check_key(c).and_then(|()| certificate_fingerprint(&c.certificate).map_err(|e| e.to_string()));
            match checked {
                Ok(fingerprint) if isolation => match KeyFile::create(&mut c.key) {
                    Ok(file) => {
                        self.vault.insert(fingerprint, file);
                    }
                    Err(e) => {
                        first_error.get_or_insert(format!("its key cannot be moved to a memory file: {e}"));
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    if isolation {
                        zeroize::Zeroize::zeroize(&mut c.key);
                    }
                    first_error.get_or_insert(e);
                }
            }
        };
        visit_certificates(request, &mut take);
        first_error.map_or(Ok(()), Err)
    }

    fn send_order(&mut self, id: u32, sequence: u64, request: proto::Request) {
        let message = ChannelMessage {
            kind: Some(ChannelKind::Order(proto::WorkerOrder {
                sequence,
                request: Some(request),
            })),
        };
        self.send(id, message, None);
    }

    fn flush_worker(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(id as usize) else {
            return;
        };
        let Some(channel) = &slot.channel else { return };
        while let Some((message, fd, _)) = slot.outbox.front() {
            // SAFETY: the descriptor is one of ours (a listener kept in `self.listeners`, alive
            // for as long as the listener exists); it is only borrowed for this send.
            let borrowed: Vec<_> = fd
                .iter()
                .map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) })
                .collect();
            match channel.send(message, &borrowed) {
                Ok(()) => {
                    slot.outbox.pop_front();
                }
                Err(ChannelError::Send(nix::Error::EAGAIN)) => return,
                Err(e) => {
                    let text = format!("worker {id}: channel send failed: {e}");
                    slot.outbox.pop_front();
                    self.log.error(&text);
                    return;
                }
            }
        }
    }

    fn worker_messages(&mut self, id: u32) {
        loop {
            let Some(slot) = self.workers.get(id as usize) else {
                return;
            };
            let Some(channel) = &slot.channel else { return };
            let received = match channel.recv() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(ChannelError::Receive(nix::Error::EAGAIN)) => return,
                Err(e) => {
                    // Untrusted bytes: refuse and go on (descriptors were already closed).
                    self.log.warn(&format!("worker {id}: refused a message: {e}"));
                    continue;
                }
            };
            match received.message.kind {
                Some(ChannelKind::JailReport(report)) => self.worker_jailed(id, report),
                Some(ChannelKind::Reply(reply)) => self.worker_reply(id, reply),
                Some(ChannelKind::Log(line)) => {
                    let text = format!("{}: {}", line.target, line.message);
                    match line.level {
                        rampart_worker::LOG_ERROR => self.log.error(&text),
                        rampart_worker::LOG_WARN => self.log.warn(&text),
                        _ => self.log.info(&text),
                    }
                }
                _ => self.log.warn(&format!("worker {id}: unexpected message kind")),
            }
        }
    }

    fn worker_jailed(&mut self, id: u32, report: proto::JailReport) {
        let Some(slot) = self.workers.get(id as usize) else {
            return;
        };
        if slot.run_state != RunState::Starting {
            self.log.warn(&format!("worker {id}: a second jail report was ignored"));
            return;
        }
        let Some(pid) = slot.pid else { return };
        if !self.launch.jail.sandbox_off {
            // Trust, but verify from outside.
            let expect = rampart_sandbox::inspect::Expectation {
                uid: self.worker_uid,
                gid: None,
                max_fds: None,
                allow_bounding: !nix::unistd::Uid::effective().is_root(),
                skip_private: !nix::unistd::Uid::effective().is_root(),
            };
            if let Err(violations) = rampart_sandbox::inspect::verify_jailed(pid.as_raw(), &expect) {
                let text: Vec<String> = violations.iter().map(ToString::to_string).collect();
                self.log.error(&format!(
                    "worker {id} (pid {pid}) is not jailed as required: {}; killing it",
                    text.join("; ")
                ));
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                return;
            }
        }
        self.log.info(&format!(
            "worker {id} (pid {pid}) jailed: uid {} landlock {} (ABI {}) seccomp {} ({} rules)",
            report.uid, report.landlock_status, report.landlock_abi, report.seccomp_mode, report.seccomp_rules
        ));
        let is_keyring = self.workers.get(id as usize).is_some_and(|w| w.keyring);
        if let Some(slot) = self.workers.get_mut(id as usize) {
            slot.jail = Some(report);
            slot.run_state = RunState::Running;
        }
        if is_keyring {
            // The keys, then a link to every running worker.
            self.keyring_keys.clear();
            self.sync_keyring(false, 0);
            let workers: Vec<u32> = self.running_workers().into_iter().filter(|w| *w != id).collect();
            for w in workers {
                self.link_keyring(w);
            }
            return;
        }
        // The ticket key, the state as the same requests the supervisor applied, the listeners.
        let keys = ChannelMessage {
            kind: Some(ChannelKind::TicketKeys(proto::TicketKeys {
                key: self.ticket_key.clone(),
            })),
        };
        self.send(id, keys, None);
        for request in self.state.to_requests() {
            self.send_order(id, 0, request);
        }
        self.link_keyring(id);
        let handoffs: Vec<(String, i32, RawFd)> = self
            .listeners
            .iter()
            .filter_map(|(address, fds)| {
                let protocol = self
                    .state
                    .listeners()
                    .get(address)
                    .map(|l| l.protocol)
                    .unwrap_or_default();
                fds.get(id as usize)
                    .map(|fd| (address.clone(), protocol, fd.as_raw_fd()))
            })
            .collect();
        for (address, protocol, fd) in handoffs {
            let message = ChannelMessage {
                kind: Some(ChannelKind::Listener(proto::ListenerHandoff { address, protocol })),
            };
            self.send(id, message, Some(fd));
        }
    }

    fn worker_reply(&mut self, id: u32, reply: proto::WorkerReply) {
        let ok = reply.status == proto::ResponseStatus::Ok as i32;
        if reply.sequence == 0 {
            if !ok {
                self.log.error(&format!(
                    "worker {id} refused a configuration request: {}",
                    reply.message
                ));
            }
            return;
        }
        let Some(p) = self.pending.get_mut(&reply.sequence) else {
            return;
        };
        p.waiting.remove(&id);
        if !ok {
            p.failures.push(format!("worker {id}: {}", reply.message));
        }
        if p.waiting.is_empty() {
            self.finish_pending(reply.sequence);
        }
    }

    fn client_serial(&self, key: usize) -> Option<u64> {
        self.clients.get(key).map(|c| c.serial)
    }

    fn finish_pending(&mut self, sequence: u64) {
        if let Some(p) = self.pending.remove(&sequence) {
            if self.pending.is_empty() {
                self.sync_keyring(true, 0);
            }
            if self.client_serial(p.client) != Some(p.serial) {
                return;
            }
            if p.failures.is_empty() {
                self.respond(p.client, &p.request_id, true, p.message, None);
            } else {
                let message = format!("{}; but {}", p.message, p.failures.join("; "));
                self.respond(p.client, &p.request_id, false, message, None);
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            let (mut stream, _) = match self.command.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.log.warn(&format!("command socket accept failed: {e}"));
                    return;
                }
            };
            // A connection whose credentials cannot be read is refused.
            let peer = match socket::getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(c) => crate::audit::peer(c.uid(), c.gid(), c.pid()),
                Err(e) => {
                    self.log
                        .warn(&format!("command connection without peer credentials refused: {e}"));
                    continue;
                }
            };
            if let Err(reason) = self.audit.connection_opened(&peer) {
                let response = proto::Response {
                    request_id: String::new(),
                    status: proto::ResponseStatus::Failure as i32,
                    message: reason,
                    content: None,
                };
                let _ = stream.write(&encode_frame(&response));
                continue;
            }
            let entry = self.clients.vacant_entry();
            let token = Token(CLIENT_BASE + entry.key());
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            let idle_timeout = self.audit.idle_timeout(&peer);
            entry.insert(Client {
                stream,
                peer,
                reader: FrameReader::default(),
                out: Vec::new(),
                closing: false,
                last_active: Instant::now(),
                idle_timeout,
                serial: self.next_sequence,
            });
            self.next_sequence += 1;
        }
    }

    fn close_client(&mut self, key: usize) {
        if let Some(mut c) = self.clients.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.audit.connection_closed(&c.peer);
        }
    }

    fn client_readable(&mut self, key: usize) {
        if let Some(c) = self.clients.get_mut(key) {
            c.last_active = Instant::now();
        }
        loop {
            let Some(client) = self.clients.get_mut(key) else {
                return;
            };
            let frame = client.reader.read_frame(&mut client.stream);
            match frame {
                Ok(Some(body)) => {
                    let peer = client.peer.clone();
                    match decode_request(&body) {
                        Ok(request) => self.handle(key, peer, request),
                        Err(e) => {
                            self.audit.malformed(&peer, &body, &e.to_string());
                            self.respond(key, "", false, format!("malformed request: {e}"), None);
                        }
                    }
                }
                Ok(None) => {
                    if client.reader.is_eof() {
                        self.close_client(key);
                    }
                    return;
                }
                Err(e @ (FrameError::TooLarge { .. } | FrameError::BadLength)) => {
                    let peer = client.peer.clone();
                    self.audit.malformed(&peer, &[], &e.to_string());
                    self.respond(key, "", false, format!("{e}; closing the connection"), None);
                    if let Some(c) = self.clients.get_mut(key) {
                        c.closing = true;
                    }
                    return;
                }
                Err(_) => {
                    self.close_client(key);
                    return;
                }
            }
        }
    }

    fn flush_client(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        while !client.out.is_empty() {
            match client.stream.write(&client.out) {
                Ok(0) => break,
                Ok(n) => {
                    client.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.close_client(key);
                    return;
                }
            }
        }
        if client.out.is_empty() && client.closing {
            self.close_client(key);
        }
    }

    fn respond(
        &mut self,
        key: usize,
        request_id: &str,
        ok: bool,
        message: String,
        content: Option<proto::response::Content>,
    ) {
        let response = proto::Response {
            request_id: request_id.to_string(),
            status: if ok {
                proto::ResponseStatus::Ok
            } else {
                proto::ResponseStatus::Failure
            } as i32,
            message,
            content,
        };
        if let Some(client) = self.clients.get_mut(key) {
            client.out.extend_from_slice(&encode_frame(&response));
        }
        self.flush_client(key);
    }

    fn running_workers(&self) -> Vec<u32> {
        self.workers
            .iter()
            .filter(|w| w.run_state == RunState::Running)
            .map(|w| w.id)
            .collect()
    }

    /// Ports of backends a request would add, for the landlock check.
    fn backend_ports(request: &proto::Request, out: &mut Vec<(String, u16)>) {
        match &request.kind {
            Some(Kind::AddBackend(b)) => {
                if let Ok(a) = b.address.parse::<std::net::SocketAddr>() {
                    out.push((b.address.clone(), a.port()));
                }
            }
            Some(Kind::Apply(batch)) => {
                for r in &batch.requests {
                    Self::backend_ports(r, out);
                }
            }
            _ => {}
        }
    }

    fn handle(&mut self, key: usize, peer: Peer, request: proto::Request) {
        self.handle_request(key, peer, request);
        // Keys of a request that was refused or failed are not kept.
        self.forget_unused_keys();
        self.sync_keyring(self.pending.is_empty(), 0);
    }

    fn handle_request(&mut self, key: usize, peer: Peer, mut request: proto::Request) {
        let id = request.id.clone();
        let kind = rampart_command::request_kind_name(&request);
        // A refused request is dropped whole; the blocks that held its keys are wiped when freed.
        if let Err(reason) = self.audit.authorize(&peer, &request, &self.state) {
            self.log
                .warn(&format!("uid {} pid {}: {kind} refused: {reason}", peer.uid, peer.pid));
            self.respond(key, &id, false, reason, None);
            return;
        }
        if is_state_change(&request) {
            // Before anything else looks at it: under key isolation a private key leaves the
            // supervisor's memory as soon as the request is authorized.
            let key_check = self.take_keys(&mut request);
            self.state_change(key, peer, request, key_check);
            return;
        }
        if let Some(Kind::LoadState(p)) = &request.kind {
            // Loading a saved state is one atomic batch: the difference from the running state.
            match self.load_state(&p.path) {
                Ok(requests) => {
                    let mut batch = proto::Request {
                        id: id.clone(),
                        kind: Some(Kind::Apply(proto::Batch { requests })),
                    };
                    let key_check = self.take_keys(&mut batch);
                    self.state_change(key, peer, batch, key_check);
                }
                Err(message) => self.respond(key, &id, false, message, None),
            }
            return;
        }
        let answer = self.query(&request);
        match answer {
            Ok((message, content)) => self.respond(key, &id, true, message, content),
            Err(message) => self.respond(key, &id, false, message, None),
        }
    }

    fn state_change(&mut self, key: usize, peer: Peer, request: proto::Request, key_check: Result<(), String>) {
        let id = request.id.clone();
        if let Err(message) = key_check {
            let message = format!("invalid certificate: {message}");
            self.audit.denied(&peer, &request, "invalid_certificate", &message);
            self.respond(key, &id, false, message, None);
            return;
        }
        if let ConnectRule::Ports(allowed) = &self.launch.jail.connect
            && !self.launch.jail.sandbox_off
        {
            let mut ports = Vec::new();
            Self::backend_ports(&request, &mut ports);
            if let Some((address, port)) = ports.iter().find(|(_, p)| !allowed.contains(p)) {
                let message = format!(
                    "backend {address}: workers may not connect to port {port} (their landlock rules allow {}); add it to sandbox.backend_ports and restart, or set sandbox.connect_any_port",
                    allowed.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
                );
                self.audit.denied(&peer, &request, "backend_port", &message);
                self.respond(key, &id, false, message, None);
                return;
            }
        }
        // Fail closed: the change is recorded before it is applied.
        let received_seq = match self.audit.received(&peer, &request, &self.state_hash) {
            Ok(seq) => seq,
            Err(e) => {
                self.log.error(&format!("audit log write failed: {e}; request refused"));
                self.respond(
                    key,
                    &id,
                    false,
                    format!("refused: the audit log cannot be written ({e}); nothing was changed"),
                    None,
                );
                return;
            }
        };
        let touches_listeners = matches!(
            request.kind,
            Some(Kind::AddListener(_) | Kind::RemoveListener(_) | Kind::Apply(_))
        );
        let before = self.state_hash.clone();
        let result = if touches_listeners {
            let mut next = self.state.clone();
            match next.apply(&request) {
                Ok(change) => match self.sync_listener_sockets(&next) {
                    Ok(()) => {
                        self.state = next;
                        Ok(change)
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            }
        } else {
            self.state.apply(&request).map_err(|e| e.to_string())
        };
        let change = match result {
            Ok(change) => {
                // Hashed once per change, and kept for the audit records, status and dumps.
                self.state_hash = self.state.hash_hex();
                change
            }
            Err(message) => {
                // A failed request changes nothing (batches are atomic).
                self.audit
                    .completed(&peer, &request, received_seq, Err(&message), &before, &before);
                self.respond(key, &id, false, message, None);
                return;
            }
        };
        self.audit.completed(
            &peer,
            &request,
            received_seq,
            Ok(&change.to_string()),
            &before,
            &self.state_hash,
        );
        let message = change.to_string();
        if !change.is_effective() {
            self.respond(key, &id, true, message, None);
            return;
        }
        // The keyring gets new keys before the order it acknowledges (and forgets old ones only
        // once every process has the change, so that handshakes under way can finish).
        self.forget_unused_keys();
        self.sync_keyring(false, self.next_sequence);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let workers = self.running_workers();
        for w in &workers {
            self.send_order(*w, sequence, request.clone());
        }
        self.handoff_new_listeners();
        if workers.is_empty() {
            self.respond(
                key,
                &id,
                true,
                format!("{message} (no worker running: they get it when they start)"),
                None,
            );
            return;
        }
        self.pending.insert(
            sequence,
            Pending {
                client: key,
                serial: self.clients.get(key).map_or(0, |c| c.serial),
                request_id: id,
                waiting: workers.into_iter().collect(),
                deadline: Instant::now() + WORKER_ACK_TIMEOUT,
                message,
                failures: Vec::new(),
            },
        );
    }

    /// Binds sockets for listeners `next` adds and closes those it removes. On a bind failure
    /// nothing changes.
    fn sync_listener_sockets(&mut self, next: &State) -> Result<(), StartError> {
        let mut added = Vec::new();
        for address in next.listeners().keys() {
            if !self.listeners.contains_key(address) {
                let mut fds = Vec::new();
                // One socket per worker slot; the keyring serves no traffic and gets none (an
                // extra SO_REUSEPORT socket nobody accepts on would strand its share of clients).
                for _ in self.workers.iter().filter(|w| !w.keyring) {
                    fds.push(bind_listener(address)?);
                }
                added.push((address.clone(), fds));
            }
        }
        self.listeners
            .retain(|address, _| next.listeners().contains_key(address));
        for (address, fds) in added {
            self.listeners.insert(address.clone(), fds);
            self.fresh_listeners.push(address);
        }
        Ok(())
    }

    fn handoff_new_listeners(&mut self) {
        let fresh = std::mem::take(&mut self.fresh_listeners);
        for address in fresh {
            let protocol = self
                .state
                .listeners()
                .get(&address)
                .map(|l| l.protocol)
                .unwrap_or_default();
            let workers: Vec<u32> = self
                .running_workers()
                .into_iter()
                .filter(|id| self.workers.get(*id as usize).is_some_and(|w| !w.keyring))
                .collect();
            for id in workers {
                let Some(fd) = self
                    .listeners
                    .get(&address)
                    .and_then(|fds| fds.get(id as usize))
                    .map(AsRawFd::as_raw_fd)
                else {
                    continue;
                };
                let message = ChannelMessage {
                    kind: Some(ChannelKind::Listener(proto::ListenerHandoff {
                        address: address.clone(),
                        protocol,
                    })),
                };
                self.send(id, message, Some(fd));
            }
        }
    }

    fn load_state(&self, requested: &str) -> Result<Vec<proto::Request>, String> {
        let path = self.audit.state_path(requested)?;
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let loaded = State::load(io::BufReader::new(file)).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(self.state.diff(&loaded))
    }

    fn query(&mut self, request: &proto::Request) -> Result<(String, Option<proto::response::Content>), String> {
        use proto::response::Content;
        let state = &self.state;
        match &request.kind {
            Some(Kind::Status(_)) => Ok((
                format!("{} worker(s) running", self.running_workers().len()),
                Some(Content::StatusReport(proto::StatusReport {
                    version: crate::VERSION.to_string(),
                    state_hash: self.state_hash.clone(),
                    workers: self.running_workers().len() as u32,
                    clusters: state.clusters().len() as u64,
                    frontends: state.frontend_count() as u64,
                    backends: state.backend_count() as u64,
                    listeners: state.listeners().len() as u64,
                })),
            )),
            Some(Kind::ListWorkers(_)) => Ok((
                String::new(),
                Some(Content::Workers(proto::WorkerList {
                    workers: self
                        .workers
                        .iter()
                        .map(|w| proto::WorkerInfo {
                            id: w.id,
                            pid: w.pid.map_or(0, Pid::as_raw),
                            run_state: w.run_state.name().into(),
                            jail: w.jail.clone(),
                            role: if w.keyring { "keyring" } else { "worker" }.into(),
                        })
                        .collect(),
                })),
            )),
            Some(Kind::ListListeners(_)) => Ok((
                String::new(),
                Some(Content::Listeners(proto::ListenerList {
                    listeners: state.listeners().values().cloned().collect(),
                })),
            )),
            Some(Kind::QueryClusters(filter)) => {
                let clusters = state
                    .clusters()
                    .values()
                    .filter(|c| filter.cluster_id.is_empty() || c.cluster_id == filter.cluster_id)
                    .map(|c| proto::ClusterInfo {
                        cluster: Some(c.clone()),
                        backends: state.cluster_backends(&c.cluster_id).cloned().collect(),
                        http_frontends: state
                            .http_frontends()
                            .filter(|f| f.cluster_id == c.cluster_id)
                            .cloned()
                            .collect(),
                        https_frontends: state
                            .https_frontends()
                            .filter(|f| f.cluster_id == c.cluster_id)
                            .cloned()
                            .collect(),
                        tcp_frontends: state
                            .tcp_frontends()
                            .filter(|f| f.cluster_id == c.cluster_id)
                            .cloned()
                            .collect(),
                    })
                    .collect();
                Ok((String::new(), Some(Content::Clusters(proto::ClusterList { clusters }))))
            }
            Some(Kind::ListFrontends(filter)) => {
                let keep = |cluster: &str, host: &str| {
                    (filter.cluster_id.is_empty() || filter.cluster_id == cluster)
                        && (filter.hostname.is_empty() || filter.hostname == host)
                };
                Ok((
                    String::new(),
                    Some(Content::Frontends(proto::FrontendList {
                        http: state
                            .http_frontends()
                            .filter(|f| keep(&f.cluster_id, &f.hostname))
                            .cloned()
                            .collect(),
                        https: state
                            .https_frontends()
                            .filter(|f| keep(&f.cluster_id, &f.hostname))
                            .cloned()
                            .collect(),
                        tcp: state
                            .tcp_frontends()
                            .filter(|f| keep(&f.cluster_id, ""))
                            .cloned()
                            .collect(),
                    })),
                ))
            }
            Some(Kind::ListCertificates(filter)) => Ok((
                String::new(),
                Some(Content::Certificates(proto::CertificateList {
                    certificates: state
                        .certificates()
                        .filter(|(_, c)| filter.address.is_empty() || c.address == filter.address)
                        // A name under a wildcard certificate finds that certificate.
                        .filter(|(_, c)| {
                            filter.name.is_empty()
                                || c.names
                                    .iter()
                                    .any(|n| rampart_command::state::name_covers(n, &filter.name))
                        })
                        .map(|(fp, c)| proto::CertificateSummary {
                            address: c.address.clone(),
                            fingerprint: fp.to_string(),
                            names: c.names.clone(),
                            not_after: not_after(&c.certificate).unwrap_or(0),
                        })
                        .collect(),
                })),
            )),
            Some(Kind::ListHealthChecks(_)) => Ok((
                String::new(),
                Some(Content::HealthChecks(proto::HealthCheckList {
                    checks: state.health_checks().cloned().collect(),
                })),
            )),
            Some(Kind::DumpState(_)) => {
                let mut requests = state.to_requests();
                // Private keys never leave the supervisor through a dump.
                for r in &mut requests {
                    if let Some(Kind::AddCertificate(c)) = &mut r.kind {
                        c.key = String::new();
                    }
                }
                Ok((
                    String::new(),
                    Some(Content::State(proto::StateDump {
                        requests,
                        hash: self.state_hash.clone(),
                    })),
                ))
            }
            Some(Kind::ShowPolicy(_)) => {
                let profile = Profile::from_params(&self.launch.jail);
                let text = format!("{}\n{}", self.audit.policy_text(), profile.to_text());
                Ok((String::new(), Some(Content::Policy(proto::PolicyText { text }))))
            }
            Some(Kind::SaveState(p)) => {
                let path = self.audit.state_path(&p.path)?;
                let tmp = path.with_extension("tmp");
                // A saved state restores everything, keys included: they are read back from
                // their memory files for the write, and every copy is wiped afterwards.
                let mut requests = state.to_requests();
                for r in &mut requests {
                    if let Some(Kind::AddCertificate(c)) = &mut r.kind
                        && c.key.is_empty()
                    {
                        let fingerprint = certificate_fingerprint(&c.certificate).map_err(|e| e.to_string())?;
                        let file = self.vault.get(&fingerprint).ok_or_else(|| {
                            format!("certificate {fingerprint}: its key is not held; the state was not saved")
                        })?;
                        let key = file
                            .with_key(|bytes| String::from_utf8_lossy(bytes).into_owned())
                            .map_err(|e| format!("reading a private key back for the saved state failed: {e}"))?;
                        c.key = key;
                    }
                }
                let mut out = zeroize::Zeroizing::new(Vec::new());
                let written = rampart_command::state::save_requests(&requests, &mut *out);
                for r in &mut requests {
                    visit_certificates(r, &mut |c| zeroize::Zeroize::zeroize(&mut c.key));
                }
                written.map_err(|e| e.to_string())?;
                write_private_file(&tmp, &out)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let message = format!("saved {} request(s) to {}", requests.len(), path.display());
                self.audit.system("state_saved", &message);
                Ok((message, None))
            }
            Some(Kind::SoftStop(_)) => {
                self.begin_stop(false);
                Ok(("soft stop: draining, then exiting".into(), None))
            }
            Some(Kind::HardStop(_)) => {
                self.begin_stop(true);
                Ok(("hard stop".into(), None))
            }
            Some(Kind::ReloadPolicy(_)) => self.audit.reload_policy().map(|m| (m, None)),
            Some(Kind::SetLoggingLevel(level)) => self
                .log
                .set_level(&level.filter)
                .map(|()| (format!("logging level set to {}", level.filter), None)),
            other => Err(format!(
                "`{}` is not available in this version of rampart",
                other
                    .as_ref()
                    .map_or("none", |_| rampart_command::request_kind_name(request))
            )),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.command_path);
    }
}
