//! `rampart upgrade` against the real binary: the supervisor hands itself over to the binary at
//! its path without losing a connection, three times in a row under load; and when the new
//! binary is missing, exits at once, speaks another handover version or fails its jail, the old
//! generation serves on untouched and the client and the trail say why.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Rampart, config_head, free_port, raw_exchange, require_tool, tcp_echo};
use serde_json::Value;

fn config(port: u16, backend: u16, workers: u16) -> String {
    format!(
        "{}[sandbox]\nbackend_ports = [{backend}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n[clusters.app]\nbackends = [ {{ address = \"127.0.0.1:{backend}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{port}\", hostname = \"app.example\" }} ]\n",
        config_head(Path::new("{dir}"), workers)
    )
}

/// Requests on new connections, one after the other, until stopped: (served, failed).
fn traffic(port: u16) -> (Arc<AtomicBool>, std::thread::JoinHandle<(u64, u64)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
            while !stop.load(Ordering::Relaxed) {
                let reply = raw_exchange(
                    port,
                    b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
                    Duration::from_secs(10),
                );
                if reply.starts_with("HTTP/1.1 200") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (ok.into_inner(), failed.into_inner())
        })
    };
    (stop, handle)
}

fn pids(r: &Rampart) -> Vec<i64> {
    let v: Value = serde_json::from_str(&r.ctl(&["workers", "--json"])).unwrap();
    let mut pids: Vec<i64> = v["content"]["workers"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    pids.sort();
    pids
}

fn completed_upgrades(r: &Rampart) -> Vec<Value> {
    r.audit_records()
        .into_iter()
        .filter(|x| x["action"] == "upgrade_main" && x["stage"] == "completed")
        .collect()
}

/// Item 3: each way an upgrade can fail leaves the old generation serving, untouched, with zero
/// failed requests, and the client and the trail say why.
#[test]
fn a_failed_upgrade_leaves_the_old_generation_serving() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        ("missing", &[], "cannot be read"),
        ("exits", &[], "the handover to the new binary failed"),
        (
            "version",
            &[("RAMPART_TEST_HANDOVER_VERSION", "99")],
            "handover version 1; this binary speaks 99",
        ),
        (
            "jail",
            &[("RAMPART_TEST_UPGRADE_FAILS_JAIL", "1")],
            "is not jailed as required",
        ),
    ];
    let backend = EchoBackend::start();
    for (case, env, reason) in cases {
        let port = free_port();
        let r = Rampart::start_copied(&format!("upgrade-fail-{case}"), &config(port, backend.port, 2), env);
        let before = (r.supervisor_pid(), pids(&r));
        match case {
            "missing" => std::fs::remove_file(&r.bin).unwrap(),
            // A binary that exits at once, where the package manager would have put rampart.
            "exits" => {
                std::fs::remove_file(&r.bin).unwrap();
                std::fs::copy("/bin/false", &r.bin).unwrap();
            }
            _ => {}
        }
        let (stop, load) = traffic(port);
        std::thread::sleep(Duration::from_millis(300));
        let err = r
            .try_ctl(&["upgrade"])
            .expect_err("a failed upgrade was reported as done");
        assert!(err.contains(reason), "{case}: {err}");
        std::thread::sleep(Duration::from_millis(500));
        // Still the same generation, and it takes changes.
        assert_eq!(
            (r.supervisor_pid(), pids(&r)),
            before,
            "{case}: the old generation changed"
        );
        r.ctl(&["cluster", "add", "after-failed-upgrade"]);
        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = load.join().unwrap();
        assert!(ok > 10, "{case}: only {ok} requests");
        assert_eq!(failed, 0, "{case}: {failed} of {} requests failed", ok + failed);
        let recs = completed_upgrades(&r);
        assert_eq!(recs.len(), 1, "{case}");
        assert_eq!(recs[0]["outcome"]["code"], "upgrade_failed", "{case}: {}", recs[0]);
        assert!(
            recs[0]["outcome"]["message"].as_str().unwrap().contains(reason),
            "{case}"
        );
        r.assert_audit_verifies();
    }
}

