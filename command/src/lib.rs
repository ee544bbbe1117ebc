//! The vocabulary every rampart process shares: the command protocol, the configuration file,
//! and the state that both describe.
//!
//! - [`proto`]: the messages of the command socket and of the worker channel, generated from
//!   `proto/command.proto`.
//! - [`framing`]: length-delimited frames on the command socket, with a size cap checked before
//!   anything is allocated.
//! - [`channel`]: the supervisor ⇄ worker socketpair, one message per datagram with its file
//!   descriptors attached.
//! - [`config`]: the TOML configuration file and its defaults.
//! - [`kinds`]: the one table of request kinds (name, whether it changes the state, who may
//!   send it, whether a batch may hold it, which process handles it).
//! - [`state`]: the one model of the running configuration. The supervisor and every worker
//!   apply the same validated requests to it, so they agree by construction.
//!
//! This crate depends on no other rampart crate. It must never panic on bytes that come from a
//! peer: every decoder returns a typed error.

pub mod channel;
pub mod config;
pub mod framing;
pub mod keyfile;
pub mod kinds;
pub mod metrics;
pub mod state;

/// Generated protobuf messages (see `proto/command.proto`).
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/rampart.command.v1.rs"));
}

pub use kinds::{is_mutating, is_state_change, kind_info, request_info, request_kind_name, request_target};
pub use proto::{Request, Response};
