//! The supervisor's door: who may send what (the access policy and per-uid rate limits), and
//! the audit trail every request and every lifecycle event goes into.
//!
//! Order for a request: authorize (and rate-limit) → `received` written and flushed → apply →
//! `completed`. If the `received` record cannot be written, the request fails and nothing
//! changes (fail-closed). Denied and malformed requests are recorded too, malformed frames by
//! size and hash only.

use std::time::{Duration, Instant};

use rampart_audit::record::ProcessOutcome;
use rampart_audit::syslog::SyslogOptions;
use rampart_audit::{Actor, AuditEvent, AuditLog, AuditOptions, Outcome};
use rampart_command::config::Config;
use rampart_command::proto;
use rampart_command::state::State;
use rampart_policy::access::{AccessPolicy, Decision, Peer, RateLimiter, RequestClass};
use sha2::{Digest, Sha256};

/// Refusals recorded one by one per uid before they are only counted: a sustained rate and a
/// burst. Beyond them, each interval ends with one summary record per interval, so the trail
/// stays complete (every refusal is counted) and bounded (a uid with no role cannot fill it).
const REFUSALS_PER_SECOND: f64 = 2.0;
const REFUSAL_BURST: f64 = 20.0;
const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Uids tracked one by one; beyond, refusals are counted together.
const REFUSAL_UIDS: usize = 4096;

/// Per-uid budget of refusals recorded in full, and the counts of those that were not.
#[derive(Default)]
struct RefusalBudget {
    buckets: std::collections::HashMap<u32, (f64, Instant)>,
    /// Not recorded since the last summary: by uid, then by code.
    dropped: std::collections::BTreeMap<u32, std::collections::BTreeMap<String, u64>>,
    since: Option<Instant>,
}

impl RefusalBudget {
    /// Whether a refusal of `uid` is recorded in full (else it is counted under `code`).
    fn admit(&mut self, uid: u32, code: &str, now: Instant) -> bool {
        if self.buckets.len() >= REFUSAL_UIDS && !self.buckets.contains_key(&uid) {
            // Forget uids whose buckets are full again; if none, count this one.
            self.buckets.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f64() * REFUSALS_PER_SECOND < REFUSAL_BURST
            });
        }
        let admitted = if self.buckets.len() < REFUSAL_UIDS || self.buckets.contains_key(&uid) {
            let (tokens, last) = self.buckets.entry(uid).or_insert((REFUSAL_BURST, now));
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * REFUSALS_PER_SECOND).min(REFUSAL_BURST);
            *last = now;
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                true
            } else {
                false
            }
        } else {
            false
        };
        if !admitted {
            let key = if self.dropped.len() >= REFUSAL_UIDS && !self.dropped.contains_key(&uid) {
                u32::MAX
            } else {
                uid
            };
            *self
                .dropped
                .entry(key)
                .or_default()
                .entry(code.to_string())
                .or_default() += 1;
            self.since.get_or_insert(now);
        }
        admitted
    }

    /// The summary due now, if any: "uid 1000: 3450 forbidden, 12 malformed; ...".
    fn summary(&mut self, now: Instant) -> Option<String> {
        let since = self.since?;
        if now.duration_since(since) < REFUSAL_SUMMARY_INTERVAL {
            return None;
        }
        self.since = None;
        let parts: Vec<String> = std::mem::take(&mut self.dropped)
            .into_iter()
            .map(|(uid, codes)| {
                let who = if uid == u32::MAX {
                    "other uids".to_string()
                } else {
                    format!("uid {uid}")
                };
                let counts: Vec<String> = codes.into_iter().map(|(code, n)| format!("{n} {code}")).collect();
                format!("{who}: {}", counts.join(", "))
            })
            .collect();
        Some(format!(
            "refusals over the per-uid recording rate ({REFUSALS_PER_SECOND}/s, burst {REFUSAL_BURST}) in the last {} s, counted but not recorded one by one: {}",
            now.duration_since(since).as_secs(),
            parts.join("; ")
        ))
    }
}

