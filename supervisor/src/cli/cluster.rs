//! `rampart cluster add|remove|list`.

use super::*;

#[derive(Subcommand, Debug, Clone)]
pub enum ClusterAction {
    /// Add a cluster, or update it when it exists.
    Add {
        id: String,
        #[arg(long, value_enum, default_value_t = LoadBalancingArg::RoundRobin)]
        load_balancing: LoadBalancingArg,
        /// Send a cookie naming the backend and route the next requests carrying it there.
        #[arg(long)]
        sticky_session: bool,
        /// Answer plain-HTTP requests with a 301 to the same URL over HTTPS.
        #[arg(long)]
        https_redirect: bool,
    },
    /// Remove a cluster with its backends and health check (refused while frontends use it).
    Remove { id: String },
    /// List the clusters, or show one with its backends and frontends.
    List { id: Option<String> },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum LoadBalancingArg {
    RoundRobin,
    Random,
    LeastConnections,
    PowerOfTwo,
}

impl LoadBalancingArg {
    fn to_proto(self) -> proto::LoadBalancing {
        match self {
            LoadBalancingArg::RoundRobin => proto::LoadBalancing::RoundRobin,
            LoadBalancingArg::Random => proto::LoadBalancing::Random,
            LoadBalancingArg::LeastConnections => proto::LoadBalancing::LeastConnections,
            LoadBalancingArg::PowerOfTwo => proto::LoadBalancing::PowerOfTwo,
        }
    }
}

pub(super) fn cluster_kind(action: &ClusterAction) -> Kind {
    match action {
        ClusterAction::Add {
            id,
            load_balancing,
            sticky_session,
            https_redirect,
        } => Kind::AddCluster(proto::Cluster {
            cluster_id: id.clone(),
            load_balancing: load_balancing.to_proto() as i32,
            sticky_session: *sticky_session,
            https_redirect: *https_redirect,
            answer_503: String::new(),
        }),
        ClusterAction::Remove { id } => Kind::RemoveCluster(proto::ClusterId { cluster_id: id.clone() }),
        ClusterAction::List { id } => Kind::QueryClusters(proto::ClusterFilter {
            cluster_id: id.clone().unwrap_or_default(),
        }),
    }
}
