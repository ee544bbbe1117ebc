//! The configuration file: TOML, every table strict about its keys.
//!
//! Parsing happens in two passes. The first (serde) checks syntax, key names and value types;
//! its errors name the file, the line and the dotted key. The second turns the file into the
//! requests that build a [`State`](crate::state::State) and validates them with the very code
//! that validates runtime requests, so a file and a command can never disagree about what is
//! valid; its errors name the file, the line of the offending table and the key.
//!
//! Every default lives in [`defaults`].

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::proto;
use crate::state::{State, StateError};

/// The embedded configuration served by `rampart start` without `-c`.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Every default value of the configuration file, in one place.
pub mod defaults {
    /// Unix socket of the command server.
    pub const COMMAND_SOCKET: &str = "/run/rampart/rampart.sock";
    /// Directory for saved states; `state save|load` paths are confined to it.
    pub const STATE_DIR: &str = "/var/lib/rampart";
    /// The audit log.
    pub const AUDIT_LOG: &str = "/var/log/rampart/audit.log";
    /// Number of worker processes.
    pub const WORKER_COUNT: u16 = 2;
    /// Client connections per worker; beyond it the worker stops accepting until a slot frees.
    pub const MAX_CONNECTIONS: u32 = 10_000;
    /// Size of each pooled I/O buffer in bytes (two per connection).
    pub const BUFFER_SIZE: u32 = 16_384;
    /// Unprivileged account the workers run as when started as root.
    pub const WORKER_USER: &str = "nobody";
    pub const WORKER_GROUP: &str = "nogroup";
    /// Where the supervisor writes its own log and the workers' log lines.
    pub const LOG_TARGET: &str = "stdout";
    pub const LOG_LEVEL: &str = "info";
    /// Timeouts, in seconds.
    pub const CLIENT_IDLE_TIMEOUT: u32 = 60;
    pub const REQUEST_TIMEOUT: u32 = 10;
    pub const BACKEND_CONNECT_TIMEOUT: u32 = 3;
    pub const BACKEND_RESPONSE_TIMEOUT: u32 = 30;
    /// A client has this long to complete its TLS handshake (a slow HTTP/1.1 head gets
    /// REQUEST_TIMEOUT; a handshake should not get the whole CLIENT_IDLE_TIMEOUT).
    pub const TLS_HANDSHAKE_TIMEOUT: u32 = 10;
    /// How long a soft stop (or SIGTERM) lets in-flight requests finish.
    pub const SHUTDOWN_GRACE: u32 = 30;
    /// What statsd names start with.
    pub const STATSD_PREFIX: &str = "rampart";
    /// Metric series (listener, cluster, backend) each worker keeps at most.
    pub const METRICS_MAX_SERIES: u32 = 4096;
    /// Tunnels of retired workers run for at most ten minutes after an upgrade.
    pub const UPGRADE_GRACE: u32 = 600;
    /// Weight of a backend when the file names none.
    pub const BACKEND_WEIGHT: u32 = 100;
    /// Lowest TLS version an HTTPS listener accepts.
    pub const TLS_MIN_VERSION: &str = "1.2";
    /// Whether a listener may be bound on an address another process already listens on.
    pub const SHARE_LISTENERS: bool = false;
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {key}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        /// Dotted path of the key (`clusters.app.backends[0].weight`), or "(document)".
        key: String,
        message: String,
    },
    #[error("{}:{line}: {key}: {source}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        #[source]
        source: Box<StateError>,
    },
    #[error("{}:{line}: {key}: cannot read {}: {source}", file.display(), path.display())]
    Certificate {
        file: PathBuf,
        line: usize,
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {key}: duplicate: {what} is declared twice; remove one", file.display())]
    Duplicate {
        file: PathBuf,
        line: usize,
        key: String,
        what: String,
    },
    #[error("{}:{line}: {key}: {message}", file.display())]
    Value {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    #[default]
    Http,
    Https,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    Random,
    LeastConnections,
    PowerOfTwo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    #[default]
    Prefix,
    Equals,
    Regex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SeccompAction {
    /// A forbidden system call kills the worker (SIGSYS).
    #[default]
    Kill,
    /// A forbidden system call is logged by the kernel and allowed: for debugging only.
    Log,
}

/// The top level of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "d_command_socket")]
    pub command_socket: PathBuf,
    #[serde(default = "d_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "d_audit_log")]
    pub audit_log: PathBuf,
    /// Where every acknowledged runtime change is saved (the whole state, private keys
    /// included, mode 0600), and loaded from at start. Inside `state_dir`; a relative path is
    /// taken inside it. None: runtime changes last until the supervisor stops.
    #[serde(default)]
    pub saved_state: Option<PathBuf>,
    /// Access policy file; none means root and the supervisor's uid are admin, nobody else.
    #[serde(default)]
    pub access_policy: Option<PathBuf>,
    #[serde(default = "d_worker_count")]
    pub worker_count: u16,
    #[serde(default = "d_max_connections")]
    pub max_connections: u32,
    #[serde(default = "d_buffer_size")]
    pub buffer_size: u32,
    #[serde(default = "d_worker_user")]
    pub worker_user: String,
    #[serde(default = "d_worker_group")]
    pub worker_group: String,
    #[serde(default = "d_log_target")]
    pub log_target: String,
    #[serde(default = "d_log_level")]
    pub log_level: String,
    /// Keep private keys out of the workers (a separate keyring process signs for them). The
    /// keyring is not built yet, so HTTPS certificates need `key_isolation = false`, which hands
    /// keys to the workers.
    #[serde(default = "d_key_isolation")]
    pub key_isolation: bool,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub listeners: Vec<Spanned<ListenerConfig>>,
    #[serde(default)]
    pub clusters: BTreeMap<String, Spanned<ClusterConfig>>,
    /// Bind listeners on addresses another process (another rampart) already listens on.
    /// Every listening socket is SO_REUSEPORT, so the kernel would split the traffic between
    /// the two: by default the supervisor refuses such an address and names the other process.
    #[serde(default = "d_share_listeners")]
    pub share_listeners: bool,
    /// The file this was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub source: PathBuf,
    #[serde(skip)]
    text: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub client_idle: u32,
    pub request: u32,
    pub backend_connect: u32,
    pub backend_response: u32,
    pub shutdown_grace: u32,
    /// Seconds the workers an upgrade (or a re-jail, or a replacement) retires may keep their
    /// tunnels (WebSocket, TCP) open before they are closed.
    pub upgrade_grace: u32,
    /// A TLS handshake not complete after this many seconds ends the connection.
    pub tls_handshake: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_idle: defaults::CLIENT_IDLE_TIMEOUT,
            request: defaults::REQUEST_TIMEOUT,
            backend_connect: defaults::BACKEND_CONNECT_TIMEOUT,
            backend_response: defaults::BACKEND_RESPONSE_TIMEOUT,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            upgrade_grace: defaults::UPGRADE_GRACE,
            tls_handshake: defaults::TLS_HANDSHAKE_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Series (one per listener, cluster and backend that served) each worker keeps at most;
    /// requests beyond are counted in the totals and in `series_overflow`.
    pub max_series: u32,
    /// Where the supervisor serves `GET /metrics` in Prometheus's text format.
    pub prometheus: Option<String>,
    /// Where the supervisor sends statsd lines (IP:PORT, UDP).
    pub statsd: Option<String>,
    pub statsd_prefix: String,
    /// DogStatsD tags instead of labels in the names.
    pub statsd_tags: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            max_series: defaults::METRICS_MAX_SERIES,
            prometheus: None,
            statsd: None,
            statsd_prefix: defaults::STATSD_PREFIX.into(),
            statsd_tags: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Refuse to start when landlock cannot be fully enforced.
    pub require_landlock: bool,
    /// Let workers connect to any TCP port instead of only the configured backends' ports.
    pub connect_any_port: bool,
    /// More ports workers may connect to, for backends added at runtime: landlock rules are
    /// fixed when a worker starts, so a backend on a port outside this list and the file's
    /// backends is refused until the workers restart with a configuration that names it.
    pub backend_ports: Vec<u16>,
    /// With `true`, `backend_ports` (with the file's backends) is a closed list: a backend added
    /// at runtime on another port is refused. With `false` (the default), the workers are
    /// replaced one by one with jails that allow the new port, then the change is applied.
    pub closed_backend_ports: bool,
    pub seccomp_action: SeccompAction,
}

/// How the audit trail is protected beyond its hash chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Ed25519 seed file (`rampart audit keygen`) that signs checkpoints; none: unsigned.
    pub signing_key: Option<PathBuf>,
    /// HMAC key state file (`rampart audit keygen --hmac`); none: records carry no MAC.
    pub hmac_key: Option<PathBuf>,
    /// Records per HMAC epoch (the key evolves and the old one is erased).
    pub epoch_records: u64,
    /// A checkpoint after this many records.
    pub checkpoint_every: u64,
    /// A checkpoint after this many seconds with records written.
    pub checkpoint_interval: u64,
    /// Mirror every record to this syslog socket (e.g. "/dev/log"); none: no mirror.
    pub syslog_socket: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            signing_key: None,
            hmac_key: None,
            epoch_records: 1000,
            checkpoint_every: 1000,
            checkpoint_interval: 300,
            syslog_socket: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    #[serde(default)]
    pub public_address: Option<String>,
    #[serde(default)]
    pub expect_proxy_protocol: bool,
    #[serde(default)]
    pub send_proxy_protocol: bool,
    /// Custom bodies of default answers, by status code: `answers = { 404 = "..." }`.
    #[serde(default)]
    pub answers: BTreeMap<String, String>,
    #[serde(default)]
    pub tls_min_version: Option<String>,
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    /// HTTPS key exchange groups, most preferred first.
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub timeouts: Option<ListenerTimeouts>,
    /// HTTPS: the certificate (fingerprint, or a server name one of the listener's
    /// certificates serves) for a handshake whose SNI names none of them.
    #[serde(default)]
    pub default_certificate: Option<String>,
    /// HTTPS: refuse a handshake whose SNI names no certificate (or that has none) with the
    /// alert unrecognized_name, instead of serving a default.
    #[serde(default)]
    pub strict_sni: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerTimeouts {
    pub client_idle: u32,
    pub request: u32,
    pub backend_connect: u32,
    pub backend_response: u32,
    /// HTTPS: seconds for a TLS handshake to complete.
    pub tls_handshake: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    #[serde(default)]
    pub sticky_session: bool,
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default)]
    pub answer_503: Option<String>,
    #[serde(default)]
    pub frontends: Vec<Spanned<FrontendConfig>>,
    #[serde(default)]
    pub backends: Vec<Spanned<BackendConfig>>,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendConfig {
    /// The listener this frontend belongs to.
    pub address: String,
    /// Host to match (exact or `*.example.com`); absent for TCP listeners.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_kind: PathKind,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// HTTPS: PEM files, relative to the configuration file's directory.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    #[serde(default)]
    pub certificate_chain: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The server names the certificate serves; absent: the names in the certificate (its
    /// subjectAltName DNS names, or its common name when it has none).
    #[serde(default)]
    pub certificate_names: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: String,
    /// Defaults to the address.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default = "d_weight")]
    pub weight: u32,
    #[serde(default)]
    pub backup: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub path: String,
    #[serde(default = "d_hc_interval")]
    pub interval_ms: u32,
    #[serde(default = "d_hc_timeout")]
    pub timeout_ms: u32,
    #[serde(default = "d_hc_threshold")]
    pub healthy_threshold: u32,
    #[serde(default = "d_hc_threshold")]
    pub unhealthy_threshold: u32,
    #[serde(default = "d_hc_status")]
    pub expected_status: u32,
}

fn d_command_socket() -> PathBuf {
    defaults::COMMAND_SOCKET.into()
}
fn d_state_dir() -> PathBuf {
    defaults::STATE_DIR.into()
}
fn d_audit_log() -> PathBuf {
    defaults::AUDIT_LOG.into()
}
fn d_worker_count() -> u16 {
    defaults::WORKER_COUNT
}
fn d_max_connections() -> u32 {
    defaults::MAX_CONNECTIONS
}
fn d_buffer_size() -> u32 {
    defaults::BUFFER_SIZE
}
fn d_worker_user() -> String {
    defaults::WORKER_USER.into()
}
fn d_worker_group() -> String {
    defaults::WORKER_GROUP.into()
}
fn d_log_target() -> String {
    defaults::LOG_TARGET.into()
}
fn d_log_level() -> String {
    defaults::LOG_LEVEL.into()
}
fn d_key_isolation() -> bool {
    true
}
fn d_share_listeners() -> bool {
    defaults::SHARE_LISTENERS
}
fn d_weight() -> u32 {
    defaults::BACKEND_WEIGHT
}
fn d_hc_interval() -> u32 {
    5_000
}
fn d_hc_timeout() -> u32 {
    2_000
}
fn d_hc_threshold() -> u32 {
    3
}
fn d_hc_status() -> u32 {
    200
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

/// Where a request generated from the file came from.
#[derive(Debug, Clone)]
pub struct Origin {
    pub key: String,
    pub span: Range<usize>,
    /// The request completes an item added earlier in the list (a listener's default
    /// certificate, set once its certificates exist): it updates rather than adds.
    pub completes: bool,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// A summary of what a file declares, for `rampart config check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub listeners: usize,
    pub clusters: usize,
    pub frontends: usize,
    pub backends: usize,
    pub certificates: usize,
    pub state_hash: String,
}

impl Config {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// The embedded default configuration.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, Path::new("(embedded default)"))
    }

    /// Parses `text`; `source` names it in errors and anchors relative certificate paths.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let deserializer = toml::de::Deserializer::parse(text).map_err(|e| syntax(text, source, "(document)", &e))?;
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // Spanned<T> shows up in serde's path as a private field name: hide it.
            let key = e.path().to_string().replace("$__serde_spanned_private_value.", "");
            let key = if key == "." { "(document)".to_string() } else { key };
            syntax(text, source, &key, e.inner())
        })?;
        config.source = source.to_path_buf();
        config.text = text.to_string();
        config.check_globals()?;
        Ok(config)
    }

    fn value_error(&self, key: &str, span: Option<Range<usize>>, message: String) -> ConfigError {
        let line = span.map_or(0, |s| line_column(&self.text, s.start).0);
        ConfigError::Value {
            file: self.source.clone(),
            line,
            key: key.to_string(),
            message,
        }
    }

    /// `saved_state` as an absolute path inside `state_dir`, if set.
    pub fn saved_state_path(&self) -> Option<PathBuf> {
        self.saved_state.as_ref().map(|p| self.state_dir.join(p))
    }

    fn check_globals(&self) -> Result<(), ConfigError> {
        if let Some(path) = self.saved_state_path() {
            use std::path::Component;
            let inside = path.starts_with(&self.state_dir)
                && path != self.state_dir
                && !path.components().any(|c| matches!(c, Component::ParentDir));
            if !inside {
                return Err(self.value_error(
                    "saved_state",
                    None,
                    format!(
                        "{} is outside state_dir ({}): the supervisor may write only there",
                        path.display(),
                        self.state_dir.display()
                    ),
                ));
            }
        }
        if self.worker_count == 0 || self.worker_count > 256 {
            return Err(self.value_error(
                "worker_count",
                None,
                format!("{} is out of range: use 1 to 256 workers", self.worker_count),
            ));
        }
        if self.max_connections == 0 {
            return Err(self.value_error("max_connections", None, "must be at least 1".into()));
        }
        if !(1024..=1024 * 1024).contains(&self.buffer_size) {
            return Err(self.value_error(
                "buffer_size",
                None,
                format!("{} is out of range: use 1024 to 1048576 bytes", self.buffer_size),
            ));
        }
        if !(1..=3600).contains(&self.timeouts.tls_handshake) {
            return Err(self.value_error(
                "timeouts.tls_handshake",
                None,
                format!("{} is out of range: use 1 to 3600 seconds", self.timeouts.tls_handshake),
            ));
        }
        if !(1..=86400).contains(&self.timeouts.upgrade_grace) {
            return Err(self.value_error(
                "timeouts.upgrade_grace",
                None,
                format!(
                    "{} is out of range: use 1 to 86400 seconds",
                    self.timeouts.upgrade_grace
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.metrics.max_series) {
            return Err(self.value_error(
                "metrics.max_series",
                None,
                format!("{} is out of range: use 1 to 1000000", self.metrics.max_series),
            ));
        }
        if let Some(address) = &self.metrics.prometheus
            && address.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(self.value_error(
                "metrics.prometheus",
                None,
                format!("`{address}` is not an address and port such as 127.0.0.1:9100"),
            ));
        }
        if let Some(address) = &self.metrics.statsd
            && let Err(e) = crate::metrics::check_statsd(address, &self.metrics.statsd_prefix)
        {
            return Err(self.value_error("metrics.statsd", None, e));
        }
        if self.worker_user.is_empty() || self.worker_group.is_empty() {
            return Err(self.value_error(
                "worker_user",
                None,
                "worker_user and worker_group must name an account".into(),
            ));
        }
        Ok(())
    }

    fn base_dir(&self) -> PathBuf {
        self.source.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    fn read_pem(&self, key: &str, span: &Range<usize>, path: &Path) -> Result<String, ConfigError> {
        let full = self.base_dir().join(path);
        std::fs::read_to_string(&full).map_err(|source| ConfigError::Certificate {
            file: self.source.clone(),
            line: line_column(&self.text, span.start).0,
            key: key.to_string(),
            path: full,
            source,
        })
    }

    /// The requests that build this configuration's state from nothing, in dependency order,
    /// each with the place in the file it comes from. Reads certificate files.
    pub fn requests(&self) -> Result<Vec<(proto::Request, Origin)>, ConfigError> {
        use proto::request::Kind;
        let mut out = Vec::new();
        let mut push = |kind: Kind, key: String, span: Range<usize>| {
            out.push((
                proto::Request {
                    id: String::new(),
                    kind: Some(kind),
                },
                Origin {
                    key,
                    span,
                    completes: false,
                },
            ));
        };
        let mut defaults = Vec::new();
        let mut protocols = BTreeMap::new();
        let mut certificates: Vec<(String, Option<String>, Vec<String>)> = Vec::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            let span = listener.span();
            let l = listener.get_ref();
            protocols.insert(l.address.clone(), l.protocol);
            let t = l.timeouts.clone().unwrap_or_default();
            let protocol = match l.protocol {
                ListenerProtocol::Http => proto::Protocol::Http,
                ListenerProtocol::Https => proto::Protocol::Https,
                ListenerProtocol::Tcp => proto::Protocol::Tcp,
            };
            let listener = proto::Listener {
                address: l.address.clone(),
                protocol: protocol as i32,
                public_address: l.public_address.clone().unwrap_or_default(),
                expect_proxy_protocol: l.expect_proxy_protocol,
                send_proxy_protocol: l.send_proxy_protocol,
                client_idle_timeout_ms: t.client_idle.saturating_mul(1000),
                request_timeout_ms: t.request.saturating_mul(1000),
                backend_connect_timeout_ms: t.backend_connect.saturating_mul(1000),
                backend_response_timeout_ms: t.backend_response.saturating_mul(1000),
                answers: l.answers.clone(),
                tls_min_version: l.tls_min_version.clone().unwrap_or_default(),
                cipher_suites: l.cipher_suites.clone(),
                groups: l.groups.clone(),
                active: true,
                default_certificate: l.default_certificate.clone().unwrap_or_default(),
                strict_sni: l.strict_sni,
                tls_handshake_timeout_ms: t.tls_handshake.saturating_mul(1000),
            };
            // Its default certificate is set once the certificates of the frontends exist.
            if !listener.default_certificate.is_empty() {
                defaults.push((
                    listener.clone(),
                    format!("listeners[{i}].default_certificate"),
                    span.clone(),
                ));
            }
            push(
                Kind::AddListener(proto::Listener {
                    default_certificate: String::new(),
                    ..listener
                }),
                format!("listeners[{i}]"),
                span,
            );
        }
        for (id, cluster) in &self.clusters {
            let span = cluster.span();
            let c = cluster.get_ref();
            let lb = match c.load_balancing {
                LoadBalancing::RoundRobin => proto::LoadBalancing::RoundRobin,
                LoadBalancing::Random => proto::LoadBalancing::Random,
                LoadBalancing::LeastConnections => proto::LoadBalancing::LeastConnections,
                LoadBalancing::PowerOfTwo => proto::LoadBalancing::PowerOfTwo,
            };
            push(
                Kind::AddCluster(proto::Cluster {
                    cluster_id: id.clone(),
                    load_balancing: lb as i32,
                    sticky_session: c.sticky_session,
                    https_redirect: c.https_redirect,
                    answer_503: c.answer_503.clone().unwrap_or_default(),
                }),
                format!("clusters.{id}"),
                span.clone(),
            );
            for (i, backend) in c.backends.iter().enumerate() {
                let b = backend.get_ref();
                push(
                    Kind::AddBackend(proto::Backend {
                        cluster_id: id.clone(),
                        backend_id: b.id.clone().unwrap_or_else(|| b.address.clone()),
                        address: b.address.clone(),
                        weight: b.weight,
                        backup: b.backup,
                    }),
                    format!("clusters.{id}.backends[{i}]"),
                    backend.span(),
                );
            }
            for (i, frontend) in c.frontends.iter().enumerate() {
                let key = format!("clusters.{id}.frontends[{i}]");
                let fspan = frontend.span();
                let f = frontend.get_ref();
                match protocols.get(&f.address) {
                    Some(ListenerProtocol::Tcp) => {
                        push(
                            Kind::AddTcpFrontend(proto::TcpFrontend {
                                address: f.address.clone(),
                                cluster_id: id.clone(),
                            }),
                            key,
                            fspan,
                        );
                    }
                    protocol => {
                        let https = protocol == Some(&ListenerProtocol::Https);
                        let hostname = f.hostname.clone().ok_or_else(|| {
                            self.value_error(
                                &format!("{key}.hostname"),
                                Some(fspan.clone()),
                                "an HTTP or HTTPS frontend needs a hostname".into(),
                            )
                        })?;
                        let path_kind = match f.path_kind {
                            PathKind::Prefix => proto::PathKind::Prefix,
                            PathKind::Equals => proto::PathKind::Equals,
                            PathKind::Regex => proto::PathKind::Regex,
                        };
                        let frontend = proto::HttpFrontend {
                            address: f.address.clone(),
                            hostname,
                            path: Some(proto::PathRule {
                                kind: path_kind as i32,
                                value: f.path.clone().unwrap_or_default(),
                            }),
                            method: f.method.clone().unwrap_or_default(),
                            cluster_id: id.clone(),
                            tags: f.tags.clone(),
                        };
                        if https {
                            if let Some(cert_path) = &f.certificate {
                                let certificate = self.read_pem(&format!("{key}.certificate"), &fspan, cert_path)?;
                                let chain = match &f.certificate_chain {
                                    Some(p) => vec![self.read_pem(&format!("{key}.certificate_chain"), &fspan, p)?],
                                    None => Vec::new(),
                                };
                                let key_pem = match &f.key {
                                    Some(p) => self.read_pem(&format!("{key}.key"), &fspan, p)?,
                                    None => {
                                        return Err(self.value_error(
                                            &format!("{key}.key"),
                                            Some(fspan.clone()),
                                            "a frontend with a certificate needs its key".into(),
                                        ));
                                    }
                                };
                                let names = f.certificate_names.clone().unwrap_or_default();
                                // One certificate for several frontends (a.example and
                                // www.a.example under one subjectAltName) is added once.
                                let id = (
                                    f.address.clone(),
                                    crate::state::certificate_fingerprint(&certificate).ok(),
                                    names.clone(),
                                );
                                if id.1.is_none() || !certificates.contains(&id) {
                                    certificates.push(id);
                                    push(
                                        Kind::AddCertificate(proto::Certificate {
                                            address: f.address.clone(),
                                            certificate,
                                            chain,
                                            key: key_pem,
                                            names,
                                        }),
                                        format!("{key}.certificate"),
                                        fspan.clone(),
                                    );
                                }
                            }
                            if f.certificate.is_none() && f.certificate_names.is_some() {
                                return Err(self.value_error(
                                    &format!("{key}.certificate_names"),
                                    Some(fspan.clone()),
                                    "certificate_names names what a certificate serves: add the frontend's `certificate` and `key`, or remove it".into(),
                                ));
                            }
                            push(Kind::AddHttpsFrontend(frontend), key, fspan);
                        } else {
                            if f.certificate.is_some() || f.certificate_names.is_some() {
                                return Err(self.value_error(
                                    &format!("{key}.certificate"),
                                    Some(fspan.clone()),
                                    format!(
                                        "listener {} is not HTTPS: certificates belong on HTTPS listeners",
                                        f.address
                                    ),
                                ));
                            }
                            push(Kind::AddHttpFrontend(frontend), key, fspan);
                        }
                    }
                }
            }
            if let Some(hc) = &c.health_check {
                push(
                    Kind::SetHealthCheck(proto::HealthCheck {
                        cluster_id: id.clone(),
                        path: hc.path.clone(),
                        interval_ms: hc.interval_ms,
                        timeout_ms: hc.timeout_ms,
                        healthy_threshold: hc.healthy_threshold,
                        unhealthy_threshold: hc.unhealthy_threshold,
                        expected_status: hc.expected_status,
                    }),
                    format!("clusters.{id}.health_check"),
                    span.clone(),
                );
            }
        }
        for (listener, key, span) in defaults {
            out.push((
                proto::Request {
                    id: String::new(),
                    kind: Some(Kind::UpdateListener(proto::ListenerUpdate {
                        address: listener.address.clone(),
                        listener: Some(listener),
                        fields: vec!["default_certificate".into()],
                    })),
                },
                Origin {
                    key,
                    span,
                    completes: true,
                },
            ));
        }
        Ok(out)
    }

    /// Builds the state this file describes, validating every item as a runtime request would be.
    pub fn to_state(&self) -> Result<State, ConfigError> {
        let mut state = State::default();
        for (request, origin) in self.requests()? {
            // Counted only for an error: counting lines for every item made a large file
            // quadratic (100,000 frontends took 17 s).
            let line = || line_column(&self.text, origin.span.start).0;
            let change = state.apply(&request).map_err(|source| ConfigError::Invalid {
                file: self.source.clone(),
                line: line(),
                key: origin.key.clone(),
                source: Box::new(source),
            })?;
            // At runtime, adding an existing listener or backend updates it; in a file, the
            // same thing declared twice is a mistake.
            match change {
                crate::state::Change::Added(_) => {}
                crate::state::Change::Updated(_) if origin.completes => {}
                crate::state::Change::Updated(what) | crate::state::Change::Unchanged(what) => {
                    return Err(ConfigError::Duplicate {
                        file: self.source.clone(),
                        line: line(),
                        key: origin.key.clone(),
                        what,
                    });
                }
                other => {
                    return Err(self.value_error(&origin.key, Some(origin.span), format!("unexpected change {other}")));
                }
            }
        }
        Ok(state)
    }

    /// Validates the whole file and summarizes it.
    pub fn check(&self) -> Result<Summary, ConfigError> {
        let state = self.to_state()?;
        Ok(Summary {
            listeners: state.listeners().len(),
            clusters: state.clusters().len(),
            frontends: state.frontend_count(),
            backends: state.backend_count(),
            certificates: state.certificate_count(),
            state_hash: state.hash_hex(),
        })
    }

    /// TCP ports of every configured backend (the landlock connect rule of the workers).
    pub fn backend_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .clusters
            .values()
            .flat_map(|c| c.get_ref().backends.iter())
            .filter_map(|b| b.get_ref().address.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

fn line_key(text: &str, offset: usize) -> Option<String> {
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(start..)?.lines().next()?.trim();
    if let Some(header) = line.strip_prefix('[') {
        let inner = header.trim_start_matches('[');
        let end = inner.find(']')?;
        return Some(inner.get(..end)?.trim().to_string());
    }
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_string())
}

fn syntax(text: &str, source: &Path, key: &str, error: &toml::de::Error) -> ConfigError {
    let (line, column) = error.span().map_or((0, 0), |s| line_column(text, s.start));
    // Document-level errors (a duplicate key, a syntax error) have no serde path: name the key
    // written on the offending line (a table header or `key = value`).
    let key = if key == "(document)" {
        error
            .span()
            .and_then(|s| line_key(text, s.start))
            .unwrap_or_else(|| key.to_string())
    } else {
        key.to_string()
    };
    ConfigError::Syntax {
        file: source.to_path_buf(),
        line,
        column,
        key,
        message: error.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<State, ConfigError> {
        Config::parse(text, Path::new("test.toml"))?.to_state()
    }

    const GOOD: &str = r#"
worker_count = 2

[[listeners]]
address = "127.0.0.1:8080"

[[listeners]]
address = "127.0.0.1:5432"
protocol = "tcp"

[clusters.app]
load_balancing = "least_connections"
backends = [ { address = "127.0.0.1:9000" }, { address = "127.0.0.1:9001", weight = 50 } ]
frontends = [ { address = "127.0.0.1:8080", hostname = "example.com", path = "/api" } ]

[clusters.db]
backends = [ { address = "127.0.0.1:15432" } ]
frontends = [ { address = "127.0.0.1:5432" } ]
"#;

    #[test]
    fn a_good_file_builds_its_state() {
        let config = Config::parse(GOOD, Path::new("test.toml")).unwrap();
        let summary = config.check().unwrap();
        assert_eq!(
            (summary.listeners, summary.clusters, summary.frontends, summary.backends),
            (2, 2, 2, 3)
        );
        assert_eq!(config.backend_ports(), vec![9000, 9001, 15432]);
        assert_eq!(config.timeouts.client_idle, defaults::CLIENT_IDLE_TIMEOUT);
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let config = Config::embedded().unwrap();
        let summary = config.check().unwrap();
        assert_eq!(summary.listeners, 1);
        assert_eq!(config.worker_count, defaults::WORKER_COUNT);
    }

    fn syntax_error(text: &str) -> (usize, String, String) {
        match Config::parse(text, Path::new("test.toml")).unwrap_err() {
            ConfigError::Syntax { line, key, message, .. } => (line, key, message),
            other => panic!("expected a syntax error, got {other}"),
        }
    }

    #[test]
    fn broken_toml_names_the_line() {
        let (line, _, message) = syntax_error("worker_count = 2\n[[listeners]\naddress = 1\n");
        assert_eq!(line, 2, "{message}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let (line, key, message) = syntax_error(&GOOD.replace("weight = 50", "wieght = 50"));
        assert_eq!(key, "clusters.app.backends[1].wieght");
        assert!(message.contains("unknown field `wieght`"), "{message}");
        assert!(
            message.contains("`weight`"),
            "the message lists what is expected: {message}"
        );
        assert_eq!(line, 13);
        let (_, key, _) = syntax_error("bogus = 1\n");
        assert_eq!(key, "bogus");
    }

    #[test]
    fn wrong_types_say_what_was_expected() {
        let (line, key, message) = syntax_error("worker_count = \"two\"\n");
        assert_eq!((line, key.as_str()), (1, "worker_count"));
        assert!(message.contains("expected u16"), "{message}");
        let (_, key, message) = syntax_error(&GOOD.replace("\"least_connections\"", "\"fastest\""));
        assert_eq!(key, "clusters.app.load_balancing");
        assert!(message.contains("round_robin"), "{message}");
    }

    #[test]
    fn duplicate_ids_are_refused() {
        // The same cluster table twice: TOML itself refuses it.
        let text = format!("{GOOD}\n[clusters.app]\n");
        let err = Config::parse(&text, Path::new("test.toml")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Syntax { key, message, .. } if key == "clusters.app" && message.contains("duplicate")),
            "{err}"
        );
        // The same listener twice.
        let text = GOOD.replace(
            "address = \"127.0.0.1:5432\"\nprotocol = \"tcp\"",
            "address = \"127.0.0.1:8080\"\nprotocol = \"http\"",
        );
        let text = text.replace("[clusters.db]\nbackends = [ { address = \"127.0.0.1:15432\" } ]\nfrontends = [ { address = \"127.0.0.1:5432\" } ]\n", "");
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Duplicate { key, line: 7, .. } if key == "listeners[1]"),
            "{err}"
        );
        // The same backend twice.
        let err = parse(&GOOD.replace("127.0.0.1:9001", "127.0.0.1:9000")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Duplicate { key, .. } if key == "clusters.app.backends[1]"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_file_line_and_key() {
        let err = parse(&GOOD.replace("hostname = \"example.com\"", "hostname = \"exa mple.com\"")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("test.toml:14: clusters.app.frontends[0]: invalid hostname"),
            "{text}"
        );
        let err = parse(&GOOD.replace("127.0.0.1:15432", "db.internal:5432")).unwrap_err();
        assert!(err.to_string().contains("clusters.db.backends[0]"), "{err}");
        let err = parse(&GOOD.replace(
            "address = \"127.0.0.1:8080\", hostname",
            "address = \"127.0.0.1:8081\", hostname",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("unknown listener 127.0.0.1:8081"), "{err}");
        let err = Config::parse("worker_count = 0\n", Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("use 1 to 256 workers"), "{err}");
    }

    #[test]
    fn missing_certificate_files_are_named() {
        let text = r#"
[[listeners]]
address = "127.0.0.1:8443"
protocol = "https"

[clusters.app]
frontends = [ { address = "127.0.0.1:8443", hostname = "a.com", certificate = "missing.pem", key = "missing.key" } ]
"#;
        let err = parse(text).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Certificate { line: 7, path, .. } if path.ends_with("missing.pem")),
            "{err}"
        );
    }

    /// A certificate in the file serves the names it holds unless `certificate_names` says
    /// otherwise, and one certificate shared by several frontends is added once.
    #[test]
    fn file_certificates_are_named_by_themselves_and_shared() {
        let dir = std::env::temp_dir().join(format!("rampart-config-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("san.pem"), include_str!("testdata/san.pem")).unwrap();
        std::fs::write(dir.join("cn.pem"), include_str!("testdata/cn-only.pem")).unwrap();
        std::fs::write(
            dir.join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let text = r#"
[[listeners]]
address = "127.0.0.1:8443"
protocol = "https"

[clusters.shop]
frontends = [
  { address = "127.0.0.1:8443", hostname = "shop.example", certificate = "san.pem", key = "key.pem" },
  { address = "127.0.0.1:8443", hostname = "www.shop.example", certificate = "san.pem", key = "key.pem" },
  { address = "127.0.0.1:8443", hostname = "legacy.example", certificate = "cn.pem", key = "key.pem", certificate_names = ["old.example"] },
]
"#;
        let state = Config::parse(text, &dir.join("rampart.toml"))
            .unwrap()
            .to_state()
            .unwrap();
        let mut names: Vec<Vec<String>> = state.certificates().map(|(_, c)| c.names.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                vec!["old.example".to_string()],
                vec!["shop.example".into(), "*.shop.example".into()]
            ]
        );
        let err = Config::parse(
            &text.replace(", certificate = \"cn.pem\", key = \"key.pem\"", ""),
            &dir.join("rampart.toml"),
        )
        .unwrap()
        .to_state()
        .unwrap_err();
        assert!(err.to_string().contains("frontends[2].certificate_names"), "{err}");

        // The listener's TLS settings: its default certificate is set once the frontends'
        // certificates exist.
        let tls = text.replace(
            "protocol = \"https\"",
            "protocol = \"https\"\ndefault_certificate = \"www.shop.example\"\ntimeouts = { tls_handshake = 2 }",
        );
        let config = Config::parse(&tls, &dir.join("rampart.toml")).unwrap();
        let state = config.to_state().unwrap();
        let l = &state.listeners()["127.0.0.1:8443"];
        assert_eq!(
            (l.default_certificate.as_str(), l.tls_handshake_timeout_ms),
            ("www.shop.example", 2000)
        );
        assert_eq!(config.timeouts.tls_handshake, defaults::TLS_HANDSHAKE_TIMEOUT);
        let err = Config::parse(
            &tls.replace("www.shop.example\"", "nowhere.example\""),
            &dir.join("rampart.toml"),
        )
        .unwrap()
        .to_state()
        .unwrap_err();
        assert!(err.to_string().contains("listeners[0].default_certificate"), "{err}");
        let err = Config::parse(
            &tls.replace("default_certificate", "strict_sni = true\ndefault_certificate"),
            &dir.join("rampart.toml"),
        )
        .unwrap()
        .to_state()
        .unwrap_err();
        assert!(err.to_string().contains("strict_sni"), "{err}");
        let err = Config::parse(
            &format!("[timeouts]\ntls_handshake = 0\n{text}"),
            &dir.join("rampart.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("timeouts.tls_handshake"), "{err}");
        let err = Config::parse(
            &format!("[timeouts]\nupgrade_grace = 90000\n{text}"),
            &dir.join("rampart.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("timeouts.upgrade_grace"), "{err}");
        assert!(err.to_string().contains("1 to 86400"), "{err}");
        let ok = Config::parse(
            &format!("[timeouts]\nupgrade_grace = 5\n{text}"),
            &dir.join("rampart.toml"),
        )
        .unwrap();
        assert_eq!(ok.timeouts.upgrade_grace, 5);
        let err = Config::parse(&format!("[metrics]\nmax_series = 0\n{text}"), &dir.join("rampart.toml")).unwrap_err();
        assert!(err.to_string().contains("metrics.max_series"), "{err}");
        let err = Config::parse(
            &format!("[metrics]\nprometheus = \"localhost\"\n{text}"),
            &dir.join("rampart.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("metrics.prometheus"), "{err}");
        let err = Config::parse(
            &format!("[metrics]\nstatsd = \"127.0.0.1:8125\"\nstatsd_prefix = \"a b\"\n{text}"),
            &dir.join("rampart.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("prefix"), "{err}");
        let err = Config::parse(&format!("[metrics]\nstatsd = 1\n{text}"), &dir.join("rampart.toml")).unwrap_err();
        assert!(err.to_string().contains("statsd"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
