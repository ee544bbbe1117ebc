//! The worker's sandbox profile: everything a jailed worker may do, as reviewable data.
//!
//! A reviewer reads this file (or `rampart policy show`) to know exactly what a compromised
//! worker could still do. Every allowed system call carries the reason it is needed; argument
//! conditions narrow the dangerous ones. Anything not listed kills the process (SIGSYS).
//!
//! What the profile does not stop, by design: a worker can read and write its own client and
//! backend connections, and connect to any address on an allowed backend port (landlock filters
//! ports, not addresses). Run workers under their own uid and add an owner-match firewall rule
//! (`iptables -A OUTPUT -m owner --uid-owner rampart-worker ! -d BACKENDS -j REJECT`) to close
//! the second gap.

use serde::{Deserialize, Serialize};

use rampart_command::config::{Config, SeccompAction};

/// How a system call argument is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// The argument equals the value.
    Eq,
    /// `argument & mask == value`.
    MaskedEq { mask: u64 },
}

/// The value an argument is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    Const(u64),
    /// The jailed process's own pid, known only when the jail is entered.
    OwnPid,
}

/// One argument condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// Argument index, 0-based.
    pub arg: u8,
    pub compare: Compare,
    pub value: Value,
    /// A readable form of the condition (`flags == SOCK_NONBLOCK|SOCK_CLOEXEC`).
    pub describe: &'static str,
}

impl Condition {
    /// Whether `args` satisfies the condition, with `pid` standing for [`Value::OwnPid`].
    /// Comparisons are on the low 32 bits, as the kernel's `int` arguments are.
    pub fn holds(&self, args: &[u64; 6], pid: u64) -> bool {
        let value = match self.value {
            Value::Const(v) => v,
            Value::OwnPid => pid,
        };
        let arg = args.get(usize::from(self.arg)).copied().unwrap_or(0) & 0xffff_ffff;
        match self.compare {
            Compare::Eq => arg == value,
            Compare::MaskedEq { mask } => arg & mask == value,
        }
    }
}

/// An allowed system call. `alternatives` is a list of condition sets (any one set, all of its
/// conditions); an empty list allows every call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyscallRule {
    pub name: &'static str,
    pub alternatives: Vec<Vec<Condition>>,
    pub reason: &'static str,
}

impl SyscallRule {
    /// Whether this rule lets a call with these arguments through.
    pub fn allows(&self, args: &[u64; 6], pid: u64) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|set| set.iter().all(|c| c.holds(args, pid)))
    }
}

/// What happens on a system call that is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    /// Kill the whole process with SIGSYS.
    KillProcess,
    /// Let it through and have the kernel log it (debugging a profile only).
    Log,
}

/// The landlock part of the profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandlockRules {
    /// Every filesystem access right is handled and none is granted.
    pub filesystem: &'static str,
    /// TCP bind is handled and no port is granted.
    pub tcp_bind: &'static str,
    /// TCP connect: the allowed ports, or every port.
    pub tcp_connect: ConnectRule,
    /// Scopes: abstract unix sockets and signals outside the sandbox are refused.
    pub scopes: &'static [&'static str],
    /// Refuse to start when the kernel cannot enforce all of the above.
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectRule {
    Ports(Vec<u16>),
    AnyPort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resource {
    Core,
    Nproc,
    Nofile,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    pub resource: Resource,
    pub limit: u64,
    pub reason: &'static str,
}

/// Which layers are enforced. All are on in production; the switches exist for tests that prove
/// one layer alone (landlock without seccomp) and for measuring the jail's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layers {
    pub privileges: bool,
    pub landlock: bool,
    pub seccomp: bool,
}

/// Everything the jail enforces on a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    /// Account the process switches to when started as root.
    pub user: String,
    pub group: String,
    pub rlimits: Vec<Rlimit>,
    pub landlock: LandlockRules,
    pub default_action: DefaultAction,
    pub syscalls: Vec<SyscallRule>,
    pub layers: Layers,
}

