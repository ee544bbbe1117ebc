//! One HTTP/1.1 client connection: requests parsed with kawa, routed, forwarded to a backend
//! over a kept-alive connection, responses streamed back; pipelined requests are answered in
//! order because the next request is not parsed before the current response is complete.
//!
//! Everything is non-blocking and edge-triggered: `run` makes all the progress the sockets
//! allow, then returns. Memory per connection is two pooled buffers; bodies stream through
//! them whatever their size.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use kawa::h1::ParserCallbacks;
use kawa::{Block, BodySize, Kawa, Kind, Pair, ParsingPhase, StatusLine, Store};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::balancer::{Balancers, Rng};
use crate::pool::Checkout;
use crate::router::Router;
use crate::tls::FrontStream;
use crate::{ListenerInfo, Timeouts};

/// Cookie that pins a client to a backend when the cluster asks for sticky sessions.
const STICKY_COOKIE: &[u8] = b"RAMPARTID";
/// Connection attempts per request before giving up.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// What the event loop must do with a session after `run`.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    Open,
    Close,
}

/// Shared, per-worker things a session needs while it runs.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub router: &'a Router,
    pub balancers: &'a mut Balancers,
    pub rng: &'a mut Rng,
    pub now: Instant,
    pub timeouts: &'a Timeouts,
}

struct Backend {
    stream: TcpStream,
    cluster: String,
    backend_id: String,
    connected: bool,
    readable: bool,
    writable: bool,
    /// The backend may be used for another request after this response.
    reusable: bool,
}

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

/// Facts gathered from a request's headers.
#[derive(Default)]
struct RequestFacts {
    head: bool,
    close: bool,
    keep_alive: bool,
    http10: bool,
    upgrade: bool,
    sticky: Option<Vec<u8>>,
    /// The client's X-Request-Id, or ours; shared by the request and response headers.
    request_id: Option<Rc<[u8]>>,
    has_request_id: bool,
}

/// A request id: 16 hex digits, in one allocation shared by every header that carries it.
fn new_request_id(rng: &mut Rng) -> Rc<[u8]> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut value = rng.next_u64();
    let mut digits = [0u8; 16];
    for d in digits.iter_mut().rev() {
        *d = HEX.get((value & 0xf) as usize).copied().unwrap_or(b'0');
        value >>= 4;
    }
    Rc::from(&digits[..])
}

/// What a request's headers say about the connection, the same for every request on it: built
/// once per connection and shared (not copied) into each request's headers.
pub struct ClientFacts {
    ip: Rc<[u8]>,
    forwarded: Rc<[u8]>,
}

impl ClientFacts {
    fn new(peer: SocketAddr, listener: &ListenerInfo) -> ClientFacts {
        let ip = peer.ip().to_string();
        let proto = if listener.https { "https" } else { "http" };
        let for_value = if peer.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.clone()
        };
        ClientFacts {
            ip: Rc::from(ip.as_bytes()),
            forwarded: Rc::from(format!("for={for_value};proto={proto};by={}", listener.by).as_bytes()),
        }
    }
}

struct RequestCallbacks<'a> {
    client: &'a ClientFacts,
    listener: &'a ListenerInfo,
    rng: &'a mut Rng,
    facts: RequestFacts,
}

fn header_value<'b>(buf: &'b [u8], pair: &'b Pair) -> Option<(&'b [u8], &'b [u8])> {
    Some((pair.key.data_opt(buf)?, pair.val.data_opt(buf)?))
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

