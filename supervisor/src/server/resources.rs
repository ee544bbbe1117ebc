//! Resources the supervisor opens: listening sockets, the command socket, private files.

use super::*;

pub(super) fn bind_listener(address: &str) -> Result<OwnedFd, StartError> {
    let bind_error = |source| StartError::Bind {
        address: address.to_string(),
        source,
    };
    let addr: std::net::SocketAddr = address.parse().map_err(|_| bind_error(nix::Error::EINVAL))?;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(bind_error)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(bind_error)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(bind_error)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(bind_error)?;
    }
    let storage = SockaddrStorage::from(addr);
    socket::bind(fd.as_raw_fd(), &storage).map_err(bind_error)?;
    socket::listen(&fd, socket::Backlog::new(1024).unwrap_or(socket::Backlog::MAXCONN)).map_err(bind_error)?;
    Ok(fd)
}

/// Creates the command socket with mode 0600 from the first instant (umask during bind). With
/// an access policy file, other users must be able to connect (the policy decides what they
/// may do), so the socket is then made 0666 once bound.
pub(super) fn command_socket(path: &Path, open_to_all: bool) -> Result<UnixListener, StartError> {
    let err = |source| StartError::CommandSocket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(err)?;
    if open_to_all {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    }
    Ok(listener)
}

/// Writes a file only its owner can read (a saved state holds private keys).
pub(super) fn write_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Steers new connections of a listener's SO_REUSEPORT group to the sockets of running workers
/// only: a classic BPF program that picks `live[hash % live.len()]` by the connection's hash,
/// attached to the group (through any of its sockets). The group's sockets are in slot order,
/// as they were bound. With no running worker the kernel's own hash applies.
pub(super) fn steer(fd: &OwnedFd, live: &[u32]) -> io::Result<()> {
    // struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
    const LD_W_ABS: u16 = 0x20;
    const ALU_MOD_K: u16 = 0x94;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SKF_AD_RXHASH: u32 = 0xffff_f000 + 32;
    let mut program = vec![libc::sock_filter {
        code: LD_W_ABS,
        jt: 0,
        jf: 0,
        k: SKF_AD_RXHASH,
    }];
    if live.is_empty() || live.len() > 255 {
        // An index past the group makes the kernel fall back to its hash.
        program = vec![libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        }];
    } else {
        program.push(libc::sock_filter {
            code: ALU_MOD_K,
            jt: 0,
            jf: 0,
            k: live.len() as u32,
        });
        for (i, slot) in live.iter().enumerate() {
            // if A == i: return slot (the next instruction), else skip it.
            program.push(libc::sock_filter {
                code: JEQ_K,
                jt: 0,
                jf: 1,
                k: i as u32,
            });
            program.push(libc::sock_filter {
                code: RET_K,
                jt: 0,
                jf: 0,
                k: *slot,
            });
        }
        program.push(libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: live.first().copied().unwrap_or(0),
        });
    }
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the program outlives the call, which copies it into the kernel; `fprog` is the
    // struct SO_ATTACH_REUSEPORT_CBPF reads.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Supervisor {
    /// Re-steers every listener to the workers running now (after a worker started or ended).
    pub(super) fn steer_listeners(&mut self) {
        let live: Vec<u32> = self
            .workers
            .iter()
            .filter(|w| !w.keyring && w.run_state == RunState::Running)
            .map(|w| w.id)
            .collect();
        let mut failed = Vec::new();
        for (address, fds) in &self.listeners {
            if let Some(fd) = fds.first()
                && let Err(e) = steer(fd, &live)
            {
                failed.push(format!("{address}: {e}"));
            }
        }
        if !failed.is_empty() {
            self.log.warn(&format!(
                "new connections could not be steered away from stopped workers: {}",
                failed.join("; ")
            ));
        }
    }
}