pub struct Auditor {
    /// None once closed at shutdown.
    log: Option<AuditLog>,
    policy: AccessPolicy,
    limiter: RateLimiter,
    policy_file: Option<std::path::PathBuf>,
    state_dir: std::path::PathBuf,
    refusals: RefusalBudget,
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        })
        .unwrap_or_default()
}

fn audit_options(config: &Config) -> AuditOptions {
    AuditOptions {
        signing_key: config.audit.signing_key.clone(),
        checkpoint_every: (config.audit.checkpoint_every > 0).then_some(config.audit.checkpoint_every),
        checkpoint_interval: (config.audit.checkpoint_interval > 0)
            .then(|| Duration::from_secs(config.audit.checkpoint_interval)),
        hmac_key: config.audit.hmac_key.clone(),
        epoch_records: config.audit.epoch_records.max(1),
        syslog: config.audit.syslog_socket.as_ref().map(|socket| SyslogOptions {
            socket: socket.clone(),
            ..SyslogOptions::default()
        }),
    }
}

/// The real gid of a running process, from /proc.
fn process_gid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Gid:"))
        .and_then(|g| g.split_whitespace().next())
        .and_then(|g| g.parse().ok())
}

/// Why the supervisor's door could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum AuditorError {
    #[error("cannot create the audit log's directory {}: {source}", path.display())]
    Directory {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The audit log refused a record (the request it was for must not proceed).
    #[error("{0}")]
    Log(#[from] rampart_audit::AuditError),
    #[error("the audit log is closed")]
    Closed,
    #[error("{0}")]
    Policy(#[from] rampart_policy::access::AccessError),
    #[error(
        "no access_policy file is configured: the built-in policy (root and the supervisor's uid are admin) has nothing to reload"
    )]
    NoPolicyFile,
    #[error("the policy was not changed: {0}")]
    PolicyNotReloaded(rampart_policy::access::AccessError),
}

/// A request the door refused: a stable code for the trail and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `forbidden` or `rate_limited`.
    pub code: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What a `completed` record says beyond the request it completes.
pub struct Completion {
    pub outcome: Outcome,
    pub state_before: Option<String>,
    pub state_after: Option<String>,
    pub processes: Option<Vec<ProcessOutcome>>,
}

impl Completion {
    /// The outcome of a request that changed no state.
    pub fn outcome(outcome: Outcome) -> Completion {
        Completion {
            outcome,
            state_before: None,
            state_after: None,
            processes: None,
        }
    }
}

/// A peer as SO_PEERCRED gave it, with its supplementary groups.
pub fn peer(uid: u32, gid: u32, pid: i32) -> Peer {
    Peer {
        uid,
        gid,
        pid,
        groups: supplementary_groups(pid),
    }
}

impl Auditor {
    pub fn open(config: &Config) -> Result<Auditor, AuditorError> {
        if let Some(dir) = config.audit_log.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| AuditorError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let options = audit_options(config);
        let log = AuditLog::open(&config.audit_log, options)?;
        let own_uid = nix::unistd::Uid::current().as_raw();
        let policy = match &config.access_policy {
            Some(path) => AccessPolicy::load(path)?,
            None => AccessPolicy::default_for(own_uid),
        }
        .with_state_dir(&config.state_dir);
        Ok(Auditor {
            log: Some(log),
            policy,
            limiter: RateLimiter::new(),
            policy_file: config.access_policy.clone(),
            state_dir: config.state_dir.clone(),
            refusals: RefusalBudget::default(),
        })
    }

    fn append(&mut self, event: AuditEvent) -> Result<rampart_audit::Appended, AuditorError> {
        match &mut self.log {
            Some(log) => Ok(log.append(event)?),
            None => Err(AuditorError::Closed),
        }
    }

    fn actor(&self, peer: &Peer) -> Actor {
        let role = self.policy.role_of(peer).map(|r| r.name());
        Actor::resolve(peer.uid, peer.gid, peer.pid, role)
    }

    /// A new command connection: refused when the uid has too many open already.
    pub fn connection_opened(&mut self, peer: &Peer) -> Result<(), rampart_policy::access::AccessError> {
        let limits = self.policy.limits_for(peer);
        self.limiter.acquire_connection(peer.uid, &limits, Instant::now())
    }

