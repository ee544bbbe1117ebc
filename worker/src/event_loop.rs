//! The worker's state and its event loop: events are dispatched by token to the channel, the
//! keyring link, a listener or the session owning the socket; deadlines are checked on a tick;
//! a soft stop drains (see [`Worker::begin_drain`]).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use rampart_command::channel::Channel;
use rampart_command::proto::{
    self, WorkerToSupervisor, request::Kind as RequestKind, worker_to_supervisor as to_supervisor,
};
use rampart_command::state::State;
use slab::Slab;

use crate::backend::IdlePool;
use crate::backend::balancer::{Balancers, Rng};
use crate::h1::HttpSession;
use crate::keyring;
use crate::listeners::ListenerSocket;
use crate::pool::Pool;
use crate::record::Records;
use crate::router::Router;
use crate::tcp::TcpSession;
use crate::tls::TlsContexts;
use crate::tokens::{FIRST_SESSION_TOKEN, Tokens};
use crate::{LOG_ERROR, LOG_INFO, WorkerLaunch};

pub(crate) const CHANNEL: Token = Token(0);
pub(crate) const KEYRING: Token = Token(FIRST_SESSION_TOKEN - 1);
pub(crate) const LISTENER_BASE: usize = 1;
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often a worker sends its metric figures to the supervisor (when they changed).
const METRICS_INTERVAL: Duration = Duration::from_secs(1);
/// A kept-alive client connection idle when a drain begins is closed after this long, unless
/// a request arrives first (it is then answered, with `Connection: close`).
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Global timeouts.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub client_idle: Duration,
    pub request: Duration,
    pub backend_connect: Duration,
    pub backend_response: Duration,
    pub tls_handshake: Duration,
}

/// What the event loop must do with a session after `run`.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    Open,
    Close,
    /// The session still has work but has had its turn: it runs again after the other events.
    Again,
}

/// Shared, per-worker things a session needs while it runs.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub router: &'a Router,
    pub balancers: &'a mut Balancers,
    pub rng: &'a mut Rng,
    pub now: Instant,
    pub timeouts: &'a Timeouts,
    pub tokens: &'a mut Tokens,
    pub idle: &'a mut IdlePool,
    pub records: &'a mut Records,
    /// The worker is stopping: answers close their connection, no connection is kept idle.
    pub draining: bool,
}

/// A context built from the worker's fields, leaving its other fields (sessions, listeners)
/// free to borrow.
macro_rules! context {
    ($w:expr, $now:expr) => {
        $crate::event_loop::Context {
            registry: $w.poll.registry(),
            router: &$w.router,
            balancers: &mut $w.balancers,
            rng: &mut $w.rng,
            now: $now,
            timeouts: &$w.timeouts,
            tokens: &mut $w.tokens,
            idle: &mut $w.idle,
            records: &mut $w.records,
            draining: $w.stopping.is_some(),
        }
    };
}
pub(crate) use context;

pub(crate) enum Session {
    Http(Box<HttpSession>),
    Tcp(Box<TcpSession>),
}

impl Session {
    fn deadline(&self) -> Instant {
        match self {
            Session::Http(s) => s.deadline,
            Session::Tcp(s) => s.deadline,
        }
    }

    /// A WebSocket-like tunnel or a TCP connection: what a drain lets run to its grace period.
    fn is_tunnel(&self) -> bool {
        match self {
            Session::Http(s) => s.is_tunnel(),
            Session::Tcp(_) => true,
        }
    }
}

/// What a worker must bring up to date after orders, before it routes again: one hostname's
/// routes for a frontend added or removed (a full rebuild at 100,000 frontends costs tens of
/// milliseconds), everything for anything else that touches routing.
#[derive(Default)]
pub(crate) struct Stale {
    all_routes: bool,
    hosts: Vec<(String, String)>,
    tcp: bool,
    balancers: bool,
}

