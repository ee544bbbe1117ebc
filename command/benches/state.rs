//! State at scale: loading, applying and diffing 100,000 frontends.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use rampart_command::proto::{self, request::Kind};
use rampart_command::state::State;

fn request(kind: Kind) -> proto::Request {
    proto::Request {
        id: String::new(),
        kind: Some(kind),
    }
}

/// A state with `n` frontends spread over n/10 clusters, each with two backends.
fn large_state_requests(n: usize) -> Vec<proto::Request> {
    let mut out = vec![request(Kind::AddListener(proto::Listener {
        address: "0.0.0.0:80".into(),
        protocol: proto::Protocol::Http as i32,
        active: true,
        ..Default::default()
    }))];
    let clusters = n / 10;
    for c in 0..clusters {
        let cluster_id = format!("c{c}");
        out.push(request(Kind::AddCluster(proto::Cluster {
            cluster_id: cluster_id.clone(),
            ..Default::default()
        })));
        for b in 0..2 {
            out.push(request(Kind::AddBackend(proto::Backend {
                cluster_id: cluster_id.clone(),
                backend_id: format!("b{b}"),
                address: format!("10.{}.{}.{}:8080", (c >> 16) & 255, (c >> 8) & 255, (c & 255))
                    .replace(":8080", &format!(":{}", 8000 + b)),
                weight: 100,
                backup: false,
            })));
        }
    }
    for f in 0..n {
        out.push(request(Kind::AddHttpFrontend(proto::HttpFrontend {
            address: "0.0.0.0:80".into(),
            hostname: format!("site{f}.example.com"),
            path: Some(proto::PathRule {
                kind: proto::PathKind::Prefix as i32,
                value: "/".into(),
            }),
            method: String::new(),
            cluster_id: format!("c{}", f % clusters.max(1)),
            tags: Default::default(),
        })));
    }
    out
}

fn build(requests: &[proto::Request]) -> State {
    let mut state = State::new();
    for r in requests {
        state.apply(r).expect("valid request");
    }
    state
}

fn bench_state(c: &mut Criterion) {
    let requests = large_state_requests(100_000);
    let mut group = c.benchmark_group("state_100k_frontends");
    group.sample_size(10);
    group.bench_function("apply_all", |b| b.iter(|| build(&requests)));

    let state = build(&requests);
    let mut saved = Vec::new();
    state.save(&mut saved).expect("save");
    group.bench_function("load_json_lines", |b| {
        b.iter(|| State::load(saved.as_slice()).expect("load"))
    });

    // The target differs by 1% of its frontends.
    let mut changed = requests.clone();
    for r in changed.iter_mut().rev().take(1_000) {
        if let Some(Kind::AddHttpFrontend(f)) = &mut r.kind {
            f.hostname = format!("moved-{}", f.hostname);
        }
    }
    let target = build(&changed);
    group.bench_function("diff_1pct", |b| b.iter(|| state.diff(&target)));
    group.bench_function("hash", |b| b.iter(|| state.hash()));
    group.finish();
}

criterion_group!(benches, bench_state);
criterion_main!(benches);
