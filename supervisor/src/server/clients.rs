//! Command-socket clients: accept, frames in, answers out.

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
            if let Err(reason) = self.audit.connection_opened(&peer) {
                let response = proto::Response {
                    request_id: String::new(),
                    status: proto::ResponseStatus::Failure as i32,
                    message: reason,
                    content: None,
                };
                let _ = stream.write(&encode_frame(&response));
                continue;
            }
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
            });
            self.next_sequence += 1;
        }
    }

    pub(super) fn close_client(&mut self, key: usize) {
        if let Some(mut c) = self.clients.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.audit.connection_closed(&c.peer);
        }
    }

    pub(super) fn client_readable(&mut self, key: usize) {
        if let Some(c) = self.clients.get_mut(key) {
            c.last_active = Instant::now();
        }
        loop {
            let Some(client) = self.clients.get_mut(key) else {
                return;
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
                    return;
                }
                Err(e @ (FrameError::TooLarge { .. } | FrameError::BadLength)) => {
                    let peer = client.peer.clone();
                    self.audit.malformed(&peer, &[], &e.to_string());
                    self.respond(key, "", false, format!("{e}; closing the connection"), None);
                    if let Some(c) = self.clients.get_mut(key) {
                        c.closing = true;
                    }
                    return;
                }
                Err(_) => {
                    self.close_client(key);
                    return;
                }
            }
        }
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
