//! The channel from the supervisor (orders, listening sockets, the keyring link, ticket keys)
//! and the link to the keyring (signature requests out, replies back to the waiting session).

use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::Interest;
use mio::unix::SourceFd;
use rampart_command::channel::{Channel, ChannelError};
use rampart_command::proto::{
    self, KeyringToWorker, SupervisorToWorker, WorkerToKeyring, WorkerToSupervisor, keyring_to_worker,
    request::Kind as RequestKind, supervisor_to_worker as from_supervisor, worker_to_keyring,
    worker_to_supervisor as to_supervisor,
};
use rampart_command::state::is_state_change;

use crate::event_loop::{KEYRING, Worker};
use crate::{LOG_ERROR, LOG_WARN};

impl Worker {
    /// Handles every message waiting on the channel. Returns an exit code when the worker must end.
    pub(crate) fn drain_channel(&mut self) -> Option<i32> {
        loop {
            let received = match self.channel.recv::<SupervisorToWorker>() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // The supervisor is gone: so are we (PDEATHSIG would follow anyway).
                    return Some(0);
                }
                Err(ChannelError::Receive(nix_errno)) if nix_errno as i32 == libc::EAGAIN => {
                    // Once per batch of orders: the next request does not wait for a rebuild,
                    // and a certificate that cannot be used is logged now, traffic or not.
                    self.settle();
                    return None;
                }
                Err(e) => {
                    self.log(LOG_ERROR, format!("bad message from the supervisor: {e}"));
                    return None;
                }
            };
            match received.message.kind {
                Some(from_supervisor::Kind::Listener(handoff)) => {
                    let Some(fd) = received.fds.into_iter().next() else {
                        continue;
                    };
                    self.adopt_listener(handoff.address, fd);
                }
                Some(from_supervisor::Kind::KeyringLink(_)) => {
                    let Some(fd) = received.fds.into_iter().next() else {
                        continue;
                    };
                    self.keyring_lost(Instant::now(), "a new keyring replaced the old one");
                    let link = Channel::from(fd);
                    let raw = link.as_raw_fd();
                    if self
                        .poll
                        .registry()
                        .register(&mut SourceFd(&raw), KEYRING, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.keyring = Some(link);
                    }
                }
                Some(from_supervisor::Kind::TicketKeys(keys)) => {
                    self.ticket_key = Some(keys.key);
                    self.tls_stale = true;
                }
                Some(from_supervisor::Kind::Order(piece)) => match self.assembler.push(piece) {
                    Ok(Some(order)) => {
                        if let Some(code) = self.order(order) {
                            return Some(code);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => self.log(LOG_ERROR, format!("bad order from the supervisor: {e}")),
                },
                None => self.log(LOG_WARN, "a message without a kind from the supervisor".into()),
            }
        }
    }

    /// Sends the signature requests the handshakes queued; without a keyring they fail at once.
    pub(crate) fn flush_keyring(&mut self, now: Instant) {
        if let Ok(mut c) = self.keyring_client.lock() {
            let queued = std::mem::take(&mut c.outbox);
            self.keyring_queue.extend(queued);
        }
        if self.keyring_queue.is_empty() {
            return;
        }
        let Some(link) = &self.keyring else {
            self.keyring_lost(now, "the keyring is not reachable");
            return;
        };
        // The link holds a handful of datagrams: what does not fit waits for it to drain.
        while let Some(r) = self.keyring_queue.front() {
            let message = WorkerToKeyring {
                kind: Some(worker_to_keyring::Kind::SignRequest(r.clone())),
            };
            match link.send(&message, &[]) {
                Ok(()) => {
                    self.keyring_queue.pop_front();
                }
                Err(ChannelError::Send(e)) if e as i32 == libc::EAGAIN => return,
                Err(_) => {
                    self.keyring_lost(now, "the keyring is not reachable");
                    return;
                }
            }
        }
    }

