//! Who may send which command-socket requests: roles, tenants, state paths and rate limits.
//!
//! The supervisor identifies every command-socket client by SO_PEERCRED ([`Peer`]), asks
//! [`AccessPolicy::authorize`] before it does anything with a request, and asks
//! [`RateLimiter`] before it accepts a connection or a request. Everything not granted is denied.
//!
//! # The policy file
//!
//! ```toml
//! # Limits for every uid, unless its grant says otherwise (these are the built-in values).
//! [limits]
//! max_connections = 16        # command connections open at once, per uid
//! mutating_per_second = 5     # sustained rate of requests that change something
//! mutating_burst = 10         # how many of them may arrive at once
//! read_per_second = 50        # sustained rate of read-only requests
//! read_burst = 100
//! idle_timeout_secs = 300     # a connection silent this long is closed
//! # max_request_bytes: the largest request frame; by default 256 MiB for admins (a whole
//! # state), 1 MiB for other roles, 64 KiB for a uid without a role
//!
//! [[grant]]
//! user = "deploy"             # or `uid = 1000`, or `group = "rampart-ops"`
//! role = "operator"
//! limits = { mutating_per_second = 20 }
//!
//! [[grant]]
//! group = "shop"
//! role = "tenant"
//! cluster_patterns = ["shop-*"]
//! hostname_patterns = ["shop.example.com", "*.shop.example.com"]
//! ```
//!
//! Roles:
//! - `viewer`: read-only queries (status, list and query requests, dump_state, show_policy);
//! - `auditor`: viewer, plus subscribe_events;
//! - `operator`: viewer, plus backends, health checks, the logging level and metrics;
//! - `tenant`: viewer, plus clusters, frontends, certificates and backends, limited to its
//!   cluster-id patterns and hostname patterns;
//! - `admin`: everything: listeners, stop, upgrade, state save/load, reload_policy.
//!
//! A `user` or `group` name is resolved to its id when the file is loaded; a name that does not
//! exist is an error. A peer is matched by uid first (`uid` and `user` grants, one per uid), then
//! by group (its primary gid and the supplementary gids the supervisor resolved): the first
//! matching `group` grant in file order wins. With a policy file, only what it grants is allowed:
//! root is not implicitly admin. Without one, [`AccessPolicy::default_for`] makes root and the
//! supervisor's own uid admin and refuses everyone else.
//!
//! Patterns use `*` only, matching any run of characters (dots included): `shop-*`,
//! `*.shop.example.com`. There is deliberately no `?`: with `*` alone, a pattern that matches a
//! wildcard hostname `*.d` also matches every name that wildcard covers, so a tenant cannot
//! claim more through a wildcard frontend than it could name one by one.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use rampart_command::config::defaults;
use rampart_command::kinds::Access;
use rampart_command::proto::{self, request::Kind};
use rampart_command::request_kind_name;
use rampart_command::state::{self, State};
use serde::Deserialize;
use toml::Spanned;

/// Errors of the access policy: loading it, and the limits it enforces.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read access policy {}: {source}; check the `access_policy` path in the configuration", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {key}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    #[error("{}:{line}: user `{name}` does not exist on this system: create it or correct the name", file.display())]
    UnknownUser { file: PathBuf, line: usize, name: String },
    #[error("{}:{line}: group `{name}` does not exist on this system: create it or correct the name", file.display())]
    UnknownGroup { file: PathBuf, line: usize, name: String },
    #[error("{}:{line}: cannot look up `{name}` in the user database: {source}", file.display())]
    Lookup {
        file: PathBuf,
        line: usize,
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("{}:{line}: {message}", file.display())]
    Grant {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "uid {uid} already has {max} command connections open: close one, or raise max_connections for it in the access policy"
    )]
    TooManyConnections { uid: u32, max: u32 },
    #[error(
        "uid {uid} sent {class} requests faster than {per_second} per second (burst {burst}): wait a moment and retry"
    )]
    RateLimited {
        uid: u32,
        class: RequestClass,
        per_second: u32,
        burst: u32,
    },
    #[error("state path `{path}` is refused: {reason}; name a file inside {}", state_dir.display())]
    StatePath {
        path: String,
        state_dir: PathBuf,
        reason: &'static str,
    },
}

/// What a client may do. See the module documentation for the requests of each role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Auditor,
    Operator,
    Tenant,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
            Role::Tenant => "tenant",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A command-socket client as SO_PEERCRED describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Supplementary group ids, when the supervisor resolved them (from `/proc/<pid>/status` or
    /// the user database); may be empty, in which case only `gid` is matched against groups.
    pub groups: Vec<u32>,
}

/// The answer to "may this peer send this request?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        role: Role,
    },
    /// `reason` says what was refused and why, for the client and the audit trail.
    Deny {
        role: Option<Role>,
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Whether a request counts against the mutating or the read-only rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    Mutating,
    ReadOnly,
}

impl fmt::Display for RequestClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestClass::Mutating => "mutating",
            RequestClass::ReadOnly => "read-only",
        })
    }
}

impl RequestClass {
    /// Mutating: anything that changes the configuration or the process (state changes, state
    /// save/load, stop, upgrade, logging, metrics, policy reload). Read-only: the rest.
    pub fn of(request: &proto::Request) -> RequestClass {
        if rampart_command::is_mutating(request) {
            RequestClass::Mutating
        } else {
            RequestClass::ReadOnly
        }
    }
}

/// Per-uid limits on the command socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub mutating_per_second: u32,
    pub mutating_burst: u32,
    pub read_per_second: u32,
    pub read_burst: u32,
    pub idle_timeout: Duration,
    /// Largest request frame accepted, in bytes; `None`: [`Limits::request_bytes`] decides by
    /// role.
    pub max_request_bytes: Option<u64>,
}

/// Largest request of an admin by default: room for the whole state of a large platform
/// (`apply_state` of 100,000 frontends is about 10 MiB).
pub const ADMIN_MAX_REQUEST_BYTES: u64 = 256 * 1024 * 1024;
/// Largest request of the other roles by default.
pub const ROLE_MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Largest request of a peer without a role: it is refused whatever it sends, so what it may
/// make the supervisor buffer stays small.
pub const NO_ROLE_MAX_REQUEST_BYTES: u64 = 64 * 1024;