// Constants spelled out here so that the profile reads the same on every architecture (these
// values are the same on x86_64 and aarch64).
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
const SOCK_STREAM: u64 = 1;
const SOCK_NONBLOCK: u64 = 0o4000;
const SOCK_CLOEXEC: u64 = 0o2000000;
const SOL_SOCKET: u64 = 1;
const SO_ERROR: u64 = 4;
const SO_KEEPALIVE: u64 = 9;
const IPPROTO_TCP: u64 = 6;
const TCP_NODELAY: u64 = 1;
const PROT_EXEC: u64 = 4;
const SIGABRT: u64 = 6;
const F_GETFD: u64 = 1;

fn eq(arg: u8, value: u64, describe: &'static str) -> Condition {
    Condition {
        arg,
        compare: Compare::Eq,
        value: Value::Const(value),
        describe,
    }
}

fn rule(name: &'static str, reason: &'static str) -> SyscallRule {
    SyscallRule {
        name,
        alternatives: Vec::new(),
        reason,
    }
}

fn rule_if(name: &'static str, alternatives: Vec<Vec<Condition>>, reason: &'static str) -> SyscallRule {
    SyscallRule {
        name,
        alternatives,
        reason,
    }
}

/// The system calls a steady-state worker makes. Order: I/O, sockets, event loop, memory,
/// synchronisation and time, signals and exit.
pub fn worker_syscalls() -> Vec<SyscallRule> {
    let no_exec = |arg| Condition {
        arg,
        compare: Compare::MaskedEq { mask: PROT_EXEC },
        value: Value::Const(0),
        describe: "prot has no PROT_EXEC",
    };
    let stream = SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC;
    let stream_desc = "type == SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC";
    vec![
        rule("read", "read from client, backend and channel sockets"),
        rule("write", "write to client, backend sockets; the panic message to fd 2"),
        rule("readv", "vectored reads of sockets"),
        rule("writev", "vectored writes of response headers and bodies"),
        rule("close", "close finished connections"),
        rule_if(
            "fcntl",
            vec![vec![eq(1, F_GETFD, "cmd == F_GETFD")]],
            "Rust's standard library checks that a descriptor is open before closing it",
        ),
        rule("recvfrom", "socket reads (std and mio use recv/recvfrom)"),
        rule("sendto", "socket writes (send with MSG_NOSIGNAL)"),
        rule(
            "recvmsg",
            "receive channel messages with their listening sockets (SCM_RIGHTS)",
        ),
        rule("sendmsg", "send channel messages to the supervisor"),
        rule_if(
            "accept4",
            vec![vec![eq(
                3,
                SOCK_NONBLOCK | SOCK_CLOEXEC,
                "flags == SOCK_NONBLOCK|SOCK_CLOEXEC",
            )]],
            "accept client connections on listening sockets received from the supervisor",
        ),
        rule_if(
            "socket",
            vec![
                vec![
                    eq(0, AF_INET, "domain == AF_INET"),
                    eq(1, stream, stream_desc),
                    eq(2, 0, "protocol == 0"),
                ],
                vec![
                    eq(0, AF_INET6, "domain == AF_INET6"),
                    eq(1, stream, stream_desc),
                    eq(2, 0, "protocol == 0"),
                ],
            ],
            "open non-blocking TCP sockets to backends; nothing else (no unix, UDP, raw, netlink)",
        ),
        rule("connect", "connect to backends; landlock restricts the ports"),
        rule("shutdown", "half-close connections"),
        rule_if(
            "getsockopt",
            vec![vec![
                eq(1, SOL_SOCKET, "level == SOL_SOCKET"),
                eq(2, SO_ERROR, "optname == SO_ERROR"),
            ]],
            "read the outcome of a non-blocking connect",
        ),
        rule_if(
            "setsockopt",
            vec![
                vec![
                    eq(1, IPPROTO_TCP, "level == IPPROTO_TCP"),
                    eq(2, TCP_NODELAY, "optname == TCP_NODELAY"),
                ],
                vec![
                    eq(1, SOL_SOCKET, "level == SOL_SOCKET"),
                    eq(2, SO_KEEPALIVE, "optname == SO_KEEPALIVE"),
                ],
            ],
            "disable Nagle and enable keep-alive on proxied connections",
        ),
        rule("getpeername", "client address for forwarding headers and access logs"),
        rule("getsockname", "local address for forwarding headers"),
        rule("epoll_wait", "the event loop (glibc on x86_64)"),
        rule("epoll_pwait", "the event loop (musl, aarch64)"),
        rule("epoll_ctl", "register sockets with the event loop"),
        rule("brk", "heap growth"),
        rule_if(
            "mmap",
            vec![vec![no_exec(2)]],
            "large allocations; never executable memory",
        ),
        rule_if(
            "mprotect",
            vec![vec![no_exec(2)]],
            "allocator guard pages; never executable memory",
        ),
        rule("munmap", "release large allocations"),
        rule("mremap", "grow large allocations (Vec)"),
        rule("madvise", "the allocator returns memory to the kernel"),
        rule("futex", "locks inside the allocator and BoringSSL"),
        rule("getrandom", "HashMap seeds, request ids, TLS"),
        rule(
            "clock_gettime",
            "timeouts (when the vDSO falls back to the system call)",
        ),
        rule("gettimeofday", "time for logs (vDSO fallback)"),
        rule("sched_yield", "spin locks in the allocator"),
        rule("rt_sigreturn", "return from a signal handler"),
        rule("rt_sigprocmask", "abort() blocks signals before raising SIGABRT"),
        rule("sigaltstack", "Rust's stack overflow handler"),
        rule("gettid", "abort() raises SIGABRT on its own thread"),
        rule("getpid", "abort() raises SIGABRT on its own process"),
        rule_if(
            "tgkill",
            vec![vec![
                Condition {
                    arg: 0,
                    compare: Compare::Eq,
                    value: Value::OwnPid,
                    describe: "tgid == own pid",
                },
                eq(2, SIGABRT, "sig == SIGABRT"),
            ]],
            "abort() on a panic: SIGABRT to itself only",
        ),
        rule("exit", "thread exit"),
        rule("exit_group", "process exit"),
        rule("restart_syscall", "the kernel restarts an interrupted call"),
    ]
}

