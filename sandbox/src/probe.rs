//! What this kernel can enforce, found by entering the jail for real in a throwaway child.

use std::io::Read;
use std::os::fd::AsRawFd;

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use rampart_policy::profile::Profile;

use crate::{Jail, JailReport, JailSetup};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("creating the probe's pipe failed: {0}")]
    Pipe(nix::errno::Errno),
    #[error("forking the probe failed: {0}")]
    Fork(nix::errno::Errno),
    #[error("the probe could not enter the jail: {0}")]
    Jail(String),
    #[error("the probe ended abnormally: {0}")]
    Abnormal(String),
}

/// Forks a child that enters the jail of `profile` and reports what held.
///
/// Call it only while the process is single-threaded (the CLI, before anything else): the child
/// of a multi-threaded fork may deadlock on a lock another thread held.
pub fn trial(profile: &Profile) -> Result<JailReport, ProbeError> {
    let (read_end, write_end) = nix::unistd::pipe().map_err(ProbeError::Pipe)?;
    // SAFETY: the caller guarantees a single-threaded process, so the child may allocate.
    match unsafe { fork() }.map_err(ProbeError::Fork)? {
        ForkResult::Child => {
            drop(read_end);
            let keep = [write_end.as_raw_fd()];
            let outcome = Jail::enter(
                profile,
                JailSetup {
                    keep_fds: &keep,
                    prewarm: &mut || Ok(()),
                },
            );
            let text = match outcome {
                Ok(report) => serde_json::to_string(&Ok::<_, String>(report)),
                Err(e) => serde_json::to_string(&Err::<JailReport, _>(e.to_string())),
            }
            .unwrap_or_default();
            // SAFETY: write(2) and _exit(2) are allowed by the jail; no destructor may run here.
            unsafe {
                libc::write(keep[0], text.as_ptr().cast(), text.len());
                libc::_exit(0);
            }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut text = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut text);
            let status = waitpid(child, None).map_err(|e| ProbeError::Abnormal(e.to_string()))?;
            if !matches!(status, WaitStatus::Exited(_, 0)) {
                return Err(ProbeError::Abnormal(format!("{status:?}")));
            }
            let result: Result<JailReport, String> =
                serde_json::from_str(&text).map_err(|e| ProbeError::Abnormal(format!("unreadable report: {e}")))?;
            result.map_err(ProbeError::Jail)
        }
    }
}
