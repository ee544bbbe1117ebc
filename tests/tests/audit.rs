//! The control plane's door and its trail, against the real binary: roles and tenant patterns
//! enforced on requests from another uid, per-uid rate limits, tamper detection on a log a
//! running supervisor wrote, fail-closed writes when the audit log cannot be written, and the
//! syslog mirror against a real rsyslogd that goes away and comes back.
//!
//! Not tested here: a connection whose SO_PEERCRED cannot be read. On Linux the kernel records
//! the credentials of every connected AF_UNIX stream socket at connect() and getsockopt cannot
//! fail for one, so there is no honest way to provoke that refusal from outside.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rampart_tests::{
    EchoBackend, Rampart, TempDir, config_head, free_port, rampart_bin, raw_exchange, require_root, require_tool, skip,
};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// The harness's common configuration head (paths under `{dir}`), then `top` (top-level keys,
/// which must come before any table).
fn config(top: &str) -> String {
    format!("{}{top}", config_head(Path::new("{dir}"), 1))
}

fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Root as admin, uid 65534 with `nobody_grant` (the lines after `uid = 65534`).
fn policy_file(dir: &TempDir, nobody_grant: &str) -> PathBuf {
    write(
        dir,
        "policy.toml",
        &format!("[[grant]]\nuid = 0\nrole = \"admin\"\n\n[[grant]]\nuid = {NOBODY}\n{nobody_grant}"),
    )
}

/// Whether commands can be run as uid 65534 here.
fn can_switch_uid(test: &str) -> bool {
    require_root(test) && require_tool(test, "setpriv")
}

/// Lets uid 65534 reach the command socket: the directory must be searchable by others, and
/// with an access policy the socket itself is 0666.
fn open_socket_dir(r: &Rampart) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(r.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(&r.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o666,
        "with an access policy the command socket is open to every uid"
    );
}

/// Runs a client command as uid/gid 65534 with no supplementary groups.
fn as_nobody(r: &Rampart, args: &[&str]) -> Result<String, String> {
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ])
        .arg(rampart_bin())
        .arg("-s")
        .arg(&r.socket)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn audit_log(r: &Rampart) -> PathBuf {
    r.dir.path().join("audit.log")
}

