use super::*;
use proptest::prelude::*;
use proptest::strategy::Union;

fn req(kind: Kind) -> proto::Request {
    request(kind)
}

fn pem(label: &str, bytes: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
}

fn cert(address: &str, variant: u8) -> proto::Certificate {
    proto::Certificate {
        address: address.into(),
        certificate: pem("CERTIFICATE", &[0x30, 0x82, variant, 1, 2, 3]),
        chain: vec![],
        key: pem("PRIVATE KEY", &[0x30, variant]),
        names: vec!["a.com".into()],
    }
}

const LISTENERS: [&str; 3] = ["127.0.0.1:80", "127.0.0.1:443", "127.0.0.1:9000"];
const CLUSTERS: [&str; 4] = ["c0", "c1", "c2", "c3"];
const HOSTS: [&str; 3] = ["a.com", "b.com", "*.c.com"];

fn http_frontend(l: usize, h: usize, p: usize, m: bool, c: usize, tag: bool) -> proto::HttpFrontend {
    let (kind, value) = match p {
        0 => (proto::PathKind::Prefix, ""),
        1 => (proto::PathKind::Prefix, "/api"),
        2 => (proto::PathKind::Equals, "/x"),
        _ => (proto::PathKind::Regex, "^/r[0-9]+$"),
    };
    let mut tags = BTreeMap::new();
    if tag {
        tags.insert("owner".to_string(), "t1".to_string());
    }
    proto::HttpFrontend {
        address: LISTENERS[l].into(),
        hostname: HOSTS[h].into(),
        path: Some(proto::PathRule {
            kind: kind as i32,
            value: value.into(),
        }),
        method: if m { "GET".into() } else { String::new() },
        cluster_id: CLUSTERS[c].into(),
        tags,
    }
}

