//! Upgrade without losing a connection: the running supervisor hands itself over to the binary
//! now at its path on disk.
//!
//! The new supervisor is a **child** of the old one, not a re-execution in place, so that a
//! failure at any point before the new generation confirms leaves the old one serving, untouched:
//! its process image, its workers, its keyring and its state are still there. The cost is a
//! new pid, which the service manager learns with `MAINPID=` (the unit uses `NotifyAccess=all`).
//! The old workers must also stay children of their own supervisor (they die with it, through
//! PDEATHSIG), so the old supervisor lives on, quietly, until they have drained.
//!
//! Steps, each recorded:
//! 1. old: `upgrade_main` recorded `received`; the new binary's SHA-256 read; the new process
//!    started with a socketpair as fd 3 (`rampart start --handover-fd 3`), and sent the state,
//!    the listening sockets (the same descriptors: no accept queue closes), the command socket,
//!    the keys and the ticket key (`HandoverToNew`); the old one stops serving the command socket
//!    and closes the audit log (one writer per log), recording `upgrade_handover` first.
//! 2. new: opens the audit log (`upgrade_started`), narrows itself, spawns and verifies its
//!    workers and keyring. Only when every one passed does any of them get a listening socket;
//!    then it records `completed` for the upgrade request and sends `ready`.
//! 3. old: on `ready`, answers the client, stops accepting and drains: its workers finish their
//!    requests (keep-alive connections close after their next response) for at most
//!    `timeouts.shutdown_grace`; its keyring serves their handshakes until they are gone; then it
//!    exits. On `failed`, on the new process's exit, or after [`HANDOVER_TIMEOUT`], it kills the
//!    new process (its workers go with it: none was handed a socket), opens the audit log again,
//!    records the failure with its reason, and serves on as before.

use super::*;

/// The version of the handover messages this binary sends and understands.
pub(super) const HANDOVER_VERSION: u32 = 1;
/// How long the old supervisor waits for the new one to confirm.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Test hook: in a supervisor started by a handover, claim to speak this version instead.
const TEST_HANDOVER_VERSION: &str = "RAMPART_TEST_HANDOVER_VERSION";
/// Test hook: in a supervisor started by a handover, treat the first worker's jail as failing.
pub(super) const TEST_FAIL_JAIL: &str = "RAMPART_TEST_UPGRADE_FAILS_JAIL";

/// The old supervisor's side of an upgrade under way.
pub(super) struct OldSide {
    pid: Pid,
    channel: Channel,
    client: usize,
    serial: u64,
    peer: Peer,
    request: proto::Request,
    received_seq: u64,
    deadline: Instant,
    summary: String,
}

/// The new supervisor's side, until it confirms.
pub(super) struct NewSide {
    pub(super) channel: Channel,
    pub(super) begin: proto::HandoverBegin,
}

