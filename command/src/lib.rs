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
//! - [`state`]: the one model of the running configuration. The supervisor and every worker
//!   apply the same validated requests to it, so they agree by construction.
//!
//! This crate depends on no other rampart crate. It must never panic on bytes that come from a
//! peer: every decoder returns a typed error.

pub mod channel;
pub mod config;
pub mod framing;
pub mod keyfile;
pub mod state;

/// Generated protobuf messages (see `proto/command.proto`).
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/rampart.command.v1.rs"));
}

pub use proto::{Request, Response};

/// The kind of a request as a short stable name (`add_cluster`, `status`, ...), for logs, the
/// audit trail and error messages.
pub fn request_kind_name(request: &proto::Request) -> &'static str {
    use proto::request::Kind;
    match &request.kind {
        None => "none",
        Some(kind) => match kind {
            Kind::AddCluster(_) => "add_cluster",
            Kind::RemoveCluster(_) => "remove_cluster",
            Kind::QueryClusters(_) => "query_clusters",
            Kind::AddHttpFrontend(_) => "add_http_frontend",
            Kind::RemoveHttpFrontend(_) => "remove_http_frontend",
            Kind::AddHttpsFrontend(_) => "add_https_frontend",
            Kind::RemoveHttpsFrontend(_) => "remove_https_frontend",
            Kind::AddTcpFrontend(_) => "add_tcp_frontend",
            Kind::RemoveTcpFrontend(_) => "remove_tcp_frontend",
            Kind::ListFrontends(_) => "list_frontends",
            Kind::AddBackend(_) => "add_backend",
            Kind::RemoveBackend(_) => "remove_backend",
            Kind::AddListener(_) => "add_listener",
            Kind::RemoveListener(_) => "remove_listener",
            Kind::ActivateListener(_) => "activate_listener",
            Kind::DeactivateListener(_) => "deactivate_listener",
            Kind::ListListeners(_) => "list_listeners",
            Kind::AddCertificate(_) => "add_certificate",
            Kind::ReplaceCertificate(_) => "replace_certificate",
            Kind::RemoveCertificate(_) => "remove_certificate",
            Kind::ListCertificates(_) => "list_certificates",
            Kind::SaveState(_) => "save_state",
            Kind::LoadState(_) => "load_state",
            Kind::DumpState(_) => "dump_state",
            Kind::Apply(_) => "apply",
            Kind::Status(_) => "status",
            Kind::ListWorkers(_) => "list_workers",
            Kind::QueryMetrics(_) => "query_metrics",
            Kind::ConfigureMetrics(_) => "configure_metrics",
            Kind::SetLoggingLevel(_) => "set_logging_level",
            Kind::SubscribeEvents(_) => "subscribe_events",
            Kind::SoftStop(_) => "soft_stop",
            Kind::HardStop(_) => "hard_stop",
            Kind::UpgradeMain(_) => "upgrade_main",
            Kind::UpgradeWorker(_) => "upgrade_worker",
            Kind::SetHealthCheck(_) => "set_health_check",
            Kind::RemoveHealthCheck(_) => "remove_health_check",
            Kind::ListHealthChecks(_) => "list_health_checks",
            Kind::ShowPolicy(_) => "show_policy",
            Kind::ReloadPolicy(_) => "reload_policy",
        },
    }
}
