//! One record per finished request, whatever its protocol, written at one place
//! ([`Records::finish`]): the hook where access logs and metrics attach. A request is finished
//! when its answer was written (a backend's or one of ours), when a tunnel or a TCP connection
//! ends, or when the client or the backend went away in the middle of it.

use std::time::{Duration, Instant};

/// What carried the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Http1,
    /// Bytes after a 101 Switching Protocols (WebSocket and the like).
    Tunnel,
    Tcp,
}

/// Why a request ended without a complete answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client closed (or reset) its connection before the answer was written.
    ClientClosed,
    /// The backend closed in the middle of its answer.
    BackendClosed,
    /// The worker stopped at the end of its grace period with the request still running.
    Drained,
    /// A socket failed (reset, refused) in a tunnel or TCP connection.
    SocketError,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::ClientClosed => "client_closed",
            Failure::BackendClosed => "backend_closed",
            Failure::Drained => "drained",
            Failure::SocketError => "socket_error",
        }
    }
}

/// A finished request. Strings are borrowed from the session: writing a record allocates
/// nothing.
#[derive(Debug, Clone)]
pub struct RequestRecord<'a> {
    pub carrier: Carrier,
    pub listener: &'a str,
    pub cluster: Option<&'a str>,
    pub backend: Option<&'a str>,
    /// The status sent to the client (0 when none was).
    pub status: u16,
    pub began: Instant,
    pub finished: Instant,
    /// Bytes read from the client and written to it for this request.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub failure: Option<Failure>,
}

impl RequestRecord<'_> {
    pub fn duration(&self) -> Duration {
        self.finished.saturating_duration_since(self.began)
    }
}

/// What the worker keeps of the records: counters today (reported by `status`); access logs and
/// metrics read the same records here.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    pub finished: u64,
    /// By status class: 1xx..5xx at 1..=5, no status at 0.
    pub by_class: [u64; 6],
    pub failed: u64,
    pub tunnels: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Records {
    pub fn finish(&mut self, record: &RequestRecord<'_>) {
        self.finished += 1;
        let class = usize::from(record.status / 100).min(5);
        if let Some(slot) = self.by_class.get_mut(class) {
            *slot += 1;
        }
        if record.failure.is_some() {
            self.failed += 1;
        }
        if record.carrier != Carrier::Http1 {
            self.tunnels += 1;
        }
        self.bytes_in += record.bytes_in;
        self.bytes_out += record.bytes_out;
    }

    /// One line for the `status` answer.
    pub fn summary(&self) -> String {
        let [none, _, ok, redirect, client, server] = self.by_class;
        format!(
            "{} request(s) finished (2xx {ok}, 3xx {redirect}, 4xx {client}, 5xx {server}, none {none}; {} failed, {} tunnel(s))",
            self.finished, self.failed, self.tunnels
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_counted_by_class_and_outcome() {
        let now = Instant::now();
        let mut records = Records::default();
        let mut r = RequestRecord {
            carrier: Carrier::Http1,
            listener: "127.0.0.1:80",
            cluster: Some("a"),
            backend: Some("a-0"),
            status: 200,
            began: now,
            finished: now + Duration::from_millis(3),
            bytes_in: 80,
            bytes_out: 500,
            failure: None,
        };
        records.finish(&r);
        r.status = 404;
        records.finish(&r);
        r.status = 0;
        r.failure = Some(Failure::ClientClosed);
        r.carrier = Carrier::Tunnel;
        records.finish(&r);
        assert_eq!(records.finished, 3);
        assert_eq!(records.by_class, [1, 0, 1, 0, 1, 0]);
        assert_eq!(records.failed, 1);
        assert_eq!(records.tunnels, 1);
        assert_eq!(records.bytes_out, 1500);
        assert_eq!(r.duration(), Duration::from_millis(3));
        assert!(
            records
                .summary()
                .starts_with("3 request(s) finished (2xx 1, 3xx 0, 4xx 1")
        );
    }
}
