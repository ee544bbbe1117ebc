//! Human output: tables, and one line per request.

use super::*;

// ---------------------------------------------------------------------------------------------
// Human output

/// Aligned columns under a header row; the last column is not padded.
pub(super) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// The table, or `empty` on a line of its own when there is no row.
    pub(super) fn render_or(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{empty}\n");
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(&widths) {
                let _ = write!(line, "{cell:<width$}  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

pub(super) fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

pub(super) fn or_dash(value: &str) -> String {
    if value.is_empty() { "-" } else { value }.to_string()
}

pub(super) fn protocol_name(value: i32) -> String {
    proto::Protocol::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |p| p.as_str_name().to_ascii_lowercase(),
    )
}

pub(super) fn load_balancing_name(value: i32) -> String {
    proto::LoadBalancing::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |l| l.as_str_name().to_ascii_lowercase(),
    )
}

pub(super) fn path_text(rule: Option<&proto::PathRule>) -> String {
    let rule = rule.cloned().unwrap_or_default();
    match proto::PathKind::try_from(rule.kind) {
        Ok(proto::PathKind::Prefix) if rule.value.is_empty() => "any".to_string(),
        Ok(kind) => format!("{} {}", kind.as_str_name().to_ascii_lowercase(), rule.value),
        Err(_) => format!("unknown({}) {}", rule.kind, rule.value),
    }
}

/// The readable form of a final OK response.
pub(super) fn render(response: &Response, detail: bool) -> String {
    match &response.content {
        None if response.message.is_empty() => "ok\n".to_string(),
        None => format!("{}\n", response.message),
        Some(Content::State(dump)) => render_dump(dump),
        Some(Content::Clusters(list)) => render_clusters(list, detail),
        Some(Content::Frontends(list)) => render_frontends(list),
        Some(Content::Listeners(list)) => render_listeners(list),
        Some(Content::Certificates(list)) => render_certificates(list),
        Some(Content::Workers(list)) => render_workers(list),
        Some(Content::StatusReport(status)) => render_status(status),
        Some(Content::Metrics(report)) => render_metrics(report),
        Some(Content::Event(event)) => format!("{} {} {}\n", event.time_ms, event.kind, event.detail),
        Some(Content::Policy(policy)) if policy.text.ends_with('\n') => policy.text.clone(),
        Some(Content::Policy(policy)) => format!("{}\n", policy.text),
        Some(Content::HealthChecks(list)) => render_health_checks(list),
        Some(Content::Plan(plan)) => format!("{}{}\n", plan_text(plan), response.message),
    }
}

pub(super) fn render_status(s: &proto::StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "version     {}", s.version);
    let _ = writeln!(out, "state hash  {}", s.state_hash);
    let _ = writeln!(out, "workers     {}", s.workers);
    let _ = writeln!(out, "listeners   {}", s.listeners);
    let _ = writeln!(out, "clusters    {}", s.clusters);
    let _ = writeln!(out, "frontends   {}", s.frontends);
    let _ = writeln!(out, "backends    {}", s.backends);
    let _ = writeln!(out, "pid         {}", s.pid);
    if let Some(j) = &s.supervisor {
        let _ = writeln!(
            out,
            "supervisor  uid {} capabilities {:#x} landlock {}",
            j.uid, j.cap_effective, j.landlock_status
        );
    }
    out
}

pub(super) fn render_workers(list: &proto::WorkerList) -> String {
    let mut table = Table::new(&["ID", "PID", "STATE", "UID", "LANDLOCK", "SECCOMP", "CONNECT"]);
    for w in &list.workers {
        let (uid, landlock, seccomp, connect) = match &w.jail {
            Some(j) => (
                j.uid.to_string(),
                or_dash(&j.landlock_status),
                or_dash(&j.seccomp_mode),
                if j.connect_any_port {
                    "any port".to_string()
                } else if j.connect_ports.is_empty() {
                    "-".to_string()
                } else {
                    j.connect_ports.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                },
            ),
            None => ("-".to_string(), "-".to_string(), "-".to_string(), "-".to_string()),
        };
        table.push(vec![
            w.id.to_string(),
            w.pid.to_string(),
            or_dash(&w.run_state),
            uid,
            landlock,
            seccomp,
            connect,
        ]);
    }
    table.render_or("no workers")
}

