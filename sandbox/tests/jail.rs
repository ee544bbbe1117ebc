//! The jail holds: every forbidden operation kills (SIGSYS) or is refused (EACCES), every
//! argument-filtered rule lets its allowed value through and kills each mutation, and what a
//! proxy needs still works inside.
//!
//! Each case runs in its own child process (this same binary, `--probe NAME`), started with an
//! empty environment and the channel as fd 3, which enters the full jail before doing its one
//! thing. The parent checks how the child ended. Runs without the libtest harness so that the
//! children are plain processes and the summary line is ours.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use rampart_command::channel::Channel;
use rampart_command::proto::{
    self, SupervisorToWorker, WorkerToSupervisor, supervisor_to_worker as from_supervisor,
    worker_to_supervisor as to_supervisor,
};
use rampart_policy::profile::{Compare, Layers, Profile, Value};
use rampart_sandbox::{Jail, JailReport, JailSetup, LandlockStatus};

const CHANNEL_FD: i32 = 3;
/// Stands for the child's own pid in argument vectors (replaced by the child).
const OWN_PID: u64 = 0x7ead_0001;
/// Stands for the parent's pid.
const PARENT_PID: u64 = 0x7ead_0002;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

// ------------------------------------------------------------------------------------------
// Child side

struct ChildArgs {
    probe: String,
    allowed_port: u16,
    landlock_only: bool,
    lock_memory: bool,
    parent: u64,
    syscall_args: Vec<u64>,
}

fn parse_child_args(args: &[String]) -> ChildArgs {
    let mut out = ChildArgs {
        probe: String::new(),
        allowed_port: 0,
        landlock_only: false,
        lock_memory: false,
        parent: 0,
        syscall_args: vec![],
    };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--probe" => out.probe = args[i + 1].clone(),
            "--port" => out.allowed_port = args[i + 1].parse().unwrap(),
            "--parent" => out.parent = args[i + 1].parse().unwrap(),
            "--landlock-only" => {
                out.landlock_only = true;
                i += 1;
                continue;
            }
            "--lock-memory" => {
                out.lock_memory = true;
                i += 1;
                continue;
            }
            "--args" => out.syscall_args = args[i + 1].split(',').map(|a| a.parse().unwrap()).collect(),
            _ => {}
        }
        i += 2;
    }
    out
}

fn test_profile(allowed_port: u16, landlock_only: bool) -> Profile {
    let config = rampart_command::config::Config::parse(
        &format!("[clusters.t]\nbackends = [ {{ address = \"127.0.0.1:{allowed_port}\" }} ]\n"),
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    let mut profile = Profile::worker(&config, Default::default());
    profile.landlock.required = true;
    if landlock_only {
        profile.layers = Layers {
            privileges: true,
            landlock: true,
            seccomp: false,
        };
    }
    profile
}

fn raw(nr: libc::c_long, a: [u64; 6]) -> (i64, i32) {
    // SAFETY: probes make arbitrary system calls on purpose; the jail is what is being tested,
    // and a surviving call only touches this throwaway process.
    let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    (rc, if rc < 0 { nix::errno::Errno::last_raw() } else { 0 })
}

fn cstr(s: &str) -> u64 {
    // Leaked on purpose: the pointer must outlive the system call in a process that exits next.
    std::ffi::CString::new(s).unwrap().into_raw() as u64
}

fn leak<T>(value: T) -> u64 {
    Box::leak(Box::new(value)) as *const T as u64
}

fn child_main(args: ChildArgs) -> ! {
    rampart_sandbox::install_panic_hook("jail probe: panic\n");
    // SAFETY: fd 3 was placed there by the parent for this process alone.
    let channel = Channel::from(unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) });
    let profile = test_profile(args.allowed_port, args.landlock_only);
    if args.lock_memory {
        // What the keyring does before its jail.
        rampart_sandbox::lock_memory(16 << 20);
    }
    let mut poll = None;
    let mut prewarm = || {
        poll = Some(mio::Poll::new().map_err(|e| e.to_string())?);
        // BoringSSL's one-time initialisation needs system calls the jail forbids.
        boring::ssl::SslContext::builder(boring::ssl::SslMethod::tls()).map_err(|e| e.to_string())?;
        Ok(())
    };
    let report = match Jail::enter(
        &profile,
        JailSetup {
            keep_fds: &[CHANNEL_FD],
            prewarm: &mut prewarm,
        },
    ) {
        Ok(r) => r,
        Err(e) => {
            println!("jail error: {e}");
            std::process::exit(90);
        }
    };
    let Some(poll) = poll else { std::process::exit(91) };
    let outcome = run_probe(&args, &channel, poll, report);
    println!("{outcome}");
    std::io::stdout().flush().ok();
    std::process::exit(0);
}

