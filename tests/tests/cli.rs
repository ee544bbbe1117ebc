//! The CLI's offline commands, run as a user would: `policy show`, `config check`,
//! `sandbox check`, `--version`.

use std::process::Command;

use rampart_tests::{assert_snapshot, rampart_bin, workspace};

#[test]
fn policy_show_matches_the_reviewed_snapshot() {
    let out = Command::new(rampart_bin())
        .args(["policy", "show", "-c"])
        .arg(workspace().join("tests/fixtures/policy.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_snapshot("policy_show.txt", &String::from_utf8(out.stdout).unwrap());
}

#[test]
fn policy_show_json_lists_every_rule_with_its_reason() {
    let out = Command::new(rampart_bin())
        .args(["policy", "show", "--json", "-c"])
        .arg(workspace().join("tests/fixtures/policy.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let profile: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = profile["syscalls"].as_array().unwrap();
    assert!(rules.len() > 30);
    assert!(rules.iter().all(|r| !r["reason"].as_str().unwrap().is_empty()));
    assert_eq!(
        profile["landlock"]["tcp_connect"]["ports"],
        serde_json::json!([8080, 9090])
    );
    assert_eq!(profile["default_action"], "kill_process");
}

#[test]
fn config_check_reports_the_first_error_with_its_line() {
    let dir = rampart_tests::TempDir::new("config-check");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "worker_count = 2\n[[listeners]]\naddress = \"127.0.0.1:80\"\nprotocol = \"htp\"\n",
    )
    .unwrap();
    let out = Command::new(rampart_bin())
        .args(["config", "check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("bad.toml:4:"), "{err}");
    assert!(err.contains("listeners[0].protocol"), "{err}");
    assert!(err.contains("unknown variant `htp`"), "{err}");
    let out = Command::new(rampart_bin())
        .args(["config", "check", "-c"])
        .arg(workspace().join("tests/fixtures/policy.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(
        summary.contains("1 listener(s), 1 cluster(s), 1 frontend(s), 2 backend(s)"),
        "{summary}"
    );
}

#[test]
fn sandbox_check_enters_the_jail_and_reports_each_layer() {
    let out = Command::new(rampart_bin())
        .args(["sandbox", "check", "--json", "-c"])
        .arg(workspace().join("tests/fixtures/policy.toml"))
        .output()
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if value["landlock_abi"].as_u64().unwrap_or(0) < 6 {
        // The fixture requires landlock: a kernel without it must make the check fail.
        assert_eq!(out.status.code(), Some(1));
        rampart_tests::skip("sandbox_check", "landlock ABI < 6 on this kernel");
        return;
    }
    assert!(out.status.success(), "{value}");
    assert_eq!(value["report"]["landlock_status"], "fully_enforced");
    assert_eq!(value["report"]["seccomp_mode"], "filter (kill_process)");
    assert_eq!(value["report"]["no_new_privs"], true);
    if nix::unistd::Uid::effective().is_root() {
        assert_eq!(value["report"]["cap_bounding"], 0);
        assert_ne!(value["report"]["uid"], 0);
    }
}

#[test]
fn version_names_the_revision() {
    let out = Command::new(rampart_bin()).arg("--version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("rampart 0."), "{text}");
    assert!(text.contains('('), "{text}");
}

#[test]
fn policy_show_keyring_has_no_network() {
    let out = Command::new(rampart_bin())
        .args(["policy", "show", "--keyring", "--json", "-c"])
        .arg(workspace().join("tests/fixtures/policy.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let profile: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for forbidden in ["socket", "connect", "accept4"] {
        assert!(!names.contains(&forbidden), "{forbidden}");
    }
    assert_eq!(profile["landlock"]["tcp_connect"]["ports"], serde_json::json!([]));
}