pub(super) fn render_clusters(list: &proto::ClusterList, detail: bool) -> String {
    let mut table = Table::new(&[
        "CLUSTER",
        "LOAD BALANCING",
        "STICKY",
        "HTTPS REDIRECT",
        "BACKENDS",
        "FRONTENDS",
    ]);
    for info in &list.clusters {
        let cluster = info.cluster.clone().unwrap_or_default();
        let frontends = info.http_frontends.len() + info.https_frontends.len() + info.tcp_frontends.len();
        table.push(vec![
            cluster.cluster_id,
            load_balancing_name(cluster.load_balancing),
            yes_no(cluster.sticky_session),
            yes_no(cluster.https_redirect),
            info.backends.len().to_string(),
            frontends.to_string(),
        ]);
    }
    let mut out = table.render_or("no clusters");
    if detail {
        for info in &list.clusters {
            out.push('\n');
            out.push_str(&render_backends(&info.backends));
            out.push('\n');
            out.push_str(&render_frontends(&proto::FrontendList {
                http: info.http_frontends.clone(),
                https: info.https_frontends.clone(),
                tcp: info.tcp_frontends.clone(),
            }));
        }
    }
    out
}

pub(super) fn render_backends(backends: &[proto::Backend]) -> String {
    let mut table = Table::new(&["BACKEND", "ADDRESS", "WEIGHT", "BACKUP"]);
    for b in backends {
        table.push(vec![
            b.backend_id.clone(),
            b.address.clone(),
            b.weight.to_string(),
            yes_no(b.backup),
        ]);
    }
    table.render_or("no backends")
}

pub(super) fn render_frontends(list: &proto::FrontendList) -> String {
    let mut table = Table::new(&["PROTOCOL", "ADDRESS", "HOSTNAME", "PATH", "METHOD", "CLUSTER"]);
    for (protocol, frontends) in [("http", &list.http), ("https", &list.https)] {
        for f in frontends {
            table.push(vec![
                protocol.to_string(),
                f.address.clone(),
                f.hostname.clone(),
                path_text(f.path.as_ref()),
                if f.method.is_empty() {
                    "any".to_string()
                } else {
                    f.method.clone()
                },
                f.cluster_id.clone(),
            ]);
        }
    }
    for f in &list.tcp {
        table.push(vec![
            "tcp".to_string(),
            f.address.clone(),
            "-".to_string(),
            "-".to_string(),
            "-".to_string(),
            f.cluster_id.clone(),
        ]);
    }
    table.render_or("no frontends")
}

pub(super) fn render_listeners(list: &proto::ListenerList) -> String {
    let mut table = Table::new(&[
        "ADDRESS",
        "PROTOCOL",
        "STATE",
        "PUBLIC ADDRESS",
        "DEFAULT CERTIFICATE",
        "STRICT SNI",
        "TLS HANDSHAKE",
    ]);
    for l in &list.listeners {
        let https = l.protocol == proto::Protocol::Https as i32;
        let tls = |value: String| if https { value } else { "-".to_string() };
        table.push(vec![
            l.address.clone(),
            protocol_name(l.protocol),
            if l.active { "active" } else { "inactive" }.to_string(),
            or_dash(&l.public_address),
            tls(if l.strict_sni {
                "none (strict)".to_string()
            } else if l.default_certificate.is_empty() {
                "first name".to_string()
            } else {
                l.default_certificate.clone()
            }),
            tls(yes_no(l.strict_sni)),
            tls(if l.tls_handshake_timeout_ms == 0 {
                "default".to_string()
            } else {
                format!("{} ms", l.tls_handshake_timeout_ms)
            }),
        ]);
    }
    table.render_or("no listeners")
}

pub(super) fn render_certificates(list: &proto::CertificateList) -> String {
    let mut table = Table::new(&["ADDRESS", "FINGERPRINT", "NAMES", "EXPIRES"]);
    for c in &list.certificates {
        table.push(vec![
            c.address.clone(),
            c.fingerprint.clone(),
            or_dash(&c.names.join(",")),
            utc_time(c.not_after),
        ]);
    }
    table.render_or("no certificates")
}

fn micros(us: u64) -> String {
    match us {
        0 => "-".into(),
        u64::MAX => "slower".into(),
        us if us < 1000 => format!("{us}µs"),
        us if us < 1_000_000 => format!("{:.1}ms", us as f64 / 1000.0),
        us => format!("{:.2}s", us as f64 / 1_000_000.0),
    }
}

