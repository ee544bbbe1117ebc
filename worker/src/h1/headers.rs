//! What rampart reads in and adds to an HTTP/1.1 request and response: the facts a request's
//! headers state, the forwarding headers and request id, the smuggling and Host checks on the
//! raw header section, and what a response's headers say about its connection.

use std::net::SocketAddr;
use std::rc::Rc;

use kawa::h1::ParserCallbacks;
use kawa::{Block, BodySize, Kawa, Kind, Pair, ParsingPhase, StatusLine, Store};

use crate::ListenerInfo;
use crate::backend::balancer::Rng;
use crate::h1::io::{Io, write_from};
use crate::pool::Checkout;

/// Cookie that pins a client to a backend when the cluster asks for sticky sessions.
const STICKY_COOKIE: &[u8] = b"RAMPARTID";

/// Facts gathered from a request's headers.
#[derive(Default)]
pub(crate) struct RequestFacts {
    pub(crate) head: bool,
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    pub(crate) http10: bool,
    pub(crate) upgrade: bool,
    pub(crate) sticky: Option<Vec<u8>>,
    /// The client's X-Request-Id, or ours; shared by the request and response headers.
    pub(crate) request_id: Option<Rc<[u8]>>,
    pub(crate) has_request_id: bool,
}

/// A request id: 16 hex digits, in one allocation shared by every header that carries it.
pub(crate) fn new_request_id(rng: &mut Rng) -> Rc<[u8]> {
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
    pub(crate) fn new(peer: SocketAddr, listener: &ListenerInfo) -> ClientFacts {
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

pub(crate) struct RequestCallbacks<'a> {
    pub(crate) client: &'a ClientFacts,
    pub(crate) listener: &'a ListenerInfo,
    pub(crate) rng: &'a mut Rng,
    pub(crate) facts: RequestFacts,
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
                    let upgrade = has_token(value, b"upgrade");
                    self.facts.upgrade |= upgrade;
                    // The client's connection options are its own (hop by hop): the backend
                    // connection stays reusable whatever the client does with its own. An
                    // upgrade asks the backend itself, and goes through.
                    elide = !upgrade;
                } else if key.eq_ignore_ascii_case(b"keep-alive") {
                    elide = true;
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

pub(crate) struct ResponseCallbacks<'a> {
    pub(crate) head: bool,
    pub(crate) request_id: Option<&'a Rc<[u8]>>,
    pub(crate) set_cookie: Option<String>,
    /// The client connection closes after this response (the client asked for it, or the
    /// worker is draining): a final response says `Connection: close` (RFC 9112 §9.6).
    pub(crate) announce_close: bool,
    /// An HTTP/1.0 client that asked for keep-alive: told it is kept.
    pub(crate) http10_keep_alive: bool,
    /// Out: the backend will close its connection (it said `Connection: close`).
    pub(crate) backend_close: bool,
    /// Out: the client connection must close after this response (announced, or a body that
    /// ends when the backend closes).
    pub(crate) front_close: bool,
    pub(crate) code: u16,
}

impl ParserCallbacks<Checkout> for ResponseCallbacks<'_> {
    fn on_headers(&mut self, kawa: &mut Kawa<Checkout>) {
        let buf = kawa.storage.buffer();
        if let StatusLine::Response { code, .. } = &kawa.detached.status_line {
            self.code = *code;
        }
        // The backend's Connection and Keep-Alive headers speak of the backend's connection
        // (hop by hop, RFC 9110 §7.6.1): a final response carries ours instead. A backend that
        // closes after this response costs the client nothing: its connection stays open.
        // (A 101 keeps its Connection: Upgrade; an interim response is passed as it is.)
        let final_response = self.code >= 200;
        for block in &mut kawa.blocks {
            let Block::Header(pair) = block else { continue };
            let Some((key, value)) = header_value(buf, pair) else {
                continue;
            };
            if key.eq_ignore_ascii_case(b"connection") {
                self.backend_close |= has_token(value, b"close");
                if final_response {
                    pair.elide();
                }
            } else if final_response && key.eq_ignore_ascii_case(b"keep-alive") {
                pair.elide();
            }
        }
        if self.head && final_response {
            // A response to HEAD has headers only, whatever its Content-Length says.
            kawa.body_size = BodySize::Length(0);
            kawa.parsing_phase = ParsingPhase::Terminated;
        }
        if kawa.body_size == BodySize::Empty && !kawa.is_terminated() {
            // Delimited by the backend closing: the client connection cannot be reused.
            self.backend_close = true;
            self.front_close = true;
        }
        if final_response {
            self.front_close |= self.announce_close;
            if self.front_close {
                kawa.push_block(header(b"Connection", Store::Static(b"close")));
            } else if self.http10_keep_alive {
                kawa.push_block(header(b"Connection", Store::Static(b"keep-alive")));
            }
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

pub(crate) fn header(key: &'static [u8], val: Store) -> Block {
    Block::Header(Pair {
        key: Store::Static(key),
        val,
    })
}

/// Outcome of checking a request's raw header section. Besides framing (smuggling shapes,
/// obs-fold, control characters), the Host rules of RFC 9112 §3.2: more than one Host line, or
/// an HTTP/1.1 request with none, is a 400. (kawa moves the first Host value into the
/// authority and blanks the header's name, so the raw bytes are where the lines are counted.)
pub(crate) fn check_header_section(raw: &[u8]) -> Result<(), u16> {
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
            Io::Data(_) => Some(out.len()),
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
