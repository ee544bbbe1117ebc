//! HTTPS termination in jailed workers, with real clients: curl and openssl s_client.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rampart_tests::{EchoBackend, Rampart, TempDir, config_head, free_port, require_tool};

/// A self-signed P-256 certificate for `name`, written as `<stem>.crt` / `<stem>.key`.
fn certificate(dir: &Path, stem: &str, name: &str) {
    let out = Command::new("openssl")
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
        .arg(dir.join(format!("{stem}.key")))
        .arg("-out")
        .arg(dir.join(format!("{stem}.crt")))
        .args([
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            &format!("subjectAltName=DNS:{name}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The subject CN of the certificate served for `servername` (None: no SNI).
fn served_cn(port: u16, servername: Option<&str>) -> String {
    let mut args = vec!["s_client".to_string(), "-connect".into(), format!("127.0.0.1:{port}")];
    match servername {
        Some(n) => args.extend(["-servername".into(), n.to_string()]),
        None => args.push("-noservername".into()),
    }
    let out = Command::new("openssl")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("subject=").map(str::to_string))
        .unwrap_or_else(|| format!("no certificate: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn sni_alpn_versions_and_forwarded_proto() {
    if !require_tool("https", "openssl") || !require_tool("https", "curl") {
        return;
    }
    let certs = TempDir::new("https-certs");
    certificate(certs.path(), "default", "0-default.test");
    certificate(certs.path(), "a", "a.test");
    certificate(certs.path(), "wild", "*.wild.test");
    let echo = EchoBackend::start();
    let port = free_port();
    let c = |stem: &str, ext: &str| certs.path().join(format!("{stem}.{ext}")).display().to_string();
    let frontend = |host: &str, stem: &str| {
        format!(
            "{{ address = \"127.0.0.1:{port}\", hostname = \"{host}\", certificate = \"{}\", key = \"{}\" }}",
            c(stem, "crt"),
            c(stem, "key")
        )
    };
    // Key isolation is on (the default): the keyring signs every handshake.
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {default}, {a}, {wild} ]
"#,
        head = config_head(Path::new("{dir}"), 2),
        e = echo.port,
        default = frontend("0-default.test", "default"),
        a = frontend("a.test", "a"),
        wild = frontend("*.wild.test", "wild"),
    );
    let r = Rampart::start("https", &config);

    // Each name gets its certificate; an unknown name and no SNI get the default one.
    assert!(
        served_cn(port, Some("a.test")).contains("CN = a.test"),
        "{}",
        served_cn(port, Some("a.test"))
    );
    assert!(served_cn(port, Some("x.wild.test")).contains("CN = *.wild.test"));
    assert!(served_cn(port, Some("unknown.test")).contains("CN = 0-default.test"));
    assert!(served_cn(port, None).contains("CN = 0-default.test"));

    // A request over TLS: ALPN http/1.1, and the backend learns it came over https.
    let out = Command::new("curl")
        .args([
            "-sk",
            "-v",
            "--max-time",
            "10",
            "--resolve",
            &format!("a.test:{port}:127.0.0.1"),
        ])
        .arg(format!("https://a.test:{port}/hello"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{verbose}");
    assert!(verbose.contains("ALPN: server accepted http/1.1"), "{verbose}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert_eq!(seen["path"], "/hello");

    // TLS 1.1 and older are refused.
    let out = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "10",
            "--tlsv1.1",
            "--tls-max",
            "1.1",
            "--resolve",
            &format!("a.test:{port}:127.0.0.1"),
        ])
        .arg(format!("https://a.test:{port}/"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "TLS 1.1 was accepted");

    // A certificate added at runtime is served at once (its key goes to the keyring only).
    certificate(certs.path(), "b", "b.test");
    r.ctl(&[
        "certificate",
        "add",
        "--address",
        &format!("127.0.0.1:{port}"),
        "--certificate",
        &c("b", "crt"),
        "--key",
        &c("b", "key"),
        "--name",
        "b.test",
    ]);
    assert!(served_cn(port, Some("b.test")).contains("CN = b.test"));
    // The list names each certificate with its fingerprint and expiry (2 days from now).
    let list: serde_json::Value = serde_json::from_str(&r.ctl(&["certificate", "list", "--json"])).unwrap();
    let certs = list["content"]["certificates"]["certificates"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(certs.len(), 4, "{list}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for c in &certs {
        let expiry = c["not_after"].as_i64().unwrap();
        assert!((now + 86_400..now + 3 * 86_400).contains(&expiry), "{c}");
        assert_eq!(c["fingerprint"].as_str().unwrap().len(), 64);
    }
}

#[test]
fn a_listener_can_require_tls_1_3() {
    if !require_tool("tls 1.3", "openssl") || !require_tool("tls 1.3", "curl") {
        return;
    }
    let certs = TempDir::new("https-13");
    certificate(certs.path(), "a", "a.test");
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        r#"{head}key_isolation = false

[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"
tls_min_version = "1.3"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "a.test", certificate = "{crt}", key = "{key}" }} ]
"#,
        head = config_head(Path::new("{dir}"), 1),
        e = echo.port,
        crt = certs.path().join("a.crt").display(),
        key = certs.path().join("a.key").display(),
    );
    let _r = Rampart::start("https-13", &config);
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"])
            .args(extra)
            .args(["--resolve", &format!("a.test:{port}:127.0.0.1")])
            .arg(format!("https://a.test:{port}/"))
            .output()
            .unwrap()
    };
    let ok = curl(&[]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "200");
    let refused = curl(&["--tls-max", "1.2"]);
    assert!(!refused.status.success(), "TLS 1.2 accepted by a 1.3-only listener");
}

/// A session ticket issued by one worker resumes on the others: the supervisor gives every
/// worker the same ticket key.
#[test]
fn sessions_resume_on_any_worker() {
    if !require_tool("resumption", "openssl") {
        return;
    }
    let certs = TempDir::new("https-resume");
    certificate(certs.path(), "a", "a.test");
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        r#"{head}key_isolation = false

[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "a.test", certificate = "{crt}", key = "{key}" }} ]
"#,
        head = config_head(Path::new("{dir}"), 2),
        e = echo.port,
        crt = certs.path().join("a.crt").display(),
        key = certs.path().join("a.key").display(),
    );
    let _r = Rampart::start("https-resume", &config);
    let session = certs.path().join("session.pem");
    let s_client = |extra: &[&str]| {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "a.test",
                "-tls1_2",
            ])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = s_client(&["-sess_out", session.to_str().unwrap()]);
    assert!(first.contains("New, TLSv1.2"), "{first}");
    // Connections land on either worker (SO_REUSEPORT hashes the client port): each resumes.
    for attempt in 0..10 {
        let again = s_client(&["-sess_in", session.to_str().unwrap()]);
        assert!(
            again.contains("Reused, TLSv1.2"),
            "attempt {attempt} did not resume:\n{again}"
        );
    }
}