/// Options that change a profile beyond the configuration file.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProfileOptions {
    /// Measure the proxy without its jail. Refused unless explicitly requested on the command line.
    pub sandbox_off: bool,
}

/// The few values a worker's profile depends on. The supervisor hands them to a new worker on
/// its command line, so that the worker can build its profile and enter its jail before it reads
/// a single byte from its channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerJailParams {
    pub user: String,
    pub group: String,
    pub max_connections: u32,
    pub connect: ConnectRule,
    pub require_landlock: bool,
    pub seccomp_log: bool,
    pub sandbox_off: bool,
}

impl WorkerJailParams {
    pub fn from_config(config: &Config, options: ProfileOptions) -> WorkerJailParams {
        let connect = if config.sandbox.connect_any_port {
            ConnectRule::AnyPort
        } else {
            let mut ports = config.backend_ports();
            ports.extend(config.sandbox.backend_ports.iter().copied());
            ports.sort_unstable();
            ports.dedup();
            ConnectRule::Ports(ports)
        };
        WorkerJailParams {
            user: config.worker_user.clone(),
            group: config.worker_group.clone(),
            max_connections: config.max_connections,
            connect,
            require_landlock: config.sandbox.require_landlock,
            seccomp_log: config.sandbox.seccomp_action == SeccompAction::Log,
            sandbox_off: options.sandbox_off,
        }
    }
}

impl Profile {
    /// The worker profile for a configuration.
    pub fn worker(config: &Config, options: ProfileOptions) -> Profile {
        Profile::from_params(&WorkerJailParams::from_config(config, options))
    }

