//! Tests of the command line: grammar, requests built, rendering, the connection.

use super::*;
use clap::{CommandFactory, Parser};
use std::os::unix::net::UnixListener;

#[derive(Parser, Debug)]
struct TestCli {
    #[command(subcommand)]
    command: ClientCommand,
}

fn parse(args: &[&str]) -> ClientCommand {
    let argv = std::iter::once("rampart").chain(args.iter().copied());
    TestCli::try_parse_from(argv).unwrap().command
}

fn kind_of(args: &[&str]) -> Kind {
    to_request(&parse(args)).unwrap().unwrap().kind.unwrap()
}

#[test]
fn command_line_definition_is_consistent() {
    TestCli::command().debug_assert();
}

#[test]
fn backend_add_defaults_id_to_address_and_weight_to_100() {
    let kind = kind_of(&["backend", "add", "--cluster", "shop", "--address", "10.0.0.1:8080"]);
    assert_eq!(
        kind,
        Kind::AddBackend(proto::Backend {
            cluster_id: "shop".into(),
            backend_id: "10.0.0.1:8080".into(),
            address: "10.0.0.1:8080".into(),
            weight: 100,
            backup: false,
        })
    );
    let kind = kind_of(&[
        "backend",
        "add",
        "--cluster",
        "shop",
        "--address",
        "10.0.0.2:80",
        "--id",
        "b2",
        "--weight",
        "5",
        "--backup",
    ]);
    assert!(matches!(kind, Kind::AddBackend(b) if b.backend_id == "b2" && b.weight == 5 && b.backup));
    assert_eq!(
        kind_of(&["backend", "remove", "--cluster", "shop", "--id", "b2"]),
        Kind::RemoveBackend(proto::BackendId {
            cluster_id: "shop".into(),
            backend_id: "b2".into(),
        })
    );
}

#[test]
fn frontend_requests() {
    let kind = kind_of(&[
        "frontend",
        "http",
        "add",
        "--address",
        "0.0.0.0:80",
        "--hostname",
        "example.com",
        "--path",
        "/login",
        "--path-kind",
        "equals",
        "--method",
        "POST",
        "--cluster",
        "shop",
    ]);
    assert_eq!(
        kind,
        Kind::AddHttpFrontend(proto::HttpFrontend {
            address: "0.0.0.0:80".into(),
            hostname: "example.com".into(),
            path: Some(proto::PathRule {
                kind: proto::PathKind::Equals as i32,
                value: "/login".into(),
            }),
            method: "POST".into(),
            cluster_id: "shop".into(),
            tags: Default::default(),
        })
    );
    // Without --path: an empty prefix, every path, as in the configuration file.
    let kind = kind_of(&[
        "frontend",
        "https",
        "remove",
        "--address",
        "0.0.0.0:443",
        "--hostname",
        "a.com",
        "--cluster",
        "c",
    ]);
    assert!(matches!(kind, Kind::RemoveHttpsFrontend(f)
        if f.path == Some(proto::PathRule { kind: proto::PathKind::Prefix as i32, value: String::new() })
            && f.method.is_empty()));
    assert_eq!(
        kind_of(&["frontend", "tcp", "add", "--address", "0.0.0.0:5432", "--cluster", "db"]),
        Kind::AddTcpFrontend(proto::TcpFrontend {
            address: "0.0.0.0:5432".into(),
            cluster_id: "db".into(),
        })
    );
    assert_eq!(
        kind_of(&["frontend", "list", "--hostname", "a.com"]),
        Kind::ListFrontends(proto::FrontendFilter {
            cluster_id: String::new(),
            hostname: "a.com".into(),
        })
    );
}