/// The private key scalar of a PEM EC key, from `openssl pkey -text`.
fn private_scalar(key: &Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["pkey", "-noout", "-text", "-in"])
        .arg(key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut hex = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("priv:") {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("    ") {
                break;
            }
            hex.push_str(&line.trim().replace(':', ""));
        }
    }
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    // openssl may print a leading zero byte.
    let bytes = if bytes.len() == 33 && bytes[0] == 0 {
        bytes[1..].to_vec()
    } else {
        bytes
    };
    assert_eq!(bytes.len(), 32, "{text}");
    bytes
}

/// Whether the key scalar appears anywhere in the readable memory of `pid` (root only), in
/// big-endian (DER) or little-endian (BoringSSL's BIGNUM words) order.
fn memory_contains(pid: i32, scalar: &[u8]) -> bool {
    let reversed: Vec<u8> = scalar.iter().rev().copied().collect();
    memory_contains_bytes(pid, scalar) || memory_contains_bytes(pid, &reversed)
}

fn memory_contains_bytes(pid: i32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

/// The status code of `GET https://<name>:<port>/`, certificate unchecked ("000": no answer).
fn https_code(port: u16, name: &str) -> String {
    Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap()
}

/// Under key isolation the private key is in the keyring's memory and in no worker's, and
/// handshakes keep working when the keyring is killed and respawned.
#[test]
fn private_keys_never_enter_a_worker() {
    if !rampart_tests::require_root("private_keys_never_enter_a_worker") || !require_tool("keys", "openssl") {
        return;
    }
    let certs = TempDir::new("https-keys");
    certificate(certs.path(), "a", "a.test");
    let scalar = private_scalar(&certs.path().join("a.key"));
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "a.test", certificate = "{crt}", key = "{key}" }} ]
"#,
        head = config_head(Path::new("{dir}"), 2),
        e = echo.port,
        crt = certs.path().join("a.crt").display(),
        key = certs.path().join("a.key").display(),
    );
    let r = Rampart::start("https-keys", &config);
    let get = || https_code(port, "a.test");
    for _ in 0..4 {
        assert_eq!(get(), "200");
    }
    let keyring = r.running_pids("keyring");
    assert_eq!(keyring.len(), 1);
    assert!(
        memory_contains(keyring[0], &scalar),
        "the search must find the key where it is"
    );
    // The keyring's pages are locked (kept out of swap), and it is jailed like a worker.
    let status = std::fs::read_to_string(format!("/proc/{}/status", keyring[0])).unwrap();
    let locked: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    assert!(locked > 0, "the keyring's memory is not locked:\n{status}");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let expect = rampart_sandbox::inspect::Expectation {
        uid: Some(nobody.uid.as_raw()),
        gid: None,
        max_fds: None,
        allow_bounding: false,
        skip_private: false,
    };
    rampart_sandbox::inspect::verify_jailed(keyring[0], &expect).unwrap_or_else(|v| panic!("keyring: {v:?}"));
    let workers = r.running_pids("worker");
    assert_eq!(workers.len(), 2);
    for pid in workers {
        assert!(
            !memory_contains(pid, &scalar),
            "the private key is in worker {pid}'s memory"
        );
    }
    // The keyring dies: a new one replaces it and handshakes work again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keyring[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now_keyring = r.running_pids("keyring");
        if now_keyring.len() == 1 && now_keyring[0] != keyring[0] && get() == "200" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no working keyring after 5 s:\n{}",
            r.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for _ in 0..4 {
        assert_eq!(get(), "200");
    }
}

