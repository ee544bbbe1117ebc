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

// ---------------------------------------------------------------------------------------------
// One instance per listener address
//
// Every listening socket is SO_REUSEPORT (one per worker slot), so the kernel lets a second
// supervisor of the same uid bind the same address, and then splits the traffic between the
// two without a word. After binding, the supervisor therefore looks at what the kernel says
// listens on that port (/proc/net/tcp or tcp6, which every process may read) and refuses an
// address on which a socket other than its own listens: the kernel's own table, so a crashed
// owner (whose sockets closed with it) never blocks a restart, whatever state directory either
// instance uses, and a process that shares the port from outside rampart is seen too. The pid
// and the command socket of the other instance are then looked up in /proc/<pid>/fd and
// /proc/net/unix, which needs the right to inspect that process (root, or the same uid) and
// is done before the supervisor narrows itself. Only addresses of the same family are
// compared: an IPv6 socket on `[::]` may or may not take IPv4 traffic (IPV6_V6ONLY), which
// /proc does not say.

/// How long start waits for another process's socket on a listener address to close before
/// refusing it: the workers of a supervisor killed a moment ago hold their copies of its
/// sockets until their PDEATHSIG ends them.
pub(super) const CRASHED_OWNER_GRACE: Duration = Duration::from_secs(1);

/// A listening TCP socket as /proc/net/tcp(6) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcListener {
    local: std::net::SocketAddr,
    uid: u32,
    inode: u64,
}

/// Parses an address of /proc/net/tcp(6): `0100007F:1F90` (the IPv4 address as the host-order
/// hex of its network-order bytes) or 32 hex digits for IPv6 (four such words).
fn parse_proc_address(text: &str) -> Option<std::net::SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// One line of /proc/net/tcp(6), when it is a listening socket.
fn parse_proc_tcp_line(line: &str) -> Option<ProcListener> {
    const TCP_LISTEN: u8 = 0x0A;
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = parse_proc_address(fields.next()?)?;
    let _remote = fields.next()?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, then uid; timeout, then inode.
    let uid = fields.nth(3)?.parse().ok()?;
    let inode = fields.nth(1)?.parse().ok()?;
    (state == TCP_LISTEN).then_some(ProcListener { local, uid, inode })
}

/// Whether a socket listening on `a` takes connections meant for `b` (same port assumed).
fn overlaps(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// Listening sockets on `addr`'s port whose address overlaps it and whose inode is not in
/// `own`.
fn foreign_listeners(addr: std::net::SocketAddr, own: &BTreeSet<u64>) -> io::Result<Vec<ProcListener>> {
    use std::io::BufRead;
    let table = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let file = std::fs::File::open(table)?;
    let mut found = Vec::new();
    for line in io::BufReader::new(file).lines().skip(1) {
        let Some(l) = parse_proc_tcp_line(&line?) else { continue };
        if l.local.port() == addr.port() && l.inode != 0 && !own.contains(&l.inode) && overlaps(l.local.ip(), addr.ip())
        {
            found.push(l);
        }
    }
    Ok(found)
}

/// A process that holds a socket, from /proc.
#[derive(Debug)]
struct Holder {
    pid: i32,
    ppid: i32,
    /// Its command line, spaces between the arguments (or its `comm`).
    command: String,
    /// Inodes of every socket it holds.
    sockets: Vec<u64>,
}

fn read_holder(pid: i32, target: &str) -> Option<Holder> {
    let mut holds = false;
    let mut sockets = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        holds |= link == target;
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse().ok())
        {
            sockets.push(inode);
        }
    }
    if !holds {
        return None;
    }
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after the last `)`.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut command: String = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(300)
        .collect();
    if command.is_empty() {
        command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_string();
    }
    Some(Holder {
        pid,
        ppid,
        command,
        sockets,
    })
}

/// Paths of the listening unix sockets by inode (/proc/net/unix): a supervisor's command socket.
fn listening_unix_sockets() -> BTreeMap<u64, String> {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let inode = fields.get(6)?.parse().ok()?;
            let path = fields.get(7)?;
            (flags & SO_ACCEPTCON != 0).then(|| (inode, path.to_string()))
        })
        .collect()
}

