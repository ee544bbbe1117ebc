//! Metrics against the real binary: a known number of requests (answered 200 by a backend, 404
//! for no frontend, 502 for a backend that refuses connections) is what `rampart metrics --json`
//! counts, per status class, listener, cluster and backend, merged across two workers, and still
//! after a worker is replaced.

use std::path::Path;
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Rampart, config_head, free_port, raw_exchange};
use serde_json::Value;

fn series<'a>(report: &'a Value, listener: &str, cluster: &str, backend: &str) -> Option<&'a Value> {
    let field = |s: &Value, name: &str| s[name].as_str().unwrap_or("").to_string();
    report["series"].as_array()?.iter().find(|s| {
        field(s, "listener") == listener && field(s, "cluster_id") == cluster && field(s, "backend_id") == backend
    })
}

fn metrics(r: &Rampart, args: &[&str]) -> Value {
    let mut all = vec!["metrics", "--json"];
    all.extend_from_slice(args);
    let out = r.ctl(&all);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["content"]["metrics"].clone()
}

fn count(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// Waits until the merged totals say `requests` (workers report once a second).
fn wait_for(r: &Rampart, requests: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(r, &[]);
        if count(&m["totals"]["requests"]) == requests {
            return m;
        }
        assert!(Instant::now() < deadline, "the totals never reached {requests}: {m}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_count_every_request_by_class_cluster_and_backend() {
    let backend = EchoBackend::start();
    let refused = free_port();
    let port = free_port();
    let listener = format!("127.0.0.1:{port}");
    let config = format!(
        "{}[sandbox]\nbackend_ports = [{b}, {refused}]\n\n[[listeners]]\naddress = \"{listener}\"\n\n\
         [clusters.app]\nbackends = [ {{ id = \"app-1\", address = \"127.0.0.1:{b}\" }} ]\nfrontends = [ {{ address = \"{listener}\", hostname = \"app.test\" }} ]\n\n\
         [clusters.down]\nbackends = [ {{ id = \"down-1\", address = \"127.0.0.1:{refused}\" }} ]\nfrontends = [ {{ address = \"{listener}\", hostname = \"down.test\" }} ]\n",
        config_head(Path::new("{dir}"), 2),
        b = backend.port,
    );
    let r = Rampart::start("metrics-counts", &config);
    // Nothing yet: an answer with no series, not a failure.
    let empty = metrics(&r, &[]);
    assert_eq!(count(&empty["totals"]["requests"]), 0, "{empty}");
    let text = r.ctl(&["metrics"]);
    assert!(text.contains("no series yet"), "{text}");

    let exchange = |host: &str, path: &str| {
        raw_exchange(
            port,
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        )
    };
    for i in 0..7 {
        let reply = exchange("app.test", &format!("/{i}"));
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    for _ in 0..3 {
        assert!(exchange("nowhere.test", "/").starts_with("HTTP/1.1 404"));
    }
    for _ in 0..2 {
        let reply = exchange("down.test", "/");
        assert!(
            reply.starts_with("HTTP/1.1 502") || reply.starts_with("HTTP/1.1 503"),
            "{reply}"
        );
    }
    // wrk over keep-alive for a second: counted exactly too (wrk says how many it completed).
    let mut wrk_requests = 0;
    if rampart_tests::require_tool("metrics_count_every_request_by_class_cluster_and_backend", "wrk") {
        let out = std::process::Command::new("wrk")
            .args(["-t1", "-c4", "-d1s", "-H", "Host: app.test"])
            .arg(format!("http://{listener}/"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // "N requests in 1.00s": wrk stops its connections with requests in flight, which are
        // not in N; wait for rampart's count to settle and read the difference from it.
        let completed: u64 = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .split_once(" requests in ")
                    .map(|(n, _)| n.trim().parse().unwrap_or(0))
            })
            .unwrap_or_else(|| panic!("no request count in wrk's output: {text}"));
        assert!(completed > 0, "{text}");
        assert!(!text.contains("Non-2xx"), "{text}");
        wrk_requests = completed;
    }
    std::thread::sleep(Duration::from_millis(1500));
    let m = metrics(&r, &[]);
    let total = count(&m["totals"]["requests"]);
    // Requests wrk abandoned when it stopped are finished too (as failed, without a status).
    let app = series(&m, "", "app", "").unwrap_or_else(|| panic!("no series for app: {m}"));
    let app_ok = count(&app["status_classes"][2]);
    assert!(app_ok >= 7 + wrk_requests, "{app}");
    let abandoned = total
        .checked_sub(12 + wrk_requests)
        .unwrap_or_else(|| panic!("fewer finished requests than answered: {m}"));
    assert!(abandoned <= 4, "more finished requests than were sent: {m}");
    assert_eq!(
        app_ok + count(&app["status_classes"][0]),
        7 + wrk_requests + abandoned,
        "{app}"
    );
    let down = series(&m, "", "down", "").unwrap_or_else(|| panic!("no series for down: {m}"));
    assert_eq!(count(&down["status_classes"][5]), 2, "{down}");
    assert_eq!(count(&down["requests"]), 2, "{down}");
    let on_listener = series(&m, &listener, "", "").unwrap();
    assert_eq!(count(&on_listener["requests"]), total, "{on_listener}");
    assert_eq!(count(&on_listener["status_classes"][4]), 3, "{on_listener}");
    // The backend's own series, and its latency figures from the merged histograms.
    let app_1 = series(&m, "", "app", "app-1").unwrap_or_else(|| panic!("no series for app-1: {m}"));
    assert_eq!(count(&app_1["status_classes"][2]), app_ok);
    let time = &app_1["request_time"];
    assert_eq!(count(&time["total"]), count(&app_1["requests"]));
    assert!(
        count(&time["p50_us"]) > 0 && count(&time["p50_us"]) <= count(&time["p99_us"]),
        "{time}"
    );
    assert!(count(&app_1["first_byte_time"]["total"]) > 0, "{app_1}");
    // The first 502 met a refused connection; the second found that backend ejected (503).
    assert!(count(&m["totals"]["backend_connect_errors"]) >= 1, "{m}");
    assert!(count(&m["totals"]["connections_accepted"]) >= 12, "{m}");
    assert_eq!(count(&m["processes"]), 2, "{m}");

    // Filters.
    let only = metrics(&r, &["--cluster", "down"]);
    let clusters: Vec<&str> = only["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cluster_id"].as_str().unwrap_or(""))
        .collect();
    assert!(!clusters.is_empty() && clusters.iter().all(|c| *c == "down"), "{only}");
    let one = metrics(&r, &["--backend", "app-1"]);
    assert_eq!(one["series"].as_array().unwrap().len(), 1, "{one}");
    let table = r.ctl(&["metrics", "--cluster", "app"]);
    assert!(table.contains("app-1") && table.contains("P99"), "{table}");

    // A worker replaced: once it has exited, its figures are still in the totals, and the new
    // one adds its own.
    let workers: Value = serde_json::from_str(&r.ctl(&["workers", "--json"])).unwrap();
    let old = workers["content"]["workers"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == 0)
        .and_then(|w| w["pid"].as_i64())
        .unwrap();
    r.ctl(&["upgrade", "--worker", "0", "--grace", "5"]);
    let deadline = Instant::now() + Duration::from_secs(8);
    while Path::new(&format!("/proc/{old}")).exists() {
        assert!(Instant::now() < deadline, "the replaced worker did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..4 {
        assert!(exchange("app.test", "/after").starts_with("HTTP/1.1 200"));
    }
    let after = wait_for(&r, total + 4);
    assert_eq!(count(&series(&after, "", "down", "").unwrap()["status_classes"][5]), 2);
    assert_eq!(
        count(&series(&after, &listener, "", "").unwrap()["requests"]),
        total + 4,
        "{after}"
    );
}

/// `[metrics] prometheus`: the merged figures in Prometheus's text format at `GET /metrics`,
/// the same numbers `rampart metrics` gives, accepted by `promtool check metrics`; nothing else
/// is served; the exporter's socket survives an upgrade.
#[test]
fn prometheus_serves_the_same_figures() {
    let backend = EchoBackend::start();
    let (port, exporter) = (free_port(), free_port());
    let listener = format!("127.0.0.1:{port}");
    let config = format!(
        "{}[metrics]\nprometheus = \"127.0.0.1:{exporter}\"\n\n[sandbox]\nbackend_ports = [{b}]\n\n[[listeners]]\naddress = \"{listener}\"\n\n\
         [clusters.app]\nbackends = [ {{ id = \"app-1\", address = \"127.0.0.1:{b}\" }} ]\nfrontends = [ {{ address = \"{listener}\", hostname = \"app.test\" }} ]\n",
        config_head(Path::new("{dir}"), 2),
        b = backend.port,
    );
    let r = Rampart::start_copied("metrics-prometheus", &config, &[]);
    for i in 0..9 {
        let host = if i % 3 == 0 { "nowhere.test" } else { "app.test" };
        let reply = raw_exchange(
            port,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        );
        assert!(reply.starts_with("HTTP/1.1 "), "{reply}");
    }
    wait_for(&r, 9);
    let scrape = |request: &str| raw_exchange(exporter, request.as_bytes(), Duration::from_secs(10));
    let reply = scrape("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.contains("Content-Type: text/plain; version=0.0.4"), "{reply}");
    let body = &reply[reply.find("\r\n\r\n").unwrap() + 4..];
    let value = |line: &str| -> u64 {
        body.lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{line}` in the scrape:\n{body}"))
    };
    let m = metrics(&r, &[]);
    let app = series(&m, "", "app", "").unwrap();
    assert_eq!(value("rampart_requests_total "), 9);
    assert_eq!(
        value("rampart_cluster_requests_total{cluster=\"app\",class=\"2xx\"} "),
        count(&app["status_classes"][2])
    );
    assert_eq!(
        value("rampart_cluster_requests_total{cluster=\"app\",class=\"2xx\"} "),
        6
    );
    assert_eq!(
        value(&format!(
            "rampart_listener_requests_total{{listener=\"{listener}\",class=\"4xx\"}} "
        )),
        3
    );
    assert_eq!(
        value("rampart_backend_request_duration_seconds_count{cluster=\"app\",backend=\"app-1\"} "),
        6
    );
    assert_eq!(
        value("rampart_backend_request_duration_seconds_bucket{cluster=\"app\",backend=\"app-1\",le=\"+Inf\"} "),
        6
    );
    // The format, checked by Prometheus's own tool.
    if rampart_tests::require_tool("prometheus_serves_the_same_figures", "promtool") {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Only GET /metrics.
    assert!(scrape("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(scrape("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(scrape(&format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000))).starts_with("HTTP/1.1 431"));
    // A scraper that sends nothing does not hold the exporter up.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", exporter)).unwrap();
    assert!(scrape("GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));

    // An upgrade hands the exporter's socket over: it answers, from the new supervisor.
    let before = r.supervisor_pid();
    r.ctl(&["upgrade"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.supervisor_pid() == before {
        assert!(Instant::now() < deadline, "the upgrade did not complete");
        std::thread::sleep(Duration::from_millis(100));
    }
    let reply = scrape("GET /metrics HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.contains("rampart_requests_total"), "{reply}");
}

/// statsd from the configuration file, then switched at runtime (`rampart statsd`): the
/// counter increments a statsd listener receives add up to exactly what `rampart metrics`
/// says; `--off` stops them; a bad address is refused with the reason; each change is audited.
#[test]
fn statsd_receives_what_the_metrics_count() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let statsd = udp.local_addr().unwrap();
    let backend = EchoBackend::start();
    let port = free_port();
    let listener = format!("127.0.0.1:{port}");
    let config = format!(
        "{}[metrics]\nstatsd = \"{statsd}\"\nstatsd_prefix = \"edge\"\n\n[sandbox]\nbackend_ports = [{b}]\n\n[[listeners]]\naddress = \"{listener}\"\n\n\
         [clusters.app]\nbackends = [ {{ address = \"127.0.0.1:{b}\" }} ]\nfrontends = [ {{ address = \"{listener}\", hostname = \"app.test\" }} ]\n",
        config_head(Path::new("{dir}"), 2),
        b = backend.port,
    );
    let r = Rampart::start("metrics-statsd", &config);
    let send = |n: usize, host: &str| {
        for _ in 0..n {
            let reply = raw_exchange(
                port,
                format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
                Duration::from_secs(10),
            );
            assert!(reply.starts_with("HTTP/1.1 "), "{reply}");
        }
    };
    // Sums the counters received until `name` reaches `want` (or 6 s pass).
    let collect = |sums: &mut std::collections::HashMap<String, u64>, name: &str, want: u64| {
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && sums.get(name).copied().unwrap_or(0) < want {
            let Ok(n) = udp.recv(&mut buf) else { continue };
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if let Some((key, rest)) = line.split_once(':')
                    && let Some(value) = rest.strip_suffix("|c")
                {
                    *sums.entry(key.to_string()).or_default() += value.parse::<u64>().unwrap();
                }
            }
        }
    };
    send(6, "app.test");
    send(2, "nowhere.test");
    wait_for(&r, 8);
    let mut sums = std::collections::HashMap::new();
    collect(&mut sums, "edge.requests", 8);
    // One more second: nothing is counted twice.
    std::thread::sleep(Duration::from_millis(1200));
    collect(&mut sums, "edge.never", 1);
    let m = metrics(&r, &[]);
    assert_eq!(
        sums.get("edge.requests").copied(),
        Some(count(&m["totals"]["requests"])),
        "{sums:?}"
    );
    assert_eq!(sums.get("edge.cluster.app.requests.2xx").copied(), Some(6), "{sums:?}");
    let listener_key = format!("edge.listener.{}.requests.4xx", listener.replace(['.', ':'], "_"));
    assert_eq!(sums.get(&listener_key).copied(), Some(2), "{sums:?}");

    // At runtime: a bad address is refused; off stops the lines; on again with another prefix.
    let err = r.try_ctl(&["statsd", "--address", "localhost:8125"]).unwrap_err();
    assert!(err.contains("not an IP address and port"), "{err}");
    let out = r.ctl(&["statsd", "--off", "--json"]);
    assert!(out.contains("stopped"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    while udp.recv(&mut [0u8; 2048]).is_ok() {}
    send(1, "app.test");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(udp.recv(&mut [0u8; 2048]).is_err(), "statsd lines after --off");
    let out = r.ctl(&["statsd", "--address", &statsd.to_string(), "--prefix", "other"]);
    assert!(out.contains("prefix `other`"), "{out}");
    let mut again = std::collections::HashMap::new();
    collect(&mut again, "other.requests", 9);
    // A new emitter starts from the merged totals: everything so far, once.
    assert_eq!(again.get("other.requests").copied(), Some(9), "{again:?}");
    let records = r.audit_records();
    assert!(
        records
            .iter()
            .filter(|rec| rec["stage"] == "completed" && rec.to_string().contains("configure_metrics"))
            .count()
            >= 2,
        "statsd changes are not in the trail"
    );
}
