//! `rampart health-check set|remove|list`.

use super::*;

/// Health check defaults, the same as the configuration file's.
pub(super) const HEALTH_CHECK_INTERVAL_MS: u32 = 5_000;

pub(super) const HEALTH_CHECK_TIMEOUT_MS: u32 = 2_000;

pub(super) const HEALTH_CHECK_THRESHOLD: u32 = 3;

pub(super) const HEALTH_CHECK_EXPECTED_STATUS: u32 = 200;

#[derive(Subcommand, Debug, Clone)]
pub enum HealthCheckAction {
    /// Probe a cluster's backends with HTTP requests, or change how.
    Set {
        #[arg(long)]
        cluster: String,
        /// Absolute path of the probe, such as /health.
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = HEALTH_CHECK_INTERVAL_MS)]
        interval_ms: u32,
        #[arg(long, default_value_t = HEALTH_CHECK_TIMEOUT_MS)]
        timeout_ms: u32,
        /// Successes in a row that bring a backend back.
        #[arg(long, default_value_t = HEALTH_CHECK_THRESHOLD)]
        healthy_threshold: u32,
        /// Failures in a row that take a backend out.
        #[arg(long, default_value_t = HEALTH_CHECK_THRESHOLD)]
        unhealthy_threshold: u32,
        #[arg(long, default_value_t = HEALTH_CHECK_EXPECTED_STATUS)]
        expected_status: u32,
    },
    /// Stop probing a cluster's backends.
    Remove {
        #[arg(long)]
        cluster: String,
    },
    /// List the health checks.
    List,
}

pub(super) fn health_check_kind(action: &HealthCheckAction) -> Kind {
    match action {
        HealthCheckAction::Set {
            cluster,
            path,
            interval_ms,
            timeout_ms,
            healthy_threshold,
            unhealthy_threshold,
            expected_status,
        } => Kind::SetHealthCheck(proto::HealthCheck {
            cluster_id: cluster.clone(),
            path: path.clone(),
            interval_ms: *interval_ms,
            timeout_ms: *timeout_ms,
            healthy_threshold: *healthy_threshold,
            unhealthy_threshold: *unhealthy_threshold,
            expected_status: *expected_status,
        }),
        HealthCheckAction::Remove { cluster } => Kind::RemoveHealthCheck(proto::ClusterId {
            cluster_id: cluster.clone(),
        }),
        HealthCheckAction::List => Kind::ListHealthChecks(proto::Empty {}),
    }
}