/// Every record of an audit file, parsed.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// `rampart audit show FILE --json FILTERS...`, parsed.
fn audit_show(path: &Path, filters: &[&str]) -> Vec<Value> {
    let out = Command::new(rampart_bin())
        .args(["audit", "show"])
        .arg(path)
        .arg("--json")
        .args(filters)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn cluster_ids(r: &Rampart) -> Vec<String> {
    let v: Value = serde_json::from_str(&r.ctl(&["--json", "cluster", "list"])).unwrap();
    v["content"]["clusters"]["clusters"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| c["cluster"]["cluster_id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn state_hash(r: &Rampart) -> String {
    let v: Value = serde_json::from_str(&r.ctl(&["--json", "status"])).unwrap();
    v["content"]["status_report"]["state_hash"]
        .as_str()
        .unwrap()
        .to_string()
}

fn http_get(port: u16, host: &str) -> String {
    raw_exchange(
        port,
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(3),
    )
}

#[test]
fn viewer_cannot_add_a_cluster_and_the_refusal_is_audited() {
    const TEST: &str = "viewer_cannot_add_a_cluster";
    if !can_switch_uid(TEST) {
        return;
    }
    let aux = TempDir::new("audit-viewer-policy");
    let policy = policy_file(&aux, "role = \"viewer\"\n");
    let r = Rampart::start(
        "audit-viewer",
        &config(&format!("access_policy = \"{}\"\n", policy.display())),
    );
    open_socket_dir(&r);
    let before = state_hash(&r);

    // A viewer may look...
    let status = as_nobody(&r, &["status"]).unwrap();
    assert!(status.contains(&before), "{status}");
    // ...but not change anything.
    let err = as_nobody(&r, &["cluster", "add", "x"]).unwrap_err();
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("viewer"), "{err}");

    assert_eq!(cluster_ids(&r), Vec::<String>::new());
    assert_eq!(state_hash(&r), before);

    let denied = audit_show(&audit_log(&r), &["--outcome", "denied"]);
    assert_eq!(denied.len(), 1, "{denied:#?}");
    let rec = &denied[0];
    assert_eq!(rec["stage"], "denied");
    assert_eq!(rec["action"], "add_cluster");
    assert_eq!(rec["target"], "cluster x");
    assert_eq!(rec["actor"]["uid"], NOBODY);
    assert_eq!(rec["actor"]["gid"], NOBODY);
    assert_eq!(rec["actor"]["role"], "viewer");
    assert_eq!(rec["outcome"]["code"], "forbidden");
    // Refused before anything was applied: no `received` record exists for it.
    assert!(
        records(&audit_log(&r))
            .iter()
            .all(|rec| rec["stage"] != "received" && rec["stage"] != "completed"),
        "a refused request must not reach the received stage"
    );
}

#[test]
fn tenant_adds_its_own_cluster_and_hostname_and_nothing_else() {
    const TEST: &str = "tenant_is_confined";
    if !can_switch_uid(TEST) {
        return;
    }
    let backend = EchoBackend::start();
    let port = free_port();
    let aux = TempDir::new("audit-tenant-policy");
    let policy = policy_file(
        &aux,
        "role = \"tenant\"\ncluster_patterns = [\"shop-*\"]\nhostname_patterns = [\"*.shop.example.com\"]\n",
    );
    let r = Rampart::start(
        "audit-tenant",
        &config(&format!(
            "access_policy = \"{}\"\n[sandbox]\nbackend_ports = [{}]\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n",
            policy.display(),
            backend.port
        )),
    );
    open_socket_dir(&r);
    let address = format!("127.0.0.1:{port}");
    let backend_address = format!("127.0.0.1:{}", backend.port);

    as_nobody(&r, &["cluster", "add", "shop-1"]).unwrap();
    as_nobody(
        &r,
        &["backend", "add", "--cluster", "shop-1", "--address", &backend_address],
    )
    .unwrap();
    as_nobody(
        &r,
        &[
            "frontend",
            "http",
            "add",
            "--address",
            &address,
            "--hostname",
            "www.shop.example.com",
            "--cluster",
            "shop-1",
        ],
    )
    .unwrap();

    let err = as_nobody(
        &r,
        &[
            "frontend",
            "http",
            "add",
            "--address",
            &address,
            "--hostname",
            "evil.example.org",
            "--cluster",
            "shop-1",
        ],
    )
    .unwrap_err();
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("evil.example.org"), "{err}");
    let err = as_nobody(&r, &["cluster", "add", "bank"]).unwrap_err();
    assert!(err.contains("permission denied"), "{err}");

    assert_eq!(cluster_ids(&r), vec!["shop-1".to_string()]);
    let frontends = r.ctl(&["--json", "frontend", "list"]);
    assert!(frontends.contains("www.shop.example.com"), "{frontends}");
    assert!(!frontends.contains("evil.example.org"), "{frontends}");

    // The workers route the tenant's hostname to its backend, and know nothing of the other one.
    let answer = http_get(port, "www.shop.example.com");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&format!("\"port\":{}", backend.port)), "{answer}");
    let answer = http_get(port, "evil.example.org");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    let log = audit_log(&r);
    let done: Vec<String> = audit_show(&log, &["--actor", "65534", "--outcome", "ok"])
        .iter()
        .filter(|rec| rec["stage"] == "completed")
        .map(|rec| rec["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(done, ["add_cluster", "add_backend", "add_http_frontend"]);
    let denied = audit_show(&log, &["--actor", "65534", "--outcome", "denied"]);
    assert_eq!(denied.len(), 2, "{denied:#?}");
    assert_eq!(denied[0]["action"], "add_http_frontend");
    assert!(
        denied[0]["target"].as_str().unwrap().contains("evil.example.org"),
        "{}",
        denied[0]
    );
    assert_eq!(denied[0]["actor"]["role"], "tenant");
    assert_eq!(denied[1]["action"], "add_cluster");
    assert_eq!(denied[1]["target"], "cluster bank");
}

#[test]
fn admin_can_do_everything() {
    const TEST: &str = "admin_can_do_everything";
    if !require_root(TEST) {
        return;
    }
    let aux = TempDir::new("audit-admin-policy");
    let policy = policy_file(&aux, "role = \"viewer\"\n");
    let r = Rampart::start(
        "audit-admin",
        &config(&format!("access_policy = \"{}\"\n", policy.display())),
    );
    let address = format!("127.0.0.1:{}", free_port());

    r.ctl(&["cluster", "add", "adm-1"]);
    r.ctl(&["cluster", "add", "adm-2"]);
    r.ctl(&["cluster", "remove", "adm-1"]);
    r.ctl(&["listener", "add", "--address", &address, "--protocol", "http"]);
    let saved = r.ctl(&["state", "save", "saved.jsonl"]);
    assert!(saved.contains("saved"), "{saved}");

    assert_eq!(cluster_ids(&r), vec!["adm-2".to_string()]);
    let listeners = r.ctl(&["listener", "list"]);
    assert!(listeners.contains(&address), "{listeners}");
    let file = std::fs::read_to_string(r.dir.path().join("state/saved.jsonl")).unwrap();
    assert!(file.contains("adm-2") && file.contains(&address), "{file}");
    // The new listener accepts connections (404: no frontend yet).
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    let reply = http_get(port, "any.example.com");
    assert!(reply.starts_with("HTTP/1.1 404"), "reply {reply:?}:\n{}", r.log_text());

    let recs = records(&audit_log(&r));
    let completed: Vec<(&str, &str)> = recs
        .iter()
        .filter(|rec| rec["stage"] == "completed")
        .map(|rec| {
            (
                rec["action"].as_str().unwrap(),
                rec["outcome"]["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        completed,
        [
            ("add_cluster", "ok"),
            ("add_cluster", "ok"),
            ("remove_cluster", "ok"),
            ("add_listener", "ok"),
            ("save_state", "ok")
        ]
    );
    for rec in recs.iter().filter(|rec| rec["stage"] == "completed") {
        assert_eq!(rec["actor"]["uid"], 0);
        assert_eq!(rec["actor"]["role"], "admin");
        if rec["action"] != "save_state" {
            assert_ne!(rec["state_before"], rec["state_after"], "{rec}");
        }
    }
    assert!(recs.iter().all(|rec| rec["stage"] != "denied"));
}

#[test]
fn a_flood_from_one_uid_is_limited_without_slowing_another() {
    const TEST: &str = "rate_limit_per_uid";
    if !can_switch_uid(TEST) {
        return;
    }
    let aux = TempDir::new("audit-rate-policy");
    let policy = policy_file(
        &aux,
        "role = \"viewer\"\nlimits = { read_per_second = 5, read_burst = 5 }\n",
    );
    let r = Rampart::start(
        "audit-rate",
        &config(&format!("access_policy = \"{}\"\n", policy.display())),
    );
    open_socket_dir(&r);

    let (flood, flood_time, root) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let start = Instant::now();
            let results: Vec<Result<String, String>> = (0..20).map(|_| as_nobody(&r, &["status"])).collect();
            (results, start.elapsed())
        });
        let root = s.spawn(|| {
            (0..20)
                .map(|_| {
                    let start = Instant::now();
                    (r.try_ctl(&["status"]), start.elapsed())
                })
                .collect::<Vec<_>>()
        });
        let (results, elapsed) = flood.join().unwrap();
        (results, elapsed, root.join().unwrap())
    });

    let refused: Vec<&String> = flood.iter().filter_map(|x| x.as_ref().err()).collect();
    let served = flood.len() - refused.len();
    for e in &refused {
        assert!(
            e.contains("uid 65534 sent read-only requests faster than 5 per second"),
            "{e}"
        );
    }
    // The burst, plus what refilled while the flood lasted.
    let refill = (flood_time.as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        served >= 5 && served <= 5 + refill,
        "{served} served in {flood_time:?}: {flood:?}"
    );
    assert!(!refused.is_empty(), "20 requests in {flood_time:?}: none refused");

    for (result, took) in &root {
        assert!(result.is_ok(), "root was limited by another uid's flood: {result:?}");
        assert!(*took < Duration::from_secs(2), "a root request took {took:?}");
    }

    let denied = audit_show(&audit_log(&r), &["--outcome", "denied"]);
    assert_eq!(denied.len(), refused.len(), "{denied:#?}");
    for rec in &denied {
        assert_eq!(rec["actor"]["uid"], NOBODY);
        assert_eq!(rec["action"], "status");
        assert_eq!(rec["outcome"]["code"], "rate_limited");
    }
}

