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

pub mod answers;
pub mod balancer;
pub mod http;
pub mod keyring;
pub mod pool;
pub mod router;
pub mod tcp;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rampart_command::channel::{Channel, ChannelError};
use rampart_command::proto::{
    self, KeyringToWorker, SupervisorToWorker, WorkerToKeyring, WorkerToSupervisor, keyring_to_worker,
    request::Kind as RequestKind, supervisor_to_worker as from_supervisor, worker_to_keyring,
    worker_to_supervisor as to_supervisor,
};
use rampart_command::state::{State, is_state_change};
use rampart_policy::profile::{Profile, WorkerJailParams};
use rampart_sandbox::{Jail, JailSetup};
use serde::{Deserialize, Serialize};
use slab::Slab;

use crate::balancer::{Balancers, Rng};
use crate::http::{Context, HttpSession, Status};
use crate::pool::Pool;
use crate::router::Router;
use crate::tcp::TcpSession;
use crate::tls::{FrontStream, TlsContexts};

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
}

fn default_tls_handshake_timeout() -> u32 {
    rampart_command::config::defaults::TLS_HANDSHAKE_TIMEOUT
}

/// Global timeouts.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub client_idle: Duration,
    pub request: Duration,
    pub backend_connect: Duration,
    pub backend_response: Duration,
    pub tls_handshake: Duration,
}

/// A listener's own timeouts, when set.
#[derive(Debug, Clone, Default)]
pub struct ListenerTimeouts {
    pub client_idle: Option<Duration>,
    pub request: Option<Duration>,
    pub backend_connect: Option<Duration>,
    pub backend_response: Option<Duration>,
    pub tls_handshake: Option<Duration>,
}

/// What a session needs to know about its listener.
#[derive(Debug, Clone, Default)]
pub struct ListenerInfo {
    pub address: String,
    pub port: u16,
    /// The port as the X-Forwarded-Port value, shared by every request's header.
    pub port_value: Rc<[u8]>,
    pub https: bool,
    /// `by=` of the Forwarded header: the public address, or the listener's.
    pub by: String,
    pub answers: BTreeMap<String, String>,
    pub timeouts: ListenerTimeouts,
    /// HTTPS: a connection without SNI may carry no request (the handshake is refused anyway;
    /// this holds for whatever reaches the HTTP layer).
    pub strict_sni: bool,
}

fn ms(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(u64::from(v)))
}

impl ListenerInfo {
    pub fn from_proto(l: &proto::Listener) -> ListenerInfo {
        let port = l.address.parse::<SocketAddr>().map(|a| a.port()).unwrap_or(0);
        let by = if l.public_address.is_empty() {
            l.address.clone()
        } else {
            l.public_address.clone()
        };
        let by = if by.contains('[') || by.contains(':') {
            format!("\"{by}\"")
        } else {
            by
        };
        ListenerInfo {
            address: l.address.clone(),
            port,
            port_value: Rc::from(port.to_string().as_bytes()),
            https: l.protocol == proto::Protocol::Https as i32,
            by,
            answers: l.answers.clone(),
            timeouts: ListenerTimeouts {
                client_idle: ms(l.client_idle_timeout_ms),
                request: ms(l.request_timeout_ms),
                backend_connect: ms(l.backend_connect_timeout_ms),
                backend_response: ms(l.backend_response_timeout_ms),
                tls_handshake: ms(l.tls_handshake_timeout_ms),
            },
            strict_sni: l.strict_sni,
        }
    }
}

const CHANNEL: Token = Token(0);
const KEYRING: Token = Token(SESSION_BASE - 1);
const LISTENER_BASE: usize = 1;
const SESSION_BASE: usize = 1 << 16;
const TIMER_TICK: Duration = Duration::from_millis(250);

/// What a worker must bring up to date after orders, before it routes again: one hostname's
/// routes for a frontend added or removed (a full rebuild at 100,000 frontends costs tens of
/// milliseconds), everything for anything else that touches routing.
#[derive(Default)]
struct Stale {
    all_routes: bool,
    hosts: Vec<(String, String)>,
    tcp: bool,
    balancers: bool,
}

