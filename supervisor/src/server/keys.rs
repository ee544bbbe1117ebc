//! Private keys: checked on arrival, kept in memory files, handed to the keyring.

use super::*;

/// Checks what the state cannot (it has no TLS library): the key is RSA of 2048 bits or more,
/// or ECDSA on P-256 or P-384, and it matches the certificate.
pub(super) fn check_key(c: &proto::Certificate) -> Result<(), String> {
    use boring::nid::Nid;
    use boring::pkey::Id;
    let cert = boring::x509::X509::from_pem(c.certificate.as_bytes())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let key = boring::pkey::PKey::private_key_from_pem(c.key.as_bytes())
        .map_err(|e| format!("the key does not parse: {e}"))?;
    match key.id() {
        Id::RSA if key.bits() >= 2048 => {}
        Id::RSA => return Err(format!("RSA keys need 2048 bits or more; this one has {}", key.bits())),
        Id::EC => {
            let curve = key.ec_key().ok().and_then(|k| k.group().curve_name());
            if !matches!(curve, Some(Nid::X9_62_PRIME256V1 | Nid::SECP384R1)) {
                return Err("ECDSA keys must be on P-256 or P-384".into());
            }
        }
        _ => return Err("use an RSA (2048 bits or more) or ECDSA (P-256, P-384) key".into()),
    }
    let public = cert.public_key().map_err(|e| e.to_string())?;
    if !public.public_eq(&key) {
        return Err("the key does not match the certificate".into());
    }
    Ok(())
}

/// Calls `f` on every certificate a request adds.
pub(super) fn visit_certificates(request: &mut proto::Request, f: &mut impl FnMut(&mut proto::Certificate)) {
    match &mut request.kind {
        Some(Kind::AddCertificate(c)) => f(c),
        Some(Kind::ReplaceCertificate(r)) => {
            if let Some(c) = &mut r.new_certificate {
                f(c);
            }
        }
        Some(Kind::Apply(batch)) => {
            for r in &mut batch.requests {
                visit_certificates(r, f);
            }
        }
        _ => {}
    }
}

impl Supervisor {
    pub(super) fn keyring_id(&self) -> Option<u32> {
        self.workers
            .iter()
            .find(|w| w.keyring && w.run_state == RunState::Running)
            .map(|w| w.id)
    }

    /// Gives a worker and the keyring the two ends of a new socketpair.
    pub(super) fn link_keyring(&mut self, worker: u32) {
        let Some(keyring) = self.keyring_id() else { return };
        let (a, b) = match Channel::pair() {
            Ok(p) => p,
            Err(e) => {
                self.log
                    .error(&format!("worker {worker}: cannot link it to the keyring: {e}"));
                return;
            }
        };
        // Non-blocking from the start: a jailed process cannot change the flag (no fcntl).
        if a.set_nonblocking(true).is_err() || b.set_nonblocking(true).is_err() {
            self.log
                .error(&format!("worker {worker}: cannot make its keyring link non-blocking"));
            return;
        }
        let link = proto::KeyringLink { worker };
        self.send_owned(worker, to_worker(to_worker::Kind::KeyringLink(link)), a.into_fd());
        self.send_owned(keyring, to_keyring(to_keyring::Kind::KeyringLink(link)), b.into_fd());
    }

    /// Gives the running keyring the keys it lacks and, with `forget`, has it forget those no
    /// certificate uses. Called before any order that could need a new key, so that the keyring's
    /// acknowledgement of the order means it holds the key.
    pub(super) fn sync_keyring(&mut self, forget: bool, sequence: u64) {
        let Some(keyring) = self.keyring_id() else {
            self.keyring_keys.clear();
            return;
        };
        let stale: Vec<String> = if forget {
            self.keyring_keys
                .iter()
                .filter(|fp| !self.vault.contains_key(*fp))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for fingerprint in stale {
            self.keyring_keys.remove(&fingerprint);
            let message = to_keyring(to_keyring::Kind::KeyForget(proto::KeyForget { fingerprint }));
            self.send(keyring, message, None);
        }
        let missing: Vec<String> = self
            .vault
            .keys()
            .filter(|fp| !self.keyring_keys.contains(*fp))
            .cloned()
            .collect();
        for fingerprint in missing {
            // The message's copies of the key (this one, its encoding, the outbox entry) are
            // wiped when freed, like every block the supervisor frees.
            let key = match self.vault.get(&fingerprint).map(|file| file.with_key(<[u8]>::to_vec)) {
                Some(Ok(key)) => key,
                Some(Err(e)) => {
                    self.log
                        .error(&format!("certificate {fingerprint}: cannot read its key back: {e}"));
                    continue;
                }
                None => continue,
            };
            self.keyring_keys.insert(fingerprint.clone());
            let message = to_keyring(to_keyring::Kind::KeyMaterial(proto::KeyMaterial {
                fingerprint,
                key,
                sequence,
            }));
            self.send(keyring, message, None);
        }
    }

    /// Drops the keys of certificates the state no longer has (removed, replaced, or never
    /// applied because their request failed).
    pub(super) fn forget_unused_keys(&mut self) {
        if self.vault.is_empty() {
            return;
        }
        let used: HashSet<&str> = self.state.certificates().map(|(fp, _)| fp).collect();
        self.vault.retain(|fp, _| used.contains(fp.as_str()));
    }

    /// Checks every private key a request carries against its certificate. Under key isolation,
    /// also moves each key into a memory file and wipes it from the request: from here on, the
    /// request, its audit record and the state hold certificates without keys.
    pub(super) fn take_keys(&mut self, request: &mut proto::Request) -> Result<(), String> {
        let mut first_error = None;
        let isolation = self.config.key_isolation;
        let mut take = |c: &mut proto::Certificate| {
            if c.key.is_empty() {
                // Only a certificate whose key the supervisor already holds may come without it.
                let held =
                    isolation && certificate_fingerprint(&c.certificate).is_ok_and(|fp| self.vault.contains_key(&fp));
                if !held {
                    first_error.get_or_insert("the certificate comes without its private key".into());
                }
                return;
            }
            let checked =
                check_key(c).and_then(|()| certificate_fingerprint(&c.certificate).map_err(|e| e.to_string()));
            match checked {
                Ok(fingerprint) if isolation => match KeyFile::create(&mut c.key) {
                    Ok(file) => {
                        self.vault.insert(fingerprint, file);
                    }
                    Err(e) => {
                        first_error.get_or_insert(format!("its key cannot be moved to a memory file: {e}"));
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    if isolation {
                        zeroize::Zeroize::zeroize(&mut c.key);
                    }
                    first_error.get_or_insert(e);
                }
            }
        };
        visit_certificates(request, &mut take);
        first_error.map_or(Ok(()), Err)
    }
}
