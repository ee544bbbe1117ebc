//! Worker and keyring processes: spawn, respawn, channel traffic, jail verification.

use super::*;

/// Test hook: when the supervisor's environment names a cluster id here, worker 0 refuses a
/// live order that adds that cluster (never when it is part of a new worker's initial state),
/// so that the end-to-end tests can show what a refusal does. Nothing else reads it.
const TEST_REFUSE_CLUSTER: &str = "RAMPART_TEST_WORKER_REFUSES_CLUSTER";

pub(super) fn signal_name(signal: Signal) -> String {
    match signal {
        Signal::SIGSYS => "SIGSYS (sandbox violation: a forbidden system call)".into(),
        Signal::SIGABRT => "SIGABRT (panic or abort)".into(),
        Signal::SIGKILL => "SIGKILL".into(),
        Signal::SIGSEGV => "SIGSEGV (memory fault)".into(),
        other => format!("{other:?}"),
    }
}

impl Supervisor {
    pub(super) fn spawn(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(id as usize) else {
            return;
        };
        let mut launch = self.launch.clone();
        launch.id = id;
        launch.key_isolation = self.config.key_isolation;
        // Test hook (see `TEST_REFUSE_CLUSTER`): worker 0 refuses one live change.
        if id == 0 && !slot.keyring {
            launch.refuse_cluster = std::env::var(TEST_REFUSE_CLUSTER).ok();
        }
        let Ok(launch_json) = serde_json::to_string(&launch) else {
            return;
        };
        let (ours, theirs) = match Channel::pair() {
            Ok(p) => p,
            Err(e) => {
                self.log.error(&format!("worker {id}: cannot create its channel: {e}"));
                return;
            }
        };
        let (err_read, err_write) =
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
                Ok(p) => p,
                Err(e) => {
                    self.log
                        .error(&format!("worker {id}: cannot create its stderr pipe: {e}"));
                    return;
                }
            };
        let child_fd = theirs.as_raw_fd();
        let exe = format!("/proc/self/fd/{}", self.self_exe.as_raw_fd());
        let mut command = std::process::Command::new(exe);
        command
            .arg0("rampart-worker")
            .args([
                if slot.keyring { "keyring" } else { "worker" },
                "--channel-fd",
                &CHANNEL_FD.to_string(),
                "--launch",
                &launch_json,
            ])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err_write));
        // SAFETY: only async-signal-safe calls between fork and exec: dup2, fcntl and
        // sigprocmask put the channel at fd 3 and give the worker an empty signal mask.
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
        let child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.log.error(&format!("worker {id}: spawn failed: {e}"));
                slot.respawn_at = Some(Instant::now() + slot.backoff);
                return;
            }
        };
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        let _ = ours.set_nonblocking(true);
        let token = Token(WORKER_BASE + id as usize * 2);
        let _ = self.poll.registry().register(
            &mut SourceFd(&ours.as_raw_fd()),
            token,
            Interest::READABLE | Interest::WRITABLE,
        );
        let err_file = std::fs::File::from(err_read);
        let _ = self.poll.registry().register(
            &mut SourceFd(&err_file.as_raw_fd()),
            Token(WORKER_BASE + id as usize * 2 + 1),
            Interest::READABLE,
        );
        slot.pid = Some(pid);
        slot.channel = Some(ours);
        slot.stderr = Some(err_file);
        slot.stderr_buf.clear();
        slot.outbox.clear();
        slot.run_state = RunState::Starting;
        slot.jail = None;
        slot.started = Instant::now();
        slot.respawn_at = None;
        self.log.info(&format!("worker {id} spawned (pid {pid})"));
        self.audit.system("worker_spawn", &format!("worker {id} pid {pid}"));
    }

    pub(super) fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.watch_upgrade(Some((pid, format!("exited with code {code}"))));
                    self.worker_ended(pid, format!("exited with code {code}"), code == 0)
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    self.watch_upgrade(Some((pid, format!("was killed by signal {}", signal_name(signal)))));
                    self.worker_ended(pid, format!("killed by signal {}", signal_name(signal)), false)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    pub(super) fn worker_ended(&mut self, pid: Pid, how: String, clean: bool) {
        if let Some(index) = self.retiring.iter().position(|r| r.pid == pid) {
            let r = self.retiring.swap_remove(index);
            // Its last words wait in the channel: log lines (the drain's end) are passed on.
            last_words(&r.channel, pid, &mut self.metrics, Some(&mut self.log));
            let message = format!("replaced worker {} (pid {pid}) {how}", r.id);
            self.log.info(&message);
            self.audit.system("worker_retired", &message);
            return;
        }
        let stopping = self.stop_deadline.is_some();
        let Some(slot) = self.workers.iter_mut().find(|w| w.pid == Some(pid)) else {
            return;
        };
        let id = slot.id;
        if let Some(channel) = slot.channel.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&channel.as_raw_fd()));
            // Its last report may still wait in the channel.
            last_words(&channel, pid, &mut self.metrics, None);
        } else {
            self.metrics.ended(pid.as_raw());
        }
        if let Some(err) = slot.stderr.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&err.as_raw_fd()));
        }
        slot.pid = None;
        slot.run_state = RunState::Dead;
        slot.outbox.clear();
        if !stopping {
            // The first deaths are respawned at once; a worker that keeps dying young is backed
            // off. One that lived a while starts the count again.
            if slot.started.elapsed() > Duration::from_secs(10) {
                slot.backoff = Duration::ZERO;
                slot.quick_deaths = 0;
            }
            slot.quick_deaths = slot.quick_deaths.saturating_add(1);
            if slot.quick_deaths > QUICK_RESPAWNS {
                slot.backoff = (slot.backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
            }
            slot.respawn_at = Some(Instant::now() + slot.backoff);
        }
        self.steer_listeners();
        let message = format!("worker {id} (pid {pid}) {how}");
        if clean || stopping {
            self.log.info(&message);
        } else {
            self.log.error(&format!("{message}; respawning"));
        }
        self.audit
            .system(if clean { "worker_exit" } else { "worker_crash" }, &message);
        // Changes waiting for this worker stop waiting for it.
        self.pending_process_ended(id, &how);
    }

    /// Replaces the process in slot `id`, which no longer serves the supervisor's state: a new
    /// worker takes the slot at once (the same listening sockets, the state from the
    /// supervisor), the old one is told to stop accepting and drain. The keyring has no
    /// connections to drain: it is killed and respawned.
    pub(super) fn replace_process(&mut self, id: u32, why: &str, grace: Duration) {
        let Some(slot) = self.workers.get_mut(id as usize) else {
            return;
        };
        let Some(pid) = slot.pid else { return };
        if slot.keyring {
            self.log
                .warn(&format!("keyring (pid {pid}) {why}: killing it, a new one is spawned"));
            self.audit
                .system("process_replaced", &format!("keyring pid {pid}: {why}"));
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            return;
        }
        let (Some(channel), stderr) = (slot.channel.take(), slot.stderr.take()) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut SourceFd(&channel.as_raw_fd()));
        if let Some(err) = &stderr {
            let _ = self.poll.registry().deregister(&mut SourceFd(&err.as_raw_fd()));
        }
        slot.pid = None;
        slot.run_state = RunState::Dead;
        slot.outbox.clear();
        slot.respawn_at = None;
        let stop = SupervisorToWorker {
            kind: Some(to_worker::Kind::Order(proto::WorkerOrder {
                sequence: 0,
                request: Some(proto::Request {
                    id: String::new(),
                    kind: Some(Kind::SoftStop(proto::SoftStop {
                        grace_seconds: u32::try_from(grace.as_secs()).unwrap_or(u32::MAX),
                    })),
                }),
                chunk: Vec::new(),
                more: false,
            })),
        };
        let deadline = match channel.send(&stop, &[]) {
            Ok(()) => Instant::now() + grace + Duration::from_secs(1),
            // Its channel is full: it is too far behind to drain in any useful time.
            Err(_) => Instant::now(),
        };
        self.retiring.push(Retiring {
            id,
            pid,
            channel,
            _stderr: stderr,
            deadline,
        });
        let message = format!(
            "worker {id} (pid {pid}) {why}: replaced; it drains its connections for at most {} s",
            grace.as_secs()
        );
        self.log.warn(&message);
        self.audit.system("process_replaced", &message);
        self.steer_listeners();
        // Other changes waiting for it will not hear from it: the new worker starts from the
        // state, which holds them.
        self.pending_process_ended(id, "replaced before it answered");
        self.spawn(id);
    }

    pub(super) fn worker_stderr(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(id as usize) else {
            return;
        };
        let Some(err) = &mut slot.stderr else { return };
        let mut buf = [0u8; 4096];
        loop {
            match err.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => slot.stderr_buf.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(_) => break,
            }
        }
        while let Some(nl) = slot.stderr_buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = slot.stderr_buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            self.log.error(&format!("worker {id} stderr: {text}"));
        }
        if slot.stderr_buf.len() > 64 * 1024 {
            slot.stderr_buf.clear();
        }
    }

    pub(super) fn send(&mut self, id: u32, message: Outgoing, fd: Option<RawFd>) {
        if let Some(slot) = self.workers.get_mut(id as usize) {
            slot.outbox.push_back((message, fd, None));
        }
        self.flush_worker(id);
    }

    /// Sends a descriptor the message owns (closed once sent).
    pub(super) fn send_owned(&mut self, id: u32, message: Outgoing, fd: OwnedFd) {
        if let Some(slot) = self.workers.get_mut(id as usize) {
            let raw = fd.as_raw_fd();
            slot.outbox.push_back((message, Some(raw), Some(fd)));
        }
        self.flush_worker(id);
    }

    /// Sends a request as order `sequence`, in as many channel messages as its size needs.
    pub(super) fn send_order(&mut self, id: u32, sequence: u64, request: proto::Request) {
        let keyring = self.workers.get(id as usize).is_some_and(|w| w.keyring);
        for order in rampart_command::channel::order_messages(sequence, request) {
            let message = if keyring {
                to_keyring(to_keyring::Kind::Order(order))
            } else {
                to_worker(to_worker::Kind::Order(order))
            };
            self.send(id, message, None);
        }
    }

    pub(super) fn flush_worker(&mut self, id: u32) {
        let Some(slot) = self.workers.get_mut(id as usize) else {
            return;
        };
        let Some(channel) = &slot.channel else { return };
        while let Some((message, fd, _)) = slot.outbox.front() {
            // SAFETY: the descriptor is one of ours (a listener kept in `self.listeners`, alive
            // for as long as the listener exists); it is only borrowed for this send.
            let borrowed: Vec<_> = fd
                .iter()
                .map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) })
                .collect();
            let sent = match message {
                Outgoing::Worker(m) => channel.send(m, &borrowed),
                Outgoing::Keyring(m) => channel.send(m, &borrowed),
            };
            match sent {
                Ok(()) => {
                    slot.outbox.pop_front();
                }
                Err(ChannelError::Send(nix::Error::EAGAIN)) => return,
                Err(e) => {
                    let text = format!("worker {id}: channel send failed: {e}");
                    slot.outbox.pop_front();
                    self.log.error(&text);
                    return;
                }
            }
        }
    }

    pub(super) fn worker_messages(&mut self, id: u32) {
        loop {
            let Some(slot) = self.workers.get(id as usize) else {
                return;
            };
            let Some(channel) = &slot.channel else { return };
            let received = match channel.recv::<WorkerToSupervisor>() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(ChannelError::Receive(nix::Error::EAGAIN)) => return,
                Err(e) => {
                    // Untrusted bytes: refuse and go on (descriptors were already closed).
                    self.log.warn(&format!("worker {id}: refused a message: {e}"));
                    continue;
                }
            };
            match received.message.kind {
                Some(worker_to_supervisor::Kind::JailReport(report)) => self.worker_jailed(id, report),
                Some(worker_to_supervisor::Kind::Reply(reply)) => self.worker_reply(id, reply),
                Some(worker_to_supervisor::Kind::Metrics(report)) => {
                    if let Some(pid) = slot.pid {
                        self.metrics.update(pid.as_raw(), report);
                    }
                }
                Some(worker_to_supervisor::Kind::Log(line)) => {
                    write_worker_log(&mut self.log, &line, &format!("{}: {}", line.target, line.message));
                }
                None => self.log.warn(&format!("worker {id}: a message without a kind")),
            }
        }
    }

    pub(super) fn worker_jailed(&mut self, id: u32, report: proto::JailReport) {
        let Some(slot) = self.workers.get(id as usize) else {
            return;
        };
        if slot.run_state != RunState::Starting {
            self.log.warn(&format!("worker {id}: a second jail report was ignored"));
            return;
        }
        let Some(pid) = slot.pid else { return };
        if !self.launch.jail.sandbox_off {
            // Trust, but verify from outside.
            let expect = rampart_sandbox::inspect::Expectation {
                uid: self.worker_uid,
                gid: None,
                max_fds: None,
                allow_bounding: !nix::unistd::Uid::effective().is_root(),
                skip_private: !nix::unistd::Uid::effective().is_root(),
            };
            let mut verdict = rampart_sandbox::inspect::verify_jailed(pid.as_raw(), &expect).map(|_| ());
            // Test hook (upgrade.rs): a supervisor started by a handover fails its first worker.
            if self.handover.is_some() && id == 0 && std::env::var_os(upgrade::TEST_FAIL_JAIL).is_some() {
                verdict = Err(vec![rampart_sandbox::inspect::Violation::Unreadable {
                    what: "the jail (test hook)".into(),
                    error: format!("{} is set", upgrade::TEST_FAIL_JAIL),
                }]);
            }
            if let Err(violations) = verdict {
                let text: Vec<String> = violations.iter().map(ToString::to_string).collect();
                let message = format!(
                    "worker {id} (pid {pid}) is not jailed as required: {}; killing it",
                    text.join("; ")
                );
                self.log.error(&message);
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                // During an upgrade, the new generation gives up: the old one serves on.
                self.fail_handover(&message);
                return;
            }
        }
        self.log.info(&format!(
            "worker {id} (pid {pid}) jailed: uid {} landlock {} (ABI {}) seccomp {} ({} rules)",
            report.uid, report.landlock_status, report.landlock_abi, report.seccomp_mode, report.seccomp_rules
        ));
        let is_keyring = self.workers.get(id as usize).is_some_and(|w| w.keyring);
        if let Some(slot) = self.workers.get_mut(id as usize) {
            slot.jail = Some(report);
            slot.run_state = RunState::Running;
        }
        if is_keyring {
            // The keys, then a link to every running worker.
            self.keyring_keys.clear();
            self.sync_keyring(false, 0);
            let workers: Vec<u32> = self.running_workers().into_iter().filter(|w| *w != id).collect();
            for w in workers {
                self.link_keyring(w);
            }
            self.all_verified();
            return;
        }
        // The ticket key, the state as the same requests the supervisor applied, the listeners.
        let keys = to_worker(to_worker::Kind::TicketKeys(proto::TicketKeys {
            key: self.ticket_key.clone(),
        }));
        self.send(id, keys, None);
        for request in self.state.to_requests() {
            self.send_order(id, 0, request);
        }
        self.link_keyring(id);
        // During an upgrade, no new worker gets a socket before every one is verified.
        if self.handover.is_none() {
            self.handoff_listeners(id);
            // It accepts from now on: new connections may go to its socket again.
            self.steer_listeners();
        }
        self.all_verified();
    }

    /// Once every slot runs: the service manager learns it (the first time), and an upgrade
    /// under way is confirmed.
    fn all_verified(&mut self) {
        self.rejail_next();
        if !self.workers.iter().all(|w| w.run_state == RunState::Running) {
            return;
        }
        if self.handover.is_some() {
            self.confirm_handover();
        } else if !self.ready_notified {
            self.notifier.send(&format!(
                "READY=1\nSTATUS={} worker(s) verified; serving",
                self.workers.iter().filter(|w| !w.keyring).count()
            ));
        }
        self.ready_notified = true;
    }

    /// Hands worker `id` one listening socket per listener.
    pub(super) fn handoff_listeners(&mut self, id: u32) {
        if self.workers.get(id as usize).is_none_or(|w| w.keyring) {
            return;
        }
        let handoffs: Vec<(String, i32, RawFd)> = self
            .listeners
            .iter()
            .filter_map(|(address, fds)| {
                let protocol = self
                    .state
                    .listeners()
                    .get(address)
                    .map(|l| l.protocol)
                    .unwrap_or_default();
                fds.get(id as usize)
                    .map(|fd| (address.clone(), protocol, fd.as_raw_fd()))
            })
            .collect();
        for (address, protocol, fd) in handoffs {
            let message = to_worker(to_worker::Kind::Listener(proto::ListenerHandoff { address, protocol }));
            self.send(id, message, Some(fd));
        }
    }

    pub(super) fn running_workers(&self) -> Vec<u32> {
        self.workers
            .iter()
            .filter(|w| w.run_state == RunState::Running)
            .map(|w| w.id)
            .collect()
    }
}

/// A worker's log line, at its level.
fn write_worker_log(log: &mut crate::log::Log, line: &proto::LogLine, text: &str) {
    match line.level {
        rampart_worker::LOG_ERROR => log.error(text),
        rampart_worker::LOG_WARN => log.warn(text),
        _ => log.info(text),
    }
}

/// What a worker that ended left in its channel: its last metric report, and, when `log` is
/// given (a retired worker), the log lines that say how its drain ended. Its figures then join
/// those of the ended processes.
fn last_words(
    channel: &Channel,
    pid: Pid,
    metrics: &mut super::metrics::MetricsStore,
    mut log: Option<&mut crate::log::Log>,
) {
    while let Ok(Some(received)) = channel.recv::<WorkerToSupervisor>() {
        match received.message.kind {
            Some(worker_to_supervisor::Kind::Metrics(report)) => metrics.update(pid.as_raw(), report),
            Some(worker_to_supervisor::Kind::Log(line)) => {
                if let Some(log) = log.as_deref_mut() {
                    let text = format!("replaced {} (pid {pid}): {}", line.target, line.message);
                    write_worker_log(log, &line, &text);
                }
            }
            _ => {}
        }
    }
    metrics.ended(pid.as_raw());
}
