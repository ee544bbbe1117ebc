//! A state change: applied to the supervisor's state, sent to every process, and answered (and
//! recorded `completed`) once each of them acknowledged it, refused it, ended, or timed out.
//!
//! The supervisor's state is the authority. A worker that refused a change it was sent, or did
//! not answer within [`WORKER_ACK_TIMEOUT`] (more for a large batch), no longer serves the recorded configuration, so it
//! is replaced: a new worker takes its slot (the same listening sockets, so no accept queue is
//! lost) and is built from the supervisor's state, while the old one stops accepting and drains
//! its connections for at most `timeouts.shutdown_grace`. A process that ended is respawned from
//! the state as after any crash. Rolling the change back instead would let one stuck worker veto
//! every change; the trail records, per process, what happened.

use super::*;

impl Supervisor {
    pub(super) fn worker_reply(&mut self, id: u32, reply: proto::WorkerReply) {
        let ok = reply.status == proto::ResponseStatus::Ok as i32;
        if reply.sequence == 0 {
            if !ok {
                // A new worker refusing part of the state it was built from: it cannot be
                // rebuilt any better, so it is recorded for the operator.
                let message = format!("worker {id} refused a request of its initial state: {}", reply.message);
                self.log.error(&message);
                self.audit.system("worker_state_refused", &message);
            }
            return;
        }
        let name = self.process_name(id);
        let Some(p) = self.pending.get_mut(&reply.sequence) else {
            return;
        };
        let Some(pid) = p.waiting.remove(&id) else { return };
        p.results.push(ProcessOutcome {
            process: name,
            pid,
            result: if ok {
                ProcessResult::Applied
            } else {
                ProcessResult::Refused
            },
            message: (!ok).then(|| reply.message.clone()),
            replaced: false,
        });
        if p.waiting.is_empty() {
            self.finish_pending(reply.sequence);
        }
    }

    /// `worker N`, or `keyring`.
    pub(super) fn process_name(&self, id: u32) -> String {
        if self.workers.get(id as usize).is_some_and(|w| w.keyring) {
            "keyring".into()
        } else {
            format!("worker {id}")
        }
    }

