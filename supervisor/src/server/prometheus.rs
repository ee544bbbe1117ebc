//! The Prometheus exporter: `[metrics] prometheus = "ADDRESS"` makes the supervisor serve the
//! merged figures of every worker in the text exposition format (version 0.0.4) at
//! `GET /metrics` on that address. Nothing else is served: another path is a 404, another
//! method a 405. The socket is bound at start (before the supervisor narrows itself) and handed
//! over by an upgrade like the listeners.
//!
//! Scrapes are served from the supervisor's event loop without blocking it: at most
//! `MAX_SCRAPES` at once (more are closed at accept), each with `SCRAPE_TIMEOUT` to send its
//! request head (at most `MAX_HEAD` bytes) and read the answer.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};
use rampart_command::metrics::{BUCKETS, Buckets, bucket_bound};
use rampart_command::proto::{Histogram, MetricSeries, MetricsReport};
use slab::Slab;

use super::Supervisor;

pub(super) const PROMETHEUS: Token = Token(3);
pub(super) const SCRAPE_BASE: usize = 10;
const MAX_SCRAPES: usize = 16;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 8192;

pub(super) struct Exporter {
    pub(super) listener: TcpListener,
    pub(super) address: String,
    scrapes: Slab<Scrape>,
}

struct Scrape {
    stream: TcpStream,
    head: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    deadline: Instant,
}

impl Exporter {
    pub(super) fn new(listener: TcpListener, address: String) -> Exporter {
        Exporter {
            listener,
            address,
            scrapes: Slab::new(),
        }
    }
}

/// What to answer to a request head: the status line and whether it is the metrics.
fn route(head: &[u8]) -> Result<(), &'static str> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    if path != b"/metrics" {
        return Err("404 Not Found");
    }
    if method != b"GET" {
        return Err("405 Method Not Allowed");
    }
    Ok(())
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Supervisor {
    pub(super) fn prometheus_accept(&mut self) {
        let Some(exporter) = &mut self.prometheus else { return };
        loop {
            let (mut stream, _) = match exporter.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if exporter.scrapes.len() >= MAX_SCRAPES {
                continue; // closed: the scraper retries at its next interval
            }
            let entry = exporter.scrapes.vacant_entry();
            let token = Token(SCRAPE_BASE + entry.key());
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            entry.insert(Scrape {
                stream,
                head: Vec::new(),
                out: Vec::new(),
                written: 0,
                deadline: Instant::now() + SCRAPE_TIMEOUT,
            });
        }
    }

    pub(super) fn prometheus_event(&mut self, key: usize) {
        let metrics = &self.metrics;
        let Some(exporter) = &mut self.prometheus else { return };
        let Some(scrape) = exporter.scrapes.get_mut(key) else {
            return;
        };
        // The figures are merged once per scrape, when its head is complete.
        let done = serve(scrape, || render(&metrics.report("", "")));
        if done && let Some(mut scrape) = exporter.scrapes.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut scrape.stream);
        }
    }

    /// Scrapes past their deadline are closed.
    pub(super) fn prometheus_tick(&mut self, now: Instant) {
        let Some(exporter) = &mut self.prometheus else { return };
        let late: Vec<usize> = exporter
            .scrapes
            .iter()
            .filter(|(_, s)| now >= s.deadline)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            if let Some(mut scrape) = exporter.scrapes.try_remove(key) {
                let _ = self.poll.registry().deregister(&mut scrape.stream);
            }
        }
    }
}

