//! The syslog mirror: a second copy of every record, as RFC 5424 over a unix datagram socket.
//!
//! This is a small writer of its own over a non-blocking [`UnixDatagram`], not the `syslog`
//! crate: that crate never reconnects after the daemon restarts, does not retry ENOBUFS and may
//! fall back to UDP on its own, and what this mirror needs on top of it (a queue, drop counts,
//! never blocking) is most of the code anyway.
//!
//! The mirror never blocks and never fails its caller: [`SyslogMirror::send`] returns a
//! [`MirrorStatus`], never an error. Messages wait in a bounded queue (10,000 by default) and
//! are sent in order. When the socket is gone or refuses (the daemon restarted: ENOENT,
//! ECONNREFUSED, ENOTCONN, EPIPE), the mirror drops the socket and connects again, once right
//! away and then on every later send, and sends what waited, oldest first. When the daemon is
//! merely busy (EAGAIN, ENOBUFS) the queue waits for the next send. When the queue is full the
//! oldest message is dropped and counted: the newest records, including the latest checkpoint,
//! are the ones a remote collector most needs. The audit file stays the authoritative copy.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use crate::record::{AuditRecord, OutcomeStatus, Stage};

/// Structured-data id: `name@<private enterprise number>`. 32473 is the number RFC 5612
/// reserves for documentation; a deployment with its own number can change it here.
pub const SD_ID: &str = "rampart@32473";

#[derive(Debug, Clone)]
pub struct SyslogOptions {
    /// The syslog daemon's socket.
    pub socket: PathBuf,
    /// Syslog facility number; default 10 (authpriv), where security events belong.
    pub facility: u8,
    pub app_name: String,
    /// Messages kept while the daemon is unreachable.
    pub queue_capacity: usize,
    /// HOSTNAME field; default: the kernel's host name.
    pub hostname: Option<String>,
}

impl Default for SyslogOptions {
    fn default() -> Self {
        SyslogOptions {
            socket: PathBuf::from("/dev/log"),
            facility: 10,
            app_name: "rampart".into(),
            queue_capacity: 10_000,
            hostname: None,
        }
    }
}

/// What happened to a message handed to the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorStatus {
    /// It and everything queued before it reached the daemon's socket.
    Sent,
    /// It waits in the queue (with `queued` messages in all) for the daemon.
    Queued { queued: usize },
}

/// Counters for the supervisor's status report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorStats {
    pub sent: u64,
    /// Messages lost: pushed out of a full queue, or refused by the daemon as too large.
    pub dropped: u64,
    pub queued: usize,
    pub connects: u64,
    pub connected: bool,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct SyslogMirror {
    options: SyslogOptions,
    hostname: String,
    pid: u32,
    socket: Option<UnixDatagram>,
    queue: VecDeque<Vec<u8>>,
    stats: MirrorStats,
}

enum Attempt {
    Sent,
    Busy,
    Disconnected,
    TooLarge,
}

impl SyslogMirror {
    /// A mirror to `options.socket`. It connects on the first send.
    pub fn new(options: SyslogOptions) -> SyslogMirror {
        let hostname = options
            .hostname
            .clone()
            .unwrap_or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "-".into()));
        SyslogMirror {
            hostname: header_token(&hostname, 255),
            pid: std::process::id(),
            socket: None,
            queue: VecDeque::new(),
            stats: MirrorStats::default(),
            options,
        }
    }

    pub fn stats(&self) -> MirrorStats {
        MirrorStats {
            queued: self.queue.len(),
            connected: self.socket.is_some(),
            ..self.stats.clone()
        }
    }

    /// Formats and sends one audit record; `hash` is its chain hash in hex.
    pub fn send_record(&mut self, record: &AuditRecord, hash: &str) -> MirrorStatus {
        let message = format_rfc5424(
            record,
            hash,
            self.options.facility,
            &self.hostname,
            &self.options.app_name,
            self.pid,
        );
        self.send(message.into_bytes())
    }

    /// Queues one message and sends as much of the queue as the daemon takes now.
    pub fn send(&mut self, message: Vec<u8>) -> MirrorStatus {
        while self.queue.len() >= self.options.queue_capacity.max(1) {
            self.queue.pop_front();
            self.stats.dropped += 1;
        }
        self.queue.push_back(message);
        self.flush()
    }

    /// Sends what is queued, in order, until the queue is empty or the daemon cannot take more.
    pub fn flush(&mut self) -> MirrorStatus {
        let mut reconnected = false;
        while !self.queue.is_empty() {
            let attempt = if self.connect() {
                self.attempt()
            } else {
                Attempt::Disconnected
            };
            match attempt {
                Attempt::Sent => {
                    self.queue.pop_front();
                    self.stats.sent += 1;
                }
                Attempt::TooLarge => {
                    self.queue.pop_front();
                    self.stats.dropped += 1;
                }
                Attempt::Busy => break,
                Attempt::Disconnected => {
                    self.socket = None;
                    // One immediate reconnect: the daemon may already be back on a new socket.
                    if reconnected {
                        break;
                    }
                    reconnected = true;
                }
            }
        }
        if self.queue.is_empty() {
            MirrorStatus::Sent
        } else {
            MirrorStatus::Queued {
                queued: self.queue.len(),
            }
        }
    }

    /// Connects if not connected; false when the daemon's socket cannot be reached.
    fn connect(&mut self) -> bool {
        if self.socket.is_some() {
            return true;
        }
        let socket = UnixDatagram::unbound()
            .and_then(|s| s.connect(&self.options.socket).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s));
        match socket {
            Ok(s) => {
                self.stats.connects += 1;
                self.socket = Some(s);
                true
            }
            Err(e) => {
                self.stats.last_error = Some(format!("connect {}: {e}", self.options.socket.display()));
                false
            }
        }
    }

    /// Sends the oldest queued message on the connected socket.
    fn attempt(&mut self) -> Attempt {
        let (Some(socket), Some(message)) = (self.socket.as_ref(), self.queue.front()) else {
            return Attempt::Disconnected;
        };
        match socket.send(message) {
            Ok(_) => Attempt::Sent,
            Err(e) => {
                let outcome = match e.kind() {
                    ErrorKind::WouldBlock | ErrorKind::Interrupted => Attempt::Busy,
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => Attempt::Busy,
                    _ if e.raw_os_error() == Some(libc::EMSGSIZE) => Attempt::TooLarge,
                    _ => Attempt::Disconnected,
                };
                self.stats.last_error = Some(format!("send to {}: {e}", self.options.socket.display()));
                outcome
            }
        }
    }
}