    pub(crate) fn keyring_lost(&mut self, now: Instant, why: &str) {
        if let Some(link) = self.keyring.take() {
            let raw = link.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        self.keyring_queue.clear();
        let sessions = match self.keyring_client.lock() {
            Ok(mut c) => c.fail_all(why),
            Err(_) => Vec::new(),
        };
        for key in sessions {
            self.session_event(key, None, now);
        }
    }

    pub(crate) fn drain_keyring(&mut self, now: Instant) {
        loop {
            let Some(link) = &self.keyring else { return };
            let received = match link.recv::<KeyringToWorker>() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.keyring_lost(now, "the keyring closed its link");
                    return;
                }
                Err(ChannelError::Receive(e)) if e as i32 == libc::EAGAIN => return,
                Err(_) => continue,
            };
            if let Some(keyring_to_worker::Kind::SignReply(reply)) = received.message.kind {
                let session = self.keyring_client.lock().ok().and_then(|mut c| c.reply(reply));
                if let Some(key) = session {
                    self.session_event(key, None, now);
                }
            }
        }
    }

    pub(crate) fn reply(&self, sequence: u64, ok: bool, message: String) {
        // Orders of the initial state (sequence 0) are answered only when they fail: a large
        // state would otherwise flood the channel with acknowledgements nobody waits for.
        if sequence == 0 && ok {
            return;
        }
        let reply = proto::WorkerReply {
            sequence,
            status: if ok {
                proto::ResponseStatus::Ok
            } else {
                proto::ResponseStatus::Failure
            } as i32,
            message,
            response: None,
        };
        let _ = self.channel.send(
            &WorkerToSupervisor {
                kind: Some(to_supervisor::Kind::Reply(reply)),
            },
            &[],
        );
    }

    pub(crate) fn order(&mut self, order: proto::WorkerOrder) -> Option<i32> {
        let Some(request) = order.request else {
            self.reply(order.sequence, false, "order without a request".into());
            return None;
        };
        if let (Some(refused), Some(RequestKind::AddCluster(c))) = (&self.refuse_cluster, &request.kind)
            && order.sequence != 0
            && c.cluster_id == *refused
        {
            self.reply(order.sequence, false, format!("test hook: cluster `{refused}` refused"));
            return None;
        }
        if is_state_change(&request) {
            match self.state.apply(&request) {
                Ok(change) => {
                    self.stale.note(&request);
                    if matches!(
                        request.kind,
                        Some(
                            RequestKind::AddCertificate(_)
                                | RequestKind::ReplaceCertificate(_)
                                | RequestKind::RemoveCertificate(_)
                                | RequestKind::AddListener(_)
                                | RequestKind::UpdateListener(_)
                                | RequestKind::Apply(_)
                        )
                    ) {
                        self.tls_stale = true;
                    }
                    self.close_unknown_listeners();
                    self.reply(order.sequence, true, change.to_string());
                }
                Err(e) => self.reply(order.sequence, false, e.to_string()),
            }
            return None;
        }
        match request.kind {
            Some(RequestKind::SoftStop(stop)) => {
                let open = self.sessions.len();
                let grace = if stop.grace_seconds > 0 {
                    std::time::Duration::from_secs(u64::from(stop.grace_seconds))
                } else {
                    self.shutdown_grace
                };
                self.begin_drain(grace, Instant::now());
                self.reply(
                    order.sequence,
                    true,
                    format!("draining {open} connection(s) for at most {} s", grace.as_secs()),
                );
                None
            }
            Some(RequestKind::HardStop(_)) => {
                self.reply(order.sequence, true, "stopping now".into());
                self.send_metrics(true);
                Some(0)
            }
            Some(RequestKind::Status(_)) => {
                self.reply(
                    order.sequence,
                    true,
                    format!(
                        "{} connection(s), {} buffer(s) in use, {} idle backend connection(s); {}",
                        self.sessions.len(),
                        self.pool.outstanding(),
                        self.idle.len(),
                        self.records.summary()
                    ),
                );
                None
            }
            _ => {
                self.reply(
                    order.sequence,
                    false,
                    format!(
                        "workers do not handle `{}`",
                        rampart_command::request_kind_name(&request)
                    ),
                );
                None
            }
        }
    }
}
