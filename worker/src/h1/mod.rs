//! One HTTP/1.1 client connection: requests parsed with kawa, routed, forwarded to a backend
//! over a kept-alive connection, responses streamed back; pipelined requests are answered in
//! order because the next request is not parsed before the current response is complete.
//!
//! Everything is non-blocking and edge-triggered: `run` makes all the progress the sockets
//! allow, then returns. Memory per connection is two pooled buffers; bodies stream through
//! them whatever their size. After a 101 the connection becomes the byte pipe of
//! [`crate::pipe`]. Every request ends in one [`RequestRecord`] (`finish_request`).
//!
//! `headers` holds what is read from and added to the headers, `io` the socket I/O through
//! kawa's buffers.

pub mod headers;
pub mod io;
mod route;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use kawa::{BodySize, Kawa, Kind, ParsingPhase};
use mio::Token;

use crate::ListenerInfo;
use crate::backend::BackendConn;
use crate::event_loop::{Context, DRAIN_IDLE, Status, Timeouts};
use crate::pipe::{Flow, Pipe};
use crate::pool::Checkout;
use crate::record::{Carrier, Failure, RequestRecord};
use crate::tls::FrontStream;
pub use headers::RequestPath;
use headers::{ClientFacts, RequestCallbacks, RequestFacts, ResponseCallbacks, check_header_section, new_request_id};
use io::{Io, read_into, write_from};

/// Steps one `run` takes before it lets the other sessions have their turn: a session whose
/// client and backend are both fast never blocks (a long pipelined stream of requests, a large
/// body between two local sockets), and would otherwise keep the worker to itself. It runs
/// again right after the events of this round.
const STEPS_PER_TURN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for, or parsing, a request's headers.
    Request,
    /// Headers parsed and routed; the backend connection is being opened.
    Connecting,
    /// Request and response flowing.
    Forward,
    /// Writing an answer of our own.
    Answer,
    /// After a 101: bytes copied both ways.
    Pipe,
}

pub struct HttpSession {
    pub front: FrontStream,
    front_token: Token,
    client: ClientFacts,
    pub listener: Rc<ListenerInfo>,
    front_readable: bool,
    front_writable: bool,
    front_closed: bool,
    back: Option<BackendConn>,
    req: Kawa<Checkout>,
    resp: Kawa<Checkout>,
    /// After a 101.
    pipe: Option<Pipe>,
    phase: Phase,
    facts: RequestFacts,
    /// The client connection closes after the current response.
    response_close: bool,
    /// The backend closes its connection after the current response.
    backend_close: bool,
    response_code: u16,
    set_cookie: Option<String>,
    cluster: Option<String>,
    /// Ids of the backends this request tried (ids, not positions: a runtime change in between
    /// reorders the cluster's list).
    tried: Vec<String>,
    connect_timed_out: bool,
    answer: Vec<u8>,
    answer_written: usize,
    answer_code: u16,
    close_after: bool,
    /// Where the current request starts in the request buffer.
    request_start: usize,
    request_began: Option<Instant>,
    /// Bytes read from and written to the client for the current request.
    bytes_in: u64,
    bytes_out: u64,
    /// Why the request in flight is ending, when the session closes in the middle of it.
    failure: Option<Failure>,
    /// When the current request was routed, when its backend connection began opening, and
    /// what the record will say of both.
    routed_at: Option<Instant>,
    connect_began: Option<Instant>,
    connect_time: Option<std::time::Duration>,
    first_byte_time: Option<std::time::Duration>,
    /// The TLS handshake is not complete: the deadline is the handshake timeout.
    handshaking: bool,
    pub deadline: Instant,
}

