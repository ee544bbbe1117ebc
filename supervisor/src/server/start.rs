//! Start-up, as a straight sequence of named steps, each with its own error:
//!
//! 1. [`check_options`]: what the command line asks against what the configuration requires;
//! 2. [`initial_state`]: the saved state if there is one, else the configuration's;
//! 3. [`keep_keys`]: every private key checked and moved into a memory file;
//! 4. [`Resources::open`]: the state directory, signals, the event loop, the command socket, the
//!    listening sockets (one instance per address), the audit log and the binary;
//! 5. [`worker_launch`]: what every worker is started with;
//! 6. the supervisor assembled and its start recorded;
//! 7. [`Supervisor::narrow`]: the capabilities and paths it keeps;
//! 8. every worker and the keyring spawned. Their jails are verified as their reports arrive,
//!    and `run` serves.

use super::*;

/// What start-up opens before the supervisor exists (step 4).
pub(super) struct Resources {
    pub(super) poll: Poll,
    pub(super) signals: SignalFd,
    pub(super) command: UnixListener,
    pub(super) listeners: BTreeMap<String, Vec<OwnedFd>>,
    pub(super) audit: Auditor,
    pub(super) self_exe: OwnedFd,
    /// The Prometheus exporter's socket, when configured.
    pub(super) prometheus: Option<OwnedFd>,
}

impl Resources {
    /// What a new supervisor takes over from the old one in an upgrade: the very listening
    /// sockets and command socket (so no queue closes), then the audit log the old one closed.
    /// The command socket is served only once the upgrade is confirmed (see `confirm_handover`).
    pub(super) fn adopt(
        config: &Config,
        handed: BTreeMap<String, BTreeMap<u32, OwnedFd>>,
        command: OwnedFd,
        prometheus: Option<OwnedFd>,
    ) -> Result<Resources, StartError> {
        let (poll, signals) = event_loop()?;
        let command = UnixListener::from_std(std::os::unix::net::UnixListener::from(command));
        // The sockets of a listener, in slot order.
        let listeners = handed
            .into_iter()
            .map(|(address, fds)| (address, fds.into_values().collect()))
            .collect();
        // The exporter's socket is taken over when the configuration still names its address;
        // one configured now (or at another address) is bound here, one no longer configured
        // is closed.
        let prometheus = match &config.metrics.prometheus {
            Some(address) => {
                let wanted = address.parse::<std::net::SocketAddr>().ok();
                let handed = prometheus.filter(|fd| bound_to(fd, wanted));
                match handed {
                    Some(fd) => Some(fd),
                    None => Some(bind_listener(address)?),
                }
            }
            None => None,
        };
        let audit = Auditor::open(config).map_err(StartError::Audit)?;
        let self_exe = std::fs::File::open("/proc/self/exe").map_err(StartError::SelfExe)?;
        Ok(Resources {
            poll,
            signals,
            command,
            listeners,
            audit,
            self_exe: OwnedFd::from(self_exe),
            prometheus,
        })
    }

    /// Opens everything, the audit log last: a start refused for a socket another instance
    /// holds leaves no record in anyone's trail.
    pub(super) fn open(config: &Config, state: &State) -> Result<Resources, StartError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::Directory {
            path: config.state_dir.clone(),
            source,
        })?;
        let (poll, signals) = event_loop()?;
        let mut command = command_socket(&config.command_socket, config.access_policy.is_some())?;
        poll.registry()
            .register(&mut command, COMMAND, Interest::READABLE)
            .map_err(StartError::Poll)?;
        let worker_count = u32::from(config.worker_count);
        let mut listeners = BTreeMap::new();
        for address in state.listeners().keys() {
            let mut fds = Vec::new();
            for _ in 0..worker_count {
                fds.push(bind_listener(address)?);
            }
            listeners.insert(address.clone(), fds);
        }
        // One instance per address, unless sharing is asked for: checked once every socket of
        // ours is bound, so that our own never count as another's.
        if !config.share_listeners {
            let own = resources::socket_inodes(listeners.values().flatten());
            for address in listeners.keys() {
                resources::ensure_sole_listener(address, &own, resources::CRASHED_OWNER_GRACE)?;
            }
        }
        let prometheus = match &config.metrics.prometheus {
            Some(address) => Some(bind_listener(address)?),
            None => None,
        };
        let audit = Auditor::open(config).map_err(StartError::Audit)?;
        let self_exe = std::fs::File::open("/proc/self/exe").map_err(StartError::SelfExe)?;
        Ok(Resources {
            poll,
            signals,
            command,
            listeners,
            audit,
            self_exe: OwnedFd::from(self_exe),
            prometheus,
        })
    }
}