/// The base64 lines of a PEM key file's body: any copy of the PEM text contains each of them.
fn pem_body_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "{text}");
    lines
}

/// What of a key a process's memory holds: its scalar, or a line of its PEM text.
fn key_traces(pid: i32, scalar: &[u8], pem_lines: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    if memory_contains(pid, scalar) {
        found.push("the private scalar".to_string());
    }
    for line in pem_lines {
        if memory_contains_bytes(pid, line.as_bytes()) {
            found.push(format!("PEM line {line}"));
        }
    }
    found
}

/// Under key isolation the supervisor keeps no private key in its memory: not the key from a
/// file named in the configuration, not one sent over the command socket, not after a state was
/// saved (with the keys, mode 0600) and loaded again. A keyring respawned after that gets every key
/// back, including the one added at runtime, and forgets a key whose certificate is removed.
#[test]
fn the_supervisor_zeroizes_its_copy_of_every_key() {
    if !rampart_tests::require_root("the_supervisor_zeroizes_its_copy_of_every_key") || !require_tool("keys", "openssl")
    {
        return;
    }
    let certs = TempDir::new("https-zeroize");
    certificate(certs.path(), "a", "a.test");
    certificate(certs.path(), "b", "b.test");
    let path = |stem: &str, ext: &str| certs.path().join(format!("{stem}.{ext}")).display().to_string();
    let keys: Vec<(&str, Vec<u8>, Vec<String>)> = ["a", "b"]
        .iter()
        .map(|k| {
            let key = certs.path().join(format!("{k}.key"));
            (*k, private_scalar(&key), pem_body_lines(&key))
        })
        .collect();
    let echo = EchoBackend::start();
    let port = free_port();
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "a.test", certificate = "{crt}", key = "{key}" }} ]
"#,
        head = config_head(Path::new("{dir}"), 1),
        e = echo.port,
        crt = path("a", "crt"),
        key = path("a", "key"),
    );
    let r = Rampart::start("https-zeroize", &config);
    let get = |name: &str| https_code(port, name);
    let add_b = || {
        r.ctl(&[
            "certificate",
            "add",
            "--address",
            &format!("127.0.0.1:{port}"),
            "--certificate",
            &path("b", "crt"),
            "--key",
            &path("b", "key"),
            "--name",
            "b.test",
        ])
    };
    r.ctl(&[
        "frontend",
        "https",
        "add",
        "--address",
        &format!("127.0.0.1:{port}"),
        "--hostname",
        "b.test",
        "--cluster",
        "site",
    ]);
    add_b();
    assert_eq!(get("a.test"), "200");
    assert_eq!(get("b.test"), "200");
    let supervisor = r.child.id() as i32;
    let no_key_in_supervisor = |when: &str| {
        // The search works on this process: the certificates themselves are in its state.
        let cert_lines = pem_body_lines(&certs.path().join("b.crt"));
        assert!(
            memory_contains_bytes(supervisor, cert_lines[1].as_bytes()),
            "{when}: the search does not find the certificate the supervisor holds"
        );
        for (name, scalar, lines) in &keys {
            let found = key_traces(supervisor, scalar, lines);
            assert!(
                found.is_empty(),
                "{when}: key {name} is in the supervisor's memory: {found:?}"
            );
        }
    };
    no_key_in_supervisor("after start and a certificate added over the socket");
    // A certificate whose key the supervisor does not hold cannot come without one (the keyring
    // could never sign for it).
    certificate(certs.path(), "c", "c.test");
    let keyless = {
        use rampart_command::proto;
        let request = proto::Request {
            id: "keyless".into(),
            kind: Some(proto::request::Kind::AddCertificate(proto::Certificate {
                address: format!("127.0.0.1:{port}"),
                certificate: std::fs::read_to_string(path("c", "crt")).unwrap(),
                chain: vec![],
                key: String::new(),
                names: vec!["c.test".into()],
            })),
        };
        let mut stream = std::os::unix::net::UnixStream::connect(&r.socket).unwrap();
        std::io::Write::write_all(&mut stream, &rampart_command::framing::encode_frame(&request)).unwrap();
        rampart_command::framing::FrameReader::default()
            .read_message::<proto::Response, _>(&mut stream)
            .unwrap()
            .unwrap()
    };
    assert_eq!(keyless.status, rampart_command::proto::ResponseStatus::Failure as i32);
    assert!(
        keyless.message.contains("without its private key"),
        "{}",
        keyless.message
    );
    assert!(
        r.log_text().contains("none in the supervisor's memory"),
        "{}",
        r.log_text()
    );

    // A saved state restores the keys: it holds them, so only its owner may read it.
    r.ctl(&["state", "save", "keys.jsonl"]);
    let saved = r.dir.path().join("state/keys.jsonl");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&saved).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "a saved state with private keys is private");
    let saved_text = std::fs::read_to_string(&saved).unwrap();
    assert!(keys.iter().all(|(_, _, lines)| saved_text.contains(&lines[0])));
    // b goes, the saved state brings it back (its key from the file).
    let fingerprint = {
        let list: serde_json::Value = serde_json::from_str(&r.ctl(&["certificate", "list", "--json"])).unwrap();
        list["content"]["certificates"]["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["names"].to_string().contains("b.test"))
            .map(|c| c["fingerprint"].as_str().unwrap().to_string())
            .unwrap()
    };
    let keyring = r.running_pids("keyring");
    assert_eq!(keyring.len(), 1);
    assert!(memory_contains(keyring[0], &keys[1].1), "the keyring holds b's key");
    r.ctl(&[
        "certificate",
        "remove",
        "--address",
        &format!("127.0.0.1:{port}"),
        "--fingerprint",
        &fingerprint,
    ]);
    assert!(
        !served_cn(port, Some("b.test")).contains("CN = b.test"),
        "b's certificate is gone"
    );
    assert!(
        !memory_contains(keyring[0], &keys[1].1),
        "the keyring forgot the key of a removed certificate"
    );
    r.ctl(&["state", "load", "keys.jsonl"]);
    assert!(
        served_cn(port, Some("b.test")).contains("CN = b.test"),
        "the saved state brought b back"
    );
    assert_eq!(get("b.test"), "200");
    no_key_in_supervisor("after state save and load");

    // A new keyring gets every key back from the supervisor, b's included.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keyring[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = r.running_pids("keyring");
        if now.len() == 1 && now[0] != keyring[0] && get("a.test") == "200" && get("b.test") == "200" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the respawned keyring does not serve both keys:\n{}",
            r.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(served_cn(port, Some("b.test")).contains("CN = b.test"));
    no_key_in_supervisor("after the keyring was respawned");
}