#[test]
fn cluster_listener_and_other_requests() {
    assert_eq!(
        kind_of(&[
            "cluster",
            "add",
            "shop",
            "--load-balancing",
            "least_connections",
            "--sticky-session"
        ]),
        Kind::AddCluster(proto::Cluster {
            cluster_id: "shop".into(),
            load_balancing: proto::LoadBalancing::LeastConnections as i32,
            sticky_session: true,
            https_redirect: false,
            answer_503: String::new(),
        })
    );
    assert_eq!(
        kind_of(&["cluster", "list"]),
        Kind::QueryClusters(proto::ClusterFilter::default())
    );
    let kind = kind_of(&[
        "listener",
        "add",
        "--address",
        "0.0.0.0:443",
        "--protocol",
        "https",
        "--inactive",
    ]);
    assert!(matches!(kind, Kind::AddListener(l)
        if l.protocol == proto::Protocol::Https as i32 && !l.active && l.public_address.is_empty()));
    let kind = kind_of(&["listener", "add", "--address", "0.0.0.0:80", "--protocol", "http"]);
    assert!(matches!(kind, Kind::AddListener(l) if l.active));
    let kind = kind_of(&[
        "listener",
        "add",
        "--address",
        "0.0.0.0:443",
        "--protocol",
        "https",
        "--default-certificate",
        "shop.example",
        "--tls-handshake-timeout-ms",
        "2500",
    ]);
    assert!(matches!(kind, Kind::AddListener(l)
        if l.default_certificate == "shop.example" && !l.strict_sni && l.tls_handshake_timeout_ms == 2500));
    let kind = kind_of(&[
        "listener",
        "add",
        "--address",
        "0.0.0.0:443",
        "--protocol",
        "https",
        "--strict-sni",
    ]);
    assert!(matches!(kind, Kind::AddListener(l) if l.strict_sni && l.default_certificate.is_empty()));
    assert!(matches!(
        kind_of(&["listener", "deactivate", "--address", "0.0.0.0:80"]),
        Kind::DeactivateListener(a) if a.address == "0.0.0.0:80"
    ));
    assert!(matches!(kind_of(&["shutdown"]), Kind::SoftStop(s) if s.grace_seconds == 0));
    assert!(matches!(kind_of(&["shutdown", "--grace", "5"]), Kind::SoftStop(s) if s.grace_seconds == 5));
    assert!(matches!(kind_of(&["upgrade", "--grace", "90"]), Kind::UpgradeMain(u) if u.grace_seconds == 90));
    assert!(matches!(
        kind_of(&["upgrade", "--worker", "1", "--grace", "7"]),
        Kind::UpgradeWorker(u) if u.id == 1 && u.grace_seconds == 7
    ));
    for bad in [
        &["shutdown", "--grace", "0"][..],
        &["upgrade", "--grace", "86401"],
        &["shutdown", "--hard", "--grace", "5"],
    ] {
        let argv = std::iter::once("rampart").chain(bad.iter().copied());
        assert!(TestCli::try_parse_from(argv).is_err(), "{bad:?} was accepted");
    }
    assert!(matches!(kind_of(&["shutdown", "--hard"]), Kind::HardStop(_)));
    assert!(matches!(kind_of(&["state", "dump"]), Kind::DumpState(_)));
    assert!(matches!(kind_of(&["state", "save", "today.jsonl"]), Kind::SaveState(p) if p.path == "today.jsonl"));
    assert!(matches!(kind_of(&["status"]), Kind::Status(_)));
    assert!(matches!(kind_of(&["workers"]), Kind::ListWorkers(_)));
    assert!(matches!(kind_of(&["access"]), Kind::ShowPolicy(_)));
    assert!(matches!(kind_of(&["logging", "debug"]), Kind::SetLoggingLevel(l) if l.filter == "debug"));
    assert!(matches!(kind_of(&["metrics", "--cluster", "shop"]), Kind::QueryMetrics(m) if m.cluster_id == "shop"));
    assert_eq!(
        kind_of(&["health-check", "set", "--cluster", "shop", "--path", "/health"]),
        Kind::SetHealthCheck(proto::HealthCheck {
            cluster_id: "shop".into(),
            path: "/health".into(),
            interval_ms: 5_000,
            timeout_ms: 2_000,
            healthy_threshold: 3,
            unhealthy_threshold: 3,
            expected_status: 200,
        })
    );
    assert!(to_request(&parse(&["apply", "-f", "rampart.toml"])).unwrap().is_none());
}

fn pem(label: &str, base64: &str) -> String {
    format!("-----BEGIN {label}-----\n{base64}\n-----END {label}-----\n")
}