impl Limits {
    /// The largest request frame a peer with `role` may send.
    pub fn request_bytes(&self, role: Option<Role>) -> usize {
        let bytes = self.max_request_bytes.unwrap_or(match role {
            Some(Role::Admin) => ADMIN_MAX_REQUEST_BYTES,
            Some(_) => ROLE_MAX_REQUEST_BYTES,
            None => NO_ROLE_MAX_REQUEST_BYTES,
        });
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            mutating_per_second: 5,
            mutating_burst: 10,
            read_per_second: 50,
            read_burst: 100,
            idle_timeout: Duration::from_secs(300),
            max_request_bytes: None,
        }
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections, {}/s mutating (burst {}), {}/s read-only (burst {}), idle timeout {}s",
            self.max_connections,
            self.mutating_per_second,
            self.mutating_burst,
            self.read_per_second,
            self.read_burst,
            self.idle_timeout.as_secs()
        )
    }
}

/// Who a grant applies to, resolved to ids at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    Uid { uid: u32, name: Option<String> },
    Group { gid: u32, name: String },
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Uid { uid, name: Some(name) } => write!(f, "user {name} (uid {uid})"),
            Principal::Uid { uid, name: None } => write!(f, "uid {uid}"),
            Principal::Group { gid, name } => write!(f, "group {name} (gid {gid})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    principal: Principal,
    role: Role,
    cluster_patterns: Vec<String>,
    hostname_patterns: Vec<String>,
    limits: Limits,
    /// Where it was declared, for `to_text`.
    origin: String,
}

/// The effective access policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Grants by uid (`uid` and `user` entries), at most one per uid.
    by_uid: BTreeMap<u32, Grant>,
    /// `group` entries in file order: the first one a peer belongs to applies.
    by_group: Vec<Grant>,
    default_limits: Limits,
    state_dir: PathBuf,
    source: String,
}

// ---------------------------------------------------------------------------------------------
// The file

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    grant: Vec<Spanned<GrantFile>>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_connections: Option<u32>,
    mutating_per_second: Option<u32>,
    mutating_burst: Option<u32>,
    read_per_second: Option<u32>,
    read_burst: Option<u32>,
    idle_timeout_secs: Option<u64>,
    max_request_bytes: Option<u64>,
}

impl LimitsFile {
    fn over(self, base: Limits) -> Limits {
        Limits {
            max_connections: self.max_connections.unwrap_or(base.max_connections),
            mutating_per_second: self.mutating_per_second.unwrap_or(base.mutating_per_second),
            mutating_burst: self.mutating_burst.unwrap_or(base.mutating_burst),
            read_per_second: self.read_per_second.unwrap_or(base.read_per_second),
            read_burst: self.read_burst.unwrap_or(base.read_burst),
            idle_timeout: self.idle_timeout_secs.map_or(base.idle_timeout, Duration::from_secs),
            max_request_bytes: self.max_request_bytes.or(base.max_request_bytes),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    uid: Option<u32>,
    user: Option<String>,
    group: Option<String>,
    role: Role,
    #[serde(default)]
    cluster_patterns: Vec<String>,
    #[serde(default)]
    hostname_patterns: Vec<String>,
    #[serde(default)]
    limits: LimitsFile,
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

fn syntax_error(text: &str, file: &Path, key: String, error: &toml::de::Error) -> AccessError {
    let (line, column) = error.span().map_or((0, 0), |s| line_column(text, s.start));
    AccessError::Syntax {
        file: file.to_path_buf(),
        line,
        column,
        key,
        message: error.message().trim().to_string(),
    }
}

fn check_limits(limits: &Limits, file: &Path, line: usize) -> Result<(), AccessError> {
    let zero = [
        ("max_connections", limits.max_connections),
        ("mutating_per_second", limits.mutating_per_second),
        ("mutating_burst", limits.mutating_burst),
        ("read_per_second", limits.read_per_second),
        ("read_burst", limits.read_burst),
    ]
    .into_iter()
    .find(|(_, v)| *v == 0);
    if let Some((key, _)) = zero {
        return Err(AccessError::Grant {
            file: file.to_path_buf(),
            line,
            message: format!("limits.{key} is 0: use at least 1 (to forbid requests, grant a narrower role instead)"),
        });
    }
    if limits.idle_timeout.is_zero() {
        return Err(AccessError::Grant {
            file: file.to_path_buf(),
            line,
            message: "limits.idle_timeout_secs is 0: use at least 1".into(),
        });
    }
    if let Some(bytes) = limits.max_request_bytes
        && !(4096..=1 << 32).contains(&bytes)
    {
        return Err(AccessError::Grant {
            file: file.to_path_buf(),
            line,
            message: format!("limits.max_request_bytes is {bytes}: use 4096 to 4294967296"),
        });
    }
    Ok(())
}

/// Checks a tenant pattern: `*` wildcards and the characters of what it matches.
fn check_pattern(pattern: &str, hostname: bool) -> Result<(), String> {
    if pattern.is_empty() || pattern.len() > 253 {
        return Err(format!("pattern `{pattern}` must have 1 to 253 characters"));
    }
    if pattern.bytes().all(|b| b == b'*') {
        return Err(format!(
            "pattern `{pattern}` matches everything: grant the operator or admin role instead of a tenant"
        ));
    }
    let valid = if hostname {
        pattern
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'*'))
    } else {
        pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'[' | b']' | b'*'))
    };
    if valid {
        Ok(())
    } else if hostname {
        Err(format!(
            "hostname pattern `{pattern}`: use lower-case letters, digits, '-', '.' and '*' wildcards"
        ))
    } else {
        Err(format!(
            "cluster pattern `{pattern}`: use the characters of cluster ids (letters, digits, '-', '_', '.', ':', '[', ']') and '*' wildcards"
        ))
    }
}

/// True when `text` matches `pattern`, where `*` matches any run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position of the last `*` seen and the text position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match (p.get(pi), t.get(ti)) {
            (Some(b'*'), _) => {
                star = Some((pi, ti));
                pi += 1;
            }
            (Some(pc), Some(tc)) if pc == tc => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).is_some_and(|rest| rest.iter().all(|&b| b == b'*'))
}

