//! One record per finished request, whatever its protocol, written at one place
//! ([`Records::finish`]): the hook where access logs and metrics attach. A request is finished
//! when its answer was written (a backend's or one of ours), when a tunnel or a TCP connection
//! ends, or when the client or the backend went away in the middle of it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rampart_command::metrics::MergedSeries;
use rampart_command::proto::{MetricSeries, MetricsReport, WorkerTotals};

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
    /// Opening the backend connection, when this request opened one.
    pub connect_time: Option<Duration>,
    /// From routing to the backend's response head.
    pub first_byte_time: Option<Duration>,
}

impl RequestRecord<'_> {
    pub fn duration(&self) -> Duration {
        self.finished.saturating_duration_since(self.began)
    }
}

/// FNV-1a: the series maps are looked up three times per request with keys that come from the
/// configuration (listener addresses, cluster and backend ids), never from a client, so a
/// hash that resists chosen keys (SipHash, the default) buys nothing here and costs most of the
/// lookup.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// One series' figures, and whether they changed since the last report.
#[derive(Default)]
struct Series {
    figures: MergedSeries,
    dirty: bool,
}

impl Series {
    fn add(&mut self, record: &RequestRecord<'_>, class: usize) {
        let f = &mut self.figures;
        if let Some(slot) = f.status_classes.get_mut(class) {
            *slot += 1;
        }
        f.requests += 1;
        f.failed += u64::from(record.failure.is_some());
        f.tunnels += u64::from(record.carrier != Carrier::Http1);
        f.bytes_in += record.bytes_in;
        f.bytes_out += record.bytes_out;
        f.request_time.record(micros(record.duration()));
        if let Some(d) = record.connect_time {
            f.connect_time.record(micros(d));
        }
        if let Some(d) = record.first_byte_time {
            f.first_byte_time.record(micros(d));
        }
        self.dirty = true;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Channel messages stay well under the channel's limit: a report is cut into pieces of about
/// this many encoded bytes.
const REPORT_PIECE: usize = 32 * 1024;

/// What the worker keeps of the records: counters (reported by `status`) and the metric series
/// per listener, cluster and backend, sent to the supervisor by [`Records::reports`]. Writing a
/// record allocates only for a series seen for the first time; at most `max_series` series
/// exist, records beyond that are counted in the totals and in `series_overflow`.
#[derive(Default)]
pub struct Records {
    pub finished: u64,
    /// By status class: 1xx..5xx at 1..=5, no status at 0.
    pub by_class: [u64; 6],
    pub failed: u64,
    pub tunnels: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    listeners: FastMap<String, Series>,
    clusters: FastMap<String, Series>,
    backends: FastMap<String, FastMap<String, Series>>,
    series: usize,
    max_series: usize,
    pub totals: WorkerTotals,
    tls_versions: HashMap<&'static str, u64>,
    /// Something changed since the last report.
    changed: bool,
}

impl Records {
    pub fn new(max_series: usize) -> Records {
        Records {
            max_series,
            ..Default::default()
        }
    }

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
        self.totals.requests += 1;
        self.changed = true;
        let room = self.series < self.max_series;
        let mut overflow = false;
        match self.listeners.get_mut(record.listener) {
            Some(s) => s.add(record, class),
            None if room => {
                let mut s = Series::default();
                s.add(record, class);
                self.listeners.insert(record.listener.to_string(), s);
                self.series += 1;
            }
            None => overflow = true,
        }
        if let Some(cluster) = record.cluster {
            let room = self.series < self.max_series;
            match self.clusters.get_mut(cluster) {
                Some(s) => s.add(record, class),
                None if room => {
                    let mut s = Series::default();
                    s.add(record, class);
                    self.clusters.insert(cluster.to_string(), s);
                    self.series += 1;
                }
                None => overflow = true,
            }
            if let Some(backend) = record.backend {
                let known = self.backends.get(cluster).is_some_and(|b| b.contains_key(backend));
                if known {
                    if let Some(s) = self.backends.get_mut(cluster).and_then(|b| b.get_mut(backend)) {
                        s.add(record, class);
                    }
                } else if self.series < self.max_series {
                    let mut s = Series::default();
                    s.add(record, class);
                    self.backends
                        .entry(cluster.to_string())
                        .or_default()
                        .insert(backend.to_string(), s);
                    self.series += 1;
                } else {
                    overflow = true;
                }
            }
        }
        if overflow {
            self.totals.series_overflow += 1;
        }
    }

    pub fn connection_accepted(&mut self) {
        self.totals.connections_accepted += 1;
        self.changed = true;
    }

    pub fn tls_handshake(&mut self, version: &'static str) {
        self.totals.tls_handshakes += 1;
        *self.tls_versions.entry(version).or_default() += 1;
        self.changed = true;
    }

    pub fn tls_handshake_failed(&mut self) {
        self.totals.tls_handshake_failures += 1;
        self.changed = true;
    }

    pub fn backend_connect_error(&mut self) {
        self.totals.backend_connect_errors += 1;
        self.changed = true;
    }

    pub fn backend_retry(&mut self) {
        self.totals.backend_retries += 1;
        self.changed = true;
    }

    /// The reports to send: the totals and every series that changed since the last call,
    /// in pieces that fit the channel. Empty when nothing changed (and `force` is false).
    pub fn reports(&mut self, active: usize, force: bool) -> Vec<MetricsReport> {
        // Connections that close without finishing a request change nothing else: the
        // gauge of open connections is reason enough to report.
        if !self.changed && !force && self.totals.connections_active == active as u64 {
            return Vec::new();
        }
        self.changed = false;
        self.totals.connections_active = active as u64;
        self.totals.tls_versions = self.tls_versions.iter().map(|(v, n)| ((*v).to_string(), *n)).collect();
        let mut pieces = vec![MetricsReport {
            totals: Some(self.totals.clone()),
            ..Default::default()
        }];
        let mut size = 0usize;
        let mut push = |series: MetricSeries| {
            let len = prost::Message::encoded_len(&series);
            if size + len > REPORT_PIECE && pieces.last().is_some_and(|p| !p.series.is_empty()) {
                pieces.push(MetricsReport::default());
                size = 0;
            }
            size += len;
            if let Some(p) = pieces.last_mut() {
                p.series.push(series);
            }
        };
        let empty = String::new();
        for (listener, s) in self.listeners.iter_mut().filter(|(_, s)| s.dirty) {
            s.dirty = false;
            push(
                s.figures
                    .to_proto(&(listener.clone(), empty.clone(), empty.clone()), false),
            );
        }
        for (cluster, s) in self.clusters.iter_mut().filter(|(_, s)| s.dirty) {
            s.dirty = false;
            push(
                s.figures
                    .to_proto(&(empty.clone(), cluster.clone(), empty.clone()), false),
            );
        }
        for (cluster, backends) in &mut self.backends {
            for (backend, s) in backends.iter_mut().filter(|(_, s)| s.dirty) {
                s.dirty = false;
                push(
                    s.figures
                        .to_proto(&(empty.clone(), cluster.clone(), backend.clone()), false),
                );
            }
        }
        pieces
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
        let mut records = Records::new(100);
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
            connect_time: Some(Duration::from_micros(300)),
            first_byte_time: None,
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
        // A listener, a cluster and a backend series; the report carries them once, then
        // nothing until something changes.
        let reports = records.reports(5, false);
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!(report.series.len(), 3);
        let cluster = report
            .series
            .iter()
            .find(|s| s.cluster_id == "a" && s.backend_id.is_empty())
            .unwrap();
        assert_eq!(cluster.status_classes, vec![1, 0, 1, 0, 1, 0]);
        assert_eq!(cluster.request_time.as_ref().unwrap().total, 3);
        assert_eq!(cluster.connect_time.as_ref().unwrap().total, 3);
        assert_eq!(report.totals.as_ref().unwrap().requests, 3);
        assert_eq!(report.totals.as_ref().unwrap().connections_active, 5);
        assert!(records.reports(5, false).is_empty());
        // Only the number of open connections moved: a report with the totals alone.
        let moved = records.reports(2, false);
        assert_eq!(moved.len(), 1);
        assert!(moved[0].series.is_empty());
        assert_eq!(moved[0].totals.as_ref().unwrap().connections_active, 2);
    }

    fn record<'a>(cluster: &'a str, backend: Option<&'a str>, now: Instant) -> RequestRecord<'a> {
        RequestRecord {
            carrier: Carrier::Http1,
            listener: "l",
            cluster: Some(cluster),
            backend,
            status: 200,
            began: now,
            finished: now + Duration::from_millis(2),
            bytes_in: 1,
            bytes_out: 1,
            failure: None,
            connect_time: None,
            first_byte_time: Some(Duration::from_millis(1)),
        }
    }

    #[test]
    fn series_beyond_the_cap_are_counted_not_kept() {
        let now = Instant::now();
        let mut records = Records::new(2);
        let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        for name in &names {
            records.finish(&record(name, None, now));
        }
        // The listener and the first cluster fit; nine clusters did not.
        assert_eq!(records.series, 2);
        assert_eq!(records.totals.series_overflow, 9);
        assert_eq!(records.totals.requests, 10);
        let report = records.reports(0, false);
        assert_eq!(report.iter().map(|r| r.series.len()).sum::<usize>(), 2);
    }

    #[test]
    fn a_large_report_comes_in_pieces_that_fit_the_channel() {
        let now = Instant::now();
        let mut records = Records::new(10_000);
        let names: Vec<String> = (0..3000).map(|i| format!("cluster-{i}")).collect();
        for name in &names {
            records.finish(&record(name, Some("b"), now));
        }
        let reports = records.reports(0, false);
        assert!(reports.len() > 1);
        for r in &reports {
            assert!(prost::Message::encoded_len(r) < rampart_command::channel::MAX_MESSAGE - 1024);
        }
        assert_eq!(reports.iter().map(|r| r.series.len()).sum::<usize>(), 1 + 3000 * 2);
    }
}