pub(super) fn render_metrics(report: &proto::MetricsReport) -> String {
    let mut table = Table::new(&[
        "LISTENER", "CLUSTER", "BACKEND", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "FAILED", "IN", "OUT", "P50", "P99",
        "P99.9",
    ]);
    for s in &report.series {
        let class = |i: usize| s.status_classes.get(i).copied().unwrap_or(0).to_string();
        let time = s.request_time.clone().unwrap_or_default();
        table.push(vec![
            or_dash(&s.listener),
            or_dash(&s.cluster_id),
            or_dash(&s.backend_id),
            s.requests.to_string(),
            class(2),
            class(3),
            class(4),
            class(5),
            s.failed.to_string(),
            s.bytes_in.to_string(),
            s.bytes_out.to_string(),
            micros(time.p50_us),
            micros(time.p99_us),
            micros(time.p999_us),
        ]);
    }
    let t = report.totals.clone().unwrap_or_default();
    format!(
        "{}\n{} request(s), {} connection(s) accepted, {} active, {} TLS handshake(s) ({} failed), {} backend connect error(s), {} retr(ies), {} request(s) beyond metrics.max_series; {} worker process(es)",
        table.render_or("no series yet"),
        t.requests,
        t.connections_accepted,
        t.connections_active,
        t.tls_handshakes,
        t.tls_handshake_failures,
        t.backend_connect_errors,
        t.backend_retries,
        t.series_overflow,
        report.processes
    )
}

pub(super) fn render_health_checks(list: &proto::HealthCheckList) -> String {
    let mut table = Table::new(&[
        "CLUSTER",
        "PATH",
        "INTERVAL",
        "TIMEOUT",
        "HEALTHY",
        "UNHEALTHY",
        "STATUS",
    ]);
    for h in &list.checks {
        table.push(vec![
            h.cluster_id.clone(),
            h.path.clone(),
            format!("{} ms", h.interval_ms),
            format!("{} ms", h.timeout_ms),
            h.healthy_threshold.to_string(),
            h.unhealthy_threshold.to_string(),
            h.expected_status.to_string(),
        ]);
    }
    table.render_or("no health checks")
}

pub(super) fn render_dump(dump: &proto::StateDump) -> String {
    let mut out: String = dump.requests.iter().map(|r| format!("{}\n", describe(r))).collect();
    let _ = writeln!(out, "hash {}", dump.hash);
    out
}

/// Seconds since the epoch as a UTC date and time; "unknown" for 0 or before.
pub(super) fn utc_time(seconds: i64) -> String {
    if seconds <= 0 {
        return "unknown".to_string();
    }
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Civil date from a day count (H. Hinnant's algorithm), with March as the first month so
    // that the leap day ends the year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        of_day / 3_600,
        of_day % 3_600 / 60
    )
}

pub(super) fn frontend_text(f: &proto::HttpFrontend) -> String {
    let path = f.path.clone().unwrap_or_default();
    let key = FrontendKey {
        address: f.address.clone(),
        hostname: f.hostname.clone(),
        path_kind: path.kind,
        path: path.value,
        method: f.method.clone(),
    };
    format!("{key} -> {}", or_dash(&f.cluster_id))
}

pub(super) fn certificate_text(c: &proto::Certificate) -> String {
    let fingerprint = state::certificate_fingerprint(&c.certificate).unwrap_or_else(|_| "(invalid)".to_string());
    if c.names.is_empty() {
        format!("{} {fingerprint}", c.address)
    } else {
        format!("{} {fingerprint} {}", c.address, c.names.join(","))
    }
}