/// Whether a listening socket is bound to `wanted`.
fn bound_to(fd: &OwnedFd, wanted: Option<std::net::SocketAddr>) -> bool {
    let Ok(copy) = fd.try_clone() else { return false };
    std::net::TcpListener::from(copy).local_addr().ok() == wanted
}

/// The signals the supervisor handles, blocked and read from a signalfd, and the event loop
/// that watches it.
fn event_loop() -> Result<(Poll, SignalFd), StartError> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
        Signal::SIGPIPE,
    ] {
        mask.add(s);
    }
    mask.thread_block().map_err(StartError::Signals)?;
    let signals =
        SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(StartError::Signals)?;
    let poll = Poll::new().map_err(StartError::Poll)?;
    poll.registry()
        .register(&mut SourceFd(&signals.as_fd().as_raw_fd()), SIGNALS, Interest::READABLE)
        .map_err(StartError::Poll)?;
    Ok((poll, signals))
}

/// Step 2, in an upgrade: the state the old supervisor sent, with its keys.
fn handed_over_state(config: &Config, handover: &mut upgrade::Handover) -> Result<(State, String), StartError> {
    let mut state = if config.key_isolation {
        State::without_keys()
    } else {
        State::new()
    };
    for mut request in std::mem::take(&mut handover.requests) {
        if !config.key_isolation {
            // Keys in the workers: the certificates get theirs back.
            visit_certificates(&mut request, &mut |c| {
                if let Ok(fp) = certificate_fingerprint(&c.certificate)
                    && let Some((_, key)) = handover.keys.iter().find(|(f, _)| *f == fp)
                {
                    c.key.clone_from(key);
                }
            });
        }
        state
            .apply(&request)
            .map_err(|e| StartError::Handover(upgrade::HandoverError::State(e.to_string())))?;
    }
    let text = format!(
        "state handed over by pid {} (state {})",
        handover.begin.old_pid, handover.begin.state_hash
    );
    Ok((state, text))
}

/// Step 1.
fn check_options(config: &Config, sandbox_off: bool) -> Result<(), StartError> {
    if sandbox_off && config.sandbox.require_landlock {
        return Err(StartError::SandboxRequired);
    }
    Ok(())
}

/// Step 2: the state that serves, and a sentence saying where it came from.
fn initial_state(config: &Config) -> Result<(State, String), StartError> {
    let configured = config.to_state()?;
    let Some(path) = config.saved_state_path().filter(|p| p.exists()) else {
        return Ok((configured, "state built from the configuration file".to_string()));
    };
    let state = load_saved_state(&path)?;
    // Whether the file says something else goes to the log.
    let differences = state.diff(&configured).len();
    let text = if differences == 0 {
        format!(
            "state loaded from the saved state {} (the same as the configuration file)",
            path.display()
        )
    } else {
        format!(
            "state loaded from the saved state {}: it differs from the configuration file by {differences} change(s); `rampart apply -f FILE` applies the file",
            path.display()
        )
    };
    Ok((state, text))
}

/// Step 3: every key checked against its certificate and, under key isolation, moved into a
/// memory file; the state keeps certificates without keys.
fn keep_keys(config: &Config, state: &mut State) -> Result<BTreeMap<String, KeyFile>, StartError> {
    for (_, certificate) in state.certificates() {
        check_key(certificate).map_err(StartError::Certificate)?;
    }
    let mut vault = BTreeMap::new();
    if config.key_isolation {
        for (fingerprint, mut key) in state.take_keys() {
            let file = KeyFile::create(&mut key).map_err(|e| {
                StartError::Certificate(format!(
                    "certificate {fingerprint}: its key cannot be moved to a memory file: {e}"
                ))
            })?;
            vault.insert(fingerprint, file);
        }
    }
    Ok(vault)
}

