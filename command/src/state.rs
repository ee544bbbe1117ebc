//! The state: the one model of the running configuration.
//!
//! Every configuration change is a [`proto::Request`]; [`State::apply`] validates it against the
//! whole state and either applies it and says what changed, or returns a [`StateError`] and
//! leaves the state untouched. The supervisor applies a request first; workers apply exactly the
//! requests the supervisor accepted, so they never have to reject one.
//!
//! Identity rules, chosen so that a control plane can push the same request twice safely where
//! it makes sense:
//! - listeners, clusters and backends have ids (address, cluster id, backend id): adding a
//!   cluster or backend that exists updates it; adding a listener that exists with other
//!   settings is refused (`update_listener` changes it, and its protocol never changes);
//! - frontends are routing rules identified by what they match (listener, hostname, path,
//!   method): adding the same rule twice is an error, and a rule that already routes to another
//!   cluster is a conflict;
//! - removing a cluster removes its backends, but is refused while frontends
//!   still route to it; removing a listener is refused while frontends or certificates use it.
//!
//! All collections are ordered maps, so every operation is O(log n), a dump is canonical, and
//! [`State::hash`] is stable across processes and versions of this crate with the same schema.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use base64::Engine;
use prost::Message;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::proto::{self, request::Kind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the request has no kind: it may be another message type or a newer protocol version")]
    EmptyRequest,
    #[error("`{kind}` does not change the configuration; the supervisor answers it directly")]
    NotAStateChange { kind: &'static str },
    #[error("invalid address `{address}`: expected IP:PORT such as 127.0.0.1:8080 or [::1]:8080")]
    InvalidAddress { address: String },
    #[error("invalid {what} `{id}`: {reason}")]
    InvalidId {
        what: &'static str,
        id: String,
        reason: &'static str,
    },
    #[error("invalid {field} `{value}`: {reason}")]
    InvalidValue {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("unknown cluster `{cluster_id}`: add the cluster first")]
    UnknownCluster { cluster_id: String },
    #[error("unknown listener {address}: add the listener first")]
    UnknownListener { address: String },
    #[error("listener {address} is {actual}, not {expected}")]
    ListenerProtocolMismatch {
        address: String,
        expected: &'static str,
        actual: &'static str,
    },
    #[error("listener {address} is {from}; to make it {to}, remove it and add it again")]
    ListenerProtocolChange {
        address: String,
        from: &'static str,
        to: &'static str,
    },
    #[error("listener {address} is still used by {references} frontend(s) or certificate(s): remove them first")]
    ListenerInUse { address: String, references: usize },
    #[error("cluster `{cluster_id}` still receives traffic from {frontends} frontend(s): remove them first")]
    ClusterInUse { cluster_id: String, frontends: usize },
    #[error("unknown backend `{backend_id}` in cluster `{cluster_id}`")]
    UnknownBackend { cluster_id: String, backend_id: String },
    #[error("cluster `{cluster_id}` already has backend `{existing}` at {address}: one backend per address")]
    DuplicateBackendAddress {
        cluster_id: String,
        address: String,
        existing: String,
    },
    #[error("invalid hostname `{hostname}`: {reason}")]
    InvalidHostname { hostname: String, reason: &'static str },
    #[error("invalid path rule `{path}`: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("frontend {frontend} already exists")]
    DuplicateFrontend { frontend: String },
    #[error(
        "frontend {frontend} already routes to cluster `{existing}`: remove it before routing it to `{cluster_id}`"
    )]
    ConflictingFrontend {
        frontend: String,
        existing: String,
        cluster_id: String,
    },
    #[error("unknown frontend {frontend}")]
    UnknownFrontend { frontend: String },
    #[error("frontend {frontend} routes to cluster `{owner}`, not `{cluster_id}`")]
    FrontendOwnedByOther {
        frontend: String,
        owner: String,
        cluster_id: String,
    },
    #[error("TCP listener {address} already forwards to cluster `{cluster_id}`: one cluster per TCP listener")]
    TcpListenerTaken { address: String, cluster_id: String },
    #[error("invalid certificate: {reason}")]
    InvalidCertificate { reason: String },
    #[error(
        "the certificate names no server rampart can serve ({found}): give its names (`--name` on the command line, `certificate_names` in the file, `names` in the protocol)"
    )]
    CertificateWithoutNames { found: String },
    #[error("listener {address} already has certificate {fingerprint}")]
    DuplicateCertificate { address: String, fingerprint: String },
    #[error(
        "listener {address} has no certificate that default_certificate `{reference}` names: add the certificate first, then make it the default"
    )]
    UnknownDefaultCertificate { address: String, reference: String },
    #[error(
        "certificate {fingerprint} is what default_certificate `{reference}` of listener {address} serves: set another default_certificate on the listener, or clear it, first"
    )]
    DefaultCertificateInUse {
        address: String,
        fingerprint: String,
        reference: String,
    },
    #[error("listener {address} has no certificate {fingerprint}")]
    UnknownCertificate { address: String, fingerprint: String },
    #[error("a batch cannot contain another batch")]
    NestedBatch,
    #[error(
        "{what} is not supported by this version of rampart ({detail}); remove it from the configuration or request"
    )]
    NotSupported { what: &'static str, detail: &'static str },
    #[error(
        "listener {address} already exists with other settings: change them with `rampart listener update {address} --FIELD VALUE`, or remove the listener first"
    )]
    ListenerExists { address: String },
    #[error("request {index} of the batch ({kind}): {source}; nothing in the batch was applied")]
    InBatch {
        index: usize,
        kind: &'static str,
        source: Box<StateError>,
    },
}

/// What a successful [`State::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(String),
    Updated(String),
    Removed(String),
    Activated(String),
    Deactivated(String),
    /// The request was valid and the state already matched it.
    Unchanged(String),
    Batch(Vec<Change>),
}

impl Change {
    /// True when the state is different afterwards.
    pub fn is_effective(&self) -> bool {
        match self {
            Change::Unchanged(_) => false,
            Change::Batch(changes) => changes.iter().any(Change::is_effective),
            _ => true,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added(t) => write!(f, "added {t}"),
            Change::Updated(t) => write!(f, "updated {t}"),
            Change::Removed(t) => write!(f, "removed {t}"),
            Change::Activated(t) => write!(f, "activated {t}"),
            Change::Deactivated(t) => write!(f, "deactivated {t}"),
            Change::Unchanged(t) => write!(f, "unchanged {t}"),
            Change::Batch(c) => write!(f, "batch of {} change(s)", c.len()),
        }
    }
}

/// Identity of an HTTP(S) frontend: what it matches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub address: String,
    pub hostname: String,
    pub path_kind: i32,
    pub path: String,
    pub method: String,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match proto::PathKind::try_from(self.path_kind) {
            Ok(proto::PathKind::Equals) => "=",
            Ok(proto::PathKind::Regex) => "~",
            _ => "",
        };
        write!(f, "{} {}{}{}", self.address, self.hostname, kind, self.path)?;
        if !self.method.is_empty() {
            write!(f, " [{}]", self.method)?;
        }
        Ok(())
    }
}

fn frontend_key(f: &proto::HttpFrontend) -> FrontendKey {
    let path = f.path.clone().unwrap_or_default();
    FrontendKey {
        address: f.address.clone(),
        hostname: f.hostname.clone(),
        path_kind: path.kind,
        path: path.value,
        method: f.method.clone(),
    }
}

