//! The one table of request kinds: for each kind of [`proto::Request`], its stable name, whether
//! it changes the configuration, who may send it, whether a batch may hold it, and which process
//! handles it.
//!
//! The access policy, the audit trail, the CLI and the supervisor's dispatcher all read this
//! table instead of matching on the request kind themselves. [`kind_info`] matches every
//! variant of the generated `request::Kind` enum with no catch-all arm, so a kind added to
//! `command.proto` without its row here does not compile.

use crate::proto::{self, request::Kind};

/// Who may send a kind of request (the access policy adds the tenant's cluster and hostname
/// patterns, and the state-path rules, on top of this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every role: read-only queries.
    AnyRole,
    /// Auditors and admins.
    Auditor,
    /// Operators and admins.
    Operator,
    /// Operators, tenants (within their clusters) and admins.
    OperatorOrTenant,
    /// Tenants (within their clusters and hostnames) and admins.
    Tenant,
    /// Admins only.
    Admin,
    /// Decided request by request: a batch is allowed when every request in it is.
    EachRequest,
}

/// Which process does the work of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// A change of the state: validated and applied by the supervisor, then by every worker,
    /// answered once they acknowledged it.
    State,
    /// The supervisor alone (queries, state files, stop, policy, logging).
    Supervisor,
    /// Not built in this version: refused with a message saying so.
    NotAvailable,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// Stable snake_case name, used by logs, the audit trail and error messages.
    pub name: &'static str,
    /// Changes the configuration (the state): recorded with state hashes before and after.
    pub changes_state: bool,
    /// Changes something (the state, a file, the process, the policy, the log level): counted
    /// against the mutating rate, and recorded `received` before it runs and `completed` after,
    /// so that it fails when the audit log cannot be written.
    pub mutating: bool,
    pub access: Access,
    /// May appear inside a batch (`apply`): exactly the state changes other than a batch.
    pub in_batch: bool,
    pub handler: Handler,
}

const fn row(name: &'static str, changes_state: bool, mutating: bool, access: Access, handler: Handler) -> KindInfo {
    KindInfo {
        name,
        changes_state,
        mutating,
        access,
        in_batch: changes_state,
        handler,
    }
}

const fn change(name: &'static str, access: Access) -> KindInfo {
    row(name, true, true, access, Handler::State)
}

const fn query(name: &'static str) -> KindInfo {
    row(name, false, false, Access::AnyRole, Handler::Supervisor)
}

const fn control(name: &'static str, access: Access) -> KindInfo {
    row(name, false, true, access, Handler::Supervisor)
}

