//! The jail: enforces a [`rampart_policy::profile::Profile`] on the calling process and reports
//! what holds.
//!
//! [`Jail::enter`] runs the steps of the design in a fixed order, each a small function with its
//! own error:
//!
//! 1. close every descriptor but 0–2 and the ones the caller keeps (the channel);
//! 2. rlimits (no core, no processes, bounded descriptors);
//! 3. when root: clear the bounding and ambient capability sets, drop supplementary groups,
//!    switch to the unprivileged account, clear the remaining sets, and check that `setuid(0)`
//!    now fails;
//! 4. not dumpable, killed when the parent dies, `no_new_privs` (after the uid change, which
//!    resets the first two);
//! 5. the caller's pre-warm hook: everything that needs system calls the jail will forbid
//!    (creating the event loop, BoringSSL's one-time initialisation);
//! 6. landlock: no filesystem access, no TCP bind, TCP connect to the allowed ports only,
//!    abstract unix sockets and signals scoped;
//! 7. seccomp last, on every thread (TSYNC): the profile's allow-list, anything else kills.
//!
//! It never decides what is allowed: that is the policy's job. Everything the report needs is
//! read before landlock and seccomp, since the jailed process can no longer read /proc.
//!
//! [`inspect`] verifies a jailed process from outside (for the supervisor and the tests);
//! [`probe`] tries the jail in a throwaway child to say what this kernel can enforce.

pub mod inspect;
pub mod probe;
pub mod supervisor;
mod syscalls;

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use nix::errno::Errno;
use nix::unistd::{Gid, Group, Uid, User};
use rampart_policy::profile::{Compare, ConnectRule, DefaultAction, Profile, Resource, Value};
use serde::{Deserialize, Serialize};

pub use syscalls::number as syscall_number;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("closing inherited descriptors failed: {0}")]
    CloseFds(Errno),
    #[error("setting rlimit {resource} to {limit} failed: {source}")]
    Rlimit {
        resource: &'static str,
        limit: u64,
        source: Errno,
    },
    #[error("unknown worker account: user `{user}` / group `{group}`; create it or set worker_user/worker_group")]
    UnknownAccount { user: String, group: String },
    #[error("dropping capabilities ({step}) failed: {message}")]
    Capabilities { step: &'static str, message: String },
    #[error("switching to uid {uid} gid {gid} failed ({step}): {source}")]
    SwitchUser {
        uid: u32,
        gid: u32,
        step: &'static str,
        source: Errno,
    },
    #[error("the process could regain root after dropping privileges (setuid(0) succeeded)")]
    RootRegained,
    #[error("setting process flag {flag} failed: {source}")]
    ProcessFlag { flag: &'static str, source: Errno },
    #[error("the parent process is gone (reparented to pid {0}); refusing to run orphaned")]
    Orphaned(i32),
    #[error("pre-warm hook failed: {0}")]
    Prewarm(String),
    #[error("landlock failed: {0}")]
    Landlock(String),
    #[error("landlock is required but the kernel enforces it {status:?} (ABI {abi})")]
    LandlockNotEnforced { status: LandlockStatus, abi: u32 },
    #[error("building the seccomp filter failed: {0}")]
    SeccompBuild(String),
    #[error("installing the seccomp filter failed: {0}")]
    SeccompInstall(String),
}

/// Landlock's enforcement status, as reported to the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockStatus {
    FullyEnforced,
    PartiallyEnforced,
    NotEnforced,
    /// The profile turned the layer off.
    Disabled,
}

impl LandlockStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LandlockStatus::FullyEnforced => "fully_enforced",
            LandlockStatus::PartiallyEnforced => "partially_enforced",
            LandlockStatus::NotEnforced => "not_enforced",
            LandlockStatus::Disabled => "disabled",
        }
    }
}

/// What the jail enforces, as seen from inside just before landlock and seccomp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailReport {
    pub uid: u32,
    pub gid: u32,
    /// Started as root, so the uid change and capability drop happened.
    pub privileged_start: bool,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
    pub dumpable: bool,
    pub landlock_abi: u32,
    pub landlock_status: LandlockStatus,
    /// `filter (kill_process)`, `filter (log)` or `disabled`.
    pub seccomp_mode: String,
    pub seccomp_rules: usize,
    pub seccomp_instructions: usize,
    pub notes: Vec<String>,
}

/// What the caller hands the jail besides the profile.
pub struct JailSetup<'a> {
    /// Descriptors that survive step 1 (besides 0, 1 and 2).
    pub keep_fds: &'a [RawFd],
    /// Runs after the privilege drop and before landlock and seccomp.
    pub prewarm: &'a mut dyn FnMut() -> Result<(), String>,
}

