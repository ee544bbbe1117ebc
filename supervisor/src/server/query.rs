//! Requests the supervisor answers from its own state.

use super::*;

/// Seconds since the epoch at which a PEM certificate expires.
pub(super) fn not_after(pem: &str) -> Option<i64> {
    let cert = boring::x509::X509::from_pem(pem.as_bytes()).ok()?;
    let epoch = boring::asn1::Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(cert.not_after()).ok()?;
    Some(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

impl Supervisor {
    pub(super) fn query(
        &mut self,
        request: &proto::Request,
    ) -> Result<(String, Option<proto::response::Content>), String> {
        use proto::response::Content;
        let state = &self.state;
        match &request.kind {
            Some(Kind::Status(_)) => Ok((
                format!("{} worker(s) running", self.running_workers().len()),
                Some(Content::StatusReport(proto::StatusReport {
                    version: crate::VERSION.to_string(),
                    state_hash: self.state_hash.clone(),
                    workers: self.running_workers().len() as u32,
                    clusters: state.clusters().len() as u64,
                    frontends: state.frontend_count() as u64,
                    backends: state.backend_count() as u64,
                    listeners: state.listeners().len() as u64,
                    supervisor: Some(self.supervisor_jail.clone()),
                    pid: std::process::id() as i32,
                })),
            )),
            Some(Kind::QueryMetrics(q)) => Ok((
                String::new(),
                Some(Content::Metrics(self.metrics.report(&q.cluster_id, &q.backend_id))),
            )),
            Some(Kind::ListWorkers(_)) => Ok((
                String::new(),
                Some(Content::Workers(proto::WorkerList {
                    workers: self
                        .workers
                        .iter()
                        .map(|w| proto::WorkerInfo {
                            id: w.id,
                            pid: w.pid.map_or(0, Pid::as_raw),
                            run_state: w.run_state.name().into(),
                            jail: w.jail.clone(),
                            role: if w.keyring { "keyring" } else { "worker" }.into(),
                        })
                        .collect(),
                })),
            )),
            Some(Kind::ListListeners(_)) => Ok((
                String::new(),
                Some(Content::Listeners(proto::ListenerList {
                    listeners: state.listeners().values().cloned().collect(),
                })),
            )),
            Some(Kind::QueryClusters(filter)) => {
                let clusters = state
                    .clusters()
                    .values()
                    .filter(|c| filter.cluster_id.is_empty() || c.cluster_id == filter.cluster_id)
                    .map(|c| proto::ClusterInfo {
                        cluster: Some(c.clone()),
                        backends: state.cluster_backends(&c.cluster_id).cloned().collect(),
                        http_frontends: state
                            .http_frontends()
                            .filter(|f| f.cluster_id == c.cluster_id)
                            .cloned()
                            .collect(),
                        https_frontends: state
                            .https_frontends()
                            .filter(|f| f.cluster_id == c.cluster_id)
                            .cloned()
                            .collect(),
                        tcp_frontends: state
                            .tcp_frontends()
                            .filter(|f| f.cluster_id == c.cluster_id)
                            .cloned()
                            .collect(),
                    })
                    .collect();
                Ok((String::new(), Some(Content::Clusters(proto::ClusterList { clusters }))))
            }
            Some(Kind::ListFrontends(filter)) => {
                let keep = |cluster: &str, host: &str| {
                    (filter.cluster_id.is_empty() || filter.cluster_id == cluster)
                        && (filter.hostname.is_empty() || filter.hostname == host)
                };
                Ok((
                    String::new(),
                    Some(Content::Frontends(proto::FrontendList {
                        http: state
                            .http_frontends()
                            .filter(|f| keep(&f.cluster_id, &f.hostname))
                            .cloned()
                            .collect(),
                        https: state
                            .https_frontends()
                            .filter(|f| keep(&f.cluster_id, &f.hostname))
                            .cloned()
                            .collect(),
                        tcp: state
                            .tcp_frontends()
                            .filter(|f| keep(&f.cluster_id, ""))
                            .cloned()
                            .collect(),
                    })),
                ))
            }
            Some(Kind::ListCertificates(filter)) => Ok((
                String::new(),
                Some(Content::Certificates(proto::CertificateList {
                    certificates: state
                        .certificates()
                        .filter(|(_, c)| filter.address.is_empty() || c.address == filter.address)
                        // A name under a wildcard certificate finds that certificate.
                        .filter(|(_, c)| {
                            filter.name.is_empty()
                                || c.names
                                    .iter()
                                    .any(|n| rampart_command::state::name_covers(n, &filter.name))
                        })
                        .map(|(fp, c)| proto::CertificateSummary {
                            address: c.address.clone(),
                            fingerprint: fp.to_string(),
                            names: c.names.clone(),
                            not_after: not_after(&c.certificate).unwrap_or(0),
                        })
                        .collect(),
                })),
            )),
            Some(Kind::DumpState(_)) => {
                let mut requests = state.to_requests();
                // Private keys never leave the supervisor through a dump.
                for r in &mut requests {
                    if let Some(Kind::AddCertificate(c)) = &mut r.kind {
                        c.key = String::new();
                    }
                }
                Ok((
                    String::new(),
                    Some(Content::State(proto::StateDump {
                        requests,
                        hash: self.state_hash.clone(),
                    })),
                ))
            }
            Some(Kind::ShowPolicy(_)) => {
                let profile = Profile::from_params(&self.launch.jail);
                let text = format!("{}\n{}", self.audit.policy_text(), profile.to_text());
                Ok((String::new(), Some(Content::Policy(proto::PolicyText { text }))))
            }
            // The dispatcher sends only queries here.
            _ => Err(format!(
                "`{}` is not a query",
                rampart_command::request_kind_name(request)
            )),
        }
    }

    /// Writes the whole state, private keys included (read back from their memory files, every
    /// copy wiped afterwards), to `path` through a temporary file that is fsynced and renamed
    /// over it, with mode 0600. Returns how many requests were written.
    pub(super) fn write_state_file(&self, path: &Path) -> Result<usize, String> {
        let mut requests = self.state.to_requests();
        for r in &mut requests {
            if let Some(Kind::AddCertificate(c)) = &mut r.kind
                && c.key.is_empty()
            {
                let fingerprint = certificate_fingerprint(&c.certificate).map_err(|e| e.to_string())?;
                let file = self.vault.get(&fingerprint).ok_or_else(|| {
                    format!("certificate {fingerprint}: its key is not held; the state was not saved")
                })?;
                let key = file
                    .with_key(|bytes| String::from_utf8_lossy(bytes).into_owned())
                    .map_err(|e| format!("reading a private key back for the saved state failed: {e}"))?;
                c.key = key;
            }
        }
        let mut out = zeroize::Zeroizing::new(Vec::new());
        let written = rampart_command::state::save_requests(&requests, &mut *out);
        for r in &mut requests {
            visit_certificates(r, &mut |c| zeroize::Zeroize::zeroize(&mut c.key));
        }
        written.map_err(|e| e.to_string())?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_private_file(&tmp, &out)
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| sync_parent(path))
            .map_err(|e| {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    format!(
                        "{}: {e}: the supervisor's landlock rules let it write only beneath {} (see `rampart policy show --supervisor`)",
                        path.display(),
                        self.landlock_paths.join(", ")
                    )
                } else {
                    format!("{}: {e}", path.display())
                }
            })?;
        Ok(requests.len())
    }

    /// Writes the state to `saved_state`, when the configuration names one.
    pub(super) fn persist_state(&mut self) -> Result<(), String> {
        let Some(path) = self.saved_state.clone() else {
            return Ok(());
        };
        self.write_state_file(&path).map(|_| ())
    }
}

/// Makes a rename durable: fsync of the directory that holds the file.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