/// Requests over a small universe, so that they collide, conflict and depend on each other.
fn universe_request() -> impl Strategy<Value = proto::Request> {
    let l = 0..LISTENERS.len();
    let c = 0..CLUSTERS.len();
    prop_oneof![
        (l.clone(), 0..3i32, any::<bool>()).prop_map(|(l, p, active)| req(Kind::AddListener(proto::Listener {
            address: LISTENERS[l].into(),
            protocol: p,
            active,
            ..Default::default()
        }))),
        l.clone().prop_map(|l| req(Kind::RemoveListener(proto::ListenerAddress {
            address: LISTENERS[l].into()
        }))),
        (l.clone(), 0..3u32, any::<bool>()).prop_map(|(l, t, answer)| {
            let mut answers = BTreeMap::new();
            if answer {
                answers.insert("404".to_string(), "gone".to_string());
            }
            req(Kind::UpdateListener(proto::ListenerUpdate {
                address: LISTENERS[l].into(),
                listener: Some(proto::Listener {
                    request_timeout_ms: t * 1000,
                    answers,
                    ..Default::default()
                }),
                fields: vec!["request_timeout_ms".into(), "answers.404".into()],
            }))
        }),
        (c.clone(), 0..4i32, any::<bool>()).prop_map(|(c, lb, sticky)| req(Kind::AddCluster(proto::Cluster {
            cluster_id: CLUSTERS[c].into(),
            load_balancing: lb,
            sticky_session: sticky,
            ..Default::default()
        }))),
        c.clone().prop_map(|c| req(Kind::RemoveCluster(proto::ClusterId {
            cluster_id: CLUSTERS[c].into()
        }))),
        (c.clone(), 0..4usize, 0..4u8, 0..3u32).prop_map(|(c, b, a, w)| req(Kind::AddBackend(proto::Backend {
            cluster_id: CLUSTERS[c].into(),
            backend_id: format!("b{b}"),
            address: format!("10.0.0.{a}:80"),
            weight: w * 50,
            backup: w == 0,
        }))),
        (c.clone(), 0..4usize).prop_map(|(c, b)| req(Kind::RemoveBackend(proto::BackendId {
            cluster_id: CLUSTERS[c].into(),
            backend_id: format!("b{b}"),
        }))),
        (
            l.clone(),
            0..3usize,
            0..4usize,
            any::<bool>(),
            c.clone(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(l, h, p, m, c, tag, https)| {
                let f = http_frontend(l, h, p, m, c, tag);
                req(if https {
                    Kind::AddHttpsFrontend(f)
                } else {
                    Kind::AddHttpFrontend(f)
                })
            }),
        (l.clone(), 0..3usize, 0..4usize, any::<bool>(), c.clone(), any::<bool>()).prop_map(
            |(l, h, p, m, c, https)| {
                let f = http_frontend(l, h, p, m, c, false);
                req(if https {
                    Kind::RemoveHttpsFrontend(f)
                } else {
                    Kind::RemoveHttpFrontend(f)
                })
            }
        ),
        (l.clone(), c.clone(), any::<bool>()).prop_map(|(l, c, add)| {
            let f = proto::TcpFrontend {
                address: LISTENERS[l].into(),
                cluster_id: CLUSTERS[c].into(),
            };
            req(if add {
                Kind::AddTcpFrontend(f)
            } else {
                Kind::RemoveTcpFrontend(f)
            })
        }),
        (l.clone(), 0..3u8, any::<bool>()).prop_map(|(l, v, add)| {
            let c = cert(LISTENERS[l], v);
            if add {
                req(Kind::AddCertificate(c))
            } else {
                req(Kind::RemoveCertificate(proto::CertificateId {
                    address: LISTENERS[l].into(),
                    fingerprint: certificate_fingerprint(&c.certificate).unwrap(),
                }))
            }
        }),
        l.clone()
            .prop_map(|l| req(Kind::DeactivateListener(proto::ListenerAddress {
                address: LISTENERS[l].into()
            }))),
        // HTTPS listeners with a default certificate (by fingerprint or by name) or strict SNI.
        (l.clone(), 0..5u8, any::<bool>()).prop_map(|(l, v, active)| {
            let (default_certificate, strict_sni) = match v {
                0..=2 => (
                    certificate_fingerprint(&cert(LISTENERS[l], v).certificate).unwrap(),
                    false,
                ),
                3 => ("A.com".to_string(), false),
                _ => (String::new(), true),
            };
            if active {
                // A new HTTPS listener (refused where one exists) ...
                req(Kind::AddListener(proto::Listener {
                    address: LISTENERS[l].into(),
                    protocol: proto::Protocol::Https as i32,
                    active,
                    default_certificate,
                    strict_sni,
                    tls_handshake_timeout_ms: u32::from(v) * 500,
                    ..Default::default()
                }))
            } else {
                // ... or these settings changed on an existing one.
                req(Kind::UpdateListener(proto::ListenerUpdate {
                    address: LISTENERS[l].into(),
                    listener: Some(proto::Listener {
                        default_certificate,
                        strict_sni,
                        tls_handshake_timeout_ms: u32::from(v) * 500,
                        ..Default::default()
                    }),
                    fields: vec![
                        "default_certificate".into(),
                        "strict_sni".into(),
                        "tls_handshake_timeout_ms".into(),
                    ],
                }))
            }
        }),
        (l, 0..3u8, 0..3u8).prop_map(|(l, old, new)| {
            req(Kind::ReplaceCertificate(proto::ReplaceCertificate {
                address: LISTENERS[l].into(),
                old_fingerprint: certificate_fingerprint(&cert(LISTENERS[l], old).certificate).unwrap(),
                new_certificate: Some(cert(LISTENERS[l], new)),
            }))
        }),
    ]
}

fn arb_state() -> impl Strategy<Value = State> {
    // A setup of listeners and clusters first, so that frontends, backends and certificates have
    // something to attach to; then random requests that add, conflict and remove.
    let setup = (
        proptest::collection::vec(proptest::option::of(0..3i32), LISTENERS.len()),
        proptest::collection::vec(any::<bool>(), CLUSTERS.len()),
        proptest::collection::vec(0..3u8, LISTENERS.len()),
    );
    (setup, proptest::collection::vec(universe_request(), 0..72)).prop_map(
        |((protocols, clusters, defaults), random)| {
            let mut requests = Vec::new();
            for (l, p) in protocols.iter().enumerate() {
                if let Some(p) = p {
                    requests.push(req(Kind::AddListener(proto::Listener {
                        address: LISTENERS[l].into(),
                        protocol: *p,
                        active: true,
                        ..Default::default()
                    })));
                    // Some HTTPS listeners start with a certificate that is their default.
                    if *p == proto::Protocol::Https as i32 && defaults[l] > 0 {
                        let c = cert(LISTENERS[l], defaults[l]);
                        let default_certificate = if defaults[l] == 1 {
                            certificate_fingerprint(&c.certificate).unwrap()
                        } else {
                            "a.com".into()
                        };
                        requests.push(req(Kind::AddCertificate(c)));
                        requests.push(req(Kind::AddListener(proto::Listener {
                            address: LISTENERS[l].into(),
                            protocol: *p,
                            active: true,
                            default_certificate,
                            ..Default::default()
                        })));
                    }
                }
            }
            for (c, present) in clusters.iter().enumerate() {
                if *present {
                    requests.push(req(Kind::AddCluster(proto::Cluster {
                        cluster_id: CLUSTERS[c].into(),
                        ..Default::default()
                    })));
                }
            }
            requests.extend(random);
            let mut state = State::new();
            for r in &requests {
                let before = state.clone();
                if state.apply(r).is_err() {
                    // A refused request leaves the state untouched.
                    assert_eq!(state, before);
                }
            }
            state
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn applying_the_diff_turns_a_into_b(a in arb_state(), b in arb_state()) {
        let diff = a.diff(&b);
        let mut s = a.clone();
        for (i, r) in diff.iter().enumerate() {
            if let Err(e) = s.apply(r) {
                panic!("diff request {i} ({}) refused: {e}\n{diff:#?}", crate::request_kind_name(r));
            }
        }
        prop_assert_eq!(&s, &b);
        prop_assert_eq!(s.hash(), b.hash());
        // A state differs from itself by nothing.
        prop_assert!(b.diff(&b).is_empty());
    }

    #[test]
    fn diff_applied_as_one_batch_is_atomic_and_equivalent(a in arb_state(), b in arb_state()) {
        let mut s = a.clone();
        s.apply(&req(Kind::Apply(proto::Batch { requests: a.diff(&b), base_state_hash: String::new() }))).unwrap();
        prop_assert_eq!(s, b);
    }

    #[test]
    fn save_then_load_round_trips(a in arb_state()) {
        let mut saved = Vec::new();
        a.save(&mut saved).unwrap();
        let loaded = State::load(saved.as_slice()).unwrap();
        prop_assert_eq!(loaded.hash(), a.hash());
        prop_assert_eq!(loaded, a);
    }

    #[test]
    fn a_failed_batch_changes_nothing(a in arb_state(), requests in proptest::collection::vec(universe_request(), 1..10)) {
        let mut s = a.clone();
        let mut batch = requests;
        // Make sure the batch fails: its last request removes a cluster that cannot exist.
        batch.push(req(Kind::RemoveCluster(proto::ClusterId { cluster_id: "missing".into() })));
        let err = s.apply(&req(Kind::Apply(proto::Batch { requests: batch, base_state_hash: String::new() }))).unwrap_err();
        let is_batch_error = matches!(err, StateError::InBatch { .. });
        prop_assert!(is_batch_error);
        prop_assert_eq!(s, a);
    }
}

// ----- every request kind round-trips through protobuf and JSON

fn s() -> impl Strategy<Value = String> {
    "[a-z0-9.:/*-]{0,12}"
}

fn arb_listener() -> impl Strategy<Value = proto::Listener> {
    (
        s(),
        0..3i32,
        s(),
        any::<bool>(),
        any::<u32>(),
        proptest::collection::btree_map(s(), s(), 0..3),
        proptest::collection::vec(s(), 0..3),
    )
        .prop_map(
            |(address, protocol, public_address, active, t, answers, cipher_suites)| proto::Listener {
                address,
                protocol,
                public_address: public_address.clone(),
                expect_proxy_protocol: active,
                send_proxy_protocol: !active,
                client_idle_timeout_ms: t,
                request_timeout_ms: t / 2,
                backend_connect_timeout_ms: t / 3,
                backend_response_timeout_ms: t / 4,
                answers,
                tls_min_version: "1.2".into(),
                groups: cipher_suites.iter().rev().cloned().collect(),
                default_certificate: public_address.clone(),
                strict_sni: !active,
                tls_handshake_timeout_ms: t / 5,
                cipher_suites,
                active,
            },
        )
}

fn arb_http_frontend() -> impl Strategy<Value = proto::HttpFrontend> {
    (
        s(),
        s(),
        0..3i32,
        s(),
        s(),
        s(),
        proptest::collection::btree_map(s(), s(), 0..3),
    )
        .prop_map(
            |(address, hostname, kind, value, method, cluster_id, tags)| proto::HttpFrontend {
                address,
                hostname,
                path: Some(proto::PathRule { kind, value }),
                method,
                cluster_id,
                tags,
            },
        )
}

fn arb_certificate() -> impl Strategy<Value = proto::Certificate> {
    (
        s(),
        s(),
        proptest::collection::vec(s(), 0..2),
        s(),
        proptest::collection::vec(s(), 0..2),
    )
        .prop_map(|(address, certificate, chain, key, names)| proto::Certificate {
            address,
            certificate,
            chain,
            key,
            names,
        })
}

fn arb_kind(depth: u32) -> BoxedStrategy<Kind> {
    let e = || Just(proto::Empty {});
    let mut arms: Vec<BoxedStrategy<Kind>> = vec![
        (s(), 0..4i32, any::<bool>(), any::<bool>(), s())
            .prop_map(
                |(cluster_id, load_balancing, sticky_session, https_redirect, answer_503)| {
                    Kind::AddCluster(proto::Cluster {
                        cluster_id,
                        load_balancing,
                        sticky_session,
                        https_redirect,
                        answer_503,
                    })
                },
            )
            .boxed(),
        s().prop_map(|cluster_id| Kind::RemoveCluster(proto::ClusterId { cluster_id }))
            .boxed(),
        s().prop_map(|cluster_id| Kind::QueryClusters(proto::ClusterFilter { cluster_id }))
            .boxed(),
        arb_http_frontend().prop_map(Kind::AddHttpFrontend).boxed(),
        arb_http_frontend().prop_map(Kind::RemoveHttpFrontend).boxed(),
        arb_http_frontend().prop_map(Kind::AddHttpsFrontend).boxed(),
        arb_http_frontend().prop_map(Kind::RemoveHttpsFrontend).boxed(),
        (s(), s())
            .prop_map(|(address, cluster_id)| Kind::AddTcpFrontend(proto::TcpFrontend { address, cluster_id }))
            .boxed(),
        (s(), s())
            .prop_map(|(address, cluster_id)| Kind::RemoveTcpFrontend(proto::TcpFrontend { address, cluster_id }))
            .boxed(),
        (s(), s())
            .prop_map(|(cluster_id, hostname)| Kind::ListFrontends(proto::FrontendFilter { cluster_id, hostname }))
            .boxed(),
        (s(), s(), s(), any::<u32>(), any::<bool>())
            .prop_map(|(cluster_id, backend_id, address, weight, backup)| {
                Kind::AddBackend(proto::Backend {
                    cluster_id,
                    backend_id,
                    address,
                    weight,
                    backup,
                })
            })
            .boxed(),
        (s(), s())
            .prop_map(|(cluster_id, backend_id)| Kind::RemoveBackend(proto::BackendId { cluster_id, backend_id }))
            .boxed(),
        arb_listener().prop_map(Kind::AddListener).boxed(),
        s().prop_map(|address| Kind::RemoveListener(proto::ListenerAddress { address }))
            .boxed(),
        s().prop_map(|address| Kind::ActivateListener(proto::ListenerAddress { address }))
            .boxed(),
        s().prop_map(|address| Kind::DeactivateListener(proto::ListenerAddress { address }))
            .boxed(),
        e().prop_map(Kind::ListListeners).boxed(),
        arb_certificate().prop_map(Kind::AddCertificate).boxed(),
        (s(), s(), proptest::option::of(arb_certificate()))
            .prop_map(|(address, old_fingerprint, new_certificate)| {
                Kind::ReplaceCertificate(proto::ReplaceCertificate {
                    address,
                    old_fingerprint,
                    new_certificate,
                })
            })
            .boxed(),
        (s(), s())
            .prop_map(|(address, fingerprint)| Kind::RemoveCertificate(proto::CertificateId { address, fingerprint }))
            .boxed(),
        (s(), s())
            .prop_map(|(address, name)| Kind::ListCertificates(proto::CertificateFilter { address, name }))
            .boxed(),
        s().prop_map(|path| Kind::SaveState(proto::StatePath { path })).boxed(),
        s().prop_map(|path| Kind::LoadState(proto::StatePath { path })).boxed(),
        e().prop_map(Kind::DumpState).boxed(),
        e().prop_map(Kind::Status).boxed(),
        e().prop_map(Kind::ListWorkers).boxed(),
        (s(), proptest::collection::vec(s(), 0..3))
            .prop_map(|(cluster_id, names)| {
                Kind::QueryMetrics(proto::MetricsQuery {
                    cluster_id,
                    names,
                    backend_id: String::new(),
                })
            })
            .boxed(),
        (any::<bool>(), s(), s(), any::<bool>())
            .prop_map(|(enabled, statsd_address, prefix, dogstatsd_tags)| {
                Kind::ConfigureMetrics(proto::MetricsConfig {
                    enabled,
                    statsd_address,
                    prefix,
                    dogstatsd_tags,
                })
            })
            .boxed(),
        s().prop_map(|filter| Kind::SetLoggingLevel(proto::LoggingLevel { filter }))
            .boxed(),
        proptest::collection::vec(s(), 0..3)
            .prop_map(|kinds| Kind::SubscribeEvents(proto::EventFilter { kinds }))
            .boxed(),
        any::<u32>()
            .prop_map(|grace_seconds| Kind::SoftStop(proto::SoftStop { grace_seconds }))
            .boxed(),
        e().prop_map(Kind::HardStop).boxed(),
        any::<u32>()
            .prop_map(|grace_seconds| Kind::UpgradeMain(proto::UpgradeMain { grace_seconds }))
            .boxed(),
        (any::<u32>(), any::<u32>())
            .prop_map(|(id, grace_seconds)| Kind::UpgradeWorker(proto::UpgradeWorker { id, grace_seconds }))
            .boxed(),
        (s(), s(), any::<u32>())
            .prop_map(|(cluster_id, path, n)| {
                Kind::SetHealthCheck(proto::HealthCheck {
                    cluster_id,
                    path,
                    interval_ms: n,
                    timeout_ms: n / 2,
                    healthy_threshold: 2,
                    unhealthy_threshold: 3,
                    expected_status: 200,
                })
            })
            .boxed(),
        s().prop_map(|cluster_id| Kind::RemoveHealthCheck(proto::ClusterId { cluster_id }))
            .boxed(),
        e().prop_map(Kind::ListHealthChecks).boxed(),
        e().prop_map(Kind::ShowPolicy).boxed(),
        e().prop_map(Kind::ReloadPolicy).boxed(),
    ];
    if depth > 0 {
        arms.push(
            proptest::collection::vec((s(), arb_kind(depth - 1)), 0..4)
                .prop_map(|items| {
                    Kind::Apply(proto::Batch {
                        requests: items
                            .into_iter()
                            .map(|(id, kind)| proto::Request { id, kind: Some(kind) })
                            .collect(),
                        base_state_hash: String::new(),
                    })
                })
                .boxed(),
        );
    }
    Union::new(arms).boxed()
}

/// One arm per request kind: keeps the strategy above honest when the schema grows.
#[test]
fn the_strategy_covers_every_request_kind() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = arb_kind(1);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20_000 {
        let kind = strategy.new_tree(&mut runner).unwrap().current();
        seen.insert(crate::request_kind_name(&proto::Request {
            id: String::new(),
            kind: Some(kind),
        }));
    }
    assert_eq!(seen.len(), 40, "kinds seen: {seen:?}");
}

proptest! {
    #[test]
    fn every_request_kind_round_trips(id in s(), kind in arb_kind(1)) {
        let request = proto::Request { id, kind: Some(kind) };
        let frame = crate::framing::encode_frame(&request);
        let mut reader = crate::framing::FrameReader::default();
        let decoded: proto::Request = reader.read_message(&mut frame.as_slice()).unwrap().unwrap();
        prop_assert_eq!(&decoded, &request);
        let json = serde_json::to_string(&request).unwrap();
        let from_json: proto::Request = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(from_json, request);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_reader(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut reader = crate::framing::FrameReader::new(64);
        let mut input = bytes.as_slice();
        for _ in 0..300 {
            match reader.read_message::<proto::Request, _>(&mut input) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
}

// ----- validation, one case per rule

fn base() -> State {
    let mut state = State::new();
    for r in [
        req(Kind::AddListener(proto::Listener {
            address: "127.0.0.1:80".into(),
            protocol: proto::Protocol::Http as i32,
            active: true,
            ..Default::default()
        })),
        req(Kind::AddListener(proto::Listener {
            address: "127.0.0.1:443".into(),
            protocol: proto::Protocol::Https as i32,
            active: true,
            ..Default::default()
        })),
        req(Kind::AddListener(proto::Listener {
            address: "127.0.0.1:5432".into(),
            protocol: proto::Protocol::Tcp as i32,
            active: true,
            ..Default::default()
        })),
        req(Kind::AddCluster(proto::Cluster {
            cluster_id: "app".into(),
            ..Default::default()
        })),
        req(Kind::AddBackend(proto::Backend {
            cluster_id: "app".into(),
            backend_id: "b1".into(),
            address: "127.0.0.1:9000".into(),
            weight: 100,
            backup: false,
        })),
        req(Kind::AddHttpFrontend(http("app", "example.com"))),
    ] {
        state.apply(&r).unwrap();
    }
    state
}

fn http(cluster: &str, host: &str) -> proto::HttpFrontend {
    proto::HttpFrontend {
        address: "127.0.0.1:80".into(),
        hostname: host.into(),
        path: Some(proto::PathRule {
            kind: proto::PathKind::Prefix as i32,
            value: "/".into(),
        }),
        method: String::new(),
        cluster_id: cluster.into(),
        tags: BTreeMap::new(),
    }
}

fn refused(state: &State, kind: Kind) -> StateError {
    let mut s = state.clone();
    let err = s.apply(&req(kind)).unwrap_err();
    assert_eq!(&s, state, "a refused request changed the state");
    err
}

#[test]
fn validation_errors_name_what_is_wrong() {
    let s = base();
    assert!(
        matches!(refused(&s, Kind::AddHttpFrontend(http("nope", "a.com"))), StateError::UnknownCluster { cluster_id } if cluster_id == "nope")
    );
    assert!(matches!(
        refused(&s, Kind::AddHttpFrontend(http("app", "example.com"))),
        StateError::DuplicateFrontend { .. }
    ));
    let mut s2 = s.clone();
    s2.apply(&req(Kind::AddCluster(proto::Cluster {
        cluster_id: "other".into(),
        ..Default::default()
    })))
    .unwrap();
    assert!(
        matches!(refused(&s2, Kind::AddHttpFrontend(http("other", "EXAMPLE.com"))), StateError::ConflictingFrontend { existing, .. } if existing == "app")
    );
    assert!(matches!(
        refused(&s, Kind::AddHttpFrontend(http("app", "bad host"))),
        StateError::InvalidHostname { .. }
    ));
    assert!(matches!(
        refused(&s, Kind::AddHttpsFrontend(http("app", "a.com"))),
        StateError::ListenerProtocolMismatch {
            expected: "HTTPS",
            actual: "HTTP",
            ..
        }
    ));
    assert!(matches!(
        refused(&s, Kind::AddBackend(proto::Backend { cluster_id: "app".into(), backend_id: "b2".into(), address: "127.0.0.1:9000".into(), weight: 1, backup: false })),
        StateError::DuplicateBackendAddress { existing, .. } if existing == "b1"
    ));
    assert!(matches!(
        refused(&s, Kind::AddBackend(proto::Backend { cluster_id: "app".into(), backend_id: "b2".into(), address: "localhost:9000".into(), weight: 1, backup: false })),
        StateError::InvalidAddress { address } if address == "localhost:9000"
    ));
    assert!(matches!(
        refused(
            &s,
            Kind::RemoveCluster(proto::ClusterId {
                cluster_id: "app".into()
            })
        ),
        StateError::ClusterInUse { frontends: 1, .. }
    ));
    assert!(matches!(
        refused(
            &s,
            Kind::RemoveListener(proto::ListenerAddress {
                address: "127.0.0.1:80".into()
            })
        ),
        StateError::ListenerInUse { references: 1, .. }
    ));
    assert!(matches!(
        refused(
            &s,
            Kind::AddListener(proto::Listener {
                address: "127.0.0.1:80".into(),
                protocol: proto::Protocol::Tcp as i32,
                ..Default::default()
            })
        ),
        StateError::ListenerProtocolChange {
            from: "HTTP",
            to: "TCP",
            ..
        }
    ));
    let mut regex = http("app", "r.com");
    regex.path = Some(proto::PathRule {
        kind: proto::PathKind::Regex as i32,
        value: "(".into(),
    });
    assert!(matches!(
        refused(&s, Kind::AddHttpFrontend(regex)),
        StateError::InvalidPath { .. }
    ));
    assert!(matches!(
        refused(&s, Kind::Status(proto::Empty {})),
        StateError::NotAStateChange { kind: "status" }
    ));
    assert!(matches!(
        s.clone().apply(&proto::Request::default()),
        Err(StateError::EmptyRequest)
    ));
    let tcp = proto::TcpFrontend {
        address: "127.0.0.1:5432".into(),
        cluster_id: "app".into(),
    };
    let mut s3 = s.clone();
    s3.apply(&req(Kind::AddTcpFrontend(tcp.clone()))).unwrap();
    assert!(matches!(
        refused(&s3, Kind::AddTcpFrontend(tcp)),
        StateError::TcpListenerTaken { .. }
    ));
    let mut bad_cert = cert("127.0.0.1:443", 1);
    bad_cert.key = "not a key".into();
    assert!(matches!(
        refused(&s, Kind::AddCertificate(bad_cert)),
        StateError::InvalidCertificate { .. }
    ));
    let err = refused(&s, Kind::RemoveHttpFrontend(http("intruder", "example.com")));
    assert!(matches!(err, StateError::FrontendOwnedByOther { owner, .. } if owner == "app"));
}

#[test]
fn cluster_removal_takes_its_backends() {
    let mut s = base();
    s.apply(&req(Kind::RemoveHttpFrontend(http("app", "example.com"))))
        .unwrap();
    s.apply(&req(Kind::RemoveCluster(proto::ClusterId {
        cluster_id: "app".into(),
    })))
    .unwrap();
    assert_eq!(s.backend_count(), 0);
    // The freed address can be reused by a new cluster's backend.
    s.apply(&req(Kind::AddCluster(proto::Cluster {
        cluster_id: "app".into(),
        ..Default::default()
    })))
    .unwrap();
    s.apply(&req(Kind::AddBackend(proto::Backend {
        cluster_id: "app".into(),
        backend_id: "x".into(),
        address: "127.0.0.1:9000".into(),
        weight: 1,
        backup: false,
    })))
    .unwrap();
}

#[test]
fn replace_certificate_is_atomic() {
    let mut s = base();
    let old = cert("127.0.0.1:443", 1);
    let old_fp = certificate_fingerprint(&old.certificate).unwrap();
    s.apply(&req(Kind::AddCertificate(old))).unwrap();
    let before = s.clone();
    let mut broken = cert("127.0.0.1:443", 2);
    broken.key = String::new();
    let err = s
        .apply(&req(Kind::ReplaceCertificate(proto::ReplaceCertificate {
            address: "127.0.0.1:443".into(),
            old_fingerprint: old_fp.clone(),
            new_certificate: Some(broken),
        })))
        .unwrap_err();
    assert!(matches!(err, StateError::InvalidCertificate { .. }), "{err}");
    assert_eq!(s, before);
    s.apply(&req(Kind::ReplaceCertificate(proto::ReplaceCertificate {
        address: "127.0.0.1:443".into(),
        old_fingerprint: old_fp,
        new_certificate: Some(cert("", 2)),
    })))
    .unwrap();
    assert_eq!(s.certificate_count(), 1);
    assert_ne!(s.hash(), before.hash());
}

#[test]
fn loading_a_corrupt_save_names_the_line() {
    let mut saved = Vec::new();
    base().save(&mut saved).unwrap();
    let mut text = String::from_utf8(saved).unwrap();
    text.push_str("{\"id\":\"\",\"kind\":{\"remove_cluster\":{\"cluster_id\":\"ghost\"}}}\n");
    let err = State::load(text.as_bytes()).unwrap_err();
    assert!(matches!(err, LoadError::Invalid { line: 7, .. }), "{err}");
    let err = State::load("{not json\n".as_bytes()).unwrap_err();
    assert!(matches!(err, LoadError::Json { line: 1, .. }), "{err}");
    let err = State::load("{\"id\":\"\",\"bogus\":1}\n".as_bytes()).unwrap_err();
    assert!(matches!(err, LoadError::Json { line: 1, .. }), "unknown field: {err}");
}

#[test]
fn hash_is_canonical_whatever_the_insertion_order() {
    let a = base();
    let mut requests = a.to_requests();
    // Clusters and listeners first, everything else reversed: same state, same hash.
    let tail = requests.split_off(4);
    requests.extend(tail.into_iter().rev());
    let mut b = State::new();
    for r in &requests {
        b.apply(r).unwrap();
    }
    assert_eq!(a.hash(), b.hash());
    assert_eq!(a, b);
}

/// The generated states must reach every collection, or the diff property proves little.
#[test]
fn the_state_strategy_reaches_every_collection() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = arb_state();
    let (mut http, mut https, mut tcp, mut certs, mut backends) = (0, 0, 0, 0, 0);
    let mut defaults = 0;
    for _ in 0..300 {
        let s = strategy.new_tree(&mut runner).unwrap().current();
        http += s.http_frontends().count();
        https += s.https_frontends().count();
        tcp += s.tcp_frontends().count();
        certs += s.certificate_count();
        backends += s.backend_count();
        defaults += s
            .listeners()
            .values()
            .filter(|l| !l.default_certificate.is_empty())
            .count();
    }
    for (name, n) in [
        ("http", http),
        ("https", https),
        ("tcp", tcp),
        ("certificates", certs),
        ("backends", backends),
        ("default certificates", defaults),
    ] {
        assert!(n >= 20, "only {n} {name} over 300 generated states");
    }
}

#[test]
fn diff_is_minimal_for_small_changes() {
    let a = base();
    let mut b = a.clone();
    b.apply(&req(Kind::AddHttpFrontend(http("app", "new.example.com"))))
        .unwrap();
    b.apply(&req(Kind::AddBackend(proto::Backend {
        cluster_id: "app".into(),
        backend_id: "b1".into(),
        address: "127.0.0.1:9000".into(),
        weight: 5,
        backup: false,
    })))
    .unwrap();
    let diff = a.diff(&b);
    let kinds: Vec<_> = diff.iter().map(crate::request_kind_name).collect();
    assert_eq!(kinds, vec!["add_backend", "add_http_frontend"]);
    let back: Vec<_> = b.diff(&a).iter().map(crate::request_kind_name).collect();
    assert_eq!(back, vec!["remove_http_frontend", "add_backend"]);
}

/// The supervisor's state under key isolation: the keys move out, each once, and nothing else
/// changes: not the hash, not the diff against a state that still holds them.
#[test]
fn keys_taken_out_leave_the_same_state() {
    let mut s = base();
    s.apply(&req(Kind::AddListener(proto::Listener {
        address: "127.0.0.1:8443".into(),
        protocol: proto::Protocol::Https as i32,
        active: true,
        ..Default::default()
    })))
    .unwrap();
    s.apply(&req(Kind::AddCertificate(cert("127.0.0.1:443", 1)))).unwrap();
    s.apply(&req(Kind::AddCertificate(cert("127.0.0.1:8443", 1)))).unwrap();
    s.apply(&req(Kind::AddCertificate(cert("127.0.0.1:443", 2)))).unwrap();
    let with_keys = s.clone();
    let keys = s.take_keys();
    let fingerprints: Vec<&str> = keys.iter().map(|(fp, _)| fp.as_str()).collect();
    assert_eq!(
        keys.len(),
        2,
        "one key per certificate, not per listener: {fingerprints:?}"
    );
    for (fp, key) in &keys {
        let original = with_keys.certificates().find(|(f, _)| f == fp).unwrap().1;
        assert_eq!(key, &original.key);
    }
    assert!(s.keys_elsewhere());
    assert!(s.certificates().all(|(_, c)| c.key.is_empty()));
    assert_eq!(s.hash(), with_keys.hash(), "private keys are not part of the hash");
    assert!(s.diff(&with_keys).is_empty(), "{:?}", s.diff(&with_keys));
    assert!(with_keys.diff(&s).is_empty());
    // A certificate without its key is still accepted once keys live elsewhere.
    let mut keyless = cert("127.0.0.1:443", 3);
    keyless.key = String::new();
    s.apply(&req(Kind::AddCertificate(keyless.clone()))).unwrap();
    assert!(with_keys.clone().apply(&req(Kind::AddCertificate(keyless))).is_err());
}

/// The hash is written from references; it must equal the hash of `to_requests()` encoded one by
/// one (the definition), for every kind of item, keys left out.
#[test]
fn hash_matches_the_encoded_requests() {
    let mut s = base();
    s.apply(&req(Kind::AddCertificate(cert("127.0.0.1:443", 1)))).unwrap();
    s.apply(&req(Kind::AddHttpsFrontend(proto::HttpFrontend {
        address: "127.0.0.1:443".into(),
        hostname: "a.com".into(),
        cluster_id: "app".into(),
        ..Default::default()
    })))
    .unwrap();
    s.apply(&req(Kind::AddTcpFrontend(proto::TcpFrontend {
        address: "127.0.0.1:5432".into(),
        cluster_id: "app".into(),
    })))
    .unwrap();
    let kinds: std::collections::BTreeSet<&str> = s.to_requests().iter().map(|r| crate::request_kind_name(r)).collect();
    assert!(kinds.len() >= 7, "every kind of item is in the state: {kinds:?}");
    let mut reference = Sha256::new();
    reference.update(b"rampart-state-v1\0");
    for mut r in s.to_requests() {
        if let Some(Kind::AddCertificate(c)) = &mut r.kind {
            c.key.clear();
        }
        reference.update(r.encode_length_delimited_to_vec());
    }
    let reference: [u8; 32] = reference.finalize().into();
    assert_eq!(s.hash(), reference);
}

#[test]
fn a_listener_is_updated_in_place_and_never_reset_by_add() {
    let mut s = base();
    let address = "127.0.0.1:80";
    let before = s.listeners().get(address).unwrap().clone();
    let update = |fields: &[&str], l: proto::Listener| {
        req(Kind::UpdateListener(proto::ListenerUpdate {
            address: address.into(),
            listener: Some(l),
            fields: fields.iter().map(|f| f.to_string()).collect(),
        }))
    };
    let change = s
        .apply(&update(
            &["request_timeout_ms", "answers.404"],
            proto::Listener {
                request_timeout_ms: 2500,
                client_idle_timeout_ms: 1,
                answers: [("404".to_string(), "nothing here".to_string())].into(),
                ..Default::default()
            },
        ))
        .unwrap();
    assert!(matches!(change, Change::Updated(_)), "{change:?}");
    let after = s.listeners().get(address).unwrap();
    assert_eq!(after.request_timeout_ms, 2500);
    assert_eq!(
        after.client_idle_timeout_ms, before.client_idle_timeout_ms,
        "fields not named keep their value"
    );
    assert_eq!(after.answers.get("404").map(String::as_str), Some("nothing here"));
    assert_eq!(after.protocol, before.protocol);
    // Removing one answer leaves the others.
    s.apply(&update(&["answers.404"], proto::Listener::default())).unwrap();
    assert!(!s.listeners().get(address).unwrap().answers.contains_key("404"));
    // Unknown fields and invalid values are refused and change nothing.
    let snapshot = s.clone();
    let err = s.apply(&update(&["protocol"], proto::Listener::default())).unwrap_err();
    assert!(err.to_string().contains("changeable fields"), "{err}");
    let err = s
        .apply(&update(
            &["tls_min_version"],
            proto::Listener {
                tls_min_version: "1.3".into(),
                ..Default::default()
            },
        ))
        .unwrap_err();
    assert!(err.to_string().contains("only HTTPS listeners"), "{err}");
    assert_eq!(s, snapshot);
    // Adding a listener that exists with other settings is refused; the same settings are a no-op.
    let current = s.listeners().get(address).unwrap().clone();
    let err = s
        .apply(&req(Kind::AddListener(proto::Listener {
            request_timeout_ms: 1,
            ..current.clone()
        })))
        .unwrap_err();
    assert!(matches!(err, StateError::ListenerExists { .. }), "{err}");
    assert!(matches!(
        s.apply(&req(Kind::AddListener(current))).unwrap(),
        Change::Unchanged(_)
    ));
}

#[test]
fn the_diff_updates_a_changed_listener_in_place() {
    let a = base();
    let mut b = a.clone();
    let address = "127.0.0.1:80";
    let mut l = b.listeners().get(address).unwrap().clone();
    l.backend_connect_timeout_ms = 700;
    l.active = !l.active;
    b.listeners.insert(address.into(), l);
    let diff = a.diff(&b);
    let kinds: Vec<_> = diff.iter().map(crate::request_kind_name).collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert_eq!(kinds[0], "update_listener");
    assert!(kinds[1].ends_with("activate_listener"), "{kinds:?}");
    match &diff[0].kind {
        Some(Kind::UpdateListener(u)) => assert_eq!(u.fields, vec!["backend_connect_timeout_ms".to_string()]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn settings_nothing_enforces_are_refused_by_name() {
    let mut s = base();
    for (field, listener) in [
        (
            "expect_proxy_protocol",
            proto::Listener {
                address: "127.0.0.1:7001".into(),
                expect_proxy_protocol: true,
                ..Default::default()
            },
        ),
        (
            "send_proxy_protocol",
            proto::Listener {
                address: "127.0.0.1:7002".into(),
                send_proxy_protocol: true,
                ..Default::default()
            },
        ),
    ] {
        let err = s.apply(&req(Kind::AddListener(listener))).unwrap_err();
        assert!(
            matches!(err, StateError::NotSupported { what, .. } if what == field),
            "{err}"
        );
        assert!(err.to_string().contains("not supported"), "{err}");
    }
    let err = s
        .apply(&req(Kind::SetHealthCheck(proto::HealthCheck {
            cluster_id: "app".into(),
            path: "/health".into(),
            interval_ms: 1000,
            timeout_ms: 100,
            ..Default::default()
        })))
        .unwrap_err();
    assert!(
        err.to_string().contains("active health checks is not supported"),
        "{err}"
    );
}

const SAN_PEM: &str = include_str!("testdata/san.pem");
const CN_ONLY_PEM: &str = include_str!("testdata/cn-only.pem");
const IP_ONLY_PEM: &str = include_str!("testdata/ip-only.pem");

fn keyless_certificate(pem: &str, names: &[&str]) -> proto::Certificate {
    proto::Certificate {
        address: "127.0.0.1:443".into(),
        certificate: pem.into(),
        chain: vec![],
        key: String::new(),
        names: names.iter().map(|n| n.to_string()).collect(),
    }
}

/// A certificate added without names serves the DNS names of its subjectAltName (lower-cased,
/// each once, IP addresses left out), or its subject's common name when it has no
/// subjectAltName; the names are in the state itself, so its dump and hash carry them.
#[test]
fn a_certificate_without_names_is_named_by_itself() {
    assert_eq!(
        certificate_names(SAN_PEM).unwrap(),
        vec!["shop.example", "*.shop.example"],
        "the common name is ignored when there is a subjectAltName"
    );
    assert_eq!(certificate_names(CN_ONLY_PEM).unwrap(), vec!["legacy.example"]);
    let err = certificate_names(IP_ONLY_PEM).unwrap_err();
    assert!(matches!(err, StateError::CertificateWithoutNames { .. }), "{err}");
    assert!(err.to_string().contains("only an IP address"), "{err}");
    assert!(err.to_string().contains("--name"), "{err}");

    let mut state = base();
    state.keys_elsewhere = true;
    state
        .apply(&req(Kind::AddCertificate(keyless_certificate(SAN_PEM, &[]))))
        .unwrap();
    let (_, stored) = state.certificates().next().unwrap();
    assert_eq!(stored.names, vec!["shop.example", "*.shop.example"]);
    // Given names win over the certificate's.
    state
        .apply(&req(Kind::AddCertificate(keyless_certificate(
            CN_ONLY_PEM,
            &["Other.Example"],
        ))))
        .unwrap();
    let names: Vec<Vec<String>> = state.certificates().map(|(_, c)| c.names.clone()).collect();
    assert!(names.contains(&vec!["other.example".to_string()]), "{names:?}");
    // The same request applied elsewhere (a worker) names it the same: same hash.
    let mut other = base();
    other.keys_elsewhere = true;
    for (_, c) in state.certificates() {
        let names = if c.certificate == SAN_PEM {
            Vec::new()
        } else {
            c.names.clone()
        };
        let request = proto::Certificate { names, ..c.clone() };
        other.apply(&req(Kind::AddCertificate(request))).unwrap();
    }
    assert_eq!(other.hash(), state.hash());
    let err = refused(&state, Kind::AddCertificate(keyless_certificate(IP_ONLY_PEM, &[])));
    assert!(matches!(err, StateError::CertificateWithoutNames { .. }), "{err}");
    let garbage = pem("CERTIFICATE", &[0x30, 0x03, 1, 2, 3]);
    let err = refused(&state, Kind::AddCertificate(keyless_certificate(&garbage, &[])));
    assert!(err.to_string().contains("not valid X.509"), "{err}");
}

#[test]
fn wildcards_cover_the_names_under_them() {
    assert!(name_covers("a.example", "A.Example."));
    assert!(name_covers("*.example", "a.example"));
    assert!(name_covers("*.example", "a.b.example"));
    assert!(!name_covers("*.example", "example"));
    assert!(!name_covers("*.example", ".example"));
    assert!(!name_covers("*.example", "aexample"));
    assert!(!name_covers("a.example", "b.example"));
    assert!(name_covers("*.example", "*.example"));
}

/// The HTTPS listener of `base()` with these two settings changed.
fn https_listener(default_certificate: &str, strict_sni: bool) -> Kind {
    Kind::UpdateListener(proto::ListenerUpdate {
        address: "127.0.0.1:443".into(),
        listener: Some(proto::Listener {
            default_certificate: default_certificate.into(),
            strict_sni,
            ..Default::default()
        }),
        fields: vec!["default_certificate".into(), "strict_sni".into()],
    })
}

fn named_cert(variant: u8, names: &[&str]) -> proto::Certificate {
    proto::Certificate {
        names: names.iter().map(|n| n.to_string()).collect(),
        ..cert("127.0.0.1:443", variant)
    }
}

/// A listener's default certificate names one of its certificates, by fingerprint or by a name
/// it serves; that certificate cannot be removed while it is the default, and replacing it keeps
/// the default (a fingerprint moves to the new certificate).
#[test]
fn a_default_certificate_is_one_of_the_listener_and_stays_one() {
    let mut s = base();
    let a = named_cert(1, &["a.com"]);
    let fp_a = certificate_fingerprint(&a.certificate).unwrap();
    let err = refused(&s, https_listener(&fp_a, false));
    assert!(
        matches!(&err, StateError::UnknownDefaultCertificate { reference, .. } if *reference == fp_a),
        "{err}"
    );
    assert!(err.to_string().contains("add the certificate first"), "{err}");
    s.apply(&req(Kind::AddCertificate(a))).unwrap();
    s.apply(&req(https_listener(&fp_a.to_ascii_uppercase(), false)))
        .unwrap();
    assert_eq!(
        s.listeners()["127.0.0.1:443"].default_certificate,
        fp_a,
        "stored canonical"
    );
    let remove_a = Kind::RemoveCertificate(proto::CertificateId {
        address: "127.0.0.1:443".into(),
        fingerprint: fp_a.clone(),
    });
    let err = refused(&s, remove_a.clone());
    assert!(matches!(err, StateError::DefaultCertificateInUse { .. }), "{err}");
    assert!(err.to_string().contains("set another default_certificate"), "{err}");

    // Replaced: the default follows the fingerprint to the new certificate.
    let b = named_cert(2, &["a.com"]);
    let fp_b = certificate_fingerprint(&b.certificate).unwrap();
    s.apply(&req(Kind::ReplaceCertificate(proto::ReplaceCertificate {
        address: "127.0.0.1:443".into(),
        old_fingerprint: fp_a.clone(),
        new_certificate: Some(b),
    })))
    .unwrap();
    assert_eq!(s.listeners()["127.0.0.1:443"].default_certificate, fp_b);
    assert_eq!(s.resolve_default("127.0.0.1:443", &fp_b), Some(fp_b.as_str()));

    // By name: any certificate serving the name keeps it; the last one cannot go.
    s.apply(&req(Kind::AddCertificate(named_cert(3, &["*.com"])))).unwrap();
    s.apply(&req(https_listener("A.Com", false))).unwrap();
    assert_eq!(
        s.resolve_default("127.0.0.1:443", "a.com"),
        Some(fp_b.as_str()),
        "exact before wildcard"
    );
    s.apply(&req(Kind::RemoveCertificate(proto::CertificateId {
        address: "127.0.0.1:443".into(),
        fingerprint: fp_b.clone(),
    })))
    .unwrap();
    let fp_w = certificate_fingerprint(&cert("127.0.0.1:443", 3).certificate).unwrap();
    assert_eq!(
        s.resolve_default("127.0.0.1:443", "a.com"),
        Some(fp_w.as_str()),
        "the wildcard serves it now"
    );
    let err = refused(
        &s,
        Kind::RemoveCertificate(proto::CertificateId {
            address: "127.0.0.1:443".into(),
            fingerprint: fp_w.clone(),
        }),
    );
    assert!(matches!(err, StateError::DefaultCertificateInUse { .. }), "{err}");
    // A replacement that does not serve the name is refused whole.
    let err = refused(
        &s,
        Kind::ReplaceCertificate(proto::ReplaceCertificate {
            address: "127.0.0.1:443".into(),
            old_fingerprint: fp_w.clone(),
            new_certificate: Some(named_cert(4, &["b.org"])),
        }),
    );
    assert!(matches!(err, StateError::UnknownDefaultCertificate { .. }), "{err}");

    // A dump rebuilds it: the listener's default is set after its certificates.
    let mut saved = Vec::new();
    s.save(&mut saved).unwrap();
    let loaded = State::load(saved.as_slice()).unwrap();
    assert_eq!(loaded, s);
    assert_eq!(loaded.hash(), s.hash());
    // And a diff to a state without it clears the default before removing the certificate.
    let mut without = base();
    without.apply(&req(https_listener("", false))).unwrap();
    let mut t = s.clone();
    for r in s.diff(&without) {
        t.apply(&r).unwrap();
    }
    assert_eq!(t, without);
}

#[test]
fn tls_listener_settings_are_checked() {
    let s = base();
    let cases = [
        (https_listener("a.com", true), "default_certificate", "strict_sni"),
        (
            https_listener("not a name", false),
            "default_certificate",
            "fingerprint",
        ),
        (
            Kind::AddListener(proto::Listener {
                address: "127.0.0.1:80".into(),
                protocol: proto::Protocol::Http as i32,
                strict_sni: true,
                ..Default::default()
            }),
            "strict_sni",
            "only HTTPS",
        ),
        (
            Kind::AddListener(proto::Listener {
                address: "127.0.0.1:80".into(),
                protocol: proto::Protocol::Http as i32,
                default_certificate: "a.com".into(),
                ..Default::default()
            }),
            "default_certificate",
            "only HTTPS",
        ),
        (
            Kind::AddListener(proto::Listener {
                address: "127.0.0.1:5432".into(),
                protocol: proto::Protocol::Tcp as i32,
                tls_handshake_timeout_ms: 1000,
                ..Default::default()
            }),
            "tls_handshake_timeout_ms",
            "only HTTPS",
        ),
        (
            Kind::AddListener(proto::Listener {
                address: "127.0.0.1:443".into(),
                protocol: proto::Protocol::Https as i32,
                tls_handshake_timeout_ms: MAX_TLS_HANDSHAKE_TIMEOUT_MS + 1,
                ..Default::default()
            }),
            "tls_handshake_timeout_ms",
            "use 1 to",
        ),
    ];
    for (kind, field, reason) in cases {
        let err = refused(&s, kind);
        assert!(
            matches!(&err, StateError::InvalidValue { field: f, .. } if *f == field),
            "{field}: {err}"
        );
        assert!(err.to_string().contains(reason), "{err}");
    }
    let mut ok = s.clone();
    ok.apply(&req(https_listener("", true))).unwrap();
    assert!(ok.listeners()["127.0.0.1:443"].strict_sni);
}
