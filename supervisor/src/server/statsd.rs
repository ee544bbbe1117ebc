//! statsd: once a second the supervisor sends, over UDP, what the merged figures of every
//! worker gained since the last send (counters, `|c`) and what they are now (gauges, `|g`:
//! active connections, worker processes, and each cluster's p50 and p99 request time). The
//! figures are the ones `rampart metrics` and `/metrics` give, so the three always agree; the
//! workers keep no socket of their own for it. Lines are packed into datagrams of at most
//! `MAX_DATAGRAM` bytes; a datagram the socket will not take now is dropped and counted, never
//! waited for.
//!
//! Names: `PREFIX.requests`, `PREFIX.connections.accepted`, ..., and per series
//! `PREFIX.cluster.ID.requests.2xx`, `PREFIX.backend.CLUSTER.ID.requests.5xx`,
//! `PREFIX.listener.ADDRESS.bytes_in` (characters other than letters, digits, `_` and `-`
//! become `_`). With DogStatsD tags the labels are tags instead: `PREFIX.cluster.requests:1|c|#cluster:ID,class:2xx`.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use rampart_command::metrics::Buckets;
use rampart_command::proto::{MetricSeries, MetricsReport};

/// Under the common 1500-byte MTU with IP and UDP headers.
const MAX_DATAGRAM: usize = 1432;
const INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct Statsd {
    socket: UdpSocket,
    pub(super) address: String,
    prefix: String,
    tags: bool,
    /// Counter values last sent, by line key.
    last: HashMap<String, u64>,
    next: Instant,
    pub(super) datagrams: u64,
    pub(super) dropped: u64,
}

