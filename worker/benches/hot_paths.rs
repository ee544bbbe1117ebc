//! The worker's hot paths: one HTTP/1.1 request parsed, checked, edited and written as it goes
//! to a backend; routing a request among 10,000 frontends; and what a frontend change costs the
//! router at 100,000 frontends (a rebuild against one hostname's update); and what counting a
//! finished request into its metric series costs.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use criterion::{Criterion, criterion_group, criterion_main};
use rampart_command::proto::{self, request::Kind};
use rampart_command::state::State;
use rampart_worker::h1::RequestPath;
use rampart_worker::router::Router;

const LISTENER: &str = "127.0.0.1:8080";

fn apply(state: &mut State, kind: Kind) {
    state
        .apply(&proto::Request {
            id: String::new(),
            kind: Some(kind),
        })
        .expect("a valid benchmark state");
}

/// `clusters` clusters of `per_cluster` frontends: exact hostnames with two paths each, and one
/// wildcard per cluster.
fn state_with(clusters: usize, per_cluster: usize) -> State {
    let mut state = State::new();
    apply(
        &mut state,
        Kind::AddListener(proto::Listener {
            address: LISTENER.into(),
            protocol: proto::Protocol::Http as i32,
            active: true,
            ..Default::default()
        }),
    );
    for c in 0..clusters {
        apply(
            &mut state,
            Kind::AddCluster(proto::Cluster {
                cluster_id: format!("c{c}"),
                ..Default::default()
            }),
        );
        for i in 0..per_cluster {
            let (hostname, path) = match i {
                0 => (format!("*.site{c}.example"), "/"),
                i if i % 2 == 1 => (format!("h{i}.site{c}.example"), "/"),
                i => (format!("h{}.site{c}.example", i - 1), "/api"),
            };
            apply(
                &mut state,
                Kind::AddHttpFrontend(proto::HttpFrontend {
                    address: LISTENER.into(),
                    hostname,
                    path: Some(proto::PathRule {
                        kind: proto::PathKind::Prefix as i32,
                        value: path.into(),
                    }),
                    method: String::new(),
                    cluster_id: format!("c{c}"),
                    tags: Default::default(),
                }),
            );
        }
    }
    state
}

fn bench_request(c: &mut Criterion) {
    let request = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: h3.site7.example\r\nUser-Agent: bench/1.0\r\n\
Accept: application/json\r\nAccept-Encoding: gzip, br\r\nCookie: session=abc123; theme=dark\r\n\
X-Forwarded-For: 198.51.100.4\r\nConnection: keep-alive\r\n\r\n";
    let mut path = RequestPath::default();
    let mut out = Vec::with_capacity(4096);
    assert!(path.run(request, &mut out).is_some(), "the benchmark request must pass");
    c.bench_function("http1_request_parse_edit_write", |b| {
        b.iter(|| path.run(std::hint::black_box(request), &mut out))
    });
}

fn bench_routing(c: &mut Criterion) {
    let state = state_with(1_000, 10);
    assert_eq!(state.frontend_count(), 10_000);
    let router = Router::from_state(&state);
    let hosts: Vec<String> = (0..1_000)
        .map(|i| match i % 3 {
            0 => format!("h{}.site{}.example", 2 * (i % 5) + 1, (i * 7) % 1_000),
            1 => format!("www.site{}.example", (i * 13) % 1_000),
            _ => format!("unknown{i}.example"),
        })
        .collect();
    assert!(router.route(LISTENER, hosts[0].as_bytes(), b"/api/x", b"GET").is_some());
    let mut i = 0;
    c.bench_function("route_among_10k_frontends", |b| {
        b.iter(|| {
            i = (i + 1) % hosts.len();
            router.route(LISTENER, std::hint::black_box(hosts[i].as_bytes()), b"/api/x", b"GET")
        })
    });
}

fn bench_router_updates(c: &mut Criterion) {
    let mut state = state_with(10_000, 10);
    assert_eq!(state.frontend_count(), 100_000);
    let mut router = Router::from_state(&state);
    let mut group = c.benchmark_group("router_100k_frontends");
    group.sample_size(10);
    group.bench_function("rebuild", |b| b.iter(|| Router::from_state(&state)));
    let frontend = proto::HttpFrontend {
        address: LISTENER.into(),
        hostname: "new.site1.example".into(),
        path: Some(proto::PathRule {
            kind: proto::PathKind::Prefix as i32,
            value: "/".into(),
        }),
        method: String::new(),
        cluster_id: "c1".into(),
        tags: Default::default(),
    };
    apply(&mut state, Kind::AddHttpFrontend(frontend));
    group.bench_function("update_one_host", |b| {
        b.iter(|| router.update_host(&state, LISTENER, "new.site1.example"))
    });
    group.finish();
}

/// What metrics cost a request: one record counted into its listener, cluster and backend
/// series (three histograms each), among 100 clusters.
fn bench_record(c: &mut Criterion) {
    use rampart_worker::record::{Carrier, Records, RequestRecord};
    use std::time::{Duration, Instant};
    let mut records = Records::new(4096);
    let clusters: Vec<String> = (0..100).map(|i| format!("cluster-{i}")).collect();
    let now = Instant::now();
    let mut i = 0usize;
    c.bench_function("record_finish_into_series", |b| {
        b.iter(|| {
            i = (i + 1) % clusters.len();
            records.finish(&RequestRecord {
                carrier: Carrier::Http1,
                listener: LISTENER,
                cluster: Some(&clusters[i]),
                backend: Some("127.0.0.1:9000"),
                status: 200,
                began: now,
                finished: now + Duration::from_micros(180),
                bytes_in: 80,
                bytes_out: 200,
                failure: None,
                connect_time: None,
                first_byte_time: Some(Duration::from_micros(150)),
            })
        })
    });
}

criterion_group!(
    benches,
    bench_request,
    bench_routing,
    bench_router_updates,
    bench_record
);
criterion_main!(benches);
