//! One line of the audit trail: what it holds, how it is hashed, MACed and signed.
//!
//! A record is one JSON object on one line. The chain hash of a record is SHA-256 over
//! [`CHAIN_DOMAIN`] followed by the exact bytes of its line (without the newline); the next
//! record's `prev` is that hash in hex, and the first record of a log has [`GENESIS_PREV`].
//! Because the hash covers the bytes as written, the verifier never re-serializes anything.
//!
//! The optional `mac` is always the last field. It is HMAC-SHA256, with the key of the record's
//! `epoch`, over [`MAC_DOMAIN`] followed by the line as it would be without the `mac` field:
//! the line with its final `,"mac":"<64 hex>"}` replaced by `}` ([`split_mac`]).
//!
//! A checkpoint record (stage `checkpoint`) carries an Ed25519 signature over
//! [`checkpoint_message`]: the log id, its own sequence number, its `prev` (the hash of the chain
//! head it certifies), its kind and its time.

use std::time::SystemTime;

use rampart_command::proto::{self, request::Kind};
use rampart_command::request_kind_name;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the record format, the `v` field.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of the chain hash input.
pub const CHAIN_DOMAIN: &[u8] = b"rampart-audit-v1\0";
/// Prefix of the MAC input.
pub const MAC_DOMAIN: &[u8] = b"rampart-audit-mac-v1\0";
/// `prev` of the first record of a log.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `action` of the record a writer appends each time it opens a log.
pub const ACTION_OPENED: &str = "audit_opened";
/// `action` of the first record of a file created by rotation.
pub const ACTION_CONTINUED: &str = "audit_continued";
/// `action` of checkpoint records.
pub const ACTION_CHECKPOINT: &str = "checkpoint";
/// `action` of the record a writer appends after it cut a torn write from the end of a log
/// (see [`TornTail`]).
pub const ACTION_REPAIRED: &str = "audit_repaired";
/// `action` of the record a writer appends once it can write again after records could not
/// be written (a full disk): how many, which, since when, and why.
pub const ACTION_WRITE_FAILED: &str = "audit_write_failed";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// A request was authorized and is about to be applied.
    Received,
    /// A request was applied (or failed while being applied).
    Completed,
    /// A request was refused: by the access policy, a rate limit, or because it was malformed.
    Denied,
    /// Something the supervisor did on its own: start, stop, worker crash, policy reload.
    System,
    /// A signed statement of the chain head.
    Checkpoint,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Received => "received",
            Stage::Completed => "completed",
            Stage::Denied => "denied",
            Stage::System => "system",
            Stage::Checkpoint => "checkpoint",
        }
    }
}

/// Who sent the request, as SO_PEERCRED and the access policy describe them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl Actor {
    /// An actor with its user name (from the user database) and process name (from
    /// `/proc/<pid>/comm`) looked up, each left out when it cannot be read.
    pub fn resolve(uid: u32, gid: u32, pid: i32, role: Option<&str>) -> Actor {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        let process = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|s| s.trim_end().to_string())
            .filter(|s| !s.is_empty());
        Actor {
            uid,
            gid,
            pid,
            user,
            process,
            role: role.map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    Ok,
    Error,
    Denied,
}

impl OutcomeStatus {
    pub fn name(self) -> &'static str {
        match self {
            OutcomeStatus::Ok => "ok",
            OutcomeStatus::Error => "error",
            OutcomeStatus::Denied => "denied",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub status: OutcomeStatus,
    /// A short stable code (`unknown_cluster`, `rate_limited`, ...) when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Outcome {
    pub fn ok(message: impl Into<String>) -> Outcome {
        Outcome {
            status: OutcomeStatus::Ok,
            code: None,
            message: Some(message.into()),
        }
    }

    pub fn error(code: impl Into<String>, message: impl Into<String>) -> Outcome {
        Outcome {
            status: OutcomeStatus::Error,
            code: Some(code.into()),
            message: Some(message.into()),
        }
    }

    pub fn denied(code: impl Into<String>, message: impl Into<String>) -> Outcome {
        Outcome {
            status: OutcomeStatus::Denied,
            code: Some(code.into()),
            message: Some(message.into()),
        }
    }
}

/// What one process (a worker or the keyring) did with a change the supervisor applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessResult {
    /// Acknowledged: it applied the change.
    Applied,
    /// Answered that it could not apply the change.
    Refused,
    /// Did not answer within the acknowledgement timeout.
    TimedOut,
    /// Ended before it answered.
    Exited,
}

impl ProcessResult {
    pub fn name(self) -> &'static str {
        match self {
            ProcessResult::Applied => "applied",
            ProcessResult::Refused => "refused",
            ProcessResult::TimedOut => "timed_out",
            ProcessResult::Exited => "exited",
        }
    }
}

/// One process's part in a `completed` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessOutcome {
    /// `worker 0`, `worker 1`, ..., or `keyring`.
    pub process: String,
    pub pid: i32,
    pub result: ProcessResult,
    /// What it answered, for a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The supervisor replaced it with a new process built from the supervisor's state, so that
    /// no process serves a configuration other than the recorded one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replaced: bool,
}

