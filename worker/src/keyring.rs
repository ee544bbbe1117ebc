//! Private keys that never enter a worker.
//!
//! The keyring is a third kind of process: spawned and jailed like a worker, but with no network
//! at all (its profile has no socket, connect or accept), it holds the private keys and signs
//! for the workers over one socketpair per worker. A worker hands BoringSSL a private-key method
//! that sends the handshake's message to the keyring and answers "retry"; when the signature
//! comes back the event loop resumes that session's handshake. Nothing blocks.
//!
//! This file has both sides: [`KeyringClient`] and [`KeyringMethod`] in workers, [`run`] for
//! the keyring process.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use boring::hash::MessageDigest;
use boring::pkey::{PKey, Private};
use boring::rsa::Padding;
use boring::sign::{RsaPssSaltlen, Signer};
use boring::ssl::{PrivateKeyMethod, PrivateKeyMethodError, Ssl, SslRef, SslSignatureAlgorithm};
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use rampart_command::channel::{Channel, ChannelError};
use rampart_command::proto::{
    self, KeyringToWorker, SupervisorToKeyring, WorkerToKeyring, WorkerToSupervisor, keyring_to_worker,
    request::Kind as RequestKind, supervisor_to_keyring as from_supervisor, worker_to_keyring,
    worker_to_supervisor as to_supervisor,
};
use rampart_policy::profile::Profile;
use zeroize::Zeroize;

use crate::WorkerLaunch;

/// The signature schemes the keyring signs with, by TLS code point.
const SCHEMES: [(SslSignatureAlgorithm, u32); 8] = [
    (SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256, 0x0403),
    (SslSignatureAlgorithm::ECDSA_SECP384R1_SHA384, 0x0503),
    (SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256, 0x0804),
    (SslSignatureAlgorithm::RSA_PSS_RSAE_SHA384, 0x0805),
    (SslSignatureAlgorithm::RSA_PSS_RSAE_SHA512, 0x0806),
    (SslSignatureAlgorithm::RSA_PKCS1_SHA256, 0x0401),
    (SslSignatureAlgorithm::RSA_PKCS1_SHA384, 0x0501),
    (SslSignatureAlgorithm::RSA_PKCS1_SHA512, 0x0601),
];

