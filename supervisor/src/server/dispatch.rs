//! One request from a client: authorized, then handled by its group in the table of request
//! kinds (`rampart_command::kinds`): state changes, computed state changes (`apply_state`,
//! `load_state`), controls (save, stop, policy, logging) and queries.
//!
//! Every request that changes anything is recorded `received` before it runs, and refused when
//! that record cannot be written; then `completed` with its outcome. Queries are not recorded.

use super::*;

/// The longest drain a stop or an upgrade may ask for: a day.
const MAX_GRACE_SECONDS: u32 = 86_400;

impl Supervisor {
    pub(super) fn handle(&mut self, key: usize, peer: Peer, request: proto::Request) {
        self.handle_request(key, peer, request);
        // Keys of a request that was refused or failed are not kept.
        self.forget_unused_keys();
        self.sync_keyring(self.pending.is_empty(), 0);
    }

    pub(super) fn handle_request(&mut self, key: usize, peer: Peer, mut request: proto::Request) {
        let id = request.id.clone();
        let Some(info) = rampart_command::request_info(&request) else {
            let message = "the request has no kind: it may be another message type or a newer protocol version";
            self.audit.malformed(&peer, &[], message);
            self.respond(key, &id, false, message.into(), None);
            return;
        };
        // A refused request is dropped whole; the blocks that held its keys are wiped when freed.
        if let Err(reason) = self.audit.authorize(&peer, &request, &self.state) {
            self.log.warn(&format!(
                "uid {} pid {}: {} refused: {reason}",
                peer.uid, peer.pid, info.name
            ));
            self.respond(key, &id, false, reason.reason, None);
            return;
        }
        if info.handler == Handler::NotAvailable {
            let message = format!("`{}` is not available in this version of rampart", info.name);
            if info.mutating {
                self.audit.denied(&peer, &request, "not_available", &message);
            }
            self.respond(key, &id, false, message, None);
            return;
        }
        if info.changes_state {
            // Before anything else looks at it: under key isolation a private key leaves the
            // supervisor's memory as soon as the request is authorized.
            let key_check = self.take_keys(&mut request);
            self.state_change(key, peer, request, key_check, None);
            return;
        }
        match request.kind.take() {
            Some(Kind::ApplyState(mut wanted)) => {
                let key_check = self.take_target_keys(&mut wanted.target);
                self.apply_target(key, peer, &id, wanted, key_check);
            }
            Some(Kind::LoadState(p)) => match self.read_state_file(&p.path) {
                Ok(target) => {
                    let mut wanted = proto::ApplyState {
                        target,
                        base_state_hash: String::new(),
                        dry_run: false,
                    };
                    let key_check = self.take_target_keys(&mut wanted.target);
                    self.apply_target(key, peer, &id, wanted, key_check);
                }
                Err(message) => {
                    request.kind = Some(Kind::LoadState(p));
                    self.audit.denied(&peer, &request, "unreadable", &message);
                    self.respond(key, &id, false, message, None);
                }
            },
            kind if info.mutating => {
                request.kind = kind;
                self.control(key, peer, request);
            }
            kind => {
                request.kind = kind;
                match self.query(&request) {
                    Ok((message, content)) => self.respond(key, &id, true, message, content),
                    Err(message) => self.respond(key, &id, false, message, None),
                }
            }
        }
    }

    /// Moves the keys of a wanted state's certificates out of the request (see `take_keys`).
    fn take_target_keys(&mut self, target: &mut Vec<proto::Request>) -> Result<(), String> {
        let mut batch = proto::Request {
            id: String::new(),
            kind: Some(Kind::Apply(proto::Batch {
                requests: std::mem::take(target),
                base_state_hash: String::new(),
            })),
        };
        let checked = self.take_keys(&mut batch);
        if let Some(Kind::Apply(b)) = batch.kind {
            *target = b.requests;
        }
        checked
    }

    /// `apply_state` and `load_state`: the difference between the running state and the wanted
    /// one, computed here (the one diff path), then applied as one atomic batch whose base is the
    /// running state, or only returned for a dry run.
    fn apply_target(
        &mut self,
        key: usize,
        peer: Peer,
        id: &str,
        wanted: proto::ApplyState,
        key_check: Result<(), String>,
    ) {
        let as_request = |w: &proto::ApplyState| proto::Request {
            id: id.to_string(),
            kind: Some(Kind::ApplyState(proto::ApplyState {
                target: Vec::new(),
                base_state_hash: w.base_state_hash.clone(),
                dry_run: w.dry_run,
            })),
        };
        if !wanted.base_state_hash.is_empty() && wanted.base_state_hash != self.state_hash {
            let message = format!(
                "the running state changed since this diff was computed; run apply again (expected state {}, the running state is {})",
                wanted.base_state_hash, self.state_hash
            );
            if !wanted.dry_run {
                self.audit.denied(&peer, &as_request(&wanted), "stale_base", &message);
            }
            self.respond(key, id, false, message, None);
            return;
        }
        let mut target = if self.state.keys_elsewhere() {
            State::without_keys()
        } else {
            State::new()
        };
        let built = wanted.target.iter().enumerate().try_for_each(|(index, r)| {
            target.apply(r).map(|_| ()).map_err(|e| {
                format!(
                    "the wanted state does not build: request {index} ({}): {e}",
                    rampart_command::request_kind_name(r)
                )
            })
        });
        if let Err(message) = built.and(key_check.map_err(|e| format!("invalid certificate: {e}"))) {
            if !wanted.dry_run {
                self.audit.denied(&peer, &as_request(&wanted), "invalid", &message);
            }
            self.respond(key, id, false, message, None);
            return;
        }
        let requests = self.state.diff(&target);
        let mut plan = proto::Plan {
            requests: requests.clone(),
            base_state_hash: self.state_hash.clone(),
            target_state_hash: target.hash_hex(),
            applied: !wanted.dry_run && !requests.is_empty(),
        };
        // Private keys never go back to a client.
        for r in &mut plan.requests {
            visit_certificates(r, &mut |c| zeroize::Zeroize::zeroize(&mut c.key));
        }
        let summary = format!("{} change(s)", plan.requests.len());
        let content = Some(proto::response::Content::Plan(plan));
        if wanted.dry_run {
            self.respond(key, id, true, format!("dry run: {summary}, nothing applied"), content);
            return;
        }
        let batch = proto::Request {
            id: id.to_string(),
            kind: Some(Kind::Apply(proto::Batch {
                requests,
                base_state_hash: self.state_hash.clone(),
            })),
        };
        if let Err(refusal) = self.audit.authorize_computed(&peer, &batch, &self.state) {
            self.respond(key, id, false, refusal.reason, None);
            return;
        }
        self.state_change(key, peer, batch, Ok(()), content);
    }

