//! What the supervisor keeps once it has started: the capabilities it still uses and the paths
//! it may still reach (landlock), derived from the configuration. `rampart policy show
//! --supervisor` prints it; `rampart-sandbox` enforces it.
//!
//! At start the supervisor is root (or holds CAP_NET_BIND_SERVICE): it reads the configuration,
//! the certificates and the keys, opens the audit log and binds the listeners. From then on it
//! needs far less, and a bug in its command-socket code should reach no further than that:
//! - capabilities: only those listed here, in every set (effective, permitted, bounding), so
//!   that neither the supervisor nor a process it executes can regain another;
//! - files: read the configuration and access policy, the libraries and account files a
//!   process start needs, and /proc; write only in the audit, state, log and command-socket
//!   directories; execute only its own binary (to start workers) and what is in its directory
//!   (to start the binary an upgrade put there). Certificate files are read
//!   once at start and never again (runtime certificates arrive over the socket as bytes).
//!
//! Network rules are not part of it: the supervisor binds listeners added at runtime, on any
//! port an admin names, and connects to nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rampart_command::config::Config;

/// A capability the supervisor keeps after start, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptCapability {
    /// The kernel's name, such as `CAP_KILL`.
    pub name: &'static str,
    pub reason: &'static str,
}

/// What may be done beneath a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAccess {
    /// Read files and list directories.
    Read,
    /// Read, and create, write, rename and remove files (directories are created at start).
    Write,
    /// Read and execute (the supervisor's own binary).
    Execute,
}

impl PathAccess {
    pub fn name(self) -> &'static str {
        match self {
            PathAccess::Read => "read",
            PathAccess::Write => "read, write, create, remove",
            PathAccess::Execute => "read, execute",
        }
    }
}

/// One landlock rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRule {
    pub path: PathBuf,
    pub access: PathAccess,
    pub reason: String,
}

/// The supervisor's narrowed privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorProfile {
    pub capabilities: Vec<KeptCapability>,
    pub paths: Vec<PathRule>,
    /// Refuse to run when landlock cannot enforce the rules (`sandbox.require_landlock`).
    pub require_landlock: bool,
}

/// The capabilities the supervisor keeps when it runs as root. Everything else (DAC override,
/// chown, sys_admin, net_admin, raw sockets, module loading, ...) is dropped from every set.
pub fn kept_capabilities() -> Vec<KeptCapability> {
    vec![
        KeptCapability {
            name: "CAP_NET_BIND_SERVICE",
            reason: "bind listeners added at runtime on ports below 1024",
        },
        KeptCapability {
            name: "CAP_SETUID",
            reason: "workers and the keyring start as root and switch to worker_user",
        },
        KeptCapability {
            name: "CAP_SETGID",
            reason: "workers and the keyring switch to worker_group and clear their groups",
        },
        KeptCapability {
            name: "CAP_SETPCAP",
            reason: "workers clear their bounding set before the uid change; the supervisor drops its own",
        },
        KeptCapability {
            name: "CAP_KILL",
            reason: "kill a worker that fails its jail check, misses a change or outlives its drain (it runs under another uid)",
        },
        KeptCapability {
            name: "CAP_SYS_PTRACE",
            reason: "read a non-dumpable worker's /proc entries (fds, environment) to verify its jail; nothing is traced",
        },
        KeptCapability {
            name: "CAP_IPC_LOCK",
            reason: "memfd_secret memory for the private keys that arrive at runtime counts as locked memory",
        },
    ]
}