impl ParserCallbacks<Checkout> for RequestCallbacks<'_> {
    fn on_headers(&mut self, kawa: &mut Kawa<Checkout>) {
        let buf = kawa.storage.buffer();
        if let StatusLine::Request { method, version, .. } = &kawa.detached.status_line {
            self.facts.head = method.data_opt(buf) == Some(b"HEAD");
            self.facts.http10 = matches!(version, kawa::Version::V10);
        }
        let mut forwarded_for: Option<usize> = None;
        for (i, block) in kawa.blocks.iter_mut().enumerate() {
            let Block::Header(pair) = block else { continue };
            let mut elide = false;
            {
                let Some((key, value)) = header_value(buf, pair) else {
                    continue;
                };
                if key.eq_ignore_ascii_case(b"connection") {
                    self.facts.close |= has_token(value, b"close");
                    self.facts.keep_alive |= has_token(value, b"keep-alive");
                    self.facts.upgrade |= has_token(value, b"upgrade");
                } else if key.eq_ignore_ascii_case(b"x-forwarded-for") {
                    forwarded_for = Some(i);
                } else if key.eq_ignore_ascii_case(b"x-forwarded-proto")
                    || key.eq_ignore_ascii_case(b"x-forwarded-port")
                {
                    // Ours replace whatever the client claimed.
                    elide = true;
                } else if key.eq_ignore_ascii_case(b"x-request-id") && !value.is_empty() && value.len() <= 200 {
                    self.facts.request_id = Some(Rc::from(String::from_utf8_lossy(value).as_bytes()));
                    self.facts.has_request_id = true;
                }
            }
            if elide {
                pair.elide();
            }
        }
        for crumb in &kawa.detached.jar {
            if crumb.key.data_opt(buf) == Some(STICKY_COOKIE) {
                self.facts.sticky = crumb.val.data_opt(buf).map(<[u8]>::to_vec);
            }
        }
        let proto: &'static [u8] = if self.listener.https { b"https" } else { b"http" };
        match forwarded_for.and_then(|i| kawa.blocks.get_mut(i)) {
            Some(Block::Header(pair)) => {
                let mut joined = pair.val.data_opt(buf).map(<[u8]>::to_vec).unwrap_or_default();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(&self.client.ip);
                pair.val = Store::from_vec(joined);
            }
            _ => kawa.push_block(header(b"X-Forwarded-For", Store::Shared(self.client.ip.clone(), 0))),
        }
        kawa.push_block(header(b"X-Forwarded-Proto", Store::Static(proto)));
        kawa.push_block(header(
            b"X-Forwarded-Port",
            Store::Shared(self.listener.port_value.clone(), 0),
        ));
        kawa.push_block(header(b"Forwarded", Store::Shared(self.client.forwarded.clone(), 0)));
        if !self.facts.has_request_id {
            let id = new_request_id(self.rng);
            kawa.push_block(header(b"X-Request-Id", Store::Shared(id.clone(), 0)));
            self.facts.request_id = Some(id);
        }
    }
}

struct ResponseCallbacks<'a> {
    head: bool,
    request_id: Option<&'a Rc<[u8]>>,
    set_cookie: Option<String>,
    close: bool,
    code: u16,
}

impl ParserCallbacks<Checkout> for ResponseCallbacks<'_> {
    fn on_headers(&mut self, kawa: &mut Kawa<Checkout>) {
        let buf = kawa.storage.buffer();
        if let StatusLine::Response { code, .. } = &kawa.detached.status_line {
            self.code = *code;
        }
        for block in &kawa.blocks {
            if let Block::Header(pair) = block
                && let Some((key, value)) = header_value(buf, pair)
                && key.eq_ignore_ascii_case(b"connection")
                && has_token(value, b"close")
            {
                self.close = true;
            }
        }
        if self.head && self.code >= 200 {
            // A response to HEAD has headers only, whatever its Content-Length says.
            kawa.body_size = BodySize::Length(0);
            kawa.parsing_phase = ParsingPhase::Terminated;
        }
        if kawa.body_size == BodySize::Empty && !kawa.is_terminated() {
            // Delimited by the backend closing: the client connection cannot be reused.
            self.close = true;
        }
        if self.code >= 200 || self.code == 101 {
            if let Some(id) = self.request_id {
                kawa.push_block(header(b"X-Request-Id", Store::Shared(id.clone(), 0)));
            }
            if let Some(cookie) = self.set_cookie.take() {
                kawa.push_block(header(b"Set-Cookie", Store::from_string(cookie)));
            }
        }
    }
}

fn header(key: &'static [u8], val: Store) -> Block {
    Block::Header(Pair {
        key: Store::Static(key),
        val,
    })
}