// ---------------------------------------------------------------------------------------------
// Tampering with a log written by a running supervisor

/// Sends SIGTERM and waits for a clean exit, so the log ends with a close checkpoint.
fn stop(r: &mut Rampart) {
    let pid = nix::unistd::Pid::from_raw(r.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            assert!(status.success(), "rampart exited with {status}:\n{}", r.log_text());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rampart did not stop on SIGTERM:\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn keygen(path: &Path) {
    let out = Command::new(rampart_bin())
        .args(["audit", "keygen", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `rampart audit verify FILE --pubkey KEY --json`: exit code and report.
fn verify(file: &Path, pubkey: &Path) -> (i32, Value) {
    let out = Command::new(rampart_bin())
        .args(["audit", "verify"])
        .arg(file)
        .arg("--pubkey")
        .arg(pubkey)
        .arg("--json")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

/// Verifies a tampered copy and checks that it fails with `class` starting at `seq`, and with
/// no problem of another class.
fn assert_finding(dir: &TempDir, name: &str, lines: &[String], pubkey: &Path, class: &str, seq: u64) {
    let path = write(dir, name, &(lines.join("\n") + "\n"));
    let (code, report) = verify(&path, pubkey);
    assert_eq!(code, 1, "{name}: {report:#}");
    assert_eq!(report["valid"], false, "{name}: {report:#}");
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p["class"] == class && p["seq"] == seq),
        "{name}: expected {class} at seq {seq}: {report:#}"
    );
    assert!(
        problems.iter().all(|p| p["class"] == class),
        "{name}: only {class} expected: {report:#}"
    );
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tampering_with_a_real_log_is_found_and_classified() {
    const TEST: &str = "audit_tamper";
    if !require_root(TEST) {
        return;
    }
    let keys = TempDir::new("audit-tamper-keys");
    let key = keys.path().join("signing.key");
    let pubkey = keys.path().join("signing.key.pub");
    keygen(&key);
    let mut r = Rampart::start(
        "audit-tamper",
        &config(&format!(
            "[audit]\nsigning_key = \"{}\"\ncheckpoint_every = 5\n",
            key.display()
        )),
    );
    for i in 1..=6 {
        r.ctl(&["cluster", "add", &format!("t{i}")]);
    }
    r.ctl(&["cluster", "remove", "t1"]);
    r.ctl(&["cluster", "remove", "t2"]);
    // A request refused by the state, audited as received then completed with an error.
    assert!(r.try_ctl(&["cluster", "remove", "nope"]).is_err());
    stop(&mut r);

    let log = audit_log(&r);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let recs = records(&log);
    let seq = |i: usize| recs[i]["seq"].as_u64().unwrap();
    let is_checkpoint = |i: usize| recs[i]["stage"] == "checkpoint";
    let last = recs.last().unwrap();
    assert_eq!(last["checkpoint"]["kind"], "close", "{last}");
    let counts = recs.iter().filter(|r| r["checkpoint"]["kind"] == "count").count();
    assert!(counts >= 3, "{counts} count checkpoints in {} records", recs.len());

    // Untouched: clean.
    let (code, report) = verify(&log, &pubkey);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["valid"], true);
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["signatures_checked"], true);
    assert_eq!(report["signatures_verified"], counts as u64 + 1);

    let work = TempDir::new("audit-tamper-copies");

    // One byte of a record changed: its `received` record for cluster t3, "t3" -> "u3".
    let i = recs
        .iter()
        .position(|r| r["stage"] == "received" && r["target"] == "cluster t3")
        .unwrap();
    assert!(i + 2 < recs.len());
    let mut modified = lines.clone();
    modified[i] = modified[i].replacen("\"target\":\"cluster t3\"", "\"target\":\"cluster u3\"", 1);
    assert_eq!(modified[i].len(), lines[i].len());
    assert_ne!(modified[i], lines[i]);
    assert_finding(&work, "modified.log", &modified, &pubkey, "modification", seq(i));

    // A record deleted: the `completed` record of cluster t4.
    let j = recs
        .iter()
        .position(|r| r["stage"] == "completed" && r["target"] == "cluster t4")
        .unwrap();
    let mut deleted = lines.clone();
    deleted.remove(j);
    assert_finding(&work, "deleted.log", &deleted, &pubkey, "deletion", seq(j));

    // Two neighbouring records swapped.
    let k = (2..recs.len() - 2)
        .find(|&k| !is_checkpoint(k) && !is_checkpoint(k + 1))
        .unwrap();
    let mut swapped = lines.clone();
    swapped.swap(k, k + 1);
    assert_finding(&work, "swapped.log", &swapped, &pubkey, "reordering", seq(k));

    // The tail cut right after a checkpoint: a chain valid as far as it goes, that does not end
    // with a close checkpoint.
    let c = (0..recs.len() - 1)
        .find(|&c| recs[c]["checkpoint"]["kind"] == "count")
        .unwrap();
    assert_finding(&work, "truncated.log", &lines[..=c], &pubkey, "truncation", seq(c));

    // The close checkpoint re-signed with another key (a forger's): nothing follows it, so the
    // chain is intact and only the signature gives it away.
    let forger = keys.path().join("forger.key");
    keygen(&forger);
    let forger_key = rampart_audit::keys::load_signing_key(&forger).unwrap();
    let close: rampart_audit::AuditRecord = serde_json::from_str(lines.last().unwrap()).unwrap();
    let checkpoint = close.checkpoint.as_ref().unwrap();
    let message =
        rampart_audit::record::checkpoint_message(&close.log_id, close.seq, &close.prev, checkpoint.kind, &close.time);
    use ed25519_dalek::Signer;
    let forged_sig = to_hex(&forger_key.sign(&message).to_bytes());
    let forged_pub = to_hex(&forger_key.verifying_key().to_bytes());
    let mut resigned = lines.clone();
    let end = resigned.last_mut().unwrap();
    *end = end
        .replace(checkpoint.sig.as_deref().unwrap(), &forged_sig)
        .replace(checkpoint.pubkey.as_deref().unwrap(), &forged_pub);
    assert_finding(&work, "resigned.log", &resigned, &pubkey, "bad_signature", close.seq);
    // The forgery is self-consistent: it verifies with the forger's key.
    let (code, report) = verify(&work.path().join("resigned.log"), &keys.path().join("forger.key.pub"));
    assert_eq!(report["problems"].as_array().unwrap().len(), counts, "{report:#}");
    assert_eq!(code, 1);

    // The untouched log checked against the wrong public key: every checkpoint is refused.
    let (code, report) = verify(&log, &keys.path().join("forger.key.pub"));
    assert_eq!(code, 1, "{report:#}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), counts + 1, "{report:#}");
    assert!(problems.iter().all(|p| p["class"] == "bad_signature"), "{report:#}");
}

// ---------------------------------------------------------------------------------------------
// Fail-closed

/// A tmpfs mounted for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn a_change_is_refused_when_the_audit_log_cannot_be_written() {
    const TEST: &str = "audit_fail_closed";
    if !require_root(TEST) || !require_tool(TEST, "mount") || !require_tool(TEST, "dd") {
        return;
    }
    let mount_dir = TempDir::new("audit-full");
    let Some(_tmpfs) = Tmpfs::mount(mount_dir.path(), "64k") else {
        skip(TEST, "cannot mount a tmpfs here");
        return;
    };
    let log = mount_dir.path().join("audit.log");
    let backend = EchoBackend::start();
    let port = free_port();
    // Declared after the mount: dropped (killed) first, so that the tmpfs can be unmounted.
    let r = Rampart::start(
        "audit-full",
        &format!(
            "command_socket = \"{{dir}}/rampart.sock\"\nstate_dir = \"{{dir}}/state\"\naudit_log = \"{}\"\nworker_count = 1\n\
             [sandbox]\nbackend_ports = [{}]\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n",
            log.display(),
            backend.port
        ),
    );
    r.ctl(&["cluster", "add", "before"]);
    let before = state_hash(&r);

    let dd = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", mount_dir.path().join("fill").display()))
        .arg("bs=1k")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let dd_err = String::from_utf8_lossy(&dd.stderr);
    assert!(!dd.status.success() && dd_err.contains("No space left"), "{dd_err}");

    // tmpfs allocates by page, so the log's last page may still take a few records. Use it up
    // with refused requests (audited, but changing nothing) until a write fails.
    let mut failed = false;
    for n in 0..20 {
        let size = std::fs::metadata(&log).unwrap().len();
        let err = r.try_ctl(&["state", "save", &format!("../pad-{n}")]).unwrap_err();
        assert!(err.contains("permission denied"), "{err}");
        let bytes = std::fs::read(&log).unwrap();
        if bytes.len() as u64 == size || !bytes.ends_with(b"\n") {
            failed = true;
            break;
        }
    }
    assert!(failed, "the audit log kept growing on a full tmpfs");

    let err = r.try_ctl(&["cluster", "add", "x"]).unwrap_err();
    assert!(err.contains("audit log"), "{err}");
    assert!(err.contains(&log.display().to_string()), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(cluster_ids(&r), vec!["before".to_string()]);
    assert_eq!(state_hash(&r), before);
    assert!(r.log_text().contains("audit log write failed"), "{}", r.log_text());

    // Nor does anything reach the workers: a frontend refused this way routes nothing.
    let address = format!("127.0.0.1:{port}");
    let backend_address = format!("127.0.0.1:{}", backend.port);
    assert!(
        r.try_ctl(&["backend", "add", "--cluster", "before", "--address", &backend_address])
            .is_err()
    );
    assert!(
        r.try_ctl(&[
            "frontend",
            "http",
            "add",
            "--address",
            &address,
            "--hostname",
            "x.example.com",
            "--cluster",
            "before",
        ])
        .is_err()
    );
    let answer = http_get(port, "x.example.com");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(!std::fs::read_to_string(&log).unwrap_or_default().contains("cluster x"));

    // Every request that does something other than change the state fails closed too: a saved
    // state (it writes every private key), the logging level, a policy reload, a stop.
    for args in [
        &["state", "save", "unrecorded.jsonl"][..],
        &["logging", "debug"][..],
        &["reload-policy"][..],
        &["shutdown"][..],
    ] {
        let err = r.try_ctl(args).expect_err("done without its audit record");
        assert!(
            err.contains("the audit log cannot be written") && err.contains("nothing was done"),
            "{args:?}: {err}"
        );
    }
    assert!(
        !r.dir.path().join("state/unrecorded.jsonl").exists(),
        "the state was saved unrecorded"
    );
    // Still running: the stop was refused.
    assert_eq!(state_hash(&r), before);
}

// ---------------------------------------------------------------------------------------------
// Syslog mirror

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// An rsyslogd of our own, listening on `<dir>/log.sock` and writing every message, raw, to
/// `<dir>/messages`.
struct Rsyslogd {
    child: std::process::Child,
    dir: PathBuf,
}

impl Rsyslogd {
    fn config(dir: &Path) -> PathBuf {
        let d = dir.display();
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{d}\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
                 input(type=\"imuxsock\" Socket=\"{d}/log.sock\" CreatePath=\"on\" RateLimit.Interval=\"0\")\n\
                 *.* action(type=\"omfile\" file=\"{d}/messages\" template=\"raw\")\n"
            ),
        )
        .unwrap();
        let check = Command::new(RSYSLOGD).arg("-N1").arg("-f").arg(&conf).output().unwrap();
        assert!(
            check.status.success(),
            "rsyslogd -N1 rejects its configuration: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        conf
    }

    fn start(dir: &Path) -> Rsyslogd {
        let conf = dir.join("rsyslog.conf");
        let socket = dir.join("log.sock");
        let _ = std::fs::remove_file(&socket);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("rsyslogd.out"))
            .unwrap();
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Rsyslogd {
            child,
            dir: dir.to_path_buf(),
        }
    }

    /// SIGTERM, then wait: rsyslogd writes what it received and removes its socket.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "rsyslogd did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The seqs of log `log_id` in the messages received so far.
    fn seqs(&self, log_id: &str) -> BTreeSet<u64> {
        let text = std::fs::read_to_string(self.dir.join("messages")).unwrap_or_default();
        let log = format!(" log=\"{log_id}\"");
        text.lines()
            .filter(|l| l.contains(&log))
            .filter_map(|l| {
                let rest = &l[l.find(" seq=\"")? + 6..];
                rest[..rest.find('"')?].parse().ok()
            })
            .collect()
    }
}

impl Drop for Rsyslogd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Log id and seqs of the records in an audit file.
fn file_seqs(log: &Path) -> (String, BTreeSet<u64>) {
    let recs = records(log);
    let id = recs[0]["log_id"].as_str().unwrap().to_string();
    (id, recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect())
}

/// Waits until every record of the audit file appears in the daemon's messages; returns the
/// seqs still missing after 5 s (empty when all arrived).
fn wait_mirrored(syslog: &Rsyslogd, log: &Path) -> BTreeSet<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (id, want) = file_seqs(log);
        let got = syslog.seqs(&id);
        let missing: BTreeSet<u64> = want.difference(&got).copied().collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_record_reaches_syslog_even_across_a_daemon_restart() {
    const TEST: &str = "audit_syslog";
    // Not as such a root matter, but a supervisor started by another uid cannot read its
    // workers' /proc/<pid>/fd to check their jail, and kills them.
    if !require_root(TEST) {
        return;
    }
    if !Path::new(RSYSLOGD).exists() {
        skip(
            TEST,
            "rsyslogd is not installed (scripts/install-deps installs the rsyslog package)",
        );
        return;
    }
    let dir = TempDir::new("audit-rsyslog");
    Rsyslogd::config(dir.path());
    let syslog = Rsyslogd::start(dir.path());
    let r = Rampart::start(
        "audit-syslog",
        &config(&format!(
            "[audit]\nsyslog_socket = \"{}\"\n",
            dir.path().join("log.sock").display()
        )),
    );
    let log = audit_log(&r);
    r.ctl(&["cluster", "add", "a1"]);
    r.ctl(&["cluster", "add", "a2"]);
    let missing = wait_mirrored(&syslog, &log);
    assert!(missing.is_empty(), "not mirrored: {missing:?}");

    // The daemon goes away; requests go on (the audit file is the authoritative copy).
    syslog.stop();
    let (_, up_to) = file_seqs(&log);
    let last_before = *up_to.last().unwrap();
    for id in ["b1", "b2", "b3"] {
        r.ctl(&["cluster", "add", id]);
    }
    let (id, while_down) = file_seqs(&log);
    let written_while_down: Vec<u64> = while_down.iter().copied().filter(|s| *s > last_before).collect();
    assert_eq!(written_while_down.len(), 6, "received and completed for 3 requests");

    // It comes back; the next records carry the queue with them.
    let syslog = Rsyslogd::start(dir.path());
    r.ctl(&["cluster", "add", "c1"]);
    r.ctl(&["cluster", "add", "c2"]);
    let missing = wait_mirrored(&syslog, &log);
    assert!(
        missing.is_empty(),
        "lost after the daemon came back: {missing:?} (written while it was down: {written_while_down:?})"
    );
    let got = syslog.seqs(&id);
    assert!(written_while_down.iter().all(|s| got.contains(s)));
    let text = std::fs::read_to_string(dir.path().join("messages")).unwrap();
    assert!(text.contains("rampart@32473"), "{text}");
    assert!(text.contains("target=\"cluster b2\""), "{text}");
}

/// Only an admin can reload the access policy; the reload is audited and takes effect at once.
#[test]
fn only_an_admin_reloads_the_policy_and_the_reload_is_audited() {
    if !can_switch_uid("only_an_admin_reloads_the_policy") {
        return;
    }
    let dir = TempDir::new("policy-reload");
    let policy = policy_file(&dir, "role = \"viewer\"\n");
    let r = Rampart::start(
        "policy-reload",
        &config(&format!("access_policy = \"{}\"\n", policy.display())),
    );
    open_socket_dir(&r);
    // nobody is a viewer: it may not change anything, nor reload the policy.
    assert!(
        as_nobody(&r, &["cluster", "add", "before"])
            .unwrap_err()
            .contains("permission denied")
    );
    assert!(
        as_nobody(&r, &["reload-policy"])
            .unwrap_err()
            .contains("permission denied")
    );
    // The file now makes nobody an admin; root reloads it.
    std::fs::write(
        &policy,
        format!("[[grant]]\nuid = 0\nrole = \"admin\"\n\n[[grant]]\nuid = {NOBODY}\nrole = \"admin\"\n"),
    )
    .unwrap();
    let out = Command::new(rampart_bin())
        .arg("-s")
        .arg(&r.socket)
        .arg("reload-policy")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    as_nobody(&r, &["cluster", "add", "after"]).unwrap();
    // Recorded with who asked, like every change: received, then completed.
    let reloads: Vec<serde_json::Value> = records(&audit_log(&r))
        .into_iter()
        .filter(|v| v["action"] == "reload_policy" && v["stage"] == "completed")
        .collect();
    assert_eq!(reloads.len(), 1);
    assert_eq!(reloads[0]["outcome"]["status"], "ok");
    assert_eq!(reloads[0]["actor"]["uid"], 0);
    // A broken file leaves the running policy in place.
    std::fs::write(&policy, "[[grant]]\nuid = \"zero\"\n").unwrap();
    let out = Command::new(rampart_bin())
        .arg("-s")
        .arg(&r.socket)
        .arg("reload-policy")
        .output()
        .unwrap();
    assert!(!out.status.success());
    as_nobody(&r, &["cluster", "remove", "after"]).unwrap();
}

/// SIGUSR2 rotates the audit log; the chain continues in the new file and both verify.
#[test]
fn rotation_keeps_the_chain_across_files() {
    if !require_root("rotation_keeps_the_chain_across_files") {
        return;
    }
    let dir = TempDir::new("rotation");
    let key = dir.path().join("audit.key");
    keygen(&key);
    let mut r = Rampart::start(
        "rotation",
        &config(&format!(
            "[audit]\nsigning_key = \"{}\"\ncheckpoint_every = 3\n",
            key.display()
        )),
    );
    r.ctl(&["cluster", "add", "one"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.child.id() as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let rotated = PathBuf::from(format!("{}.1", audit_log(&r).display()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !rotated.exists() {
        assert!(Instant::now() < deadline, "no rotated file:\n{}", r.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    r.ctl(&["cluster", "add", "two"]);
    stop(&mut r);
    let pubkey = dir.path().join("audit.key.pub");
    let out = Command::new(rampart_bin())
        .args(["audit", "verify"])
        .arg(&rotated)
        .arg(audit_log(&r))
        .arg("--pubkey")
        .arg(&pubkey)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// A full disk, and the torn line a crash leaves

/// Fills the filesystem of `path` with one file of zeros until it is full.
fn fill_up(path: &Path) {
    let dd = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .arg("bs=1k")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let dd_err = String::from_utf8_lossy(&dd.stderr);
    assert!(!dd.status.success() && dd_err.contains("No space left"), "{dd_err}");
}

/// The log's bytes, read again while they end inside a line: a write the supervisor is
/// attempting (and will cut back if it fails) can be seen half done for an instant.
fn settled_bytes(log: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(log).unwrap();
    for _ in 0..10 {
        if bytes.ends_with(b"\n") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        bytes = std::fs::read(log).unwrap();
    }
    bytes
}

/// `rampart audit verify FILES... --json [--live]`: exit code and report.
fn verify_files(files: &[&Path], live: bool) -> (i32, Value) {
    let out = Command::new(rampart_bin())
        .args(["audit", "verify", "--json"])
        .args(files)
        .args(live.then_some("--live"))
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

#[test]
fn a_full_disk_fails_closed_then_recovers_and_a_torn_line_is_repaired_at_start() {
    const TEST: &str = "audit_full_disk";
    if !require_root(TEST) || !require_tool(TEST, "mount") || !require_tool(TEST, "dd") {
        return;
    }
    let mount_dir = TempDir::new("audit-disk");
    let Some(_tmpfs) = Tmpfs::mount(mount_dir.path(), "256k") else {
        skip(TEST, "cannot mount a tmpfs here");
        return;
    };
    let log = mount_dir.path().join("audit.log");
    let filler = mount_dir.path().join("filler");
    // Declared after the mount: dropped (killed) first, so that the tmpfs can be unmounted.
    let mut r = Rampart::start(
        "audit-disk",
        &format!(
            "command_socket = \"{{dir}}/rampart.sock\"\nstate_dir = \"{{dir}}/state\"\naudit_log = \"{}\"\nworker_count = 1\n",
            log.display()
        ),
    );
    r.ctl(&["cluster", "add", "before"]);
    let before = state_hash(&r);

    // Full: the filler takes what is left. A rotation now fails before it writes anything:
    // its new file cannot get room, and the current file gets no rotation checkpoint.
    fill_up(&filler);
    let supervisor = nix::unistd::Pid::from_raw(r.child.id() as i32);
    let rotate_and_fail = |r: &Rampart, n: usize| {
        nix::sys::signal::kill(supervisor, nix::sys::signal::Signal::SIGUSR2).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.log_text().matches("ERROR audit log rotation failed").count() < n {
            assert!(Instant::now() < deadline, "no failed rotation:\n{}", r.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!mount_dir.path().join("audit.log.1").exists());
        assert!(!mount_dir.path().join("audit.log.rotating").exists());
    };
    rotate_and_fail(&r, 1);
    let text = r.log_text();
    assert!(
        text.contains("cannot rotate audit log") && text.contains("No space left on device"),
        "{text}"
    );
    let recs = records(&log);
    assert!(recs.iter().all(|x| x["checkpoint"]["kind"] != "rotation"), "{recs:#?}");

    // Refused requests (audited, changing nothing) use up the log's last page until a record
    // no longer fits.
    let mut failed = false;
    for n in 0..40 {
        let size = settled_bytes(&log).len();
        let err = r.try_ctl(&["state", "save", &format!("../pad-{n}")]).unwrap_err();
        assert!(err.contains("permission denied"), "{err}");
        if settled_bytes(&log).len() == size {
            failed = true;
            break;
        }
    }
    assert!(failed, "the audit log kept growing on a full tmpfs");
    let full = settled_bytes(&log);

    // A change is refused, says why and what to do, and changes nothing.
    let err = r.try_ctl(&["cluster", "add", "refused"]).unwrap_err();
    for part in [
        log.display().to_string().as_str(),
        "No space left on device",
        "nothing was changed",
        "free space",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    assert_eq!(cluster_ids(&r), ["before"]);
    assert_eq!(state_hash(&r), before);

    // So does a rotation now (it cannot even record the failures first).
    rotate_and_fail(&r, 2);

    // The file is as it was when the disk filled up: whole records only, and it verifies.
    assert_eq!(settled_bytes(&log), full);
    assert!(full.ends_with(b"\n"));
    assert!(!String::from_utf8_lossy(&full).contains("cluster refused"));
    let records_full = records(&log);
    let (code, report) = verify_files(&[&log], true);
    assert_eq!((code, &report["valid"]), (0, &Value::Bool(true)), "{report:#}");

    // Space again: the next change works, and the trail says what it missed.
    std::fs::remove_file(&filler).unwrap();
    r.ctl(&["cluster", "add", "after"]);
    assert_eq!(cluster_ids(&r), ["after", "before"]);
    let recs = records(&log);
    assert_eq!(recs[..records_full.len()], records_full[..]);
    let failure = recs
        .iter()
        .position(|x| x["action"] == "audit_write_failed")
        .unwrap_or_else(|| panic!("no audit_write_failed record: {recs:#?}"));
    let after = recs
        .iter()
        .position(|x| x["stage"] == "received" && x["target"] == "cluster after")
        .unwrap();
    assert!(failure >= records_full.len() && failure < after, "{recs:#?}");
    let message = recs[failure]["outcome"]["message"].as_str().unwrap();
    for part in [
        "No space left on device",
        "received add_cluster x1",
        "denied save_state",
        "system signal_sigusr2 x1",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert_eq!(recs[failure]["outcome"]["status"], "error");

    // Half a line at the end, then a crash: the next start cuts it aside and says so.
    let mut bytes = std::fs::read(&log).unwrap();
    let clean_len = bytes.len();
    let last = bytes[..clean_len - 1].rsplit(|&b| b == b'\n').next().unwrap().to_vec();
    let half = &last[..last.len() / 2];
    bytes.extend_from_slice(half);
    std::fs::write(&log, &bytes).unwrap();
    let (code, report) = verify_files(&[&log], false);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["class"] == "torn_tail"
                && p["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("last {} byte(s), from offset {clean_len}", half.len()))),
        "{report:#}"
    );
    r.kill_and_restart();
    let recs = records(&log);
    let repair = recs
        .iter()
        .find(|x| x["action"] == "audit_repaired")
        .unwrap_or_else(|| panic!("no audit_repaired record: {recs:#?}"));
    let torn = &repair["torn_tail"];
    assert_eq!(torn["offset"], clean_len as u64, "{repair:#}");
    assert_eq!(torn["length"], half.len() as u64, "{repair:#}");
    let half_text = std::str::from_utf8(half).unwrap();
    let digest = rampart_audit::record::secret_fingerprint(half_text);
    assert_eq!(Some(torn["sha256"].as_str().unwrap()), digest.strip_prefix("sha256:"));
    let side = mount_dir.path().join(torn["file"].as_str().unwrap());
    assert_eq!(std::fs::read(&side).unwrap(), half);
    let next = recs.iter().position(|x| x["action"] == "audit_repaired").unwrap() + 1;
    assert_eq!(recs[next]["action"], "audit_opened");
    assert_eq!(recs[next]["outcome"]["code"], "unclean");
    assert_eq!(std::fs::read(&log).unwrap()[..clean_len], bytes[..clean_len]);

    // It runs, and once stopped its log verifies: with the side file among the files too.
    r.ctl(&["cluster", "add", "restarted"]);
    stop(&mut r);
    for files in [vec![log.as_path()], vec![log.as_path(), side.as_path()]] {
        let (code, report) = verify_files(&files, false);
        assert_eq!(code, 0, "{report:#}");
        assert!(
            report["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["message"].as_str().unwrap().contains("cut a torn write")),
            "{report:#}"
        );
    }
}