#[test]
fn certificate_add_sends_file_contents() {
    let dir = std::env::temp_dir().join(format!("rampart-client-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, chain, key) = (dir.join("cert.pem"), dir.join("chain.pem"), dir.join("key.pem"));
    std::fs::write(&cert, pem("CERTIFICATE", "MAEC")).unwrap();
    std::fs::write(&chain, pem("CERTIFICATE", "MAME")).unwrap();
    std::fs::write(&key, pem("PRIVATE KEY", "MAU=")).unwrap();
    let command = parse(&[
        "certificate",
        "add",
        "--address",
        "0.0.0.0:443",
        "--certificate",
        cert.to_str().unwrap(),
        "--chain",
        chain.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--name",
        "a.com",
    ]);
    let kind = to_request(&command).unwrap().unwrap().kind.unwrap();
    assert_eq!(
        kind,
        Kind::AddCertificate(proto::Certificate {
            address: "0.0.0.0:443".into(),
            certificate: pem("CERTIFICATE", "MAEC"),
            chain: vec![pem("CERTIFICATE", "MAME")],
            key: pem("PRIVATE KEY", "MAU="),
            names: vec!["a.com".into()],
        })
    );
    // The key never appears in the one-line description.
    let line = describe(&request_of(kind));
    assert!(line.starts_with("add_certificate 0.0.0.0:443 "), "{line}");
    assert!(!line.contains("PRIVATE"), "{line}");

    std::fs::remove_file(&key).unwrap();
    let err = to_request(&command).unwrap_err();
    assert!(
        matches!(&err, ClientError::ReadFile { path, .. } if *path == key),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), crate::Exit::BadInput);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cluster_table() {
    let list = proto::ClusterList {
        clusters: vec![
            proto::ClusterInfo {
                cluster: Some(proto::Cluster {
                    cluster_id: "shop".into(),
                    load_balancing: proto::LoadBalancing::LeastConnections as i32,
                    sticky_session: true,
                    ..Default::default()
                }),
                backends: vec![proto::Backend::default(); 3],
                http_frontends: vec![proto::HttpFrontend::default(); 2],
                https_frontends: vec![proto::HttpFrontend::default()],
                tcp_frontends: vec![],
            },
            proto::ClusterInfo {
                cluster: Some(proto::Cluster {
                    cluster_id: "db".into(),
                    https_redirect: true,
                    ..Default::default()
                }),
                backends: vec![proto::Backend::default(); 12],
                tcp_frontends: vec![proto::TcpFrontend::default()],
                ..Default::default()
            },
        ],
    };
    let expected = "\
CLUSTER  LOAD BALANCING     STICKY  HTTPS REDIRECT  BACKENDS  FRONTENDS
shop     least_connections  yes     no              3         3
db       round_robin        no      yes             12        1
";
    assert_eq!(render_clusters(&list, false), expected);
    assert_eq!(render_clusters(&proto::ClusterList::default(), false), "no clusters\n");
}

#[test]
fn cluster_detail_shows_backends_and_frontends() {
    let list = proto::ClusterList {
        clusters: vec![proto::ClusterInfo {
            cluster: Some(proto::Cluster {
                cluster_id: "shop".into(),
                ..Default::default()
            }),
            backends: vec![proto::Backend {
                cluster_id: "shop".into(),
                backend_id: "b1".into(),
                address: "10.0.0.1:8080".into(),
                weight: 100,
                backup: false,
            }],
            http_frontends: vec![proto::HttpFrontend {
                address: "0.0.0.0:80".into(),
                hostname: "shop.example".into(),
                path: Some(proto::PathRule {
                    kind: proto::PathKind::Prefix as i32,
                    value: "/api".into(),
                }),
                method: String::new(),
                cluster_id: "shop".into(),
                tags: Default::default(),
            }],
            ..Default::default()
        }],
    };
    let expected = "\
CLUSTER  LOAD BALANCING  STICKY  HTTPS REDIRECT  BACKENDS  FRONTENDS
shop     round_robin     no      no              1         1

BACKEND  ADDRESS        WEIGHT  BACKUP
b1       10.0.0.1:8080  100     no

PROTOCOL  ADDRESS     HOSTNAME      PATH         METHOD  CLUSTER
http      0.0.0.0:80  shop.example  prefix /api  any     shop
";
    assert_eq!(render_clusters(&list, true), expected);
}

#[test]
fn listener_table() {
    let list = proto::ListenerList {
        listeners: vec![
            proto::Listener {
                address: "0.0.0.0:80".into(),
                protocol: proto::Protocol::Http as i32,
                active: true,
                ..Default::default()
            },
            proto::Listener {
                address: "[::]:443".into(),
                protocol: proto::Protocol::Https as i32,
                public_address: "203.0.113.7:443".into(),
                active: false,
                default_certificate: "a.example".into(),
                tls_handshake_timeout_ms: 1500,
                ..Default::default()
            },
        ],
    };
    let expected = "\
ADDRESS     PROTOCOL  STATE     PUBLIC ADDRESS   DEFAULT CERTIFICATE  STRICT SNI  TLS HANDSHAKE
0.0.0.0:80  http      active    -                -                    -           -
[::]:443    https     inactive  203.0.113.7:443  a.example            no          1500 ms
";
    assert_eq!(render_listeners(&list), expected);
}

#[test]
fn dates_are_utc() {
    assert_eq!(utc_time(0), "unknown");
    assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13 UTC");
    assert_eq!(utc_time(951_782_400), "2000-02-29 00:00 UTC");
}

fn cluster(id: &str) -> Request {
    request_of(Kind::AddCluster(proto::Cluster {
        cluster_id: id.into(),
        ..Default::default()
    }))
}

fn backend(cluster: &str, address: &str) -> Request {
    request_of(Kind::AddBackend(proto::Backend {
        cluster_id: cluster.into(),
        backend_id: address.into(),
        address: address.into(),
        weight: 100,
        backup: false,
    }))
}

fn socket_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("rampart-client-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// A server that accepts one connection, reads one request, and lets `answer` reply.
fn serve_once<F>(path: &Path, answer: F) -> std::thread::JoinHandle<Request>
where
    F: FnOnce(&mut UnixStream, &Request) + Send + 'static,
{
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut frames = FrameReader::default();
        let request = frames.read_message::<Request, _>(&mut stream).unwrap().unwrap();
        answer(&mut stream, &request);
        request
    })
}

fn response(request: &Request, status: ResponseStatus, message: &str, content: Option<Content>) -> Response {
    Response {
        request_id: request.id.clone(),
        status: status as i32,
        message: message.into(),
        content,
    }
}

#[test]
fn call_skips_processing_and_returns_the_final_answer() {
    let path = socket_path("ok");
    let server = serve_once(&path, |stream, request| {
        framing::write_frame(stream, &response(request, ResponseStatus::Processing, "working", None)).unwrap();
        let report = proto::StatusReport {
            version: "0.1.0".into(),
            workers: 2,
            ..Default::default()
        };
        let ok = response(request, ResponseStatus::Ok, "", Some(Content::StatusReport(report)));
        framing::write_frame(stream, &ok).unwrap();
    });
    let mut client = Client::connect(&path).unwrap();
    client.show_progress(false);
    let answer = client.call(request_of(Kind::Status(proto::Empty {}))).unwrap();
    let sent = server.join().unwrap();
    assert!(sent.id.starts_with("cli-"), "{}", sent.id);
    assert_eq!(answer.request_id, sent.id);
    assert_eq!(answer.status, ResponseStatus::Ok as i32);
    assert!(matches!(answer.content, Some(Content::StatusReport(s)) if s.workers == 2 && s.version == "0.1.0"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_failure_is_returned_then_typed_with_exit_code_1() {
    let path = socket_path("failure");
    let server = serve_once(&path, |stream, request| {
        let failure = response(
            request,
            ResponseStatus::Failure,
            "unknown cluster `x`: add the cluster first",
            None,
        );
        framing::write_frame(stream, &failure).unwrap();
    });
    let mut client = Client::connect(&path).unwrap();
    let answer = client
        .call(request_of(Kind::RemoveCluster(proto::ClusterId {
            cluster_id: "x".into(),
        })))
        .unwrap();
    server.join().unwrap();
    let err = expect_ok(answer).unwrap_err();
    assert_eq!(err.to_string(), "unknown cluster `x`: add the cluster first");
    assert_eq!(err.exit_code(), crate::Exit::Failed);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_server_closing_mid_frame_is_a_typed_error() {
    let path = socket_path("truncated");
    let server = serve_once(&path, |stream, _| {
        // Declares 50 bytes, sends 10, closes.
        stream.write_all(&[50]).unwrap();
        stream.write_all(&[0u8; 10]).unwrap();
    });
    let mut client = Client::connect(&path).unwrap();
    let err = client.call(request_of(Kind::Status(proto::Empty {}))).unwrap_err();
    server.join().unwrap();
    assert!(
        matches!(err, ClientError::Frame(FrameError::Truncated { buffered: 11 })),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), crate::Exit::BadInput);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_server_closing_without_answering_is_a_typed_error() {
    let path = socket_path("closed");
    let server = serve_once(&path, |_, _| {});
    let mut client = Client::connect(&path).unwrap();
    let err = client.call(request_of(Kind::Status(proto::Empty {}))).unwrap_err();
    let sent = server.join().unwrap();
    assert!(
        matches!(&err, ClientError::Closed { request_id } if *request_id == sent.id),
        "{err:?}"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn apply_sends_the_file_state_and_prints_the_supervisors_plan() {
    let dir = std::env::temp_dir().join(format!("rampart-client-apply-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rampart.toml");
    let toml = "[[listeners]]\naddress = \"127.0.0.1:8080\"\n\n[clusters.shop]\n\
                backends = [{ address = \"10.0.0.1:80\" }]\n";
    std::fs::write(&file, toml).unwrap();
    let path = socket_path("apply");
    let socket = UnixListener::bind(&path).unwrap();
    let plan = vec![
        request_of(Kind::RemoveCluster(proto::ClusterId {
            cluster_id: "old".into(),
        })),
        cluster("shop"),
        backend("shop", "10.0.0.1:80"),
    ];
    // Two connections: the dry run, then the real one.
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for round in 0..2 {
            let (mut stream, _) = socket.accept().unwrap();
            let mut frames = FrameReader::default();
            while let Some(request) = frames.read_message::<Request, _>(&mut stream).unwrap() {
                let content = Some(Content::Plan(proto::Plan {
                    requests: plan.clone(),
                    base_state_hash: "aa".into(),
                    target_state_hash: "bb".into(),
                    applied: round == 1,
                }));
                let message = if round == 0 { "dry run" } else { "applied 3 change(s)" };
                let ok = response(&request, ResponseStatus::Ok, message, content);
                framing::write_frame(&mut stream, &ok).unwrap();
                seen.push(request);
            }
        }
        seen
    });
    let diff = "\
remove_cluster old
add_cluster shop round_robin
add_backend shop/10.0.0.1:80 10.0.0.1:80 weight 100
";
    let file = file.to_str().unwrap();
    let mut out = Vec::new();
    execute(&parse(&["apply", "-f", file, "--dry-run"]), &path, false, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with(diff), "{text}");
    assert!(text.contains("--expect-state aa"), "{text}");
    let mut out = Vec::new();
    execute(
        &parse(&["apply", "-f", file, "--expect-state", "aa"]),
        &path,
        false,
        &mut out,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("{diff}applied 3 change(s)\nstate aa -> bb\n")
    );

    let seen = server.join().unwrap();
    let kinds: Vec<&str> = seen.iter().map(request_kind_name).collect();
    assert_eq!(kinds, ["apply_state", "apply_state"]);
    let (Some(Kind::ApplyState(dry)), Some(Kind::ApplyState(real))) = (&seen[0].kind, &seen[1].kind) else {
        panic!("{seen:?}");
    };
    assert!(dry.dry_run && !real.dry_run);
    assert_eq!(
        (dry.base_state_hash.as_str(), real.base_state_hash.as_str()),
        ("", "aa")
    );
    // The whole state of the file: its listener, cluster and backend.
    let sent: Vec<&str> = real.target.iter().map(request_kind_name).collect();
    assert_eq!(sent, ["add_listener", "add_cluster", "add_backend"]);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn listener_update_sends_only_the_given_fields() {
    let Kind::UpdateListener(u) = kind_of(&[
        "listener",
        "update",
        "127.0.0.1:80",
        "--request-timeout-ms",
        "2500",
        "--groups",
        "X25519:P-256",
        "--answer",
        "404=",
    ]) else {
        panic!()
    };
    assert_eq!(u.address, "127.0.0.1:80");
    assert_eq!(u.fields, ["request_timeout_ms", "groups", "answers.404"]);
    let l = u.listener.unwrap();
    assert_eq!(l.request_timeout_ms, 2500);
    assert_eq!(l.groups, ["X25519", "P-256"]);
    assert!(l.answers.is_empty());
}

#[test]
fn connecting_to_a_missing_socket_says_what_to_do() {
    let path = socket_path("missing");
    let err = Client::connect(&path).err().unwrap();
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("rampart start") && message.contains("-s"), "{message}");
    assert_eq!(err.exit_code(), crate::Exit::BadInput);
}