/// Outcome of checking a request's raw header section. Besides framing (smuggling shapes,
/// obs-fold, control characters), the Host rules of RFC 9112 §3.2: more than one Host line, or
/// an HTTP/1.1 request with none, is a 400. (kawa moves the first Host value into the
/// authority and blanks the header's name, so the raw bytes are where the lines are counted.)
fn check_header_section(raw: &[u8]) -> Result<(), u16> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(400u16)?;
    // Every line, the last one included, ends with CRLF.
    let section = raw.get(..end + 2).ok_or(400u16)?;
    let mut lines = section.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let http10 = request_line.trim_ascii_end().ends_with(b" HTTP/1.0");
    let mut hosts = 0usize;
    let mut content_lengths: Vec<&[u8]> = Vec::new();
    let mut transfer_encoding = false;
    for line in lines {
        let line = line.strip_suffix(b"\r").ok_or(400u16)?;
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(400); // obs-fold
        }
        if line.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
            return Err(400); // control characters
        }
        let colon = line.iter().position(|b| *b == b':').ok_or(400u16)?;
        let name = line.get(..colon).ok_or(400u16)?;
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(400);
        }
        let value = line.get(colon + 1..).unwrap_or_default().trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            content_lengths.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        }
    }
    if hosts > 1 || (hosts == 0 && !http10) {
        return Err(400);
    }
    if transfer_encoding && !content_lengths.is_empty() {
        return Err(400);
    }
    if content_lengths.windows(2).any(|w| w.first() != w.get(1)) {
        return Err(400);
    }
    Ok(())
}

enum Io {
    Data,
    Blocked,
    Closed,
    Failed,
}

/// Reads what fits. `drained` is set when the read returned less than the room it had: the
/// socket is then empty, and with edge-triggered readiness a new event will announce new bytes,
/// so the caller can skip the read that would only say EAGAIN.
fn read_into<S: Read>(stream: &mut S, kawa: &mut Kawa<Checkout>, drained: &mut bool) -> Io {
    let space = kawa.storage.space();
    if space.is_empty() {
        return Io::Blocked;
    }
    let room = space.len();
    loop {
        match stream.read(space) {
            Ok(0) => return Io::Closed,
            Ok(n) => {
                kawa.storage.fill(n);
                *drained = n < room;
                return Io::Data;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Io::Blocked,
            Err(_) => return Io::Failed,
        }
    }
}

thread_local! {
    /// Where many small pieces (a header block is four slices per header) are gathered into
    /// one write: the kernel copies one buffer faster than forty iovecs.
    static GATHER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(GATHER_LIMIT));
}
const GATHER_LIMIT: usize = 8192;