/// The running configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    listeners: BTreeMap<String, proto::Listener>,
    clusters: BTreeMap<String, proto::Cluster>,
    backends: BTreeMap<(String, String), proto::Backend>,
    http_frontends: BTreeMap<FrontendKey, proto::HttpFrontend>,
    https_frontends: BTreeMap<FrontendKey, proto::HttpFrontend>,
    tcp_frontends: BTreeMap<String, proto::TcpFrontend>,
    certificates: BTreeMap<(String, String), proto::Certificate>,
    // Indexes, derived from the collections above.
    backend_addresses: BTreeMap<(String, String), String>,
    cluster_frontends: BTreeMap<String, usize>,
    listener_references: BTreeMap<String, usize>,
    /// A worker's copy under key isolation: certificates arrive without their private key,
    /// which the keyring holds.
    keys_elsewhere: bool,
}

fn protocol_name(p: i32) -> &'static str {
    match proto::Protocol::try_from(p) {
        Ok(proto::Protocol::Http) => "HTTP",
        Ok(proto::Protocol::Https) => "HTTPS",
        Ok(proto::Protocol::Tcp) => "TCP",
        Err(_) => "unknown",
    }
}

/// Parses and canonicalizes a socket address.
pub fn canonical_address(address: &str) -> Result<String, StateError> {
    address
        .trim()
        .parse::<SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|_| StateError::InvalidAddress {
            address: address.to_string(),
        })
}

fn check_id(what: &'static str, id: &str) -> Result<(), StateError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.len() > 128 {
        "it is longer than 128 bytes"
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'[' | b']'))
    {
        "use letters, digits, '-', '_', '.', ':', '[' and ']'"
    } else {
        return Ok(());
    };
    Err(StateError::InvalidId {
        what,
        id: id.to_string(),
        reason,
    })
}

/// Lowercases and validates a hostname: DNS labels, optionally behind a leading `*.`.
pub fn canonical_hostname(hostname: &str) -> Result<String, StateError> {
    let lower = hostname.trim().to_ascii_lowercase();
    let bad = |reason| StateError::InvalidHostname {
        hostname: hostname.to_string(),
        reason,
    };
    let rest = lower.strip_prefix("*.").unwrap_or(&lower);
    if rest.is_empty() {
        return Err(bad("it is empty"));
    }
    if lower.len() > 253 {
        return Err(bad("it is longer than 253 bytes"));
    }
    for label in rest.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each label needs 1 to 63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("use letters, digits and '-', with an optional leading '*.'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label cannot start or end with '-'"));
        }
    }
    Ok(lower)
}

fn check_path(rule: &proto::PathRule) -> Result<(), StateError> {
    let bad = |reason: String| StateError::InvalidPath {
        path: rule.value.clone(),
        reason,
    };
    if rule.value.len() > 1024 {
        return Err(bad("longer than 1024 bytes".into()));
    }
    match proto::PathKind::try_from(rule.kind) {
        Ok(proto::PathKind::Prefix) => {
            if !rule.value.is_empty() && !rule.value.starts_with('/') {
                return Err(bad("a prefix starts with '/' (or is empty to match every path)".into()));
            }
        }
        Ok(proto::PathKind::Equals) => {
            if !rule.value.starts_with('/') {
                return Err(bad("an exact path starts with '/'".into()));
            }
        }
        Ok(proto::PathKind::Regex) => {
            regex::RegexBuilder::new(&rule.value)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| bad(format!("not a valid regular expression: {e}")))?;
        }
        Err(_) => return Err(bad(format!("unknown path kind {}", rule.kind))),
    }
    if rule.value.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(bad("contains spaces or control characters".into()));
    }
    Ok(())
}

fn check_method(method: &str) -> Result<(), StateError> {
    if method.is_empty() || (method.len() <= 32 && method.bytes().all(|b| b.is_ascii_uppercase())) {
        Ok(())
    } else {
        Err(StateError::InvalidValue {
            field: "method",
            value: method.to_string(),
            reason: "use an upper-case HTTP method such as GET, or leave it empty for any".into(),
        })
    }
}

/// Decodes the first PEM block labelled `label` and returns its DER bytes.
fn pem_block(pem: &str, label_suffix: &str) -> Option<Vec<u8>> {
    let mut lines = pem.lines().map(str::trim);
    let begin = lines.find(|l| l.starts_with("-----BEGIN ") && l.ends_with(&format!("{label_suffix}-----")))?;
    let label = begin.strip_prefix("-----BEGIN ")?.strip_suffix("-----")?;
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    for line in lines {
        if line == end {
            return base64::engine::general_purpose::STANDARD.decode(body.as_bytes()).ok();
        }
        body.push_str(line);
    }
    None
}

/// Hex SHA-256 of the DER of the first certificate in `pem`.
pub fn certificate_fingerprint(pem: &str) -> Result<String, StateError> {
    let der = pem_block(pem, "CERTIFICATE").ok_or_else(|| StateError::InvalidCertificate {
        reason: "no PEM `CERTIFICATE` block with valid base64".into(),
    })?;
    if der.is_empty() {
        return Err(StateError::InvalidCertificate {
            reason: "the certificate block is empty".into(),
        });
    }
    Ok(hex::encode(Sha256::digest(&der)))
}

/// The OID of a subject's commonName attribute (X.520, 2.5.4.3).
const COMMON_NAME: x509_cert::der::asn1::ObjectIdentifier =
    x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");

/// The server names a certificate serves when it is added without names: the DNS names of its
/// subjectAltName, or, only when it has no subjectAltName extension, its subject's common names
/// (RFC 6125 §6.4.4). Names rampart cannot route (IP addresses, e-mail addresses, malformed
/// DNS names) are left out; a certificate left with none is refused, saying what it holds.
pub fn certificate_names(pem: &str) -> Result<Vec<String>, StateError> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let der = pem_block(pem, "CERTIFICATE").ok_or_else(|| StateError::InvalidCertificate {
        reason: "no PEM `CERTIFICATE` block with valid base64".into(),
    })?;
    let cert = x509_cert::Certificate::from_der(&der).map_err(|e| StateError::InvalidCertificate {
        reason: format!("the certificate is not valid X.509 DER ({e}); check that the file holds the leaf certificate"),
    })?;
    let tbs = &cert.tbs_certificate;
    let san = tbs
        .get::<SubjectAltName>()
        .map_err(|e| StateError::InvalidCertificate {
            reason: format!("its subjectAltName extension does not parse: {e}"),
        })?;
    let mut names: Vec<String> = Vec::new();
    let mut unusable: Vec<String> = Vec::new();
    fn keep(raw: &str, names: &mut Vec<String>, unusable: &mut Vec<String>) {
        match canonical_hostname(raw) {
            Ok(name) if !names.contains(&name) => names.push(name),
            Ok(_) => {}
            Err(_) => unusable.push(format!("`{raw}`")),
        }
    }
    let source = if let Some((_, SubjectAltName(general))) = san {
        for g in &general {
            match g {
                GeneralName::DnsName(dns) => keep(dns.as_str(), &mut names, &mut unusable),
                GeneralName::IpAddress(_) => unusable.push("an IP address".into()),
                GeneralName::Rfc822Name(_) => unusable.push("an e-mail address".into()),
                _ => unusable.push("a name of another kind".into()),
            }
        }
        "subjectAltName"
    } else {
        for atv in tbs.subject.0.iter().flat_map(|rdn| rdn.0.iter()) {
            if atv.oid != COMMON_NAME {
                continue;
            }
            let text = atv
                .value
                .decode_as::<String>()
                .ok()
                .or_else(|| {
                    atv.value
                        .decode_as::<x509_cert::der::asn1::PrintableStringRef<'_>>()
                        .ok()
                        .map(|p| p.as_str().to_string())
                })
                .or_else(|| {
                    atv.value
                        .decode_as::<x509_cert::der::asn1::Ia5StringRef<'_>>()
                        .ok()
                        .map(|p| p.as_str().to_string())
                });
            match text {
                Some(t) => keep(&t, &mut names, &mut unusable),
                None => unusable.push("a common name in an unsupported string type".into()),
            }
        }
        "subject common name (it has no subjectAltName)"
    };
    if names.is_empty() {
        let found = if unusable.is_empty() {
            format!("its {source} holds no name")
        } else {
            format!("its {source} holds only {}", unusable.join(", "))
        };
        return Err(StateError::CertificateWithoutNames { found });
    }
    Ok(names)
}