/// The forbidden operations, each made directly with syscall(2).
fn forbidden_call(name: &str, parent: u64) -> Option<(i64, i32)> {
    use libc::*;
    let stream = (SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC) as u64;
    Some(match name {
        #[cfg(target_arch = "x86_64")]
        "open" => raw(SYS_open, [cstr("/etc/passwd"), O_RDONLY as u64, 0, 0, 0, 0]),
        "openat" => raw(
            SYS_openat,
            [AT_FDCWD as u64, cstr("/etc/passwd"), O_RDONLY as u64, 0, 0, 0],
        ),
        #[cfg(target_arch = "x86_64")]
        "stat" => raw(SYS_stat, [cstr("/etc/passwd"), leak([0u8; 256]), 0, 0, 0, 0]),
        "newfstatat" => raw(
            SYS_newfstatat,
            [AT_FDCWD as u64, cstr("/etc/passwd"), leak([0u8; 256]), 0, 0, 0],
        ),
        "proc_self_maps" => raw(
            SYS_openat,
            [AT_FDCWD as u64, cstr("/proc/self/maps"), O_RDONLY as u64, 0, 0, 0],
        ),
        "execve" => raw(SYS_execve, [cstr("/bin/true"), 0, 0, 0, 0, 0]),
        "execveat" => raw(SYS_execveat, [AT_FDCWD as u64, cstr("/bin/true"), 0, 0, 0, 0]),
        #[cfg(target_arch = "x86_64")]
        "fork" => raw(SYS_fork, [0; 6]),
        #[cfg(target_arch = "x86_64")]
        "vfork" => raw(SYS_vfork, [0; 6]),
        "clone" => raw(SYS_clone, [SIGCHLD as u64, 0, 0, 0, 0, 0]),
        "clone3" => raw(SYS_clone3, [leak([0u64; 11]), 88, 0, 0, 0, 0]),
        "socket_unix" => raw(SYS_socket, [AF_UNIX as u64, stream, 0, 0, 0, 0]),
        "socket_netlink" => raw(
            SYS_socket,
            [
                AF_NETLINK as u64,
                (SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC) as u64,
                0,
                0,
                0,
                0,
            ],
        ),
        "socket_packet" => raw(
            SYS_socket,
            [
                AF_PACKET as u64,
                (SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC) as u64,
                0,
                0,
                0,
                0,
            ],
        ),
        "socket_udp" => raw(
            SYS_socket,
            [
                AF_INET as u64,
                (SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC) as u64,
                0,
                0,
                0,
                0,
            ],
        ),
        "socket_raw" => raw(
            SYS_socket,
            [
                AF_INET as u64,
                (SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC) as u64,
                IPPROTO_TCP as u64,
                0,
                0,
                0,
            ],
        ),
        "socket_blocking_tcp" => raw(
            SYS_socket,
            [AF_INET as u64, (SOCK_STREAM | SOCK_CLOEXEC) as u64, 0, 0, 0, 0],
        ),
        "socketpair" => raw(
            SYS_socketpair,
            [AF_UNIX as u64, SOCK_STREAM as u64, 0, leak([0i32; 2]), 0, 0],
        ),
        "bind" => raw(SYS_bind, [CHANNEL_FD as u64, 0, 0, 0, 0, 0]),
        "listen" => raw(SYS_listen, [CHANNEL_FD as u64, 1, 0, 0, 0, 0]),
        "kill_parent" => raw(SYS_kill, [parent, SIGTERM as u64, 0, 0, 0, 0]),
        "tgkill_other" => raw(SYS_tgkill, [parent, parent, SIGTERM as u64, 0, 0, 0]),
        "ptrace_attach" => raw(SYS_ptrace, [PTRACE_ATTACH as u64, parent, 0, 0, 0, 0]),
        "process_vm_readv" => raw(SYS_process_vm_readv, [parent, 0, 0, 0, 0, 0]),
        "mmap_exec" => raw(
            SYS_mmap,
            [
                0,
                4096,
                (PROT_READ | PROT_EXEC) as u64,
                (MAP_PRIVATE | MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        ),
        "mprotect_exec" => {
            let buffer = Box::leak(vec![0u8; 8192].into_boxed_slice());
            let page = ((buffer.as_ptr() as u64) + 4095) & !4095;
            raw(SYS_mprotect, [page, 4096, (PROT_READ | PROT_EXEC) as u64, 0, 0, 0])
        }
        "memfd_create" => raw(SYS_memfd_create, [cstr("x"), 0, 0, 0, 0, 0]),
        "setuid_0" => raw(SYS_setuid, [0; 6]),
        "capset" => raw(SYS_capset, [leak([0x2008_0522u32, 0]), leak([u32::MAX; 6]), 0, 0, 0, 0]),
        "prctl_dumpable" => raw(SYS_prctl, [PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0]),
        "unshare_user" => raw(SYS_unshare, [CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]),
        "setns" => raw(SYS_setns, [0, 0, 0, 0, 0, 0]),
        "mount" => raw(SYS_mount, [cstr("none"), cstr("/tmp"), cstr("tmpfs"), 0, 0, 0]),
        "chroot" => raw(SYS_chroot, [cstr("/"), 0, 0, 0, 0, 0]),
        "io_uring_setup" => raw(SYS_io_uring_setup, [8, leak([0u8; 120]), 0, 0, 0, 0]),
        "bpf" => raw(SYS_bpf, [0, 0, 0, 0, 0, 0]),
        "perf_event_open" => raw(SYS_perf_event_open, [leak([0u8; 128]), 0, u64::MAX, u64::MAX, 0, 0]),
        "userfaultfd" => raw(SYS_userfaultfd, [0; 6]),
        "keyctl" => raw(SYS_keyctl, [0, 0, 0, 0, 0, 0]),
        "seccomp_new_filter" => {
            // A filter that allows everything: installing it must itself be impossible.
            let filter: &'static [sock_filter] = Box::leak(Box::new([sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0x7fff_0000,
            }]));
            let fprog = sock_fprog {
                len: 1,
                filter: filter.as_ptr() as *mut sock_filter,
            };
            raw(SYS_seccomp, [1, 0, leak(fprog), 0, 0, 0])
        }
        "prctl_seccomp" => raw(SYS_prctl, [PR_SET_SECCOMP as u64, 2, 0, 0, 0, 0]),
        _ => return None,
    })
}