/// Step 5: the parameters on every worker's command line, and the uid its jail must show.
fn worker_launch(config: &Config, sandbox_off: bool) -> (WorkerLaunch, Option<u32>) {
    let jail = WorkerJailParams::from_config(config, ProfileOptions { sandbox_off });
    let worker_uid = if nix::unistd::Uid::effective().is_root() && !sandbox_off {
        nix::unistd::User::from_name(&config.worker_user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    } else {
        None
    };
    let launch = WorkerLaunch {
        id: 0,
        jail,
        buffer_size: config.buffer_size,
        max_connections: config.max_connections,
        client_idle_timeout: config.timeouts.client_idle,
        request_timeout: config.timeouts.request,
        backend_connect_timeout: config.timeouts.backend_connect,
        backend_response_timeout: config.timeouts.backend_response,
        shutdown_grace: config.timeouts.shutdown_grace,
        max_series: config.metrics.max_series,
        tls_handshake_timeout: config.timeouts.tls_handshake,
        key_isolation: config.key_isolation,
        refuse_cluster: None,
    };
    (launch, worker_uid)
}

impl Supervisor {
    /// `handover`: the channel from the supervisor that started this one for an upgrade.
    pub fn start(
        config: Config,
        sandbox_off: bool,
        log: Log,
        handover: Option<Channel>,
    ) -> Result<Supervisor, StartError> {
        check_options(&config, sandbox_off)?;
        let Some(channel) = handover else {
            let (mut state, origin) = initial_state(&config)?;
            let vault = keep_keys(&config, &mut state)?;
            let resources = Resources::open(&config, &state)?;
            let (launch, worker_uid) = worker_launch(&config, sandbox_off);
            let mut supervisor = Supervisor::assemble(config, state, vault, resources, launch, worker_uid, log)?;
            supervisor.announce(&origin, sandbox_off);
            return supervisor.finish_start();
        };
        // An upgrade: what the old supervisor hands over replaces the configuration's state.
        let started = (|| -> Result<(Supervisor, proto::HandoverBegin), StartError> {
            let mut handover = upgrade::receive(&channel).map_err(StartError::Handover)?;
            let (mut state, origin) = handed_over_state(&config, &mut handover)?;
            // The keys were checked by the old supervisor when they arrived; under key isolation
            // they come apart from their certificates, into this one's memory files.
            let mut vault = if config.key_isolation {
                BTreeMap::new()
            } else {
                keep_keys(&config, &mut state)?
            };
            for (fingerprint, mut key) in std::mem::take(&mut handover.keys) {
                if config.key_isolation {
                    let file = KeyFile::create(&mut key).map_err(|e| {
                        StartError::Certificate(format!("certificate {fingerprint}: its key cannot be kept: {e}"))
                    })?;
                    vault.insert(fingerprint, file);
                }
            }
            let listeners = std::mem::take(&mut handover.listeners);
            let command = handover
                .command
                .take()
                .ok_or(StartError::Handover(upgrade::HandoverError::NoCommandSocket))?;
            let prometheus = handover.prometheus.take();
            let resources = Resources::adopt(&config, listeners, command, prometheus)?;
            let (launch, worker_uid) = worker_launch(&config, sandbox_off);
            let mut supervisor = Supervisor::assemble(config, state, vault, resources, launch, worker_uid, log)?;
            supervisor.ticket_key.clone_from(&handover.begin.ticket_key);
            supervisor.announce(&origin, sandbox_off);
            let begin = &handover.begin;
            supervisor.audit.system(
                "upgrade_started",
                &format!(
                    "pid {} (version {}, binary sha256 {}) takes over from pid {} (version {}, sha256 {})",
                    std::process::id(),
                    crate::VERSION,
                    begin.new_binary_sha256,
                    begin.old_pid,
                    begin.old_version,
                    begin.old_binary_sha256
                ),
            );
            Ok((supervisor, handover.begin))
        })();
        match started {
            Ok((mut supervisor, begin)) => {
                supervisor.handover = Some(upgrade::NewSide { channel, begin });
                supervisor.finish_start()
            }
            Err(e) => {
                upgrade::refuse(&channel, &e.to_string());
                Err(e)
            }
        }
    }

    /// Steps 7 and 8.
    fn finish_start(mut self) -> Result<Supervisor, StartError> {
        let supervisor = &mut self;
        supervisor.narrow()?;
        for id in 0..supervisor.workers.len() as u32 {
            supervisor.spawn(id);
        }
        Ok(self)
    }

    /// Step 6: the supervisor from what start-up opened; one slot per worker, and the keyring's
    /// after them when keys are isolated.
    fn assemble(
        config: Config,
        state: State,
        vault: BTreeMap<String, KeyFile>,
        resources: Resources,
        launch: WorkerLaunch,
        worker_uid: Option<u32>,
        log: Log,
    ) -> Result<Supervisor, StartError> {
        let worker_count = u32::from(config.worker_count);
        let slots = worker_count + u32::from(config.key_isolation);
        let workers = (0..slots)
            .map(|id| WorkerSlot {
                keyring: id >= worker_count,
                id,
                pid: None,
                channel: None,
                stderr: None,
                stderr_buf: Vec::new(),
                outbox: VecDeque::new(),
                run_state: RunState::Dead,
                jail: None,
                started: Instant::now(),
                respawn_at: None,
                backoff: Duration::ZERO,
                quick_deaths: 0,
            })
            .collect();
        let state_hash = state.hash_hex();
        let statsd = match &config.metrics.statsd {
            Some(address) => Some(
                super::statsd::Statsd::open(address, &config.metrics.statsd_prefix, config.metrics.statsd_tags)
                    .map_err(StartError::Statsd)?,
            ),
            None => None,
        };
        let prometheus = match resources.prometheus {
            Some(fd) => {
                let mut listener = mio::net::TcpListener::from_std(std::net::TcpListener::from(fd));
                let address = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| config.metrics.prometheus.clone().unwrap_or_default());
                resources
                    .poll
                    .registry()
                    .register(&mut listener, super::prometheus::PROMETHEUS, Interest::READABLE)
                    .map_err(StartError::Poll)?;
                Some(super::prometheus::Exporter::new(listener, address))
            }
            None => None,
        };
        Ok(Supervisor {
            command_path: config.command_socket.clone(),
            saved_state: config.saved_state_path(),
            config,
            state,
            poll: resources.poll,
            command: resources.command,
            signals: resources.signals,
            self_exe: resources.self_exe,
            launch,
            worker_uid,
            workers,
            listeners: resources.listeners,
            clients: slab::Slab::new(),
            ready_clients: VecDeque::new(),
            pending: HashMap::new(),
            next_sequence: 1,
            log,
            audit: resources.audit,
            stop_deadline: None,
            fresh_listeners: Vec::new(),
            ticket_key: new_ticket_key().map_err(StartError::Random)?,
            ticket_key_made: Instant::now(),
            vault,
            keyring_keys: BTreeSet::new(),
            state_hash,
            retiring: Vec::new(),
            metrics: Default::default(),
            prometheus,
            statsd,
            supervisor_jail: proto::JailReport::default(),
            landlock_paths: Vec::new(),
            binary_path: std::fs::read_link("/proc/self/exe").map_err(StartError::SelfExe)?,
            upgrade: None,
            handover: None,
            handed_over: false,
            exit_code: None,
            notifier: crate::notify::Notifier::from_environment(),
            ready_notified: false,
            rejail: None,
        })
    }

    /// The start, in the log and the trail.
    fn announce(&mut self, origin: &str, sandbox_off: bool) {
        self.log.info(origin);
        if let Some(repair) = self.audit.repaired() {
            self.log.warn(&repair);
        }
        if let Some(file) = self.vault.values().next() {
            let text = format!(
                "{} private key(s) held for the keyring in {}; none in the supervisor's memory",
                self.vault.len(),
                file.backing().describe()
            );
            self.log.info(&text);
        }
        if sandbox_off {
            self.log
                .warn("WORKERS RUN WITHOUT THEIR JAIL (--sandbox-off): for measurements only");
        }
        if let Some(exporter) = &self.prometheus {
            self.log
                .info(&format!("Prometheus metrics on http://{}/metrics", exporter.address));
        }
        self.audit.system(
            "supervisor_start",
            &format!("pid {}, state {}; {origin}", std::process::id(), self.state_hash),
        );
    }

    /// Step 7: keep only the capabilities and paths the supervisor still uses (`rampart policy show --supervisor`). Workers started from now on inherit the
    /// narrowed bounding set and landlock domain, then enter their own jail.
    fn narrow(&mut self) -> Result<(), StartError> {
        let binary = std::fs::read_link("/proc/self/exe").map_err(StartError::SelfExe)?;
        // Loaded now, while every library can still be read: the user database's modules.
        let _ = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0));
        let profile = rampart_policy::supervisor::SupervisorProfile::from_config(&self.config, &binary);
        let report = rampart_sandbox::supervisor::narrow(&profile).map_err(StartError::Narrow)?;
        let text = format!(
            "supervisor narrowed: capabilities {:#x} (bounding {:#x}), landlock {}{}",
            report.cap_effective,
            report.cap_bounding,
            report.landlock_status.as_str(),
            if report.skipped.is_empty() {
                String::new()
            } else {
                format!(" (absent here: {})", report.skipped.join(", "))
            }
        );
        self.log.info(&text);
        self.audit.system("supervisor_narrowed", &text);
        self.supervisor_jail = proto::JailReport {
            uid: nix::unistd::Uid::effective().as_raw(),
            gid: nix::unistd::Gid::effective().as_raw(),
            privileged_start: nix::unistd::Uid::effective().is_root(),
            cap_effective: report.cap_effective,
            cap_permitted: report.cap_permitted,
            cap_bounding: report.cap_bounding,
            landlock_abi: rampart_sandbox::landlock_abi(),
            landlock_status: report.landlock_status.as_str().into(),
            seccomp_mode: "none".into(),
            notes: report.skipped,
            ..Default::default()
        };
        self.landlock_paths = profile
            .paths
            .iter()
            .filter(|p| p.access == rampart_policy::supervisor::PathAccess::Write)
            .map(|p| p.path.display().to_string())
            .collect();
        Ok(())
    }
}

fn load_saved_state(path: &Path) -> Result<State, StartError> {
    let file = std::fs::File::open(path).map_err(|e| StartError::SavedState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    State::load(io::BufReader::new(file)).map_err(|e| StartError::SavedState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
