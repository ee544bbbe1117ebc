//! Listening sockets (handed over by the supervisor, never bound here), what a session learns
//! about its listener, and accepting connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Interest, Token};
use rampart_command::proto;

use crate::LOG_WARN;
use crate::event_loop::{LISTENER_BASE, Session, Worker, context};
use crate::h1::HttpSession;
use crate::tcp::TcpSession;
use crate::tls::FrontStream;
use crate::tokens::Side;

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

pub(crate) struct ListenerSocket {
    pub(crate) socket: TcpListener,
    pub(crate) address: String,
    pub(crate) registered: bool,
    /// What its sessions need to know, built when the state changes rather than per accept.
    pub(crate) info: Option<Rc<ListenerInfo>>,
    pub(crate) protocol: i32,
}

impl Worker {
    pub(crate) fn accept(&mut self, index: usize, now: Instant) {
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
            let tcp = protocol == proto::Protocol::Tcp as i32;
            // HTTP sessions take their buffers when bytes arrive; a TCP pipe needs them now.
            let (a, b) = if tcp {
                let (Some(a), Some(b)) = (self.pool.checkout(), self.pool.checkout()) else {
                    continue;
                };
                (a, b)
            } else {
                (self.pool.deferred(), self.pool.deferred())
            };
            let _ = stream.set_nodelay(true);
            self.records.connection_accepted();
            let key = self.sessions.vacant_key();
            let front_token = self.tokens.take(key, Side::Front);
            if self
                .poll
                .registry()
                .register(&mut stream, front_token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                self.tokens.release(front_token);
                continue;
            }
            if tcp {
                let cluster = self.router.tcp_cluster(&address).map(str::to_string);
                let mut ctx = context!(self, now);
                let opened = cluster
                    .and_then(|cluster| TcpSession::open(stream, front_token, key, info, &cluster, a, b, &mut ctx));
                match opened {
                    Some(session) => {
                        self.sessions.insert(Session::Tcp(Box::new(session)));
                    }
                    None => self.tokens.release(front_token),
                }
                continue;
            }
            let front = if protocol == proto::Protocol::Https as i32 {
                match self.tls.accept(&address, stream, key) {
                    Some(f) => f,
                    // No usable certificate on this listener: the connection is refused.
                    None => {
                        self.tokens.release(front_token);
                        continue;
                    }
                }
            } else {
                FrontStream::Plain(stream)
            };
            let session = HttpSession::new(front, front_token, peer, info, a, b, now, &self.timeouts);
            self.sessions.insert(Session::Http(Box::new(session)));
            self.session_event(key, Some((front_token, true, true)), now);
        }
    }

    /// Rebuilds what sessions learn about their listener, after the state or the sockets changed.
    pub(crate) fn refresh_listener_info(&mut self) {
        for (_, entry) in &mut self.listeners {
            let listener = self.state.listeners().get(&entry.address);
            entry.protocol = listener.map(|l| l.protocol).unwrap_or_default();
            entry.info = listener.map(|l| Rc::new(ListenerInfo::from_proto(l)));
        }
    }

    /// Registers the listeners the state says are active (and not paused), deregisters others.
    pub(crate) fn sync_listeners(&mut self) {
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

    /// A listening socket from the supervisor: it replaces any socket of the same address.
    pub(crate) fn adopt_listener(&mut self, address: String, fd: std::os::fd::OwnedFd) {
        let socket = TcpListener::from_std(std::net::TcpListener::from(fd));
        let address = rampart_command::state::canonical_address(&address).unwrap_or(address);
        let gone: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.address == address)
            .map(|(k, _)| k)
            .collect();
        for k in gone {
            if let Some(mut l) = self.listeners.try_remove(k) {
                let _ = self.poll.registry().deregister(&mut l.socket);
            }
        }
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

    /// Listeners the state no longer has are closed (the supervisor keeps its copy).
    pub(crate) fn close_unknown_listeners(&mut self) {
        let unknown: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| !self.state.listeners().contains_key(&l.address))
            .map(|(k, _)| k)
            .collect();
        for k in unknown {
            if let Some(mut l) = self.listeners.try_remove(k) {
                let _ = self.poll.registry().deregister(&mut l.socket);
            }
        }
        self.refresh_listener_info();
        self.sync_listeners();
    }
}
