//! The one byte pipe: bytes copied both ways between a client and a backend, used by a TCP
//! listener's connections and by an HTTP/1.1 connection after a 101 Switching Protocols.
//!
//! Each direction has one pooled buffer. A client that closes its side has that half-close
//! passed on to the backend once what it sent is delivered; the pipe ends when the backend has
//! closed and everything it sent reached the client, or when either socket fails.

use std::io::{self, Read, Write};

use crate::pool::Checkout;

/// A stream whose write side can be closed on its own.
pub trait HalfClose: Read + Write {
    fn close_write(&mut self);
}

impl HalfClose for mio::net::TcpStream {
    fn close_write(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl HalfClose for crate::tls::FrontStream {
    fn close_write(&mut self) {
        self.shutdown_write();
    }
}

/// One direction's buffer: bytes at `start..end` wait to be written.
struct Half {
    buf: Checkout,
    start: usize,
    end: usize,
    /// The reading side returned end of file.
    eof: bool,
}

enum Moved {
    Bytes(usize),
    Blocked,
    Eof,
    Failed,
}

impl Half {
    fn fill<R: Read>(&mut self, from: &mut R) -> Moved {
        if self.eof {
            return Moved::Blocked;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let space = kawa::AsBuffer::as_mut_buffer(&mut self.buf)
            .get_mut(self.end..)
            .unwrap_or_default();
        if space.is_empty() {
            return Moved::Blocked;
        }
        loop {
            return match from.read(space) {
                Ok(0) => {
                    self.eof = true;
                    Moved::Eof
                }
                Ok(n) => {
                    self.end += n;
                    Moved::Bytes(n)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Moved::Blocked,
                Err(_) => Moved::Failed,
            };
        }
    }

    fn drain<W: Write>(&mut self, to: &mut W) -> Moved {
        let data = kawa::AsBuffer::as_buffer(&self.buf)
            .get(self.start..self.end)
            .unwrap_or_default();
        if data.is_empty() {
            return Moved::Blocked;
        }
        loop {
            return match to.write(data) {
                Ok(0) => Moved::Failed,
                Ok(n) => {
                    self.start += n;
                    Moved::Bytes(n)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Moved::Blocked,
                Err(_) => Moved::Failed,
            };
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// What the pipe did.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Waiting for the sockets; `moved` says whether any byte moved in this run.
    Open { moved: bool },
    /// Over: the backend finished and the client has everything, or a socket failed.
    Done { failed: bool },
}

pub struct Pipe {
    up: Half,
    down: Half,
    back_shut: bool,
    /// Bytes read from the client, and written to it.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Pipe {
    /// A pipe with empty buffers.
    pub fn new(up: Checkout, down: Checkout) -> Pipe {
        Pipe::with_pending(up, 0..0, down, 0..0)
    }

    /// A pipe whose buffers already hold bytes to pass on (`up` for the backend, `down` for the
    /// client): what arrived behind an upgrade request and its 101.
    pub fn with_pending(
        up: Checkout,
        up_pending: std::ops::Range<usize>,
        down: Checkout,
        down_pending: std::ops::Range<usize>,
    ) -> Pipe {
        Pipe {
            up: Half {
                buf: up,
                start: up_pending.start,
                end: up_pending.end,
                eof: false,
            },
            down: Half {
                buf: down,
                start: down_pending.start,
                end: down_pending.end,
                eof: false,
            },
            back_shut: false,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Moves every byte the sockets allow. Both sockets are tried until they would block, so
    /// no edge-triggered readiness is lost.
    pub fn run<F: HalfClose, B: HalfClose>(&mut self, front: &mut F, back: &mut B) -> Flow {
        let mut moved = false;
        loop {
            let mut progress = false;
            match self.up.fill(front) {
                Moved::Bytes(n) => {
                    self.bytes_in += n as u64;
                    progress = true;
                }
                Moved::Failed => return Flow::Done { failed: true },
                Moved::Eof | Moved::Blocked => {}
            }
            match self.up.drain(back) {
                Moved::Bytes(_) => progress = true,
                Moved::Failed => return Flow::Done { failed: true },
                _ => {}
            }
            if self.up.eof && self.up.is_empty() && !self.back_shut {
                back.close_write();
                self.back_shut = true;
            }
            match self.down.fill(back) {
                Moved::Bytes(_) => progress = true,
                Moved::Failed => return Flow::Done { failed: true },
                Moved::Eof | Moved::Blocked => {}
            }
            match self.down.drain(front) {
                Moved::Bytes(n) => {
                    self.bytes_out += n as u64;
                    progress = true;
                }
                Moved::Failed => return Flow::Done { failed: true },
                _ => {}
            }
            if self.down.eof && self.down.is_empty() {
                front.close_write();
                return Flow::Done { failed: false };
            }
            if !progress {
                return Flow::Open { moved };
            }
            moved = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A socket played by two queues: what the pipe reads, and what it wrote.
    struct Fake {
        incoming: VecDeque<u8>,
        eof: bool,
        written: Vec<u8>,
        write_room: usize,
        closed_write: bool,
    }

    impl Fake {
        fn new(incoming: &[u8], eof: bool, write_room: usize) -> Fake {
            Fake {
                incoming: incoming.iter().copied().collect(),
                eof,
                written: Vec::new(),
                write_room,
                closed_write: false,
            }
        }
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.incoming.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.incoming.len());
            for (slot, byte) in buf.iter_mut().zip(self.incoming.drain(..n)) {
                *slot = byte;
            }
            Ok(n)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.write_room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.write_room);
            self.write_room -= n;
            self.written.extend_from_slice(buf.get(..n).unwrap_or_default());
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl HalfClose for Fake {
        fn close_write(&mut self) {
            self.closed_write = true;
        }
    }

    #[test]
    fn bytes_cross_both_ways_and_a_half_close_is_passed_on() {
        let pool = crate::pool::Pool::new(16, 4);
        let mut pipe = Pipe::new(pool.checkout().unwrap(), pool.checkout().unwrap());
        let payload: Vec<u8> = (0..100u8).collect();
        let mut front = Fake::new(&payload, true, usize::MAX);
        let mut back = Fake::new(b"pong", false, usize::MAX);
        assert_eq!(pipe.run(&mut front, &mut back), Flow::Open { moved: true });
        assert_eq!(back.written, payload, "every byte, through a 16-byte buffer");
        assert!(back.closed_write, "the client's end of file reaches the backend");
        assert_eq!(front.written, b"pong");
        back.eof = true;
        assert_eq!(pipe.run(&mut front, &mut back), Flow::Done { failed: false });
        assert_eq!((pipe.bytes_in, pipe.bytes_out), (100, 4));
    }

    #[test]
    fn a_slow_client_holds_the_backend_back_and_loses_nothing() {
        let pool = crate::pool::Pool::new(8, 4);
        let data: Vec<u8> = (0..50u8).collect();
        let mut pipe = Pipe::with_pending(pool.checkout().unwrap(), 0..0, pool.checkout().unwrap(), 0..0);
        let mut front = Fake::new(b"", false, 3);
        let mut back = Fake::new(&data, true, usize::MAX);
        let mut rounds = 0;
        loop {
            match pipe.run(&mut front, &mut back) {
                Flow::Done { failed } => {
                    assert!(!failed);
                    break;
                }
                Flow::Open { .. } => front.write_room = 3,
            }
            rounds += 1;
            assert!(rounds < 100, "the pipe made no progress");
        }
        assert_eq!(front.written, data);
        assert!(front.closed_write);
    }
}