    /// Requests that change something other than the state: recorded `received` (refused when
    /// that fails), run, recorded `completed`, answered.
    fn control(&mut self, key: usize, peer: Peer, request: proto::Request) {
        let id = request.id.clone();
        let received_seq = match self.audit.received(&peer, &request, None) {
            Ok(seq) => seq,
            Err(e) => {
                self.log.error(&format!("audit log write failed: {e}; request refused"));
                self.respond(
                    key,
                    &id,
                    false,
                    format!("refused: the audit log cannot be written ({e}); nothing was done"),
                    None,
                );
                return;
            }
        };
        let grace_seconds = match &request.kind {
            Some(Kind::SoftStop(s)) => s.grace_seconds,
            Some(Kind::UpgradeMain(u)) => u.grace_seconds,
            Some(Kind::UpgradeWorker(w)) => w.grace_seconds,
            _ => 0,
        };
        if grace_seconds > MAX_GRACE_SECONDS {
            let message = format!(
                "grace_seconds {grace_seconds} is out of range: use 1 to {MAX_GRACE_SECONDS} (0 for the default)"
            );
            self.audit.completed(
                &peer,
                &request,
                received_seq,
                Completion::outcome(Outcome::error("invalid_request", &message)),
            );
            self.respond(key, &id, false, message, None);
            return;
        }
        if matches!(request.kind, Some(Kind::UpgradeMain(_))) {
            // Answered when the new supervisor confirms or fails (upgrade.rs).
            let Err(message) = self.begin_upgrade(key, peer.clone(), request.clone(), received_seq) else {
                return;
            };
            self.audit.completed(
                &peer,
                &request,
                received_seq,
                Completion::outcome(Outcome::error("upgrade_failed", &message)),
            );
            self.respond(key, &id, false, message, None);
            return;
        }
        let result = match &request.kind {
            Some(Kind::SaveState(p)) => match self.audit.state_path(&p.path) {
                Ok(path) => self
                    .write_state_file(&path)
                    .map(|n| format!("saved {n} request(s) to {}", path.display())),
                Err(e) => Err(e.to_string()),
            },
            Some(Kind::UpgradeWorker(w)) => self.upgrade_worker(w.id, w.grace_seconds),
            Some(Kind::SoftStop(s)) => Ok(self.begin_stop(Some(self.shutdown_grace(s.grace_seconds)))),
            Some(Kind::HardStop(_)) => Ok(self.begin_stop(None)),
            Some(Kind::ConfigureMetrics(m)) => self.configure_metrics(m),
            Some(Kind::ReloadPolicy(_)) => self.audit.reload_policy().map_err(|e| e.to_string()),
            Some(Kind::SetLoggingLevel(level)) => self
                .log
                .set_level(&level.filter)
                .map(|()| format!("logging level set to {}", level.filter)),
            _ => Err(format!(
                "`{}` has no handler in this version of rampart",
                rampart_command::request_kind_name(&request)
            )),
        };
        let outcome = match &result {
            Ok(message) => Outcome::ok(message),
            Err(message) => Outcome::error("failed", message),
        };
        self.audit
            .completed(&peer, &request, received_seq, Completion::outcome(outcome));
        match result {
            Ok(message) => self.respond(key, &id, true, message, None),
            Err(message) => self.respond(key, &id, false, message, None),
        }
    }

    /// Ports of backends a request would add, for the landlock check.
    pub(super) fn backend_ports(request: &proto::Request, out: &mut Vec<(String, u16)>) {
        match &request.kind {
            Some(Kind::AddBackend(b)) => {
                if let Ok(a) = b.address.parse::<std::net::SocketAddr>() {
                    out.push((b.address.clone(), a.port()));
                }
            }
            Some(Kind::Apply(batch)) => {
                for r in &batch.requests {
                    Self::backend_ports(r, out);
                }
            }
            _ => {}
        }
    }

    /// The requests of a saved state file, inside the state directory.
    fn read_state_file(&self, requested: &str) -> Result<Vec<proto::Request>, String> {
        let path = self.audit.state_path(requested).map_err(|e| e.to_string())?;
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let loaded = State::load(io::BufReader::new(file)).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(loaded.to_requests())
    }
}
