//! The service manager's notification socket (sd_notify, `Type=notify`): `READY=1` once every
//! worker is verified, `RELOADING=1` ... `READY=1` around an upgrade (with `MAINPID=` when the
//! supervisor's pid changes), `STATUS=` lines, `STOPPING=1`.
//!
//! The socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace) is
//! connected once, at start, before the supervisor narrows itself; a message that cannot be sent
//! is dropped (the service manager is told nothing rather than the supervisor blocking).

use std::os::unix::net::UnixDatagram;

pub struct Notifier {
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` when it is set.
    pub fn from_environment() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let socket = UnixDatagram::unbound().ok()?;
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            let connected = match bytes.strip_prefix(b"@") {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    let address = std::os::unix::net::SocketAddr::from_abstract_name(name).ok()?;
                    socket.connect_addr(&address)
                }
                None => socket.connect(&path),
            };
            connected.ok()?;
            socket.set_nonblocking(true).ok()?;
            Some(socket)
        });
        Notifier { socket }
    }

    /// Sends one notification: newline-separated `KEY=value` assignments.
    pub fn send(&self, assignments: &str) {
        if let Some(socket) = &self.socket {
            let _ = socket.send(assignments.as_bytes());
        }
    }

    /// `RELOADING=1` with the monotonic time, as `Type=notify-reload` wants it.
    pub fn reloading(&self, status: &str) {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}"));
    }
}