impl Stale {
    pub(crate) fn any(&self) -> bool {
        self.all_routes || self.tcp || self.balancers || !self.hosts.is_empty()
    }

    pub(crate) fn note(&mut self, request: &proto::Request) {
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

pub(crate) struct Worker {
    pub(crate) id: u32,
    pub(crate) poll: Poll,
    pub(crate) channel: Channel,
    pub(crate) state: State,
    pub(crate) router: Router,
    /// What of the router and balancers no longer matches the state (brought up to date before
    /// the next use).
    pub(crate) stale: Stale,
    /// The TLS contexts no longer match the state or the ticket key (rebuilt before the next accept).
    pub(crate) tls_stale: bool,
    pub(crate) balancers: Balancers,
    pub(crate) rng: Rng,
    pub(crate) pool: Pool,
    pub(crate) listeners: Slab<ListenerSocket>,
    pub(crate) sessions: Slab<Session>,
    pub(crate) tokens: Tokens,
    pub(crate) idle: IdlePool,
    pub(crate) records: Records,
    /// Sessions that had their turn with work left.
    again: Vec<usize>,
    pub(crate) tls: TlsContexts,
    pub(crate) ticket_key: Option<Vec<u8>>,
    pub(crate) keyring: Option<Channel>,
    pub(crate) keyring_queue: VecDeque<proto::SignRequest>,
    pub(crate) keyring_client: Arc<Mutex<keyring::KeyringClient>>,
    pub(crate) max_connections: usize,
    pub(crate) accepting_paused: bool,
    pub(crate) timeouts: Timeouts,
    /// When draining: the end of the grace period.
    pub(crate) stopping: Option<Instant>,
    pub(crate) shutdown_grace: Duration,
    pub(crate) refuse_cluster: Option<String>,
    /// Orders too large for one channel message, being put back together.
    pub(crate) assembler: rampart_command::channel::OrderAssembler,
}

impl Worker {
    pub(crate) fn new(launch: &WorkerLaunch, channel: Channel, poll: Poll) -> Worker {
        let max_connections = launch.max_connections.max(1) as usize;
        Worker {
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
            tokens: Tokens::default(),
            idle: IdlePool::default(),
            records: Records::new(launch.max_series as usize),
            again: Vec::new(),
            tls: TlsContexts::default(),
            ticket_key: None,
            keyring: None,
            keyring_queue: VecDeque::new(),
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
        }
    }

    pub(crate) fn log(&self, level: u32, message: String) {
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

    pub(crate) fn event_loop(&mut self) -> i32 {
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
        let mut last_report = Instant::now();
        loop {
            let wait = if self.again.is_empty() {
                TIMER_TICK
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait))
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
                } else if token.0 < FIRST_SESSION_TOKEN {
                    self.accept(token.0 - LISTENER_BASE, now);
                } else if let Some((key, _)) = self.tokens.owner(token) {
                    let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                    let writable = event.is_writable() || event.is_write_closed() || event.is_error();
                    self.session_event(key, Some((token, readable, writable)), now);
                }
            }
            for key in std::mem::take(&mut self.again) {
                self.session_event(key, None, now);
            }
            self.flush_keyring(now);
            if now.duration_since(last_tick) >= TIMER_TICK {
                last_tick = now;
                self.expire(now);
            }
            if now.duration_since(last_report) >= METRICS_INTERVAL {
                last_report = now;
                self.send_metrics(false);
            }
            if let Some(deadline) = self.stopping {
                if self.sessions.is_empty() {
                    self.send_metrics(true);
                    return 0;
                }
                if now >= deadline {
                    self.end_drain(now);
                    self.send_metrics(true);
                    return 0;
                }
            }
        }
    }