const FORBIDDEN: &[&str] = &[
    #[cfg(target_arch = "x86_64")]
    "open",
    "openat",
    #[cfg(target_arch = "x86_64")]
    "stat",
    "newfstatat",
    "proc_self_maps",
    "execve",
    "execveat",
    #[cfg(target_arch = "x86_64")]
    "fork",
    #[cfg(target_arch = "x86_64")]
    "vfork",
    "clone",
    "clone3",
    "socket_unix",
    "socket_netlink",
    "socket_packet",
    "socket_udp",
    "socket_raw",
    "socket_blocking_tcp",
    "socketpair",
    "bind",
    "listen",
    "kill_parent",
    "tgkill_other",
    "ptrace_attach",
    "process_vm_readv",
    "mmap_exec",
    "mprotect_exec",
    "memfd_create",
    "setuid_0",
    "capset",
    "prctl_dumpable",
    "unshare_user",
    "setns",
    "mount",
    "chroot",
    "io_uring_setup",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "seccomp_new_filter",
    "prctl_seccomp",
];

fn wait_for(poll: &mut mio::Poll, events: &mut mio::Events) {
    poll.poll(events, Some(Duration::from_secs(5))).unwrap();
}

fn run_probe(args: &ChildArgs, channel: &Channel, mut poll: mio::Poll, report: JailReport) -> String {
    use mio::{Events, Interest, Token};
    if let Some((rc, errno)) = forbidden_call(&args.probe, args.parent) {
        return format!("survived rc={rc} errno={errno}");
    }
    let mut events = Events::with_capacity(16);
    match args.probe.as_str() {
        "mutate" => {
            let mut a = [0u64; 6];
            for (i, v) in args.syscall_args.iter().enumerate().skip(1) {
                a[i - 1] = match *v {
                    OWN_PID => u64::from(std::process::id()),
                    PARENT_PID => args.parent,
                    v => v,
                };
            }
            let (rc, errno) = raw(args.syscall_args[0] as libc::c_long, a);
            format!("survived rc={rc} errno={errno}")
        }
        "report" => {
            let text = serde_json::to_string(&report).unwrap();
            let line = proto::LogLine {
                level: 0,
                target: "report".into(),
                message: text,
            };
            channel
                .send(
                    &WorkerToSupervisor {
                        kind: Some(to_supervisor::Kind::Log(line)),
                    },
                    &[],
                )
                .unwrap();
            // Stay alive until the parent has inspected us from outside.
            let _ = channel.recv::<SupervisorToWorker>();
            "ok".into()
        }
        "landlock_bind" | "landlock_connect_denied" | "landlock_connect_allowed" | "landlock_open" => {
            let sock = raw(
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
                    0,
                    0,
                    0,
                    0,
                ],
            )
            .0;
            let port = match args.probe.as_str() {
                "landlock_connect_allowed" => args.allowed_port,
                _ => args.allowed_port.wrapping_add(1),
            };
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                },
                sin_zero: [0; 8],
            };
            let addr_ptr = &addr as *const _ as u64;
            let len = std::mem::size_of::<libc::sockaddr_in>() as u64;
            let (rc, errno) = match args.probe.as_str() {
                "landlock_bind" => raw(libc::SYS_bind, [sock as u64, addr_ptr, len, 0, 0, 0]),
                "landlock_open" => raw(
                    libc::SYS_openat,
                    [
                        libc::AT_FDCWD as u64,
                        cstr("/etc/hostname"),
                        libc::O_RDONLY as u64,
                        0,
                        0,
                        0,
                    ],
                ),
                _ => raw(libc::SYS_connect, [sock as u64, addr_ptr, len, 0, 0, 0]),
            };
            format!("rc={rc} errno={errno}")
        }
        "alloc_64m" => {
            let mut v = vec![0u8; 64 << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = (i % 251) as u8;
            }
            let sum: u64 = v.iter().step_by(4096).map(|b| u64::from(*b)).sum();
            format!("ok {sum}")
        }
        "hashmap" => {
            let mut m = std::collections::HashMap::new();
            for i in 0..10_000u32 {
                m.insert(format!("key{i}"), i);
            }
            format!("ok {}", m.len())
        }
        "panic" => {
            let v: Vec<u8> = Vec::new();
            let i = std::hint::black_box(3usize);
            format!("{}", v[i])
        }
        "relay" => {
            let received = channel.recv::<SupervisorToWorker>().unwrap().unwrap();
            let listener_fd = received.fds.into_iter().next().unwrap();
            let mut listener = mio::net::TcpListener::from_std(TcpListener::from(listener_fd));
            poll.registry()
                .register(&mut listener, Token(0), Interest::READABLE)
                .unwrap();
            let mut client = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_for(&mut poll, &mut events),
                    Err(e) => return format!("accept failed: {e}"),
                }
            };
            client.set_nodelay(true).unwrap();
            poll.registry()
                .register(&mut client, Token(1), Interest::READABLE | Interest::WRITABLE)
                .unwrap();
            let backend_addr = format!("127.0.0.1:{}", args.allowed_port).parse().unwrap();
            let mut backend = mio::net::TcpStream::connect(backend_addr).unwrap();
            poll.registry()
                .register(&mut backend, Token(2), Interest::READABLE | Interest::WRITABLE)
                .unwrap();
            // Relay until the backend has answered and closed.
            let (mut to_backend, mut to_client) = (Vec::new(), Vec::new());
            let (mut client_open, mut backend_open) = (true, true);
            let mut buf = [0u8; 4096];
            loop {
                wait_for(&mut poll, &mut events);
                if client_open {
                    match client.read(&mut buf) {
                        Ok(0) => client_open = false,
                        Ok(n) => to_backend.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                }
                if backend_open {
                    match backend.read(&mut buf) {
                        Ok(0) => backend_open = false,
                        Ok(n) => to_client.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                }
                if !to_backend.is_empty()
                    && matches!(backend.take_error(), Ok(None))
                    && let Ok(n) = backend.write(&to_backend)
                {
                    to_backend.drain(..n);
                }
                if !to_client.is_empty()
                    && let Ok(n) = client.write(&to_client)
                {
                    to_client.drain(..n);
                }
                if !backend_open && to_client.is_empty() {
                    break;
                }
            }
            "ok".into()
        }
        "tls" => {
            // The certificate arrives as a configuration order, the listener as a handoff.
            let order = channel.recv::<SupervisorToWorker>().unwrap().unwrap();
            let Some(from_supervisor::Kind::Order(proto::WorkerOrder {
                request:
                    Some(proto::Request {
                        kind: Some(proto::request::Kind::AddCertificate(cert)),
                        ..
                    }),
                ..
            })) = order.message.kind
            else {
                return "expected a certificate".into();
            };
            let received = channel.recv::<SupervisorToWorker>().unwrap().unwrap();
            let mut listener =
                mio::net::TcpListener::from_std(TcpListener::from(received.fds.into_iter().next().unwrap()));
            let mut acceptor =
                boring::ssl::SslAcceptor::mozilla_intermediate_v5(boring::ssl::SslMethod::tls()).unwrap();
            acceptor
                .set_certificate(&boring::x509::X509::from_pem(cert.certificate.as_bytes()).unwrap())
                .unwrap();
            acceptor
                .set_private_key(&boring::pkey::PKey::private_key_from_pem(cert.key.as_bytes()).unwrap())
                .unwrap();
            let acceptor = acceptor.build();
            poll.registry()
                .register(&mut listener, Token(0), Interest::READABLE)
                .unwrap();
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) => wait_for(&mut poll, &mut events),
                }
            };
            poll.registry()
                .register(&mut stream, Token(1), Interest::READABLE | Interest::WRITABLE)
                .unwrap();
            let mut handshake = acceptor.accept(stream);
            let mut tls = loop {
                match handshake {
                    Ok(s) => break s,
                    Err(boring::ssl::HandshakeError::WouldBlock(mid)) => {
                        wait_for(&mut poll, &mut events);
                        handshake = mid.handshake();
                    }
                    Err(e) => return format!("handshake failed: {e}"),
                }
            };
            let mut buf = [0u8; 4];
            let mut got = 0;
            while got < 4 {
                match tls.read(&mut buf[got..]) {
                    Ok(n) => got += n,
                    Err(_) => wait_for(&mut poll, &mut events),
                }
            }
            let mut sent = 0;
            while sent < 4 {
                match tls.write(&b"pong"[sent..]) {
                    Ok(n) => sent += n,
                    Err(_) => wait_for(&mut poll, &mut events),
                }
            }
            let _ = tls.shutdown();
            format!("ok {}", String::from_utf8_lossy(&buf))
        }
        other => format!("unknown probe {other}"),
    }
}

