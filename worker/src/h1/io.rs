//! Socket I/O for HTTP/1.1 through kawa's buffers.

use std::io::{self, Read, Write};

use kawa::Kawa;

use crate::pool::Checkout;

pub(crate) enum Io {
    /// Bytes moved.
    Data(usize),
    Blocked,
    Closed,
    Failed,
}

/// Reads what fits. `drained` is set when the read returned less than the room it had: the
/// socket is then empty, and with edge-triggered readiness a new event will announce new bytes,
/// so the caller can skip the read that would only say EAGAIN.
pub(crate) fn read_into<S: Read>(stream: &mut S, kawa: &mut Kawa<Checkout>, drained: &mut bool) -> Io {
    let space = kawa.storage.space();
    if space.is_empty() {
        return Io::Blocked;
    }
    let room = space.len();
    loop {
        match stream.read(space) {
            Ok(0) => return Io::Closed,
            Ok(n) => {
                kawa.storage.fill(n);
                *drained = n < room;
                return Io::Data(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Io::Blocked,
            Err(_) => return Io::Failed,
        }
    }
}

thread_local! {
    /// Where many small pieces (a header block is four slices per header) are gathered into
    /// one write: the kernel copies one buffer faster than forty iovecs.
    static GATHER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(GATHER_LIMIT));
}
const GATHER_LIMIT: usize = 8192;

pub(crate) fn write_from<S: Write>(stream: &mut S, kawa: &mut Kawa<Checkout>) -> Io {
    let written = {
        let slices = kawa.as_io_slice();
        if slices.is_empty() {
            return Io::Blocked;
        }
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if slices.len() > 4 && total <= GATHER_LIMIT {
            let result = GATHER.with(|g| {
                let mut g = g.borrow_mut();
                g.clear();
                for slice in &slices {
                    g.extend_from_slice(slice);
                }
                loop {
                    match stream.write(&g) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
            });
            match result {
                Ok(0) => return Io::Closed,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Io::Blocked,
                Err(_) => return Io::Failed,
            }
        } else {
            loop {
                match stream.write_vectored(&slices) {
                    Ok(0) => return Io::Closed,
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Io::Blocked,
                    Err(_) => return Io::Failed,
                }
            }
        }
    };
    kawa.consume(written);
    Io::Data(written)
}
