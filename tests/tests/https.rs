//! HTTPS termination in jailed workers, with real clients: curl and openssl s_client.

use std::path::Path;
use std::process::Command;

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
    let config = format!(
        r#"{head}key_isolation = false

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

    // Certificates cannot be added while keys must stay out of workers... unless the operator
    // chose otherwise, as here: a new certificate added at runtime is served at once.
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
fn certificates_are_refused_while_key_isolation_is_on() {
    if !require_tool("key isolation", "openssl") {
        return;
    }
    let certs = TempDir::new("https-isolation");
    certificate(certs.path(), "a", "a.test");
    let port = free_port();
    let config = format!(
        "{head}\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\nprotocol = \"https\"\n",
        head = config_head(Path::new("{dir}"), 1)
    );
    let r = Rampart::start("https-isolation", &config);
    let err = r
        .try_ctl(&[
            "certificate",
            "add",
            "--address",
            &format!("127.0.0.1:{port}"),
            "--certificate",
            &certs.path().join("a.crt").display().to_string(),
            "--key",
            &certs.path().join("a.key").display().to_string(),
        ])
        .unwrap_err();
    assert!(err.contains("key_isolation = false"), "{err}");
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
