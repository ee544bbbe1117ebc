//! Routing a parsed request and opening its backend connection: the Host and path rules,
//! misdirected and redirected requests, the kept backend when it still fits, else
//! `backend::connect`, with up to `backend::MAX_CONNECT_ATTEMPTS` backends tried.

use std::time::Instant;

use kawa::StatusLine;

use super::{HttpSession, Phase, Step};
use crate::backend::{self, ConnectError};
use crate::event_loop::Context;

impl HttpSession {
    pub(super) fn route(&mut self, ctx: &mut Context<'_>) -> Step {
        let buf = self.req.storage.buffer();
        let (authority, path, method) = match &self.req.detached.status_line {
            StatusLine::Request {
                authority,
                path,
                method,
                ..
            } => (
                authority.data_opt(buf).unwrap_or_default(),
                path.data_opt(buf).unwrap_or_default(),
                method.data_opt(buf).unwrap_or_default(),
            ),
            _ => (&b""[..], &b""[..], &b""[..]),
        };
        if self.misdirected(authority) {
            let close = !self.req.is_terminated();
            self.start_answer(ctx, 421, close, None);
            return Step::Progress;
        }
        let router = ctx.router;
        let Some(cluster_id) = router.route(&self.listener.address, authority, path, method) else {
            let close = !self.req.is_terminated();
            self.start_answer(ctx, 404, close, None);
            return Step::Progress;
        };
        if !self.listener.https && ctx.balancers.clusters.get(cluster_id).is_some_and(|c| c.https_redirect) {
            let host = String::from_utf8_lossy(authority);
            let host = host.rsplit_once(':').map_or(host.as_ref(), |(h, _)| h).to_string();
            let uri = match &self.req.detached.status_line {
                StatusLine::Request { path, .. } => {
                    String::from_utf8_lossy(path.data_opt(buf).unwrap_or(b"/")).into_owned()
                }
                _ => "/".into(),
            };
            let location = format!("https://{host}{uri}");
            let close = !self.req.is_terminated();
            self.start_answer(ctx, 301, close, Some(&location));
            return Step::Progress;
        }
        // The same cluster as the previous request on this connection: no new string.
        if self.cluster.as_deref() != Some(cluster_id) {
            self.cluster = Some(cluster_id.to_string());
        }
        self.tried.clear();
        self.routed_at = Some(ctx.now);
        self.connect_timed_out = false;
        // Reuse the kept-alive backend when it serves the same cluster.
        // (and the backend is still configured: a removed backend finishes its in-flight request,
        // and gets no new one).
        if let Some(b) = &self.back
            && b.cluster == cluster_id
            && b.connected
            && ctx
                .balancers
                .clusters
                .get(cluster_id)
                .is_some_and(|c| c.backends.iter().any(|x| x.id == b.backend_id && x.weight > 0))
        {
            self.phase = Phase::Forward;
            self.deadline = self.backend_response_deadline(ctx);
            return Step::Progress;
        }
        // Another cluster, or a backend no longer configured: the connection is given up to
        // the idle pool (where only a configured backend's connections are ever taken).
        self.release_backend(ctx, true);
        self.connect(ctx)
    }

    pub(super) fn backend_response_deadline(&self, ctx: &Context<'_>) -> Instant {
        ctx.now
            + self
                .listener
                .timeouts
                .backend_response
                .unwrap_or(ctx.timeouts.backend_response)
    }

    pub(super) fn connect(&mut self, ctx: &mut Context<'_>) -> Step {
        let Some(cluster_id) = self.cluster.take() else {
            self.start_answer(ctx, 503, true, None);
            return Step::Progress;
        };
        let sticky_enabled = ctx.balancers.clusters.get(&cluster_id).is_some_and(|c| c.sticky);
        let sticky = if sticky_enabled {
            self.facts.sticky.as_deref()
        } else {
            None
        };
        let session = ctx.tokens.owner(self.front_token).map(|(k, _)| k);
        let opened = match session {
            Some(key) => backend::connect(ctx, key, &cluster_id, sticky, &mut self.tried),
            None => Err(ConnectError::NoBackend),
        };
        let result = match opened {
            Ok(b) => {
                if sticky_enabled && self.facts.sticky.as_deref() != Some(b.backend_id.as_bytes()) {
                    self.set_cookie = Some(format!("RAMPARTID={}; Path=/; HttpOnly", b.backend_id));
                }
                let reused = b.reused;
                self.back = Some(b);
                if reused {
                    self.phase = Phase::Forward;
                    self.deadline = self.backend_response_deadline(ctx);
                } else {
                    self.phase = Phase::Connecting;
                    self.connect_began = Some(ctx.now);
                    self.deadline = ctx.now
                        + self
                            .listener
                            .timeouts
                            .backend_connect
                            .unwrap_or(ctx.timeouts.backend_connect);
                }
                None
            }
            Err(e) => Some(e),
        };
        self.cluster = Some(cluster_id);
        if let Some(e) = result {
            let code = match e {
                ConnectError::NoBackend if self.tried.is_empty() => 503,
                _ if self.connect_timed_out => 504,
                _ => 502,
            };
            let close = !self.req.is_terminated();
            self.start_answer(ctx, code, close, None);
        }
        Step::Progress
    }

    pub(super) fn connect_failed(&mut self, ctx: &mut Context<'_>) -> Step {
        if let Some(b) = self.back.take() {
            b.failed(ctx);
        }
        if self.tried.len() >= backend::MAX_CONNECT_ATTEMPTS {
            let code = if self.connect_timed_out { 504 } else { 502 };
            let close = !self.req.is_terminated();
            self.start_answer(ctx, code, close, None);
            return Step::Progress;
        }
        self.connect(ctx)
    }

    pub(super) fn step_connecting(&mut self, ctx: &mut Context<'_>) -> Step {
        let Some(b) = &mut self.back else {
            return self.connect(ctx);
        };
        if !b.writable && !b.readable {
            return Step::Blocked;
        }
        match b.stream.take_error() {
            Ok(None) => {}
            _ => return self.connect_failed(ctx),
        }
        match b.stream.peer_addr() {
            Ok(_) => {
                b.succeeded(ctx);
                self.connect_time = self.connect_began.map(|t| ctx.now.saturating_duration_since(t));
                self.phase = Phase::Forward;
                self.deadline = self.backend_response_deadline(ctx);
                Step::Progress
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
                b.writable = false;
                b.readable = false;
                Step::Blocked
            }
            Err(_) => self.connect_failed(ctx),
        }
    }
}