/// The row of a request kind.
pub fn kind_info(kind: &Kind) -> &'static KindInfo {
    use Access::*;
    match kind {
        Kind::AddCluster(_) => &const { change("add_cluster", Tenant) },
        Kind::RemoveCluster(_) => &const { change("remove_cluster", Tenant) },
        Kind::QueryClusters(_) => &const { query("query_clusters") },
        Kind::AddHttpFrontend(_) => &const { change("add_http_frontend", Tenant) },
        Kind::RemoveHttpFrontend(_) => &const { change("remove_http_frontend", Tenant) },
        Kind::AddHttpsFrontend(_) => &const { change("add_https_frontend", Tenant) },
        Kind::RemoveHttpsFrontend(_) => &const { change("remove_https_frontend", Tenant) },
        Kind::AddTcpFrontend(_) => &const { change("add_tcp_frontend", Tenant) },
        Kind::RemoveTcpFrontend(_) => &const { change("remove_tcp_frontend", Tenant) },
        Kind::ListFrontends(_) => &const { query("list_frontends") },
        Kind::AddBackend(_) => &const { change("add_backend", OperatorOrTenant) },
        Kind::RemoveBackend(_) => &const { change("remove_backend", OperatorOrTenant) },
        Kind::AddListener(_) => &const { change("add_listener", Admin) },
        Kind::RemoveListener(_) => &const { change("remove_listener", Admin) },
        Kind::ActivateListener(_) => &const { change("activate_listener", Admin) },
        Kind::DeactivateListener(_) => &const { change("deactivate_listener", Admin) },
        Kind::UpdateListener(_) => &const { change("update_listener", Admin) },
        Kind::ListListeners(_) => &const { query("list_listeners") },
        Kind::AddCertificate(_) => &const { change("add_certificate", Tenant) },
        Kind::ReplaceCertificate(_) => &const { change("replace_certificate", Tenant) },
        Kind::RemoveCertificate(_) => &const { change("remove_certificate", Tenant) },
        Kind::ListCertificates(_) => &const { query("list_certificates") },
        Kind::SaveState(_) => &const { control("save_state", Admin) },
        // Loading is a state change, but the batch it becomes is only known once the file is read.
        Kind::LoadState(_) => &const { control("load_state", Admin) },
        Kind::DumpState(_) => &const { query("dump_state") },
        Kind::Apply(_) => {
            &const {
                KindInfo {
                    in_batch: false,
                    ..change("apply", EachRequest)
                }
            }
        }
        Kind::ApplyState(_) => &const { control("apply_state", EachRequest) },
        Kind::Status(_) => &const { query("status") },
        Kind::ListWorkers(_) => &const { query("list_workers") },
        Kind::QueryMetrics(_) => &const { query("query_metrics") },
        Kind::ConfigureMetrics(_) => &const { control("configure_metrics", Operator) },
        Kind::SetLoggingLevel(_) => &const { control("set_logging_level", Operator) },
        Kind::SubscribeEvents(_) => &const { row("subscribe_events", false, false, Auditor, Handler::NotAvailable) },
        Kind::SoftStop(_) => &const { control("soft_stop", Admin) },
        Kind::HardStop(_) => &const { control("hard_stop", Admin) },
        Kind::UpgradeMain(_) => &const { control("upgrade_main", Admin) },
        Kind::UpgradeWorker(_) => &const { control("upgrade_worker", Admin) },
        Kind::SetHealthCheck(_) => &const { row("set_health_check", false, true, Operator, Handler::NotAvailable) },
        Kind::RemoveHealthCheck(_) => {
            &const { row("remove_health_check", false, true, Operator, Handler::NotAvailable) }
        }
        Kind::ListHealthChecks(_) => &const { row("list_health_checks", false, false, AnyRole, Handler::NotAvailable) },
        Kind::ShowPolicy(_) => &const { query("show_policy") },
        Kind::ReloadPolicy(_) => &const { control("reload_policy", Admin) },
    }
}

/// The row of a request, `None` for a request without a kind (another message type, or a
/// newer protocol).
pub fn request_info(request: &proto::Request) -> Option<&'static KindInfo> {
    request.kind.as_ref().map(kind_info)
}

/// The kind of a request as a short stable name (`add_cluster`, `status`, ...); `none` for a
/// request without a kind.
pub fn request_kind_name(request: &proto::Request) -> &'static str {
    request_info(request).map_or("none", |i| i.name)
}

/// Whether a request changes the state (and is sent to the workers).
pub fn is_state_change(request: &proto::Request) -> bool {
    request_info(request).is_some_and(|i| i.changes_state)
}

/// Whether a request changes anything (see [`KindInfo::mutating`]).
pub fn is_mutating(request: &proto::Request) -> bool {
    request_info(request).is_some_and(|i| i.mutating)
}

fn path_text(path: &Option<proto::PathRule>) -> String {
    path.as_ref().map_or(String::new(), |p| p.value.clone())
}