fn clean(part: &str) -> String {
    part.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Statsd {
    pub(super) fn open(address: &str, prefix: &str, tags: bool) -> Result<Statsd, String> {
        rampart_command::metrics::check_statsd(address, prefix)?;
        let target: std::net::SocketAddr = address.parse().map_err(|_| format!("bad statsd address `{address}`"))?;
        let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(local).map_err(|e| format!("cannot open a UDP socket for statsd: {e}"))?;
        socket
            .connect(target)
            .map_err(|e| format!("cannot address statsd at {address}: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make the statsd socket non-blocking: {e}"))?;
        Ok(Statsd {
            socket,
            address: address.to_string(),
            prefix: prefix.to_string(),
            tags,
            last: HashMap::new(),
            next: Instant::now() + INTERVAL,
            datagrams: 0,
            dropped: 0,
        })
    }

    /// The lines for this interval. Counters send their increase (their whole value after a
    /// reset, such as a new supervisor); a counter that did not move sends nothing.
    pub(super) fn lines(&mut self, report: &MetricsReport) -> Vec<String> {
        let mut lines = Vec::new();
        let p = self.prefix.clone();
        let t = report.totals.clone().unwrap_or_default();
        for (name, value) in [
            ("requests", t.requests),
            ("connections.accepted", t.connections_accepted),
            ("tls.handshakes", t.tls_handshakes),
            ("tls.handshake_failures", t.tls_handshake_failures),
            ("backend.connect_errors", t.backend_connect_errors),
            ("backend.retries", t.backend_retries),
            ("metrics.series_overflow", t.series_overflow),
        ] {
            self.counter(&mut lines, format!("{p}.{name}"), String::new(), value);
        }
        lines.push(format!("{p}.connections.active:{}|g", t.connections_active));
        lines.push(format!("{p}.worker_processes:{}|g", report.processes));
        for s in &report.series {
            let (kind, path, tags) = self.names(s);
            for (i, class) in ["none", "1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let value = s.status_classes.get(i).copied().unwrap_or(0);
                let (name, tags) = if self.tags {
                    (format!("{p}.{kind}.requests"), format!("{tags},class:{class}"))
                } else {
                    (format!("{p}.{kind}.{path}.requests.{class}"), String::new())
                };
                self.counter(&mut lines, name, tags, value);
            }
            for (metric, value) in [
                ("failed", s.failed),
                ("bytes_in", s.bytes_in),
                ("bytes_out", s.bytes_out),
            ] {
                let (name, tags) = if self.tags {
                    (format!("{p}.{kind}.{metric}"), tags.clone())
                } else {
                    (format!("{p}.{kind}.{path}.{metric}"), String::new())
                };
                self.counter(&mut lines, name, tags, value);
            }
            if kind == "cluster"
                && let Some(h) = &s.request_time
            {
                let mut b = Buckets::default();
                b.add_proto(h);
                for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
                    let ms = b.quantile(q) as f64 / 1000.0;
                    if b.total > 0 {
                        lines.push(if self.tags {
                            format!("{p}.{kind}.request_time.{label}:{ms}|g|#{tags}")
                        } else {
                            format!("{p}.{kind}.{path}.request_time.{label}:{ms}|g")
                        });
                    }
                }
            }
        }
        lines
    }

    fn names(&self, s: &MetricSeries) -> (&'static str, String, String) {
        if !s.backend_id.is_empty() {
            (
                "backend",
                format!("{}.{}", clean(&s.cluster_id), clean(&s.backend_id)),
                format!("cluster:{},backend:{}", clean(&s.cluster_id), clean(&s.backend_id)),
            )
        } else if !s.cluster_id.is_empty() {
            (
                "cluster",
                clean(&s.cluster_id),
                format!("cluster:{}", clean(&s.cluster_id)),
            )
        } else {
            (
                "listener",
                clean(&s.listener),
                format!("listener:{}", clean(&s.listener)),
            )
        }
    }

    fn counter(&mut self, lines: &mut Vec<String>, name: String, tags: String, value: u64) {
        let key = format!("{name}|{tags}");
        let last = self.last.get(&key).copied().unwrap_or(0);
        let delta = if value >= last { value - last } else { value };
        if delta > 0 {
            lines.push(if tags.is_empty() {
                format!("{name}:{delta}|c")
            } else {
                format!("{name}:{delta}|c|#{tags}")
            });
        }
        self.last.insert(key, value);
    }

    /// Sends this interval's lines when the interval is over.
    pub(super) fn tick(&mut self, now: Instant, report: impl FnOnce() -> MetricsReport) {
        if now < self.next {
            return;
        }
        self.next = now + INTERVAL;
        let lines = self.lines(&report());
        let mut datagram = String::new();
        for line in lines {
            if !datagram.is_empty() && datagram.len() + 1 + line.len() > MAX_DATAGRAM {
                self.send(&datagram);
                datagram.clear();
            }
            if !datagram.is_empty() {
                datagram.push('\n');
            }
            datagram.push_str(&line);
        }
        if !datagram.is_empty() {
            self.send(&datagram);
        }
    }

    fn send(&mut self, datagram: &str) {
        match self.socket.send(datagram.as_bytes()) {
            Ok(_) => self.datagrams += 1,
            // Full, or nobody listening (ECONNREFUSED from an earlier datagram): dropped.
            Err(_) => self.dropped += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_command::proto::WorkerTotals;

    fn report(ok: u64) -> MetricsReport {
        MetricsReport {
            series: vec![MetricSeries {
                cluster_id: "shop.eu".into(),
                status_classes: vec![0, 0, ok, 0, 1, 0],
                requests: ok + 1,
                ..Default::default()
            }],
            totals: Some(WorkerTotals {
                requests: ok + 1,
                ..Default::default()
            }),
            processes: 2,
        }
    }

    #[test]
    fn counters_send_what_they_gained_and_names_are_clean() {
        let mut s = Statsd::open("127.0.0.1:9", "edge", false).unwrap();
        let first = s.lines(&report(3));
        assert!(first.contains(&"edge.requests:4|c".to_string()), "{first:?}");
        assert!(
            first.contains(&"edge.cluster.shop_eu.requests.2xx:3|c".to_string()),
            "{first:?}"
        );
        assert!(first.contains(&"edge.worker_processes:2|g".to_string()), "{first:?}");
        let second = s.lines(&report(5));
        assert!(
            second.contains(&"edge.cluster.shop_eu.requests.2xx:2|c".to_string()),
            "{second:?}"
        );
        assert!(
            !second.iter().any(|l| l.contains("requests.4xx")),
            "unchanged counters send nothing: {second:?}"
        );
        // A reset (a new supervisor): the whole value.
        let third = s.lines(&report(1));
        assert!(
            third.contains(&"edge.cluster.shop_eu.requests.2xx:1|c".to_string()),
            "{third:?}"
        );
        let mut tagged = Statsd::open("127.0.0.1:9", "edge", true).unwrap();
        let lines = tagged.lines(&report(3));
        assert!(
            lines.contains(&"edge.cluster.requests:3|c|#cluster:shop_eu,class:2xx".to_string()),
            "{lines:?}"
        );
        assert!(Statsd::open("localhost:8125", "edge", false).is_err());
        assert!(Statsd::open("127.0.0.1:8125", "a b", false).is_err());
    }
}