/// Why a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Every `checkpoint_every` records.
    Count,
    /// The caller's timer ([`AuditLog::checkpoint_if_due`](crate::AuditLog::checkpoint_if_due)).
    Time,
    /// Explicitly requested.
    Manual,
    /// Last record of a file before it is renamed away.
    Rotation,
    /// Last record before a clean shutdown.
    Close,
}

impl CheckpointKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckpointKind::Count => "count",
            CheckpointKind::Time => "time",
            CheckpointKind::Manual => "manual",
            CheckpointKind::Rotation => "rotation",
            CheckpointKind::Close => "close",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub kind: CheckpointKind,
    /// Hex Ed25519 public key that signed it (for matching; trust comes from `--pubkey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pubkey: Option<String>,
    /// Hex Ed25519 signature over [`checkpoint_message`]; absent when no signing key is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// What a writer cut from the end of a log before continuing it: a torn write (a last line
/// without its newline, or that is not a record), left by a crash during a write or by an
/// older rampart on a full disk. The cut bytes are kept in a side file next to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TornTail {
    /// Byte offset in the log file where the cut bytes began: where the record that carries
    /// this now starts.
    pub offset: u64,
    /// How many bytes were cut.
    pub length: u64,
    /// SHA-256 of the cut bytes, in hex.
    pub sha256: String,
    /// The side file holding them: a file name in the log's directory.
    pub file: String,
}

/// One line of the audit log. Field order is the serialized order; `mac` must stay last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub v: u32,
    pub log_id: String,
    pub seq: u64,
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The request as JSON, secrets replaced by `sha256:<hex>` ([`redact`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    /// On a `completed` record: the seq of the `received` record of the same request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_after: Option<String>,
    /// On a `completed` record of a change sent to the workers: what each of them did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<ProcessOutcome>>,
    /// On an `audit_repaired` record: what was cut from the end of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torn_tail: Option<TornTail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    pub prev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl AuditRecord {
    /// The checkpoint kind, for checkpoint records.
    pub fn checkpoint_kind(&self) -> Option<CheckpointKind> {
        match (&self.stage, &self.checkpoint) {
            (Stage::Checkpoint, Some(c)) => Some(c.kind),
            _ => None,
        }
    }

    /// Parsed `time`.
    pub fn timestamp(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.time).ok()
    }
}

/// What a caller records; [`AuditLog::append`](crate::AuditLog::append) adds the chain fields.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub stage: Stage,
    pub actor: Option<Actor>,
    pub request_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub request: Option<serde_json::Value>,
    pub received_seq: Option<u64>,
    pub outcome: Option<Outcome>,
    pub state_before: Option<String>,
    pub state_after: Option<String>,
    pub processes: Option<Vec<ProcessOutcome>>,
}

impl AuditEvent {
    fn for_request(stage: Stage, actor: Actor, request: &proto::Request, with_body: bool) -> AuditEvent {
        AuditEvent {
            stage,
            actor: Some(actor),
            request_id: (!request.id.is_empty()).then(|| request.id.clone()),
            action: request_kind_name(request).to_string(),
            target: request_target(request),
            request: with_body.then(|| request_json(request)),
            received_seq: None,
            outcome: None,
            state_before: None,
            state_after: None,
            processes: None,
        }
    }

    /// An authorized request about to be applied. `state_before` is
    /// [`State::hash_hex`](rampart_command::state::State::hash_hex) for state changes.
    pub fn received(actor: Actor, request: &proto::Request, state_before: Option<String>) -> AuditEvent {
        AuditEvent {
            state_before,
            ..AuditEvent::for_request(Stage::Received, actor, request, true)
        }
    }

    /// The result of a request whose `received` record has sequence number `received_seq`.
    /// The request body is not repeated: it is in the `received` record.
    pub fn completed(
        actor: Actor,
        request: &proto::Request,
        received_seq: u64,
        outcome: Outcome,
        state_before: Option<String>,
        state_after: Option<String>,
    ) -> AuditEvent {
        AuditEvent {
            received_seq: Some(received_seq),
            outcome: Some(outcome),
            state_before,
            state_after,
            ..AuditEvent::for_request(Stage::Completed, actor, request, false)
        }
    }

    /// A request refused before anything was done; `code` is `forbidden`, `rate_limited`, ...
    pub fn denied(actor: Actor, request: &proto::Request, code: &str, reason: &str) -> AuditEvent {
        AuditEvent {
            outcome: Some(Outcome::denied(code, reason)),
            ..AuditEvent::for_request(Stage::Denied, actor, request, true)
        }
    }

    /// A frame that could not be decoded into a request.
    pub fn malformed(actor: Actor, error: &str) -> AuditEvent {
        AuditEvent {
            stage: Stage::Denied,
            actor: Some(actor),
            request_id: None,
            action: "malformed".into(),
            target: None,
            request: None,
            received_seq: None,
            outcome: Some(Outcome::denied("malformed", error)),
            state_before: None,
            state_after: None,
            processes: None,
        }
    }

