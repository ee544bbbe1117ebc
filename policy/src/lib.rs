//! What rampart's processes may do, as data: the worker's sandbox profile (system calls with
//! their argument conditions, landlock rules, rlimits, the unprivileged account) and, later, the
//! control-plane access rules. This crate only describes; `rampart-sandbox` enforces.
//!
//! It must never perform a system call that changes the calling process.