    /// The worker profile for the values the supervisor passed.
    pub fn from_params(params: &WorkerJailParams) -> Profile {
        // Two sockets per connection, plus the channel, listeners and stdio.
        let nofile = u64::from(params.max_connections).saturating_mul(2).saturating_add(256);
        Profile {
            user: params.user.clone(),
            group: params.group.clone(),
            rlimits: vec![
                Rlimit {
                    resource: Resource::Core,
                    limit: 0,
                    reason: "no core dump can leak traffic or keys",
                },
                Rlimit {
                    resource: Resource::Nproc,
                    limit: 0,
                    reason: "the worker's account may not create processes",
                },
                Rlimit {
                    resource: Resource::Nofile,
                    limit: nofile,
                    reason: "two sockets per connection at max_connections, plus a margin",
                },
            ],
            landlock: LandlockRules {
                filesystem: "every access right handled, none granted: no file can be opened, created or executed",
                tcp_bind: "handled, no port granted: no socket can be bound",
                tcp_connect: params.connect.clone(),
                scopes: &["abstract unix sockets", "signals"],
                required: params.require_landlock,
            },
            default_action: if params.seccomp_log {
                DefaultAction::Log
            } else {
                DefaultAction::KillProcess
            },
            syscalls: worker_syscalls(),
            layers: Layers {
                privileges: !params.sandbox_off,
                landlock: !params.sandbox_off,
                seccomp: !params.sandbox_off,
            },
        }
    }

    /// The keyring's profile: a worker's, without any network. It holds private keys and only
    /// talks over the socketpairs the supervisor gave it: no socket, connect, accept, bind.
    pub fn keyring(params: &WorkerJailParams) -> Profile {
        let mut profile = Profile::from_params(params);
        profile.landlock.tcp_connect = ConnectRule::Ports(Vec::new());
        let network = [
            "socket",
            "connect",
            "accept4",
            "shutdown",
            "getsockopt",
            "setsockopt",
            "getpeername",
            "getsockname",
            "recvfrom",
            "sendto",
        ];
        profile.syscalls.retain(|r| !network.contains(&r.name));
        profile
    }