/// Who holds the listening socket `l`, in words: the process that holds it and whose parent
/// does not (the supervisor, not one of its workers), with its command socket when it has one.
fn describe_holder(l: &ProcListener) -> String {
    let target = format!("socket:[{}]", l.inode);
    let me = std::process::id() as i32;
    let holders: Vec<Holder> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| pid != me)
                .filter_map(|pid| read_holder(pid, &target))
                .collect()
        })
        .unwrap_or_default();
    let owner = holders
        .iter()
        .find(|h| !holders.iter().any(|o| o.pid == h.ppid))
        .or(holders.first());
    let Some(owner) = owner else {
        return format!(
            "a process of uid {} (its pid cannot be read from here; `ss -ltnp 'sport = :{}'` run as root names it)",
            l.uid,
            l.local.port()
        );
    };
    let unix = listening_unix_sockets();
    let sockets: Vec<&str> = owner
        .sockets
        .iter()
        .filter_map(|inode| unix.get(inode).map(String::as_str))
        .collect();
    let mut text = format!("pid {} (`{}`", owner.pid, owner.command);
    if !sockets.is_empty() {
        text.push_str(&format!(", command socket {}", sockets.join(", ")));
    }
    text.push(')');
    text
}

/// The inodes of sockets, as /proc/net/tcp names them.
pub(super) fn socket_inodes<'a>(fds: impl IntoIterator<Item = &'a OwnedFd>) -> BTreeSet<u64> {
    fds.into_iter()
        .filter_map(|fd| nix::sys::stat::fstat(fd).ok())
        .map(|st| st.st_ino)
        .collect()
}

/// Refuses `address` when a process other than this supervisor listens on it (or on an
/// address that overlaps it: the same port on the wildcard address, or the reverse). `own`:
/// the inodes of every listening socket this supervisor holds ([`socket_inodes`]). A foreign
/// socket is looked for again for up to `patience` before the refusal.
pub(super) fn ensure_sole_listener(address: &str, own: &BTreeSet<u64>, patience: Duration) -> Result<(), StartError> {
    let Ok(addr) = address.parse::<std::net::SocketAddr>() else {
        // bind_listener refused it already.
        return Ok(());
    };
    let deadline = Instant::now() + patience;
    loop {
        let found = foreign_listeners(addr, own).map_err(|source| StartError::ListenerCheck {
            address: address.to_string(),
            source,
        })?;
        let Some(first) = found.first() else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(StartError::ListenerTaken {
                address: address.to_string(),
                local: first.local.to_string(),
                holder: describe_holder(first),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_are_read_as_the_kernel_writes_them() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 658 1 0000000091ad8ba7 100 0 0 10 0";
        assert_eq!(
            parse_proc_tcp_line(v4),
            Some(ProcListener {
                local: "127.0.0.1:8080".parse().unwrap(),
                uid: 1000,
                inode: 658,
            })
        );
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_proc_tcp_line(&established), None);
        let v6 = "   1: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_proc_tcp_line(v6).map(|l| l.local),
            Some("[::1]:443".parse().unwrap())
        );
        for bad in [
            "",
            "  sl  local_address",
            "0: zz:1F90 0 0A",
            "0: 0100007F:1F90 0 0A 0 0 0 x 0 1",
        ] {
            assert_eq!(parse_proc_tcp_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_wildcard_address_overlaps_every_address_of_its_port() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(overlaps(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(overlaps(ip("127.0.0.1"), ip("0.0.0.0")));
        assert!(overlaps(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(!overlaps(ip("127.0.0.1"), ip("127.0.0.2")));
        assert!(overlaps(ip("::"), ip("::1")));
    }

    #[test]
    fn a_listening_socket_that_is_not_ours_is_found() {
        let theirs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = theirs.local_addr().unwrap();
        let inode = nix::sys::stat::fstat(&theirs).unwrap().st_ino;
        let found = foreign_listeners(addr, &BTreeSet::new()).unwrap();
        assert_eq!(found.iter().map(|l| l.inode).collect::<Vec<_>>(), [inode]);
        assert!(foreign_listeners(addr, &BTreeSet::from([inode])).unwrap().is_empty());
        let wildcard = std::net::SocketAddr::new("0.0.0.0".parse().unwrap(), addr.port());
        assert_eq!(foreign_listeners(wildcard, &BTreeSet::new()).unwrap().len(), 1);
    }
}
