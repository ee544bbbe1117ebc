//! Command-socket clients: accept, frames in, answers out.
//!
//! Fairness: a readable client is queued, and each turn of the loop serves every queued client
//! [`FRAMES_PER_TURN`] frame(s), round-robin; a client with more input goes to the back of the
//! queue. A uid at its connection limit makes room by closing its longest-idle connection
//! (with a message saying why); when none is idle, an admin still gets one reserved connection.

use super::*;

impl Supervisor {
    pub(super) fn accept_clients(&mut self) {
        loop {
            let (mut stream, _) = match self.command.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.log.warn(&format!("command socket accept failed: {e}"));
                    return;
                }
            };
            // A connection whose credentials cannot be read is refused.
            let peer = match socket::getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(c) => crate::audit::peer(c.uid(), c.gid(), c.pid()),
                Err(e) => {
                    self.log
                        .warn(&format!("command connection without peer credentials refused: {e}"));
                    continue;
                }
            };
            let reserved = match self.admit_connection(&peer) {
                Ok(reserved) => reserved,
                Err(reason) => {
                    self.audit.connection_refused(&peer, "too_many_connections", &reason);
                    let response = proto::Response {
                        request_id: String::new(),
                        status: proto::ResponseStatus::Failure as i32,
                        message: reason,
                        content: None,
                    };
                    let _ = stream.write(&encode_frame(&response));
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    continue;
                }
            };
            let entry = self.clients.vacant_entry();
            let token = Token(CLIENT_BASE + entry.key());
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            let idle_timeout = self.audit.idle_timeout(&peer);
            let reader = FrameReader::new(self.audit.max_request_bytes(&peer));
            entry.insert(Client {
                stream,
                peer,
                reader,
                out: Vec::new(),
                closing: false,
                last_active: Instant::now(),
                idle_timeout,
                serial: self.next_sequence,
                queued: false,
                reserved,
                stalled: false,
            });
            self.next_sequence += 1;
        }
    }

    /// Takes a connection slot for `peer`: `Ok(true)` for the admin's reserved connection.
    fn admit_connection(&mut self, peer: &Peer) -> Result<bool, String> {
        let Err(reason) = self.audit.connection_opened(peer) else {
            return Ok(false);
        };
        // The uid's longest-idle connection (no frame half-read, no answer pending) makes room.
        let waiting: HashSet<usize> = self.pending.values().map(|p| p.client).collect();
        let idle = self
            .clients
            .iter()
            .filter(|(k, c)| {
                c.peer.uid == peer.uid
                    && !c.reserved
                    && c.reader.buffered() == 0
                    && c.out.is_empty()
                    && !waiting.contains(k)
            })
            .min_by_key(|(_, c)| c.last_active)
            .map(|(k, _)| k);
        if let Some(victim) = idle {
            let message = format!(
                "{reason}; this connection was the longest idle of uid {} and was closed to make room for a new one",
                peer.uid
            );
            self.audit.connection_refused(peer, "evicted_idle", &message);
            self.respond(victim, "", false, message, None);
            if let Some(c) = self.clients.get_mut(victim) {
                c.closing = true;
            }
            self.flush_client(victim);
            self.close_client(victim);
            return self
                .audit
                .connection_opened(peer)
                .map(|()| false)
                .map_err(|e| e.to_string());
        }
        let reserve_free = !self.clients.iter().any(|(_, c)| c.reserved);
        if reserve_free && self.audit.is_admin(peer) {
            return Ok(true);
        }
        Err(format!(
            "{reason}; close one of them (every connection of the uid is busy)"
        ))
    }

    pub(super) fn close_client(&mut self, key: usize) {
        if let Some(mut c) = self.clients.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if !c.reserved {
                self.audit.connection_closed(&c.peer);
            }
        }
    }

    /// Puts a client with input in the queue of clients to serve.
    pub(super) fn queue_client(&mut self, key: usize) {
        if let Some(c) = self.clients.get_mut(key)
            && !c.queued
        {
            c.queued = true;
            self.ready_clients.push_back(key);
        }
    }

    /// One turn: every client queued now handles at most [`FRAMES_PER_TURN`] frames; one with
    /// more input goes back in the queue.
    pub(super) fn serve_clients(&mut self) {
        // During a handover the audit log is the new supervisor's: requests wait.
        if self.upgrade.is_some() {
            return;
        }
        for _ in 0..self.ready_clients.len() {
            let Some(key) = self.ready_clients.pop_front() else {
                return;
            };
            let Some(c) = self.clients.get_mut(key) else { continue };
            c.queued = false;
            if c.out.len() > MAX_CLIENT_BACKLOG {
                // Served again once it reads its answers (flush_client).
                c.stalled = true;
                continue;
            }
            if self.client_readable(key) {
                self.queue_client(key);
            }
            self.flush_client(key);
        }
    }

    /// Reads and handles up to [`FRAMES_PER_TURN`] frames. True when the client may have more.
    pub(super) fn client_readable(&mut self, key: usize) -> bool {
        if let Some(c) = self.clients.get_mut(key) {
            c.last_active = Instant::now();
        }
        for _ in 0..FRAMES_PER_TURN {
            let Some(client) = self.clients.get_mut(key) else {
                return false;
            };
            let frame = client.reader.read_frame(&mut client.stream);
            match frame {
                Ok(Some(body)) => {
                    let peer = client.peer.clone();
                    match decode_request(&body) {
                        Ok(request) => self.handle(key, peer, request),
                        Err(e) => {
                            self.audit.malformed(&peer, &body, &e.to_string());
                            self.respond(key, "", false, format!("malformed request: {e}"), None);
                        }
                    }
                }
                Ok(None) => {
                    if client.reader.is_eof() {
                        self.close_client(key);
                    }
                    return false;
                }
                Err(e @ (FrameError::TooLarge { .. } | FrameError::BadLength)) => {
                    let peer = client.peer.clone();
                    self.audit.malformed(&peer, &[], &e.to_string());
                    self.respond(key, "", false, format!("{e}; closing the connection"), None);
                    if let Some(c) = self.clients.get_mut(key) {
                        c.closing = true;
                    }
                    return false;
                }
                Err(_) => {
                    self.close_client(key);
                    return false;
                }
            }
        }
        // A connection that is closing takes no more requests.
        self.clients.get(key).is_some_and(|c| !c.closing)
    }

    pub(super) fn flush_client(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        while !client.out.is_empty() {
            match client.stream.write(&client.out) {
                Ok(0) => break,
                Ok(n) => {
                    client.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.close_client(key);
                    return;
                }
            }
        }
        if client.out.is_empty() && client.closing {
            self.close_client(key);
            return;
        }
        if client.stalled && client.out.len() <= MAX_CLIENT_BACKLOG {
            client.stalled = false;
            self.queue_client(key);
        }
    }

    pub(super) fn respond(
        &mut self,
        key: usize,
        request_id: &str,
        ok: bool,
        message: String,
        content: Option<proto::response::Content>,
    ) {
        let response = proto::Response {
            request_id: request_id.to_string(),
            status: if ok {
                proto::ResponseStatus::Ok
            } else {
                proto::ResponseStatus::Failure
            } as i32,
            message,
            content,
        };
        if let Some(client) = self.clients.get_mut(key) {
            client.out.extend_from_slice(&encode_frame(&response));
        }
        self.flush_client(key);
    }

    pub(super) fn client_serial(&self, key: usize) -> Option<u64> {
        self.clients.get(key).map(|c| c.serial)
    }
}