/// The jail. See the crate documentation for the order of its steps.
pub struct Jail;

impl Jail {
    /// Enters the jail described by `profile`. On error the process is partially restricted
    /// and must exit.
    pub fn enter(profile: &Profile, setup: JailSetup<'_>) -> Result<JailReport, JailError> {
        let mut notes = Vec::new();
        close_stray_fds(setup.keep_fds)?;
        set_rlimits(profile, &mut notes)?;
        let privileged_start = Uid::effective().is_root();
        if profile.layers.privileges && privileged_start {
            drop_privileges(profile)?;
        } else if !privileged_start {
            notes.push(format!(
                "started unprivileged (uid {}): no uid change, no capability to drop",
                Uid::current()
            ));
        } else {
            notes.push("privilege drop disabled by the profile: still running as root".into());
        }
        set_process_flags()?;
        (setup.prewarm)().map_err(JailError::Prewarm)?;
        // Everything the report needs from /proc or capget must be read now.
        let caps = read_capabilities();
        let mut report = JailReport {
            uid: Uid::current().as_raw(),
            gid: Gid::current().as_raw(),
            privileged_start,
            cap_effective: caps.0,
            cap_permitted: caps.1,
            cap_inheritable: caps.2,
            cap_bounding: caps.3,
            cap_ambient: caps.4,
            no_new_privs: prctl_get(libc::PR_GET_NO_NEW_PRIVS) == 1,
            dumpable: prctl_get(libc::PR_GET_DUMPABLE) == 1,
            landlock_abi: landlock_abi(),
            landlock_status: LandlockStatus::Disabled,
            seccomp_mode: "disabled".into(),
            seccomp_rules: 0,
            seccomp_instructions: 0,
            notes,
        };
        if profile.layers.landlock {
            report.landlock_status = enter_landlock(profile)?;
        }
        if profile.layers.seccomp {
            let (rules, instructions, skipped) = enter_seccomp(profile)?;
            report.seccomp_rules = rules;
            report.seccomp_instructions = instructions;
            report.seccomp_mode = match profile.default_action {
                DefaultAction::KillProcess => "filter (kill_process)".into(),
                DefaultAction::Log => "filter (log)".into(),
            };
            for name in skipped {
                report
                    .notes
                    .push(format!("{name}: no such system call on this architecture"));
            }
        }
        Ok(report)
    }
}

