//! HTTP/1.1 proxying end to end: the real `rampart` binary with jailed workers, real nginx and
//! test backends, real curl and wrk.

use std::process::Command;
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Nginx, Rampart, config_head, free_port, raw_exchange, require_root, require_tool};

struct Setup {
    rampart: Rampart,
    port: u16,
    nginx: Nginx,
    echo: EchoBackend,
}

/// rampart in front of nginx (`app.test`), an echo backend (`echo.test`), a cluster without
/// backends (`empty.test`) and a backend that refuses connections (`refused.test`).
fn setup(name: &str, workers: u16) -> Option<Setup> {
    if !require_tool(name, "curl") {
        return None;
    }
    let nginx = Nginx::start(
        name,
        "location / { return 200 \"Hello, world\\n\"; }\nlocation /files/ { alias DIR/www/; }",
    )?;
    let www = nginx.dir.path().join("www");
    let conf = std::fs::read_to_string(nginx.dir.path().join("nginx.conf"))
        .unwrap()
        .replace("DIR/www/", &format!("{}/", www.display()));
    std::fs::write(nginx.dir.path().join("nginx.conf"), conf).unwrap();
    // Reload with the real alias path.
    let _ = Command::new("kill")
        .args(["-HUP", &nginx.child.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(200));
    let echo = EchoBackend::start();
    let port = free_port();
    let refused = free_port();
    let config = format!(
        r#"{head}
buffer_size = 16384
[sandbox]
backend_ports = [{refused}]
closed_backend_ports = true

[[listeners]]
address = "127.0.0.1:{port}"
answers = {{ "404" = "custom: no such site\n" }}
timeouts = {{ backend_response = 2 }}

[clusters.app]
backends = [ {{ address = "127.0.0.1:{nginx}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "app.test" }} ]

[clusters.echo]
backends = [ {{ address = "127.0.0.1:{echo}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "echo.test" }} ]

[clusters.empty]
answer_503 = "empty cluster\n"
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "empty.test" }} ]

[clusters.refused]
backends = [ {{ address = "127.0.0.1:{refused}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "refused.test" }} ]
"#,
        head = config_head(std::path::Path::new("{dir}"), workers),
        nginx = nginx.port,
        echo = echo.port,
    );
    let rampart = Rampart::start(name, &config);
    Some(Setup {
        rampart,
        port,
        nginx,
        echo,
    })
}

/// curl with a Host header; returns (status, body, response headers).
fn curl(port: u16, host: &str, path: &str, extra: &[&str]) -> (u16, String, String) {
    let dir = rampart_tests::TempDir::new("curl");
    let headers = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-H", &format!("Host: {host}"), "-D"])
        .arg(&headers)
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        body.to_string(),
        std::fs::read_to_string(headers).unwrap_or_default(),
    )
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn requests_responses_and_default_answers() {
    let Some(s) = setup("basics", 2) else { return };
    let p = s.port;
    let (code, body, _) = curl(p, "app.test", "/", &[]);
    assert_eq!((code, body.as_str()), (200, "Hello, world\n"));

    // POST with a body: the backend sees it whole, with forwarding headers and a request id
    // that the client gets back.
    let (code, body, headers) = curl(p, "echo.test", "/submit", &["-d", &"x".repeat(100_000)]);
    assert_eq!(code, 200);
    let seen = json(&body);
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body_length"], 100_000);
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(seen["headers"]["x-forwarded-port"], p.to_string());
    assert_eq!(
        seen["headers"]["forwarded"],
        format!("for=127.0.0.1;proto=http;by=\"127.0.0.1:{p}\"")
    );
    let id = seen["headers"]["x-request-id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 16);
    assert!(
        headers.to_ascii_lowercase().contains(&format!("x-request-id: {id}")),
        "{headers}"
    );
    // A request id the client sends is kept; an X-Forwarded-For is extended.
    let (_, body, _) = curl(
        p,
        "echo.test",
        "/",
        &["-H", "X-Request-Id: abc-123", "-H", "X-Forwarded-For: 10.1.1.1"],
    );
    let seen = json(&body);
    assert_eq!(seen["headers"]["x-request-id"], "abc-123");
    assert_eq!(seen["headers"]["x-forwarded-for"], "10.1.1.1, 127.0.0.1");

    // Chunked upload, streamed.
    let file = s.rampart.dir.path().join("upload");
    std::fs::write(&file, vec![b'z'; 3_000_000]).unwrap();
    let (code, body, _) = curl(
        p,
        "echo.test",
        "/up",
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(code, 200);
    assert_eq!(json(&body)["body_length"], 3_000_000);

    // 100-continue: curl waits for it before sending a large body.
    let (code, body, _) = curl(
        p,
        "echo.test",
        "/expect",
        &[
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(code, 200);
    assert_eq!(json(&body)["body_length"], 3_000_000);

    // The same against nginx itself: a POST body and a chunked upload reach it and it answers.
    let (code, body, _) = curl(p, "app.test", "/", &["--data-binary", &format!("@{}", file.display())]);
    assert_eq!((code, body.as_str()), (200, "Hello, world\n"));
    let (code, body, _) = curl(
        p,
        "app.test",
        "/",
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!((code, body.as_str()), (200, "Hello, world\n"));

    // HEAD and HTTP/1.0.
    let (code, body, headers) = curl(p, "app.test", "/", &["-I"]);
    assert_eq!(code, 200);
    assert!(headers.contains("Content-Length: 13"), "{headers}");
    assert!(
        body.is_empty() || body.starts_with("HTTP/1.1 200"),
        "HEAD has no body: {body:?}"
    );
    let (code, body, _) = curl(p, "app.test", "/", &["-0"]);
    assert_eq!((code, body.as_str()), (200, "Hello, world\n"));

    // Keep-alive: two requests, one connection.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects} ",
            "-H",
            "Host: app.test",
        ])
        .arg(format!("http://127.0.0.1:{p}/"))
        .arg(format!("http://127.0.0.1:{p}/"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 0",
        "the second request reused the connection"
    );

    // Default answers.
    let (code, body, _) = curl(p, "unknown.test", "/", &[]);
    assert_eq!((code, body.as_str()), (404, "custom: no such site\n"));
    let (code, body, _) = curl(p, "empty.test", "/", &[]);
    assert_eq!((code, body.as_str()), (503, "empty cluster\n"));
    let (code, _, _) = curl(p, "refused.test", "/", &[]);
    assert_eq!(code, 502);
    let started = Instant::now();
    let (code, _, _) = curl(p, "echo.test", "/sleep/4500", &[]);
    assert_eq!(code, 504);
    assert!(
        started.elapsed() < Duration::from_millis(4400),
        "answered at the 2 s backend inactivity timeout, before the backend"
    );

    // Pipelined requests are answered in order.
    let reply = raw_exchange(
        p,
        b"GET /first HTTP/1.1\r\nHost: echo.test\r\n\r\nGET /second HTTP/1.1\r\nHost: echo.test\r\n\r\nGET /third HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let (a, b, c) = (reply.find("/first"), reply.find("/second"), reply.find("/third"));
    assert!(a.is_some() && a < b && b < c, "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 3, "{reply}");
    drop(s.nginx);
    let _ = s.echo;
}

#[test]
fn smuggling_and_malformed_requests_are_refused_and_no_worker_dies() {
    let Some(s) = setup("smuggling", 1) else { return };
    let p = s.port;
    let before = s.rampart.worker_pids();
    let t = Duration::from_secs(5);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            b"POST / HTTP/1.1\r\nHost: echo.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "differing Content-Length",
            b"POST / HTTP/1.1\r\nHost: echo.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: echo.test\r\nX-Long: a\r\n b\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "control byte in a header",
            b"GET / HTTP/1.1\r\nHost: echo.test\r\nX-Bad: a\x01b\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost: echo.test\r\nContent-Length : 0\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "request line too long",
            format!("GET /{} HTTP/1.1\r\nHost: echo.test\r\n\r\n", "a".repeat(20_000)).into_bytes(),
            "HTTP/1.1 414",
        ),
        (
            "headers too large",
            format!(
                "GET / HTTP/1.1\r\nHost: echo.test\r\n{}\r\n",
                "X-Filler: 0123456789012345678901234567890123456789\r\n".repeat(400)
            )
            .into_bytes(),
            "HTTP/1.1 431",
        ),
    ];
    for (name, bytes, expected) in cases {
        let started = Instant::now();
        let reply = raw_exchange(p, &bytes, t);
        assert!(reply.starts_with(expected), "{name}: got {reply:?}");
        assert!(
            reply.contains("Connection: close"),
            "{name}: the connection is closed after the error"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{name}: the proxy closed the connection itself"
        );
        // A smuggled request never reaches the backend as a second request.
        assert!(!reply.contains("\"method\""), "{name}: reached the backend: {reply}");
    }
    // The connection stays usable after a valid request.
    let reply = raw_exchange(p, b"GET /ok HTTP/1.1\r\nHost: echo.test\r\n\r\nGET /again HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\n\r\n", t);
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply}");
    assert_eq!(s.rampart.worker_pids(), before, "no worker died");
}

fn vm_hwm_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_one_gib_download_streams_through_bounded_memory() {
    let Some(s) = setup("download", 1) else { return };
    let file = s.nginx.dir.path().join("www/big");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(1 << 30).unwrap();
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "-H",
            "Host: app.test",
        ])
        .arg(format!("http://127.0.0.1:{}/files/big", s.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("200 {}", 1u64 << 30));
    for pid in s.rampart.worker_pids() {
        let peak = vm_hwm_kib(pid);
        assert!(
            peak > 0 && peak < 64 * 1024,
            "worker {pid} peaked at {peak} KiB for a 1 GiB body"
        );
    }
}

#[test]
fn reconfiguration_under_load_fails_no_request() {
    if !require_tool("reconfiguration", "wrk") {
        return;
    }
    let Some(s) = setup("reconfig", 2) else { return };
    let second = Nginx::start("reconfig-2", "location / { return 200 \"Hello, world\\n\"; }").unwrap();
    let p = s.port;
    let wrk = Command::new("wrk")
        .args(["-t1", "-c20", "-d6s", "-H", "Host: app.test"])
        .arg(format!("http://127.0.0.1:{p}/"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let r = &s.rampart;
    // The second nginx's port is not among the workers' connect ports: the change is refused
    // with a reason, and nothing breaks.
    let refused = r.try_ctl(&[
        "backend",
        "add",
        "--cluster",
        "app",
        "--address",
        &format!("127.0.0.1:{}", second.port),
    ]);
    assert!(refused.unwrap_err().contains("may not connect to port"));
    r.ctl(&[
        "backend",
        "add",
        "--cluster",
        "app",
        "--id",
        "same",
        "--address",
        &format!("127.0.0.1:{}", s.echo.port),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    r.ctl(&["backend", "remove", "--cluster", "app", "--id", "same"]);
    std::thread::sleep(Duration::from_millis(300));
    r.ctl(&["cluster", "add", "extra"]);
    r.ctl(&[
        "backend",
        "add",
        "--cluster",
        "extra",
        "--address",
        &format!("127.0.0.1:{}", s.nginx.port),
    ]);
    r.ctl(&[
        "frontend",
        "http",
        "add",
        "--address",
        &format!("127.0.0.1:{p}"),
        "--hostname",
        "extra.test",
        "--cluster",
        "extra",
    ]);
    let (code, _, _) = curl(p, "extra.test", "/", &[]);
    assert_eq!(code, 200);
    r.ctl(&[
        "frontend",
        "http",
        "remove",
        "--address",
        &format!("127.0.0.1:{p}"),
        "--hostname",
        "extra.test",
        "--cluster",
        "extra",
    ]);
    r.ctl(&["cluster", "remove", "extra"]);
    // apply: the file plus one more backend for `app` and a new cluster, as one batch.
    let text = std::fs::read_to_string(&r.config).unwrap().replace(
        &format!("backends = [ {{ address = \"127.0.0.1:{}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{p}\", hostname = \"app.test\" }} ]", s.nginx.port),
        &format!(
            "backends = [ {{ address = \"127.0.0.1:{}\" }}, {{ address = \"127.0.0.1:{}\", id = \"via-echo-port\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{p}\", hostname = \"app.test\" }} ]",
            s.nginx.port, s.echo.port
        ),
    );
    let changed = r.dir.path().join("changed.toml");
    std::fs::write(&changed, text).unwrap();
    let dry = r.ctl(&["apply", "-f", changed.to_str().unwrap(), "--dry-run"]);
    assert!(dry.contains("via-echo-port"), "{dry}");
    r.ctl(&["apply", "-f", changed.to_str().unwrap()]);
    let out = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("requests in"), "{report}");
    assert!(
        !report.contains("Non-2xx"),
        "failed requests under reconfiguration:\n{report}"
    );
    assert!(
        !report.contains("Socket errors"),
        "socket errors under reconfiguration:\n{report}"
    );
}

#[test]
fn a_killed_worker_is_replaced_and_its_sibling_keeps_serving() {
    let Some(s) = setup("kill", 2) else { return };
    let before = s.rampart.worker_pids();
    assert_eq!(before.len(), 2);
    let victim = before[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    // Requests keep succeeding (new connections wait in the kernel queue of the dead worker's
    // socket, which the supervisor keeps, or go to the sibling).
    let mut replaced_after = None;
    while killed.elapsed() < Duration::from_secs(3) {
        let (code, _, _) = curl(s.port, "app.test", "/", &[]);
        assert_eq!(code, 200);
        let pids = s.rampart.worker_pids();
        if replaced_after.is_none() && pids.len() == 2 && !pids.contains(&victim) {
            replaced_after = Some(killed.elapsed());
        }
    }
    let after = replaced_after.expect("a new worker replaced the killed one");
    assert!(after < Duration::from_secs(1), "replaced after {after:?}");
    assert!(
        s.rampart
            .log_text()
            .contains(&format!("(pid {victim}) killed by signal SIGKILL")),
        "{}",
        s.rampart.log_text()
    );
    // The new worker serves from the same listening socket: every request of a burst succeeds.
    for _ in 0..20 {
        assert_eq!(curl(s.port, "app.test", "/", &[]).0, 200);
    }
}

#[test]
fn every_worker_is_jailed_as_seen_from_proc() {
    let Some(s) = setup("jailed", 2) else { return };
    let root = nix::unistd::Uid::effective().is_root();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    if !root {
        rampart_tests::skip(
            "every_worker_is_jailed_as_seen_from_proc",
            "reading a non-dumpable worker's /proc needs root",
        );
        return;
    }
    for pid in s.rampart.worker_pids() {
        let expect = rampart_sandbox::inspect::Expectation {
            uid: Some(nobody.uid.as_raw()),
            gid: None,
            max_fds: None,
            allow_bounding: false,
            skip_private: false,
        };
        let facts =
            rampart_sandbox::inspect::verify_jailed(pid, &expect).unwrap_or_else(|v| panic!("worker {pid}: {v:?}"));
        assert_eq!(facts.seccomp, 2);
        assert!(facts.no_new_privs);
        assert_eq!(facts.environment_bytes, 0);
    }
}

/// The README quickstart, as written: `rampart start` with the embedded configuration, then a
/// cluster with one backend added through the command socket, then curl.
#[test]
fn embedded_default_and_readme_quickstart() {
    if !require_root("embedded_default_and_readme_quickstart") {
        return;
    }
    if std::net::TcpListener::bind("127.0.0.1:8080").is_err() || std::net::TcpListener::bind("127.0.0.1:8000").is_err()
    {
        rampart_tests::skip("embedded_default_and_readme_quickstart", "port 8080 or 8000 is in use");
        return;
    }
    let _backend = EchoBackend::start_on(8000);
    // The embedded configuration saves runtime changes and loads them at start: an earlier run's
    // cluster would answer. The file is moved aside for the test and put back afterwards.
    let saved = std::path::Path::new("/var/lib/rampart/state.jsonl");
    let aside = std::path::Path::new("/var/lib/rampart/state.jsonl.before-test");
    let had_saved = std::fs::rename(saved, aside).is_ok();
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let saved = std::path::Path::new("/var/lib/rampart/state.jsonl");
            let _ = std::fs::remove_file(saved);
            if self.0 {
                let _ = std::fs::rename("/var/lib/rampart/state.jsonl.before-test", saved);
            }
        }
    }
    let _restore = Restore(had_saved);
    let log = rampart_tests::TempDir::new("quickstart");
    let mut child = Command::new(rampart_tests::rampart_bin())
        .arg("start")
        .stdout(std::fs::File::create(log.path().join("log")).unwrap())
        .stderr(std::fs::File::create(log.path().join("err")).unwrap())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut child);
    let rampart = |args: &[&str]| Command::new(rampart_tests::rampart_bin()).args(args).output().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rampart(&["status"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "rampart start did not come up: {}",
            std::fs::read_to_string(log.path().join("err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        curl(8080, "localhost", "/", &[]).0,
        404,
        "the default configuration has no site yet"
    );
    for args in [
        &["cluster", "add", "demo"][..],
        &["backend", "add", "--cluster", "demo", "--address", "127.0.0.1:8000"][..],
        &[
            "frontend",
            "http",
            "add",
            "--address",
            "127.0.0.1:8080",
            "--hostname",
            "localhost",
            "--cluster",
            "demo",
        ][..],
    ] {
        let out = rampart(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (code, body, _) = curl(8080, "localhost", "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["port"], 8000);
}

/// rampart in front of two echo backends with the given cluster options.
fn two_backends(name: &str, cluster_options: &str, listener_options: &str) -> (Rampart, u16, EchoBackend, EchoBackend) {
    let (a, b) = (EchoBackend::start(), EchoBackend::start());
    let port = free_port();
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"
{listener_options}

[clusters.pair]
{cluster_options}
backends = [ {{ address = "127.0.0.1:{a}" }}, {{ address = "127.0.0.1:{b}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "pair.test" }} ]
"#,
        head = config_head(std::path::Path::new("{dir}"), 1),
        a = a.port,
        b = b.port,
    );
    (Rampart::start(name, &config), port, a, b)
}

#[test]
fn round_robin_alternates_and_sticky_sessions_stick() {
    if !require_tool("balancing", "curl") {
        return;
    }
    let (_r, port, a, b) = two_backends("round-robin", "", "");
    let ports: Vec<u64> = (0..4)
        .map(|_| json(&curl(port, "pair.test", "/", &[]).1)["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ports.iter().filter(|p| **p == u64::from(a.port)).count(),
        2,
        "{ports:?}"
    );
    assert_eq!(
        ports.iter().filter(|p| **p == u64::from(b.port)).count(),
        2,
        "{ports:?}"
    );

    let (_r, port, _a, _b) = two_backends("sticky", "sticky_session = true", "");
    let (_, body, headers) = curl(port, "pair.test", "/", &[]);
    let first = json(&body)["port"].as_u64().unwrap();
    let cookie = headers
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no sticky cookie in {headers}"))
        .to_string();
    assert!(cookie.starts_with("RAMPARTID="), "{cookie}");
    for _ in 0..6 {
        let (_, body, _) = curl(port, "pair.test", "/", &["-H", &format!("Cookie: {cookie}")]);
        assert_eq!(
            json(&body)["port"].as_u64().unwrap(),
            first,
            "the cookie pins the backend"
        );
    }
}

#[test]
fn upgrade_switches_the_connection_to_a_byte_pipe() {
    let (_r, port, _a, _b) = two_backends("upgrade", "", "");
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: pair.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the 101");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    for word in ["hello", "websocket frames are just bytes here"] {
        s.write_all(word.as_bytes()).unwrap();
        let mut answer = vec![0u8; word.len()];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(answer, word.to_ascii_uppercase().as_bytes());
    }
}

#[test]
fn a_slow_request_gets_408() {
    let (_r, port, _a, _b) = two_backends("slowloris", "", "timeouts = { request = 1 }");
    let started = Instant::now();
    let reply = raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: pair.test\r\nX-Slow: ",
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn at_max_connections_new_clients_wait_in_the_kernel_queue() {
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        r#"{head}max_connections = 2

[[listeners]]
address = "127.0.0.1:{port}"

[clusters.e]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "e.test" }} ]
"#,
        head = config_head(std::path::Path::new("{dir}"), 1),
        e = echo.port,
    );
    let _r = Rampart::start("max-connections", &config);
    use std::io::{Read, Write};
    let request = b"GET / HTTP/1.1\r\nHost: e.test\r\n\r\n";
    let exchange = |s: &mut std::net::TcpStream| -> bool {
        s.write_all(request).unwrap();
        let mut buf = [0u8; 4096];
        matches!(s.read(&mut buf), Ok(n) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    let mut a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(exchange(&mut a) && exchange(&mut b));
    // The third connection is accepted by the kernel, but the worker does not take it yet.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    c.write_all(request).unwrap();
    let mut buf = [0u8; 4096];
    assert!(c.read(&mut buf).is_err(), "served beyond max_connections");
    // A slot frees: the waiting client is served, nothing was lost.
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = c.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(b);
}

#[test]
fn state_save_dump_and_load_round_trip() {
    let Some(s) = setup("state", 1) else { return };
    let r = &s.rampart;
    let before = r.ctl(&["state", "dump", "--json"]);
    r.ctl(&["state", "save", "snapshot.jsonl"]);
    assert!(r.dir.path().join("state/snapshot.jsonl").exists());
    assert!(
        r.try_ctl(&["state", "save", "../escape.jsonl"]).is_err(),
        "state paths stay in the state directory"
    );
    r.ctl(&["cluster", "add", "temporary"]);
    r.ctl(&[
        "frontend",
        "http",
        "remove",
        "--address",
        &format!("127.0.0.1:{}", s.port),
        "--hostname",
        "app.test",
        "--cluster",
        "app",
    ]);
    assert_eq!(curl(s.port, "app.test", "/", &[]).0, 404);
    r.ctl(&["state", "load", "snapshot.jsonl"]);
    assert_eq!(
        curl(s.port, "app.test", "/", &[]).0,
        200,
        "the loaded state is live in the workers"
    );
    let after = r.ctl(&["state", "dump", "--json"]);
    let hash = |t: &str| json(t)["hash"].as_str().unwrap().to_string();
    assert_eq!(hash(&before), hash(&after));
}

/// A connect in progress across a runtime change ejects the backend it was connecting to. The
/// cluster's only backend never answers a SYN; while a request waits on it, a backend whose id
/// sorts first is added (every backend moves one place down the list). When the connect times
/// out, the silent backend is ejected and the request is retried on the new one; had the
/// worker remembered the position instead of the id, it would eject the new backend and retry
/// the silent one.
#[test]
fn a_connect_in_progress_across_a_change_ejects_the_backend_it_was_connecting_to() {
    let silent = rampart_tests::SilentBackend::start();
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        r#"{head}
[sandbox]
backend_ports = [{e}]

[[listeners]]
address = "127.0.0.1:{port}"
timeouts = {{ backend_connect = 2 }}

[clusters.shift]
backends = [ {{ id = "m-silent", address = "127.0.0.1:{s}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "shift.test" }} ]
"#,
        head = config_head(std::path::Path::new("{dir}"), 1),
        e = echo.port,
        s = silent.port,
    );
    let r = Rampart::start("connect-across-change", &config);
    let request = b"GET /first HTTP/1.1\r\nHost: shift.test\r\nConnection: close\r\n\r\n";
    let started = Instant::now();
    let first = std::thread::spawn(move || raw_exchange(port, request, Duration::from_secs(15)));
    std::thread::sleep(Duration::from_millis(500));
    r.ctl(&[
        "backend",
        "add",
        "--cluster",
        "shift",
        "--id",
        "a-echo",
        "--address",
        &format!("127.0.0.1:{}", echo.port),
    ]);
    let reply = first.join().unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "the request was not retried on the new backend after {:?}:\n{reply}",
        started.elapsed()
    );
    assert!(reply.contains(&format!("\"port\":{}", echo.port)), "{reply}");
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "one connect timeout (2 s), then the new backend: {:?}",
        started.elapsed()
    );
    // The silent backend is out of rotation; the new one serves.
    for _ in 0..3 {
        let reply = raw_exchange(port, request, Duration::from_secs(10));
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(&format!("\"port\":{}", echo.port)), "{reply}");
    }
}

/// RFC 9112 §3.2: a request with more than one Host line, or an HTTP/1.1 request without Host,
/// is answered 400 and never routed. An HTTP/1.0 request without Host is routed by its
/// absolute-form authority, else gets 404; an absolute-form target wins over the Host header,
/// whose value the backend sees replaced by the target's authority.
#[test]
fn host_header_rules() {
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"

[clusters.echo]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "echo.test" }} ]
"#,
        head = config_head(std::path::Path::new("{dir}"), 1),
        e = echo.port,
    );
    let _r = Rampart::start("host-rules", &config);
    let t = Duration::from_secs(5);
    let status = |reply: &str| reply.lines().next().unwrap_or_default().to_string();
    for (what, request) in [
        (
            "two Host lines",
            &b"GET / HTTP/1.1\r\nHost: echo.test\r\nHost: other.test\r\nConnection: close\r\n\r\n"[..],
        ),
        (
            "the same Host twice",
            b"GET / HTTP/1.1\r\nHost: echo.test\r\nhost: echo.test\r\nConnection: close\r\n\r\n",
        ),
        ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
        (
            "HTTP/1.1 absolute form without Host",
            b"GET http://echo.test/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "HTTP/1.0 with two Host lines",
            b"GET / HTTP/1.0\r\nHost: echo.test\r\nHost: echo.test\r\n\r\n",
        ),
    ] {
        let reply = raw_exchange(port, request, t);
        assert_eq!(status(&reply), "HTTP/1.1 400 Bad Request", "{what}: {reply}");
    }
    assert_eq!(echo.requests(), 0, "a refused request reached the backend");

    let reply = raw_exchange(port, b"GET / HTTP/1.0\r\n\r\n", t);
    assert_eq!(
        status(&reply),
        "HTTP/1.1 404 Not Found",
        "HTTP/1.0 without Host: {reply}"
    );
    let reply = raw_exchange(port, b"GET http://echo.test/ten HTTP/1.0\r\n\r\n", t);
    assert_eq!(status(&reply), "HTTP/1.1 200 OK", "HTTP/1.0, absolute form: {reply}");
    let reply = raw_exchange(
        port,
        b"GET http://echo.test/abs HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        t,
    );
    assert_eq!(status(&reply), "HTTP/1.1 200 OK", "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(json(body)["headers"]["host"], "echo.test", "{reply}");
    assert_eq!(echo.requests(), 2);
}

/// The proxy's own answers close the connection when the client asked for it (Connection:
/// close, or HTTP/1.0 without keep-alive), like a backend's response does.
#[test]
fn own_answers_close_when_the_client_asks() {
    let port = free_port();
    let config = format!(
        "{head}\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n",
        head = config_head(std::path::Path::new("{dir}"), 1),
    );
    let _r = Rampart::start("answers-close", &config);
    for request in [
        &b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.0\r\nHost: nowhere.test\r\n\r\n",
    ] {
        let started = Instant::now();
        let reply = raw_exchange(port, request, Duration::from_secs(10));
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        assert!(reply.contains("Connection: close\r\n"), "{reply}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the connection stayed open after the answer ({:?})",
            started.elapsed()
        );
    }
    // Keep-alive is kept when asked for.
    let reply = raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\nGET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(reply.matches("HTTP/1.1 404").count(), 2, "{reply}");
}

/// A backend that answers every request with `Connection: close` and closes, counting the
/// connections it accepted.
fn closing_backend() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let mut s = stream;
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n\r\nbye",
            );
        }
    });
    (port, accepted)
}

/// The client's connection does not depend on the backend's: a backend that closes after each
/// response leaves the client's keep-alive connection open (its Connection and Keep-Alive
/// headers are hop by hop and not passed on), and a backend connection that a client leaves
/// behind serves the next client instead of a new connection.
#[test]
fn keep_alive_with_clients_does_not_follow_the_backend() {
    let (closing, _) = closing_backend();
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        "{head}[sandbox]\nbackend_ports = [{closing}, {e}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n\
         [clusters.closing]\nbackends = [ {{ address = \"127.0.0.1:{closing}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{port}\", hostname = \"closing.test\" }} ]\n\n\
         [clusters.echo]\nbackends = [ {{ address = \"127.0.0.1:{e}\" }} ]\nfrontends = [ {{ address = \"127.0.0.1:{port}\", hostname = \"echo.test\" }} ]\n",
        head = config_head(std::path::Path::new("{dir}"), 1),
        e = echo.port,
    );
    let _r = Rampart::start("keepalive-front", &config);
    let reply = raw_exchange(
        port,
        b"GET /1 HTTP/1.1\r\nHost: closing.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: closing.test\r\n\r\nGET /3 HTTP/1.1\r\nHost: closing.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 3, "{reply}");
    assert_eq!(reply.matches("\r\n\r\nbye").count(), 3, "{reply}");
    let heads: Vec<&str> = reply.split("bye").filter(|h| !h.is_empty()).collect();
    assert!(
        !heads[0].contains("Connection:"),
        "the backend's close reached the client: {reply}"
    );
    assert!(!heads[0].contains("Keep-Alive:"), "{reply}");
    assert!(
        heads[2].contains("Connection: close\r\n"),
        "the last answer must announce the close: {reply}"
    );
    // HTTP/1.0 with keep-alive is told its connection is kept.
    let reply = raw_exchange(
        port,
        b"GET /a HTTP/1.0\r\nHost: closing.test\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\nHost: closing.test\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 2, "{reply}");
    assert!(reply.contains("Connection: keep-alive\r\n"), "{reply}");

    // Ten clients one after the other, each closing after one request: the backend sees one
    // connection, taken from the idle pool by each new client.
    for _ in 0..10 {
        let reply = raw_exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        );
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let body = &reply[reply.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(json(body)["headers"]["connection"], serde_json::Value::Null, "{body}");
    }
    assert_eq!(echo.requests(), 10);
    assert_eq!(echo.connections(), 1, "each client opened its own backend connection");
}