/// A header field: printable ASCII without spaces, at most `max` bytes, `-` when empty.
fn header_token(text: &str, max: usize) -> String {
    let token: String = text.trim().chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if token.is_empty() { "-".into() } else { token }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped with a backslash, control characters dropped.
fn sd_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// One record as an RFC 5424 message:
/// `<PRI>1 TIME HOST APP PID STAGE [rampart@32473 v=.. log=.. seq=.. ...] summary`.
/// Severity is warning (4) for denied and failed requests, notice (5) otherwise. Checkpoints
/// carry `prev`, `checkpoint` and `sig`, everything a remote collector needs to check the
/// signature with the record's TIME and `log`.
pub fn format_rfc5424(
    record: &AuditRecord,
    hash: &str,
    facility: u8,
    hostname: &str,
    app_name: &str,
    pid: u32,
) -> String {
    let status = record.outcome.as_ref().map(|o| o.status);
    let severity = match status {
        Some(OutcomeStatus::Denied | OutcomeStatus::Error) => 4,
        _ => 5,
    };
    let pri = u32::from(facility.min(23)) * 8 + severity;
    let mut params: Vec<(&str, String)> = vec![
        ("v", record.v.to_string()),
        ("log", record.log_id.clone()),
        ("seq", record.seq.to_string()),
        ("action", record.action.clone()),
    ];
    if let Some(actor) = &record.actor {
        params.push(("uid", actor.uid.to_string()));
        params.push(("pid", actor.pid.to_string()));
        if let Some(role) = &actor.role {
            params.push(("role", role.clone()));
        }
    }
    if let Some(id) = &record.request_id {
        params.push(("request_id", id.clone()));
    }
    if let Some(target) = &record.target {
        params.push(("target", target.clone()));
    }
    if let Some(s) = status {
        params.push(("outcome", s.name().to_string()));
    }
    if let Some(after) = &record.state_after {
        params.push(("state_after", after.clone()));
    }
    params.push(("hash", hash.to_string()));
    if let Some(cp) = &record.checkpoint {
        params.push(("checkpoint", cp.kind.name().to_string()));
        params.push(("prev", record.prev.clone()));
        if let Some(sig) = &cp.sig {
            params.push(("sig", sig.clone()));
        }
    }
    let sd: String = params
        .iter()
        .map(|(k, v)| format!(" {k}=\"{}\"", sd_value(v)))
        .collect();
    let mut summary = match &record.actor {
        Some(a) => format!(
            "{} {} by uid {}{}",
            record.stage.name(),
            record.action,
            a.uid,
            a.user.as_ref().map_or(String::new(), |u| format!(" ({u})"))
        ),
        None => format!("{} {}", record.stage.name(), record.action),
    };
    if let Some(t) = &record.target {
        summary.push_str(": ");
        summary.push_str(t);
    }
    if let Some(o) = &record.outcome {
        summary.push_str(" -> ");
        summary.push_str(o.status.name());
        if let Some(m) = &o.message {
            summary.push_str(": ");
            summary.push_str(m);
        }
    }
    let summary: String = summary
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    let msgid = if record.stage == Stage::Checkpoint {
        "checkpoint"
    } else {
        record.stage.name()
    };
    format!(
        "<{pri}>1 {} {hostname} {} {pid} {msgid} [{SD_ID}{sd}] {summary}",
        header_token(&record.time, 64),
        header_token(app_name, 48),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Actor, Outcome};

    fn record(seq: u64) -> AuditRecord {
        AuditRecord {
            v: 1,
            log_id: "ab12".into(),
            seq,
            time: "2025-01-02T03:04:05.678Z".into(),
            stage: Stage::Denied,
            actor: Some(Actor {
                uid: 1000,
                gid: 1000,
                pid: 42,
                user: Some("alice".into()),
                process: None,
                role: Some("viewer".into()),
            }),
            request_id: Some("r\"1]".into()),
            action: "add_cluster".into(),
            target: Some("cluster shop".into()),
            request: None,
            received_seq: None,
            outcome: Some(Outcome::denied("forbidden", "role viewer may not add_cluster")),
            state_before: None,
            state_after: None,
            processes: None,
            torn_tail: None,
            checkpoint: None,
            prev: "00".into(),
            epoch: None,
            mac: None,
        }
    }

    #[test]
    fn formats_rfc5424_with_structured_data() {
        let m = format_rfc5424(&record(7), "deadbeef", 10, "host1", "rampart", 99);
        assert_eq!(
            m,
            "<84>1 2025-01-02T03:04:05.678Z host1 rampart 99 denied [rampart@32473 v=\"1\" log=\"ab12\" \
             seq=\"7\" action=\"add_cluster\" uid=\"1000\" pid=\"42\" role=\"viewer\" request_id=\"r\\\"1\\]\" \
             target=\"cluster shop\" outcome=\"denied\" hash=\"deadbeef\"] denied add_cluster by uid 1000 \
             (alice): cluster shop -> denied: role viewer may not add_cluster"
        );
    }

    fn options(path: PathBuf, capacity: usize) -> SyslogOptions {
        SyslogOptions {
            socket: path,
            queue_capacity: capacity,
            hostname: Some("h".into()),
            ..SyslogOptions::default()
        }
    }

    fn recv_all(socket: &UnixDatagram) -> Vec<String> {
        socket.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn reconnects_and_delivers_the_queue_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let daemon = UnixDatagram::bind(&path).unwrap();
        let mut mirror = SyslogMirror::new(options(path.clone(), 100));
        assert_eq!(mirror.send(b"one".to_vec()), MirrorStatus::Sent);
        assert_eq!(recv_all(&daemon), ["one"]);

        // The daemon goes away: its socket file stays behind, then is removed.
        drop(daemon);
        assert_eq!(mirror.send(b"two".to_vec()), MirrorStatus::Queued { queued: 1 });
        std::fs::remove_file(&path).unwrap();
        assert_eq!(mirror.send(b"three".to_vec()), MirrorStatus::Queued { queued: 2 });
        assert!(!mirror.stats().connected);

        // It comes back on a new socket at the same path.
        let daemon = UnixDatagram::bind(&path).unwrap();
        assert_eq!(mirror.send(b"four".to_vec()), MirrorStatus::Sent);
        assert_eq!(recv_all(&daemon), ["two", "three", "four"]);
        let stats = mirror.stats();
        assert_eq!((stats.sent, stats.dropped, stats.queued), (4, 0, 0));
        assert_eq!(stats.connects, 2);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let mut mirror = SyslogMirror::new(options(path.clone(), 3));
        for i in 0..5 {
            mirror.send(format!("m{i}").into_bytes());
        }
        assert_eq!(mirror.stats().dropped, 2);
        assert_eq!(mirror.stats().queued, 3);
        let daemon = UnixDatagram::bind(&path).unwrap();
        assert_eq!(mirror.flush(), MirrorStatus::Sent);
        assert_eq!(recv_all(&daemon), ["m2", "m3", "m4"]);
    }

    #[test]
    fn a_busy_daemon_keeps_messages_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let daemon = UnixDatagram::bind(&path).unwrap();
        let mut mirror = SyslogMirror::new(options(path, 100_000));
        // Fill the daemon's receive queue without reading it: sends must not block.
        let mut queued = false;
        for i in 0..5_000 {
            if let MirrorStatus::Queued { .. } = mirror.send(vec![b'x'; 512 + i % 7]) {
                queued = true;
                break;
            }
        }
        assert!(queued, "the receive queue never filled");
        let before = mirror.stats();
        assert!(before.connected && before.dropped == 0);
        // Reading makes room; the next flush sends what waited.
        let got = recv_all(&daemon).len();
        assert!(got > 0);
        while mirror.flush() != MirrorStatus::Sent {
            recv_all(&daemon);
        }
        assert_eq!(mirror.stats().dropped, 0);
    }
}