impl AccessPolicy {
    /// Without a policy file: root and the supervisor's uid are admin; nobody else gets in.
    pub fn default_for(supervisor_uid: u32) -> AccessPolicy {
        let limits = Limits::default();
        let mut by_uid = BTreeMap::new();
        for (uid, origin) in [
            (0, "built-in: root"),
            (supervisor_uid, "built-in: the supervisor's uid"),
        ] {
            by_uid.entry(uid).or_insert_with(|| Grant {
                principal: Principal::Uid { uid, name: None },
                role: Role::Admin,
                cluster_patterns: Vec::new(),
                hostname_patterns: Vec::new(),
                limits,
                origin: origin.to_string(),
            });
        }
        AccessPolicy {
            by_uid,
            by_group: Vec::new(),
            default_limits: limits,
            state_dir: PathBuf::from(defaults::STATE_DIR),
            source: "(no access policy file: built-in default)".into(),
        }
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<AccessPolicy, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AccessPolicy::parse(&text, path)
    }

    /// Parses a policy; `source_name` names it in errors and in [`to_text`](Self::to_text).
    pub fn parse(text: &str, source_name: &Path) -> Result<AccessPolicy, AccessError> {
        let deserializer = toml::de::Deserializer::parse(text)
            .map_err(|e| syntax_error(text, source_name, "(document)".into(), &e))?;
        let file: PolicyFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // Spanned<T> shows up in serde's path as a private field name: hide it.
            let key = e.path().to_string().replace("$__serde_spanned_private_value.", "");
            let key = if key == "." { "(document)".to_string() } else { key };
            syntax_error(text, source_name, key, e.inner())
        })?;
        let default_limits = file.limits.over(Limits::default());
        check_limits(&default_limits, source_name, 0)?;

        let mut by_uid: BTreeMap<u32, Grant> = BTreeMap::new();
        let mut by_group: Vec<Grant> = Vec::new();
        for spanned in file.grant {
            let span: Range<usize> = spanned.span();
            let line = line_column(text, span.start).0;
            let g = spanned.into_inner();
            let grant = resolve_grant(g, default_limits, source_name, line)?;
            let bad = |message: String| AccessError::Grant {
                file: source_name.to_path_buf(),
                line,
                message,
            };
            match &grant.principal {
                Principal::Uid { uid, .. } => {
                    if let Some(existing) = by_uid.get(uid) {
                        return Err(bad(format!(
                            "uid {uid} already has a grant ({}): keep one grant per uid",
                            existing.origin
                        )));
                    }
                    by_uid.insert(*uid, grant);
                }
                Principal::Group { gid, .. } => {
                    if let Some(existing) = by_group
                        .iter()
                        .find(|e| matches!(e.principal, Principal::Group { gid: g, .. } if g == *gid))
                    {
                        return Err(bad(format!(
                            "gid {gid} already has a grant ({}): keep one grant per group",
                            existing.origin
                        )));
                    }
                    by_group.push(grant);
                }
            }
        }
        Ok(AccessPolicy {
            by_uid,
            by_group,
            default_limits,
            state_dir: PathBuf::from(defaults::STATE_DIR),
            source: source_name.display().to_string(),
        })
    }

    /// Sets the directory `save_state` and `load_state` paths are confined to (the
    /// configuration's `state_dir`; the built-in default until this is called).
    pub fn with_state_dir(mut self, state_dir: impl Into<PathBuf>) -> AccessPolicy {
        self.state_dir = state_dir.into();
        self
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn grant_for(&self, peer: &Peer) -> Option<&Grant> {
        self.by_uid.get(&peer.uid).or_else(|| {
            self.by_group.iter().find(|g| match g.principal {
                Principal::Group { gid, .. } => gid == peer.gid || peer.groups.contains(&gid),
                Principal::Uid { .. } => false,
            })
        })
    }

    /// The role the peer has, or `None` when the policy grants it nothing.
    pub fn role_of(&self, peer: &Peer) -> Option<Role> {
        self.grant_for(peer).map(|g| g.role)
    }

    /// The limits that apply to the peer: its grant's, or the file's defaults for a peer that
    /// has none (it will be refused anyway, but its connection attempts are still counted).
    pub fn limits_for(&self, peer: &Peer) -> Limits {
        self.grant_for(peer).map_or(self.default_limits, |g| g.limits)
    }

    /// Decides whether `peer` may send `request`. `state` is the running configuration: a
    /// tenant's right to replace or remove a certificate depends on the names of the certificate
    /// already installed. A batch (`apply`) is allowed only when every request in it is.
    pub fn authorize(&self, peer: &Peer, request: &proto::Request, state: &State) -> Decision {
        let Some(grant) = self.grant_for(peer) else {
            return Decision::Deny {
                role: None,
                reason: format!(
                    "uid {} (gid {}) has no role in the access policy: ask an administrator for a grant",
                    peer.uid, peer.gid
                ),
            };
        };
        match self.check(grant, request, state, false) {
            Ok(()) => Decision::Allow { role: grant.role },
            Err(reason) => Decision::Deny {
                role: Some(grant.role),
                reason,
            },
        }
    }

    fn check(&self, grant: &Grant, request: &proto::Request, state: &State, in_batch: bool) -> Result<(), String> {
        let role = grant.role;
        let name = request_kind_name(request);
        let refuse = || Err(format!("role {role} may not {name}"));
        let Some(kind) = &request.kind else {
            return Err("the request has no kind (another message type or a newer protocol version?)".into());
        };
        let info = rampart_command::kind_info(kind);
        if in_batch && !info.in_batch {
            return Err(match kind {
                Kind::Apply(_) => "a batch cannot contain another batch".into(),
                _ => format!("`{name}` cannot be part of a batch"),
            });
        }
        match (info.access, role) {
            (_, Role::Admin) | (Access::AnyRole, _) | (Access::Auditor, Role::Auditor) => {}
            (Access::Operator | Access::OperatorOrTenant, Role::Operator) => {}
            (Access::OperatorOrTenant | Access::Tenant, Role::Tenant) => tenant_check(grant, kind, name, state)?,
            (Access::EachRequest, _) => {}
            _ => return refuse(),
        }
        match kind {
            Kind::Apply(batch) => {
                if batch.requests.is_empty() && matches!(role, Role::Viewer | Role::Auditor) {
                    return refuse();
                }
                for (index, inner) in batch.requests.iter().enumerate() {
                    self.check(grant, inner, state, true)
                        .map_err(|reason| format!("request {index} of the batch: {reason}; nothing was applied"))?;
                }
                Ok(())
            }
            // Authorized as the batch it becomes, once the supervisor computed it.
            Kind::ApplyState(_) if matches!(role, Role::Viewer | Role::Auditor) => refuse(),
            Kind::SaveState(p) | Kind::LoadState(p) => self.state_path(&p.path).map(|_| ()).map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    /// Resolves a `save_state`/`load_state` path inside the state directory, or refuses it.
    ///
    /// Rules, applied to the text of the path without touching the filesystem: it is not empty
    /// and has no NUL byte; it has no `..` component; a relative path is taken inside the state
    /// directory; an absolute path must lie inside it; and it names a file, not the directory
    /// itself. Symbolic links are out of scope here: a link inside the state directory that
    /// points elsewhere is followed by whoever opens the path. The supervisor must open the
    /// result with `O_NOFOLLOW` (and its landlock rules confine it to the state directory).
    pub fn state_path(&self, requested: &str) -> Result<PathBuf, AccessError> {
        confine_state_path(&self.state_dir, requested)
    }

    /// The effective policy, readable by a person, for `show_policy`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "access policy: {}", self.source);
        let _ = writeln!(out, "state directory: {}", self.state_dir.display());
        let _ = writeln!(out, "default limits: {}", self.default_limits);
        if !self
            .by_uid
            .values()
            .chain(&self.by_group)
            .any(|g| g.role == Role::Admin)
        {
            let _ = writeln!(
                out,
                "warning: no grant is admin: nobody can reload this policy; edit the file and restart"
            );
        }
        let _ = writeln!(out, "grants (by uid first, then the first matching group):");
        for grant in self.by_uid.values().chain(&self.by_group) {
            let _ = writeln!(out, "  {} -> {}  [{}]", grant.principal, grant.role, grant.origin);
            if grant.role == Role::Tenant {
                let _ = writeln!(out, "      clusters: {}", list_or_none(&grant.cluster_patterns));
                let _ = writeln!(out, "      hostnames: {}", list_or_none(&grant.hostname_patterns));
            }
            if grant.limits != self.default_limits {
                let _ = writeln!(out, "      limits: {}", grant.limits);
            }
        }
        let _ = writeln!(out, "everyone else: denied");
        out
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

fn resolve_grant(g: GrantFile, default_limits: Limits, file: &Path, line: usize) -> Result<Grant, AccessError> {
    let bad = |message: String| AccessError::Grant {
        file: file.to_path_buf(),
        line,
        message,
    };
    let principal = match (g.uid, g.user, g.group) {
        (Some(uid), None, None) => Principal::Uid { uid, name: None },
        (None, Some(name), None) => match nix::unistd::User::from_name(&name) {
            Ok(Some(user)) => Principal::Uid {
                uid: user.uid.as_raw(),
                name: Some(name),
            },
            Ok(None) => {
                return Err(AccessError::UnknownUser {
                    file: file.to_path_buf(),
                    line,
                    name,
                });
            }
            Err(source) => {
                return Err(AccessError::Lookup {
                    file: file.to_path_buf(),
                    line,
                    name,
                    source,
                });
            }
        },
        (None, None, Some(name)) => match nix::unistd::Group::from_name(&name) {
            Ok(Some(group)) => Principal::Group {
                gid: group.gid.as_raw(),
                name,
            },
            Ok(None) => {
                return Err(AccessError::UnknownGroup {
                    file: file.to_path_buf(),
                    line,
                    name,
                });
            }
            Err(source) => {
                return Err(AccessError::Lookup {
                    file: file.to_path_buf(),
                    line,
                    name,
                    source,
                });
            }
        },
        _ => return Err(bad("a grant names exactly one of `uid`, `user` or `group`".into())),
    };
    if g.role == Role::Tenant {
        if g.cluster_patterns.is_empty() {
            return Err(bad(
                "a tenant grant needs `cluster_patterns` (such as [\"shop-*\"]): the clusters it may manage".into(),
            ));
        }
        for p in &g.cluster_patterns {
            check_pattern(p, false).map_err(bad)?;
        }
        for p in &g.hostname_patterns {
            check_pattern(p, true).map_err(bad)?;
        }
    } else if !g.cluster_patterns.is_empty() || !g.hostname_patterns.is_empty() {
        return Err(bad(format!(
            "`cluster_patterns` and `hostname_patterns` apply to the tenant role only, not {}: remove them or make the grant a tenant",
            g.role
        )));
    }
    let limits = g.limits.over(default_limits);
    check_limits(&limits, file, line)?;
    Ok(Grant {
        origin: format!("{}:{line}", file.display()),
        principal,
        role: g.role,
        cluster_patterns: g.cluster_patterns,
        hostname_patterns: g.hostname_patterns,
        limits,
    })
}

/// See [`AccessPolicy::state_path`].
pub fn confine_state_path(state_dir: &Path, requested: &str) -> Result<PathBuf, AccessError> {
    let refuse = |reason| AccessError::StatePath {
        path: requested.to_string(),
        state_dir: state_dir.to_path_buf(),
        reason,
    };
    if requested.is_empty() {
        return Err(refuse("it is empty"));
    }
    if requested.contains('\0') {
        return Err(refuse("it contains a NUL byte"));
    }
    let path = Path::new(requested);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("it contains `..`"));
    }
    let relative: PathBuf = if path.is_absolute() {
        let base: PathBuf = state_dir.components().filter(|c| *c != Component::CurDir).collect();
        let full: PathBuf = path.components().filter(|c| *c != Component::CurDir).collect();
        match full.strip_prefix(&base) {
            Ok(rest) => rest.to_path_buf(),
            Err(_) => return Err(refuse("it is outside the state directory")),
        }
    } else {
        path.components().filter(|c| *c != Component::CurDir).collect()
    };
    if relative.as_os_str().is_empty() {
        return Err(refuse("it names the state directory itself, not a file in it"));
    }
    Ok(state_dir.join(relative))
}

fn tenant_check(grant: &Grant, kind: &Kind, name: &str, state: &State) -> Result<(), String> {
    let cluster = |cluster_id: &str| -> Result<(), String> {
        if grant.cluster_patterns.iter().any(|p| glob_match(p, cluster_id)) {
            Ok(())
        } else {
            Err(format!(
                "role tenant may not {name} for cluster `{cluster_id}`: it is outside the tenant's clusters ({})",
                grant.cluster_patterns.join(", ")
            ))
        }
    };
    let hostname = |hostname: &str| -> Result<(), String> {
        let canonical = state::canonical_hostname(hostname).map_err(|e| format!("{name}: {e}"))?;
        if grant.hostname_patterns.iter().any(|p| glob_match(p, &canonical)) {
            Ok(())
        } else {
            Err(format!(
                "role tenant may not {name} for hostname `{canonical}`: it is outside the tenant's hostnames ({})",
                list_or_none(&grant.hostname_patterns)
            ))
        }
    };
    let names = |what: &str, names: &[String]| -> Result<(), String> {
        if names.is_empty() {
            return Err(format!(
                "role tenant may not {name} {what} without explicit names: list the certificate's server names in `names`"
            ));
        }
        names.iter().try_for_each(|n| hostname(n))
    };
    // The names a new certificate will serve: those given, or the ones it holds (what the state
    // fills in), so a tenant's certificate is bound to its hostnames either way.
    let new_names = |c: &proto::Certificate| -> Result<(), String> {
        if !c.names.is_empty() {
            return names("a certificate", &c.names);
        }
        let held = state::certificate_names(&c.certificate).map_err(|e| format!("{name}: {e}"))?;
        names("a certificate", &held)
    };
    let installed = |address: &str, fingerprint: &str| -> Result<(), String> {
        let address = state::canonical_address(address).map_err(|e| format!("{name}: {e}"))?;
        let fingerprint = fingerprint.to_ascii_lowercase();
        let existing = state
            .certificates()
            .find(|(fp, c)| *fp == fingerprint && c.address == address)
            .map(|(_, c)| c)
            .ok_or_else(|| {
                format!("role tenant may not {name}: listener {address} has no certificate {fingerprint} it could own")
            })?;
        names("a certificate", &existing.names)
    };
    match kind {
        Kind::AddCluster(c) => cluster(&c.cluster_id),
        Kind::RemoveCluster(c) => cluster(&c.cluster_id),
        Kind::AddBackend(b) => cluster(&b.cluster_id),
        Kind::RemoveBackend(b) => cluster(&b.cluster_id),
        Kind::AddHttpFrontend(f)
        | Kind::RemoveHttpFrontend(f)
        | Kind::AddHttpsFrontend(f)
        | Kind::RemoveHttpsFrontend(f) => {
            cluster(&f.cluster_id)?;
            hostname(&f.hostname)
        }
        Kind::AddTcpFrontend(f) | Kind::RemoveTcpFrontend(f) => {
            if f.cluster_id.is_empty() {
                return Err(format!("role tenant may not {name} without naming its cluster"));
            }
            cluster(&f.cluster_id)
        }
        Kind::AddCertificate(c) => new_names(c),
        Kind::ReplaceCertificate(r) => {
            installed(&r.address, &r.old_fingerprint)?;
            let new = r
                .new_certificate
                .as_ref()
                .ok_or_else(|| format!("{name}: the request has no new certificate"))?;
            new_names(new)
        }
        Kind::RemoveCertificate(c) => installed(&c.address, &c.fingerprint),
        _ => Err(format!("role tenant may not {name}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limits

/// A token bucket: `capacity` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(capacity: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(capacity),
            last: now,
        }
    }

    fn refill(&mut self, rate: u32, capacity: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(capacity));
        self.last = self.last.max(now);
    }

    fn take(&mut self, rate: u32, capacity: u32, now: Instant) -> bool {
        self.refill(rate, capacity, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone)]
struct UidUsage {
    connections: u32,
    mutating: Bucket,
    read: Bucket,
}

/// Per-uid connection counts and request rates. The supervisor keeps one, calls
/// [`acquire_connection`](Self::acquire_connection) at accept, [`release_connection`](Self::release_connection)
/// when the connection closes, and [`check_request`](Self::check_request) for every request.
/// Time is passed in, so the limiter is deterministic under test.
#[derive(Debug, Default)]
pub struct RateLimiter {
    usage: BTreeMap<u32, UidUsage>,
}

impl RateLimiter {
    pub fn new() -> RateLimiter {
        RateLimiter::default()
    }

    fn usage(&mut self, uid: u32, limits: &Limits, now: Instant) -> &mut UidUsage {
        self.usage.entry(uid).or_insert_with(|| UidUsage {
            connections: 0,
            mutating: Bucket::full(limits.mutating_burst, now),
            read: Bucket::full(limits.read_burst, now),
        })
    }

    /// Takes a connection slot for `uid`, or refuses when it has `max_connections` open.
    pub fn acquire_connection(&mut self, uid: u32, limits: &Limits, now: Instant) -> Result<(), AccessError> {
        let usage = self.usage(uid, limits, now);
        if usage.connections >= limits.max_connections {
            return Err(AccessError::TooManyConnections {
                uid,
                max: limits.max_connections,
            });
        }
        usage.connections += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`acquire_connection`](Self::acquire_connection).
    pub fn release_connection(&mut self, uid: u32) {
        if let Some(usage) = self.usage.get_mut(&uid) {
            usage.connections = usage.connections.saturating_sub(1);
        }
    }

    /// Connections `uid` has open.
    pub fn connections(&self, uid: u32) -> u32 {
        self.usage.get(&uid).map_or(0, |u| u.connections)
    }

    /// Takes one token from the bucket of the request's class, or refuses the request.
    pub fn check_request(
        &mut self,
        uid: u32,
        limits: &Limits,
        class: RequestClass,
        now: Instant,
    ) -> Result<(), AccessError> {
        let usage = self.usage(uid, limits, now);
        let (bucket, rate, burst) = match class {
            RequestClass::Mutating => (&mut usage.mutating, limits.mutating_per_second, limits.mutating_burst),
            RequestClass::ReadOnly => (&mut usage.read, limits.read_per_second, limits.read_burst),
        };
        if bucket.take(rate, burst, now) {
            Ok(())
        } else {
            Err(AccessError::RateLimited {
                uid,
                class,
                per_second: rate,
                burst,
            })
        }
    }

    /// Forgets uids with no open connection whose buckets have refilled: they would start
    /// full anyway. Call it now and then (on a timer) to bound memory.
    pub fn prune(&mut self, now: Instant, limits_of: impl Fn(u32) -> Limits) {
        self.usage.retain(|uid, usage| {
            let limits = limits_of(*uid);
            usage
                .mutating
                .refill(limits.mutating_per_second, limits.mutating_burst, now);
            usage.read.refill(limits.read_per_second, limits.read_burst, now);
            usage.connections > 0
                || usage.mutating.tokens < f64::from(limits.mutating_burst)
                || usage.read.tokens < f64::from(limits.read_burst)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_command::proto::{Batch, Certificate, Cluster, ClusterId, Empty, HttpFrontend, StatePath};

    fn req(kind: Kind) -> proto::Request {
        proto::Request {
            id: "t".into(),
            kind: Some(kind),
        }
    }

    fn peer(uid: u32) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 1,
            groups: Vec::new(),
        }
    }

    fn cluster(id: &str) -> proto::Request {
        req(Kind::AddCluster(Cluster {
            cluster_id: id.into(),
            ..Default::default()
        }))
    }

    fn frontend(host: &str, cluster_id: &str) -> proto::Request {
        req(Kind::AddHttpFrontend(HttpFrontend {
            address: "127.0.0.1:8080".into(),
            hostname: host.into(),
            cluster_id: cluster_id.into(),
            ..Default::default()
        }))
    }

    const POLICY: &str = r#"
[limits]
mutating_per_second = 1
mutating_burst = 2

[[grant]]
uid = 1000
role = "viewer"

[[grant]]
uid = 1001
role = "tenant"
cluster_patterns = ["shop-*"]
hostname_patterns = ["shop.example.com", "*.shop.example.com"]

[[grant]]
uid = 1002
role = "admin"

[[grant]]
uid = 1003
role = "operator"
limits = { max_connections = 1 }

[[grant]]
uid = 1004
role = "auditor"

[[grant]]
group = "root"
role = "viewer"
"#;

    fn policy() -> AccessPolicy {
        AccessPolicy::parse(POLICY, Path::new("test.toml"))
            .unwrap()
            .with_state_dir("/var/lib/rampart")
    }

    fn allowed(p: &AccessPolicy, uid: u32, r: &proto::Request) -> bool {
        p.authorize(&peer(uid), r, &State::new()).is_allowed()
    }

    #[test]
    fn viewer_cannot_add_a_cluster() {
        let d = policy().authorize(&peer(1000), &cluster("a"), &State::new());
        assert_eq!(
            d,
            Decision::Deny {
                role: Some(Role::Viewer),
                reason: "role viewer may not add_cluster".into()
            }
        );
        assert!(allowed(&policy(), 1000, &req(Kind::Status(Empty {}))));
        assert!(!allowed(
            &policy(),
            1000,
            &req(Kind::SubscribeEvents(Default::default()))
        ));
        assert!(allowed(
            &policy(),
            1004,
            &req(Kind::SubscribeEvents(Default::default()))
        ));
    }

    #[test]
    fn tenant_is_confined_to_its_patterns() {
        let p = policy();
        assert!(allowed(&p, 1001, &frontend("www.shop.example.com", "shop-1")));
        assert!(allowed(&p, 1001, &frontend("SHOP.example.com", "shop-1")));
        assert!(allowed(&p, 1001, &frontend("*.shop.example.com", "shop-1")));
        // Another tenant's hostname, a wildcard that covers more than its own names.
        assert!(!allowed(&p, 1001, &frontend("www.other.example.com", "shop-1")));
        assert!(!allowed(&p, 1001, &frontend("*.example.com", "shop-1")));
        assert!(!allowed(&p, 1001, &frontend("shop.example.com.evil.net", "shop-1")));
        // Its hostname, routed to a cluster outside its pattern.
        let d = p.authorize(&peer(1001), &frontend("shop.example.com", "bank"), &State::new());
        match d {
            Decision::Deny { role, reason } => {
                assert_eq!(role, Some(Role::Tenant));
                assert!(reason.contains("cluster `bank`"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(allowed(&p, 1001, &cluster("shop-2")));
        assert!(!allowed(&p, 1001, &cluster("bank")));
        assert!(!allowed(&p, 1001, &req(Kind::SoftStop(Default::default()))));
        let backend = |c: &str| {
            req(Kind::AddBackend(proto::Backend {
                cluster_id: c.into(),
                backend_id: "b".into(),
                address: "127.0.0.1:9000".into(),
                ..Default::default()
            }))
        };
        assert!(allowed(&p, 1001, &backend("shop-1")));
        assert!(!allowed(&p, 1001, &backend("bank")));
    }

    #[test]
    fn tenant_certificates_need_names_it_owns() {
        let p = policy();
        let cert = |names: &[&str]| {
            req(Kind::AddCertificate(Certificate {
                address: "127.0.0.1:8443".into(),
                names: names.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }))
        };
        assert!(allowed(&p, 1001, &cert(&["shop.example.com", "www.shop.example.com"])));
        assert!(!allowed(&p, 1001, &cert(&["shop.example.com", "bank.example.com"])));
        assert!(!allowed(&p, 1001, &cert(&[])));
        // Removing a certificate that is not installed cannot be shown to be its own.
        let remove = req(Kind::RemoveCertificate(proto::CertificateId {
            address: "127.0.0.1:8443".into(),
            fingerprint: "ab".into(),
        }));
        assert!(!allowed(&p, 1001, &remove));
        assert!(allowed(&p, 1002, &remove));
    }

    #[test]
    fn tenant_replaces_and_removes_only_its_installed_certificates() {
        let p = policy();
        let mut state = State::new();
        let listener = req(Kind::AddListener(proto::Listener {
            address: "127.0.0.1:8443".into(),
            protocol: proto::Protocol::Https as i32,
            ..Default::default()
        }));
        state.apply(&listener).unwrap();
        let cert = |der_b64: &str, name: &str| Certificate {
            address: "127.0.0.1:8443".into(),
            certificate: format!("-----BEGIN CERTIFICATE-----\n{der_b64}\n-----END CERTIFICATE-----\n"),
            chain: vec![],
            key: "-----BEGIN PRIVATE KEY-----\nMAE=\n-----END PRIVATE KEY-----\n".into(),
            names: vec![name.into()],
        };
        let own = cert("MIIBAQID", "shop.example.com");
        let other = cert("MIICAQID", "bank.example.com");
        for c in [&own, &other] {
            state.apply(&req(Kind::AddCertificate(c.clone()))).unwrap();
        }
        let remove = |c: &Certificate| {
            req(Kind::RemoveCertificate(proto::CertificateId {
                address: c.address.clone(),
                fingerprint: state::certificate_fingerprint(&c.certificate).unwrap(),
            }))
        };
        let tenant = peer(1001);
        assert!(p.authorize(&tenant, &remove(&own), &state).is_allowed());
        assert!(!p.authorize(&tenant, &remove(&other), &state).is_allowed());
        let replace = |old: &Certificate, new_name: &str| {
            req(Kind::ReplaceCertificate(proto::ReplaceCertificate {
                address: old.address.clone(),
                old_fingerprint: state::certificate_fingerprint(&old.certificate).unwrap(),
                new_certificate: Some(cert("MIIDAQID", new_name)),
            }))
        };
        assert!(
            p.authorize(&tenant, &replace(&own, "www.shop.example.com"), &state)
                .is_allowed()
        );
        assert!(
            !p.authorize(&tenant, &replace(&own, "bank.example.com"), &state)
                .is_allowed()
        );
        assert!(
            !p.authorize(&tenant, &replace(&other, "shop.example.com"), &state)
                .is_allowed()
        );
    }

    #[test]
    fn admin_can_do_everything() {
        let p = policy();
        let all = [
            cluster("anything"),
            req(Kind::RemoveCluster(ClusterId { cluster_id: "x".into() })),
            req(Kind::AddListener(Default::default())),
            req(Kind::HardStop(Empty {})),
            req(Kind::UpgradeMain(Default::default())),
            req(Kind::ReloadPolicy(Empty {})),
            req(Kind::SubscribeEvents(Default::default())),
            req(Kind::SaveState(StatePath { path: "s.jsonl".into() })),
            req(Kind::LoadState(StatePath {
                path: "/var/lib/rampart/s.jsonl".into(),
            })),
            req(Kind::Apply(Batch {
                requests: vec![cluster("a"), frontend("x.example.org", "a")],
                base_state_hash: String::new(),
            })),
        ];
        for r in &all {
            assert!(allowed(&p, 1002, r), "{r:?}");
        }
        assert!(!allowed(&p, 1003, &req(Kind::ReloadPolicy(Empty {}))));
        assert!(allowed(&p, 1003, &req(Kind::SetLoggingLevel(Default::default()))));
    }

    #[test]
    fn batch_with_one_forbidden_request_is_denied() {
        let p = policy();
        let batch = req(Kind::Apply(Batch {
            requests: vec![cluster("shop-1"), cluster("bank")],
            base_state_hash: String::new(),
        }));
        match p.authorize(&peer(1001), &batch, &State::new()) {
            Decision::Deny { reason, .. } => assert!(reason.starts_with("request 1 of the batch"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let good = req(Kind::Apply(Batch {
            requests: vec![cluster("shop-1"), frontend("shop.example.com", "shop-1")],
            base_state_hash: String::new(),
        }));
        assert!(allowed(&p, 1001, &good));
        assert!(!allowed(&p, 1000, &req(Kind::Apply(Batch::default()))));
    }

    #[test]
    fn unknown_peer_is_denied_and_groups_match() {
        let p = policy();
        let stranger = Peer {
            uid: 4242,
            gid: 4242,
            pid: 7,
            groups: vec![],
        };
        assert_eq!(p.role_of(&stranger), None);
        assert!(matches!(
            p.authorize(&stranger, &req(Kind::Status(Empty {})), &State::new()),
            Decision::Deny { role: None, .. }
        ));
        let in_root_group = Peer {
            groups: vec![0],
            ..stranger
        };
        assert_eq!(p.role_of(&in_root_group), Some(Role::Viewer));
    }

    #[test]
    fn default_policy_admits_root_and_supervisor_only() {
        let p = AccessPolicy::default_for(1234);
        assert_eq!(p.role_of(&peer(0)), Some(Role::Admin));
        assert_eq!(p.role_of(&peer(1234)), Some(Role::Admin));
        assert_eq!(p.role_of(&peer(1000)), None);
        assert!(p.to_text().contains("everyone else: denied"));
    }

    #[test]
    fn rate_limiter_limits_one_uid_without_affecting_another() {
        let p = policy();
        let limits = p.limits_for(&peer(1002));
        assert_eq!(limits.mutating_burst, 2);
        let mut rl = RateLimiter::new();
        let t0 = Instant::now();
        assert!(rl.check_request(1002, &limits, RequestClass::Mutating, t0).is_ok());
        assert!(rl.check_request(1002, &limits, RequestClass::Mutating, t0).is_ok());
        assert!(matches!(
            rl.check_request(1002, &limits, RequestClass::Mutating, t0),
            Err(AccessError::RateLimited { uid: 1002, .. })
        ));
        // Read-only requests have their own bucket, and another uid its own.
        assert!(rl.check_request(1002, &limits, RequestClass::ReadOnly, t0).is_ok());
        assert!(rl.check_request(1001, &limits, RequestClass::Mutating, t0).is_ok());
        // One token per second comes back.
        let t1 = t0 + Duration::from_millis(1000);
        assert!(rl.check_request(1002, &limits, RequestClass::Mutating, t1).is_ok());
        assert!(rl.check_request(1002, &limits, RequestClass::Mutating, t1).is_err());

        let op = p.limits_for(&peer(1003));
        assert!(rl.acquire_connection(1003, &op, t0).is_ok());
        assert!(matches!(
            rl.acquire_connection(1003, &op, t0),
            Err(AccessError::TooManyConnections { uid: 1003, max: 1 })
        ));
        assert!(rl.acquire_connection(1002, &limits, t0).is_ok());
        rl.release_connection(1003);
        assert!(rl.acquire_connection(1003, &op, t0).is_ok());
        rl.release_connection(1003);
        rl.release_connection(1002);
        rl.prune(t0 + Duration::from_secs(60), |_| limits);
        assert_eq!(rl.connections(1003), 0);
        assert!(rl.usage.is_empty());
    }

    #[test]
    fn state_paths_are_confined() {
        let p = policy();
        let ok = p.state_path("saved.jsonl").unwrap();
        assert_eq!(ok, PathBuf::from("/var/lib/rampart/saved.jsonl"));
        assert_eq!(
            p.state_path("/var/lib/rampart/./a/b.jsonl").unwrap(),
            PathBuf::from("/var/lib/rampart/a/b.jsonl")
        );
        for bad in [
            "",
            "../etc/passwd",
            "a/../../x",
            "/etc/shadow",
            "/var/lib/rampart/../x",
            "/var/lib/rampartx/y",
            "/var/lib/rampart",
            ".",
            "a\0b",
        ] {
            assert!(p.state_path(bad).is_err(), "{bad:?} accepted");
        }
        let save = req(Kind::SaveState(StatePath {
            path: "../../etc/cron.d/x".into(),
        }));
        match p.authorize(&peer(1002), &save, &State::new()) {
            Decision::Deny { reason, .. } => assert!(reason.contains("`..`"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_line() {
        let e = AccessPolicy::parse("[[grant]]\nuid = 1\nrole = \"king\"\n", Path::new("p.toml")).unwrap_err();
        match e {
            AccessError::Syntax { line, .. } => assert_eq!(line, 3, "{e}"),
            other => panic!("{other}"),
        }
        let e = AccessPolicy::parse(
            "\n[[grant]]\nuser = \"no-such-user-rampart\"\nrole = \"viewer\"\n",
            Path::new("p.toml"),
        )
        .unwrap_err();
        assert!(matches!(e, AccessError::UnknownUser { line: 2, .. }), "{e}");
        let e = AccessPolicy::parse(
            "[[grant]]\ngroup = \"no-such-group-rampart\"\nrole = \"viewer\"\n",
            Path::new("p"),
        )
        .unwrap_err();
        assert!(matches!(e, AccessError::UnknownGroup { .. }), "{e}");
        let e = AccessPolicy::parse("[[grant]]\nuid = 5\nrole = \"viewer\"\ncolour = 1\n", Path::new("p")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = AccessPolicy::parse("[[grant]]\nuid = 5\nrole = \"tenant\"\n", Path::new("p")).unwrap_err();
        assert!(e.to_string().contains("cluster_patterns"), "{e}");
        let e = AccessPolicy::parse(
            "[[grant]]\nuid = 5\nrole = \"tenant\"\ncluster_patterns = [\"*\"]\n",
            Path::new("p"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("matches everything"), "{e}");
        let e = AccessPolicy::parse(
            "[[grant]]\nuid = 5\nrole = \"viewer\"\n[[grant]]\nuser = \"root\"\nrole = \"admin\"\n[[grant]]\nuid = 5\nrole = \"admin\"\n",
            Path::new("p"),
        )
        .unwrap_err();
        assert!(matches!(e, AccessError::Grant { line: 7, .. }), "{e}");
    }

    #[test]
    fn users_resolve_and_text_shows_the_policy() {
        let p = AccessPolicy::parse("[[grant]]\nuser = \"root\"\nrole = \"admin\"\n", Path::new("p.toml")).unwrap();
        assert_eq!(p.role_of(&peer(0)), Some(Role::Admin));
        let text = policy().to_text();
        assert!(text.contains("uid 1001 -> tenant"), "{text}");
        assert!(text.contains("clusters: shop-*"), "{text}");
        assert!(text.contains("group root (gid 0) -> viewer"), "{text}");
    }

    #[test]
    fn glob() {
        assert!(glob_match("shop-*", "shop-1"));
        assert!(glob_match("shop-*", "shop-"));
        assert!(!glob_match("shop-*", "shop"));
        assert!(glob_match("*.shop.example.com", "a.b.shop.example.com"));
        assert!(!glob_match("*.shop.example.com", "shop.example.com"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("**x", "x"));
    }

    #[test]
    fn request_classes() {
        assert_eq!(RequestClass::of(&cluster("a")), RequestClass::Mutating);
        assert_eq!(
            RequestClass::of(&req(Kind::ReloadPolicy(Empty {}))),
            RequestClass::Mutating
        );
        assert_eq!(RequestClass::of(&req(Kind::Status(Empty {}))), RequestClass::ReadOnly);
    }

    /// A tenant's certificate without explicit names is bound by the names it holds (its
    /// subjectAltName, else its common name), the names the state gives it.
    #[test]
    fn a_tenant_certificate_is_judged_by_the_names_it_serves() {
        let p = AccessPolicy::parse(
            "[[grant]]\nuid = 1001\nrole = \"tenant\"\ncluster_patterns = [\"shop-*\"]\nhostname_patterns = [\"shop.example\", \"*.shop.example\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let add = |pem: &str| {
            req(Kind::AddCertificate(Certificate {
                address: "127.0.0.1:443".into(),
                certificate: pem.into(),
                ..Default::default()
            }))
        };
        let own = include_str!("../../command/src/testdata/san.pem");
        assert!(allowed(&p, 1001, &add(own)), "its own names, from the subjectAltName");
        let other = include_str!("../../command/src/testdata/cn-only.pem");
        let Decision::Deny { reason, .. } = p.authorize(&peer(1001), &add(other), &State::new()) else {
            panic!("a certificate for another tenant's name was allowed");
        };
        assert!(reason.contains("legacy.example"), "{reason}");
    }
}