/// What a request acts on, in a few words (`cluster shop-1`, `backend shop-1/b2`, ...), for the
/// audit trail's `target`; `None` for requests on nothing in particular (`status`).
pub fn request_target(request: &proto::Request) -> Option<String> {
    let http = |scheme: &str, f: &proto::HttpFrontend| {
        format!(
            "{scheme} frontend {} {}{} -> {}",
            f.address,
            f.hostname,
            path_text(&f.path),
            f.cluster_id
        )
    };
    let cert = |c: &proto::Certificate| {
        let fp = crate::state::certificate_fingerprint(&c.certificate).unwrap_or_else(|_| "(invalid)".into());
        format!("certificate {fp} on {}", c.address)
    };
    let non_empty = |what: &str, id: &str| (!id.is_empty()).then(|| format!("{what} {id}"));
    match request.kind.as_ref()? {
        Kind::AddCluster(c) => Some(format!("cluster {}", c.cluster_id)),
        Kind::RemoveCluster(c) => Some(format!("cluster {}", c.cluster_id)),
        Kind::QueryClusters(c) => non_empty("cluster", &c.cluster_id),
        Kind::AddHttpFrontend(f) | Kind::RemoveHttpFrontend(f) => Some(http("http", f)),
        Kind::AddHttpsFrontend(f) | Kind::RemoveHttpsFrontend(f) => Some(http("https", f)),
        Kind::AddTcpFrontend(f) | Kind::RemoveTcpFrontend(f) => {
            Some(format!("tcp frontend {} -> {}", f.address, f.cluster_id))
        }
        Kind::ListFrontends(f) => non_empty("cluster", &f.cluster_id),
        Kind::AddBackend(b) => Some(format!("backend {}/{} {}", b.cluster_id, b.backend_id, b.address)),
        Kind::RemoveBackend(b) => Some(format!("backend {}/{}", b.cluster_id, b.backend_id)),
        Kind::AddListener(l) => Some(format!("listener {}", l.address)),
        Kind::RemoveListener(l) | Kind::ActivateListener(l) | Kind::DeactivateListener(l) => {
            Some(format!("listener {}", l.address))
        }
        Kind::UpdateListener(u) => Some(format!("listener {} ({})", u.address, u.fields.join(", "))),
        Kind::ListListeners(_) => None,
        Kind::AddCertificate(c) => Some(cert(c)),
        Kind::ReplaceCertificate(r) => Some(format!("certificate {} on {}", r.old_fingerprint, r.address)),
        Kind::RemoveCertificate(c) => Some(format!("certificate {} on {}", c.fingerprint, c.address)),
        Kind::ListCertificates(c) => non_empty("listener", &c.address),
        Kind::SaveState(p) | Kind::LoadState(p) => Some(format!("state {}", p.path)),
        Kind::DumpState(_) => None,
        Kind::Apply(b) => Some(format!("batch of {} request(s)", b.requests.len())),
        Kind::ApplyState(a) => Some(format!("state of {} request(s)", a.target.len())),
        Kind::Status(_) | Kind::ListWorkers(_) | Kind::QueryMetrics(_) | Kind::ConfigureMetrics(_) => None,
        Kind::SetLoggingLevel(l) => Some(format!("logging {}", l.filter)),
        Kind::SubscribeEvents(_) => None,
        Kind::SoftStop(_) | Kind::HardStop(_) => Some("rampart".into()),
        Kind::UpgradeMain(_) => Some("rampart".into()),
        Kind::UpgradeWorker(w) => Some(format!("worker {}", w.id)),
        Kind::SetHealthCheck(h) => Some(format!("health check {}", h.cluster_id)),
        Kind::RemoveHealthCheck(c) => Some(format!("health check {}", c.cluster_id)),
        Kind::ListHealthChecks(_) | Kind::ShowPolicy(_) => None,
        Kind::ReloadPolicy(_) => Some("access policy".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_exactly_the_state_changes_but_batches() {
        let kinds = [
            Kind::AddCluster(Default::default()),
            Kind::Apply(Default::default()),
            Kind::ApplyState(Default::default()),
            Kind::Status(Default::default()),
            Kind::SoftStop(Default::default()),
            Kind::UpdateListener(Default::default()),
        ];
        for kind in &kinds {
            let info = kind_info(kind);
            assert_eq!(
                info.in_batch,
                info.changes_state && !matches!(kind, Kind::Apply(_)),
                "{}",
                info.name
            );
            assert!(!info.changes_state || info.mutating, "{}", info.name);
        }
    }

    #[test]
    fn names_are_unique() {
        // Every kind's field number in the proto, through prost's decoder: a request encoded with
        // tag N and an empty body decodes to that kind.
        let mut names = std::collections::BTreeSet::new();
        for tag in 1u32..200 {
            let mut bytes = Vec::new();
            prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut bytes);
            bytes.push(0);
            if let Ok(request) = <proto::Request as prost::Message>::decode(bytes.as_slice())
                && let Some(info) = request_info(&request)
            {
                assert!(names.insert(info.name), "{} twice", info.name);
            }
        }
        assert!(names.len() >= 40, "{names:?}");
    }
}
