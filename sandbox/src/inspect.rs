//! Verifying a jailed process from outside, through /proc (as root or as the same user).

use std::fmt;

/// What a jailed process must look like.
#[derive(Debug, Clone, Default)]
pub struct Expectation {
    /// The uid and gid it must run as (every field of Uid:/Gid:), when known.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// At most this many open descriptors, when known.
    pub max_fds: Option<usize>,
    /// Accept a non-empty bounding set: a process started unprivileged cannot clear it (it
    /// needs CAP_SETPCAP); no_new_privs makes it unusable anyway.
    pub allow_bounding: bool,
    /// Skip what only root may read of a non-dumpable process (its descriptors and environment):
    /// for a supervisor started unprivileged.
    pub skip_private: bool,
}

/// Facts read from /proc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_inh: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    pub seccomp: u32,
    /// (fd, link target)
    pub fds: Vec<(i32, String)>,
    pub environment_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    Unreadable { what: String, error: String },
    WrongUid { expected: u32, found: Vec<u32> },
    WrongGid { expected: u32, found: Vec<u32> },
    RootUid(Vec<u32>),
    Capability { set: &'static str, mask: u64 },
    NoNewPrivsUnset,
    SeccompMode(u32),
    FileDescriptor { fd: i32, target: String },
    TooManyFds { found: usize, max: usize },
    Environment { bytes: usize },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Unreadable { what, error } => write!(f, "cannot read {what}: {error}"),
            Violation::WrongUid { expected, found } => write!(f, "uid {found:?}, expected {expected}"),
            Violation::WrongGid { expected, found } => write!(f, "gid {found:?}, expected {expected}"),
            Violation::RootUid(found) => write!(f, "runs with uid 0 ({found:?})"),
            Violation::Capability { set, mask } => write!(f, "{set} = {mask:016x}, expected none"),
            Violation::NoNewPrivsUnset => write!(f, "NoNewPrivs is 0"),
            Violation::SeccompMode(m) => write!(f, "Seccomp mode {m}, expected 2 (filter)"),
            Violation::FileDescriptor { fd, target } => {
                write!(f, "fd {fd} is {target}, not a socket, pipe or /dev/null")
            }
            Violation::TooManyFds { found, max } => write!(f, "{found} open descriptors, expected at most {max}"),
            Violation::Environment { bytes } => write!(f, "environment is not empty ({bytes} bytes)"),
        }
    }
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
}

fn ids(value: Option<&str>) -> Vec<u32> {
    value
        .map(|v| v.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

fn hex(value: Option<&str>) -> u64 {
    value.and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(u64::MAX)
}

/// Reads the jail-relevant facts of process `pid`.
pub fn read_facts(pid: i32) -> Result<ProcessFacts, Violation> {
    read_facts_with(pid, false)
}

fn read_facts_with(pid: i32, skip_private: bool) -> Result<ProcessFacts, Violation> {
    let unreadable = |what: String| {
        move |e: std::io::Error| Violation::Unreadable {
            what,
            error: e.to_string(),
        }
    };
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(unreadable(format!("/proc/{pid}/status")))?;
    let mut facts = ProcessFacts {
        uids: ids(field(&status, "Uid:")),
        gids: ids(field(&status, "Gid:")),
        cap_eff: hex(field(&status, "CapEff:")),
        cap_prm: hex(field(&status, "CapPrm:")),
        cap_inh: hex(field(&status, "CapInh:")),
        cap_bnd: hex(field(&status, "CapBnd:")),
        cap_amb: hex(field(&status, "CapAmb:")),
        no_new_privs: field(&status, "NoNewPrivs:") == Some("1"),
        seccomp: field(&status, "Seccomp:").and_then(|v| v.parse().ok()).unwrap_or(0),
        fds: Vec::new(),
        environment_bytes: 0,
    };
    if skip_private {
        return Ok(facts);
    }
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(unreadable(format!("/proc/{pid}/fd")))?;
    for entry in dir.flatten() {
        let fd: i32 = entry.file_name().to_string_lossy().parse().unwrap_or(-1);
        let target = std::fs::read_link(entry.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        facts.fds.push((fd, target));
    }
    facts.fds.sort();
    facts.environment_bytes = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(unreadable(format!("/proc/{pid}/environ")))?
        .len();
    Ok(facts)
}

/// Checks that `pid` is jailed as expected; returns the facts, or every violation found.
pub fn verify_jailed(pid: i32, expect: &Expectation) -> Result<ProcessFacts, Vec<Violation>> {
    let facts = read_facts_with(pid, expect.skip_private).map_err(|v| vec![v])?;
    let mut violations = Vec::new();
    match expect.uid {
        Some(uid) if facts.uids.iter().any(|u| *u != uid) || facts.uids.is_empty() => {
            violations.push(Violation::WrongUid {
                expected: uid,
                found: facts.uids.clone(),
            });
        }
        None if facts.uids.contains(&0) => violations.push(Violation::RootUid(facts.uids.clone())),
        _ => {}
    }
    if let Some(gid) = expect.gid
        && (facts.gids.iter().any(|g| *g != gid) || facts.gids.is_empty())
    {
        violations.push(Violation::WrongGid {
            expected: gid,
            found: facts.gids.clone(),
        });
    }
    for (set, mask) in [
        ("CapEff", facts.cap_eff),
        ("CapPrm", facts.cap_prm),
        ("CapInh", facts.cap_inh),
        ("CapBnd", facts.cap_bnd),
        ("CapAmb", facts.cap_amb),
    ] {
        if mask != 0 && !(set == "CapBnd" && expect.allow_bounding) {
            violations.push(Violation::Capability { set, mask });
        }
    }
    if !facts.no_new_privs {
        violations.push(Violation::NoNewPrivsUnset);
    }
    if facts.seccomp != 2 {
        violations.push(Violation::SeccompMode(facts.seccomp));
    }
    for (fd, target) in &facts.fds {
        let allowed = target.starts_with("socket:")
            || target.starts_with("pipe:")
            || target == "anon_inode:[eventpoll]"
            || target == "/dev/null";
        if !allowed {
            violations.push(Violation::FileDescriptor {
                fd: *fd,
                target: target.clone(),
            });
        }
    }
    if let Some(max) = expect.max_fds
        && facts.fds.len() > max
    {
        violations.push(Violation::TooManyFds {
            found: facts.fds.len(),
            max,
        });
    }
    if facts.environment_bytes != 0 {
        violations.push(Violation::Environment {
            bytes: facts.environment_bytes,
        });
    }
    if violations.is_empty() {
        Ok(facts)
    } else {
        Err(violations)
    }
}