    /// Readable text for `rampart policy show`.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "worker sandbox profile");
        let _ = writeln!(
            out,
            "  layers: privileges={} landlock={} seccomp={}",
            on(self.layers.privileges),
            on(self.layers.landlock),
            on(self.layers.seccomp)
        );
        let _ = writeln!(out, "\naccount (when started as root)");
        let _ = writeln!(
            out,
            "  user {} group {}, no supplementary groups",
            self.user, self.group
        );
        let _ = writeln!(
            out,
            "  capabilities: all sets cleared (effective, permitted, inheritable, bounding, ambient)"
        );
        let _ = writeln!(out, "  no_new_privs, not dumpable, killed when the supervisor dies");
        let _ = writeln!(out, "\nrlimits");
        for r in &self.rlimits {
            let _ = writeln!(
                out,
                "  {:<8} {:>8}  {}",
                format!("{:?}", r.resource).to_uppercase(),
                r.limit,
                r.reason
            );
        }
        let _ = writeln!(
            out,
            "\nlandlock ({})",
            if self.landlock.required {
                "required"
            } else {
                "best effort, status reported"
            }
        );
        let _ = writeln!(out, "  filesystem:  {}", self.landlock.filesystem);
        let _ = writeln!(out, "  tcp bind:    {}", self.landlock.tcp_bind);
        let connect = match &self.landlock.tcp_connect {
            ConnectRule::AnyPort => "any port (connect_any_port = true)".to_string(),
            ConnectRule::Ports(p) if p.is_empty() => "no port (no backend configured)".to_string(),
            ConnectRule::Ports(p) => {
                format!("ports {}", p.iter().map(u16::to_string).collect::<Vec<_>>().join(", "))
            }
        };
        let _ = writeln!(out, "  tcp connect: {connect}");
        let _ = writeln!(out, "  scopes:      {}", self.landlock.scopes.join(", "));
        let _ = writeln!(
            out,
            "\nseccomp: {} system calls allowed, any other {}",
            self.syscalls.len(),
            match self.default_action {
                DefaultAction::KillProcess => "kills the process (SIGSYS)",
                DefaultAction::Log => "is LOGGED AND ALLOWED (debugging only)",
            }
        );
        for r in &self.syscalls {
            let _ = writeln!(out, "  {:<16} {}", r.name, r.reason);
            for (i, set) in r.alternatives.iter().enumerate() {
                let text = set.iter().map(|c| c.describe).collect::<Vec<_>>().join(" && ");
                let _ = writeln!(
                    out,
                    "  {:<16}   {} {}",
                    "",
                    if i == 0 { "only if" } else { "or if  " },
                    text
                );
            }
        }
        out
    }

    /// JSON for `rampart policy show --json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "OFF" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn conditions_evaluate_like_the_kernel_filter() {
        let rules = worker_syscalls();
        let socket = rules.iter().find(|r| r.name == "socket").unwrap();
        let stream = SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC;
        assert!(socket.allows(&[AF_INET, stream, 0, 0, 0, 0], 1));
        assert!(socket.allows(&[AF_INET6, stream, 0, 0, 0, 0], 1));
        assert!(!socket.allows(&[1, stream, 0, 0, 0, 0], 1), "AF_UNIX");
        assert!(
            !socket.allows(&[AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0, 0, 0, 0], 1),
            "blocking"
        );
        let tgkill = rules.iter().find(|r| r.name == "tgkill").unwrap();
        assert!(tgkill.allows(&[42, 42, SIGABRT, 0, 0, 0], 42));
        assert!(!tgkill.allows(&[43, 43, SIGABRT, 0, 0, 0], 42));
        let fcntl = rules.iter().find(|r| r.name == "fcntl").unwrap();
        assert!(fcntl.allows(&[3, F_GETFD, 0, 0, 0, 0], 1));
        assert!(
            !fcntl.allows(&[3, 0, 0, 0, 0, 0], 1),
            "F_DUPFD would create descriptors"
        );
        let mmap = rules.iter().find(|r| r.name == "mmap").unwrap();
        assert!(mmap.allows(&[0, 4096, 3, 0x22, u64::MAX, 0], 1));
        assert!(!mmap.allows(&[0, 4096, 7, 0x22, u64::MAX, 0], 1));
    }

    #[test]
    fn nothing_dangerous_is_allowed() {
        let names: Vec<_> = worker_syscalls().iter().map(|r| r.name).collect();
        for forbidden in [
            "open",
            "openat",
            "execve",
            "execveat",
            "fork",
            "vfork",
            "clone",
            "clone3",
            "bind",
            "listen",
            "socketpair",
            "kill",
            "ptrace",
            "prctl",
            "setuid",
            "unshare",
            "mount",
            "io_uring_setup",
            "bpf",
            "memfd_create",
            "seccomp",
            "ioctl",
        ] {
            assert!(!names.contains(&forbidden), "{forbidden} must not be allowed");
        }
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "a system call is listed twice");
    }

    #[test]
    fn the_keyring_has_no_network_at_all() {
        let config = Config::parse(
            "[clusters.a]\nbackends = [ { address = \"127.0.0.1:9000\" } ]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let params = WorkerJailParams::from_config(&config, ProfileOptions::default());
        let keyring = Profile::keyring(&params);
        let names: Vec<_> = keyring.syscalls.iter().map(|r| r.name).collect();
        for forbidden in ["socket", "connect", "accept4", "sendto", "recvfrom", "bind", "listen"] {
            assert!(!names.contains(&forbidden), "the keyring may not {forbidden}");
        }
        for needed in ["recvmsg", "sendmsg", "epoll_wait", "mmap"] {
            assert!(names.contains(&needed), "the keyring needs {needed}");
        }
        assert_eq!(keyring.landlock.tcp_connect, ConnectRule::Ports(Vec::new()));
        assert!(keyring.layers.seccomp && keyring.layers.landlock);
    }

    #[test]
    fn ports_come_from_the_backends() {
        let config = Config::parse(
            "[clusters.a]\nbackends = [ { address = \"127.0.0.1:9000\" }, { address = \"[::1]:8080\" } ]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let profile = Profile::worker(&config, ProfileOptions::default());
        assert_eq!(profile.landlock.tcp_connect, ConnectRule::Ports(vec![8080, 9000]));
        assert!(profile.layers.seccomp && profile.layers.landlock && profile.layers.privileges);
        let off = Profile::worker(&config, ProfileOptions { sandbox_off: true });
        assert!(!off.layers.seccomp && !off.layers.landlock);
    }
}
