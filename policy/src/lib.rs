//! What rampart's processes and clients may do, as data a reviewer can read.
//!
//! - [`profile`]: the worker's sandbox profile: the system calls it may make (each with its
//!   argument conditions and the reason it is needed), its landlock rules, rlimits and the
//!   unprivileged account it runs as. `rampart policy show` prints it.
//! - [`supervisor`]: what the supervisor keeps after start (capabilities, landlock paths).
//! - [`access`]: who may send which command-socket requests (roles, tenants, rate limits).
//!
//! This crate only describes; `rampart-sandbox` enforces a profile and the supervisor enforces
//! access. It must never perform a system call that changes the calling process.

pub mod access;
pub mod profile;
pub mod supervisor;
