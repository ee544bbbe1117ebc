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