    /// Changes whose processes did not all answer in time: those left are recorded as timed out.
    pub(super) fn expire_pending(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(s, _)| *s)
            .collect();
        for sequence in late {
            let waiting = match self.pending.get_mut(&sequence) {
                Some(p) => std::mem::take(&mut p.waiting),
                None => continue,
            };
            let outcomes: Vec<ProcessOutcome> = waiting
                .into_iter()
                .map(|(id, pid)| ProcessOutcome {
                    process: self.process_name(id),
                    pid,
                    result: ProcessResult::TimedOut,
                    message: Some("no answer within the acknowledgement timeout".into()),
                    replaced: false,
                })
                .collect();
            if let Some(p) = self.pending.get_mut(&sequence) {
                p.results.extend(outcomes);
            }
            self.finish_pending(sequence);
        }
    }

    /// A process ended: the changes waiting for it stop waiting (it is respawned from the state).
    pub(super) fn pending_process_ended(&mut self, id: u32, how: &str) {
        let name = self.process_name(id);
        let done: Vec<u64> = self
            .pending
            .iter_mut()
            .filter_map(|(s, p)| {
                let pid = p.waiting.remove(&id)?;
                p.results.push(ProcessOutcome {
                    process: name.clone(),
                    pid,
                    result: ProcessResult::Exited,
                    message: Some(how.to_string()),
                    replaced: true,
                });
                p.waiting.is_empty().then_some(*s)
            })
            .collect();
        for sequence in done {
            self.finish_pending(sequence);
        }
    }

    /// Every process answered (or will never): replace those that diverged, save the state,
    /// record the outcome, answer the client.
    pub(super) fn finish_pending(&mut self, sequence: u64) {
        let Some(mut p) = self.pending.remove(&sequence) else {
            return;
        };
        if self.pending.is_empty() {
            self.sync_keyring(true, 0);
        }
        let mut notes = Vec::new();
        for outcome in &mut p.results {
            if !matches!(outcome.result, ProcessResult::Refused | ProcessResult::TimedOut) {
                continue;
            }
            let id = self
                .workers
                .iter()
                .find(|w| w.pid.map(Pid::as_raw) == Some(outcome.pid))
                .map(|w| w.id);
            let what = match outcome.result {
                ProcessResult::Refused => format!(
                    "{} refused it ({})",
                    outcome.process,
                    outcome.message.as_deref().unwrap_or("no reason given")
                ),
                _ => format!(
                    "{} did not acknowledge within {}s",
                    outcome.process,
                    WORKER_ACK_TIMEOUT.as_secs()
                ),
            };
            if let Some(id) = id {
                self.replace_process(id, &what, self.upgrade_grace(0));
                outcome.replaced = true;
                notes.push(format!(
                    "{what} and was replaced by a new process built from the supervisor's state"
                ));
            } else {
                notes.push(format!("{what} and has ended since"));
            }
        }
        p.results.sort_by(|a, b| a.process.cmp(&b.process));
        let mut message = p.message.clone();
        if !notes.is_empty() {
            message = format!("{message}; but {}", notes.join("; "));
        }
        self.complete_change(p, message);
    }

    /// The end of an applied change: saved state, `completed` record, answer.
    fn complete_change(&mut self, p: Pending, message: String) {
        let saved = self.persist_state();
        let (outcome, ok, message) = match saved {
            Ok(()) => (Outcome::ok(&message), true, message),
            Err(e) => {
                let message = format!(
                    "{message}; but it could not be written to the saved state ({e}): it is in force, and lost if rampart restarts before the next saved change"
                );
                (Outcome::error("not_saved", &message), false, message)
            }
        };
        self.audit.completed(
            &p.peer,
            &p.request,
            p.received_seq,
            Completion {
                outcome,
                state_before: Some(p.state_before),
                state_after: Some(p.state_after),
                processes: Some(p.results),
            },
        );
        if self.client_serial(p.client) == Some(p.serial) {
            self.respond(p.client, &p.request.id, ok, message, p.content);
        }
    }

    /// Checks, records `received`, applies to the supervisor's state, sends to every process.
    /// `content` goes with the final answer (the plan of an `apply_state`).
    pub(super) fn state_change(
        &mut self,
        key: usize,
        peer: Peer,
        request: proto::Request,
        key_check: Result<(), String>,
        content: Option<proto::response::Content>,
    ) {
        let id = request.id.clone();
        if let Err(message) = key_check {
            let message = format!("invalid certificate: {message}");
            self.audit.denied(&peer, &request, "invalid_certificate", &message);
            self.respond(key, &id, false, message, None);
            return;
        }
        if let Some(Kind::Apply(batch)) = &request.kind
            && !batch.base_state_hash.is_empty()
            && batch.base_state_hash != self.state_hash
        {
            let message = format!(
                "the running state changed since this diff was computed; run apply again (the batch was computed against state {}, the running state is {})",
                batch.base_state_hash, self.state_hash
            );
            self.audit.denied(&peer, &request, "stale_base", &message);
            self.respond(key, &id, false, message, None);
            return;
        }
        if let ConnectRule::Ports(allowed) = &self.launch.jail.connect
            && !self.launch.jail.sandbox_off
        {
            let mut ports = Vec::new();
            Self::backend_ports(&request, &mut ports);
            let missing: BTreeSet<u16> = ports.iter().map(|(_, p)| *p).filter(|p| !allowed.contains(p)).collect();
            if let Some((address, port)) = ports.iter().find(|(_, p)| !allowed.contains(p)) {
                let allowed_text = allowed.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
                let refusal = if self.config.sandbox.closed_backend_ports {
                    Some(format!(
                        "backend {address}: workers may not connect to port {port} (their landlock rules allow {allowed_text}, a closed list: sandbox.closed_backend_ports); add it to sandbox.backend_ports and restart, or set sandbox.connect_any_port"
                    ))
                } else if self.rejail.is_some() {
                    Some(format!(
                        "backend {address}: the workers are being re-jailed for another backend port; retry in a moment"
                    ))
                } else {
                    None
                };
                if let Some(message) = refusal {
                    self.audit.denied(&peer, &request, "backend_port", &message);
                    self.respond(key, &id, false, message, None);
                    return;
                }
                // The workers are replaced, one by one, with jails that allow the new ports;
                // the change is applied once all of them run (rejail.rs).
                self.begin_rejail(key, peer, request, content, missing);
                return;
            }
        }
        // Fail closed: the change is recorded before it is applied.
        let received_seq = match self.audit.received(&peer, &request, Some(&self.state_hash)) {
            Ok(seq) => seq,
            Err(e) => {
                self.log.error(&format!("audit log write failed: {e}; request refused"));
                self.respond(
                    key,
                    &id,
                    false,
                    format!("refused: the audit log cannot be written ({e}); nothing was changed"),
                    None,
                );
                return;
            }
        };
        let touches_listeners = matches!(
            request.kind,
            Some(Kind::AddListener(_) | Kind::RemoveListener(_) | Kind::Apply(_))
        );
        let before = self.state_hash.clone();
        let result = if touches_listeners {
            let mut next = self.state.clone();
            match next.apply(&request) {
                Ok(change) => match self.sync_listener_sockets(&next) {
                    Ok(()) => {
                        self.state = next;
                        Ok(change)
                    }
                    Err(e) => Err(("listener", e.to_string())),
                },
                Err(e) => Err(("invalid", e.to_string())),
            }
        } else {
            self.state.apply(&request).map_err(|e| ("invalid", e.to_string()))
        };
        let change = match result {
            Ok(change) => {
                // Hashed once per change, and kept for the audit records, status and dumps.
                self.state_hash = self.state.hash_hex();
                change
            }
            Err((code, message)) => {
                // A failed request changes nothing (batches are atomic).
                self.audit.completed(
                    &peer,
                    &request,
                    received_seq,
                    Completion {
                        outcome: Outcome::error(code, &message),
                        state_before: Some(before.clone()),
                        state_after: Some(before),
                        processes: None,
                    },
                );
                self.respond(key, &id, false, message, None);
                return;
            }
        };
        let message = change.to_string();
        let mut pending = Pending {
            client: key,
            serial: self.clients.get(key).map_or(0, |c| c.serial),
            peer: peer.clone(),
            request: proto::Request::default(),
            received_seq,
            state_before: before,
            state_after: self.state_hash.clone(),
            waiting: BTreeMap::new(),
            results: Vec::new(),
            deadline: Instant::now() + ack_timeout(&request),
            message,
            content,
        };
        if !change.is_effective() {
            pending.request = request;
            self.complete_change(pending, change.to_string());
            return;
        }
        // The keyring gets new keys before the order it acknowledges (and forgets old ones only
        // once every process has the change, so that handshakes under way can finish).
        self.forget_unused_keys();
        self.sync_keyring(false, self.next_sequence);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let workers = self.running_workers();
        for w in &workers {
            self.send_order(*w, sequence, request.clone());
        }
        self.handoff_new_listeners();
        if workers.is_empty() {
            let message = format!("{} (no worker running: they get it when they start)", pending.message);
            pending.request = request;
            self.complete_change(pending, message);
            return;
        }
        pending.waiting = workers
            .iter()
            .filter_map(|w| {
                let pid = self.workers.get(*w as usize)?.pid?;
                Some((*w, pid.as_raw()))
            })
            .collect();
        pending.request = request;
        self.pending.insert(sequence, pending);
    }

    /// Binds sockets for listeners `next` adds and closes those it removes. On a bind failure
    /// nothing changes.
    pub(super) fn sync_listener_sockets(&mut self, next: &State) -> Result<(), StartError> {
        let mut added = Vec::new();
        for address in next.listeners().keys() {
            if !self.listeners.contains_key(address) {
                let mut fds = Vec::new();
                // One socket per worker slot; the keyring serves no traffic and gets none (an
                // extra SO_REUSEPORT socket nobody accepts on would strand its share of clients).
                for _ in self.workers.iter().filter(|w| !w.keyring) {
                    fds.push(bind_listener(address)?);
                }
                if !self.config.share_listeners {
                    let ours = self.listeners.values().chain(added.iter().map(|(_, f)| f));
                    let own = resources::socket_inodes(ours.flatten().chain(&fds));
                    resources::ensure_sole_listener(address, &own, Duration::ZERO)?;
                }
                added.push((address.clone(), fds));
            }
        }
        self.listeners
            .retain(|address, _| next.listeners().contains_key(address));
        for (address, fds) in added {
            self.listeners.insert(address.clone(), fds);
            self.fresh_listeners.push(address);
        }
        Ok(())
    }

    pub(super) fn handoff_new_listeners(&mut self) {
        let fresh = std::mem::take(&mut self.fresh_listeners);
        let steer = !fresh.is_empty();
        for address in fresh {
            let protocol = self
                .state
                .listeners()
                .get(&address)
                .map(|l| l.protocol)
                .unwrap_or_default();
            let workers: Vec<u32> = self
                .running_workers()
                .into_iter()
                .filter(|id| self.workers.get(*id as usize).is_some_and(|w| !w.keyring))
                .collect();
            for id in workers {
                let Some(fd) = self
                    .listeners
                    .get(&address)
                    .and_then(|fds| fds.get(id as usize))
                    .map(AsRawFd::as_raw_fd)
                else {
                    continue;
                };
                let message = to_worker(to_worker::Kind::Listener(proto::ListenerHandoff {
                    address: address.clone(),
                    protocol,
                }));
                self.send(id, message, Some(fd));
            }
        }
        if steer {
            self.steer_listeners();
        }
    }
}