    /// Rebuilds what the orders since the last use made stale: once per batch of orders rather
    /// than once per order, which made loading a state of N frontends cost N rebuilds.
    pub(crate) fn settle(&mut self) {
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

    /// Runs a session: after a readiness event on one of its sockets (`ready`), or with none
    /// (its turn came again, or what it waited for arrived, such as the keyring's signature):
    /// the client connection is then tried as if ready.
    pub(crate) fn session_event(&mut self, key: usize, ready: Option<(Token, bool, bool)>, now: Instant) {
        self.settle();
        let mut ctx = context!(self, now);
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let status = match session {
            Session::Http(s) => {
                match ready {
                    Some((token, readable, writable)) => s.ready(token, readable, writable),
                    None => s.wake(),
                }
                s.run(&mut ctx)
            }
            Session::Tcp(s) => s.run(&mut ctx),
        };
        match status {
            Status::Open => {}
            Status::Again => self.again.push(key),
            Status::Close => self.remove_session(key, now),
        }
    }

    pub(crate) fn remove_session(&mut self, key: usize, now: Instant) {
        self.settle();
        let mut ctx = context!(self, now);
        if let Some(session) = self.sessions.try_remove(key) {
            match session {
                Session::Http(mut s) => s.close(&mut ctx),
                Session::Tcp(mut s) => s.close(&mut ctx, None),
            }
        }
        if self.accepting_paused && self.sessions.len() < self.max_connections && self.stopping.is_none() {
            self.accepting_paused = false;
            self.sync_listeners();
        }
    }

    fn expire(&mut self, now: Instant) {
        self.idle.expire(now);
        let expired: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| now >= s.deadline())
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            self.settle();
            let mut ctx = context!(self, now);
            let status = match self.sessions.get_mut(key) {
                Some(Session::Http(s)) => s.timeout(&mut ctx),
                Some(Session::Tcp(_)) => Status::Close,
                None => continue,
            };
            match status {
                Status::Open => {}
                Status::Again => self.again.push(key),
                Status::Close => self.remove_session(key, now),
            }
        }
    }

    /// A soft stop: the listeners stop accepting (the supervisor keeps them, and another
    /// worker has them already); a request in flight finishes and its answer closes the
    /// connection; a kept-alive connection idle now is closed after [`DRAIN_IDLE`] unless a
    /// request arrives first; tunnels (after a 101, and TCP connections) run on. When every
    /// session is gone, or at the end of `grace`, the worker exits.
    pub(crate) fn begin_drain(&mut self, grace: Duration, now: Instant) {
        let deadline = now + grace;
        self.stopping = Some(self.stopping.map_or(deadline, |d| d.min(deadline)));
        self.sync_listeners();
        self.idle.clear();
        for (_, session) in &mut self.sessions {
            if let Session::Http(s) = session {
                s.drain(now + DRAIN_IDLE);
            }
        }
    }

    /// The grace period is over: what still runs is closed, counted and logged.
    fn end_drain(&mut self, now: Instant) {
        let (mut tunnels, mut others) = (0usize, 0usize);
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.settle();
            let mut ctx = context!(self, now);
            let Some(session) = self.sessions.try_remove(key) else {
                continue;
            };
            if session.is_tunnel() {
                tunnels += 1;
            } else {
                others += 1;
            }
            match session {
                Session::Http(mut s) => s.abort(&mut ctx),
                Session::Tcp(mut s) => s.close(&mut ctx, Some(crate::record::Failure::Drained)),
            }
        }
        self.log(
            LOG_INFO,
            format!("grace period over: closed {tunnels} tunnel(s) and {others} other connection(s) still open"),
        );
    }

    /// Sends the figures that changed (all of the totals) to the supervisor; `last` sends them
    /// even when nothing changed, before the worker exits. A full channel drops a piece: the
    /// next report carries the series again only if they change, the totals always.
    pub(crate) fn send_metrics(&mut self, last: bool) {
        for report in self.records.reports(self.sessions.len(), last) {
            let message = WorkerToSupervisor {
                kind: Some(to_supervisor::Kind::Metrics(report)),
            };
            let _ = self.channel.send(&message, &[]);
        }
    }

    pub(crate) fn rebuild_tls(&mut self) {
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
}
