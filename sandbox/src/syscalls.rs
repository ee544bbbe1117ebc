//! System call names of the policy, mapped to this architecture's numbers.

/// The number of a system call on the architecture this binary was built for, or `None` when
/// the call does not exist here (e.g. `epoll_wait` on aarch64).
#[allow(clippy::useless_conversion)] // c_long is i64 here, not on every target
pub fn number(name: &str) -> Option<i64> {
    #[cfg(target_arch = "x86_64")]
    let arch_specific: Option<libc::c_long> = match name {
        "epoll_wait" => Some(libc::SYS_epoll_wait),
        "open" => Some(libc::SYS_open),
        "fork" => Some(libc::SYS_fork),
        "vfork" => Some(libc::SYS_vfork),
        "stat" => Some(libc::SYS_stat),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let arch_specific: Option<libc::c_long> = None;
    if let Some(n) = arch_specific {
        return Some(i64::from(n));
    }
    let n: libc::c_long = match name {
        "read" => libc::SYS_read,
        "write" => libc::SYS_write,
        "readv" => libc::SYS_readv,
        "writev" => libc::SYS_writev,
        "close" => libc::SYS_close,
        "fcntl" => libc::SYS_fcntl,
        "recvfrom" => libc::SYS_recvfrom,
        "sendto" => libc::SYS_sendto,
        "recvmsg" => libc::SYS_recvmsg,
        "sendmsg" => libc::SYS_sendmsg,
        "accept4" => libc::SYS_accept4,
        "socket" => libc::SYS_socket,
        "connect" => libc::SYS_connect,
        "shutdown" => libc::SYS_shutdown,
        "getsockopt" => libc::SYS_getsockopt,
        "setsockopt" => libc::SYS_setsockopt,
        "getpeername" => libc::SYS_getpeername,
        "getsockname" => libc::SYS_getsockname,
        "epoll_pwait" => libc::SYS_epoll_pwait,
        "epoll_ctl" => libc::SYS_epoll_ctl,
        "brk" => libc::SYS_brk,
        "mmap" => libc::SYS_mmap,
        "mprotect" => libc::SYS_mprotect,
        "munmap" => libc::SYS_munmap,
        "mremap" => libc::SYS_mremap,
        "madvise" => libc::SYS_madvise,
        "futex" => libc::SYS_futex,
        "getrandom" => libc::SYS_getrandom,
        "clock_gettime" => libc::SYS_clock_gettime,
        "gettimeofday" => libc::SYS_gettimeofday,
        "sched_yield" => libc::SYS_sched_yield,
        "rt_sigreturn" => libc::SYS_rt_sigreturn,
        "rt_sigprocmask" => libc::SYS_rt_sigprocmask,
        "sigaltstack" => libc::SYS_sigaltstack,
        "gettid" => libc::SYS_gettid,
        "getpid" => libc::SYS_getpid,
        "tgkill" => libc::SYS_tgkill,
        "exit" => libc::SYS_exit,
        "exit_group" => libc::SYS_exit_group,
        "restart_syscall" => libc::SYS_restart_syscall,
        _ => return None,
    };
    Some(i64::from(n))
}
