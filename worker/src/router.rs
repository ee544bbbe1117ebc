//! Routing: listener, then hostname (exact, then the most specific `*.suffix`), then path
//! (exact, then the longest prefix, then regular expressions in order), optionally method.
//!
//! The table is rebuilt from the state after every configuration change; lookups are one hash
//! lookup per candidate hostname plus a scan of that hostname's few path rules.

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

fn add(listeners: &mut HashMap<String, ListenerRoutes>, f: &proto::HttpFrontend) {
    let rule = f.path.clone().unwrap_or_default();
    let path = match proto::PathKind::try_from(rule.kind) {
        Ok(proto::PathKind::Equals) => PathMatch::Equals(rule.value),
        Ok(proto::PathKind::Regex) => match regex::Regex::new(&rule.value) {
            Ok(re) => PathMatch::Regex(re),
            // The state validated it; a failure here would be a bug, and the rule is skipped.
            Err(_) => return,
        },
        _ => PathMatch::Prefix(rule.value),
    };
    let route = Route {
        path,
        method: (!f.method.is_empty()).then(|| f.method.clone()),
        cluster_id: f.cluster_id.clone(),
    };
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

    pub fn tcp_cluster(&self, listener: &str) -> Option<&str> {
        self.tcp.get(listener).map(String::as_str)
    }
}

fn strip_port(authority: &[u8]) -> &[u8] {
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

    #[test]
    fn ports_and_ipv6_authorities() {
        assert_eq!(strip_port(b"example.com:8080"), b"example.com");
        assert_eq!(strip_port(b"[::1]:8080"), b"[::1]");
        assert_eq!(strip_port(b"example.com"), b"example.com");
    }
}