/// Per-connection data on the `Ssl`: the session it belongs to, and its pending request.
fn session_index() -> Option<boring::ex_data::Index<Ssl, usize>> {
    static INDEX: OnceLock<Option<boring::ex_data::Index<Ssl, usize>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

fn request_index() -> Option<boring::ex_data::Index<Ssl, u64>> {
    static INDEX: OnceLock<Option<boring::ex_data::Index<Ssl, u64>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

/// Marks a new TLS connection with its session key, so that a signature reply wakes it.
pub fn tag_session(ssl: &mut SslRef, session: usize) {
    if let Some(index) = session_index() {
        ssl.set_ex_data(index, session);
    }
}

/// The worker's side: requests waiting to be sent, replies waiting to be collected.
#[derive(Default)]
pub struct KeyringClient {
    next_id: u64,
    pub outbox: Vec<proto::SignRequest>,
    /// Request id → session key, for the reply to wake the session.
    pub waiting: HashMap<u64, usize>,
    /// Replies not yet collected by their handshake, with when they arrived.
    replies: HashMap<u64, (Instant, Result<Vec<u8>, String>)>,
    /// When the replies were last swept.
    swept: Option<Instant>,
}

/// A reply nobody collected within this long belongs to a connection that closed while its
/// handshake waited (or to a session key since reused): it is dropped.
const UNCOLLECTED: Duration = Duration::from_secs(30);

impl KeyringClient {
    /// A reply arrived: returns the session to wake.
    pub fn reply(&mut self, reply: proto::SignReply) -> Option<usize> {
        self.reply_at(reply, Instant::now())
    }

    fn reply_at(&mut self, reply: proto::SignReply, now: Instant) -> Option<usize> {
        self.sweep(now);
        // A reply to a request nobody waits for (answered twice, or forged by a broken
        // keyring) is not kept.
        let session = self.waiting.remove(&reply.id)?;
        let result = if reply.error.is_empty() {
            Ok(reply.signature)
        } else {
            Err(reply.error)
        };
        self.replies.insert(reply.id, (now, result));
        Some(session)
    }

    /// Drops replies no handshake collected in time, once per `UNCOLLECTED`.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < UNCOLLECTED)
        {
            return;
        }
        self.swept = Some(now);
        self.replies
            .retain(|_, (arrived, _)| now.saturating_duration_since(*arrived) < UNCOLLECTED);
    }

    /// Replies waiting to be collected.
    pub fn uncollected(&self) -> usize {
        self.replies.len()
    }

    /// The keyring went away: every waiting handshake fails (clients retry), and the sessions
    /// to wake are returned.
    pub fn fail_all(&mut self, why: &str) -> Vec<usize> {
        let waiting: Vec<(u64, usize)> = self.waiting.drain().collect();
        let now = Instant::now();
        for (id, _) in &waiting {
            self.replies.insert(*id, (now, Err(why.to_string())));
        }
        self.outbox.clear();
        waiting.into_iter().map(|(_, s)| s).collect()
    }
}

/// BoringSSL's private-key method for one certificate: asks the keyring.
pub struct KeyringMethod {
    pub fingerprint: String,
    pub client: Arc<Mutex<KeyringClient>>,
}

impl PrivateKeyMethod for KeyringMethod {
    fn sign(
        &self,
        ssl: &mut SslRef,
        input: &[u8],
        algorithm: SslSignatureAlgorithm,
        _output: &mut [u8],
    ) -> Result<usize, PrivateKeyMethodError> {
        let code = SCHEMES
            .iter()
            .find(|(a, _)| *a == algorithm)
            .map(|(_, c)| *c)
            .ok_or(PrivateKeyMethodError::FAILURE)?;
        let session = session_index()
            .and_then(|i| ssl.ex_data(i).copied())
            .ok_or(PrivateKeyMethodError::FAILURE)?;
        let mut client = self.client.lock().map_err(|_| PrivateKeyMethodError::FAILURE)?;
        client.next_id += 1;
        let id = client.next_id;
        client.outbox.push(proto::SignRequest {
            id,
            fingerprint: self.fingerprint.clone(),
            algorithm: code,
            input: input.to_vec(),
        });
        client.waiting.insert(id, session);
        drop(client);
        if let Some(index) = request_index() {
            ssl.set_ex_data(index, id);
        }
        Err(PrivateKeyMethodError::RETRY)
    }

    fn decrypt(&self, _: &mut SslRef, _: &[u8], _: &mut [u8]) -> Result<usize, PrivateKeyMethodError> {
        // Only ECDHE key exchange is offered: RSA decryption is never needed.
        Err(PrivateKeyMethodError::FAILURE)
    }

    fn complete(&self, ssl: &mut SslRef, output: &mut [u8]) -> Result<usize, PrivateKeyMethodError> {
        let id = request_index()
            .and_then(|i| ssl.ex_data(i).copied())
            .ok_or(PrivateKeyMethodError::FAILURE)?;
        let mut client = self.client.lock().map_err(|_| PrivateKeyMethodError::FAILURE)?;
        match client.replies.remove(&id) {
            None => Err(PrivateKeyMethodError::RETRY),
            Some((_, Err(_))) => Err(PrivateKeyMethodError::FAILURE),
            Some((_, Ok(signature))) => {
                let out = output
                    .get_mut(..signature.len())
                    .ok_or(PrivateKeyMethodError::FAILURE)?;
                out.copy_from_slice(&signature);
                Ok(signature.len())
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The keyring process

fn sign(key: &PKey<Private>, algorithm: u32, input: &[u8]) -> Result<Vec<u8>, String> {
    let (digest, pss, pkcs1) = match algorithm {
        0x0403 => (MessageDigest::sha256(), false, false),
        0x0503 => (MessageDigest::sha384(), false, false),
        0x0804 => (MessageDigest::sha256(), true, false),
        0x0805 => (MessageDigest::sha384(), true, false),
        0x0806 => (MessageDigest::sha512(), true, false),
        0x0401 => (MessageDigest::sha256(), false, true),
        0x0501 => (MessageDigest::sha384(), false, true),
        0x0601 => (MessageDigest::sha512(), false, true),
        other => return Err(format!("unsupported signature scheme {other:#06x}")),
    };
    let mut signer = Signer::new(digest, key).map_err(|e| e.to_string())?;
    if pss {
        signer.set_rsa_padding(Padding::PKCS1_PSS).map_err(|e| e.to_string())?;
        signer
            .set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)
            .map_err(|e| e.to_string())?;
    } else if pkcs1 {
        signer.set_rsa_padding(Padding::PKCS1).map_err(|e| e.to_string())?;
    }
    signer.update(input).map_err(|e| e.to_string())?;
    signer.sign_to_vec().map_err(|e| e.to_string())
}

const SUPERVISOR: Token = Token(0);

/// Heap kept for keys where only the memory mapped before the jail can be locked.
const KEYRING_HEAP_RESERVE: usize = 16 << 20;

/// The keyring process's whole life. Returns the exit code.
pub fn run(channel_fd: RawFd, launch: WorkerLaunch) -> i32 {
    let profile = Profile::keyring(&launch.jail);
    // Keep the keys out of swap (pages are locked as they are touched), while still root.
    let note = rampart_sandbox::lock_memory(KEYRING_HEAP_RESERVE);
    let (channel, mut poll) = match crate::enter_jail(
        channel_fd,
        &profile,
        "the keyring",
        "rampart keyring: panic (a bug); aborting\n",
        vec![note],
    ) {
        Ok(entered) => entered,
        Err(code) => return code,
    };
    let fd = channel.as_raw_fd();
    if poll
        .registry()
        .register(&mut SourceFd(&fd), SUPERVISOR, Interest::READABLE)
        .is_err()
    {
        return 5;
    }
    let mut keys: HashMap<String, PKey<Private>> = HashMap::new();
    // Keys that could not be loaded, by the sequence of the order they came ahead of.
    let mut key_errors: Vec<(u64, String)> = Vec::new();
    let mut assembler = rampart_command::channel::OrderAssembler::default();
    // Each worker's link and the replies waiting for room in it.
    let mut workers: slab::Slab<(Channel, std::collections::VecDeque<proto::SignReply>)> = slab::Slab::new();
    let mut events = Events::with_capacity(64);
    loop {
        if let Err(e) = poll.poll(&mut events, None)
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            return 6;
        }
        for event in events.iter() {
            if event.token() == SUPERVISOR {
                loop {
                    let received = match channel.recv::<SupervisorToKeyring>() {
                        Ok(Some(r)) => r,
                        Ok(None) => return 0,
                        Err(ChannelError::Receive(e)) if e as i32 == libc::EAGAIN => break,
                        Err(_) => continue,
                    };
                    match received.message.kind {
                        Some(from_supervisor::Kind::KeyringLink(_)) => {
                            if let Some(fd) = received.fds.into_iter().next() {
                                let link = Channel::from(fd);
                                let entry = workers.vacant_entry();
                                let raw = link.as_raw_fd();
                                if poll
                                    .registry()
                                    .register(
                                        &mut SourceFd(&raw),
                                        Token(entry.key() + 1),
                                        Interest::READABLE | Interest::WRITABLE,
                                    )
                                    .is_ok()
                                {
                                    entry.insert((link, std::collections::VecDeque::new()));
                                }
                            }
                        }
                        Some(from_supervisor::Kind::KeyMaterial(mut material)) => {
                            let loaded = PKey::private_key_from_pem(&material.key)
                                .map_err(|e| format!("the key does not parse: {e}"));
                            material.key.zeroize();
                            match loaded {
                                Ok(key) => {
                                    keys.insert(material.fingerprint.to_ascii_lowercase(), key);
                                }
                                Err(e) => {
                                    let message = format!("key of {}: {e}", material.fingerprint);
                                    let line = proto::LogLine {
                                        level: crate::LOG_ERROR,
                                        target: "keyring".into(),
                                        message: message.clone(),
                                    };
                                    let _ = channel.send(
                                        &WorkerToSupervisor {
                                            kind: Some(to_supervisor::Kind::Log(line)),
                                        },
                                        &[],
                                    );
                                    if material.sequence != 0 {
                                        key_errors.push((material.sequence, message));
                                    }
                                }
                            }
                        }
                        Some(from_supervisor::Kind::KeyForget(forget)) => {
                            keys.remove(&forget.fingerprint.to_ascii_lowercase());
                        }
                        Some(from_supervisor::Kind::Order(piece)) => {
                            // A large order comes in pieces: answered once, for the last one.
                            let order = match assembler.push(piece) {
                                Ok(Some(order)) => order,
                                Ok(None) => continue,
                                Err(e) => {
                                    let line = proto::LogLine {
                                        level: crate::LOG_ERROR,
                                        target: "keyring".into(),
                                        message: format!("bad order from the supervisor: {e}"),
                                    };
                                    let _ = channel.send(
                                        &WorkerToSupervisor {
                                            kind: Some(to_supervisor::Kind::Log(line)),
                                        },
                                        &[],
                                    );
                                    continue;
                                }
                            };
                            let stop = matches!(
                                order.request.as_ref().and_then(|r| r.kind.as_ref()),
                                Some(RequestKind::SoftStop(_) | RequestKind::HardStop(_))
                            );
                            // Keys come in their own messages, before the order that needs them;
                            // its acknowledgement reports a key that could not be loaded.
                            let failed: Vec<String> = key_errors
                                .iter()
                                .filter(|(s, _)| *s == order.sequence)
                                .map(|(_, m)| m.clone())
                                .collect();
                            key_errors.retain(|(s, _)| *s > order.sequence);
                            let reply = if failed.is_empty() {
                                Ok(())
                            } else {
                                Err(failed.join("; "))
                            };
                            let reply = proto::WorkerReply {
                                sequence: order.sequence,
                                status: if reply.is_ok() {
                                    proto::ResponseStatus::Ok
                                } else {
                                    proto::ResponseStatus::Failure
                                } as i32,
                                message: reply.err().unwrap_or_default(),
                                response: None,
                            };
                            let _ = channel.send(
                                &WorkerToSupervisor {
                                    kind: Some(to_supervisor::Kind::Reply(reply)),
                                },
                                &[],
                            );
                            if stop {
                                return 0;
                            }
                        }
                        _ => {}
                    }
                }
            } else {
                let key = event.token().0 - 1;
                let mut closed = false;
                while let Some((link, _)) = workers.get(key) {
                    let received = match link.recv::<WorkerToKeyring>() {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            closed = true;
                            break;
                        }
                        Err(ChannelError::Receive(e)) if e as i32 == libc::EAGAIN => break,
                        Err(_) => continue,
                    };
                    if let Some(worker_to_keyring::Kind::SignRequest(request)) = received.message.kind {
                        let result = keys
                            .get(&request.fingerprint)
                            .ok_or_else(|| format!("no key for certificate {}", request.fingerprint))
                            .and_then(|k| sign(k, request.algorithm, &request.input));
                        let (signature, error) = match result {
                            Ok(s) => (s, String::new()),
                            Err(e) => (Vec::new(), e),
                        };
                        let reply = proto::SignReply {
                            id: request.id,
                            signature,
                            error,
                        };
                        if let Some((_, queue)) = workers.get_mut(key) {
                            queue.push_back(reply);
                        }
                        flush_replies(&mut workers, key);
                    }
                }
                flush_replies(&mut workers, key);
                if closed && let Some((link, _)) = workers.try_remove(key) {
                    let raw = link.as_raw_fd();
                    let _ = poll.registry().deregister(&mut SourceFd(&raw));
                }
            }
        }
    }
}

/// Sends a link's waiting replies until it is full (the rest wait for its next writable event).
fn flush_replies(workers: &mut slab::Slab<(Channel, std::collections::VecDeque<proto::SignReply>)>, key: usize) {
    let Some((link, queue)) = workers.get_mut(key) else {
        return;
    };
    while let Some(reply) = queue.front() {
        let message = KeyringToWorker {
            kind: Some(keyring_to_worker::Kind::SignReply(reply.clone())),
        };
        match link.send(&message, &[]) {
            Ok(()) => {
                queue.pop_front();
            }
            Err(ChannelError::Send(e)) if e as i32 == libc::EAGAIN => return,
            Err(_) => {
                queue.clear();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: u64) -> proto::SignReply {
        proto::SignReply {
            id,
            signature: vec![1, 2, 3],
            ..Default::default()
        }
    }

    #[test]
    fn replies_nobody_collects_do_not_pile_up() {
        let mut client = KeyringClient::default();
        let start = Instant::now();
        client.waiting.insert(1, 10);
        client.waiting.insert(2, 11);
        // A reply nobody asked for is not kept.
        assert_eq!(client.reply_at(reply(99), start), None);
        assert_eq!(client.uncollected(), 0);
        // Session 10 is woken; its connection closed before its handshake collected the reply.
        assert_eq!(client.reply_at(reply(1), start), Some(10));
        assert_eq!(client.uncollected(), 1);
        // A later reply, past the limit, sweeps the abandoned one away and is kept itself.
        assert_eq!(
            client.reply_at(reply(2), start + UNCOLLECTED + Duration::from_secs(1)),
            Some(11)
        );
        assert_eq!(client.uncollected(), 1);
        assert!(client.replies.contains_key(&2));
        assert!(client.waiting.is_empty());
    }
}