/// Whether a certificate or frontend name covers a server name: the same name, or a `*.`
/// wildcard and a name under it (`*.example.com` covers `a.example.com` and `a.b.example.com`,
/// as the router and the SNI selection read wildcards). Both sides compare without case and
/// without a trailing dot.
pub fn name_covers(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    if pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => {
            name.len() > suffix.len() && {
                let split = name.len() - suffix.len();
                name.get(split..).is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
        }
        _ => false,
    }
}

/// Two certificate entries are the same whether or not either holds its private key: a
/// certificate determines its key (the supervisor checks that they match).
fn same_certificate(a: &proto::Certificate, b: &proto::Certificate) -> bool {
    a.address == b.address && a.certificate == b.certificate && a.chain == b.chain && a.names == b.names
}

fn check_certificate(cert: &proto::Certificate, keys_elsewhere: bool) -> Result<String, StateError> {
    let fingerprint = certificate_fingerprint(&cert.certificate)?;
    for (i, chain) in cert.chain.iter().enumerate() {
        if pem_block(chain, "CERTIFICATE").is_none() {
            return Err(StateError::InvalidCertificate {
                reason: format!("chain entry {i} is not a PEM certificate"),
            });
        }
    }
    if !(keys_elsewhere && cert.key.is_empty()) && pem_block(&cert.key, "PRIVATE KEY").is_none() {
        return Err(StateError::InvalidCertificate {
            reason: "the key is not a PEM private key (`... PRIVATE KEY` block)".into(),
        });
    }
    for name in &cert.names {
        canonical_hostname(name)?;
    }
    Ok(fingerprint)
}

const ANSWER_CODES: [&str; 12] = [
    "301", "400", "404", "408", "413", "414", "421", "431", "502", "503", "504", "401",
];

/// What `expect_proxy_protocol` and `send_proxy_protocol` would need: refused rather than
/// accepted and ignored (a listener expecting a header nobody parses would break every client).
const PROXY_PROTOCOL_LATER: &str = "the PROXY protocol is not implemented yet";

/// The listener fields `update_listener` may change, by their protocol names; `answers.CODE`
/// changes one answer. The address, the protocol and `active` (activate/deactivate) do not
/// belong here.
pub const LISTENER_FIELDS: [&str; 12] = [
    "public_address",
    "client_idle_timeout_ms",
    "request_timeout_ms",
    "backend_connect_timeout_ms",
    "backend_response_timeout_ms",
    "tls_min_version",
    "cipher_suites",
    "groups",
    "answers",
    "tls_handshake_timeout_ms",
    "strict_sni",
    "default_certificate",
];

/// Copies field `name` of `from` into `to`.
fn set_listener_field(to: &mut proto::Listener, from: &proto::Listener, name: &str) -> Result<(), StateError> {
    match name {
        "public_address" => to.public_address.clone_from(&from.public_address),
        "client_idle_timeout_ms" => to.client_idle_timeout_ms = from.client_idle_timeout_ms,
        "request_timeout_ms" => to.request_timeout_ms = from.request_timeout_ms,
        "backend_connect_timeout_ms" => to.backend_connect_timeout_ms = from.backend_connect_timeout_ms,
        "backend_response_timeout_ms" => to.backend_response_timeout_ms = from.backend_response_timeout_ms,
        "tls_min_version" => to.tls_min_version.clone_from(&from.tls_min_version),
        "cipher_suites" => to.cipher_suites.clone_from(&from.cipher_suites),
        "groups" => to.groups.clone_from(&from.groups),
        "answers" => to.answers.clone_from(&from.answers),
        "tls_handshake_timeout_ms" => to.tls_handshake_timeout_ms = from.tls_handshake_timeout_ms,
        "strict_sni" => to.strict_sni = from.strict_sni,
        "default_certificate" => to.default_certificate.clone_from(&from.default_certificate),
        other => match other.strip_prefix("answers.") {
            Some(code) => match from.answers.get(code).filter(|v| !v.is_empty()) {
                Some(body) => {
                    to.answers.insert(code.to_string(), body.clone());
                }
                None => {
                    to.answers.remove(code);
                }
            },
            None => {
                return Err(StateError::InvalidValue {
                    field: "fields",
                    value: other.to_string(),
                    reason: format!(
                        "a listener's changeable fields are {}, and answers.CODE",
                        LISTENER_FIELDS.join(", ")
                    ),
                });
            }
        },
    }
    Ok(())
}

/// The changeable fields in which `a` and `b` differ.
fn listener_differences(a: &proto::Listener, b: &proto::Listener) -> Vec<String> {
    LISTENER_FIELDS
        .iter()
        .filter(|name| {
            let mut probe = a.clone();
            set_listener_field(&mut probe, b, name).is_ok() && probe != *a
        })
        .map(|name| (*name).to_string())
        .collect()
}

/// The longest per-listener TLS handshake timeout (an hour).
pub const MAX_TLS_HANDSHAKE_TIMEOUT_MS: u32 = 3_600_000;

