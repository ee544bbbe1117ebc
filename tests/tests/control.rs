//! The control plane under large and hostile input, against the real binary: a state of
//! 100,000 frontends reaches every worker in one `apply` and in one `state load`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Rampart, config_head, free_port, raw_exchange};
use serde_json::Value;

fn status(r: &Rampart) -> Value {
    let v: Value = serde_json::from_str(&r.ctl(&["status", "--json"])).unwrap();
    v["content"]["status_report"].clone()
}

/// Every new connection (spread over the workers by the kernel) is served by `host`'s route.
fn served_everywhere(port: u16, host: &str) {
    for i in 0..12 {
        let reply = raw_exchange(
            port,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        );
        assert!(reply.starts_with("HTTP/1.1 200"), "connection {i} to {host}: {reply}");
    }
}

/// Item 1: an order far larger than one channel message (and a request far larger than the
/// default frame limit) is applied by the supervisor and by every worker, atomically.
#[test]
fn a_state_of_100000_frontends_reaches_every_worker() {
    const CLUSTERS: usize = 1000;
    const PER_CLUSTER: usize = 100;
    let backend = EchoBackend::start();
    let port = free_port();
    let head = format!(
        "{}[sandbox]\nbackend_ports = [{}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n",
        config_head(Path::new("{dir}"), 2),
        backend.port
    );
    let r = Rampart::start("control-big", &head);
    let head = head.replace("{dir}", &r.dir.path().display().to_string());
    let mut text = head.clone();
    for c in 0..CLUSTERS {
        let _ = write!(
            text,
            "\n[clusters.c{c}]\nbackends = [ {{ address = \"127.0.0.1:{}\" }} ]\nfrontends = [",
            backend.port
        );
        for f in 0..PER_CLUSTER {
            let _ = write!(
                text,
                "{{ address = \"127.0.0.1:{port}\", hostname = \"h{}.example\" }},",
                c * PER_CLUSTER + f
            );
        }
        text.push_str("]\n");
    }
    let file = r.dir.path().join("big.toml");
    std::fs::write(&file, &text).unwrap();
    let file = file.to_str().unwrap();
    let began = Instant::now();
    let applied = r.ctl(&["apply", "-f", file]);
    eprintln!("apply of 100,000 frontends: {:?}", began.elapsed());
    assert!(
        applied.contains("state "),
        "{}",
        &applied[applied.len().saturating_sub(300)..]
    );
    let s = status(&r);
    assert_eq!(s["frontends"], 100_000);
    let last = format!("h{}.example", CLUSTERS * PER_CLUSTER - 1);
    served_everywhere(port, "h0.example");
    served_everywhere(port, &last);
    // The workers hold what the supervisor holds: applying the file again changes nothing.
    assert!(r.ctl(&["apply", "-f", file]).starts_with("no change"));

    // Saved, emptied, loaded back in one batch.
    r.ctl(&["state", "save", "big.jsonl"]);
    let empty = r.dir.path().join("empty.toml");
    std::fs::write(&empty, &head).unwrap();
    r.ctl(&["apply", "-f", empty.to_str().unwrap()]);
    assert_eq!(status(&r)["frontends"], 0);
    let began = Instant::now();
    r.ctl(&["state", "load", "big.jsonl"]);
    eprintln!("state load of 100,000 frontends: {:?}", began.elapsed());
    assert_eq!(status(&r)["state_hash"], s["state_hash"]);
    served_everywhere(port, &last);
    assert!(r.ctl(&["apply", "-f", file]).starts_with("no change"));
}