impl Stale {
    fn any(&self) -> bool {
        self.all_routes || self.tcp || self.balancers || !self.hosts.is_empty()
    }

    fn note(&mut self, request: &proto::Request) {
        use rampart_command::state::{canonical_address, canonical_hostname};
        match &request.kind {
            Some(
                RequestKind::AddHttpFrontend(f)
                | RequestKind::RemoveHttpFrontend(f)
                | RequestKind::AddHttpsFrontend(f)
                | RequestKind::RemoveHttpsFrontend(f),
            ) => match (canonical_address(&f.address), canonical_hostname(&f.hostname)) {
                // A few thousand hosts in one batch of orders: rebuilding is as cheap.
                (Ok(address), Ok(hostname)) if self.hosts.len() < 4096 => self.hosts.push((address, hostname)),
                _ => self.all_routes = true,
            },
            Some(RequestKind::AddTcpFrontend(_) | RequestKind::RemoveTcpFrontend(_)) => self.tcp = true,
            // TLS contexts follow certificates (`tls_stale`); routes do not. Activating a
            // listener only starts or stops accepting on it.
            Some(
                RequestKind::AddCertificate(_)
                | RequestKind::ReplaceCertificate(_)
                | RequestKind::RemoveCertificate(_)
                | RequestKind::ActivateListener(_)
                | RequestKind::DeactivateListener(_),
            ) => {}
            Some(
                RequestKind::AddCluster(_)
                | RequestKind::RemoveCluster(_)
                | RequestKind::AddBackend(_)
                | RequestKind::RemoveBackend(_)
                | RequestKind::SetHealthCheck(_)
                | RequestKind::RemoveHealthCheck(_),
            ) => self.balancers = true,
            _ => {
                self.all_routes = true;
                self.balancers = true;
            }
        }
    }
}

enum Session {
    Http(Box<HttpSession>),
    Tcp(Box<TcpSession>),
}

struct ListenerSocket {
    socket: TcpListener,
    address: String,
    registered: bool,
    /// What its sessions need to know, built when the state changes rather than per accept.
    info: Option<Rc<ListenerInfo>>,
    protocol: i32,
}

/// Log levels on the channel.
pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;

struct Worker {
    id: u32,
    poll: Poll,
    channel: Channel,
    state: State,
    router: Router,
    /// What of the router and balancers no longer matches the state (brought up to date before
    /// the next use).
    stale: Stale,
    /// The TLS contexts no longer match the state or the ticket key (rebuilt before the next accept).
    tls_stale: bool,
    balancers: Balancers,
    rng: Rng,
    pool: Pool,
    listeners: Slab<ListenerSocket>,
    sessions: Slab<Session>,
    tls: TlsContexts,
    ticket_key: Option<Vec<u8>>,
    keyring: Option<Channel>,
    keyring_queue: std::collections::VecDeque<proto::SignRequest>,
    keyring_client: Arc<Mutex<keyring::KeyringClient>>,
    max_connections: usize,
    accepting_paused: bool,
    timeouts: Timeouts,
    stopping: Option<Instant>,
    shutdown_grace: Duration,
    refuse_cluster: Option<String>,
    /// Orders too large for one channel message, being put back together.
    assembler: rampart_command::channel::OrderAssembler,
}

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
    let max_connections = launch.max_connections.max(1) as usize;
    let mut worker = Worker {
        id: launch.id,
        poll,
        channel,
        state: if launch.key_isolation {
            State::without_keys()
        } else {
            State::new()
        },
        router: Router::default(),
        stale: Stale::default(),
        tls_stale: false,
        balancers: Balancers::default(),
        rng: Rng::new(),
        pool: Pool::new(launch.buffer_size as usize, max_connections * 2),
        listeners: Slab::new(),
        sessions: Slab::with_capacity(max_connections.min(4096)),
        tls: TlsContexts::default(),
        ticket_key: None,
        keyring: None,
        keyring_queue: std::collections::VecDeque::new(),
        keyring_client: Arc::new(Mutex::new(keyring::KeyringClient::default())),
        max_connections,
        accepting_paused: false,
        timeouts: Timeouts {
            client_idle: Duration::from_secs(u64::from(launch.client_idle_timeout)),
            request: Duration::from_secs(u64::from(launch.request_timeout)),
            backend_connect: Duration::from_secs(u64::from(launch.backend_connect_timeout)),
            backend_response: Duration::from_secs(u64::from(launch.backend_response_timeout)),
            tls_handshake: Duration::from_secs(u64::from(launch.tls_handshake_timeout)),
        },
        stopping: None,
        shutdown_grace: Duration::from_secs(u64::from(launch.shutdown_grace)),
        refuse_cluster: launch.refuse_cluster.clone(),
        assembler: Default::default(),
    };
    worker.event_loop()
}