fn parent(path: &Path) -> Option<PathBuf> {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

impl SupervisorProfile {
    /// The profile of a supervisor started with `config` from the binary at `binary`.
    pub fn from_config(config: &Config, binary: &Path) -> SupervisorProfile {
        let mut paths = Vec::new();
        let mut rule = |path: PathBuf, access: PathAccess, reason: &str| {
            paths.push(PathRule {
                path,
                access,
                reason: reason.to_string(),
            });
        };
        if !config.source.as_os_str().is_empty() {
            rule(config.source.clone(), PathAccess::Read, "the configuration file");
        }
        if let Some(policy) = &config.access_policy {
            rule(
                policy.clone(),
                PathAccess::Read,
                "the access policy (reload-policy reads it again)",
            );
        }
        rule(
            binary.to_path_buf(),
            PathAccess::Execute,
            "its own binary: workers and the keyring are started from it",
        );
        // Landlock ties a rule to the file it names: a package manager that replaces the binary
        // puts a new file there, which `rampart upgrade` must be able to start.
        if let Some(dir) = parent(binary) {
            rule(
                dir,
                PathAccess::Execute,
                "the directory of its binary: `rampart upgrade` starts the binary now there (a new file)",
            );
        }
        for lib in ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache"] {
            rule(
                PathBuf::from(lib),
                PathAccess::Read,
                "shared libraries a started worker's loader maps",
            );
        }
        for file in ["/etc/passwd", "/etc/group", "/etc/nsswitch.conf"] {
            rule(
                PathBuf::from(file),
                PathAccess::Read,
                "user and group names of clients and of worker_user",
            );
        }
        rule(
            PathBuf::from("/etc/localtime"),
            PathAccess::Read,
            "local time for log lines",
        );
        rule(
            PathBuf::from("/proc"),
            PathAccess::Read,
            "verify workers' jails; clients' groups and process names",
        );
        rule(
            PathBuf::from("/dev/null"),
            PathAccess::Write,
            "the standard input and output of workers",
        );
        if let Some(dir) = parent(&config.audit_log) {
            rule(
                dir,
                PathAccess::Write,
                "the audit log: appended, rotated (SIGUSR2), its directory fsynced",
            );
        }
        if let Some(key) = &config.audit.signing_key {
            rule(
                key.clone(),
                PathAccess::Read,
                "the checkpoint signing key, read again by an upgraded supervisor",
            );
        }
        if let Some(dir) = config.audit.hmac_key.as_deref().and_then(parent) {
            rule(dir, PathAccess::Write, "the HMAC key state, replaced at each epoch");
        }
        if let Some(socket) = &config.audit.syslog_socket {
            rule(
                socket.clone(),
                PathAccess::Write,
                "the syslog mirror of the audit trail",
            );
        }
        rule(
            config.state_dir.clone(),
            PathAccess::Write,
            "saved states (state save, saved_state) and state load",
        );
        if let Some(dir) = parent(&config.command_socket) {
            rule(dir, PathAccess::Write, "the command socket, removed at exit");
        }
        match config.log_target.as_str() {
            "stdout" | "stderr" | "" => {}
            "syslog" => rule(PathBuf::from("/dev/log"), PathAccess::Write, "the log, sent to syslog"),
            file => {
                if let Some(dir) = parent(Path::new(file)) {
                    rule(dir, PathAccess::Write, "the log file, reopened on SIGHUP");
                }
            }
        }
        SupervisorProfile {
            capabilities: kept_capabilities(),
            paths,
            require_landlock: config.sandbox.require_landlock,
        }
    }

    /// The profile as a reviewer reads it.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "supervisor profile (after start)");
        let _ = writeln!(
            out,
            "capabilities kept (every other one is dropped from the effective, permitted, bounding, inheritable and ambient sets):"
        );
        for c in &self.capabilities {
            let _ = writeln!(out, "  {:<22} {}", c.name, c.reason);
        }
        let _ = writeln!(
            out,
            "landlock, filesystem ({}): everything else is refused",
            if self.require_landlock {
                "required"
            } else {
                "best effort"
            }
        );
        for p in &self.paths {
            let _ = writeln!(out, "  {:<28} {:<27} {}", p.path.display(), p.access.name(), p.reason);
        }
        let _ = writeln!(
            out,
            "network: not restricted (listeners added at runtime are bound on the ports an admin names)"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_writes_only_where_the_configuration_says() {
        let config = Config::parse(
            "state_dir = \"/srv/state\"\naudit_log = \"/srv/audit/audit.log\"\ncommand_socket = \"/run/r/r.sock\"\nlog_target = \"/var/log/r/r.log\"\n",
            Path::new("/etc/rampart/rampart.toml"),
        )
        .unwrap();
        let p = SupervisorProfile::from_config(&config, Path::new("/usr/bin/rampart"));
        let writable: Vec<&Path> = p
            .paths
            .iter()
            .filter(|r| r.access == PathAccess::Write)
            .map(|r| r.path.as_path())
            .collect();
        assert_eq!(
            writable,
            [
                Path::new("/dev/null"),
                Path::new("/srv/audit"),
                Path::new("/srv/state"),
                Path::new("/run/r"),
                Path::new("/var/log/r")
            ]
        );
        let executable: Vec<&Path> = p
            .paths
            .iter()
            .filter(|r| r.access == PathAccess::Execute)
            .map(|r| r.path.as_path())
            .collect();
        assert_eq!(executable, [Path::new("/usr/bin/rampart"), Path::new("/usr/bin")]);
        assert!(
            !p.capabilities
                .iter()
                .any(|c| c.name == "CAP_DAC_OVERRIDE" || c.name == "CAP_SYS_ADMIN")
        );
        let text = p.to_text();
        assert!(text.contains("CAP_KILL") && text.contains("/srv/state"), "{text}");
    }
}