// ------------------------------------------------------------------------------------------
// Parent side

struct Probe {
    child: std::process::Child,
    channel: Channel,
}

fn spawn(probe: &str, allowed_port: u16, extra: &[String]) -> Probe {
    let (parent_end, child_end) = Channel::pair().unwrap();
    let child_raw = child_end.as_raw_fd();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--probe",
            probe,
            "--port",
            &allowed_port.to_string(),
            "--parent",
            &std::process::id().to_string(),
        ])
        .args(extra)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe; they place the channel at fd 3 (without
    // close-on-exec) in the child only.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(child_raw, CHANNEL_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    drop(child_end);
    Probe {
        child,
        channel: parent_end,
    }
}

struct Outcome {
    signal: Option<i32>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn finish(probe: Probe) -> Outcome {
    drop(probe.channel);
    let out = probe.child.wait_with_output().unwrap();
    Outcome {
        signal: out.status.signal(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

fn run(probe: &str, port: u16, extra: &[String]) -> Outcome {
    finish(spawn(probe, port, extra))
}

fn describe(o: &Outcome) -> String {
    format!(
        "signal {:?} code {:?} stdout {:?} stderr {:?}",
        o.signal, o.code, o.stdout, o.stderr
    )
}

type TestFn = fn(u16) -> Result<(), String>;

fn expect_sigsys(name: &str, port: u16) -> Result<(), String> {
    let o = run(name, port, &[]);
    if o.signal == Some(libc::SIGSYS) {
        Ok(())
    } else {
        Err(format!("{name}: expected SIGSYS, got {}", describe(&o)))
    }
}

fn expect_stdout(o: &Outcome, prefix: &str) -> Result<(), String> {
    if o.code == Some(0) && o.stdout.starts_with(prefix) {
        Ok(())
    } else {
        Err(format!("expected `{prefix}...`, got {}", describe(o)))
    }
}

fn landlock_alone(port: u16) -> Result<(), String> {
    let backend = TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let ll = ["--landlock-only".to_string()];
    let eacces = format!("rc=-1 errno={}", libc::EACCES);
    expect_stdout(&run("landlock_bind", port, &ll), &eacces).map_err(|e| format!("bind: {e}"))?;
    expect_stdout(&run("landlock_connect_denied", port, &ll), &eacces)
        .map_err(|e| format!("connect to another port: {e}"))?;
    expect_stdout(&run("landlock_open", port, &ll), &eacces).map_err(|e| format!("open: {e}"))?;
    expect_stdout(&run("landlock_connect_allowed", port, &ll), "rc=0 errno=0")
        .map_err(|e| format!("connect to the backend port: {e}"))?;
    drop(backend);
    Ok(())
}

fn works_alloc(port: u16) -> Result<(), String> {
    expect_stdout(&run("alloc_64m", port, &[]), "ok")
}

/// A process that locked its memory as the keyring does can still allocate once jailed (with
/// mlockall(MCL_FUTURE) and a memlock limit it could not raise, it could not).
fn works_alloc_locked(port: u16) -> Result<(), String> {
    expect_stdout(&run("alloc_64m", port, &["--lock-memory".to_string()]), "ok")
}

fn works_hashmap(port: u16) -> Result<(), String> {
    expect_stdout(&run("hashmap", port, &[]), "ok 10000")
}

fn panic_is_sigabrt(port: u16) -> Result<(), String> {
    let o = run("panic", port, &[]);
    if o.signal == Some(libc::SIGABRT) && o.stderr.contains("jail probe: panic") {
        Ok(())
    } else {
        Err(format!(
            "expected SIGABRT after the panic message, got {}",
            describe(&o)
        ))
    }
}

fn relays_tcp_through_a_received_listener(port: u16) -> Result<(), String> {
    let backend = TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let front_addr = front.local_addr().unwrap();
    let probe = spawn("relay", port, &[]);
    let handoff = SupervisorToWorker {
        kind: Some(from_supervisor::Kind::Listener(proto::ListenerHandoff {
            address: front_addr.to_string(),
            protocol: proto::Protocol::Tcp as i32,
        })),
    };
    front.set_nonblocking(true).unwrap();
    probe.channel.send(&handoff, &[front.as_fd()]).unwrap();
    drop(front);
    let server = std::thread::spawn(move || {
        let (mut s, _) = backend.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf.to_ascii_uppercase()).unwrap();
    });
    let mut client = TcpStream::connect(front_addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"hello").unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    server.join().unwrap();
    let o = finish(probe);
    if answer != "HELLO" {
        return Err(format!("relayed {answer:?}; child {}", describe(&o)));
    }
    expect_stdout(&o, "ok")
}

fn self_signed() -> (String, String) {
    use boring::{asn1::Asn1Time, bn::BigNum, ec, hash::MessageDigest, nid::Nid, pkey::PKey, x509};
    let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
    let mut name = x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "localhost").unwrap();
    let name = name.build();
    let mut b = x509::X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
    b.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = b.build();
    (
        String::from_utf8(cert.to_pem().unwrap()).unwrap(),
        String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
    )
}

fn tls_handshake_from_channel_bytes(port: u16) -> Result<(), String> {
    let (cert, key) = self_signed();
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = front.local_addr().unwrap();
    front.set_nonblocking(true).unwrap();
    let probe = spawn("tls", port, &[]);
    let certificate = proto::Certificate {
        address: addr.to_string(),
        certificate: cert,
        chain: vec![],
        key,
        names: vec![],
    };
    let order = SupervisorToWorker {
        kind: Some(from_supervisor::Kind::Order(proto::WorkerOrder {
            sequence: 1,
            request: Some(proto::Request {
                id: "cert".into(),
                kind: Some(proto::request::Kind::AddCertificate(certificate)),
            }),
            chunk: Vec::new(),
            more: false,
        })),
    };
    probe.channel.send(&order, &[]).unwrap();
    let handoff = SupervisorToWorker {
        kind: Some(from_supervisor::Kind::Listener(proto::ListenerHandoff {
            address: addr.to_string(),
            protocol: proto::Protocol::Https as i32,
        })),
    };
    probe.channel.send(&handoff, &[front.as_fd()]).unwrap();
    drop(front);
    let mut connector = boring::ssl::SslConnector::builder(boring::ssl::SslMethod::tls()).unwrap();
    connector.set_verify(boring::ssl::SslVerifyMode::NONE);
    let connector = connector.build();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = connector
        .connect("localhost", tcp)
        .map_err(|e| format!("client handshake: {e}"))?;
    tls.write_all(b"ping").unwrap();
    let mut answer = [0u8; 4];
    tls.read_exact(&mut answer).map_err(|e| e.to_string())?;
    let o = finish(probe);
    if &answer != b"pong" {
        return Err(format!("answer {answer:?}; {}", describe(&o)));
    }
    expect_stdout(&o, "ok ping")
}

fn check_report(report: &JailReport, pid: i32) -> Result<(), String> {
    if report.landlock_status != LandlockStatus::FullyEnforced {
        return Err(format!(
            "landlock {:?} (ABI {})",
            report.landlock_status, report.landlock_abi
        ));
    }
    if !report.no_new_privs || report.dumpable || report.seccomp_mode != "filter (kill_process)" {
        return Err(format!("flags wrong in {report:?}"));
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    let expect = rampart_sandbox::inspect::Expectation {
        uid: is_root().then_some(nobody.uid.as_raw()),
        gid: is_root().then_some(nogroup.gid.as_raw()),
        // stdin, stdout, stderr, the channel, the epoll descriptor.
        max_fds: Some(5),
        allow_bounding: !is_root(),
        skip_private: false,
    };
    if is_root() {
        if let Err(v) = rampart_sandbox::inspect::verify_jailed(pid, &expect) {
            return Err(format!(
                "outside view: {}",
                v.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ")
            ));
        }
    } else {
        // A non-dumpable process's /proc/<pid>/fd and environ are readable by root only.
        println!("    skipped (needs root): the outside view of /proc/{pid} of a non-dumpable process");
    }
    if is_root() {
        if !report.privileged_start || report.uid != nobody.uid.as_raw() || report.gid != nogroup.gid.as_raw() {
            return Err(format!("uid not switched: {report:?}"));
        }
        let sets = [
            ("effective", report.cap_effective),
            ("permitted", report.cap_permitted),
            ("inheritable", report.cap_inheritable),
            ("bounding", report.cap_bounding),
            ("ambient", report.cap_ambient),
        ];
        for (set, mask) in sets {
            if mask != 0 {
                return Err(format!("{set} capabilities left: {mask:x}"));
            }
        }
    } else if report.privileged_start || report.notes.iter().all(|n| !n.contains("started unprivileged")) {
        return Err(format!("the report must say it started unprivileged: {report:?}"));
    }
    Ok(())
}

fn report_and_outside_view(port: u16) -> Result<(), String> {
    let probe = spawn("report", port, &[]);
    let received = probe
        .channel
        .recv::<WorkerToSupervisor>()
        .map_err(|e| e.to_string())?
        .ok_or("child closed its channel")?;
    let Some(to_supervisor::Kind::Log(line)) = received.message.kind else {
        return Err("expected the report".into());
    };
    let report: JailReport = serde_json::from_str(&line.message).map_err(|e| e.to_string())?;
    let checks = check_report(&report, probe.child.id() as i32);
    let _ = probe.channel.send(
        &SupervisorToWorker {
            kind: Some(from_supervisor::Kind::TicketKeys(proto::TicketKeys::default())),
        },
        &[],
    );
    let o = finish(probe);
    checks?;
    expect_stdout(&o, "ok")
}

/// Every argument-filtered rule: the allowed value survives, each mutation is killed.
fn argument_filters(port: u16) -> Result<(), String> {
    let profile = test_profile(port, false);
    let mut cases = 0;
    for rule in profile.syscalls.iter().filter(|r| !r.alternatives.is_empty()) {
        let nr = rampart_sandbox::syscall_number(rule.name).ok_or(format!("{} has no number", rule.name))?;
        let run_args = |a: &[u64; 6]| -> Vec<String> {
            let mut list = vec![nr as u64];
            list.extend_from_slice(a);
            vec![
                "--args".to_string(),
                list.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            ]
        };
        for set in &rule.alternatives {
            let mut allowed = [0u64; 6];
            for c in set {
                allowed[usize::from(c.arg)] = match (c.compare, c.value) {
                    (_, Value::OwnPid) => OWN_PID,
                    (Compare::Eq, Value::Const(v)) => v,
                    // The masked bits as required, plus a bit outside the mask.
                    (Compare::MaskedEq { mask }, Value::Const(v)) => (v & mask) | (0x1 & !mask),
                };
            }
            let o = run("mutate", port, &run_args(&allowed));
            if o.signal.is_some() || !o.stdout.starts_with("survived") {
                return Err(format!("{} with allowed {allowed:?}: {}", rule.name, describe(&o)));
            }
            cases += 1;
            for c in set {
                let i = usize::from(c.arg);
                let candidates: Vec<u64> = match (c.compare, c.value) {
                    (_, Value::OwnPid) => vec![PARENT_PID, 1],
                    (Compare::Eq, Value::Const(v)) => vec![
                        v ^ 1,
                        v ^ 0o4000,
                        v.wrapping_add(1),
                        0xffff_ffff,
                        if v == 0 { 2 } else { 0 },
                    ],
                    (Compare::MaskedEq { mask }, Value::Const(v)) => vec![allowed[i] ^ mask, (v & mask) ^ mask],
                };
                for value in candidates {
                    let mut mutated = allowed;
                    mutated[i] = value;
                    // A mutation that another alternative allows is not a mutation of this rule.
                    if mutated == allowed || rule.allows(&mutated, OWN_PID) {
                        continue;
                    }
                    let o = run("mutate", port, &run_args(&mutated));
                    if o.signal != Some(libc::SIGSYS) {
                        return Err(format!(
                            "{} ({}) with {mutated:?}: expected SIGSYS, got {}",
                            rule.name,
                            c.describe,
                            describe(&o)
                        ));
                    }
                    cases += 1;
                }
            }
        }
    }
    if cases < 20 {
        return Err(format!("only {cases} argument cases ran"));
    }
    println!("    ({cases} argument cases)");
    Ok(())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--probe") {
        child_main(parse_child_args(&args[1..]));
    }
    // A libtest-style name filter: `cargo test --test jail -- NAME`.
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let abi = rampart_sandbox::landlock_abi();
    if abi < 6 {
        let reason = format!("landlock ABI {abi} < 6 (TCP rules and scopes need it)");
        if in_ci() {
            panic!("missing prerequisite under CI: {reason}");
        }
        eprintln!("skipping the jail suite: {reason}");
        println!("test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out");
        return;
    }
    if !is_root() {
        eprintln!(
            "note: not root: the uid switch and capability drop are skipped (root-only); landlock and seccomp are tested"
        );
    }
    let mut tests: Vec<(String, Option<TestFn>)> =
        FORBIDDEN.iter().map(|name| (format!("killed_{name}"), None)).collect();
    let named: [(&str, TestFn); 9] = [
        ("landlock_alone_refuses_bind_and_other_ports", landlock_alone),
        ("argument_filters_allow_the_value_and_kill_mutations", argument_filters),
        (
            "relays_tcp_through_a_received_listener",
            relays_tcp_through_a_received_listener,
        ),
        (
            "tls_handshake_with_certificate_from_the_channel",
            tls_handshake_from_channel_bytes,
        ),
        ("allocates_64_mib", works_alloc),
        ("allocates_64_mib_with_memory_locked", works_alloc_locked),
        ("uses_a_hashmap", works_hashmap),
        ("panic_ends_in_sigabrt", panic_is_sigabrt),
        ("report_and_proc_status_show_the_jail", report_and_outside_view),
    ];
    tests.extend(named.into_iter().map(|(n, f)| (n.to_string(), Some(f))));
    let (mut passed, mut failed, mut filtered) = (0, 0, 0);
    for (name, test) in tests {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            filtered += 1;
            continue;
        }
        let port = free_port();
        let result = match (&test, name.strip_prefix("killed_")) {
            (Some(f), _) => f(port),
            (None, Some(call)) => expect_sigsys(call, port),
            (None, None) => Err("no test".into()),
        };
        match result {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED\n    {e}");
                failed += 1;
            }
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "test result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out"
    );
    if failed > 0 {
        std::process::exit(101);
    }
}