/// Step 1: close every descriptor except 0–2 and `keep`.
pub fn close_stray_fds(keep: &[RawFd]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep.iter().filter(|fd| **fd > 2).map(|fd| *fd as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut start: u32 = 3;
    for fd in keep.iter().copied().chain(std::iter::once(u32::MAX)) {
        if fd > start {
            // SAFETY: close_range only closes descriptors; the ranges exclude those we keep and
            // no Rust object in this single-threaded startup path owns the others.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, start, fd - 1, 0) };
            if rc != 0 {
                return Err(JailError::CloseFds(Errno::last()));
            }
        }
        start = fd.saturating_add(1);
    }
    Ok(())
}

/// Step 2: rlimits.
fn set_rlimits(profile: &Profile, notes: &mut Vec<String>) -> Result<(), JailError> {
    use nix::sys::resource::{Resource as R, getrlimit, setrlimit};
    for limit in &profile.rlimits {
        let (resource, name) = match limit.resource {
            Resource::Core => (R::RLIMIT_CORE, "CORE"),
            Resource::Nproc => (R::RLIMIT_NPROC, "NPROC"),
            Resource::Nofile => (R::RLIMIT_NOFILE, "NOFILE"),
        };
        let value = limit.limit;
        match setrlimit(resource, value, value) {
            Ok(()) => {}
            // Raising a hard limit needs CAP_SYS_RESOURCE, which a container may not grant even
            // to root: keep the inherited hard limit and say so.
            Err(Errno::EPERM) => {
                let (_, hard) = getrlimit(resource).map_err(|source| JailError::Rlimit {
                    resource: name,
                    limit: value,
                    source,
                })?;
                let capped = value.min(hard);
                setrlimit(resource, capped, capped).map_err(|source| JailError::Rlimit {
                    resource: name,
                    limit: capped,
                    source,
                })?;
                if capped < value {
                    notes.push(format!(
                        "RLIMIT_{name} capped at the inherited hard limit {hard} (wanted {value})"
                    ));
                }
            }
            Err(source) => {
                return Err(JailError::Rlimit {
                    resource: name,
                    limit: value,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Step 3: from root to the unprivileged account with no capability left.
fn drop_privileges(profile: &Profile) -> Result<(), JailError> {
    use caps::CapSet;
    let unknown = || JailError::UnknownAccount {
        user: profile.user.clone(),
        group: profile.group.clone(),
    };
    let user = User::from_name(&profile.user).ok().flatten().ok_or_else(unknown)?;
    let group = Group::from_name(&profile.group).ok().flatten().ok_or_else(unknown)?;
    let (uid, gid) = (user.uid, group.gid);
    let cap_error = |step| {
        move |e: caps::errors::CapsError| JailError::Capabilities {
            step,
            message: e.to_string(),
        }
    };
    // The bounding set can only shrink with CAP_SETPCAP, so before the uid change.
    caps::clear(None, CapSet::Bounding).map_err(cap_error("bounding"))?;
    caps::clear(None, CapSet::Ambient).map_err(cap_error("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(cap_error("inheritable"))?;
    let switch = |step, source| JailError::SwitchUser {
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        step,
        source,
    };
    nix::unistd::setgroups(&[]).map_err(|e| switch("setgroups", e))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| switch("setresgid", e))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| switch("setresuid", e))?;
    // A full setresuid from root clears permitted and effective; make sure of it.
    caps::clear(None, CapSet::Effective).map_err(cap_error("effective"))?;
    caps::clear(None, CapSet::Permitted).map_err(cap_error("permitted"))?;
    if !uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(JailError::RootRegained);
    }
    Ok(())
}

fn prctl_set(option: libc::c_int, value: libc::c_ulong, flag: &'static str) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only changes flags of the calling process.
    let rc = unsafe {
        libc::prctl(
            option,
            value,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(JailError::ProcessFlag {
            flag,
            source: Errno::last(),
        })
    }
}

fn prctl_get(option: libc::c_int) -> i32 {
    // SAFETY: a read-only prctl query with no pointer arguments.
    unsafe {
        libc::prctl(
            option,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    }
}

/// Step 4: process flags. After the uid change, which resets dumpable and pdeathsig.
fn set_process_flags() -> Result<(), JailError> {
    prctl_set(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE=0")?;
    prctl_set(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        "PR_SET_PDEATHSIG=SIGKILL",
    )?;
    // If the parent died before PDEATHSIG was set, we were reparented and must not go on.
    let parent = nix::unistd::getppid().as_raw();
    if parent == 1 {
        return Err(JailError::Orphaned(parent));
    }
    prctl_set(libc::PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS=1")?;
    Ok(())
}

/// (effective, permitted, inheritable, bounding, ambient) as bit masks.
pub(crate) fn read_capabilities() -> (u64, u64, u64, u64, u64) {
    use caps::CapSet;
    let mask = |set| {
        caps::read(None, set)
            .map(|caps| caps.iter().fold(0u64, |m, c| m | c.bitmask()))
            .unwrap_or(u64::MAX)
    };
    (
        mask(CapSet::Effective),
        mask(CapSet::Permitted),
        mask(CapSet::Inheritable),
        mask(CapSet::Bounding),
        mask(CapSet::Ambient),
    )
}

/// The landlock ABI version of the running kernel (0 when landlock is unavailable).
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_ulong = 1;
    // SAFETY: the version query takes no ruleset pointer and creates nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(rc).unwrap_or(0)
}

/// Step 6: landlock.
fn enter_landlock(profile: &Profile) -> Result<LandlockStatus, JailError> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope,
    };
    let err = |e: landlock::RulesetError| JailError::Landlock(e.to_string());
    let level = if profile.landlock.required {
        CompatLevel::HardRequirement
    } else {
        CompatLevel::BestEffort
    };
    // The newest ABI this code was reviewed against; the crate downgrades to the kernel's.
    let abi = ABI::V7;
    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?;
    let connect_any = profile.landlock.tcp_connect == ConnectRule::AnyPort;
    ruleset = if connect_any {
        ruleset.handle_access(AccessNet::BindTcp).map_err(err)?
    } else {
        ruleset.handle_access(AccessNet::from_all(abi)).map_err(err)?
    };
    ruleset = ruleset.scope(Scope::from_all(abi)).map_err(err)?;
    let mut created = ruleset.create().map_err(err)?;
    if let ConnectRule::Ports(ports) = &profile.landlock.tcp_connect {
        for port in ports {
            created = created
                .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
                .map_err(err)?;
        }
    }
    let status = created.restrict_self().map_err(err)?;
    let status = match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced,
        RulesetStatus::PartiallyEnforced => LandlockStatus::PartiallyEnforced,
        RulesetStatus::NotEnforced => LandlockStatus::NotEnforced,
    };
    if profile.landlock.required && status != LandlockStatus::FullyEnforced {
        return Err(JailError::LandlockNotEnforced {
            status,
            abi: landlock_abi(),
        });
    }
    Ok(status)
}

#[cfg(target_arch = "x86_64")]
const ARCH: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: seccompiler::TargetArch = seccompiler::TargetArch::aarch64;

/// Compiles the profile's allow-list to BPF. Returns the program, the number of rules and the
/// names the architecture does not have.
pub fn compile_seccomp(
    profile: &Profile,
    pid: u32,
) -> Result<(seccompiler::BpfProgram, usize, Vec<&'static str>), JailError> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    let build = |e: seccompiler::BackendError| JailError::SeccompBuild(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for rule in &profile.syscalls {
        let Some(number) = syscalls::number(rule.name) else {
            skipped.push(rule.name);
            continue;
        };
        let mut compiled = Vec::new();
        for set in &rule.alternatives {
            let mut conditions = Vec::new();
            for c in set {
                let value = match c.value {
                    Value::Const(v) => v,
                    Value::OwnPid => u64::from(pid),
                };
                let op = match c.compare {
                    Compare::Eq => SeccompCmpOp::Eq,
                    Compare::MaskedEq { mask } => SeccompCmpOp::MaskedEq(mask),
                };
                conditions.push(SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, op, value).map_err(build)?);
            }
            compiled.push(SeccompRule::new(conditions).map_err(build)?);
        }
        rules.insert(number, compiled);
    }
    let count = rules.len();
    let mismatch = match profile.default_action {
        DefaultAction::KillProcess => SeccompAction::KillProcess,
        DefaultAction::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, ARCH).map_err(build)?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(build)?;
    Ok((program, count, skipped))
}

/// Step 7: seccomp, on every thread of the process.
fn enter_seccomp(profile: &Profile) -> Result<(usize, usize, Vec<&'static str>), JailError> {
    let (program, count, skipped) = compile_seccomp(profile, std::process::id())?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| JailError::SeccompInstall(e.to_string()))?;
    Ok((count, program.len(), skipped))
}

/// Keeps a process's memory out of swap, for one that holds secrets (the keyring). Call it while
/// the process is still root, before [`Jail::enter`]; returns a line for the jail report.
///
/// Where RLIMIT_MEMLOCK can be raised to unlimited (CAP_SYS_RESOURCE), every mapping, present and
/// future, is locked as it is touched. Where it cannot (a container that withholds
/// CAP_SYS_RESOURCE even from root), locking future mappings would be a trap: once privileges are
/// dropped, each new mapping counts against the limit, which the locked total already exceeds,
/// and every allocation past the current heap fails. So glibc is told to keep its heap,
/// `heap_reserve` bytes are added to it, and only the mappings made so far are locked: the keys,
/// allocated after this, land in the reserve.
pub fn lock_memory(heap_reserve: usize) -> String {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    let raised = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok();
    if raised {
        // SAFETY: mlockall only changes how this process's pages are paged.
        if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } == 0 {
            return "memory locked (mlockall on fault, present and future mappings): keys never reach swap".into();
        }
    } else {
        // SAFETY: mallopt only tunes glibc's allocator; malloc/free of a block nobody else sees.
        unsafe {
            // Never give the top of the heap back, and serve blocks up to 32 MiB from it.
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            let reserve = libc::malloc(heap_reserve);
            libc::free(reserve);
        }
        // SAFETY: as above.
        if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_ONFAULT) } == 0 {
            return format!(
                "memory locked on fault: the mappings made before the jail, with a {} MiB heap reserve for the keys (RLIMIT_MEMLOCK cannot be raised here, so later mappings are not locked)",
                heap_reserve >> 20
            );
        }
    }
    "memory could not be locked: keys may reach swap".into()
}

/// A panic in a jailed process must end in SIGABRT: a backtrace would open /proc/self/maps and
/// the executable (and be killed by SIGSYS instead). This hook writes a fixed message to fd 2
/// with one `write` and aborts.
pub fn install_panic_hook(message: &'static str) {
    std::panic::set_hook(Box::new(move |_| {
        // SAFETY: write(2) from a static buffer; abort() never returns.
        unsafe {
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::abort();
        }
    }));
}
