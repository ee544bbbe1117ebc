//! Every record true, every setting real, against the real binary: a change is recorded
//! `completed` only once each process answered (with what each did), a worker that refused or
//! missed a change is replaced from the supervisor's state, every action has an actor (signals
//! included), `apply` is compare-and-swap, listeners change in place, runtime changes survive a
//! `kill -9`, and settings nothing enforces are refused by name.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Rampart, TempDir, config_head, free_port, rampart_bin, raw_exchange};
use serde_json::Value;

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `rampart audit verify --live` on the test's log (no signing key: the chain and its order; a
/// running supervisor has not written its closing checkpoint yet).
fn assert_trail_verifies(r: &Rampart) {
    let out = Command::new(rampart_bin())
        .args(["audit", "verify", "--live"])
        .arg(r.dir.path().join("audit.log"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn workers_json(r: &Rampart) -> Vec<Value> {
    let v: Value = serde_json::from_str(&r.ctl(&["workers", "--json"])).unwrap();
    v["content"]["workers"]["workers"].as_array().unwrap().clone()
}

fn pid_of_slot(r: &Rampart, id: u64) -> Option<i64> {
    workers_json(r)
        .iter()
        .find(|w| w["id"] == id && w["run_state"] == "running")
        .and_then(|w| w["pid"].as_i64())
}

/// The `completed` record of the request whose target is `target`.
fn completed_for(r: &Rampart, target: &str) -> Value {
    r.audit_records()
        .into_iter()
        .find(|rec| rec["stage"] == "completed" && rec["target"] == target)
        .unwrap_or_else(|| panic!("no completed record for {target}"))
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for our purposes (its parent reaps it).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

/// Item 1, a timeout: the outcome is written once the late worker's time is up, names it, and
/// the late worker is replaced from the supervisor's state; the old one drains and exits once it
/// runs again.
#[test]
fn a_worker_that_misses_a_change_is_recorded_and_replaced() {
    let r = Rampart::start("trust-late", &config_head(Path::new("{dir}"), 2));
    let pids = r.worker_pids();
    assert_eq!(pids.len(), 2);
    let late_pid = pids[1];
    let late_id = workers_json(&r)
        .iter()
        .find(|w| w["pid"] == late_pid)
        .map(|w| w["id"].as_u64().unwrap())
        .unwrap();
    let stopped = nix::unistd::Pid::from_raw(late_pid);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let began = Instant::now();
    let reply = r.try_ctl(&["cluster", "add", "while-stopped"]);
    let waited = began.elapsed();
    let reply = reply.expect("the change is in force: the supervisor's state holds it");
    assert!(
        reply.contains(&format!(
            "worker {late_id} did not acknowledge within 5s and was replaced by a new process built from the supervisor's state"
        )),
        "{reply}"
    );
    assert!(waited >= Duration::from_secs(4), "answered after {waited:?}");

    // The record says who applied it and who did not, and was written only after the wait.
    let rec = completed_for(&r, "cluster while-stopped");
    let processes = rec["processes"].as_array().unwrap();
    let late = processes
        .iter()
        .find(|p| p["pid"] == late_pid)
        .expect("the late worker is in the record");
    assert_eq!(late["result"], "timed_out", "{rec}");
    assert_eq!(late["replaced"], true, "{rec}");
    let others: Vec<&Value> = processes.iter().filter(|p| p["pid"] != late_pid).collect();
    assert_eq!(others.len(), 2, "the other worker and the keyring: {rec}");
    assert!(others.iter().all(|p| p["result"] == "applied"), "{rec}");
    let received = r
        .audit_records()
        .into_iter()
        .find(|x| x["seq"] == rec["received_seq"])
        .unwrap();
    let t = |v: &Value| humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();
    assert!(
        t(&rec).duration_since(t(&received)).unwrap() >= Duration::from_secs(4),
        "completed was written before the workers' time was up"
    );

    // A new worker serves the slot; it was built from the state, so it has the change.
    wait_for("a new worker in the late slot", Duration::from_secs(10), || {
        pid_of_slot(&r, late_id).is_some_and(|p| p != i64::from(late_pid))
    });
    // The old one resumes, drains (it has no connection) and exits.
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_for("the replaced worker to exit", Duration::from_secs(10), || {
        !alive(late_pid)
    });
    wait_for("the record of its exit", Duration::from_secs(5), || {
        r.audit_records().iter().any(|x| x["action"] == "worker_retired")
    });
    r.ctl(&["cluster", "add", "after-resume"]);
    let listed = r.ctl(&["cluster", "list", "--json"]);
    assert!(
        listed.contains("while-stopped") && listed.contains("after-resume"),
        "{listed}"
    );

    // `audit show --json` carries actor, outcome and the per-process detail.
    let shown = r.ctl(&[
        "audit",
        "show",
        "--json",
        r.dir.path().join("audit.log").to_str().unwrap(),
    ]);
    let shown_rec = shown
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|x| x["stage"] == "completed" && x["target"] == "cluster while-stopped")
        .unwrap_or_else(|| panic!("audit show --json lacks the record:\n{shown}"));
    assert_eq!(shown_rec["actor"]["uid"], nix::unistd::getuid().as_raw());
    assert_eq!(shown_rec["outcome"]["status"], "ok");
    assert_eq!(shown_rec["processes"], rec["processes"]);
    assert_trail_verifies(&r);
}

/// Item 1, a refusal: the worker that refused is replaced by one built from the supervisor's
/// state, which serves the change; the trail says which worker refused and why.
#[test]
fn a_worker_that_refuses_a_change_is_recorded_and_rebuilt() {
    let backend = EchoBackend::start();
    let port = free_port();
    let config = format!(
        "{}[sandbox]\nbackend_ports = [{}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n",
        config_head(Path::new("{dir}"), 2),
        backend.port
    );
    let r = Rampart::start_with_env(
        "trust-refuse",
        &config,
        &[("RAMPART_TEST_WORKER_REFUSES_CLUSTER", "refused")],
    );
    let before = pid_of_slot(&r, 0).unwrap();
    let reply = r.ctl(&["cluster", "add", "refused"]);
    assert!(
        reply.contains("worker 0 refused it (test hook: cluster `refused` refused) and was replaced"),
        "{reply}"
    );
    let rec = completed_for(&r, "cluster refused");
    let processes = rec["processes"].as_array().unwrap();
    let refusal = processes.iter().find(|p| p["process"] == "worker 0").unwrap();
    assert_eq!(refusal["result"], "refused", "{rec}");
    assert_eq!(refusal["replaced"], true, "{rec}");
    assert!(refusal["message"].as_str().unwrap().contains("test hook"), "{rec}");
    wait_for("a new worker 0", Duration::from_secs(10), || {
        pid_of_slot(&r, 0).is_some_and(|p| p != before)
    });
    // Both workers route to the cluster: the rebuilt one got it with the state.
    r.ctl(&[
        "backend",
        "add",
        "--cluster",
        "refused",
        "--address",
        &format!("127.0.0.1:{}", backend.port),
    ]);
    r.ctl(&[
        "frontend",
        "http",
        "add",
        "--address",
        &format!("127.0.0.1:{port}"),
        "--hostname",
        "refused.example",
        "--cluster",
        "refused",
    ]);
    for i in 0..20 {
        let reply = raw_exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: refused.example\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        );
        assert!(reply.starts_with("HTTP/1.1 200"), "request {i}: {reply}");
    }
    // The backend and frontend changes were applied by every worker.
    for target in ["http frontend", "backend refused/"] {
        let rec = r
            .audit_records()
            .into_iter()
            .find(|x| x["stage"] == "completed" && x["target"].as_str().unwrap_or("").starts_with(target))
            .unwrap();
        assert!(
            rec["processes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["result"] == "applied"),
            "{rec}"
        );
    }
    assert_trail_verifies(&r);
}

/// Item 2: a signal is recorded with its sender's pid and uid; stops and the logging level
/// requested over the socket with the client's identity. "Who stopped rampart at 03:12?" is
/// answered by the trail.
#[test]
fn signals_and_stops_are_recorded_with_who_sent_them() {
    let mut r = Rampart::start("trust-actors", &config_head(Path::new("{dir}"), 1));
    let supervisor = nix::unistd::Pid::from_raw(r.child.id() as i32);
    let me = std::process::id() as i64;
    let uid = nix::unistd::getuid().as_raw();
    nix::sys::signal::kill(supervisor, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("the SIGHUP record", Duration::from_secs(5), || {
        r.audit_records().iter().any(|x| x["action"] == "signal_sighup")
    });
    r.ctl(&["logging", "info"]);
    r.ctl(&["state", "save", "before-stop.jsonl"]);
    nix::sys::signal::kill(supervisor, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = r.child.wait().unwrap();
    assert!(status.success(), "{status:?}:\n{}", r.log_text());

    let recs = r.audit_records();
    let hup = recs.iter().find(|x| x["action"] == "signal_sighup").unwrap();
    assert_eq!(hup["actor"]["pid"], me, "{hup}");
    assert_eq!(hup["actor"]["uid"], uid, "{hup}");
    assert_eq!(hup["outcome"]["message"], "log file reopened", "{hup}");
    let term = recs.iter().find(|x| x["action"] == "signal_sigterm").unwrap();
    assert_eq!(term["actor"]["pid"], me, "{term}");
    assert!(
        term["outcome"]["message"].as_str().unwrap().starts_with("soft stop"),
        "{term}"
    );
    for action in ["set_logging_level", "save_state"] {
        let stages: Vec<&str> = recs
            .iter()
            .filter(|x| x["action"] == action)
            .map(|x| x["stage"].as_str().unwrap())
            .collect();
        assert_eq!(stages, ["received", "completed"], "{action}");
        let completed = recs
            .iter()
            .find(|x| x["action"] == action && x["stage"] == "completed")
            .unwrap();
        assert_eq!(completed["actor"]["uid"], uid, "{completed}");
        assert_eq!(completed["actor"]["process"], "rampart", "{completed}");
        assert_eq!(completed["actor"]["role"], "admin", "{completed}");
    }
    // The reviewer's table names the sender too.
    let table = r.ctl(&["audit", "show", r.dir.path().join("audit.log").to_str().unwrap()]);
    let line = table.lines().find(|l| l.contains("signal_sigterm")).unwrap();
    assert!(line.contains(&uid.to_string()), "{line}");
    assert_trail_verifies(&r);
}

/// `rampart shutdown` over the socket is recorded with the client before the supervisor stops.
#[test]
fn a_stop_over_the_socket_is_recorded_with_its_client() {
    let mut r = Rampart::start("trust-shutdown", &config_head(Path::new("{dir}"), 1));
    let reply = r.ctl(&["shutdown"]);
    assert!(reply.contains("soft stop"), "{reply}");
    assert!(r.child.wait().unwrap().success());
    let recs = r.audit_records();
    let stop = recs
        .iter()
        .find(|x| x["action"] == "soft_stop" && x["stage"] == "completed")
        .unwrap();
    assert_eq!(stop["actor"]["uid"], nix::unistd::getuid().as_raw(), "{stop}");
    assert_eq!(stop["outcome"]["status"], "ok", "{stop}");
    assert!(
        recs.iter()
            .any(|x| x["action"] == "soft_stop" && x["stage"] == "received")
    );
    assert_trail_verifies(&r);
}

fn send_raw(r: &Rampart, request: &rampart_command::proto::Request) -> rampart_command::proto::Response {
    let mut stream = std::os::unix::net::UnixStream::connect(&r.socket).unwrap();
    stream
        .write_all(&rampart_command::framing::encode_frame(request))
        .unwrap();
    let mut reader = rampart_command::framing::FrameReader::default();
    loop {
        let response: rampart_command::proto::Response = reader.read_message(&mut stream).unwrap().unwrap();
        if response.status != rampart_command::proto::ResponseStatus::Processing as i32 {
            return response;
        }
    }
}

fn state_hash(r: &Rampart) -> String {
    let v: Value = serde_json::from_str(&r.ctl(&["status", "--json"])).unwrap();
    v["content"]["status_report"]["state_hash"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Item 3: a diff computed against one state is never applied to another.
#[test]
fn apply_is_compare_and_swap() {
    use rampart_command::proto::{self, request::Kind};
    let port = free_port();
    let head = format!(
        "{}[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n",
        config_head(Path::new("{dir}"), 1)
    );
    let r = Rampart::start("trust-cas", &head);
    let file = r.dir.path().join("wanted.toml");
    let head = head.replace("{dir}", &r.dir.path().display().to_string());
    std::fs::write(&file, format!("{head}[clusters.wanted]\n")).unwrap();
    let file = file.to_str().unwrap();

    let dry = r.ctl(&["apply", "-f", file, "--dry-run"]);
    assert!(dry.contains("add_cluster wanted"), "{dry}");
    let base = state_hash(&r);
    assert!(dry.contains(&format!("--expect-state {base}")), "{dry}");
    // Someone else changes the state in between.
    r.ctl(&["cluster", "add", "sneaky"]);
    let err = r
        .try_ctl(&["apply", "-f", file, "--expect-state", &base])
        .expect_err("a plan computed against another state was applied");
    assert!(
        err.contains("the running state changed since this diff was computed; run apply again"),
        "{err}"
    );
    let listed = r.ctl(&["cluster", "list"]);
    assert!(!listed.contains("wanted"), "nothing was applied:\n{listed}");

    // A control plane's own batch carries its base the same way.
    let stale = proto::Request {
        id: "cas-1".into(),
        kind: Some(Kind::Apply(proto::Batch {
            requests: vec![proto::Request {
                id: String::new(),
                kind: Some(Kind::AddCluster(proto::Cluster {
                    cluster_id: "from-batch".into(),
                    ..Default::default()
                })),
            }],
            base_state_hash: base.clone(),
        })),
    };
    let response = send_raw(&r, &stale);
    assert_eq!(response.status, proto::ResponseStatus::Failure as i32);
    assert!(response.message.contains("run apply again"), "{}", response.message);
    let mut fresh = stale.clone();
    if let Some(Kind::Apply(b)) = &mut fresh.kind {
        b.base_state_hash = state_hash(&r);
    }
    fresh.id = "cas-2".into();
    let response = send_raw(&r, &fresh);
    assert_eq!(
        response.status,
        proto::ResponseStatus::Ok as i32,
        "{}",
        response.message
    );

    // Without --expect-state the supervisor diffs against whatever runs now: the file wins.
    let applied = r.ctl(&["apply", "-f", file]);
    assert!(applied.contains("remove_cluster sneaky"), "{applied}");
    let listed = r.ctl(&["cluster", "list"]);
    assert!(listed.contains("wanted") && !listed.contains("sneaky"), "{listed}");
    // Applying the same file again changes nothing.
    assert!(r.ctl(&["apply", "-f", file]).starts_with("no change"));
    let denied: Vec<Value> = r
        .audit_records()
        .into_iter()
        .filter(|x| x["outcome"]["code"] == "stale_base")
        .collect();
    assert_eq!(denied.len(), 2, "both stale attempts are in the trail");
    assert_trail_verifies(&r);
}

/// Item 6: `listener update` changes only the fields given, on the running workers; `listener
/// add` never resets an existing listener.
#[test]
fn a_listener_is_changed_in_place() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let r = Rampart::start(
        "trust-listener",
        &format!(
            "{}[[listeners]]\naddress = \"{address}\"\nanswers = {{ 503 = \"kept\" }}\n",
            config_head(Path::new("{dir}"), 2)
        ),
    );
    let body = r.dir.path().join("404.txt");
    std::fs::write(&body, "no such site here\n").unwrap();
    let get = || {
        raw_exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: nowhere.example\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
    };
    assert!(!get().contains("no such site here"));
    r.ctl(&[
        "listener",
        "update",
        &address,
        "--answer",
        &format!("404={}", body.display()),
        "--request-timeout-ms",
        "4000",
    ]);
    // Every worker serves the new answer (new connections land on either).
    for _ in 0..10 {
        let reply = get();
        assert!(
            reply.starts_with("HTTP/1.1 404") && reply.contains("no such site here"),
            "{reply}"
        );
    }
    let v: Value = serde_json::from_str(&r.ctl(&["listener", "list", "--json"])).unwrap();
    let l = &v["content"]["listeners"]["listeners"][0];
    assert_eq!(l["request_timeout_ms"], 4000, "{l}");
    assert_eq!(l["answers"]["503"], "kept", "fields not named keep their values: {l}");
    assert_eq!(l["active"], true, "{l}");
    let err = r
        .try_ctl(&["listener", "add", "--address", &address, "--protocol", "http"])
        .expect_err("adding over an existing listener reset it");
    assert!(
        err.contains("already exists") && err.contains("listener update"),
        "{err}"
    );
    let err = r
        .try_ctl(&["listener", "update", &address, "--tls-min-version", "1.3"])
        .expect_err("an HTTP listener took a TLS version");
    assert!(err.contains("only HTTPS listeners"), "{err}");
    let rec = completed_for(&r, &format!("listener {address} (request_timeout_ms, answers.404)"));
    assert_eq!(rec["outcome"]["status"], "ok");
    assert_trail_verifies(&r);
}

/// Item 10: 50 acknowledged changes, `kill -9` of the supervisor, a start: the same state,
/// served.
#[test]
fn runtime_changes_survive_a_kill_9() {
    let backend = EchoBackend::start();
    let port = free_port();
    // Fifty changes in a few seconds: above the default rate limit of the command socket.
    let aux = TempDir::new("trust-saved-policy");
    let policy = aux.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[grant]]\nuid = {}\nrole = \"admin\"\nlimits = {{ mutating_per_second = 1000, mutating_burst = 1000 }}\n",
            nix::unistd::getuid()
        ),
    )
    .unwrap();
    let config = format!(
        "{}saved_state = \"state.jsonl\"\naccess_policy = \"{}\"\n[sandbox]\nbackend_ports = [{}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n",
        config_head(Path::new("{dir}"), 2),
        policy.display(),
        backend.port
    );
    let mut r = Rampart::start("trust-saved", &config);
    let mut changes = 0;
    for i in 0..17 {
        let cluster = format!("site-{i}");
        r.ctl(&["cluster", "add", &cluster]);
        r.ctl(&[
            "backend",
            "add",
            "--cluster",
            &cluster,
            "--address",
            &format!("127.0.0.1:{}", backend.port),
        ]);
        r.ctl(&[
            "frontend",
            "http",
            "add",
            "--address",
            &format!("127.0.0.1:{port}"),
            "--hostname",
            &format!("site-{i}.example"),
            "--cluster",
            &cluster,
        ]);
        changes += 3;
    }
    assert!(changes >= 50);
    let hash = state_hash(&r);
    let saved = std::fs::metadata(r.dir.path().join("state/state.jsonl")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        saved.permissions().mode() & 0o777,
        0o600,
        "a saved state may hold private keys"
    );
    r.kill_and_restart();
    assert_eq!(state_hash(&r), hash, "the state after the restart");
    assert!(
        r.log_text().contains("state loaded from the saved state"),
        "{}",
        r.log_text()
    );
    for i in [0, 16] {
        let reply = raw_exchange(
            port,
            format!("GET / HTTP/1.1\r\nHost: site-{i}.example\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        assert!(reply.starts_with("HTTP/1.1 200"), "site-{i}: {reply}");
    }
    assert_trail_verifies(&r);
}

/// Item 9: every accepted setting does what it says, or is refused by name. The state's unit
/// tests walk each field; this is the same through the file, the socket and the CLI.
#[test]
fn settings_nothing_enforces_are_refused_by_name() {
    let dir = TempDir::new("trust-unsupported");
    let check = |text: &str| {
        let file = dir.path().join("c.toml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(rampart_bin())
            .args(["config", "check", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "accepted:\n{text}");
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    };
    let port = free_port();
    for (setting, text) in [
        (
            "expect_proxy_protocol",
            format!("[[listeners]]\naddress = \"127.0.0.1:{port}\"\nexpect_proxy_protocol = true\n"),
        ),
        (
            "send_proxy_protocol",
            format!("[[listeners]]\naddress = \"127.0.0.1:{port}\"\nsend_proxy_protocol = true\n"),
        ),
        (
            "active health checks",
            "[clusters.app]\nhealth_check = { path = \"/health\" }\n".to_string(),
        ),
    ] {
        let err = check(&text);
        assert!(
            err.contains(setting) && err.contains("not supported"),
            "{setting}: {err}"
        );
    }
    let r = Rampart::start("trust-unsupported-rt", &config_head(Path::new("{dir}"), 1));
    r.ctl(&["cluster", "add", "app"]);
    for args in [
        &["health-check", "set", "--cluster", "app", "--path", "/health"][..],
        &["health-check", "list"][..],
    ] {
        let err = r.try_ctl(args).expect_err("a request nothing answers was accepted");
        assert!(err.contains("is not available in this version"), "{args:?}: {err}");
    }
}

/// Item 11: after start the supervisor keeps only the capabilities its profile lists and lives
/// in landlock: it cannot write outside its directories even through a path the access policy
/// accepts (a symbolic link inside the state directory).
#[test]
fn the_supervisor_gives_up_what_it_no_longer_needs() {
    if !rampart_tests::require_root("the_supervisor_gives_up_what_it_no_longer_needs") {
        return;
    }
    let r = Rampart::start("trust-narrow", &config_head(Path::new("{dir}"), 1));
    let status = std::fs::read_to_string(format!("/proc/{}/status", r.child.id())).unwrap();
    let field = |name: &str| {
        let hex = status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    // CAP_KILL 5, CAP_SETGID 6, CAP_SETUID 7, CAP_SETPCAP 8, CAP_NET_BIND_SERVICE 10,
    // CAP_IPC_LOCK 14, CAP_SYS_PTRACE 19.
    let kept: u64 = [5u32, 6, 7, 8, 10, 14, 19].iter().map(|b| 1u64 << b).sum();
    assert_eq!(field("CapEff:"), kept, "{status}");
    assert_eq!(field("CapPrm:"), kept, "{status}");
    assert_eq!(field("CapBnd:") & !kept, 0, "{status}");
    assert_eq!(field("CapInh:"), 0);
    assert_eq!(field("CapAmb:"), 0);
    let v: Value = serde_json::from_str(&r.ctl(&["status", "--json"])).unwrap();
    assert_eq!(
        v["content"]["status_report"]["supervisor"]["landlock_status"], "fully_enforced",
        "{v}"
    );
    // The workers it starts still get their jail, under its narrowed bounding set.
    assert!(workers_json(&r).iter().all(|w| w["run_state"] == "running"));

    // The access policy accepts `escape.jsonl` (a name inside the state directory); landlock
    // refuses the write where the link leads.
    let outside = TempDir::new("trust-narrow-outside");
    std::os::unix::fs::symlink(outside.path(), r.dir.path().join("state/escape")).unwrap();
    let err = r
        .try_ctl(&["state", "save", "escape/saved.jsonl"])
        .expect_err("the supervisor wrote outside its directories");
    assert!(err.contains("landlock rules let it write only beneath"), "{err}");
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "a file was written"
    );
    // Inside, it writes.
    r.ctl(&["state", "save", "inside.jsonl"]);

    let shown = Command::new(rampart_bin())
        .args(["policy", "show", "--supervisor", "-c"])
        .arg(&r.config)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("CAP_SYS_PTRACE") && shown.contains("/state"), "{shown}");
    assert!(!shown.contains("CAP_DAC_OVERRIDE"), "{shown}");
}
