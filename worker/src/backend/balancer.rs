//! Load balancing and passive health: which backend of a cluster gets the next connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rampart_command::proto;
use rampart_command::state::State;

/// A small, fast generator (xorshift64*), seeded from the kernel.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer.
        unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        Rng(u64::from_ne_bytes(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// Runtime facts about one backend.
#[derive(Debug, Clone)]
pub struct BackendSlot {
    pub id: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub active: u32,
    failures: u32,
    ejected_until: Option<Instant>,
    /// Smooth weighted round robin's running weight.
    current: i64,
}

impl BackendSlot {
    fn available(&self, now: Instant) -> bool {
        self.weight > 0 && self.ejected_until.is_none_or(|t| now >= t)
    }
}

#[derive(Debug)]
pub struct ClusterBalancer {
    pub algorithm: proto::LoadBalancing,
    pub sticky: bool,
    pub https_redirect: bool,
    pub answer_503: String,
    pub backends: Vec<BackendSlot>,
}

/// Longest ejection after repeated failures.
const MAX_EJECTION: Duration = Duration::from_secs(60);

impl ClusterBalancer {
    /// Picks a backend: a sticky one when asked for and usable, else by the algorithm among
    /// available primaries, else among available backups. `exclude` lists the ids of backends
    /// already tried for this request. Backends are named by id, never by position: a runtime
    /// change reorders the list between a pick and what follows it.
    pub fn pick(
        &mut self,
        rng: &mut Rng,
        now: Instant,
        sticky: Option<&[u8]>,
        exclude: &[String],
    ) -> Option<&BackendSlot> {
        let excluded = |b: &BackendSlot| exclude.contains(&b.id);
        if let Some(id) = sticky
            && let Some(i) = self
                .backends
                .iter()
                .position(|b| b.id.as_bytes() == id && b.available(now) && !excluded(b))
        {
            return self.backends.get(i);
        }
        for backup in [false, true] {
            // Positions are only used within this call, on a list nothing changes meanwhile.
            let candidates: Vec<usize> = self
                .backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.backup == backup && b.available(now) && !excluded(b))
                .map(|(i, _)| i)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let chosen = self.choose(rng, &candidates);
            return self.backends.get(chosen);
        }
        None
    }

    fn weighted_random(&self, rng: &mut Rng, candidates: &[usize]) -> usize {
        let total: u64 = candidates
            .iter()
            .filter_map(|i| self.backends.get(*i))
            .map(|b| u64::from(b.weight))
            .sum();
        let mut point = rng.below(total);
        for i in candidates {
            let w = self.backends.get(*i).map_or(0, |b| u64::from(b.weight));
            if point < w {
                return *i;
            }
            point -= w;
        }
        candidates.first().copied().unwrap_or(0)
    }

    fn load(&self, i: usize) -> u64 {
        // Active connections per unit of weight, scaled to stay in integers.
        self.backends.get(i).map_or(u64::MAX, |b| {
            (u64::from(b.active) + 1) * 1_000_000 / u64::from(b.weight.max(1))
        })
    }

    fn choose(&mut self, rng: &mut Rng, candidates: &[usize]) -> usize {
        let first = candidates.first().copied().unwrap_or(0);
        match self.algorithm {
            proto::LoadBalancing::RoundRobin => {
                // Smooth weighted round robin: every candidate gains its weight, the richest is
                // picked and pays the total.
                let total: i64 = candidates
                    .iter()
                    .filter_map(|i| self.backends.get(*i))
                    .map(|b| i64::from(b.weight))
                    .sum();
                let mut best = first;
                let mut best_current = i64::MIN;
                for i in candidates {
                    if let Some(b) = self.backends.get_mut(*i) {
                        b.current += i64::from(b.weight);
                        if b.current > best_current {
                            best_current = b.current;
                            best = *i;
                        }
                    }
                }
                if let Some(b) = self.backends.get_mut(best) {
                    b.current -= total;
                }
                best
            }
            proto::LoadBalancing::Random => self.weighted_random(rng, candidates),
            proto::LoadBalancing::LeastConnections => candidates
                .iter()
                .copied()
                .min_by_key(|i| self.load(*i))
                .unwrap_or(first),
            proto::LoadBalancing::PowerOfTwo => {
                let a = self.weighted_random(rng, candidates);
                let b = self.weighted_random(rng, candidates);
                if self.load(a) <= self.load(b) { a } else { b }
            }
        }
    }

    /// A connection to backend `id` failed: eject it with exponential backoff.
    pub fn failed(&mut self, id: &str, now: Instant) {
        if let Some(b) = self.backends.iter_mut().find(|b| b.id == id) {
            b.failures = b.failures.saturating_add(1);
            let backoff = Duration::from_millis(500).saturating_mul(1 << b.failures.min(7).saturating_sub(1));
            b.ejected_until = Some(now + backoff.min(MAX_EJECTION));
        }
    }

    /// A connection to backend `id` succeeded.
    pub fn succeeded(&mut self, id: &str) {
        if let Some(b) = self.backends.iter_mut().find(|b| b.id == id) {
            b.failures = 0;
            b.ejected_until = None;
        }
    }

    /// Whether backend `id` is out of rotation (ejected and not yet due back) at `now`.
    pub fn is_ejected(&self, id: &str, now: Instant) -> bool {
        self.backends
            .iter()
            .any(|b| b.id == id && b.ejected_until.is_some_and(|t| now < t))
    }
}

/// Every cluster's balancer.
#[derive(Debug, Default)]
pub struct Balancers {
    pub clusters: HashMap<String, ClusterBalancer>,
}

impl Balancers {
    /// Rebuilds from the state, keeping the runtime facts of backends that are still there.
    pub fn update(&mut self, state: &State) {
        let mut next = HashMap::new();
        for (id, cluster) in state.clusters() {
            let old = self.clusters.remove(id);
            let backends = state
                .cluster_backends(id)
                .filter_map(|b| {
                    let address = b.address.parse().ok()?;
                    let previous = old
                        .as_ref()
                        .and_then(|o| o.backends.iter().find(|x| x.id == b.backend_id));
                    Some(BackendSlot {
                        id: b.backend_id.clone(),
                        address,
                        weight: b.weight,
                        backup: b.backup,
                        active: previous.map_or(0, |p| p.active),
                        failures: previous.map_or(0, |p| p.failures),
                        ejected_until: previous.and_then(|p| p.ejected_until),
                        current: previous.map_or(0, |p| p.current),
                    })
                })
                .collect();
            next.insert(
                id.clone(),
                ClusterBalancer {
                    algorithm: proto::LoadBalancing::try_from(cluster.load_balancing).unwrap_or_default(),
                    sticky: cluster.sticky_session,
                    https_redirect: cluster.https_redirect,
                    answer_503: cluster.answer_503.clone(),
                    backends,
                },
            );
        }
        self.clusters = next;
    }

    /// Counts a connection to a backend (by id, so that a reconfiguration in between is harmless).
    pub fn connection_opened(&mut self, cluster: &str, backend: &str) {
        if let Some(b) = self.slot(cluster, backend) {
            b.active = b.active.saturating_add(1);
        }
    }

    pub fn connection_closed(&mut self, cluster: &str, backend: &str) {
        if let Some(b) = self.slot(cluster, backend) {
            b.active = b.active.saturating_sub(1);
        }
    }

    fn slot(&mut self, cluster: &str, backend: &str) -> Option<&mut BackendSlot> {
        self.clusters
            .get_mut(cluster)?
            .backends
            .iter_mut()
            .find(|b| b.id == backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(algorithm: proto::LoadBalancing, weights: &[(u32, bool)]) -> ClusterBalancer {
        ClusterBalancer {
            algorithm,
            sticky: false,
            https_redirect: false,
            answer_503: String::new(),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, (w, backup))| BackendSlot {
                    id: format!("b{i}"),
                    address: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    weight: *w,
                    backup: *backup,
                    active: 0,
                    failures: 0,
                    ejected_until: None,
                    current: 0,
                })
                .collect(),
        }
    }

    /// The id of the pick, as `b<position in the list>` (how `cluster` names them).
    fn pick(
        c: &mut ClusterBalancer,
        rng: &mut Rng,
        now: Instant,
        sticky: Option<&[u8]>,
        exclude: &[&str],
    ) -> Option<String> {
        let exclude: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        c.pick(rng, now, sticky, &exclude).map(|b| b.id.clone())
    }

    fn counts(c: &mut ClusterBalancer, n: usize) -> Vec<usize> {
        let mut rng = Rng(42);
        let now = Instant::now();
        let mut counts = vec![0; c.backends.len()];
        for _ in 0..n {
            let id = pick(c, &mut rng, now, None, &[]).unwrap();
            counts[id.trim_start_matches('b').parse::<usize>().unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_respects_weights_exactly() {
        let mut c = cluster(
            proto::LoadBalancing::RoundRobin,
            &[(100, false), (200, false), (100, false)],
        );
        assert_eq!(counts(&mut c, 400), vec![100, 200, 100]);
    }

    #[test]
    fn random_and_power_of_two_spread_by_weight() {
        for algorithm in [proto::LoadBalancing::Random, proto::LoadBalancing::PowerOfTwo] {
            let mut c = cluster(algorithm, &[(100, false), (300, false)]);
            let n = counts(&mut c, 10_000);
            assert!(n[1] > n[0], "{algorithm:?}: {n:?}");
            assert!(n[0] > 300, "{algorithm:?}: {n:?}");
        }
    }

    #[test]
    fn least_connections_prefers_the_idle_backend() {
        let mut c = cluster(proto::LoadBalancing::LeastConnections, &[(100, false), (100, false)]);
        c.backends[0].active = 5;
        let mut rng = Rng(1);
        assert_eq!(pick(&mut c, &mut rng, Instant::now(), None, &[]).as_deref(), Some("b1"));
    }

    #[test]
    fn backups_serve_only_when_primaries_are_down_and_ejection_expires() {
        let mut c = cluster(proto::LoadBalancing::RoundRobin, &[(100, false), (100, true)]);
        let mut rng = Rng(1);
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        assert_eq!(pick(&mut c, &mut rng, now, None, &[]).as_deref(), Some("b0"));
        c.failed("b0", now);
        assert_eq!(
            pick(&mut c, &mut rng, now, None, &[]).as_deref(),
            Some("b1"),
            "primary ejected: backup"
        );
        assert_eq!(
            pick(&mut c, &mut rng, later, None, &[]).as_deref(),
            Some("b0"),
            "ejection over"
        );
        c.failed("b0", now);
        c.failed("b0", now);
        assert_eq!(
            pick(&mut c, &mut rng, later, None, &[]).as_deref(),
            Some("b1"),
            "backoff grew"
        );
        c.succeeded("b0");
        assert_eq!(pick(&mut c, &mut rng, now, None, &[]).as_deref(), Some("b0"));
        assert_eq!(pick(&mut c, &mut rng, now, None, &["b0", "b1"]), None);
    }

    #[test]
    fn sticky_backend_wins_while_available() {
        let mut c = cluster(proto::LoadBalancing::RoundRobin, &[(100, false), (100, false)]);
        let mut rng = Rng(1);
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(pick(&mut c, &mut rng, now, Some(b"b1"), &[]).as_deref(), Some("b1"));
        }
        c.failed("b1", now);
        assert_eq!(pick(&mut c, &mut rng, now, Some(b"b1"), &[]).as_deref(), Some("b0"));
        assert_eq!(
            pick(&mut c, &mut rng, now, Some(b"b0"), &["b0"]).as_deref(),
            None,
            "b1 is ejected"
        );
    }

    fn backend_request(id: &str, port: u16) -> proto::Request {
        proto::Request {
            id: String::new(),
            kind: Some(proto::request::Kind::AddBackend(proto::Backend {
                cluster_id: "c".into(),
                backend_id: id.into(),
                address: format!("127.0.0.1:{port}"),
                weight: 100,
                backup: false,
            })),
        }
    }

    /// A backend added at runtime whose id sorts first moves every other backend one place down
    /// the list: the ejected backend stays ejected, the others (the new one too) serve, and a
    /// retry's exclusions and a connection count still name the backends they named.
    #[test]
    fn ejection_exclusions_and_counts_follow_ids_across_an_update() {
        let mut state = State::new();
        let cluster = proto::Request {
            id: String::new(),
            kind: Some(proto::request::Kind::AddCluster(proto::Cluster {
                cluster_id: "c".into(),
                load_balancing: proto::LoadBalancing::LeastConnections as i32,
                ..Default::default()
            })),
        };
        state.apply(&cluster).unwrap();
        state.apply(&backend_request("m", 9001)).unwrap();
        state.apply(&backend_request("z", 9002)).unwrap();
        let mut balancers = Balancers::default();
        balancers.update(&state);
        let now = Instant::now();
        let mut rng = Rng(7);
        let c = balancers.clusters.get_mut("c").unwrap();
        c.failed("m", now);
        balancers.connection_opened("c", "z");
        balancers.connection_opened("c", "z");
        let tried = vec!["z".to_string()];

        state.apply(&backend_request("a", 9000)).unwrap();
        balancers.update(&state);
        let c = balancers.clusters.get_mut("c").unwrap();
        let order: Vec<&str> = c.backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(order, ["a", "m", "z"], "the new backend took the first place");
        assert!(c.is_ejected("m", now), "the ejected backend is still ejected");
        assert!(!c.is_ejected("a", now) && !c.is_ejected("z", now));
        for _ in 0..20 {
            let id = c.pick(&mut rng, now, None, &[]).map(|b| b.id.clone()).unwrap();
            assert_ne!(id, "m", "an ejected backend was picked");
        }
        // The retry excludes what it tried, by id: z, not whatever sits where z sat.
        let retry = c.pick(&mut rng, now, None, &tried).map(|b| b.id.clone());
        assert_eq!(retry.as_deref(), Some("a"));
        // Least connections counts by id: z holds two, a none.
        assert_eq!(c.backends.iter().find(|b| b.id == "z").map(|b| b.active), Some(2));
        assert_eq!(
            c.pick(&mut rng, now, None, &[]).map(|b| b.id.clone()).as_deref(),
            Some("a")
        );
    }
}
