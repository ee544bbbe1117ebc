//! Routing: listener, then hostname (exact, then the most specific `*.suffix`), then path
//! (exact, then the longest prefix, then regular expressions in order), optionally method.
//!
//! The table is built from the state, then kept up to date one hostname at a time as frontends
//! come and go ([`Router::update_host`]); lookups are one hash lookup per candidate hostname
//! plus a scan of that hostname's few path rules.

use std::collections::HashMap;

use rampart_command::proto;
use rampart_command::state::State;

#[derive(Debug)]
enum PathMatch {
    Equals(String),
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug)]
struct Route {
    path: PathMatch,
    method: Option<String>,
    cluster_id: String,
}

/// The routes of one hostname, in match order.
#[derive(Debug, Default)]
struct HostRoutes {
    routes: Vec<Route>,
}

impl HostRoutes {
    fn sort(&mut self) {
        // Exact paths first, then prefixes longest first, then regexes in insertion order.
        self.routes.sort_by(|a, b| {
            let rank = |r: &Route| match &r.path {
                PathMatch::Equals(_) => (0, 0),
                PathMatch::Prefix(p) => (1, usize::MAX - p.len()),
                PathMatch::Regex(_) => (2, 0),
            };
            rank(a)
                .cmp(&rank(b))
                .then_with(|| b.method.is_some().cmp(&a.method.is_some()))
        });
    }

    fn find(&self, path: &[u8], method: &[u8]) -> Option<&str> {
        let path_str = std::str::from_utf8(path).unwrap_or("");
        self.routes
            .iter()
            .find(|r| {
                let method_ok = r.method.as_ref().is_none_or(|m| m.as_bytes() == method);
                method_ok
                    && match &r.path {
                        PathMatch::Equals(p) => p.as_bytes() == path,
                        PathMatch::Prefix(p) => path.starts_with(p.as_bytes()),
                        PathMatch::Regex(re) => re.is_match(path_str),
                    }
            })
            .map(|r| r.cluster_id.as_str())
    }
}

/// Routes of one listener.
#[derive(Debug, Default)]
pub struct ListenerRoutes {
    exact: HashMap<String, HostRoutes>,
    /// `*.example.com` stored as `.example.com`.
    wildcard: HashMap<String, HostRoutes>,
}

/// Every listener's routes.
#[derive(Debug, Default)]
pub struct Router {
    listeners: HashMap<String, ListenerRoutes>,
    /// TCP listener address → cluster.
    tcp: HashMap<String, String>,
}

fn route_of(f: &proto::HttpFrontend) -> Option<Route> {
    let rule = f.path.clone().unwrap_or_default();
    let path = match proto::PathKind::try_from(rule.kind) {
        Ok(proto::PathKind::Equals) => PathMatch::Equals(rule.value),
        // The state validated it; a failure here would be a bug, and the rule is skipped.
        Ok(proto::PathKind::Regex) => PathMatch::Regex(regex::Regex::new(&rule.value).ok()?),
        _ => PathMatch::Prefix(rule.value),
    };
    Some(Route {
        path,
        method: (!f.method.is_empty()).then(|| f.method.clone()),
        cluster_id: f.cluster_id.clone(),
    })
}

fn add(listeners: &mut HashMap<String, ListenerRoutes>, f: &proto::HttpFrontend) {
    let Some(route) = route_of(f) else { return };
    let listener = listeners.entry(f.address.clone()).or_default();
    let host = match f.hostname.strip_prefix('*') {
        Some(suffix) => listener.wildcard.entry(suffix.to_string()).or_default(),
        None => listener.exact.entry(f.hostname.clone()).or_default(),
    };
    host.routes.push(route);
}

impl Router {
    pub fn from_state(state: &State) -> Router {
        let mut listeners = HashMap::new();
        for f in state.http_frontends().chain(state.https_frontends()) {
            add(&mut listeners, f);
        }
        for l in listeners.values_mut() {
            l.exact.values_mut().for_each(HostRoutes::sort);
            l.wildcard.values_mut().for_each(HostRoutes::sort);
        }
        let tcp = state
            .tcp_frontends()
            .map(|f| (f.address.clone(), f.cluster_id.clone()))
            .collect();
        Router { listeners, tcp }
    }