/// Under key isolation the supervisor keeps one memory file per private key: 80 certificates
/// start and serve under a soft open-file limit of 64, which the supervisor raises.
#[test]
fn many_certificates_fit_the_descriptor_limit() {
    if !require_tool("many-certificates", "openssl") {
        return;
    }
    const COUNT: usize = 80;
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if hard < 256 {
        let why = format!("the hard open-file limit is {hard}: no room to show the raise");
        assert!(
            !rampart_tests::in_ci(),
            "many_certificates_fit_the_descriptor_limit: {why}"
        );
        eprintln!("many_certificates_fit_the_descriptor_limit: skipped: {why}");
        return;
    }
    let certs = TempDir::new("https-many");
    let echo = EchoBackend::start();
    let port = free_port();
    let mut frontends = Vec::new();
    for i in 0..COUNT {
        let name = format!("h{i}.test");
        certificate(certs.path(), &format!("h{i}"), &name);
        frontends.push(format!(
            r#"{{ address = "127.0.0.1:{port}", hostname = "{name}", certificate = "{crt}", key = "{key}" }}"#,
            crt = certs.path().join(format!("h{i}.crt")).display(),
            key = certs.path().join(format!("h{i}.key")).display(),
        ));
    }
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {} ]
"#,
        frontends.join(", "),
        head = config_head(Path::new("{dir}"), 1),
        e = echo.port,
    );
    let r = Rampart::start_with_nofile("https-many", &config, 64);
    assert!(
        r.log_text().contains("open-file limit raised from 64"),
        "{}",
        r.log_text()
    );
    for i in [0, COUNT / 2, COUNT - 1] {
        let name = format!("h{i}.test");
        assert!(
            served_cn(port, Some(&name)).contains(&format!("CN = {name}")),
            "{name} is not served:\n{}",
            r.log_text()
        );
    }
}