/// What a new supervisor received from the old one.
pub(super) struct Handover {
    pub(super) begin: proto::HandoverBegin,
    pub(super) requests: Vec<proto::Request>,
    /// By address, the sockets by slot.
    pub(super) listeners: BTreeMap<String, BTreeMap<u32, OwnedFd>>,
    pub(super) command: Option<OwnedFd>,
    pub(super) prometheus: Option<OwnedFd>,
    pub(super) keys: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the handover channel failed: {0}")]
    Channel(#[from] ChannelError),
    #[error("the old supervisor closed the handover before its end")]
    Closed,
    #[error("the old supervisor speaks handover version {got}; this binary speaks {speaks}")]
    Version { got: u32, speaks: u32 },
    #[error("handover message `{0}` out of order")]
    OutOfOrder(&'static str),
    #[error("the state in the handover does not build: {0}")]
    State(String),
    #[error("the handover has no command socket")]
    NoCommandSocket,
}

fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Receives a whole handover (new side, at start, blocking).
pub(super) fn receive(channel: &Channel) -> Result<Handover, HandoverError> {
    use proto::handover_to_new::Kind as H;
    let speaks = std::env::var(TEST_HANDOVER_VERSION)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HANDOVER_VERSION);
    let mut begin = None;
    let mut requests = Vec::new();
    let mut listeners: BTreeMap<String, BTreeMap<u32, OwnedFd>> = BTreeMap::new();
    let mut command = None;
    let mut prometheus = None;
    let mut keys = Vec::new();
    let mut assembler = rampart_command::channel::OrderAssembler::default();
    loop {
        let Some(received) = channel.recv::<proto::HandoverToNew>()? else {
            return Err(HandoverError::Closed);
        };
        let mut fds = received.fds.into_iter();
        match received.message.kind {
            Some(H::Begin(b)) => {
                if b.version != speaks {
                    // Everything the old one sends is read first: a peer that closes with
                    // messages unread makes the old one see a reset instead of the refusal.
                    while let Ok(Some(rest)) = channel.recv::<proto::HandoverToNew>() {
                        if matches!(rest.message.kind, Some(H::End(_))) {
                            break;
                        }
                    }
                    return Err(HandoverError::Version { got: b.version, speaks });
                }
                begin = Some(b);
            }
            Some(H::Order(piece)) => match assembler.push(piece) {
                Ok(Some(order)) => requests.extend(order.request),
                Ok(None) => {}
                Err(e) => return Err(HandoverError::State(e.to_string())),
            },
            Some(H::Listener(l)) => {
                if let Some(fd) = fds.next() {
                    listeners.entry(l.address).or_default().insert(l.slot, fd);
                }
            }
            Some(H::CommandSocket(_)) => command = fds.next(),
            Some(H::Prometheus(_)) => prometheus = fds.next(),
            Some(H::Key(k)) => keys.push((k.fingerprint, String::from_utf8_lossy(&k.key).into_owned())),
            Some(H::End(_)) => break,
            None => return Err(HandoverError::OutOfOrder("none")),
        }
    }
    let begin = begin.ok_or(HandoverError::OutOfOrder("end before begin"))?;
    if command.is_none() {
        return Err(HandoverError::NoCommandSocket);
    }
    Ok(Handover {
        begin,
        requests,
        listeners,
        command,
        prometheus,
        keys,
    })
}

/// Tells the old supervisor why this one gives up.
pub(super) fn refuse(channel: &Channel, reason: &str) {
    let message = proto::HandoverToOld {
        kind: Some(proto::handover_to_old::Kind::Failed(proto::HandoverFailed {
            reason: reason.to_string(),
        })),
    };
    let _ = channel.send(&message, &[]);
}

impl Supervisor {
    /// `upgrade_main`, old side: starts the new binary and hands everything over. `Err`: the
    /// upgrade did not start (nothing changed); the caller records and answers it.
    pub(super) fn begin_upgrade(
        &mut self,
        key: usize,
        peer: Peer,
        request: proto::Request,
        received_seq: u64,
    ) -> Result<(), String> {
        if self.upgrade.is_some() {
            return Err("an upgrade is already under way".into());
        }
        if self.stop_deadline.is_some() {
            return Err("the supervisor is stopping".into());
        }
        if !self.pending.is_empty() {
            return Err("changes are still waiting for the workers' acknowledgement; retry in a moment".into());
        }
        let path = self.binary_path.clone();
        let new_sha = sha256_file(&path).map_err(|e| {
            format!(
                "the new binary {} cannot be read ({e}); nothing was changed",
                path.display()
            )
        })?;
        let old_sha =
            sha256_file(Path::new(&format!("/proc/self/fd/{}", self.self_exe.as_raw_fd()))).unwrap_or_default();
        let (ours, theirs) = Channel::pair().map_err(|e| format!("cannot create the handover channel: {e}"))?;
        let child_fd = theirs.as_raw_fd();
        let mut command = std::process::Command::new(&path);
        command.arg0("rampart").arg("start");
        if !self.config.source.as_os_str().is_empty() {
            command.arg("-c").arg(&self.config.source);
        }
        if self.launch.jail.sandbox_off {
            command.arg("--sandbox-off");
        }
        command
            .args(["--handover-fd", &CHANNEL_FD.to_string()])
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec: dup2 and fcntl put the
        // handover channel at fd 3; sigprocmask gives the new supervisor an empty signal mask
        // (it blocks what it reads from its own signalfd).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(child_fd, CHANNEL_FD) == -1 || libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| {
            format!(
                "the new binary {} did not start ({e}); nothing was changed",
                path.display()
            )
        })?;
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        let summary = format!(
            "pid {} (version {}, binary sha256 {old_sha}) to pid {pid} ({}, sha256 {new_sha})",
            std::process::id(),
            crate::VERSION,
            path.display()
        );
        self.audit.system("upgrade_spawned", &format!("upgrade from {summary}"));
        self.notifier.reloading(&format!("upgrading to pid {pid}"));
        let begin = proto::HandoverBegin {
            version: HANDOVER_VERSION,
            received_seq,
            request_id: request.id.clone(),
            actor_uid: peer.uid,
            actor_gid: peer.gid,
            actor_pid: peer.pid,
            ticket_key: self.ticket_key.clone(),
            state_hash: self.state_hash.clone(),
            old_pid: std::process::id() as i32,
            old_version: crate::VERSION.to_string(),
            old_binary_sha256: old_sha,
            new_binary_sha256: new_sha,
            grace_seconds: match &request.kind {
                Some(Kind::UpgradeMain(u)) => u.grace_seconds,
                _ => 0,
            },
        };
        let sent = self.send_handover(&ours, begin);
        let upgrade = OldSide {
            pid,
            channel: ours,
            client: key,
            serial: self.clients.get(key).map_or(0, |c| c.serial),
            peer,
            request,
            received_seq,
            deadline: Instant::now() + HANDOVER_TIMEOUT,
            summary,
        };
        if let Err(e) = sent {
            self.upgrade = Some(upgrade);
            self.abandon_upgrade(&format!("the handover to the new binary failed: {e}"));
            return Ok(());
        }
        let _ = self
            .poll
            .registry()
            .register(&mut SourceFd(&upgrade.channel.as_raw_fd()), UPGRADE, Interest::READABLE);
        self.upgrade = Some(upgrade);
        Ok(())
    }

    /// Sends everything the new supervisor needs; the audit log is closed before the end, so
    /// that the new one can open it.
    fn send_handover(&mut self, channel: &Channel, begin: proto::HandoverBegin) -> Result<(), ChannelError> {
        use proto::handover_to_new::Kind as H;
        let message = |kind| proto::HandoverToNew { kind: Some(kind) };
        // Blocking: the new process reads all of it at its start.
        channel.set_nonblocking(false)?;
        channel.send(&message(H::Begin(begin)), &[])?;
        let mut requests = self.state.to_requests();
        for r in &mut requests {
            visit_certificates(r, &mut |c| zeroize::Zeroize::zeroize(&mut c.key));
        }
        for request in requests {
            for order in rampart_command::channel::order_messages(0, request) {
                channel.send(&message(H::Order(order)), &[])?;
            }
        }
        for (address, fds) in &self.listeners {
            for (slot, fd) in fds.iter().enumerate() {
                let l = proto::HandoverListener {
                    address: address.clone(),
                    slot: slot as u32,
                };
                channel.send(&message(H::Listener(l)), &[fd.as_fd()])?;
            }
        }
        channel.send(&message(H::CommandSocket(proto::Empty {})), &[self.command.as_fd()])?;
        if let Some(exporter) = &mut self.prometheus {
            channel.send(&message(H::Prometheus(proto::Empty {})), &[exporter.listener.as_fd()])?;
            // Scrapes wait in its queue for whichever supervisor serves next.
            let _ = self.poll.registry().deregister(&mut exporter.listener);
        }
        for (fingerprint, file) in &self.vault {
            // The message's copies of the key are wiped when freed, like every block here.
            let Ok(key) = file.with_key(<[u8]>::to_vec) else {
                continue;
            };
            let material = proto::KeyMaterial {
                fingerprint: fingerprint.clone(),
                key,
                sequence: 0,
            };
            channel.send(&message(H::Key(material)), &[])?;
        }
        // From here until the new one confirms or fails, nothing is recorded here.
        self.audit.system(
            "upgrade_handover",
            "state, sockets and keys sent; the audit log passes to the new supervisor",
        );
        self.audit.suspend();
        // Requests wait in the command socket's queue for whichever supervisor serves next.
        let _ = self.poll.registry().deregister(&mut self.command);
        channel.send(&message(H::End(proto::Empty {})), &[])?;
        channel.set_nonblocking(true)?;
        Ok(())
    }

    /// The new supervisor's answer.
    pub(super) fn upgrade_message(&mut self) {
        use proto::handover_to_old::Kind as H;
        let Some(upgrade) = &self.upgrade else { return };
        let received = match upgrade.channel.recv::<proto::HandoverToOld>() {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.abandon_upgrade(
                    "the handover to the new binary failed: the new supervisor closed the handover without confirming",
                );
                return;
            }
            Err(ChannelError::Receive(nix::Error::EAGAIN)) => return,
            Err(e) => {
                self.abandon_upgrade(&format!(
                    "the handover to the new binary failed: the new supervisor sent an unreadable answer: {e}"
                ));
                return;
            }
        };
        match received.message.kind {
            Some(H::Ready(ready)) => self.upgrade_done(&ready),
            Some(H::Failed(failed)) => self.abandon_upgrade(&failed.reason),
            None => self.abandon_upgrade("the new supervisor sent an answer without a kind"),
        }
    }

    /// Deadline and exit of the new process (called from the tick and from `reap`).
    pub(super) fn watch_upgrade(&mut self, exited: Option<(Pid, String)>) {
        let Some(upgrade) = &self.upgrade else { return };
        if let Some((pid, how)) = exited
            && pid == upgrade.pid
        {
            self.abandon_upgrade(&format!(
                "the handover to the new binary failed: the new supervisor {how} before it confirmed"
            ));
            return;
        }
        if Instant::now() >= upgrade.deadline {
            self.abandon_upgrade(&format!(
                "the new supervisor did not confirm within {} s",
                HANDOVER_TIMEOUT.as_secs()
            ));
        }
    }

    /// The new generation serves: answer, then drain and exit.
    fn upgrade_done(&mut self, ready: &proto::HandoverReady) {
        let Some(upgrade) = self.upgrade.take() else { return };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&upgrade.channel.as_raw_fd()));
        let grace_seconds = match &upgrade.request.kind {
            Some(Kind::UpgradeMain(u)) => u.grace_seconds,
            _ => 0,
        };
        let grace = self.upgrade_grace(grace_seconds);
        let message = format!(
            "upgraded from {}; pid {} (version {}) serves, this generation drains (tunnels for at most {} s)",
            upgrade.summary,
            ready.pid,
            ready.version,
            grace.as_secs()
        );
        self.log.info(&message);
        if self.client_serial(upgrade.client) == Some(upgrade.serial) {
            self.respond(upgrade.client, &upgrade.request.id, true, message, None);
        }
        // Every other client reconnects to the new supervisor, which holds the command socket.
        let others: Vec<usize> = self
            .clients
            .iter()
            .map(|(k, _)| k)
            .filter(|k| *k != upgrade.client)
            .collect();
        for key in others {
            self.close_client(key);
        }
        if let Some(c) = self.clients.get_mut(upgrade.client) {
            c.closing = true;
        }
        self.flush_client(upgrade.client);
        // The command socket file belongs to the new supervisor now.
        self.command_path = PathBuf::new();
        self.handed_over = true;
        self.begin_stop(Some(grace));
    }

    /// The upgrade did not happen: the new process goes, this one serves on as before.
    pub(super) fn abandon_upgrade(&mut self, reason: &str) {
        let Some(upgrade) = self.upgrade.take() else { return };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&upgrade.channel.as_raw_fd()));
        let _ = nix::sys::signal::kill(upgrade.pid, Signal::SIGKILL);
        let _ = waitpid(upgrade.pid, None);
        let message = format!(
            "upgrade to {} failed: {reason}; this generation serves on",
            self.binary_path.display()
        );
        self.log.error(&message);
        if let Err(e) = self.audit.resume(&self.config) {
            self.log.error(&format!(
                "the audit log cannot be opened again after the failed upgrade: {e}"
            ));
        }
        self.audit.completed(
            &upgrade.peer,
            &upgrade.request,
            upgrade.received_seq,
            Completion::outcome(Outcome::error("upgrade_failed", &message)),
        );
        let _ = self
            .poll
            .registry()
            .register(&mut self.command, COMMAND, Interest::READABLE);
        if let Some(exporter) = &mut self.prometheus {
            let _ = self
                .poll
                .registry()
                .register(&mut exporter.listener, prometheus::PROMETHEUS, Interest::READABLE);
        }
        // Connections that arrived meanwhile wait in the queue.
        self.accept_clients();
        if self.client_serial(upgrade.client) == Some(upgrade.serial) {
            self.respond(upgrade.client, &upgrade.request.id, false, message, None);
        }
        self.notifier.send("READY=1\nSTATUS=upgrade failed; serving");
    }

    /// `upgrade --worker N`: a new worker takes slot N (the same listening sockets, the state),
    /// the old one stops accepting and drains.
    pub(super) fn upgrade_worker(&mut self, id: u32, grace_seconds: u32) -> Result<String, String> {
        let Some(slot) = self.workers.get(id as usize) else {
            return Err(format!(
                "there is no worker {id}: slots are 0 to {}",
                self.workers.len().saturating_sub(1)
            ));
        };
        if slot.keyring {
            return Err(format!(
                "slot {id} is the keyring: `rampart upgrade` replaces it with the supervisor, without a handshake failing"
            ));
        }
        let Some(pid) = slot.pid.filter(|_| slot.run_state == RunState::Running) else {
            return Err(format!("worker {id} is not running ({})", slot.run_state.name()));
        };
        let grace = self.upgrade_grace(grace_seconds);
        self.replace_process(id, "replaced on request (rampart upgrade --worker)", grace);
        Ok(format!(
            "worker {id} (pid {pid}) replaced: a new worker takes its slot and its sockets, the old one drains (tunnels for at most {} s)",
            grace.as_secs()
        ))
    }

    /// New side: every worker and the keyring passed their jail check. Records the upgrade,
    /// tells the old supervisor, and only then hands out the listening sockets.
    pub(super) fn confirm_handover(&mut self) {
        let Some(side) = self.handover.take() else { return };
        let begin = &side.begin;
        let peer = crate::audit::peer(begin.actor_uid, begin.actor_gid, begin.actor_pid);
        let request = proto::Request {
            id: begin.request_id.clone(),
            kind: Some(Kind::UpgradeMain(proto::UpgradeMain {
                grace_seconds: begin.grace_seconds,
            })),
        };
        let message = format!(
            "upgraded from pid {} (version {}, sha256 {}) to pid {} (version {}, sha256 {}); every worker verified",
            begin.old_pid,
            begin.old_version,
            begin.old_binary_sha256,
            std::process::id(),
            crate::VERSION,
            begin.new_binary_sha256
        );
        self.audit.completed(
            &peer,
            &request,
            begin.received_seq,
            Completion::outcome(Outcome::ok(&message)),
        );
        self.log.info(&message);
        // systemd hears of the new main pid before the old supervisor does: its STOPPING=1
        // must not come first.
        self.notifier.send(&format!(
            "MAINPID={}\nREADY=1\nSTATUS=serving (upgraded)",
            std::process::id()
        ));
        let ready = proto::HandoverToOld {
            kind: Some(proto::handover_to_old::Kind::Ready(proto::HandoverReady {
                pid: std::process::id() as i32,
                version: crate::VERSION.to_string(),
            })),
        };
        let _ = side.channel.send(&ready, &[]);
        for id in self.running_workers() {
            self.handoff_listeners(id);
        }
        self.steer_listeners();
        // Requests that waited in the command socket's queue are served from now on.
        let _ = self
            .poll
            .registry()
            .register(&mut self.command, COMMAND, Interest::READABLE);
        self.accept_clients();
    }

    /// New side: a process failed its jail check during the handover. Everything this
    /// supervisor started goes, the audit log is closed, the old one is told why.
    pub(super) fn fail_handover(&mut self, reason: &str) {
        let Some(side) = self.handover.take() else { return };
        let message = format!("upgrade abandoned by the new supervisor: {reason}");
        self.log.error(&message);
        self.audit.system("upgrade_abandoned", &message);
        for w in &self.workers {
            if let Some(pid) = w.pid {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
        }
        self.audit.suspend();
        refuse(&side.channel, &message);
        // The command socket and its file are the old supervisor's again.
        self.command_path = PathBuf::new();
        self.exit_code = Some(1);
    }
}
