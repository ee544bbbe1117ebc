//! Backends: their state by id (`balancer`: which one gets the next connection, ejection after
//! failures, connection counts), the one routine that opens a connection to one of a cluster's
//! backends, and the pool of idle kept-alive connections that any session may take.
//!
//! Every backend connection is counted against its backend while a session holds it (least
//! connections reads the count), and not while it waits in the idle pool.

pub mod balancer;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::event_loop::Context;
use crate::tokens::Side;

/// Connection attempts per request before giving up.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
/// An idle backend connection older than this is closed: well under the keep-alive timeouts
/// backends commonly use (nginx: 75 s), so that the proxy, not the backend, closes it.
const IDLE_BACKEND_MAX: Duration = Duration::from_secs(15);
/// Idle connections kept per backend, and in all.
const IDLE_PER_BACKEND: usize = 64;
const IDLE_TOTAL: usize = 1024;

/// A connection to one backend, held by a session.
#[derive(Debug)]
pub struct BackendConn {
    pub stream: TcpStream,
    pub token: Token,
    pub cluster: String,
    pub backend_id: String,
    pub address: SocketAddr,
    pub connected: bool,
    pub readable: bool,
    pub writable: bool,
    /// The backend may be used for another request after this response.
    pub reusable: bool,
    /// Taken from the idle pool rather than opened for this request.
    pub reused: bool,
}

/// Why no connection could be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// The cluster is unknown, or has no backend available.
    NoBackend,
    /// Every attempt failed.
    Exhausted,
}

struct Idle {
    stream: TcpStream,
    cluster: String,
    backend_id: String,
    address: SocketAddr,
    since: Instant,
}

/// Kept-alive backend connections no session holds.
#[derive(Default)]
pub struct IdlePool {
    idle: Vec<Idle>,
}

impl IdlePool {
    pub fn len(&self) -> usize {
        self.idle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idle.is_empty()
    }

    fn put(&mut self, stream: TcpStream, cluster: String, backend_id: String, address: SocketAddr, now: Instant) {
        let same = self
            .idle
            .iter()
            .filter(|i| i.address == address && i.backend_id == backend_id)
            .count();
        if same >= IDLE_PER_BACKEND || self.idle.len() >= IDLE_TOTAL {
            return;
        }
        self.idle.push(Idle {
            stream,
            cluster,
            backend_id,
            address,
            since: now,
        });
    }

    /// The most recently parked live connection to this backend; dead ones met on the way are
    /// dropped.
    fn take(&mut self, cluster: &str, backend_id: &str, address: SocketAddr) -> Option<Idle> {
        while let Some(i) = self
            .idle
            .iter()
            .rposition(|i| i.address == address && i.backend_id == backend_id && i.cluster == cluster)
        {
            let idle = self.idle.swap_remove(i);
            let mut probe = [0u8; 1];
            // Alive and silent is the only state worth reusing: end of file, stray bytes or an
            // error mean the backend is done with it.
            match idle.stream.peek(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(idle),
                _ => continue,
            }
        }
        None
    }

    /// Closes the connections idle for too long.
    pub fn expire(&mut self, now: Instant) {
        self.idle
            .retain(|i| now.saturating_duration_since(i.since) < IDLE_BACKEND_MAX);
    }

    /// Closes every idle connection (a stopping worker keeps none).
    pub fn clear(&mut self) {
        self.idle.clear();
    }
}

/// Opens (or takes from the idle pool) a connection to a backend of `cluster_id` for
/// `session`, picking among backends not in `tried` and adding each one tried. The connection
/// may still be completing (`connected` false): the session learns of failure from its socket.
pub fn connect(
    ctx: &mut Context<'_>,
    session: usize,
    cluster_id: &str,
    sticky: Option<&[u8]>,
    tried: &mut Vec<String>,
) -> Result<BackendConn, ConnectError> {
    loop {
        if !tried.is_empty() {
            ctx.records.backend_retry();
        }
        let Some(cluster) = ctx.balancers.clusters.get_mut(cluster_id) else {
            return Err(ConnectError::NoBackend);
        };
        let Some(slot) = cluster.pick(ctx.rng, ctx.now, sticky, tried) else {
            return Err(if tried.is_empty() {
                ConnectError::NoBackend
            } else {
                ConnectError::Exhausted
            });
        };
        let (address, backend_id) = (slot.address, slot.id.clone());
        tried.push(backend_id.clone());
        let (stream, reused) = match ctx.idle.take(cluster_id, &backend_id, address) {
            Some(idle) => (Ok(idle.stream), true),
            None => (TcpStream::connect(address), false),
        };
        let opened = stream.and_then(|mut stream| {
            let token = ctx.tokens.take(session, Side::Back);
            match ctx
                .registry
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            {
                Ok(()) => Ok((stream, token)),
                Err(e) => {
                    ctx.tokens.release(token);
                    Err(e)
                }
            }
        });
        match opened {
            Ok((stream, token)) => {
                if !reused {
                    let _ = stream.set_nodelay(true);
                }
                ctx.balancers.connection_opened(cluster_id, &backend_id);
                return Ok(BackendConn {
                    stream,
                    token,
                    cluster: cluster_id.to_string(),
                    backend_id,
                    address,
                    connected: reused,
                    readable: false,
                    writable: reused,
                    reusable: true,
                    reused,
                });
            }
            Err(_) => {
                ctx.records.backend_connect_error();
                cluster_failed(ctx, cluster_id, &tried.last().cloned().unwrap_or_default());
                if tried.len() >= MAX_CONNECT_ATTEMPTS {
                    return Err(ConnectError::Exhausted);
                }
            }
        }
    }
}

fn cluster_failed(ctx: &mut Context<'_>, cluster_id: &str, backend_id: &str) {
    if let Some(c) = ctx.balancers.clusters.get_mut(cluster_id) {
        c.failed(backend_id, ctx.now);
    }
}

impl BackendConn {
    /// The connection failed to open: the backend is ejected for a while, the connection closed.
    pub fn failed(self, ctx: &mut Context<'_>) {
        ctx.records.backend_connect_error();
        cluster_failed(ctx, &self.cluster, &self.backend_id);
        self.release(ctx, false);
    }

    /// The connection opened.
    pub fn succeeded(&mut self, ctx: &mut Context<'_>) {
        self.connected = true;
        if let Some(c) = ctx.balancers.clusters.get_mut(&self.cluster) {
            c.succeeded(&self.backend_id);
        }
    }

    /// The session is done with the connection: it goes back to the idle pool when `keep` and it
    /// can carry another request (and the worker is not stopping), else it is closed.
    pub fn release(mut self, ctx: &mut Context<'_>, keep: bool) {
        let _ = ctx.registry.deregister(&mut self.stream);
        ctx.tokens.release(self.token);
        ctx.balancers.connection_closed(&self.cluster, &self.backend_id);
        if keep && self.reusable && self.connected && !ctx.draining {
            ctx.idle
                .put(self.stream, self.cluster, self.backend_id, self.address, ctx.now);
        }
    }
}
