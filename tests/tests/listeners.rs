//! One instance per listener address, against the real binary: every listening socket is
//! SO_REUSEPORT, so without a check a second supervisor of the same uid would bind the same
//! address and the kernel would split its traffic between the two. And one writer per audit
//! log: a second supervisor on the same file would break the first one's chain.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rampart_tests::{Rampart, TempDir, config_head, free_port, rampart_bin};

fn config(port: u16, top: &str) -> String {
    format!(
        "{}{top}\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n",
        config_head(Path::new("{dir}"), 1)
    )
}

/// Runs `rampart start` on `config` in a new directory and waits (10 s at most) for it to
/// exit: its exit code and output. A start that keeps running fails the test.
fn start_must_fail(name: &str, config: &str) -> (i32, String) {
    let dir = TempDir::new(name);
    let path = dir.path().join("rampart.toml");
    std::fs::write(&path, config.replace("{dir}", &dir.path().display().to_string())).unwrap();
    let mut child = Command::new(rampart_bin())
        .arg("start")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "rampart started where it must be refused:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_second_instance_on_a_listener_address_is_refused_unless_shared() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut first = Rampart::start("listener-first", &config(port, ""));

    // Another directory, command socket and audit log; the same listener: refused, naming the
    // address and the instance that holds it.
    let (code, text) = start_must_fail("listener-second", &config(port, ""));
    assert_eq!(code, 1, "{text}");
    for part in [
        format!("listener {address} is taken"),
        format!("pid {}", first.child.id()),
        format!("command socket {}", first.socket.display()),
        "share_listeners = true".to_string(),
    ] {
        assert!(text.contains(&part), "{part}: {text}");
    }
    // The first instance is untouched and still the only one.
    first.ctl(&["status"]);

    // Asked for, sharing works.
    let shared = Rampart::start("listener-shared", &config(port, "share_listeners = true\n"));
    shared.ctl(&["status"]);
    drop(shared);

    // A supervisor killed with SIGKILL holds nothing: a new one starts on the address at once
    // (its workers, which held copies of the sockets, die with it).
    let _ = first.child.kill();
    let _ = first.child.wait();
    let next = Rampart::start("listener-next", &config(port, ""));
    next.ctl(&["status"]);
    // And the same configuration restarted after a crash starts as well.
    drop(next);
    first.kill_and_restart();
    first.ctl(&["status"]);
}

#[test]
fn share_listeners_is_a_boolean_key_of_the_configuration() {
    let dir = TempDir::new("listener-config");
    let path = dir.path().join("rampart.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(rampart_bin())
            .args(["config", "check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = check("share_listeners = true\n");
    assert!(ok, "{text}");
    let (ok, text) = check("share_listeners = \"yes\"\n");
    assert!(!ok && text.contains("share_listeners"), "{text}");
}

#[test]
fn a_listener_added_at_runtime_on_an_address_another_instance_holds_is_refused() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let first = Rampart::start("listener-runtime-first", &config(port, ""));
    let second = Rampart::start("listener-runtime-second", &config(free_port(), ""));
    let err = second
        .try_ctl(&["listener", "add", "--address", &address, "--protocol", "http"])
        .unwrap_err();
    assert!(err.contains(&format!("listener {address} is taken")), "{err}");
    // Once the supervisor has narrowed itself (landlock) it cannot read another process's
    // descriptors: the message then says how to find the other instance.
    assert!(
        err.contains(&format!("ss -ltnp 'sport = :{port}'")) || err.contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    let list = second.ctl(&["listener", "list", "--json"]);
    assert!(!list.contains(&address), "{list}");
    first.ctl(&["status"]);
}

#[test]
fn a_second_instance_on_the_same_audit_log_is_refused_before_it_writes() {
    let first = Rampart::start("audit-writer-first", &config(free_port(), ""));
    let log = first.dir.path().join("audit.log");
    let before = std::fs::read(&log).unwrap();
    // Its own directory, command socket and listener; the first one's audit log.
    let second = config(free_port(), "").replace(
        "audit_log = \"{dir}/audit.log\"",
        &format!("audit_log = \"{}\"", log.display()),
    );
    let (code, text) = start_must_fail("audit-writer-second", &second);
    assert_eq!(code, 1, "{text}");
    for part in [
        format!(
            "audit log {} is being written by another running rampart",
            log.display()
        ),
        format!("pid {}", first.child.id()),
    ] {
        assert!(text.contains(&part), "{part}: {text}");
    }
    assert_eq!(
        std::fs::read(&log).unwrap(),
        before,
        "the refused instance wrote to the log"
    );
    first.ctl(&["cluster", "add", "still-chained"]);
    let out = Command::new(rampart_bin())
        .args(["audit", "verify", "--live"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