/// `openssl req` with any key options (for RSA sizes and other curves).
fn certificate_with(dir: &Path, stem: &str, name: &str, key_args: &[&str]) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "2"])
        .args(key_args)
        .arg("-keyout")
        .arg(dir.join(format!("{stem}.key")))
        .arg("-out")
        .arg(dir.join(format!("{stem}.crt")))
        .args([
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            &format!("subjectAltName=DNS:{name}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Keys are RSA 2048+ or ECDSA P-256/P-384 and match their certificate; an RSA key is served
/// through the keyring too; HTTP frontends can redirect to HTTPS; a certificate replaced under
/// load fails no request.
#[test]
fn key_types_redirects_and_replacement_under_load() {
    if !require_tool("key types", "openssl") || !require_tool("key types", "wrk") {
        return;
    }
    let certs = TempDir::new("https-types");
    let d = certs.path();
    certificate_with(d, "rsa", "rsa.test", &["-newkey", "rsa:2048"]);
    certificate_with(d, "weak", "weak.test", &["-newkey", "rsa:1024"]);
    certificate_with(
        d,
        "p521",
        "p521.test",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
    );
    certificate(d, "a", "a.test");
    certificate(d, "a2", "a.test");
    let echo = EchoBackend::start();
    let (port, http_port) = (free_port(), free_port());
    let file = |stem: &str, ext: &str| d.join(format!("{stem}.{ext}")).display().to_string();
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"

[[listeners]]
address = "127.0.0.1:{http_port}"

[clusters.site]
https_redirect = true
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {{ address = "127.0.0.1:{port}", hostname = "a.test", certificate = "{acrt}", key = "{akey}" }},
              {{ address = "127.0.0.1:{http_port}", hostname = "a.test" }} ]
"#,
        head = config_head(Path::new("{dir}"), 2),
        e = echo.port,
        acrt = file("a", "crt"),
        akey = file("a", "key"),
    );
    let r = Rampart::start("https-types", &config);
    let address = format!("127.0.0.1:{port}");
    let add = |stem: &str, name: &str| {
        r.try_ctl(&[
            "certificate",
            "add",
            "--address",
            &address,
            "--certificate",
            &file(stem, "crt"),
            "--key",
            &file(stem, "key"),
            "--name",
            name,
        ])
    };
    assert!(add("weak", "weak.test").unwrap_err().contains("2048 bits"));
    assert!(add("p521", "p521.test").unwrap_err().contains("P-256 or P-384"));
    let mismatched = r.try_ctl(&[
        "certificate",
        "add",
        "--address",
        &address,
        "--certificate",
        &file("rsa", "crt"),
        "--key",
        &file("a", "key"),
    ]);
    assert!(mismatched.unwrap_err().contains("does not match"));
    add("rsa", "rsa.test").unwrap();
    // An RSA handshake, signed by the keyring (RSA-PSS under TLS 1.3, PKCS#1 or PSS under 1.2).
    for version in ["--tlsv1.3", "--tls-max"] {
        let mut args = vec![
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            version,
        ];
        if version == "--tls-max" {
            args.push("1.2");
        }
        let out = Command::new("curl")
            .args(&args)
            .args(["--resolve", &format!("rsa.test:{port}:127.0.0.1")])
            .arg(format!("https://rsa.test:{port}/"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "404",
            "{version}: rsa.test has a certificate but no frontend"
        );
    }
    assert!(served_cn(port, Some("rsa.test")).contains("CN = rsa.test"));

    // HTTP → HTTPS.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Host: a.test",
        ])
        .arg(format!("http://127.0.0.1:{http_port}/some/path?q=1"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "301 https://a.test/some/path?q=1");

    // Replace a.test's certificate while wrk loads the listener.
    let wrk = Command::new("wrk")
        .args(["-t1", "-c10", "-d4s", "-H", "Host: a.test"])
        .arg(format!("https://127.0.0.1:{port}/"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let list: serde_json::Value = serde_json::from_str(&r.ctl(&["certificate", "list", "--json"])).unwrap();
    let old = list["content"]["certificates"]["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["names"][0] == "a.test")
        .unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    r.ctl(&[
        "certificate",
        "replace",
        "--address",
        &address,
        "--old-fingerprint",
        &old,
        "--certificate",
        &file("a2", "crt"),
        "--key",
        &file("a2", "key"),
    ]);
    let out = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("requests in"), "{report}");
    assert!(
        !report.contains("Non-2xx") && !report.contains("Socket errors"),
        "{report}"
    );
    let new_fp = String::from_utf8_lossy(
        &Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl s_client -connect 127.0.0.1:{port} -servername a.test </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
            ))
            .output()
            .unwrap()
            .stdout,
    )
    .to_ascii_lowercase()
    .replace(':', "");
    assert!(!new_fp.contains(&old), "the old certificate is still served");
}

/// A self-signed P-256 certificate with the subject `subj` and, when given, the extension
/// `subjectAltName=<san>`.
fn certificate_subject(dir: &Path, stem: &str, subj: &str, san: Option<&str>) {
    let mut command = Command::new("openssl");
    command
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
        .arg(dir.join(format!("{stem}.key")))
        .arg("-out")
        .arg(dir.join(format!("{stem}.crt")))
        .args(["-subj", subj]);
    if let Some(san) = san {
        command.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Certificates added without names serve the DNS names of their subjectAltName, or their
/// common name when they have none; one with no usable name is refused, saying what to do;
/// `certificate list --name` finds the certificate that serves a name, wildcards included.
#[test]
fn certificates_without_names_serve_the_names_they_hold() {
    if !require_tool("certificate names", "openssl") {
        return;
    }
    let certs = TempDir::new("https-names");
    let d = certs.path();
    certificate_subject(d, "b", "/CN=b.test", Some("DNS:b.test,DNS:www.b.test"));
    certificate_subject(d, "wild", "/CN=ignored.test", Some("DNS:*.wild.test"));
    certificate_subject(d, "legacy", "/CN=legacy.test", None);
    certificate_subject(d, "ip", "/CN=ip.test", Some("IP:192.0.2.1"));
    let port = free_port();
    let config = format!(
        "{head}key_isolation = false\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"https\"\n",
        head = config_head(Path::new("{dir}"), 1),
    );
    let r = Rampart::start("https-names", &config);
    let address = format!("127.0.0.1:{port}");
    let file = |stem: &str, ext: &str| d.join(format!("{stem}.{ext}")).display().to_string();
    let add = |stem: &str| {
        r.try_ctl(&[
            "certificate",
            "add",
            "--address",
            &address,
            "--certificate",
            &file(stem, "crt"),
            "--key",
            &file(stem, "key"),
        ])
    };
    for stem in ["b", "wild", "legacy"] {
        add(stem).unwrap();
    }
    let refused = add("ip").unwrap_err();
    assert!(
        refused.contains("names no server") && refused.contains("IP address") && refused.contains("--name"),
        "{refused}"
    );
    for (sni, cn) in [
        ("b.test", "CN = b.test"),
        ("www.b.test", "CN = b.test"),
        ("x.wild.test", "CN = ignored.test"),
        ("legacy.test", "CN = legacy.test"),
    ] {
        let served = served_cn(port, Some(sni));
        assert!(served.contains(cn), "SNI {sni}: {served}");
    }
    let listed = |name: &str| -> Vec<serde_json::Value> {
        let list: serde_json::Value =
            serde_json::from_str(&r.ctl(&["certificate", "list", "--name", name, "--json"])).unwrap();
        list["content"]["certificates"]["certificates"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let all: serde_json::Value = serde_json::from_str(&r.ctl(&["certificate", "list", "--json"])).unwrap();
    assert_eq!(
        all["content"]["certificates"]["certificates"].as_array().unwrap().len(),
        3
    );
    let www = listed("www.b.test");
    assert_eq!(www.len(), 1, "{www:?}");
    assert_eq!(www[0]["names"], serde_json::json!(["b.test", "www.b.test"]));
    let wild = listed("deep.x.wild.test");
    assert_eq!(wild.len(), 1, "{wild:?}");
    assert_eq!(wild[0]["names"], serde_json::json!(["*.wild.test"]));
    assert!(listed("nothing.test").is_empty());
    let table = r.ctl(&["certificate", "list", "--name", "legacy.test"]);
    assert!(table.contains("legacy.test") && !table.contains("b.test"), "{table}");
}

/// `openssl s_client` output (stdout and stderr) for a handshake with `servername` (None: no
/// SNI), and whether it succeeded.
fn s_client(port: u16, servername: Option<&str>) -> (bool, String) {
    let mut args = vec!["s_client".to_string(), "-connect".into(), format!("127.0.0.1:{port}")];
    match servername {
        Some(n) => args.extend(["-servername".into(), n.to_string()]),
        None => args.push("-noservername".into()),
    }
    let out = Command::new("openssl")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("subject="), text)
}

/// A strict listener refuses a handshake whose SNI names no certificate, or that has none, with
/// the alert unrecognized_name; a listener's default_certificate (a name, then a fingerprint set
/// at runtime) is what an unknown SNI gets, and cannot be removed while it is the default.
#[test]
fn strict_sni_and_default_certificates() {
    if !require_tool("strict sni", "openssl") {
        return;
    }
    let certs = TempDir::new("https-strict");
    let d = certs.path();
    certificate(d, "a", "a.example");
    certificate(d, "b", "b.example");
    let echo = EchoBackend::start();
    let (strict, lenient) = (free_port(), free_port());
    let file = |stem: &str, ext: &str| d.join(format!("{stem}.{ext}")).display().to_string();
    let frontend = |port: u16, host: &str, stem: &str| {
        format!(
            "{{ address = \"127.0.0.1:{port}\", hostname = \"{host}\", certificate = \"{}\", key = \"{}\" }}",
            file(stem, "crt"),
            file(stem, "key")
        )
    };
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{strict}"
protocol = "https"
strict_sni = true

[[listeners]]
address = "127.0.0.1:{lenient}"
protocol = "https"
default_certificate = "b.example"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {sa}, {la}, {lb} ]
"#,
        head = config_head(Path::new("{dir}"), 1),
        e = echo.port,
        sa = frontend(strict, "a.example", "a"),
        la = frontend(lenient, "a.example", "a"),
        lb = frontend(lenient, "b.example", "b"),
    );
    let r = Rampart::start("https-strict", &config);

    let (ok, text) = s_client(strict, Some("a.example"));
    assert!(ok && text.contains("CN = a.example"), "{text}");
    for sni in [Some("unknown.example"), None] {
        let (ok, text) = s_client(strict, sni);
        assert!(!ok, "SNI {sni:?} was served on a strict listener:\n{text}");
        assert!(
            text.contains("unrecognized name") && text.contains("alert number 112"),
            "SNI {sni:?}: not refused with unrecognized_name:\n{text}"
        );
    }

    // Without default_certificate, a.example (first name) would be the default.
    for sni in [Some("unknown.example"), None] {
        let (ok, text) = s_client(lenient, sni);
        assert!(ok && text.contains("CN = b.example"), "SNI {sni:?}:\n{text}");
    }
    let (_, text) = s_client(lenient, Some("a.example"));
    assert!(text.contains("CN = a.example"), "{text}");

    // The listener list shows both settings, in its table and its JSON.
    let table = r.ctl(&["listener", "list"]);
    assert!(
        table.contains("DEFAULT CERTIFICATE") && table.contains("b.example"),
        "{table}"
    );
    assert!(table.contains("none (strict)"), "{table}");
    let list: serde_json::Value = serde_json::from_str(&r.ctl(&["listener", "list", "--json"])).unwrap();
    let listeners = list["content"]["listeners"]["listeners"].as_array().unwrap().clone();
    let of = |port: u16| {
        listeners
            .iter()
            .find(|l| l["address"] == format!("127.0.0.1:{port}"))
            .cloned()
            .unwrap()
    };
    assert_eq!(of(strict)["strict_sni"], true);
    assert_eq!(of(lenient)["default_certificate"], "b.example");

    // At runtime, by fingerprint: a.example's certificate becomes the default.
    let fingerprint_of = |name: &str| {
        let list: serde_json::Value = serde_json::from_str(&r.ctl(&[
            "certificate",
            "list",
            "--address",
            &format!("127.0.0.1:{lenient}"),
            "--name",
            name,
            "--json",
        ]))
        .unwrap();
        list["content"]["certificates"]["certificates"][0]["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = fingerprint_of("a.example");
    let address = format!("127.0.0.1:{lenient}");
    let refused = r
        .try_ctl(&["listener", "update", &address, "--default-certificate", &"0".repeat(64)])
        .unwrap_err();
    assert!(refused.contains("add the certificate first"), "{refused}");
    r.ctl(&["listener", "update", &address, "--default-certificate", &a]);
    let (_, text) = s_client(lenient, Some("unknown.example"));
    assert!(text.contains("CN = a.example"), "{text}");
    let refused = r
        .try_ctl(&["certificate", "remove", "--address", &address, "--fingerprint", &a])
        .unwrap_err();
    assert!(refused.contains("set another default_certificate"), "{refused}");
    // b.example's certificate is no default: it goes.
    r.ctl(&[
        "certificate",
        "remove",
        "--address",
        &address,
        "--fingerprint",
        &fingerprint_of("b.example"),
    ]);
    let (_, text) = s_client(lenient, Some("b.example"));
    assert!(text.contains("CN = a.example"), "{text}");
}

/// `curl https://<sni>:<port>/` with a Host header; returns (status, body).
fn https_host(port: u16, sni: &str, host: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Host: {host}"),
        ])
        .args(["--resolve", &format!("{sni}:{port}:127.0.0.1")])
        .arg(format!("https://{sni}:{port}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.to_string(), body.to_string())
}

/// A tenant's certificate never fronts another tenant's site: a request whose Host the
/// certificate chosen by the connection's SNI does not name is answered 421 and reaches no
/// backend, also when the connection got the listener's default certificate for an unknown SNI.
#[test]
fn a_host_the_certificate_does_not_name_gets_421() {
    if !require_tool("misdirected", "openssl") || !require_tool("misdirected", "curl") {
        return;
    }
    let certs = TempDir::new("https-421");
    let d = certs.path();
    certificate(d, "a", "a.example");
    certificate(d, "b", "b.example");
    certificate_subject(d, "w", "/CN=w", Some("DNS:*.w.example"));
    let (site_a, site_b) = (EchoBackend::start(), EchoBackend::start());
    let port = free_port();
    let file = |stem: &str, ext: &str| d.join(format!("{stem}.{ext}")).display().to_string();
    let frontend = |host: &str, stem: &str| {
        format!(
            "{{ address = \"127.0.0.1:{port}\", hostname = \"{host}\", certificate = \"{}\", key = \"{}\" }}",
            file(stem, "crt"),
            file(stem, "key")
        )
    };
    let config = format!(
        r#"{head}
[[listeners]]
address = "127.0.0.1:{port}"
protocol = "https"
answers = {{ "421" = "not this site\n" }}

[clusters.a]
backends = [ {{ address = "127.0.0.1:{a}" }} ]
frontends = [ {fa}, {fw} ]

[clusters.b]
backends = [ {{ address = "127.0.0.1:{b}" }} ]
frontends = [ {fb} ]
"#,
        head = config_head(Path::new("{dir}"), 2),
        a = site_a.port,
        b = site_b.port,
        fa = frontend("a.example", "a"),
        fw = frontend("*.w.example", "w"),
        fb = frontend("b.example", "b"),
    );
    let r = Rampart::start("https-421", &config);

    assert_eq!(https_host(port, "a.example", "a.example").0, "200");
    assert_eq!(https_host(port, "b.example", "b.example").0, "200");
    assert_eq!(
        https_host(port, "x.w.example", "y.w.example").0,
        "200",
        "under the wildcard"
    );
    let served_b = site_b.requests();
    let (code, body) = https_host(port, "a.example", "b.example");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("421", "not this site\n"),
        "a custom answer"
    );
    assert_eq!(https_host(port, "a.example", "b.example:443").0, "421");
    assert_eq!(https_host(port, "x.w.example", "b.example").0, "421");
    // An unknown SNI gets the default certificate, here a.example's: it fronts a.example only.
    r.ctl(&[
        "listener",
        "update",
        &format!("127.0.0.1:{port}"),
        "--default-certificate",
        "a.example",
    ]);
    assert_eq!(https_host(port, "unknown.example", "b.example").0, "421");
    assert_eq!(https_host(port, "unknown.example", "a.example").0, "200");
    assert_eq!(site_b.requests(), served_b, "a misdirected request reached b's backend");
}

/// A client that opens a connection to an HTTPS listener and sends half a ClientHello (or
/// nothing) is closed at the TLS handshake timeout: the listener's own (set in the file, then
/// at runtime), else the global one; long before the idle timeout.
#[test]
fn a_stalled_tls_handshake_is_closed_at_the_handshake_timeout() {
    if !require_tool("handshake timeout", "openssl") {
        return;
    }
    let certs = TempDir::new("https-handshake");
    certificate(certs.path(), "a", "a.test");
    let echo = EchoBackend::start();
    let (own, global) = (free_port(), free_port());
    let frontend = |port: u16| {
        format!(
            "{{ address = \"127.0.0.1:{port}\", hostname = \"a.test\", certificate = \"{}\", key = \"{}\" }}",
            certs.path().join("a.crt").display(),
            certs.path().join("a.key").display()
        )
    };
    let config = format!(
        r#"{head}key_isolation = false

[timeouts]
client_idle = 30
tls_handshake = 2

[[listeners]]
address = "127.0.0.1:{own}"
protocol = "https"
timeouts = {{ tls_handshake = 1 }}

[[listeners]]
address = "127.0.0.1:{global}"
protocol = "https"

[clusters.site]
backends = [ {{ address = "127.0.0.1:{e}" }} ]
frontends = [ {fo}, {fg} ]
"#,
        head = config_head(Path::new("{dir}"), 1),
        e = echo.port,
        fo = frontend(own),
        fg = frontend(global),
    );
    let r = Rampart::start("https-handshake", &config);
    // How long the listener keeps a connection that stops halfway through its ClientHello.
    let stalled = |port: u16, bytes: &[u8]| -> Duration {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        s.write_all(bytes).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return started.elapsed(),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!("the connection was still open after 20 s")
                }
                Err(_) => return started.elapsed(),
            }
        }
    };
    // A TLS record header announcing a 512-byte ClientHello, and its first bytes.
    let half_hello: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x00];
    let within = |elapsed: Duration, seconds: f64| {
        let t = elapsed.as_secs_f64();
        assert!(
            t >= seconds - 0.1 && t < seconds + 1.0,
            "closed after {t:.2} s, expected about {seconds} s"
        );
    };
    within(stalled(own, half_hello), 1.0);
    within(stalled(own, &[]), 1.0);
    within(stalled(global, half_hello), 2.0);
    // Set at runtime from the command line (`listener update` changes it in place).
    r.ctl(&[
        "listener",
        "update",
        &format!("127.0.0.1:{global}"),
        "--tls-handshake-timeout-ms",
        "3000",
    ]);
    within(stalled(global, half_hello), 3.0);
    // A handshake that completes is not cut: the connection then waits under the idle timeout,
    // and a request sent 2 s later (twice the handshake timeout) is served.
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{own}"),
            "-servername",
            "a.test",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    {
        use std::io::Write;
        let stdin = client.stdin.as_mut().unwrap();
        stdin
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .unwrap();
    }
    let out = client.wait_with_output().unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "a completed handshake was cut: {reply:?}"
    );
}
