//! What an operator relies on day to day: the log file follows logrotate (SIGHUP), a worker that
//! stops answering is named in the reply, a silent command connection is closed, and a large
//! configuration loads without the workers hanging on it.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Rampart, TempDir, config_head, free_port, raw_exchange};

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// logrotate moves the file away and sends SIGHUP: the supervisor writes to a new file at the
/// configured path, and the moved file keeps what was written before.
#[test]
fn sighup_reopens_the_log_file() {
    let config = format!(
        "{}log_target = \"{{dir}}/supervisor.log\"\n",
        config_head(Path::new("{dir}"), 1)
    );
    let r = Rampart::start("ops-sighup", &config);
    let log = r.dir.path().join("supervisor.log");
    let rotated = r.dir.path().join("supervisor.log.1");
    wait_for("the first log lines", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("jailed"))
    });
    std::fs::rename(&log, &rotated).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("a new log file after SIGHUP", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("log reopened (SIGHUP)"))
    });
    r.ctl(&["cluster", "add", "after-rotation"]);
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("jailed"), "{old}");
    assert!(
        !old.contains("log reopened"),
        "the moved file got lines after SIGHUP:\n{old}"
    );
}

/// With an access policy, a command connection silent longer than `idle_timeout_secs` is closed.
#[test]
fn an_idle_command_connection_is_closed() {
    let aux = TempDir::new("ops-idle-policy");
    let policy = aux.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[limits]\nidle_timeout_secs = 1\n\n[[grant]]\nuid = {}\nrole = \"admin\"\n",
            nix::unistd::getuid()
        ),
    )
    .unwrap();
    let config = format!(
        "{}access_policy = \"{}\"\n",
        config_head(Path::new("{dir}"), 1),
        policy.display()
    );
    let r = Rampart::start("ops-idle", &config);
    let mut stream = std::os::unix::net::UnixStream::connect(&r.socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).expect("the connection was not closed within 6 s");
    let after = began.elapsed();
    assert_eq!(n, 0, "expected the end of the stream");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the idle timeout"
    );
    // A connection that talks is served.
    r.ctl(&["status"]);
}

/// A hosting platform's configuration: 20,000 frontends over 400 clusters. Workers used to rebuild
/// their router and TLS contexts for every item of the initial state, so the time to serve grew
/// with the square of the frontends (10,000 took 17 s in a release build, 100,000 more than two
/// minutes). This checks liveness, not speed: the last frontend of the file is served well within
/// the deadline, and a change on top of it is acknowledged.
#[test]
fn a_large_configuration_is_served_without_delay() {
    const CLUSTERS: usize = 400;
    const PER_CLUSTER: usize = 50;
    let echo = EchoBackend::start();
    let port = free_port();
    let mut config = format!(
        "{}[sandbox]\nbackend_ports = [{e}]\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n",
        config_head(Path::new("{dir}"), 1),
        e = echo.port
    );
    for c in 0..CLUSTERS {
        let frontends: Vec<String> = (0..PER_CLUSTER)
            .map(|i| format!("{{ address = \"127.0.0.1:{port}\", hostname = \"h{c}-{i}.test\" }}"))
            .collect();
        config.push_str(&format!(
            "\n[clusters.c{c}]\nbackends = [ {{ address = \"127.0.0.1:{}\" }} ]\nfrontends = [ {} ]\n",
            echo.port,
            frontends.join(", ")
        ));
    }
    let r = Rampart::start("ops-large", &config);
    let last = format!("h{}-{}.test", CLUSTERS - 1, PER_CLUSTER - 1);
    let request = format!("GET / HTTP/1.1\r\nHost: {last}\r\nConnection: close\r\n\r\n");
    wait_for("the last frontend served", Duration::from_secs(30), || {
        raw_exchange(port, request.as_bytes(), Duration::from_secs(2)).starts_with("HTTP/1.1 200")
    });
    let status = r.ctl(&["status", "--json"]);
    assert!(
        status.contains("\"frontends\":20000") || status.contains("\"frontends\": 20000"),
        "{status}"
    );
    r.ctl(&["cluster", "add", "one-more"]);
}