    /// The cluster for a request, given the listener it arrived on and its authority, path and
    /// method. The authority's port and a trailing dot are ignored; hostnames compare without
    /// case.
    pub fn route(&self, listener: &str, authority: &[u8], path: &[u8], method: &[u8]) -> Option<&str> {
        let routes = self.listeners.get(listener)?;
        let host = strip_port(authority);
        let host = host.strip_suffix(b".").unwrap_or(host);
        let host = std::str::from_utf8(host).ok()?.to_ascii_lowercase();
        if let Some(cluster) = routes.exact.get(&host).and_then(|r| r.find(path, method)) {
            return Some(cluster);
        }
        // Most specific wildcard first: for a.b.example.com try .b.example.com, then .example.com.
        let mut rest = host.as_str();
        while let Some(dot) = rest.find('.') {
            let suffix = rest.get(dot..).unwrap_or("");
            if let Some(cluster) = routes.wildcard.get(suffix).and_then(|r| r.find(path, method)) {
                return Some(cluster);
            }
            rest = suffix.get(1..).unwrap_or("");
        }
        None
    }

    /// Brings one hostname of one listener (both canonical, as the state stores them) up to
    /// date with the state, after frontends of that hostname were added or removed.
    pub fn update_host(&mut self, state: &State, address: &str, hostname: &str) {
        let mut host = HostRoutes {
            routes: state.host_frontends(address, hostname).filter_map(route_of).collect(),
        };
        host.sort();
        let listener = self.listeners.entry(address.to_string()).or_default();
        let (table, key) = match hostname.strip_prefix('*') {
            Some(suffix) => (&mut listener.wildcard, suffix),
            None => (&mut listener.exact, hostname),
        };
        if host.routes.is_empty() {
            table.remove(key);
        } else {
            table.insert(key.to_string(), host);
        }
        if listener.exact.is_empty() && listener.wildcard.is_empty() {
            self.listeners.remove(address);
        }
    }

    /// Brings the TCP listeners' clusters up to date with the state.
    pub fn update_tcp(&mut self, state: &State) {
        self.tcp = state
            .tcp_frontends()
            .map(|f| (f.address.clone(), f.cluster_id.clone()))
            .collect();
    }

    pub fn tcp_cluster(&self, listener: &str) -> Option<&str> {
        self.tcp.get(listener).map(String::as_str)
    }
}