    /// A signal the supervisor received and acted on, with the sender as signalfd names it.
    pub fn signal(sender: Actor, signal: &str, outcome: Outcome) -> AuditEvent {
        AuditEvent {
            actor: Some(sender),
            target: Some("rampart".into()),
            ..AuditEvent::system(&format!("signal_{}", signal.to_ascii_lowercase()), outcome)
        }
    }

    /// Something the supervisor did on its own (`action` such as `start`, `worker_crash`).
    pub fn system(action: &str, outcome: Outcome) -> AuditEvent {
        AuditEvent {
            stage: Stage::System,
            actor: None,
            request_id: None,
            action: action.to_string(),
            target: None,
            request: None,
            received_seq: None,
            outcome: Some(outcome),
            state_before: None,
            state_after: None,
            processes: None,
        }
    }
}

/// SHA-256 of a line under the chain's domain tag.
pub fn chain_hash(line: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(line);
    h.finalize().into()
}

/// Splits a line that ends with a `mac` field into the bytes the MAC covers and the MAC's hex.
/// `None` when the line does not end with `,"mac":"<64 lower-case hex>"}`.
pub fn split_mac(line: &[u8]) -> Option<(Vec<u8>, &str)> {
    const PREFIX: &[u8] = b",\"mac\":\"";
    const TAIL: usize = PREFIX.len() + 64 + 2;
    let start = line.len().checked_sub(TAIL)?;
    let tail = line.get(start..)?;
    if !tail.starts_with(PREFIX) || !tail.ends_with(b"\"}") {
        return None;
    }
    let hex_bytes = tail.get(PREFIX.len()..PREFIX.len() + 64)?;
    if !hex_bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut covered = line.get(..start)?.to_vec();
    covered.push(b'}');
    Some((covered, std::str::from_utf8(hex_bytes).ok()?))
}

/// The bytes an Ed25519 checkpoint signature covers.
pub fn checkpoint_message(log_id: &str, seq: u64, prev: &str, kind: CheckpointKind, time: &str) -> Vec<u8> {
    format!(
        "rampart-audit-checkpoint-v1\0{log_id}\0{seq}\0{prev}\0{}\0{time}",
        kind.name()
    )
    .into_bytes()
}

/// Current UTC time, RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `sha256:<hex>` of a secret, the form secrets take in the audit log.
pub fn secret_fingerprint(secret: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
}

fn redact_certificate(c: &mut proto::Certificate) {
    if !c.key.is_empty() {
        c.key = secret_fingerprint(&c.key);
    }
}

/// A copy of `request` with every secret replaced by its fingerprint. The secrets of the
/// protocol are the private keys of certificates (`Certificate.key`), in `add_certificate`,
/// `replace_certificate` and inside batches; a new secret field must be added here.
pub fn redact(request: &proto::Request) -> proto::Request {
    let mut r = request.clone();
    match &mut r.kind {
        Some(Kind::AddCertificate(c)) => redact_certificate(c),
        Some(Kind::ReplaceCertificate(rc)) => {
            if let Some(c) = rc.new_certificate.as_mut() {
                redact_certificate(c);
            }
        }
        Some(Kind::Apply(batch)) => {
            batch.requests = batch.requests.iter().map(redact).collect();
        }
        _ => {}
    }
    r
}

/// The redacted request as JSON.
pub fn request_json(request: &proto::Request) -> serde_json::Value {
    serde_json::to_value(redact(request)).unwrap_or(serde_json::Value::Null)
}

pub use rampart_command::request_target;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fingerprinted_everywhere() {
        let cert = proto::Certificate {
            address: "127.0.0.1:443".into(),
            key: "-----BEGIN PRIVATE KEY-----\nSECRET\n-----END PRIVATE KEY-----\n".into(),
            ..Default::default()
        };
        let add = proto::Request {
            id: "1".into(),
            kind: Some(Kind::AddCertificate(cert.clone())),
        };
        let batch = proto::Request {
            id: "2".into(),
            kind: Some(Kind::Apply(proto::Batch {
                requests: vec![
                    add.clone(),
                    proto::Request {
                        id: String::new(),
                        kind: Some(Kind::ReplaceCertificate(proto::ReplaceCertificate {
                            address: "127.0.0.1:443".into(),
                            old_fingerprint: "ab".into(),
                            new_certificate: Some(cert.clone()),
                        })),
                    },
                ],
                base_state_hash: String::new(),
            })),
        };
        for r in [&add, &batch] {
            let text = request_json(r).to_string();
            assert!(!text.contains("SECRET"), "{text}");
            assert!(text.contains(&secret_fingerprint(&cert.key)), "{text}");
        }
    }

    #[test]
    fn mac_suffix_splits_exactly() {
        let mac = "ab".repeat(32);
        let line = format!("{{\"a\":1,\"mac\":\"{mac}\"}}");
        let (covered, found) = split_mac(line.as_bytes()).unwrap();
        assert_eq!(covered, b"{\"a\":1}");
        assert_eq!(found, mac);
        assert!(split_mac(b"{\"a\":1}").is_none());
        let upper = format!("{{\"a\":1,\"mac\":\"{}\"}}", "AB".repeat(32));
        assert!(split_mac(upper.as_bytes()).is_none());
    }
}