/// Reads the head, then writes the answer; true when the scrape is over.
fn serve(scrape: &mut Scrape, body: impl FnOnce() -> String) -> bool {
    if scrape.out.is_empty() {
        let mut buf = [0u8; 2048];
        loop {
            match scrape.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    scrape.head.extend_from_slice(buf.get(..n).unwrap_or_default());
                    if scrape.head.len() > MAX_HEAD {
                        scrape.out = response("431 Request Header Fields Too Large", "text/plain", "head too large\n");
                        break;
                    }
                    if scrape.head.windows(4).any(|w| w == b"\r\n\r\n") {
                        scrape.out = match route(&scrape.head) {
                            Ok(()) => response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body()),
                            Err(status) => response(status, "text/plain", "only GET /metrics is served here\n"),
                        };
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }
    while scrape.written < scrape.out.len() {
        match scrape
            .stream
            .write(scrape.out.get(scrape.written..).unwrap_or_default())
        {
            Ok(0) => return true,
            Ok(n) => scrape.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    let _ = scrape.stream.shutdown(std::net::Shutdown::Write);
    true
}

/// A label value, escaped as the exposition format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(s: &MetricSeries) -> String {
    let mut parts = Vec::new();
    for (name, value) in [
        ("listener", &s.listener),
        ("cluster", &s.cluster_id),
        ("backend", &s.backend_id),
    ] {
        if !value.is_empty() {
            parts.push(format!("{name}=\"{}\"", escape(value)));
        }
    }
    parts.join(",")
}

fn with(labels: &str, extra: &str) -> String {
    match (labels.is_empty(), extra.is_empty()) {
        (true, true) => String::new(),
        (true, false) => format!("{{{extra}}}"),
        (false, true) => format!("{{{labels}}}"),
        (false, false) => format!("{{{labels},{extra}}}"),
    }
}

/// The series' kind, for metric names: one family per kind keeps label sets uniform.
fn kind(s: &MetricSeries) -> &'static str {
    if !s.backend_id.is_empty() {
        "backend"
    } else if !s.cluster_id.is_empty() {
        "cluster"
    } else {
        "listener"
    }
}

/// Buckets exposed: every power of two of microseconds (each fourth bucket of the scale).
fn exposed_bounds() -> impl Iterator<Item = usize> {
    (3..BUCKETS - 1).step_by(4)
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let mut b = Buckets::default();
    b.add_proto(h);
    let mut cumulative = 0u64;
    let mut next = 0usize;
    for bound in exposed_bounds() {
        while next <= bound {
            cumulative += b.counts.get(next).copied().unwrap_or(0);
            next += 1;
        }
        let le = bucket_bound(bound) as f64 / 1_000_000.0;
        let _ = writeln!(
            out,
            "{name}_bucket{} {cumulative}",
            with(labels, &format!("le=\"{le}\""))
        );
    }
    let _ = writeln!(out, "{name}_bucket{} {}", with(labels, "le=\"+Inf\""), b.total);
    let _ = writeln!(out, "{name}_sum{} {}", with(labels, ""), b.sum_us as f64 / 1_000_000.0);
    let _ = writeln!(out, "{name}_count{} {}", with(labels, ""), b.total);
}

/// The exposition text of merged figures.
pub(super) fn render(report: &MetricsReport) -> String {
    let mut out = String::new();
    let t = report.totals.clone().unwrap_or_default();
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    };
    counter(
        &mut out,
        "rampart_requests_total",
        "Finished requests, every worker.",
        t.requests,
    );
    counter(
        &mut out,
        "rampart_connections_accepted_total",
        "Client connections accepted.",
        t.connections_accepted,
    );
    counter(
        &mut out,
        "rampart_tls_handshakes_total",
        "Completed TLS handshakes.",
        t.tls_handshakes,
    );
    counter(
        &mut out,
        "rampart_tls_handshake_failures_total",
        "Connections closed before their TLS handshake completed.",
        t.tls_handshake_failures,
    );
    counter(
        &mut out,
        "rampart_backend_connect_errors_total",
        "Backend connections that failed to open.",
        t.backend_connect_errors,
    );
    counter(
        &mut out,
        "rampart_backend_retries_total",
        "Requests sent to another backend after a failed connection.",
        t.backend_retries,
    );
    counter(
        &mut out,
        "rampart_metrics_series_overflow_total",
        "Requests counted in the totals only: metrics.max_series was reached.",
        t.series_overflow,
    );
    let _ = writeln!(
        out,
        "# HELP rampart_connections_active Client connections open.\n# TYPE rampart_connections_active gauge\nrampart_connections_active {}",
        t.connections_active
    );
    let _ = writeln!(
        out,
        "# HELP rampart_worker_processes Worker processes whose figures are merged (running and ended).\n# TYPE rampart_worker_processes gauge\nrampart_worker_processes {}",
        report.processes
    );
    let _ = writeln!(
        out,
        "# HELP rampart_tls_version_handshakes_total Completed TLS handshakes by protocol version.\n# TYPE rampart_tls_version_handshakes_total counter"
    );
    for (version, n) in &t.tls_versions {
        let _ = writeln!(
            out,
            "rampart_tls_version_handshakes_total{{version=\"{}\"}} {n}",
            escape(version)
        );
    }
    for family in ["listener", "cluster", "backend"] {
        let series: Vec<&MetricSeries> = report.series.iter().filter(|s| kind(s) == family).collect();
        let name = format!("rampart_{family}_requests_total");
        let _ = writeln!(
            out,
            "# HELP {name} Finished requests by {family} and status class.\n# TYPE {name} counter"
        );
        for s in &series {
            for (i, class) in ["none", "1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let n = s.status_classes.get(i).copied().unwrap_or(0);
                let _ = writeln!(out, "{name}{} {n}", with(&labels(s), &format!("class=\"{class}\"")));
            }
        }
        for (metric, help, value) in [
            (
                "failed_requests_total",
                "Requests that ended without a complete answer.",
                (|s: &MetricSeries| s.failed) as fn(&MetricSeries) -> u64,
            ),
            ("received_bytes_total", "Bytes read from clients.", |s| s.bytes_in),
            ("sent_bytes_total", "Bytes written to clients.", |s| s.bytes_out),
        ] {
            let name = format!("rampart_{family}_{metric}");
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for s in &series {
                let _ = writeln!(out, "{name}{} {}", with(&labels(s), ""), value(s));
            }
        }
        for (metric, help, pick) in [
            (
                "request_duration_seconds",
                "Time from a request's first byte to its last answer byte.",
                (|s: &MetricSeries| s.request_time.clone()) as fn(&MetricSeries) -> Option<Histogram>,
            ),
            ("backend_connect_seconds", "Time to open a backend connection.", |s| {
                s.connect_time.clone()
            }),
            (
                "backend_first_byte_seconds",
                "Time from routing to the backend's response head.",
                |s| s.first_byte_time.clone(),
            ),
        ] {
            let name = format!("rampart_{family}_{metric}");
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for s in &series {
                histogram(&mut out, &name, &labels(s), &pick(s).unwrap_or_default());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_command::proto::WorkerTotals;

    #[test]
    fn the_exposition_has_families_labels_and_cumulative_buckets() {
        let mut time = Buckets::default();
        for us in [100, 100, 3000, 2_000_000] {
            time.record(us);
        }
        let report = MetricsReport {
            series: vec![MetricSeries {
                cluster_id: "sh\"op".into(),
                backend_id: "b1".into(),
                status_classes: vec![0, 0, 3, 0, 1, 0],
                requests: 4,
                request_time: Some(time.to_proto()),
                ..Default::default()
            }],
            totals: Some(WorkerTotals {
                requests: 4,
                ..Default::default()
            }),
            processes: 2,
        };
        let text = render(&report);
        assert!(text.contains("# TYPE rampart_backend_requests_total counter"), "{text}");
        assert!(
            text.contains("rampart_backend_requests_total{cluster=\"sh\\\"op\",backend=\"b1\",class=\"2xx\"} 3"),
            "{text}"
        );
        assert!(text.contains("rampart_requests_total 4"), "{text}");
        assert!(text.contains("rampart_backend_request_duration_seconds_count{cluster=\"sh\\\"op\",backend=\"b1\"} 4"));
        assert!(text.contains("le=\"+Inf\"} 4"), "{text}");
        // Buckets are cumulative: the 128 µs bucket holds the two 100 µs requests.
        assert!(text.contains("le=\"0.000128\"} 2"), "{text}");
        assert!(text.contains("le=\"0.004096\"} 3"), "{text}");
        let mut last = 0u64;
        for line in text
            .lines()
            .filter(|l| l.starts_with("rampart_backend_request_duration_seconds_bucket"))
        {
            let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "{line}");
            last = v;
        }
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Err("405 Method Not Allowed"));
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Err("404 Not Found"));
        assert_eq!(route(b"\x00\x01garbage"), Err("404 Not Found"));
    }
}