/// Items 1 and 2: three upgrades in a row under wrk load, over HTTP and over HTTPS: zero non-2xx
/// answers and zero socket errors; the old generations drain while wrk runs; one unbroken audit
/// chain.
#[test]
fn three_upgrades_under_load_lose_no_request() {
    if !require_tool("three_upgrades_under_load_lose_no_request", "wrk") {
        return;
    }
    upgrades_under_load(false);
}

#[test]
fn three_upgrades_under_https_load_lose_no_request() {
    if !require_tool("three_upgrades_under_https_load_lose_no_request", "wrk")
        || !require_tool("three_upgrades_under_https_load_lose_no_request", "openssl")
    {
        return;
    }
    upgrades_under_load(true);
}

fn upgrades_under_load(tls: bool) {
    let backend = EchoBackend::start();
    let port = free_port();
    let certs = rampart_tests::TempDir::new("upgrade-certs");
    let mut text = config(port, backend.port, 2);
    if tls {
        let (crt, key) = (certs.path().join("app.crt"), certs.path().join("app.key"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .args(["-subj", "/CN=app.example", "-addext", "subjectAltName=DNS:app.example"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        text = text
            .replace(
                &format!("address = \"127.0.0.1:{port}\"\n\n"),
                &format!("address = \"127.0.0.1:{port}\"\nprotocol = \"https\"\n\n"),
            )
            .replace(
                "hostname = \"app.example\" }",
                &format!(
                    "hostname = \"app.example\", certificate = \"{}\", key = \"{}\" }}",
                    crt.display(),
                    key.display()
                ),
            );
    }
    let r = Rampart::start_copied(if tls { "upgrade-load-tls" } else { "upgrade-load" }, &text, &[]);
    let first = r.supervisor_pid().unwrap();
    let scheme = if tls { "https" } else { "http" };
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c100", "-d20s", "-H", "Host: app.example"])
        .arg(format!("{scheme}://127.0.0.1:{port}/"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let mut supervisors = vec![first];
    for at in [4, 9, 14] {
        while began.elapsed() < Duration::from_secs(at) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = r.ctl(&["upgrade"]);
        assert!(out.contains("serves, this generation drains"), "{out}");
        supervisors.push(r.supervisor_pid().unwrap());
    }
    // While wrk still runs, the old generations have drained (their keep-alive connections
    // closed after a response; wrk reconnected to the new workers) and are gone.
    while began.elapsed() < Duration::from_secs(18) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for old in &supervisors[..3] {
        let gone = !Path::new(&format!("/proc/{old}")).exists()
            || std::fs::read_to_string(format!("/proc/{old}/stat")).is_ok_and(|s| s.contains(") Z "));
        assert!(
            gone,
            "supervisor {old} of an older generation still runs: its workers did not drain"
        );
    }
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let requests: u64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    assert!(requests > 1000, "only {requests} requests:\n{text}");
    assert!(
        !text.contains("Non-2xx"),
        "answers other than 2xx during the upgrades:\n{text}"
    );
    assert!(
        !text.contains("Socket errors"),
        "socket errors during the upgrades:\n{text}"
    );
    supervisors.dedup();
    assert_eq!(supervisors.len(), 4, "three new supervisors: {supervisors:?}");
    let recs = completed_upgrades(&r);
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|x| x["outcome"]["status"] == "ok"), "{recs:?}");
    r.assert_audit_verifies();
}

/// Item 6: sd_notify, played by a test socket: READY=1 once the workers are verified,
/// RELOADING=1 with MONOTONIC_USEC around an upgrade, then MAINPID= of the new supervisor and
/// READY=1, and STOPPING=1.
#[test]
fn the_service_manager_is_told_each_step() {
    use std::os::unix::net::UnixDatagram;
    let backend = EchoBackend::start();
    let port = free_port();
    let dir = rampart_tests::TempDir::new("upgrade-notify");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = Rampart::start_copied(
        "upgrade-notify-r",
        &config(port, backend.port, 1),
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1"), "{ready}");
    r.ctl(&["upgrade"]);
    let reloading = next();
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let main = next();
    let new_pid = r.supervisor_pid().unwrap();
    assert!(
        main.contains(&format!("MAINPID={new_pid}")) && main.contains("READY=1"),
        "{main}"
    );
    // The old generation stops (its own STOPPING=1), then the new one when asked.
    let old_stopping = next();
    assert!(old_stopping.contains("STOPPING=1"), "{old_stopping}");
    r.ctl(&["shutdown"]);
    let stopping = next();
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
}

/// Item 6: the unit file passes `systemd-analyze verify` (with the binary path of this build).
#[test]
fn the_unit_file_verifies() {
    if !require_tool("the_unit_file_verifies", "systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(rampart_tests::workspace().join("dist/rampart.service")).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("ExecReload=/usr/sbin/rampart"),
        "{unit}"
    );
    let dir = rampart_tests::TempDir::new("unit");
    let path = dir.path().join("rampart.service");
    std::fs::write(
        &path,
        unit.replace("/usr/sbin/rampart", &rampart_tests::rampart_bin().display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !text.contains("rampart.service:"), "{text}");
}

/// Item 4: `rampart upgrade --worker N` replaces one worker in place: a new one in its slot, the
/// old one drains and exits, no request fails.
#[test]
fn one_worker_is_replaced_in_place() {
    let backend = EchoBackend::start();
    let port = free_port();
    let r = Rampart::start("upgrade-worker", &config(port, backend.port, 2));
    let slot_pid = |id: u64| -> Option<i64> {
        let v: Value = serde_json::from_str(&r.ctl(&["workers", "--json"])).unwrap();
        v["content"]["workers"]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id && w["run_state"] == "running")
            .and_then(|w| w["pid"].as_i64())
    };
    let old = slot_pid(1).unwrap();
    let other = slot_pid(0).unwrap();
    let (stop, load) = traffic(port);
    std::thread::sleep(Duration::from_millis(300));
    let out = r.ctl(&["upgrade", "--worker", "1"]);
    assert!(out.contains(&format!("worker 1 (pid {old}) replaced")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while slot_pid(1).is_none_or(|p| p == old) || Path::new(&format!("/proc/{old}")).exists() {
        assert!(
            Instant::now() < deadline,
            "worker 1 was not replaced, or the old one did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(slot_pid(0), Some(other), "worker 0 was left alone");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 10);
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    let err = r.try_ctl(&["upgrade", "--worker", "7"]).unwrap_err();
    assert!(err.contains("there is no worker 7"), "{err}");
    r.assert_audit_verifies();
}

/// Item 5: a backend added at runtime on a port the workers' landlock rules do not allow: the
/// workers are replaced one by one with jails that allow it, then the change is applied; under
/// traffic, no request fails, and `rampart workers` shows the wider jails.
#[test]
fn a_backend_on_a_new_port_rejails_the_workers() {
    let backend = EchoBackend::start();
    let late = EchoBackend::start();
    let port = free_port();
    let r = Rampart::start("upgrade-rejail", &config(port, backend.port, 2));
    let (stop, load) = traffic(port);
    std::thread::sleep(Duration::from_millis(300));
    let began = Instant::now();
    r.ctl(&["cluster", "add", "late"]);
    let out = r.ctl(&[
        "backend",
        "add",
        "--cluster",
        "late",
        "--address",
        &format!("127.0.0.1:{}", late.port),
    ]);
    assert!(out.contains("added"), "{out}");
    r.ctl(&[
        "frontend",
        "http",
        "add",
        "--address",
        &format!("127.0.0.1:{port}"),
        "--hostname",
        "late.example",
        "--cluster",
        "late",
    ]);
    let reply = raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: late.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains(&format!("\"port\":{}", late.port)), "{reply}");
    eprintln!("backend on a new port served {:?} after it was added", began.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 10);
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    let v: Value = serde_json::from_str(&r.ctl(&["workers", "--json"])).unwrap();
    for w in v["content"]["workers"]["workers"].as_array().unwrap() {
        if w["role"] == "worker" {
            let ports = w["jail"]["connect_ports"].as_array().unwrap();
            assert!(ports.iter().any(|p| p == late.port), "{w}");
        }
    }
    assert!(r.audit_records().iter().any(|x| x["action"] == "workers_rejailed"));
    r.assert_audit_verifies();
}

/// Item 2: a WebSocket-style tunnel (after a 101) and a TCP-proxied connection opened before an
/// upgrade keep exchanging data after it, and a 200 MB download by a slow client started before
/// it completes byte for byte.
#[test]
fn tunnels_and_a_slow_download_outlive_an_upgrade() {
    use std::io::{Read, Write};
    if !require_tool("tunnels_and_a_slow_download_outlive_an_upgrade", "curl") {
        return;
    }
    let Some(nginx) = rampart_tests::Nginx::start("upgrade-download", "location /files/ { alias WWW/; }") else {
        return;
    };
    let www = nginx.dir.path().join("www");
    let conf = std::fs::read_to_string(nginx.dir.path().join("nginx.conf")).unwrap();
    std::fs::write(
        nginx.dir.path().join("nginx.conf"),
        conf.replace("WWW/", &format!("{}/", www.display())),
    )
    .unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &nginx.child.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    const SIZE: u64 = 200 * 1024 * 1024;
    std::fs::File::create(www.join("big")).unwrap().set_len(SIZE).unwrap();
    let echo = EchoBackend::start();
    let tcp_backend = tcp_echo();
    let (port, tcp_port) = (free_port(), free_port());
    let config = format!(
        "{}[sandbox]\nbackend_ports = [{}, {}, {}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n[[listeners]]\naddress = \"127.0.0.1:{tcp_port}\"\nprotocol = \"tcp\"\n\n\
         [clusters.app]\nbackends = [ {{ address = \"127.0.0.1:{}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{port}\", hostname = \"app.example\" }} ]\n\n\
         [clusters.files]\nbackends = [ {{ address = \"127.0.0.1:{}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{port}\", hostname = \"files.example\" }} ]\n\n\
         [clusters.tcp]\nbackends = [ {{ address = \"127.0.0.1:{tcp_backend}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{tcp_port}\" }} ]\n",
        config_head(Path::new("{dir}"), 2),
        echo.port,
        nginx.port,
        tcp_backend,
        echo.port,
        nginx.port,
    );
    let r = Rampart::start_copied("upgrade-tunnels", &config, &[]);
    // The tunnel after a 101: the backend echoes upper-cased.
    let mut ws = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ws.write_all(b"GET /upgrade HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 256];
    let n = ws.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101"));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let exchange = |s: &mut std::net::TcpStream, send: &[u8], expect: &[u8]| {
        s.write_all(send).unwrap();
        let mut got = vec![0u8; expect.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, expect);
    };
    exchange(&mut ws, b"before", b"BEFORE");
    exchange(&mut tcp, b"before", b"before");
    // A slow client: 200 MB at 25 MB/s, about 8 s, started before the upgrade.
    let download = std::process::Command::new("curl")
        .args([
            "-s",
            "--limit-rate",
            "25M",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ])
        .args(["-H", "Host: files.example"])
        .arg(format!("http://127.0.0.1:{port}/files/big"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let out = r.ctl(&["upgrade"]);
    assert!(out.contains("serves, this generation drains"), "{out}");
    exchange(&mut ws, b"after", b"AFTER");
    exchange(&mut tcp, b"after", b"after");
    std::thread::sleep(Duration::from_millis(500));
    exchange(&mut ws, b"still", b"STILL");
    exchange(&mut tcp, b"still", b"still");
    let out = download.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("200 {SIZE}"));
    // New connections go to the new generation.
    let reply = raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    r.assert_audit_verifies();
}