fn write_from<S: Write>(stream: &mut S, kawa: &mut Kawa<Checkout>) -> Io {
    let written = {
        let slices = kawa.as_io_slice();
        if slices.is_empty() {
            return Io::Blocked;
        }
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if slices.len() > 4 && total <= GATHER_LIMIT {
            let result = GATHER.with(|g| {
                let mut g = g.borrow_mut();
                g.clear();
                for slice in &slices {
                    g.extend_from_slice(slice);
                }
                loop {
                    match stream.write(&g) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
            });
            match result {
                Ok(0) => return Io::Closed,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Io::Blocked,
                Err(_) => return Io::Failed,
            }
        } else {
            loop {
                match stream.write_vectored(&slices) {
                    Ok(0) => return Io::Closed,
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Io::Blocked,
                    Err(_) => return Io::Failed,
                }
            }
        }
    };
    kawa.consume(written);
    Io::Data
}

/// Raw copy from one kawa buffer's unconsumed bytes to a socket (pipe mode).
fn write_raw<S: Write>(stream: &mut S, kawa: &mut Kawa<Checkout>) -> Io {
    let data = kawa.storage.data();
    if data.is_empty() {
        return Io::Blocked;
    }
    match stream.write(data) {
        Ok(0) => Io::Closed,
        Ok(n) => {
            kawa.storage.consume(n);
            if kawa.storage.should_shift() {
                kawa.storage.shift();
            }
            Io::Data
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Io::Blocked,
        Err(_) => Io::Failed,
    }
}

pub struct HttpSession {
    pub front: FrontStream,
    client: ClientFacts,
    pub listener: Rc<ListenerInfo>,
    back_token: Token,
    front_readable: bool,
    front_writable: bool,
    front_closed: bool,
    back: Option<Backend>,
    req: Kawa<Checkout>,
    resp: Kawa<Checkout>,
    phase: Phase,
    facts: RequestFacts,
    response_close: bool,
    response_code: u16,
    set_cookie: Option<String>,
    cluster: Option<String>,
    /// Ids of the backends this request tried (ids, not positions: a runtime change in between
    /// reorders the cluster's list).
    tried: Vec<String>,
    connect_timed_out: bool,
    answer: Vec<u8>,
    answer_written: usize,
    close_after: bool,
    /// Where the current request starts in the request buffer.
    request_start: usize,
    request_began: Option<Instant>,
    /// The TLS handshake is not complete: the deadline is the handshake timeout.
    handshaking: bool,
    pub deadline: Instant,
}

impl HttpSession {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        front: FrontStream,
        peer: SocketAddr,
        listener: Rc<ListenerInfo>,
        back_token: Token,
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
            client: ClientFacts::new(peer, &listener),
            listener,
            back_token,
            front_readable: true,
            front_writable: true,
            front_closed: false,
            back: None,
            req: Kawa::new(Kind::Request, kawa::Buffer::new(req_buf)),
            resp: Kawa::new(Kind::Response, kawa::Buffer::new(resp_buf)),
            phase: Phase::Request,
            facts: RequestFacts::default(),
            response_close: false,
            response_code: 0,
            set_cookie: None,
            cluster: None,
            tried: Vec::new(),
            connect_timed_out: false,
            answer: Vec::new(),
            answer_written: 0,
            close_after: false,
            request_start: 0,
            request_began: None,
            handshaking,
            deadline: now + first_deadline,
        }
    }

    pub fn front_event(&mut self, readable: bool, writable: bool) {
        self.front_readable |= readable;
        self.front_writable |= writable;
    }

    pub fn back_event(&mut self, readable: bool, writable: bool) {
        if let Some(b) = &mut self.back {
            b.readable |= readable;
            b.writable |= writable;
        }
    }

    /// Releases the backend connection (counted in the balancer) and deregisters it.
    pub fn drop_backend(&mut self, ctx: &mut Context<'_>) {
        if let Some(mut b) = self.back.take() {
            let _ = ctx.registry.deregister(&mut b.stream);
            ctx.balancers.connection_closed(&b.cluster, &b.backend_id);
        }
    }

    pub fn close(&mut self, ctx: &mut Context<'_>) {
        self.drop_backend(ctx);
        if let Some(tcp) = self.front.tcp_mut() {
            let _ = ctx.registry.deregister(tcp);
        }
    }

    fn idle_deadline(&self, ctx: &Context<'_>) -> Instant {
        ctx.now + self.listener.timeouts.client_idle.unwrap_or(ctx.timeouts.client_idle)
    }

    fn start_answer(&mut self, ctx: &mut Context<'_>, code: u16, close: bool, location: Option<&str>) {
        // A client that asked to close (Connection: close, or HTTP/1.0 without keep-alive) gets
        // the connection closed after our answer too (RFC 9112 §9.6), as after a backend's.
        let close = close || self.facts.close || (self.facts.http10 && !self.facts.keep_alive);
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
        self.close_after = close;
        self.phase = Phase::Answer;
        self.drop_backend(ctx);
        self.deadline = self.idle_deadline(ctx);
    }

    /// Makes all the progress the sockets allow.
    pub fn run(&mut self, ctx: &mut Context<'_>) -> Status {
        for _ in 0..10_000 {
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
        Status::Open
    }

    /// Once the handshake is complete, the connection waits for its first request under the
    /// idle timeout (a request that already began has its own deadline).
    fn handshake_settled(&mut self, ctx: &Context<'_>) {
        if self.handshaking && !self.front.in_handshake() {
            self.handshaking = false;
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
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => b.readable = false,
                _ => self.drop_backend(ctx),
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
                Io::Data => {}
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
                Io::Data => Step::Progress,
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

    fn route(&mut self, ctx: &mut Context<'_>) -> Step {
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
            self.deadline = ctx.now
                + self
                    .listener
                    .timeouts
                    .backend_response
                    .unwrap_or(ctx.timeouts.backend_response);
            return Step::Progress;
        }
        self.drop_backend(ctx);
        self.connect(ctx)
    }

    fn connect(&mut self, ctx: &mut Context<'_>) -> Step {
        let Some(cluster_id) = self.cluster.clone() else {
            self.start_answer(ctx, 503, true, None);
            return Step::Progress;
        };
        let sticky = self.facts.sticky.clone();
        let Some(cluster) = ctx.balancers.clusters.get_mut(&cluster_id) else {
            self.start_answer(ctx, 503, true, None);
            return Step::Progress;
        };
        let sticky_enabled = cluster.sticky;
        let Some(slot) = cluster.pick(
            ctx.rng,
            ctx.now,
            if sticky_enabled { sticky.as_deref() } else { None },
            &self.tried,
        ) else {
            let code = if self.tried.is_empty() {
                503
            } else if self.connect_timed_out {
                504
            } else {
                502
            };
            let close = !self.req.is_terminated();
            self.start_answer(ctx, code, close, None);
            return Step::Progress;
        };
        let (address, backend_id) = (slot.address, slot.id.clone());
        self.tried.push(backend_id.clone());
        if sticky_enabled && sticky.as_deref() != Some(backend_id.as_bytes()) {
            self.set_cookie = Some(format!("RAMPARTID={backend_id}; Path=/; HttpOnly"));
        }
        match TcpStream::connect(address) {
            Ok(mut stream) => {
                if ctx
                    .registry
                    .register(&mut stream, self.back_token, Interest::READABLE | Interest::WRITABLE)
                    .is_err()
                {
                    cluster.failed(&backend_id, ctx.now);
                    return Step::Progress;
                }
                let _ = stream.set_nodelay(true);
                ctx.balancers.connection_opened(&cluster_id, &backend_id);
                self.back = Some(Backend {
                    stream,
                    cluster: cluster_id,
                    backend_id,
                    connected: false,
                    readable: false,
                    writable: false,
                    reusable: true,
                });
                self.phase = Phase::Connecting;
                self.deadline = ctx.now
                    + self
                        .listener
                        .timeouts
                        .backend_connect
                        .unwrap_or(ctx.timeouts.backend_connect);
                Step::Progress
            }
            Err(_) => {
                cluster.failed(&backend_id, ctx.now);
                if self.tried.len() >= MAX_CONNECT_ATTEMPTS {
                    let close = !self.req.is_terminated();
                    self.start_answer(ctx, 502, close, None);
                    return Step::Progress;
                }
                self.connect(ctx)
            }
        }
    }

    fn connect_failed(&mut self, ctx: &mut Context<'_>) -> Step {
        if let Some(b) = &self.back
            && let Some(c) = ctx.balancers.clusters.get_mut(&b.cluster)
        {
            c.failed(&b.backend_id, ctx.now);
        }
        self.drop_backend(ctx);
        if self.tried.len() >= MAX_CONNECT_ATTEMPTS {
            let code = if self.connect_timed_out { 504 } else { 502 };
            let close = !self.req.is_terminated();
            self.start_answer(ctx, code, close, None);
            return Step::Progress;
        }
        self.connect(ctx)
    }

    fn step_connecting(&mut self, ctx: &mut Context<'_>) -> Step {
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
                b.connected = true;
                if let Some(c) = ctx.balancers.clusters.get_mut(&b.cluster) {
                    c.succeeded(&b.backend_id);
                }
                self.phase = Phase::Forward;
                self.deadline = ctx.now
                    + self
                        .listener
                        .timeouts
                        .backend_response
                        .unwrap_or(ctx.timeouts.backend_response);
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                b.writable = false;
                b.readable = false;
                Step::Blocked
            }
            Err(_) => self.connect_failed(ctx),
        }
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
            Phase::Forward if self.resp.is_initial() && self.resp.storage.is_empty() => {
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
                Io::Data => {
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
                Io::Data => progress = true,
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
                Io::Data => {
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
                Io::Data => progress = true,
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
            self.deadline = ctx.now
                + self
                    .listener
                    .timeouts
                    .backend_response
                    .unwrap_or(ctx.timeouts.backend_response);
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
            close: false,
            code: 0,
        };
        let was_initial = !self.resp.is_main_phase();
        kawa::h1::parse(&mut self.resp, &mut callbacks);
        if was_initial && self.resp.is_main_phase() {
            self.response_close = callbacks.close;
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
        self.deadline = ctx.now
            + self
                .listener
                .timeouts
                .backend_response
                .unwrap_or(ctx.timeouts.backend_response);
        None
    }

    /// The backend closed or failed in the middle of an exchange.
    fn backend_lost(&mut self, ctx: &mut Context<'_>) -> Step {
        let nothing_sent = self.response_code == 0 && self.resp.storage.is_empty();
        self.drop_backend(ctx);
        if nothing_sent {
            self.start_answer(ctx, 502, true, None);
            Step::Progress
        } else {
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
            // The request is complete (an upgrade has no body): from now on, bytes.
            self.phase = Phase::Pipe;
            self.deadline = self.idle_deadline(ctx);
            return Step::Progress;
        }
        if !self.req.is_terminated() {
            // The backend answered before the whole request arrived: the rest cannot be
            // delimited reliably, so the connection ends here.
            return Step::Close;
        }
        let keep_front = !self.response_close
            && !self.facts.close
            && (!self.facts.http10 || self.facts.keep_alive)
            && !self.front_closed;
        if let Some(b) = &self.back
            && (!b.reusable || self.response_close || !self.resp.storage.unparsed_data().is_empty())
        {
            self.drop_backend(ctx);
        }
        if !keep_front {
            return Step::Close;
        }
        self.req.clear();
        self.resp.clear();
        self.resp.storage.clear();
        self.facts = RequestFacts::default();
        self.response_close = false;
        self.response_code = 0;
        self.request_began = None;
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

    fn step_answer(&mut self, _ctx: &mut Context<'_>) -> Step {
        while self.answer_written < self.answer.len() {
            if !self.front_writable {
                return Step::Blocked;
            }
            let rest = self.answer.get(self.answer_written..).unwrap_or_default();
            match self.front.write(rest) {
                Ok(0) => return Step::Close,
                Ok(n) => self.answer_written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.front_writable = false;
                    return Step::Blocked;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
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
        self.request_began = None;
        self.answer.clear();
        self.phase = Phase::Request;
        Step::Progress
    }

    fn step_pipe(&mut self, ctx: &mut Context<'_>) -> Step {
        let mut progress = false;
        let Some(b) = &mut self.back else { return Step::Close };
        // Client → backend: whatever the client sent after the upgrade request is in the request
        // buffer past the parsed part.
        if self.front_readable {
            match read_into(&mut self.front, &mut self.req, &mut false) {
                Io::Data => progress = true,
                Io::Blocked => {
                    if !self.req.storage.space().is_empty() {
                        self.front_readable = false;
                    }
                }
                Io::Closed | Io::Failed => {
                    let _ = b.stream.shutdown(std::net::Shutdown::Write);
                    return Step::Close;
                }
            }
        }
        if self.req.storage.head > self.req.storage.start {
            // Bytes already forwarded as part of the request: drop them from the pipe's view.
            let parsed = self.req.storage.head - self.req.storage.start;
            self.req.storage.consume(parsed);
        }
        self.req.storage.head = self.req.storage.end;
        if b.writable && !self.req.storage.data().is_empty() {
            match write_raw(&mut b.stream, &mut self.req) {
                Io::Data => progress = true,
                Io::Blocked => b.writable = false,
                Io::Closed | Io::Failed => return Step::Close,
            }
            self.req.storage.head = self.req.storage.end;
        }
        if b.readable {
            match read_into(&mut b.stream, &mut self.resp, &mut false) {
                Io::Data => progress = true,
                Io::Blocked => {
                    if !self.resp.storage.space().is_empty() {
                        b.readable = false;
                    }
                }
                Io::Closed | Io::Failed => {
                    if self.resp.storage.data().is_empty() {
                        return Step::Close;
                    }
                }
            }
        }
        if self.resp.storage.head > self.resp.storage.start {
            let parsed = self.resp.storage.head - self.resp.storage.start;
            self.resp.storage.consume(parsed);
        }
        self.resp.storage.head = self.resp.storage.end;
        if self.front_writable && !self.resp.storage.data().is_empty() {
            match write_raw(&mut self.front, &mut self.resp) {
                Io::Data => progress = true,
                Io::Blocked => self.front_writable = false,
                Io::Closed | Io::Failed => return Step::Close,
            }
            self.resp.storage.head = self.resp.storage.end;
        }
        if progress {
            self.deadline = self.idle_deadline(ctx);
            Step::Progress
        } else {
            Step::Blocked
        }
    }
}

enum Step {
    Progress,
    Blocked,
    Close,
}

/// One request through the path a proxied request takes inside a worker, without sockets: kawa
/// parses it, the header checks run, the forwarding headers and request id are added, and it is
/// converted and written as it would go to the backend (here into a `Vec`). For the criterion
/// benchmark `cargo bench -p rampart-worker --bench hot_paths`; the proxy does not use it.
#[doc(hidden)]
pub struct RequestPath {
    pool: crate::pool::Pool,
    listener: ListenerInfo,
    client: ClientFacts,
    rng: Rng,
}

impl Default for RequestPath {
    fn default() -> Self {
        let listener = ListenerInfo::from_proto(&rampart_command::proto::Listener {
            address: "127.0.0.1:8080".into(),
            protocol: rampart_command::proto::Protocol::Http as i32,
            active: true,
            ..Default::default()
        });
        let peer = SocketAddr::from(([192, 0, 2, 7], 40000));
        RequestPath {
            pool: crate::pool::Pool::new(16 * 1024, 4),
            client: ClientFacts::new(peer, &listener),
            listener,
            rng: Rng::new(),
        }
    }
}

impl RequestPath {
    /// The number of bytes that would go to the backend; None when the request is refused.
    pub fn run(&mut self, request: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut req = Kawa::new(Kind::Request, kawa::Buffer::new(self.pool.checkout()?));
        let space = req.storage.space();
        let n = request.len().min(space.len());
        space.get_mut(..n)?.copy_from_slice(request.get(..n)?);
        req.storage.fill(n);
        let mut callbacks = RequestCallbacks {
            client: &self.client,
            listener: &self.listener,
            rng: &mut self.rng,
            facts: RequestFacts::default(),
        };
        kawa::h1::parse(&mut req, &mut callbacks);
        if req.is_error() || !req.is_main_phase() {
            return None;
        }
        check_header_section(req.storage.buffer().get(..req.storage.end)?).ok()?;
        req.prepare(&mut kawa::h1::BlockConverter);
        out.clear();
        match write_from(out, &mut req) {
            Io::Data => Some(out.len()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_header_section;

    #[test]
    fn smuggling_shapes_are_refused() {
        let ok = b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(check_header_section(ok), Ok(()));
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(check_header_section(both), Err(400));
        let differing = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(check_header_section(differing), Err(400));
        let same = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(check_header_section(same), Ok(()));
        let fold = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n";
        assert_eq!(check_header_section(fold), Err(400));
        let ctl = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n";
        assert_eq!(check_header_section(ctl), Err(400));
        let space_name = b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\n";
        assert_eq!(check_header_section(space_name), Err(400));
        let bare_lf = b"GET / HTTP/1.1\nHost: a\n\n";
        assert_eq!(check_header_section(bare_lf), Err(400));
    }

    #[test]
    fn host_lines_follow_rfc_9112() {
        let two = b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n";
        assert_eq!(check_header_section(two), Err(400));
        let same_twice = b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n";
        assert_eq!(check_header_section(same_twice), Err(400));
        let none = b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n";
        assert_eq!(check_header_section(none), Err(400));
        let absolute_without_host = b"GET http://a/ HTTP/1.1\r\n\r\n";
        assert_eq!(check_header_section(absolute_without_host), Err(400));
        let http10 = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(check_header_section(http10), Ok(()));
        let http10_two = b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n";
        assert_eq!(check_header_section(http10_two), Err(400));
        let one = b"GET / HTTP/1.1\r\nX-Host: b\r\nHost: a\r\n\r\n";
        assert_eq!(check_header_section(one), Ok(()));
    }
}
