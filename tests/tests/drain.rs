//! How a retired worker drains (issue: upgrade without losing a connection, item 2), against the
//! real binary: `rampart upgrade --worker 0` retires the only worker while connections are
//! open. A request in flight is answered with `Connection: close` and its connection closes; a
//! kept-alive connection idle at that moment is closed within about a second; the old worker
//! then exits at once instead of waiting out its grace period. Tunnels (after a 101, and TCP
//! connections) run on until `--grace` seconds, are then closed, and the worker says how many.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Rampart, config_head, free_port, tcp_echo};
use serde_json::Value;

fn worker_pid(r: &Rampart, id: u64) -> Option<i64> {
    let v: Value = serde_json::from_str(&r.ctl(&["workers", "--json"])).unwrap();
    v["content"]["workers"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id && w["run_state"] == "running")
        .and_then(|w| w["pid"].as_i64())
}

/// Reads one response (headers and a Content-Length body) from a kept-alive connection.
fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = s.read(&mut buf).expect("the response did not arrive");
        assert!(n > 0, "the connection closed before the response was complete: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether the peer closes the connection within `within` (end of file or reset), reading and
/// discarding anything else.
fn closes_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn gone_within(pid: i64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_retired_worker_closes_keep_alive_connections_between_requests() {
    let backend = EchoBackend::start();
    let port = free_port();
    let config = format!(
        "{}[sandbox]\nbackend_ports = [{b}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n[clusters.app]\nbackends = [ {{ address = \"127.0.0.1:{b}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{port}\", hostname = \"app.example\" }} ]\n",
        config_head(Path::new("{dir}"), 1),
        b = backend.port
    );
    let r = Rampart::start("drain-keepalive", &config);
    let old = worker_pid(&r, 0).unwrap();

    // An idle kept-alive connection, and one whose request is still at the backend.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n").unwrap();
    let first = read_response(&mut idle);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(!first.to_ascii_lowercase().contains("connection: close"), "{first}");
    let mut busy = TcpStream::connect(("127.0.0.1", port)).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    busy.write_all(b"GET /sleep/1500 HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let out = r.ctl(&["upgrade", "--worker", "0", "--grace", "30", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        v.to_string().contains(&format!("worker 0 (pid {old}) replaced")),
        "{out}"
    );
    let retired = Instant::now();

    // The request in flight is answered, says so, and its connection ends after it.
    let answer = read_response(&mut busy);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!(
        closes_within(&mut busy, Duration::from_secs(2)),
        "the answered connection stayed open"
    );
    // The idle one is closed between requests, long before the 30 s grace period.
    assert!(
        closes_within(&mut idle, Duration::from_secs(4)),
        "the idle keep-alive connection was kept open by the retired worker"
    );
    assert!(retired.elapsed() < Duration::from_secs(6));
    // With nothing left to finish, the old worker exits without waiting out its grace.
    assert!(
        gone_within(old, Duration::from_secs(5)),
        "the retired worker {old} did not exit"
    );

    // The new worker serves; a client that asks to close is told the connection closes.
    let reply = rampart_tests::raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("connection: close"), "{reply}");
    r.assert_audit_verifies();
}

#[test]
fn tunnels_run_until_the_grace_period_and_are_counted() {
    let echo = EchoBackend::start();
    let tcp_backend = tcp_echo();
    let (port, tcp_port) = (free_port(), free_port());
    let config = format!(
        "{}[sandbox]\nbackend_ports = [{e}, {t}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n[[listeners]]\naddress = \"127.0.0.1:{tcp_port}\"\nprotocol = \"tcp\"\n\n\
         [clusters.app]\nbackends = [ {{ address = \"127.0.0.1:{e}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{port}\", hostname = \"app.example\" }} ]\n\n\
         [clusters.tcp]\nbackends = [ {{ address = \"127.0.0.1:{t}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{tcp_port}\" }} ]\n",
        config_head(Path::new("{dir}"), 1),
        e = echo.port,
        t = tcp_backend,
    );
    let r = Rampart::start("drain-tunnels", &config);
    let old = worker_pid(&r, 0).unwrap();
    let mut ws = TcpStream::connect(("127.0.0.1", port)).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ws.write_all(b"GET /upgrade HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 256];
    let n = ws.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101"));
    let mut tcp = TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let exchange = |s: &mut TcpStream, send: &[u8], expect: &[u8]| {
        s.write_all(send).unwrap();
        let mut got = vec![0u8; expect.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, expect);
    };
    exchange(&mut ws, b"before", b"BEFORE");
    exchange(&mut tcp, b"before", b"before");

    // Out of range, refused by the command line and, sent raw, by the supervisor.
    let err = r.try_ctl(&["upgrade", "--worker", "0", "--grace", "0"]).unwrap_err();
    assert!(err.contains("--grace"), "{err}");
    let response = r.send_request(rampart_command::proto::request::Kind::UpgradeWorker(
        rampart_command::proto::UpgradeWorker {
            id: 0,
            grace_seconds: 90_000,
        },
    ));
    assert_eq!(response.status, rampart_command::proto::ResponseStatus::Failure as i32);
    let refused = response.message;
    assert!(refused.contains("grace_seconds 90000 is out of range"), "{refused}");
    assert_eq!(worker_pid(&r, 0), Some(old), "a refused upgrade replaced the worker");

    r.ctl(&["upgrade", "--worker", "0", "--grace", "3"]);
    let retired = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    // Well past the second after which idle HTTP connections close: tunnels still run.
    exchange(&mut ws, b"during", b"DURING");
    exchange(&mut tcp, b"during", b"during");
    assert!(
        Path::new(&format!("/proc/{old}")).exists(),
        "the retired worker left its tunnels early"
    );
    // At the end of the grace period both are closed, and counted.
    assert!(
        closes_within(&mut ws, Duration::from_secs(5)),
        "the tunnel outlived the grace period"
    );
    assert!(
        closes_within(&mut tcp, Duration::from_secs(2)),
        "the TCP connection outlived the grace period"
    );
    assert!(
        retired.elapsed() >= Duration::from_millis(2500),
        "closed before the grace period ended"
    );
    assert!(gone_within(old, Duration::from_secs(3)));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !r.log_text().contains("grace period over: closed 2 tunnel(s)") {
        assert!(Instant::now() < deadline, "{}", r.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The new worker takes new tunnels.
    let mut again = TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
    again.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    exchange(&mut again, b"after", b"after");
    // The trail holds the request as sent, and what it did.
    let records = r.audit_records();
    assert!(
        records.iter().any(|rec| rec["stage"] == "received"
            && rec.to_string().contains("upgrade_worker")
            && rec.to_string().contains("\"grace_seconds\":3")),
        "no received record with the grace period: {records:?}"
    );
    assert!(
        records
            .iter()
            .any(|rec| rec["stage"] == "completed" && rec.to_string().contains("for at most 3 s")),
        "no completed record naming the grace period"
    );
    r.assert_audit_verifies();
}