impl Worker {
    fn log(&self, level: u32, message: String) {
        let line = proto::LogLine {
            level,
            target: format!("worker {}", self.id),
            message,
        };
        let _ = self.channel.send(
            &WorkerToSupervisor {
                kind: Some(to_supervisor::Kind::Log(line)),
            },
            &[],
        );
    }

    fn event_loop(&mut self) -> i32 {
        let fd = self.channel.as_raw_fd();
        if self
            .poll
            .registry()
            .register(&mut SourceFd(&fd), CHANNEL, Interest::READABLE)
            .is_err()
        {
            return 5;
        }
        let mut events = Events::with_capacity(1024);
        let mut last_tick = Instant::now();
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(TIMER_TICK))
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                self.log(LOG_ERROR, format!("event loop failed: {e}"));
                return 6;
            }
            let now = Instant::now();
            for event in events.iter() {
                let token = event.token();
                if token == CHANNEL {
                    if let Some(code) = self.drain_channel() {
                        return code;
                    }
                } else if token == KEYRING {
                    self.drain_keyring(now);
                } else if token.0 < SESSION_BASE {
                    self.accept(token.0 - LISTENER_BASE, now);
                } else {
                    let key = (token.0 - SESSION_BASE) / 2;
                    let back = (token.0 - SESSION_BASE) % 2 == 1;
                    let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                    let writable = event.is_writable() || event.is_write_closed() || event.is_error();
                    self.session_event(key, back, readable, writable, now);
                }
            }
            self.flush_keyring(now);
            if now.duration_since(last_tick) >= TIMER_TICK {
                last_tick = now;
                self.expire(now);
            }
            if let Some(deadline) = self.stopping
                && (self.sessions.is_empty() || now >= deadline)
            {
                return 0;
            }
        }
    }

    /// Rebuilds what the orders since the last use made stale: once per batch of orders rather
    /// than once per order, which made loading a state of N frontends cost N rebuilds.
    fn settle(&mut self) {
        if !self.stale.any() && !self.tls_stale {
            return;
        }
        let stale = std::mem::take(&mut self.stale);
        if stale.all_routes {
            self.router = Router::from_state(&self.state);
        } else {
            for (address, hostname) in &stale.hosts {
                self.router.update_host(&self.state, address, hostname);
            }
            if stale.tcp {
                self.router.update_tcp(&self.state);
            }
        }
        if stale.balancers {
            self.balancers.update(&self.state);
        }
        if self.tls_stale {
            self.tls_stale = false;
            self.rebuild_tls();
        }
    }

    fn context(&mut self, now: Instant) -> (Context<'_>, &mut Slab<Session>) {
        self.settle();
        (
            Context {
                registry: self.poll.registry(),
                router: &self.router,
                balancers: &mut self.balancers,
                rng: &mut self.rng,
                now,
                timeouts: &self.timeouts,
            },
            &mut self.sessions,
        )
    }

    fn session_event(&mut self, key: usize, back: bool, readable: bool, writable: bool, now: Instant) {
        let (mut ctx, sessions) = self.context(now);
        let Some(session) = sessions.get_mut(key) else { return };
        let status = match session {
            Session::Http(s) => {
                if back {
                    s.back_event(readable, writable);
                } else {
                    s.front_event(readable, writable);
                }
                s.run(&mut ctx)
            }
            Session::Tcp(s) => s.run(&mut ctx),
        };
        if status == Status::Close {
            self.remove_session(key, now);
        }
    }

    fn remove_session(&mut self, key: usize, now: Instant) {
        let (mut ctx, sessions) = self.context(now);
        if let Some(session) = sessions.try_remove(key) {
            match session {
                Session::Http(mut s) => s.close(&mut ctx),
                Session::Tcp(mut s) => s.close(&mut ctx),
            }
        }
        if self.accepting_paused && self.sessions.len() < self.max_connections && self.stopping.is_none() {
            self.accepting_paused = false;
            self.sync_listeners();
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| match s {
                Session::Http(s) => now >= s.deadline,
                Session::Tcp(s) => now >= s.deadline,
            })
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            let (mut ctx, sessions) = self.context(now);
            let status = match sessions.get_mut(key) {
                Some(Session::Http(s)) => s.timeout(&mut ctx),
                Some(Session::Tcp(_)) => Status::Close,
                None => continue,
            };
            if status == Status::Close {
                self.remove_session(key, now);
            }
        }
    }

    fn accept(&mut self, index: usize, now: Instant) {
        self.settle();
        loop {
            if self.sessions.len() >= self.max_connections {
                // Leave further connections in the kernel's queue until a slot frees.
                self.accepting_paused = true;
                self.sync_listeners();
                return;
            }
            let Some(entry) = self.listeners.get(index) else { return };
            let (mut stream, peer) = match entry.socket.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.log(LOG_WARN, format!("accept on {} failed: {e}", entry.address));
                    return;
                }
            };
            let address = entry.address.clone();
            let protocol = entry.protocol;
            let Some(info) = entry.info.clone() else { continue };
            // HTTP sessions take their buffers when bytes arrive; a TCP pipe needs them now.
            let (a, b) = if protocol == proto::Protocol::Tcp as i32 {
                let (Some(a), Some(b)) = (self.pool.checkout(), self.pool.checkout()) else {
                    continue;
                };
                (a, b)
            } else {
                (self.pool.deferred(), self.pool.deferred())
            };
            let _ = stream.set_nodelay(true);
            let entry = self.sessions.vacant_entry();
            let key = entry.key();
            let front_token = Token(SESSION_BASE + key * 2);
            let back_token = Token(SESSION_BASE + key * 2 + 1);
            if self
                .poll
                .registry()
                .register(&mut stream, front_token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            if protocol == proto::Protocol::Tcp as i32 {
                let Some(cluster) = self.router.tcp_cluster(&address).map(str::to_string) else {
                    let _ = self.poll.registry().deregister(&mut stream);
                    continue;
                };
                let mut ctx = Context {
                    registry: self.poll.registry(),
                    router: &self.router,
                    balancers: &mut self.balancers,
                    rng: &mut self.rng,
                    now,
                    timeouts: &self.timeouts,
                };
                if let Some(session) = TcpSession::open(stream, &cluster, back_token, a, b, &mut ctx) {
                    self.sessions.insert(Session::Tcp(Box::new(session)));
                }
                continue;
            }
            let front = if protocol == proto::Protocol::Https as i32 {
                match self.tls.accept(&address, stream, key) {
                    Some(f) => f,
                    // No usable certificate on this listener: the connection is refused.
                    None => continue,
                }
            } else {
                FrontStream::Plain(stream)
            };
            let session = HttpSession::new(front, peer, info, back_token, a, b, now, &self.timeouts);
            entry.insert(Session::Http(Box::new(session)));
            self.session_event(key, false, true, true, now);
        }
    }

    /// Registers the listeners the state says are active (and not paused), deregisters others.
    /// Rebuilds what sessions learn about their listener, after the state or the sockets changed.
    fn refresh_listener_info(&mut self) {
        for (_, entry) in &mut self.listeners {
            let listener = self.state.listeners().get(&entry.address);
            entry.protocol = listener.map(|l| l.protocol).unwrap_or_default();
            entry.info = listener.map(|l| Rc::new(ListenerInfo::from_proto(l)));
        }
    }

    fn sync_listeners(&mut self) {
        let accepting = !self.accepting_paused && self.stopping.is_none();
        for (index, entry) in &mut self.listeners {
            let active = accepting && self.state.listeners().get(&entry.address).is_some_and(|l| l.active);
            let token = Token(LISTENER_BASE + index);
            if active && !entry.registered {
                entry.registered = self
                    .poll
                    .registry()
                    .register(&mut entry.socket, token, Interest::READABLE)
                    .is_ok();
            } else if !active && entry.registered {
                let _ = self.poll.registry().deregister(&mut entry.socket);
                entry.registered = false;
            }
        }
    }

    /// Handles every message waiting on the channel. Returns an exit code when the worker must end.
    fn drain_channel(&mut self) -> Option<i32> {
        loop {
            let received = match self.channel.recv::<SupervisorToWorker>() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // The supervisor is gone: so are we (PDEATHSIG would follow anyway).
                    return Some(0);
                }
                Err(ChannelError::Receive(nix_errno)) if nix_errno as i32 == libc::EAGAIN => {
                    // Once per batch of orders: the next request does not wait for a rebuild,
                    // and a certificate that cannot be used is logged now, traffic or not.
                    self.settle();
                    return None;
                }
                Err(e) => {
                    self.log(LOG_ERROR, format!("bad message from the supervisor: {e}"));
                    return None;
                }
            };
            match received.message.kind {
                Some(from_supervisor::Kind::Listener(handoff)) => {
                    let Some(fd) = received.fds.into_iter().next() else {
                        continue;
                    };
                    let socket = TcpListener::from_std(std::net::TcpListener::from(fd));
                    let address =
                        rampart_command::state::canonical_address(&handoff.address).unwrap_or(handoff.address);
                    self.listeners.retain(|_, l| l.address != address);
                    self.listeners.insert(ListenerSocket {
                        socket,
                        address,
                        registered: false,
                        info: None,
                        protocol: 0,
                    });
                    self.refresh_listener_info();
                    self.sync_listeners();
                }
                Some(from_supervisor::Kind::KeyringLink(_)) => {
                    let Some(fd) = received.fds.into_iter().next() else {
                        continue;
                    };
                    self.keyring_lost(Instant::now(), "a new keyring replaced the old one");
                    let link = Channel::from(fd);
                    let raw = link.as_raw_fd();
                    if self
                        .poll
                        .registry()
                        .register(&mut SourceFd(&raw), KEYRING, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.keyring = Some(link);
                    }
                }
                Some(from_supervisor::Kind::TicketKeys(keys)) => {
                    self.ticket_key = Some(keys.key);
                    self.tls_stale = true;
                }
                Some(from_supervisor::Kind::Order(piece)) => match self.assembler.push(piece) {
                    Ok(Some(order)) => {
                        if let Some(code) = self.order(order) {
                            return Some(code);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => self.log(LOG_ERROR, format!("bad order from the supervisor: {e}")),
                },
                None => self.log(LOG_WARN, "a message without a kind from the supervisor".into()),
            }
        }
    }

    /// Sends the signature requests the handshakes queued; without a keyring they fail at once.
    fn flush_keyring(&mut self, now: Instant) {
        if let Ok(mut c) = self.keyring_client.lock() {
            let queued = std::mem::take(&mut c.outbox);
            self.keyring_queue.extend(queued);
        }
        if self.keyring_queue.is_empty() {
            return;
        }
        let Some(link) = &self.keyring else {
            self.keyring_lost(now, "the keyring is not reachable");
            return;
        };
        // The link holds a handful of datagrams: what does not fit waits for it to drain.
        while let Some(r) = self.keyring_queue.front() {
            let message = WorkerToKeyring {
                kind: Some(worker_to_keyring::Kind::SignRequest(r.clone())),
            };
            match link.send(&message, &[]) {
                Ok(()) => {
                    self.keyring_queue.pop_front();
                }
                Err(ChannelError::Send(e)) if e as i32 == libc::EAGAIN => return,
                Err(_) => {
                    self.keyring_lost(now, "the keyring is not reachable");
                    return;
                }
            }
        }
    }

    fn keyring_lost(&mut self, now: Instant, why: &str) {
        if let Some(link) = self.keyring.take() {
            let raw = link.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        self.keyring_queue.clear();
        let sessions = match self.keyring_client.lock() {
            Ok(mut c) => c.fail_all(why),
            Err(_) => Vec::new(),
        };
        for key in sessions {
            self.session_event(key, false, true, true, now);
        }
    }

    fn drain_keyring(&mut self, now: Instant) {
        loop {
            let Some(link) = &self.keyring else { return };
            let received = match link.recv::<KeyringToWorker>() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.keyring_lost(now, "the keyring closed its link");
                    return;
                }
                Err(ChannelError::Receive(e)) if e as i32 == libc::EAGAIN => return,
                Err(_) => continue,
            };
            if let Some(keyring_to_worker::Kind::SignReply(reply)) = received.message.kind {
                let session = self.keyring_client.lock().ok().and_then(|mut c| c.reply(reply));
                if let Some(key) = session {
                    self.session_event(key, false, true, true, now);
                }
            }
        }
    }

    fn rebuild_tls(&mut self) {
        let (tls, errors) = TlsContexts::from_state(
            &self.state,
            self.ticket_key.as_deref(),
            &self.keyring_client,
            &mut self.tls,
        );
        self.tls = tls;
        for e in errors {
            self.log(LOG_ERROR, e);
        }
    }

    fn reply(&self, sequence: u64, ok: bool, message: String) {
        // Orders of the initial state (sequence 0) are answered only when they fail: a large
        // state would otherwise flood the channel with acknowledgements nobody waits for.
        if sequence == 0 && ok {
            return;
        }
        let reply = proto::WorkerReply {
            sequence,
            status: if ok {
                proto::ResponseStatus::Ok
            } else {
                proto::ResponseStatus::Failure
            } as i32,
            message,
            response: None,
        };
        let _ = self.channel.send(
            &WorkerToSupervisor {
                kind: Some(to_supervisor::Kind::Reply(reply)),
            },
            &[],
        );
    }

    fn order(&mut self, order: proto::WorkerOrder) -> Option<i32> {
        let Some(request) = order.request else {
            self.reply(order.sequence, false, "order without a request".into());
            return None;
        };
        if let (Some(refused), Some(RequestKind::AddCluster(c))) = (&self.refuse_cluster, &request.kind)
            && order.sequence != 0
            && c.cluster_id == *refused
        {
            self.reply(order.sequence, false, format!("test hook: cluster `{refused}` refused"));
            return None;
        }
        if is_state_change(&request) {
            match self.state.apply(&request) {
                Ok(change) => {
                    self.stale.note(&request);
                    if matches!(
                        request.kind,
                        Some(
                            RequestKind::AddCertificate(_)
                                | RequestKind::ReplaceCertificate(_)
                                | RequestKind::RemoveCertificate(_)
                                | RequestKind::AddListener(_)
                                | RequestKind::UpdateListener(_)
                                | RequestKind::Apply(_)
                        )
                    ) {
                        self.tls_stale = true;
                    }
                    // Listeners the state no longer has are closed (the supervisor keeps its copy).
                    let known: Vec<usize> = self
                        .listeners
                        .iter()
                        .filter(|(_, l)| !self.state.listeners().contains_key(&l.address))
                        .map(|(k, _)| k)
                        .collect();
                    for k in known {
                        if let Some(mut l) = self.listeners.try_remove(k) {
                            let _ = self.poll.registry().deregister(&mut l.socket);
                        }
                    }
                    self.refresh_listener_info();
                    self.sync_listeners();
                    self.reply(order.sequence, true, change.to_string());
                }
                Err(e) => self.reply(order.sequence, false, e.to_string()),
            }
            return None;
        }
        match request.kind {
            Some(RequestKind::SoftStop(_)) => {
                self.stopping = Some(Instant::now() + self.shutdown_grace);
                self.sync_listeners();
                self.reply(
                    order.sequence,
                    true,
                    format!("draining {} connection(s)", self.sessions.len()),
                );
                None
            }
            Some(RequestKind::HardStop(_)) => {
                self.reply(order.sequence, true, "stopping now".into());
                Some(0)
            }
            Some(RequestKind::Status(_)) => {
                self.reply(
                    order.sequence,
                    true,
                    format!(
                        "{} connection(s), {} buffer(s) in use",
                        self.sessions.len(),
                        self.pool.outstanding()
                    ),
                );
                None
            }
            _ => {
                self.reply(
                    order.sequence,
                    false,
                    format!(
                        "workers do not handle `{}`",
                        rampart_command::request_kind_name(&request)
                    ),
                );
                None
            }
        }
    }
}
