//! The jail: enforces a [`rampart_policy`] profile on the calling process, in the order the
//! design fixes (close fds, rlimits, capabilities and uid, process flags, landlock, seccomp), and
//! reports what holds. It never decides what is allowed: that is the policy's job.
