//! The audit trail: hash-chained JSON-lines records of every configuration change, and the
//! reviewer's verifier. Writing a record must never be skipped silently: a mutating request whose
//! record cannot be written fails.
//!
//! - [`record`]: the record format, its chain hash, MAC input and checkpoint message, and the
//!   redaction of secrets (private keys become `sha256:<hex>`).
//! - [`log`]: [`AuditLog`], the writer. `append` returns only after the line is fsynced; a
//!   failed append leaves nothing in the file, and a torn tail left by a crash is cut aside
//!   (and recorded) when the log is opened again.
//! - [`keys`]: the Ed25519 checkpoint key and the forward-evolving HMAC key.
//! - [`syslog`]: the RFC 5424 mirror to the local syslog daemon, which reconnects and never
//!   blocks or fails its caller.
//! - [`verify`]: the verifier and exporter, with the exact rules it applies.
//! - [`cli`]: `rampart audit verify|show|export|keygen`.
//!
//! The supervisor calls, for each request: `append(received)` (an `Err` refuses the request,
//! nothing is applied), then applies it, then `append(completed)`; denied and malformed requests
//! get one `denied` record. This crate depends on `rampart-command` for the request types; it
//! never depends on the worker, and never panics on the bytes of a log it reads.

pub mod cli;
pub mod keys;
pub mod log;
pub mod record;
pub mod syslog;
pub mod verify;

#[cfg(test)]
mod log_tests;

pub use log::{Appended, AuditError, AuditLog, AuditOptions};
pub use record::{Actor, AuditEvent, AuditRecord, CheckpointKind, Outcome, OutcomeStatus, Stage};
pub use verify::{ProblemClass, Report, VerifyOptions};