impl HttpSession {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        front: FrontStream,
        front_token: Token,
        peer: SocketAddr,
        listener: Rc<ListenerInfo>,
        req_buf: Checkout,
        resp_buf: Checkout,
        now: Instant,
        timeouts: &Timeouts,
    ) -> HttpSession {
        let handshaking = front.in_handshake();
        // A client that never completes its handshake gets the handshake timeout, not the
        // (much longer) idle timeout.
        let first_deadline = if handshaking {
            listener.timeouts.tls_handshake.unwrap_or(timeouts.tls_handshake)
        } else {
            listener.timeouts.client_idle.unwrap_or(timeouts.client_idle)
        };
        HttpSession {
            front,
            front_token,
            client: ClientFacts::new(peer, &listener),
            listener,
            front_readable: true,
            front_writable: true,
            front_closed: false,
            back: None,
            req: Kawa::new(Kind::Request, kawa::Buffer::new(req_buf)),
            resp: Kawa::new(Kind::Response, kawa::Buffer::new(resp_buf)),
            pipe: None,
            phase: Phase::Request,
            facts: RequestFacts::default(),
            response_close: false,
            backend_close: false,
            response_code: 0,
            set_cookie: None,
            cluster: None,
            tried: Vec::new(),
            connect_timed_out: false,
            answer: Vec::new(),
            answer_written: 0,
            answer_code: 0,
            close_after: false,
            request_start: 0,
            request_began: None,
            bytes_in: 0,
            bytes_out: 0,
            failure: None,
            routed_at: None,
            connect_began: None,
            connect_time: None,
            first_byte_time: None,
            handshaking,
            deadline: now + first_deadline,
        }
    }

    /// Readiness on one of the session's sockets.
    pub fn ready(&mut self, token: Token, readable: bool, writable: bool) {
        if token == self.front_token {
            self.front_readable |= readable;
            self.front_writable |= writable;
        } else if let Some(b) = &mut self.back
            && b.token == token
        {
            b.readable |= readable;
            b.writable |= writable;
        }
    }

    /// Something the session waited for arrived (a signature for its handshake), or its turn
    /// came again: the client connection is tried as if it were ready.
    pub fn wake(&mut self) {
        self.front_readable = true;
        self.front_writable = true;
    }

    /// Gives the backend connection up: to the idle pool when `keep` and it can carry another
    /// request, else closed.
    fn release_backend(&mut self, ctx: &mut Context<'_>, keep: bool) {
        if let Some(b) = self.back.take() {
            b.release(ctx, keep);
        }
    }

    /// Whether the connection is a tunnel after a 101.
    pub fn is_tunnel(&self) -> bool {
        self.phase == Phase::Pipe
    }

    /// The worker began draining: an idle kept-alive connection is closed at `idle_close`
    /// unless a request arrives first (a request in flight finishes; its answer closes).
    pub fn drain(&mut self, idle_close: Instant) {
        if self.phase == Phase::Request
            && self.request_began.is_none()
            && self.req.storage.unparsed_data().is_empty()
            && !self.handshaking
        {
            self.deadline = self.deadline.min(idle_close);
        }
    }

    /// Writes the record of the request in flight (if any) and starts counting the next one.
    fn finish_request(&mut self, ctx: &mut Context<'_>, carrier: Carrier, status: u16, failure: Option<Failure>) {
        let Some(began) = self.request_began.take() else { return };
        let (bytes_in, bytes_out) = match &self.pipe {
            Some(p) => (self.bytes_in + p.bytes_in, self.bytes_out + p.bytes_out),
            None => (self.bytes_in, self.bytes_out),
        };
        let record = RequestRecord {
            carrier,
            listener: &self.listener.address,
            cluster: self.cluster.as_deref(),
            backend: self
                .back
                .as_ref()
                .map(|b| b.backend_id.as_str())
                .or(self.tried.last().map(String::as_str)),
            status,
            began,
            finished: ctx.now,
            bytes_in,
            bytes_out,
            failure,
            connect_time: self.connect_time.take(),
            first_byte_time: self.first_byte_time.take(),
        };
        ctx.records.finish(&record);
        self.bytes_in = 0;
        self.bytes_out = 0;
        self.routed_at = None;
        self.connect_began = None;
    }

    /// Closes the connection; a request still in flight is recorded as failed.
    pub fn close(&mut self, ctx: &mut Context<'_>) {
        let failure = self.failure.unwrap_or(Failure::ClientClosed);
        self.end(ctx, failure);
    }

    /// The worker's grace period is over: the connection is cut.
    pub fn abort(&mut self, ctx: &mut Context<'_>) {
        self.end(ctx, Failure::Drained);
    }

    fn end(&mut self, ctx: &mut Context<'_>, failure: Failure) {
        if self.handshaking && self.front.in_handshake() {
            ctx.records.tls_handshake_failed();
        }
        if self.phase == Phase::Pipe {
            let failure = (failure == Failure::Drained || self.failure.is_some()).then_some(failure);
            self.finish_request(ctx, Carrier::Tunnel, 101, failure);
        } else {
            self.finish_request(ctx, Carrier::Http1, self.response_code, Some(failure));
        }
        self.release_backend(ctx, false);
        if let Some(tcp) = self.front.tcp_mut() {
            let _ = ctx.registry.deregister(tcp);
        }
        ctx.tokens.release(self.front_token);
    }

    /// A tunnel is cut after the client idle timeout without a byte either way, draining or not.
    fn tunnel_deadline(&self, ctx: &Context<'_>) -> Instant {
        ctx.now + self.listener.timeouts.client_idle.unwrap_or(ctx.timeouts.client_idle)
    }

    /// Between requests: the client idle timeout, or a second when the worker is draining.
    fn idle_deadline(&self, ctx: &Context<'_>) -> Instant {
        let idle = self.tunnel_deadline(ctx);
        if ctx.draining {
            idle.min(ctx.now + DRAIN_IDLE)
        } else {
            idle
        }
    }

    fn start_answer(&mut self, ctx: &mut Context<'_>, code: u16, close: bool, location: Option<&str>) {
        // A client that asked to close (Connection: close, or HTTP/1.0 without keep-alive) gets
        // the connection closed after our answer too (RFC 9112 §9.6), as after a backend's; so
        // does every client of a draining worker.
        let close = close || self.facts.close || (self.facts.http10 && !self.facts.keep_alive) || ctx.draining;
        let cluster_503 = self
            .cluster
            .as_ref()
            .and_then(|c| ctx.balancers.clusters.get(c))
            .map(|c| c.answer_503.as_str());
        let id = self.facts.request_id.get_or_insert_with(|| new_request_id(ctx.rng));
        self.answer = crate::answers::render(
            code,
            close,
            std::str::from_utf8(id).unwrap_or_default(),
            location,
            Some(&self.listener.answers),
            cluster_503,
        );
        self.answer_written = 0;
        self.answer_code = code;
        self.close_after = close;
        self.phase = Phase::Answer;
        self.release_backend(ctx, false);
        self.deadline = self.idle_deadline(ctx);
    }

    /// Makes all the progress the sockets allow (or its turn's worth of it).
    pub fn run(&mut self, ctx: &mut Context<'_>) -> Status {
        for _ in 0..STEPS_PER_TURN {
            let progress = match self.phase {
                Phase::Request => self.step_request(ctx),
                Phase::Connecting => self.step_connecting(ctx),
                Phase::Forward => self.step_forward(ctx),
                Phase::Answer => self.step_answer(ctx),
                Phase::Pipe => self.step_pipe(ctx),
            };
            match progress {
                Step::Progress => continue,
                Step::Blocked => {
                    self.handshake_settled(ctx);
                    return Status::Open;
                }
                Step::Close => return Status::Close,
            }
        }
        self.handshake_settled(ctx);
        Status::Again
    }

    /// Once the handshake is complete, the connection waits for its first request under the
    /// idle timeout (a request that already began has its own deadline).
    fn handshake_settled(&mut self, ctx: &mut Context<'_>) {
        if self.handshaking && !self.front.in_handshake() {
            self.handshaking = false;
            if let Some(version) = self.front.tls_version() {
                ctx.records.tls_handshake(version);
            }
            if self.phase == Phase::Request && self.request_began.is_none() {
                self.deadline = self.idle_deadline(ctx);
            }
        }
    }

    /// On HTTPS: whether the request's host is one the connection's certificate does not name
    /// (exactly or under one of its wildcards), or the connection came without SNI to a strict
    /// listener. Such a request is answered 421 and never routed.
    fn misdirected(&self, authority: &[u8]) -> bool {
        if !self.listener.https {
            return false;
        }
        let Some((names, sni)) = self.front.served() else {
            return true;
        };
        if self.listener.strict_sni && !sni {
            return true;
        }
        let host = crate::router::strip_port(authority);
        let Ok(host) = std::str::from_utf8(host) else {
            return true;
        };
        !names.iter().any(|name| rampart_command::state::name_covers(name, host))
    }

    fn read_front(&mut self) -> Io {
        if !self.front_readable || self.front_closed {
            return Io::Blocked;
        }
        let mut drained = false;
        let result = read_into(&mut self.front, &mut self.req, &mut drained);
        if let Io::Data(n) = result {
            self.bytes_in += n as u64;
        }
        // TLS may hold decrypted bytes that no socket event will announce.
        let drained = drained && self.front.pending() == 0;
        if drained || (matches!(result, Io::Blocked) && !self.req.storage.space().is_empty()) {
            self.front_readable = false;
        }
        result
    }

    fn step_request(&mut self, ctx: &mut Context<'_>) -> Step {
        // An idle kept-alive backend that closes is simply forgotten.
        if let Some(b) = &mut self.back
            && b.readable
        {
            let mut probe = [0u8; 1];
            match b.stream.read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => b.readable = false,
                _ => self.release_backend(ctx, false),
            }
        }
        if !self.req.storage.buffer.is_held()
            && !self.front_readable
            && !matches!(self.front, FrontStream::Handshake(_))
        {
            // Idle between requests: no buffer until bytes arrive.
            return Step::Blocked;
        }
        if !self.hold_buffers() {
            // Every buffer is in use: the request waits in the socket until one frees.
            return Step::Blocked;
        }
        if self.req.storage.unparsed_data().is_empty() {
            match self.read_front() {
                Io::Data(_) => {}
                Io::Blocked => return Step::Blocked,
                Io::Closed | Io::Failed => {
                    // A client closing between requests is normal; in the middle of one, the
                    // request is abandoned.
                    return Step::Close;
                }
            }
        }
        if self.request_began.is_none() {
            self.request_began = Some(ctx.now);
            self.request_start = self.req.storage.head;
            self.deadline = ctx.now + self.listener.timeouts.request.unwrap_or(ctx.timeouts.request);
        }
        let mut callbacks = RequestCallbacks {
            client: &self.client,
            listener: &self.listener,
            rng: ctx.rng,
            facts: RequestFacts::default(),
        };
        kawa::h1::parse(&mut self.req, &mut callbacks);
        let facts = callbacks.facts;
        if self.req.is_error() {
            self.facts.request_id = facts.request_id;
            self.start_answer(ctx, 400, true, None);
            return Step::Progress;
        }
        if !self.req.is_main_phase() {
            if self.req.storage.space().is_empty() {
                // The headers do not fit the buffer.
                let code = if self.req.parsing_phase == ParsingPhase::StatusLine {
                    414
                } else {
                    431
                };
                self.start_answer(ctx, code, true, None);
                return Step::Progress;
            }
            // Need more bytes.
            return match self.read_front() {
                Io::Data(_) => Step::Progress,
                Io::Blocked => Step::Blocked,
                Io::Closed | Io::Failed => Step::Close,
            };
        }
        self.facts = facts;
        let raw = self
            .req
            .storage
            .buffer()
            .get(self.request_start..self.req.storage.end)
            .unwrap_or_default();
        if let Err(code) = check_header_section(raw) {
            self.start_answer(ctx, code, true, None);
            return Step::Progress;
        }
        self.route(ctx)
    }

    /// The backend did not answer in time.
    pub fn timeout(&mut self, ctx: &mut Context<'_>) -> Status {
        match self.phase {
            Phase::Connecting => {
                self.connect_timed_out = true;
                match self.connect_failed(ctx) {
                    Step::Close => Status::Close,
                    _ => self.run(ctx),
                }
            }
            // No final response begun (nothing, or only an interim 100 Continue, was sent to
            // the client): a 504 is still a valid answer.
            Phase::Forward if self.resp.is_initial() && self.response_code == 0 && self.resp.out.is_empty() => {
                self.start_answer(ctx, 504, true, None);
                self.run(ctx)
            }
            Phase::Request if self.request_began.is_some() && !self.req.storage.unparsed_data().is_empty() => {
                self.start_answer(ctx, 408, true, None);
                self.run(ctx)
            }
            _ => Status::Close,
        }
    }

    fn step_forward(&mut self, ctx: &mut Context<'_>) -> Step {
        let mut progress = false;
        // Client → backend.
        if !self.req.is_terminated() {
            match self.read_front() {
                Io::Data(_) => {
                    kawa::h1::parse(&mut self.req, &mut kawa::h1::NoCallbacks);
                    if self.req.is_error() {
                        return Step::Close;
                    }
                    progress = true;
                }
                Io::Closed | Io::Failed => return Step::Close,
                Io::Blocked => {}
            }
        }
        self.req.prepare(&mut kawa::h1::BlockConverter);
        if let Some(b) = &mut self.back
            && b.writable
            && !self.req.out.is_empty()
        {
            match write_from(&mut b.stream, &mut self.req) {
                Io::Data(_) => progress = true,
                Io::Blocked => b.writable = false,
                Io::Closed | Io::Failed => return self.backend_lost(ctx),
            }
        }
        // Backend → client.
        if !self.resp.is_terminated()
            && let Some(b) = &mut self.back
            && b.readable
        {
            let mut drained = false;
            match read_into(&mut b.stream, &mut self.resp, &mut drained) {
                Io::Data(_) => {
                    if drained {
                        b.readable = false;
                    }
                    if let Some(step) = self.parse_response(ctx) {
                        return step;
                    }
                    progress = true;
                }
                Io::Blocked => {
                    if !self.resp.storage.space().is_empty() {
                        b.readable = false;
                    }
                }
                Io::Closed | Io::Failed => {
                    if self.resp.body_size == BodySize::Empty && self.resp.is_main_phase() {
                        // Close-delimited body: its end is the backend closing.
                        self.resp.parsing_phase = ParsingPhase::Terminated;
                        self.response_close = true;
                        if let Some(b) = &mut self.back {
                            b.reusable = false;
                        }
                        progress = true;
                    } else {
                        return self.backend_lost(ctx);
                    }
                }
            }
        }
        if self.resp.is_main_phase() {
            self.resp.prepare(&mut kawa::h1::BlockConverter);
        }
        if self.front_writable && !self.resp.out.is_empty() {
            match write_from(&mut self.front, &mut self.resp) {
                Io::Data(n) => {
                    self.bytes_out += n as u64;
                    progress = true;
                }
                Io::Blocked => self.front_writable = false,
                Io::Closed | Io::Failed => return Step::Close,
            }
        }
        if self.resp.is_terminated() && self.resp.out.is_empty() && self.resp.blocks.is_empty() {
            return self.response_done(ctx);
        }
        if progress {
            // The backend timeout is a limit on inactivity: an upload or a download that keeps
            // moving is never cut.
            self.deadline = self.backend_response_deadline(ctx);
            Step::Progress
        } else {
            Step::Blocked
        }
    }

    /// Parses what the response buffer holds. Some(step) when the exchange must end here.
    fn parse_response(&mut self, ctx: &mut Context<'_>) -> Option<Step> {
        let mut callbacks = ResponseCallbacks {
            head: self.facts.head,
            request_id: self.facts.request_id.as_ref(),
            set_cookie: self.set_cookie.take(),
            announce_close: ctx.draining || self.facts.close || (self.facts.http10 && !self.facts.keep_alive),
            http10_keep_alive: self.facts.http10 && self.facts.keep_alive,
            backend_close: false,
            front_close: false,
            code: 0,
        };
        let was_initial = !self.resp.is_main_phase();
        kawa::h1::parse(&mut self.resp, &mut callbacks);
        if was_initial && self.resp.is_main_phase() {
            self.first_byte_time = self.routed_at.map(|t| ctx.now.saturating_duration_since(t));
            self.response_close = callbacks.front_close;
            self.backend_close = callbacks.backend_close;
            self.response_code = callbacks.code;
        }
        if callbacks.set_cookie.is_some() {
            self.set_cookie = callbacks.set_cookie;
        }
        if self.resp.is_error() {
            if self.response_code == 0 && self.resp.out.is_empty() {
                self.start_answer(ctx, 502, true, None);
                return Some(Step::Progress);
            }
            return Some(Step::Close);
        }
        self.deadline = self.backend_response_deadline(ctx);
        None
    }

    /// The backend closed or failed in the middle of an exchange.
    fn backend_lost(&mut self, ctx: &mut Context<'_>) -> Step {
        let nothing_sent = self.response_code == 0 && self.resp.storage.is_empty();
        self.release_backend(ctx, false);
        if nothing_sent {
            self.start_answer(ctx, 502, true, None);
            Step::Progress
        } else {
            self.failure = Some(Failure::BackendClosed);
            Step::Close
        }
    }

    fn response_done(&mut self, ctx: &mut Context<'_>) -> Step {
        let code = self.response_code;
        if (100..200).contains(&code) && code != 101 {
            // An interim response (100 Continue): the real one follows, and may already be in
            // the buffer behind it.
            self.resp.clear();
            self.response_code = 0;
            if !self.resp.storage.unparsed_data().is_empty()
                && let Some(step) = self.parse_response(ctx)
            {
                return step;
            }
            return Step::Progress;
        }
        if code == 101 && self.facts.upgrade {
            // The request is complete (an upgrade has no body): from now on, bytes. The
            // buffers become the pipe's, with what arrived behind the request and behind the 101.
            let up_pending = self.req.storage.head..self.req.storage.end;
            let down_pending = self.resp.storage.head..self.resp.storage.end;
            self.pipe = Some(Pipe::with_pending(
                self.req.storage.buffer.take(),
                up_pending,
                self.resp.storage.buffer.take(),
                down_pending,
            ));
            self.phase = Phase::Pipe;
            self.deadline = self.tunnel_deadline(ctx);
            return Step::Progress;
        }
        if !self.req.is_terminated() {
            // The backend answered before the whole request arrived: the rest cannot be
            // delimited reliably, so the connection ends here.
            self.finish_request(ctx, Carrier::Http1, code, None);
            return Step::Close;
        }
        let keep_front = !self.response_close
            && !self.facts.close
            && (!self.facts.http10 || self.facts.keep_alive)
            && !self.front_closed;
        let keep_back = self.back.as_ref().is_some_and(|b| b.reusable)
            && !self.backend_close
            && self.resp.storage.unparsed_data().is_empty();
        self.finish_request(ctx, Carrier::Http1, code, None);
        if !keep_back {
            self.release_backend(ctx, false);
        }
        if !keep_front {
            // The backend can serve another client: it goes to the idle pool.
            self.release_backend(ctx, true);
            return Step::Close;
        }
        self.req.clear();
        self.resp.clear();
        self.resp.storage.clear();
        self.facts = RequestFacts::default();
        self.response_close = false;
        self.backend_close = false;
        self.response_code = 0;
        self.phase = Phase::Request;
        self.deadline = self.idle_deadline(ctx);
        self.release_idle_buffers();
        Step::Progress
    }

    /// Between requests, with nothing buffered, the buffers go back to the pool.
    fn release_idle_buffers(&mut self) {
        if self.req.storage.is_empty() && self.resp.storage.is_empty() {
            self.req.storage.clear();
            self.resp.storage.clear();
            self.req.storage.buffer.release();
            self.resp.storage.buffer.release();
        }
    }

    /// Takes the buffers back before reading a new request; false when the pool is exhausted.
    fn hold_buffers(&mut self) -> bool {
        self.req.storage.buffer.reacquire() && self.resp.storage.buffer.reacquire()
    }

    fn step_answer(&mut self, ctx: &mut Context<'_>) -> Step {
        while self.answer_written < self.answer.len() {
            if !self.front_writable {
                return Step::Blocked;
            }
            let rest = self.answer.get(self.answer_written..).unwrap_or_default();
            match self.front.write(rest) {
                Ok(0) => return Step::Close,
                Ok(n) => {
                    self.answer_written += n;
                    self.bytes_out += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.front_writable = false;
                    return Step::Blocked;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        self.finish_request(ctx, Carrier::Http1, self.answer_code, None);
        if self.close_after {
            self.front.shutdown_write();
            return Step::Close;
        }
        // Keep-alive after an answer to a bodiless request: skip what was parsed of it.
        self.req.blocks.clear();
        self.req.out.clear();
        self.req
            .storage
            .consume(self.req.storage.head.saturating_sub(self.req.storage.start));
        if self.req.storage.should_shift() {
            self.req.storage.shift();
        }
        self.req.clear();
        self.resp.clear();
        self.facts = RequestFacts::default();
        self.answer.clear();
        self.phase = Phase::Request;
        self.deadline = self.idle_deadline(ctx);
        Step::Progress
    }

    fn step_pipe(&mut self, ctx: &mut Context<'_>) -> Step {
        let (Some(pipe), Some(b)) = (&mut self.pipe, &mut self.back) else {
            return Step::Close;
        };
        match pipe.run(&mut self.front, &mut b.stream) {
            Flow::Open { moved } => {
                if moved {
                    self.deadline = self.tunnel_deadline(ctx);
                }
                Step::Blocked
            }
            Flow::Done { failed } => {
                if failed {
                    self.failure = Some(Failure::SocketError);
                }
                Step::Close
            }
        }
    }
}

enum Step {
    Progress,
    Blocked,
    Close,
}