/// A certificate fingerprint as the state writes it: 64 hex digits.
fn is_fingerprint(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Sets a listener's default certificate (once its certificates exist).
fn set_default_request(l: &proto::Listener) -> proto::Request {
    request(Kind::UpdateListener(proto::ListenerUpdate {
        address: l.address.clone(),
        listener: Some(proto::Listener {
            default_certificate: l.default_certificate.clone(),
            ..Default::default()
        }),
        fields: vec!["default_certificate".into()],
    }))
}

/// Clears a listener's default certificate (before the certificate it names goes).
fn clear_default_request(address: &str) -> proto::Request {
    request(Kind::UpdateListener(proto::ListenerUpdate {
        address: address.to_string(),
        listener: Some(proto::Listener::default()),
        fields: vec!["default_certificate".into()],
    }))
}

/// A listener without its default certificate: what is added before its certificates exist.
fn without_default(l: &proto::Listener) -> proto::Listener {
    proto::Listener {
        default_certificate: String::new(),
        ..l.clone()
    }
}

fn check_listener(l: &proto::Listener) -> Result<(), StateError> {
    if l.expect_proxy_protocol {
        return Err(StateError::NotSupported {
            what: "expect_proxy_protocol",
            detail: PROXY_PROTOCOL_LATER,
        });
    }
    if l.send_proxy_protocol {
        return Err(StateError::NotSupported {
            what: "send_proxy_protocol",
            detail: PROXY_PROTOCOL_LATER,
        });
    }
    let protocol = proto::Protocol::try_from(l.protocol).map_err(|_| StateError::InvalidValue {
        field: "protocol",
        value: l.protocol.to_string(),
        reason: "use HTTP, HTTPS or TCP".into(),
    })?;
    if !l.public_address.is_empty() {
        canonical_address(&l.public_address)?;
    }
    match l.tls_min_version.as_str() {
        "" => {}
        "1.2" | "1.3" if protocol == proto::Protocol::Https => {}
        other => {
            return Err(StateError::InvalidValue {
                field: "tls_min_version",
                value: other.to_string(),
                reason: if protocol == proto::Protocol::Https {
                    "use \"1.2\" or \"1.3\"; older versions are not offered".into()
                } else {
                    "only HTTPS listeners have a TLS version".into()
                },
            });
        }
    }
    if !l.groups.is_empty() && protocol != proto::Protocol::Https {
        return Err(StateError::InvalidValue {
            field: "groups",
            value: l.groups.join(":"),
            reason: "only HTTPS listeners have key exchange groups".into(),
        });
    }
    if !l.cipher_suites.is_empty() && protocol != proto::Protocol::Https {
        return Err(StateError::InvalidValue {
            field: "cipher_suites",
            value: l.cipher_suites.join(":"),
            reason: "only HTTPS listeners have cipher suites".into(),
        });
    }
    let https = protocol == proto::Protocol::Https;
    if !l.default_certificate.is_empty() {
        if !https {
            return Err(StateError::InvalidValue {
                field: "default_certificate",
                value: l.default_certificate.clone(),
                reason: "only HTTPS listeners have certificates".into(),
            });
        }
        if l.strict_sni {
            return Err(StateError::InvalidValue {
                field: "default_certificate",
                value: l.default_certificate.clone(),
                reason: "a strict_sni listener serves no default certificate: clear one of the two".into(),
            });
        }
        if !is_fingerprint(&l.default_certificate) {
            canonical_hostname(&l.default_certificate).map_err(|_| StateError::InvalidValue {
                field: "default_certificate",
                value: l.default_certificate.clone(),
                reason: "give a certificate's fingerprint (64 hex digits, see `rampart certificate list`) or a server name it serves".into(),
            })?;
        }
    }
    if l.strict_sni && !https {
        return Err(StateError::InvalidValue {
            field: "strict_sni",
            value: "true".into(),
            reason: "only HTTPS listeners select a certificate by SNI".into(),
        });
    }
    if l.tls_handshake_timeout_ms != 0 && !https {
        return Err(StateError::InvalidValue {
            field: "tls_handshake_timeout_ms",
            value: l.tls_handshake_timeout_ms.to_string(),
            reason: "only HTTPS listeners have a TLS handshake".into(),
        });
    }
    if l.tls_handshake_timeout_ms > MAX_TLS_HANDSHAKE_TIMEOUT_MS {
        return Err(StateError::InvalidValue {
            field: "tls_handshake_timeout_ms",
            value: l.tls_handshake_timeout_ms.to_string(),
            reason: format!("use 1 to {MAX_TLS_HANDSHAKE_TIMEOUT_MS} ms, or 0 for the global timeouts.tls_handshake"),
        });
    }
    for code in l.answers.keys() {
        if !ANSWER_CODES.contains(&code.as_str()) {
            return Err(StateError::InvalidValue {
                field: "answers",
                value: code.clone(),
                reason: format!("custom answers exist for {}", ANSWER_CODES.join(", ")),
            });
        }
    }
    Ok(())
}

/// True for requests that change the configuration (and so go through [`State::apply`]).
pub use crate::kinds::is_state_change;

// Field numbers of the `Request.kind` variants that `to_requests` produces (command.proto);
// `hash_matches_the_encoded_requests` checks them against prost's own encoding.
const TAG_ADD_CLUSTER: u32 = 10;
const TAG_ADD_HTTP_FRONTEND: u32 = 20;
const TAG_ADD_HTTPS_FRONTEND: u32 = 22;
const TAG_ADD_TCP_FRONTEND: u32 = 24;
const TAG_ADD_BACKEND: u32 = 30;
const TAG_ADD_LISTENER: u32 = 40;
const TAG_UPDATE_LISTENER: u32 = 45;
const TAG_ADD_CERTIFICATE: u32 = 50;

/// Writes requests as [`State::save`] does: one JSON request per line.
pub fn save_requests<W: std::io::Write>(requests: &[proto::Request], out: &mut W) -> std::io::Result<()> {
    for r in requests {
        serde_json::to_writer(&mut *out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn request(kind: Kind) -> proto::Request {
    proto::Request {
        id: String::new(),
        kind: Some(kind),
    }
}

/// Error while loading a saved state.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("line {line}: not a request in JSON: {source}")]
    Json {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line}: {source}")]
    Invalid {
        line: usize,
        #[source]
        source: StateError,
    },
    #[error("reading the saved state failed: {0}")]
    Io(#[from] std::io::Error),
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// A state whose certificates come without private keys (a worker's, under key isolation).
    pub fn without_keys() -> Self {
        State {
            keys_elsewhere: true,
            ..Self::default()
        }
    }

    /// Moves every certificate's private key out of the state, which from then on holds
    /// certificates without keys (the supervisor's, under key isolation, once the keys are in the
    /// keyring's hands). Returns each key once, with its certificate's fingerprint, even when the
    /// certificate serves several listeners.
    pub fn take_keys(&mut self) -> Vec<(String, String)> {
        self.keys_elsewhere = true;
        let mut out: Vec<(String, String)> = Vec::new();
        for ((_, fingerprint), c) in &mut self.certificates {
            let mut key = std::mem::take(&mut c.key);
            if key.is_empty() || out.iter().any(|(f, _)| f == fingerprint) {
                key.zeroize();
                continue;
            }
            out.push((fingerprint.clone(), key));
        }
        out
    }

    /// True when certificates are held without their private keys.
    pub fn keys_elsewhere(&self) -> bool {
        self.keys_elsewhere
    }

    pub fn listeners(&self) -> &BTreeMap<String, proto::Listener> {
        &self.listeners
    }

    pub fn clusters(&self) -> &BTreeMap<String, proto::Cluster> {
        &self.clusters
    }

    pub fn backends(&self) -> impl Iterator<Item = &proto::Backend> {
        self.backends.values()
    }

    /// Backends of one cluster.
    pub fn cluster_backends<'a>(&'a self, cluster_id: &'a str) -> impl Iterator<Item = &'a proto::Backend> + 'a {
        self.backends
            .range((cluster_id.to_string(), String::new())..)
            .take_while(move |((c, _), _)| c == cluster_id)
            .map(|(_, b)| b)
    }

    pub fn http_frontends(&self) -> impl Iterator<Item = &proto::HttpFrontend> {
        self.http_frontends.values()
    }

    pub fn https_frontends(&self) -> impl Iterator<Item = &proto::HttpFrontend> {
        self.https_frontends.values()
    }

    /// The HTTP and HTTPS frontends of one listener and hostname (both canonical), in the order
    /// [`http_frontends`](Self::http_frontends) and [`https_frontends`](Self::https_frontends)
    /// list them: what a router needs to update one hostname's routes.
    pub fn host_frontends<'a>(
        &'a self,
        address: &'a str,
        hostname: &'a str,
    ) -> impl Iterator<Item = &'a proto::HttpFrontend> + 'a {
        let start = FrontendKey {
            address: address.to_string(),
            hostname: hostname.to_string(),
            path_kind: i32::MIN,
            path: String::new(),
            method: String::new(),
        };
        let same = move |(k, _): &(&FrontendKey, &proto::HttpFrontend)| k.address == address && k.hostname == hostname;
        let http = self.http_frontends.range(start.clone()..).take_while(same);
        let https = self.https_frontends.range(start..).take_while(same);
        http.chain(https).map(|(_, f)| f)
    }

    pub fn tcp_frontends(&self) -> impl Iterator<Item = &proto::TcpFrontend> {
        self.tcp_frontends.values()
    }

    pub fn certificates(&self) -> impl Iterator<Item = (&str, &proto::Certificate)> {
        self.certificates.iter().map(|((_, fp), c)| (fp.as_str(), c))
    }

    pub fn frontend_count(&self) -> usize {
        self.http_frontends.len() + self.https_frontends.len() + self.tcp_frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    pub fn certificate_count(&self) -> usize {
        self.certificates.len()
    }

    /// Validates `request` against the state and applies it, or changes nothing and says why.
    pub fn apply(&mut self, request: &proto::Request) -> Result<Change, StateError> {
        let kind = request.kind.as_ref().ok_or(StateError::EmptyRequest)?;
        match kind {
            Kind::Apply(batch) => {
                // Atomic: apply to a copy, keep it only if every request succeeded.
                let mut next = self.clone();
                let mut changes = Vec::with_capacity(batch.requests.len());
                for (index, inner) in batch.requests.iter().enumerate() {
                    if matches!(inner.kind, Some(Kind::Apply(_))) {
                        return Err(StateError::NestedBatch);
                    }
                    let change = next.apply(inner).map_err(|source| StateError::InBatch {
                        index,
                        kind: crate::request_kind_name(inner),
                        source: Box::new(source),
                    })?;
                    changes.push(change);
                }
                *self = next;
                Ok(Change::Batch(changes))
            }
            _ => self.apply_one(kind, request),
        }
    }

    fn apply_one(&mut self, kind: &Kind, request: &proto::Request) -> Result<Change, StateError> {
        match kind {
            Kind::AddListener(l) => self.add_listener(l),
            Kind::RemoveListener(a) => self.remove_listener(&a.address),
            Kind::ActivateListener(a) => self.set_listener_active(&a.address, true),
            Kind::DeactivateListener(a) => self.set_listener_active(&a.address, false),
            Kind::UpdateListener(u) => self.update_listener(u),
            Kind::AddCluster(c) => self.add_cluster(c),
            Kind::RemoveCluster(c) => self.remove_cluster(&c.cluster_id),
            Kind::AddBackend(b) => self.add_backend(b),
            Kind::RemoveBackend(b) => self.remove_backend(&b.cluster_id, &b.backend_id),
            Kind::AddHttpFrontend(f) => self.add_http_frontend(f, false),
            Kind::AddHttpsFrontend(f) => self.add_http_frontend(f, true),
            Kind::RemoveHttpFrontend(f) => self.remove_http_frontend(f, false),
            Kind::RemoveHttpsFrontend(f) => self.remove_http_frontend(f, true),
            Kind::AddTcpFrontend(f) => self.add_tcp_frontend(f),
            Kind::RemoveTcpFrontend(f) => self.remove_tcp_frontend(f),
            Kind::AddCertificate(c) => self.add_certificate(c),
            Kind::RemoveCertificate(c) => self.remove_certificate(&c.address, &c.fingerprint),
            Kind::ReplaceCertificate(r) => {
                let new = r.new_certificate.clone().unwrap_or_default();
                let mut requests = vec![
                    request_of(Kind::RemoveCertificate(proto::CertificateId {
                        address: r.address.clone(),
                        fingerprint: r.old_fingerprint.clone(),
                    })),
                    request_of(Kind::AddCertificate(proto::Certificate {
                        address: r.address.clone(),
                        ..new.clone()
                    })),
                ];
                // A default certificate being replaced stays the default: by name it must be
                // served by the new certificate too; by fingerprint it moves to the new one.
                let listener = canonical_address(&r.address)
                    .ok()
                    .and_then(|a| self.listeners.get(&a))
                    .filter(|l| !l.default_certificate.is_empty());
                if let Some(l) = listener {
                    let mut restored = l.clone();
                    if restored.default_certificate == r.old_fingerprint.to_ascii_lowercase() {
                        restored.default_certificate = certificate_fingerprint(&new.certificate)?;
                    }
                    requests.insert(0, clear_default_request(&l.address));
                    requests.push(set_default_request(&restored));
                }
                let batch = proto::Batch {
                    requests,
                    base_state_hash: String::new(),
                };
                self.apply(&request_of(Kind::Apply(batch))).map_err(|e| match e {
                    StateError::InBatch { source, .. } => *source,
                    other => other,
                })
            }
            // Stored and never run would be a setting nothing enforces.
            Kind::SetHealthCheck(_) | Kind::RemoveHealthCheck(_) => Err(StateError::NotSupported {
                what: "active health checks",
                detail: "backends are ejected passively, on connection failures",
            }),
            Kind::Apply(_) => self.apply(request),
            _ => Err(StateError::NotAStateChange {
                kind: crate::request_kind_name(request),
            }),
        }
    }

    fn listener_protocol(&self, address: &str) -> Result<i32, StateError> {
        self.listeners
            .get(address)
            .map(|l| l.protocol)
            .ok_or_else(|| StateError::UnknownListener {
                address: address.to_string(),
            })
    }

    fn require_cluster(&self, cluster_id: &str) -> Result<(), StateError> {
        if self.clusters.contains_key(cluster_id) {
            Ok(())
        } else {
            Err(StateError::UnknownCluster {
                cluster_id: cluster_id.to_string(),
            })
        }
    }

    fn add_listener(&mut self, l: &proto::Listener) -> Result<Change, StateError> {
        let address = canonical_address(&l.address)?;
        check_listener(l)?;
        let mut l = l.clone();
        l.address = address.clone();
        if !l.public_address.is_empty() {
            l.public_address = canonical_address(&l.public_address)?;
        }
        if !l.default_certificate.is_empty() {
            l.default_certificate = l.default_certificate.trim().trim_end_matches('.').to_ascii_lowercase();
            if self.resolve_default(&address, &l.default_certificate).is_none() {
                return Err(StateError::UnknownDefaultCertificate {
                    address,
                    reference: l.default_certificate,
                });
            }
        }
        match self.listeners.get(&address) {
            Some(existing) if existing.protocol != l.protocol => Err(StateError::ListenerProtocolChange {
                address,
                from: protocol_name(existing.protocol),
                to: protocol_name(l.protocol),
            }),
            Some(existing) if *existing == l => Ok(Change::Unchanged(format!("listener {address}"))),
            Some(_) => Err(StateError::ListenerExists { address }),
            None => {
                self.listeners.insert(address.clone(), l);
                Ok(Change::Added(format!("listener {address}")))
            }
        }
    }

    fn update_listener(&mut self, u: &proto::ListenerUpdate) -> Result<Change, StateError> {
        let address = canonical_address(&u.address)?;
        let current = self
            .listeners
            .get(&address)
            .ok_or_else(|| StateError::UnknownListener {
                address: address.clone(),
            })?;
        if u.fields.is_empty() {
            return Err(StateError::InvalidValue {
                field: "fields",
                value: String::new(),
                reason: format!("name at least one field to change: {}", LISTENER_FIELDS.join(", ")),
            });
        }
        let given = u.listener.clone().unwrap_or_default();
        let mut next = current.clone();
        for field in &u.fields {
            set_listener_field(&mut next, &given, field)?;
        }
        check_listener(&next)?;
        if !next.public_address.is_empty() {
            next.public_address = canonical_address(&next.public_address)?;
        }
        if !next.default_certificate.is_empty() {
            next.default_certificate = next
                .default_certificate
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if self.resolve_default(&address, &next.default_certificate).is_none() {
                return Err(StateError::UnknownDefaultCertificate {
                    address,
                    reference: next.default_certificate,
                });
            }
        }
        let target = format!("listener {address}");
        if next == *current {
            return Ok(Change::Unchanged(target));
        }
        self.listeners.insert(address, next);
        Ok(Change::Updated(target))
    }

    fn remove_listener(&mut self, address: &str) -> Result<Change, StateError> {
        let address = canonical_address(address)?;
        if !self.listeners.contains_key(&address) {
            return Err(StateError::UnknownListener { address });
        }
        let references = self.listener_references.get(&address).copied().unwrap_or(0);
        if references > 0 {
            return Err(StateError::ListenerInUse { address, references });
        }
        self.listeners.remove(&address);
        Ok(Change::Removed(format!("listener {address}")))
    }

    fn set_listener_active(&mut self, address: &str, active: bool) -> Result<Change, StateError> {
        let address = canonical_address(address)?;
        let listener = self
            .listeners
            .get_mut(&address)
            .ok_or_else(|| StateError::UnknownListener {
                address: address.clone(),
            })?;
        let target = format!("listener {address}");
        if listener.active == active {
            return Ok(Change::Unchanged(target));
        }
        listener.active = active;
        Ok(if active {
            Change::Activated(target)
        } else {
            Change::Deactivated(target)
        })
    }

    fn add_cluster(&mut self, c: &proto::Cluster) -> Result<Change, StateError> {
        check_id("cluster id", &c.cluster_id)?;
        proto::LoadBalancing::try_from(c.load_balancing).map_err(|_| StateError::InvalidValue {
            field: "load_balancing",
            value: c.load_balancing.to_string(),
            reason: "use round_robin, random, least_connections or power_of_two".into(),
        })?;
        let target = format!("cluster {}", c.cluster_id);
        match self.clusters.insert(c.cluster_id.clone(), c.clone()) {
            None => Ok(Change::Added(target)),
            Some(old) if old == *c => Ok(Change::Unchanged(target)),
            Some(_) => Ok(Change::Updated(target)),
        }
    }

    fn remove_cluster(&mut self, cluster_id: &str) -> Result<Change, StateError> {
        self.require_cluster(cluster_id)?;
        let frontends = self.cluster_frontends.get(cluster_id).copied().unwrap_or(0);
        if frontends > 0 {
            return Err(StateError::ClusterInUse {
                cluster_id: cluster_id.to_string(),
                frontends,
            });
        }
        let ids: Vec<String> = self
            .cluster_backends(cluster_id)
            .map(|b| b.backend_id.clone())
            .collect();
        for id in ids {
            if let Some(b) = self.backends.remove(&(cluster_id.to_string(), id)) {
                self.backend_addresses.remove(&(cluster_id.to_string(), b.address));
            }
        }
        self.clusters.remove(cluster_id);
        self.cluster_frontends.remove(cluster_id);
        Ok(Change::Removed(format!("cluster {cluster_id}")))
    }

    fn add_backend(&mut self, b: &proto::Backend) -> Result<Change, StateError> {
        self.require_cluster(&b.cluster_id)?;
        check_id("backend id", &b.backend_id)?;
        let address = canonical_address(&b.address)?;
        if b.weight > 1000 {
            return Err(StateError::InvalidValue {
                field: "weight",
                value: b.weight.to_string(),
                reason: "use 0 to 1000".into(),
            });
        }
        let mut b = b.clone();
        b.address = address.clone();
        let key = (b.cluster_id.clone(), b.backend_id.clone());
        let address_key = (b.cluster_id.clone(), address.clone());
        if let Some(existing) = self.backend_addresses.get(&address_key)
            && *existing != b.backend_id
        {
            return Err(StateError::DuplicateBackendAddress {
                cluster_id: b.cluster_id.clone(),
                address,
                existing: existing.clone(),
            });
        }
        let target = format!("backend {}/{}", b.cluster_id, b.backend_id);
        match self.backends.insert(key, b.clone()) {
            None => {
                self.backend_addresses.insert(address_key, b.backend_id);
                Ok(Change::Added(target))
            }
            Some(old) if old == b => Ok(Change::Unchanged(target)),
            Some(old) => {
                self.backend_addresses.remove(&(old.cluster_id, old.address));
                self.backend_addresses.insert(address_key, b.backend_id);
                Ok(Change::Updated(target))
            }
        }
    }

    fn remove_backend(&mut self, cluster_id: &str, backend_id: &str) -> Result<Change, StateError> {
        let key = (cluster_id.to_string(), backend_id.to_string());
        let b = self.backends.remove(&key).ok_or_else(|| StateError::UnknownBackend {
            cluster_id: cluster_id.to_string(),
            backend_id: backend_id.to_string(),
        })?;
        self.backend_addresses.remove(&(b.cluster_id, b.address));
        Ok(Change::Removed(format!("backend {cluster_id}/{backend_id}")))
    }

    fn reference(&mut self, address: &str, cluster_id: Option<&str>, delta: isize) {
        let bump = |map: &mut BTreeMap<String, usize>, key: &str| {
            let count = map.entry(key.to_string()).or_insert(0);
            *count = count.saturating_add_signed(delta);
            if *count == 0 {
                map.remove(key);
            }
        };
        bump(&mut self.listener_references, address);
        if let Some(c) = cluster_id {
            bump(&mut self.cluster_frontends, c);
        }
    }

    fn normalize_frontend(&self, f: &proto::HttpFrontend, https: bool) -> Result<proto::HttpFrontend, StateError> {
        let address = canonical_address(&f.address)?;
        let protocol = self.listener_protocol(&address)?;
        let expected = if https {
            proto::Protocol::Https
        } else {
            proto::Protocol::Http
        };
        if protocol != expected as i32 {
            return Err(StateError::ListenerProtocolMismatch {
                address,
                expected: protocol_name(expected as i32),
                actual: protocol_name(protocol),
            });
        }
        let path = f.path.clone().unwrap_or_default();
        check_path(&path)?;
        check_method(&f.method)?;
        Ok(proto::HttpFrontend {
            address,
            hostname: canonical_hostname(&f.hostname)?,
            path: Some(path),
            method: f.method.clone(),
            cluster_id: f.cluster_id.clone(),
            tags: f.tags.clone(),
        })
    }

    fn add_http_frontend(&mut self, f: &proto::HttpFrontend, https: bool) -> Result<Change, StateError> {
        let f = self.normalize_frontend(f, https)?;
        self.require_cluster(&f.cluster_id)?;
        let key = frontend_key(&f);
        let map = if https {
            &self.https_frontends
        } else {
            &self.http_frontends
        };
        if let Some(existing) = map.get(&key) {
            return Err(if existing.cluster_id == f.cluster_id {
                StateError::DuplicateFrontend {
                    frontend: key.to_string(),
                }
            } else {
                StateError::ConflictingFrontend {
                    frontend: key.to_string(),
                    existing: existing.cluster_id.clone(),
                    cluster_id: f.cluster_id.clone(),
                }
            });
        }
        let target = format!("{} frontend {key}", if https { "https" } else { "http" });
        self.reference(&f.address, Some(&f.cluster_id), 1);
        let map = if https {
            &mut self.https_frontends
        } else {
            &mut self.http_frontends
        };
        map.insert(key, f);
        Ok(Change::Added(target))
    }

    fn remove_http_frontend(&mut self, f: &proto::HttpFrontend, https: bool) -> Result<Change, StateError> {
        let f = self.normalize_frontend(f, https)?;
        let key = frontend_key(&f);
        let map = if https {
            &mut self.https_frontends
        } else {
            &mut self.http_frontends
        };
        let existing = map.get(&key).ok_or_else(|| StateError::UnknownFrontend {
            frontend: key.to_string(),
        })?;
        if !f.cluster_id.is_empty() && existing.cluster_id != f.cluster_id {
            return Err(StateError::FrontendOwnedByOther {
                frontend: key.to_string(),
                owner: existing.cluster_id.clone(),
                cluster_id: f.cluster_id,
            });
        }
        let owner = existing.cluster_id.clone();
        map.remove(&key);
        self.reference(&f.address, Some(&owner), -1);
        Ok(Change::Removed(format!(
            "{} frontend {key}",
            if https { "https" } else { "http" }
        )))
    }

    fn add_tcp_frontend(&mut self, f: &proto::TcpFrontend) -> Result<Change, StateError> {
        let address = canonical_address(&f.address)?;
        let protocol = self.listener_protocol(&address)?;
        if protocol != proto::Protocol::Tcp as i32 {
            return Err(StateError::ListenerProtocolMismatch {
                address,
                expected: "TCP",
                actual: protocol_name(protocol),
            });
        }
        self.require_cluster(&f.cluster_id)?;
        if let Some(existing) = self.tcp_frontends.get(&address) {
            return Err(StateError::TcpListenerTaken {
                address,
                cluster_id: existing.cluster_id.clone(),
            });
        }
        self.reference(&address, Some(&f.cluster_id), 1);
        self.tcp_frontends.insert(
            address.clone(),
            proto::TcpFrontend {
                address: address.clone(),
                cluster_id: f.cluster_id.clone(),
            },
        );
        Ok(Change::Added(format!("tcp frontend {address}")))
    }

    fn remove_tcp_frontend(&mut self, f: &proto::TcpFrontend) -> Result<Change, StateError> {
        let address = canonical_address(&f.address)?;
        let existing = self
            .tcp_frontends
            .get(&address)
            .ok_or_else(|| StateError::UnknownFrontend {
                frontend: format!("tcp {address}"),
            })?;
        if !f.cluster_id.is_empty() && existing.cluster_id != f.cluster_id {
            return Err(StateError::FrontendOwnedByOther {
                frontend: format!("tcp {address}"),
                owner: existing.cluster_id.clone(),
                cluster_id: f.cluster_id.clone(),
            });
        }
        let owner = existing.cluster_id.clone();
        self.tcp_frontends.remove(&address);
        self.reference(&address, Some(&owner), -1);
        Ok(Change::Removed(format!("tcp frontend {address}")))
    }

    fn add_certificate(&mut self, c: &proto::Certificate) -> Result<Change, StateError> {
        let address = canonical_address(&c.address)?;
        let protocol = self.listener_protocol(&address)?;
        if protocol != proto::Protocol::Https as i32 {
            return Err(StateError::ListenerProtocolMismatch {
                address,
                expected: "HTTPS",
                actual: protocol_name(protocol),
            });
        }
        let fingerprint = check_certificate(c, self.keys_elsewhere)?;
        let key = (address.clone(), fingerprint.clone());
        if self.certificates.contains_key(&key) {
            return Err(StateError::DuplicateCertificate { address, fingerprint });
        }
        let mut c = c.clone();
        c.address = address.clone();
        // Named here, from the certificate itself when the request names nothing, so that the
        // supervisor, every worker, every dump, diff and hash hold the same names.
        c.names = if c.names.is_empty() {
            certificate_names(&c.certificate)?
        } else {
            c.names.iter().filter_map(|n| canonical_hostname(n).ok()).collect()
        };
        self.certificates.insert(key, c);
        self.reference(&address, None, 1);
        Ok(Change::Added(format!("certificate {fingerprint} on {address}")))
    }

    /// The fingerprint of the certificate that a listener's `default_certificate` reference
    /// (canonical: a fingerprint or a lower-case server name) names among the listener's
    /// certificates: the one with that fingerprint, or the one an SNI of that name selects
    /// (an exact name, else the most specific wildcard covering it; the first such
    /// certificate by fingerprint when several do).
    pub fn resolve_default(&self, address: &str, reference: &str) -> Option<&str> {
        let mut on_listener = self
            .certificates
            .range((address.to_string(), String::new())..)
            .take_while(|((a, _), _)| a == address);
        if is_fingerprint(reference) {
            return on_listener
                .find(|((_, fp), _)| fp == reference)
                .map(|((_, fp), _)| fp.as_str());
        }
        let mut best: Option<(usize, &str)> = None;
        for ((_, fp), c) in on_listener {
            for name in &c.names {
                // An exact name ranks above every wildcard, a longer wildcard above a shorter.
                let rank = if name == reference {
                    usize::MAX
                } else if name.starts_with('*') && name_covers(name, reference) {
                    name.len()
                } else {
                    continue;
                };
                if best.is_none_or(|(r, _)| rank > r) {
                    best = Some((rank, fp.as_str()));
                }
            }
        }
        best.map(|(_, fp)| fp)
    }

    fn remove_certificate(&mut self, address: &str, fingerprint: &str) -> Result<Change, StateError> {
        let address = canonical_address(address)?;
        let key = (address.clone(), fingerprint.to_ascii_lowercase());
        let Some(removed) = self.certificates.remove(&key) else {
            return Err(StateError::UnknownCertificate {
                address,
                fingerprint: fingerprint.to_string(),
            });
        };
        // The listener's default certificate stays: another certificate may serve its name.
        if let Some(reference) = self
            .listeners
            .get(&address)
            .map(|l| l.default_certificate.clone())
            .filter(|r| !r.is_empty())
            && self.resolve_default(&address, &reference).is_none()
        {
            self.certificates.insert(key.clone(), removed);
            return Err(StateError::DefaultCertificateInUse {
                address,
                fingerprint: key.1,
                reference,
            });
        }
        self.reference(&address, None, -1);
        Ok(Change::Removed(format!("certificate {fingerprint} on {address}")))
    }

    /// The requests that rebuild this state from nothing, in dependency order.
    pub fn to_requests(&self) -> Vec<proto::Request> {
        let mut out = Vec::with_capacity(
            self.listeners.len()
                + self.clusters.len()
                + self.backends.len()
                + self.certificates.len()
                + self.frontend_count(),
        );
        // A listener's default certificate is set once its certificates exist.
        out.extend(
            self.listeners
                .values()
                .map(|l| request(Kind::AddListener(without_default(l)))),
        );
        out.extend(self.clusters.values().map(|c| request(Kind::AddCluster(c.clone()))));
        out.extend(self.backends.values().map(|b| request(Kind::AddBackend(b.clone()))));
        out.extend(
            self.certificates
                .values()
                .map(|c| request(Kind::AddCertificate(c.clone()))),
        );
        out.extend(
            self.listeners
                .values()
                .filter(|l| !l.default_certificate.is_empty())
                .map(set_default_request),
        );
        out.extend(
            self.http_frontends
                .values()
                .map(|f| request(Kind::AddHttpFrontend(f.clone()))),
        );
        out.extend(
            self.https_frontends
                .values()
                .map(|f| request(Kind::AddHttpsFrontend(f.clone()))),
        );
        out.extend(
            self.tcp_frontends
                .values()
                .map(|f| request(Kind::AddTcpFrontend(f.clone()))),
        );
        out
    }

    /// SHA-256 of the canonical form: the dump's requests, each length-delimited, after a
    /// domain-separation tag. Private keys are left out: a certificate determines its key, and
    /// the hash is the same wherever the keys are held.
    pub fn hash(&self) -> [u8; 32] {
        // The bytes are those of `to_requests()` encoded one by one, written from references:
        // a request whose only field is its kind encodes as that kind's field, so no item is
        // cloned (the state of a large platform is hashed on every change).
        use prost::encoding::{encode_varint, message};
        fn item<M: Message>(hasher: &mut Sha256, buf: &mut Vec<u8>, tag: u32, m: &M) {
            buf.clear();
            encode_varint(message::encoded_len(tag, m) as u64, buf);
            message::encode(tag, m, buf);
            hasher.update(&buf[..]);
        }
        let mut hasher = Sha256::new();
        hasher.update(b"rampart-state-v1\0");
        let mut buf = Vec::new();
        for l in self.listeners.values() {
            if l.default_certificate.is_empty() {
                item(&mut hasher, &mut buf, TAG_ADD_LISTENER, l);
            } else {
                item(&mut hasher, &mut buf, TAG_ADD_LISTENER, &without_default(l));
            }
        }
        for c in self.clusters.values() {
            item(&mut hasher, &mut buf, TAG_ADD_CLUSTER, c);
        }
        for b in self.backends.values() {
            item(&mut hasher, &mut buf, TAG_ADD_BACKEND, b);
        }
        for c in self.certificates.values() {
            if c.key.is_empty() {
                item(&mut hasher, &mut buf, TAG_ADD_CERTIFICATE, c);
            } else {
                let mut keyless = c.clone();
                keyless.key.zeroize();
                item(&mut hasher, &mut buf, TAG_ADD_CERTIFICATE, &keyless);
            }
        }
        for l in self.listeners.values().filter(|l| !l.default_certificate.is_empty()) {
            if let Some(Kind::UpdateListener(u)) = set_default_request(l).kind {
                item(&mut hasher, &mut buf, TAG_UPDATE_LISTENER, &u);
            }
        }
        for f in self.http_frontends.values() {
            item(&mut hasher, &mut buf, TAG_ADD_HTTP_FRONTEND, f);
        }
        for f in self.https_frontends.values() {
            item(&mut hasher, &mut buf, TAG_ADD_HTTPS_FRONTEND, f);
        }
        for f in self.tcp_frontends.values() {
            item(&mut hasher, &mut buf, TAG_ADD_TCP_FRONTEND, f);
        }
        hasher.finalize().into()
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash())
    }

    /// Saves as JSON lines: one request per line, which `load` replays.
    pub fn save<W: std::io::Write>(&self, out: &mut W) -> std::io::Result<()> {
        save_requests(&self.to_requests(), out)
    }

    /// Loads a state saved by [`save`](Self::save), validating every line.
    pub fn load<R: std::io::BufRead>(input: R) -> Result<State, LoadError> {
        let mut state = State::default();
        for (i, line) in input.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let request: proto::Request =
                serde_json::from_str(&line).map_err(|source| LoadError::Json { line: i + 1, source })?;
            state
                .apply(&request)
                .map_err(|source| LoadError::Invalid { line: i + 1, source })?;
        }
        Ok(state)
    }

    /// The requests that turn `self` into `target`: every removal first (frontends, certificates,
    /// backends, clusters, listeners), then every addition in dependency order.
    pub fn diff(&self, target: &State) -> Vec<proto::Request> {
        let mut out = Vec::new();
        // Listeners that must be removed and added again (protocol change).
        let recreated = |address: &String| -> bool {
            matches!((self.listeners.get(address), target.listeners.get(address)),
                (Some(a), Some(b)) if a.protocol != b.protocol)
        };

        // Certificates the diff removes (changed, gone, or on a listener that is recreated).
        let removed_certificates: Vec<&(String, String)> = self
            .certificates
            .iter()
            .filter(|(key, c)| {
                !target.certificates.get(*key).is_some_and(|t| same_certificate(t, c)) || recreated(&key.0)
            })
            .map(|(key, _)| key)
            .collect();
        // A default certificate cannot be removed: a listener whose default is about to change,
        // or to lose a certificate it may resolve to, has its default cleared first and set
        // again once the certificates are in place.
        let cleared: Vec<&String> = self
            .listeners
            .iter()
            .filter(|(address, l)| {
                !l.default_certificate.is_empty()
                    && (target.listeners.get(*address) != Some(l)
                        || recreated(address)
                        || removed_certificates.iter().any(|(a, _)| a == *address))
            })
            .map(|(address, _)| address)
            .collect();

        // --- removals
        for address in &cleared {
            out.push(clear_default_request(address));
        }
        for (key, f) in &self.http_frontends {
            if target.http_frontends.get(key) != Some(f) || recreated(&key.address) {
                out.push(request(Kind::RemoveHttpFrontend(f.clone())));
            }
        }
        for (key, f) in &self.https_frontends {
            if target.https_frontends.get(key) != Some(f) || recreated(&key.address) {
                out.push(request(Kind::RemoveHttpsFrontend(f.clone())));
            }
        }
        for (address, f) in &self.tcp_frontends {
            if target.tcp_frontends.get(address) != Some(f) || recreated(address) {
                out.push(request(Kind::RemoveTcpFrontend(f.clone())));
            }
        }
        for (address, fingerprint) in &removed_certificates {
            out.push(request(Kind::RemoveCertificate(proto::CertificateId {
                address: address.clone(),
                fingerprint: fingerprint.clone(),
            })));
        }
        for (key, b) in &self.backends {
            if !target.clusters.contains_key(&key.0) {
                continue; // removed with its cluster
            }
            let keep = target.backends.get(key).is_some_and(|t| t.address == b.address);
            if !keep {
                out.push(request(Kind::RemoveBackend(proto::BackendId {
                    cluster_id: key.0.clone(),
                    backend_id: key.1.clone(),
                })));
            }
        }
        for cluster_id in self.clusters.keys() {
            if !target.clusters.contains_key(cluster_id) {
                out.push(request(Kind::RemoveCluster(proto::ClusterId {
                    cluster_id: cluster_id.clone(),
                })));
            }
        }
        for address in self.listeners.keys() {
            if !target.listeners.contains_key(address) || recreated(address) {
                out.push(request(Kind::RemoveListener(proto::ListenerAddress {
                    address: address.clone(),
                })));
            }
        }

        // --- additions and updates
        let mut defaults_later = Vec::new();
        for (address, l) in &target.listeners {
            // The listener as the removals left it.
            let current = match self.listeners.get(address) {
                Some(_) if recreated(address) => None,
                Some(c) if cleared.contains(&address) => Some(without_default(c)),
                other => other.cloned(),
            };
            let later = !l.default_certificate.is_empty()
                && current.as_ref().map(|c| &c.default_certificate) != Some(&l.default_certificate);
            let first = if later { without_default(l) } else { l.clone() };
            match &current {
                None => out.push(request(Kind::AddListener(first))),
                Some(current) => {
                    let fields = listener_differences(current, &first);
                    if !fields.is_empty() {
                        out.push(request(Kind::UpdateListener(proto::ListenerUpdate {
                            address: address.clone(),
                            listener: Some(first.clone()),
                            fields,
                        })));
                    }
                    if current.active != first.active {
                        let address = proto::ListenerAddress {
                            address: address.clone(),
                        };
                        out.push(request(if first.active {
                            Kind::ActivateListener(address)
                        } else {
                            Kind::DeactivateListener(address)
                        }));
                    }
                }
            }
            if later {
                defaults_later.push(set_default_request(l));
            }
        }
        for (id, c) in &target.clusters {
            if self.clusters.get(id) != Some(c) {
                out.push(request(Kind::AddCluster(c.clone())));
            }
        }
        for (key, b) in &target.backends {
            let unchanged = self.clusters.contains_key(&key.0) && self.backends.get(key) == Some(b);
            if !unchanged {
                out.push(request(Kind::AddBackend(b.clone())));
            }
        }
        for (key, c) in &target.certificates {
            if !self.certificates.get(key).is_some_and(|s| same_certificate(s, c)) || recreated(&key.0) {
                out.push(request(Kind::AddCertificate(c.clone())));
            }
        }
        out.extend(defaults_later);
        for (key, f) in &target.http_frontends {
            if self.http_frontends.get(key) != Some(f) || recreated(&key.address) {
                out.push(request(Kind::AddHttpFrontend(f.clone())));
            }
        }
        for (key, f) in &target.https_frontends {
            if self.https_frontends.get(key) != Some(f) || recreated(&key.address) {
                out.push(request(Kind::AddHttpsFrontend(f.clone())));
            }
        }
        for (address, f) in &target.tcp_frontends {
            if self.tcp_frontends.get(address) != Some(f) || recreated(address) {
                out.push(request(Kind::AddTcpFrontend(f.clone())));
            }
        }
        out
    }
}

fn request_of(kind: Kind) -> proto::Request {
    request(kind)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