    pub fn connection_closed(&mut self, peer: &Peer) {
        self.limiter.release_connection(peer.uid);
    }

    /// What opening the log repaired: a torn last line cut aside at start, if there was one.
    pub fn repaired(&self) -> Option<String> {
        let torn = self.log.as_ref()?.repaired()?;
        Some(format!(
            "the audit log ended with a torn write: {} byte(s) at offset {} were moved to {} (sha256 {}) and the repair recorded",
            torn.length, torn.offset, torn.file, torn.sha256
        ))
    }

    /// The largest request frame a peer may send (by its grant, else by its role).
    pub fn max_request_bytes(&self, peer: &Peer) -> usize {
        self.policy.limits_for(peer).request_bytes(self.policy.role_of(peer))
    }

    /// Whether the peer has the admin role.
    pub fn is_admin(&self, peer: &Peer) -> bool {
        self.policy.role_of(peer) == Some(rampart_policy::access::Role::Admin)
    }

    /// The idle timeout of a peer's connections.
    pub fn idle_timeout(&self, peer: &Peer) -> Duration {
        self.policy.limits_for(peer).idle_timeout
    }

    /// May `peer` send `request` now? A refusal is audited and its reason returned.
    pub fn authorize(&mut self, peer: &Peer, request: &proto::Request, state: &State) -> Result<(), Refusal> {
        let refusal = match self.policy.authorize(peer, request, state) {
            Decision::Deny { reason, .. } => Some(("forbidden", format!("permission denied: {reason}"))),
            Decision::Allow { .. } => {
                let limits = self.policy.limits_for(peer);
                let class = RequestClass::of(request);
                self.limiter
                    .check_request(peer.uid, &limits, class, Instant::now())
                    .err()
                    .map(|e| ("rate_limited", e.to_string()))
            }
        };
        match refusal {
            None => Ok(()),
            Some((code, reason)) => {
                self.denied(peer, request, code, &reason);
                Err(Refusal { code, reason })
            }
        }
    }

    /// Records a refusal decided after authorization (e.g. a port the workers cannot reach).
    pub fn denied(&mut self, peer: &Peer, request: &proto::Request, code: &str, reason: &str) {
        if !self.refusals.admit(peer.uid, code, Instant::now()) {
            return;
        }
        let event = AuditEvent::denied(self.actor(peer), request, code, reason);
        let _ = self.append(event);
    }

    /// A command connection refused or closed for its uid's connection limit (recorded within
    /// the same per-uid budget as refused requests).
    pub fn connection_refused(&mut self, peer: &Peer, code: &str, reason: &str) {
        if !self.refusals.admit(peer.uid, code, Instant::now()) {
            return;
        }
        let mut event = AuditEvent::malformed(self.actor(peer), reason);
        event.action = "connection_refused".into();
        event.outcome = Some(Outcome::denied(code, reason));
        let _ = self.append(event);
    }

    /// The access policy alone, without charging the rate limit: for the batch a request
    /// became once the supervisor computed it (`apply_state`, `load_state`), whose sender was
    /// already authorized and counted. A refusal is audited.
    pub fn authorize_computed(&mut self, peer: &Peer, request: &proto::Request, state: &State) -> Result<(), Refusal> {
        match self.policy.authorize(peer, request, state) {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny { reason, .. } => {
                let reason = format!("permission denied: {reason}");
                self.denied(peer, request, "forbidden", &reason);
                Err(Refusal {
                    code: "forbidden",
                    reason,
                })
            }
        }
    }

    /// Writes and flushes the `received` record; an error means the request must not proceed.
    /// `state_hash`: the running state's hash before the request, for state changes.
    pub fn received(
        &mut self,
        peer: &Peer,
        request: &proto::Request,
        state_hash: Option<&str>,
    ) -> Result<u64, AuditorError> {
        let event = AuditEvent::received(self.actor(peer), request, state_hash.map(str::to_string));
        self.append(event).map(|a| a.seq)
    }