/// One line for a request: its kind and the fields that identify what it changes. Never the
/// private key of a certificate.
pub(super) fn describe(request: &Request) -> String {
    let detail = match &request.kind {
        None => String::new(),
        Some(kind) => match kind {
            Kind::AddCluster(c) => {
                let mut text = format!("{} {}", c.cluster_id, load_balancing_name(c.load_balancing));
                if c.sticky_session {
                    text.push_str(" sticky_session");
                }
                if c.https_redirect {
                    text.push_str(" https_redirect");
                }
                text
            }
            Kind::RemoveCluster(c) | Kind::RemoveHealthCheck(c) => c.cluster_id.clone(),
            Kind::QueryClusters(c) => c.cluster_id.clone(),
            Kind::AddHttpFrontend(f)
            | Kind::RemoveHttpFrontend(f)
            | Kind::AddHttpsFrontend(f)
            | Kind::RemoveHttpsFrontend(f) => frontend_text(f),
            Kind::AddTcpFrontend(f) | Kind::RemoveTcpFrontend(f) => {
                format!("{} -> {}", f.address, or_dash(&f.cluster_id))
            }
            Kind::ListFrontends(f) => [f.cluster_id.as_str(), f.hostname.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            Kind::AddBackend(b) => {
                let mut text = format!("{}/{} {} weight {}", b.cluster_id, b.backend_id, b.address, b.weight);
                if b.backup {
                    text.push_str(" backup");
                }
                text
            }
            Kind::RemoveBackend(b) => format!("{}/{}", b.cluster_id, b.backend_id),
            Kind::AddListener(l) => {
                let mut text = format!(
                    "{} {} {}",
                    l.address,
                    protocol_name(l.protocol),
                    if l.active { "active" } else { "inactive" }
                );
                if !l.public_address.is_empty() {
                    let _ = write!(text, " public {}", l.public_address);
                }
                if !l.default_certificate.is_empty() {
                    let _ = write!(text, " default_certificate {}", l.default_certificate);
                }
                if l.strict_sni {
                    text.push_str(" strict_sni");
                }
                if l.tls_handshake_timeout_ms != 0 {
                    let _ = write!(text, " tls_handshake {} ms", l.tls_handshake_timeout_ms);
                }
                text
            }
            Kind::RemoveListener(l) | Kind::ActivateListener(l) | Kind::DeactivateListener(l) => l.address.clone(),
            Kind::UpdateListener(u) => {
                let l = u.listener.clone().unwrap_or_default();
                let values: Vec<String> = u
                    .fields
                    .iter()
                    .map(|f| match f.as_str() {
                        "public_address" => format!("public_address={}", l.public_address),
                        "client_idle_timeout_ms" => format!("{f}={}", l.client_idle_timeout_ms),
                        "request_timeout_ms" => format!("{f}={}", l.request_timeout_ms),
                        "backend_connect_timeout_ms" => format!("{f}={}", l.backend_connect_timeout_ms),
                        "backend_response_timeout_ms" => format!("{f}={}", l.backend_response_timeout_ms),
                        "tls_min_version" => format!("{f}={}", l.tls_min_version),
                        "cipher_suites" => format!("{f}={}", l.cipher_suites.join(":")),
                        "groups" => format!("{f}={}", l.groups.join(":")),
                        "tls_handshake_timeout_ms" => format!("{f}={}", l.tls_handshake_timeout_ms),
                        "default_certificate" => format!("{f}={}", l.default_certificate),
                        "strict_sni" => format!("{f}={}", l.strict_sni),
                        other => other.to_string(),
                    })
                    .collect();
                format!("{} {}", u.address, values.join(" "))
            }
            Kind::AddCertificate(c) => certificate_text(c),
            Kind::ReplaceCertificate(r) => {
                let new = r
                    .new_certificate
                    .as_ref()
                    .and_then(|c| state::certificate_fingerprint(&c.certificate).ok())
                    .unwrap_or_else(|| "(invalid)".to_string());
                format!("{} {} -> {new}", r.address, r.old_fingerprint)
            }
            Kind::RemoveCertificate(c) => format!("{} {}", c.address, c.fingerprint),
            Kind::ListCertificates(c) => [c.address.as_str(), c.name.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            Kind::SaveState(p) | Kind::LoadState(p) => p.path.clone(),
            Kind::Apply(b) => format!("{} request(s)", b.requests.len()),
            Kind::ApplyState(a) => format!("state of {} request(s)", a.target.len()),
            Kind::QueryMetrics(m) => m.cluster_id.clone(),
            Kind::SetLoggingLevel(l) => l.filter.clone(),
            Kind::UpgradeWorker(w) if w.grace_seconds > 0 => format!("{} grace {} s", w.id, w.grace_seconds),
            Kind::UpgradeWorker(w) => w.id.to_string(),
            Kind::SoftStop(s) if s.grace_seconds > 0 => format!("grace {} s", s.grace_seconds),
            Kind::UpgradeMain(u) if u.grace_seconds > 0 => format!("grace {} s", u.grace_seconds),
            Kind::SetHealthCheck(h) => format!(
                "{} {} every {} ms, timeout {} ms",
                h.cluster_id, h.path, h.interval_ms, h.timeout_ms
            ),
            Kind::ConfigureMetrics(m) => {
                if m.enabled {
                    format!("statsd {} prefix {}", m.statsd_address, m.prefix)
                } else {
                    "disabled".to_string()
                }
            }
            Kind::SubscribeEvents(e) => e.kinds.join(","),
            Kind::DumpState(_)
            | Kind::Status(_)
            | Kind::ListWorkers(_)
            | Kind::ListListeners(_)
            | Kind::SoftStop(_)
            | Kind::HardStop(_)
            | Kind::UpgradeMain(_)
            | Kind::ListHealthChecks(_)
            | Kind::ShowPolicy(_)
            | Kind::ReloadPolicy(_) => String::new(),
        },
    };
    let kind = request_kind_name(request);
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} {detail}")
    }
}