pub(crate) fn strip_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        // [v6]:port
        return match authority.iter().position(|b| *b == b']') {
            Some(end) => authority.get(..=end).unwrap_or(authority),
            None => authority,
        };
    }
    match authority.iter().rposition(|b| *b == b':') {
        Some(colon) => authority.get(..colon).unwrap_or(authority),
        None => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_command::proto::request::Kind;

    fn state(frontends: &[(&str, &str, i32, &str, &str)]) -> State {
        let mut s = State::new();
        let apply = |s: &mut State, kind| {
            s.apply(&proto::Request {
                id: String::new(),
                kind: Some(kind),
            })
            .unwrap()
        };
        apply(
            &mut s,
            Kind::AddListener(proto::Listener {
                address: "127.0.0.1:80".into(),
                active: true,
                ..Default::default()
            }),
        );
        for c in ["a", "b", "c", "d", "e"] {
            apply(
                &mut s,
                Kind::AddCluster(proto::Cluster {
                    cluster_id: c.into(),
                    ..Default::default()
                }),
            );
        }
        for (host, path, kind, method, cluster) in frontends {
            apply(
                &mut s,
                Kind::AddHttpFrontend(proto::HttpFrontend {
                    address: "127.0.0.1:80".into(),
                    hostname: (*host).into(),
                    path: Some(proto::PathRule {
                        kind: *kind,
                        value: (*path).into(),
                    }),
                    method: (*method).into(),
                    cluster_id: (*cluster).into(),
                    tags: Default::default(),
                }),
            );
        }
        s
    }

    #[test]
    fn exact_then_wildcard_then_path_specificity() {
        let s = state(&[
            ("example.com", "/", 0, "", "a"),
            ("example.com", "/api", 0, "", "b"),
            ("example.com", "/api/v2", 1, "", "c"),
            ("*.example.com", "/", 0, "", "d"),
            ("*.b.example.com", "^/r[0-9]+$", 2, "", "e"),
            ("post.example.com", "/", 0, "POST", "e"),
        ]);
        let r = Router::from_state(&s);
        let route = |host: &str, path: &str, method: &str| {
            r.route("127.0.0.1:80", host.as_bytes(), path.as_bytes(), method.as_bytes())
        };
        assert_eq!(route("example.com", "/", "GET"), Some("a"));
        assert_eq!(route("EXAMPLE.com:80", "/api/x", "GET"), Some("b"));
        assert_eq!(route("example.com", "/api/v2", "GET"), Some("c"));
        assert_eq!(route("example.com", "/api/v2/x", "GET"), Some("b"));
        assert_eq!(route("www.example.com", "/x", "GET"), Some("d"));
        assert_eq!(route("x.b.example.com", "/r12", "GET"), Some("e"));
        assert_eq!(route("x.b.example.com", "/other", "GET"), Some("d"));
        assert_eq!(route("post.example.com", "/", "POST"), Some("e"));
        assert_eq!(route("post.example.com", "/", "GET"), Some("d"));
        assert_eq!(route("example.org", "/", "GET"), None);
        assert_eq!(r.route("127.0.0.1:81", b"example.com", b"/", b"GET"), None);
    }

    /// Updating one hostname at a time gives the same answers as rebuilding from the state,
    /// over a long run of frontends added and removed (same hosts, paths, methods, wildcards).
    #[test]
    fn updating_hosts_matches_a_rebuild() {
        let hosts = ["a.test", "B.test", "*.a.test", "*.test", "x.a.test"];
        let paths = [("/", 0), ("/api", 0), ("/api", 1), ("^/r[0-9]+$", 2), ("/api/v2", 0)];
        let methods = ["", "POST"];
        let clusters = ["a", "b", "c", "d", "e"];
        let mut s = state(&[]);
        let mut router = Router::from_state(&s);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let queries: Vec<(&str, &str, &str)> = ["a.test", "b.test", "x.a.test", "y.a.test", "z.test", "c.other"]
            .iter()
            .flat_map(|h| {
                ["/", "/api", "/api/x", "/api/v2/y", "/r42", "/nope"]
                    .iter()
                    .flat_map(move |p| ["GET", "POST"].map(move |m| (*h, *p, m)))
            })
            .collect();
        let mut changes = 0;
        for _ in 0..600 {
            let (path, kind) = paths[next(paths.len())];
            let f = proto::HttpFrontend {
                address: "127.0.0.1:80".into(),
                hostname: hosts[next(hosts.len())].into(),
                path: Some(proto::PathRule {
                    kind,
                    value: path.into(),
                }),
                method: methods[next(methods.len())].into(),
                cluster_id: clusters[next(clusters.len())].into(),
                tags: Default::default(),
            };
            let kind = if next(2) == 0 {
                Kind::AddHttpFrontend(f.clone())
            } else {
                Kind::RemoveHttpFrontend(f.clone())
            };
            let applied = s.apply(&proto::Request {
                id: String::new(),
                kind: Some(kind),
            });
            if applied.is_err() {
                continue;
            }
            changes += 1;
            let hostname = rampart_command::state::canonical_hostname(&f.hostname).unwrap();
            router.update_host(&s, "127.0.0.1:80", &hostname);
            let rebuilt = Router::from_state(&s);
            for (h, p, m) in &queries {
                assert_eq!(
                    router.route("127.0.0.1:80", h.as_bytes(), p.as_bytes(), m.as_bytes()),
                    rebuilt.route("127.0.0.1:80", h.as_bytes(), p.as_bytes(), m.as_bytes()),
                    "{h}{p} {m} after {changes} changes"
                );
            }
        }
        assert!(changes > 100, "only {changes} changes applied");
        assert_eq!(router.listeners.len(), Router::from_state(&s).listeners.len());
    }

    #[test]
    fn ports_and_ipv6_authorities() {
        assert_eq!(strip_port(b"example.com:8080"), b"example.com");
        assert_eq!(strip_port(b"[::1]:8080"), b"[::1]");
        assert_eq!(strip_port(b"example.com"), b"example.com");
    }
}