    /// The `completed` record of a request whose `received` record is `received_seq`.
    pub fn completed(&mut self, peer: &Peer, request: &proto::Request, received_seq: u64, completion: Completion) {
        let mut event = AuditEvent::completed(
            self.actor(peer),
            request,
            received_seq,
            completion.outcome,
            completion.state_before,
            completion.state_after,
        );
        event.processes = completion.processes;
        let _ = self.append(event);
    }

    /// A signal the supervisor acted on, with its sender as signalfd reports it.
    pub fn signal(&mut self, uid: u32, pid: i32, signal: &str, message: &str) {
        let gid = process_gid(pid)
            .or_else(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.gid.as_raw())
            })
            .unwrap_or(u32::MAX);
        let sender = peer(uid, gid, pid);
        let actor = self.actor(&sender);
        let _ = self.append(AuditEvent::signal(actor, signal, Outcome::ok(message)));
    }

    /// A frame that did not decode: recorded by size and hash, never by content.
    pub fn malformed(&mut self, peer: &Peer, body: &[u8], error: &str) {
        if !self.refusals.admit(peer.uid, "malformed", Instant::now()) {
            return;
        }
        let digest = hex::encode(Sha256::digest(body));
        let text = format!("{error} ({} bytes, sha256 {digest})", body.len());
        let event = AuditEvent::malformed(self.actor(peer), &text);
        let _ = self.append(event);
    }

    /// Something the supervisor did on its own.
    pub fn system(&mut self, action: &str, message: &str) {
        let _ = self.append(AuditEvent::system(action, Outcome::ok(message)));
    }

    /// Writes a time-based checkpoint when one is due.
    pub fn tick(&mut self) {
        if let Some(summary) = self.refusals.summary(Instant::now()) {
            let _ = self.append(AuditEvent::system("refusals_summarized", Outcome::ok(summary)));
        }
        if let Some(log) = &mut self.log {
            let _ = log.checkpoint_if_due(Instant::now());
        }
    }

    pub fn policy_text(&self) -> String {
        self.policy.to_text()
    }

    pub fn state_path(&self, requested: &str) -> Result<std::path::PathBuf, rampart_policy::access::AccessError> {
        self.policy.state_path(requested)
    }

    /// Reads the access policy file again (an admin request, authorized before this call). The
    /// running policy stays when the file is invalid.
    pub fn reload_policy(&mut self) -> Result<String, AuditorError> {
        let Some(path) = self.policy_file.clone() else {
            return Err(AuditorError::NoPolicyFile);
        };
        let policy = AccessPolicy::load(&path).map_err(AuditorError::PolicyNotReloaded)?;
        self.policy = policy.with_state_dir(&self.state_dir);
        let message = format!("access policy reloaded from {}", path.display());
        Ok(message)
    }

    /// Starts a new audit file, chained to the previous one.
    pub fn rotate(&mut self) -> Result<String, AuditorError> {
        match &mut self.log {
            Some(log) => Ok(log
                .rotate()
                .map(|p| format!("audit log rotated; previous file is {}", p.display()))?),
            None => Err(AuditorError::Closed),
        }
    }

    /// Closes the log for an upgrade: the new supervisor opens it next (a log has one writer).
    pub fn suspend(&mut self) {
        self.close();
    }

    /// Opens the log again after an upgrade that did not happen (the chain continues after
    /// whatever the new supervisor wrote).
    pub fn resume(&mut self, config: &Config) -> Result<(), AuditorError> {
        if self.log.is_none() {
            self.log = Some(AuditLog::open(&config.audit_log, audit_options(config))?);
        }
        Ok(())
    }

    /// Closes the log with a final checkpoint (after the last summary of refusals).
    pub fn close(&mut self) {
        if let Some(summary) = self.refusals.summary(Instant::now() + REFUSAL_SUMMARY_INTERVAL) {
            let _ = self.append(AuditEvent::system("refusals_summarized", Outcome::ok(summary)));
        }
        if let Some(log) = self.log.take() {
            let _ = log.close();
        }
    }
}
