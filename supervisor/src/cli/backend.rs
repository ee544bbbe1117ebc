//! `rampart backend add|remove`.

use super::*;

#[derive(Subcommand, Debug, Clone)]
pub enum BackendAction {
    /// Add a backend to a cluster, or update it when its id exists.
    Add {
        #[arg(long)]
        cluster: String,
        /// The backend's address (IP:PORT).
        #[arg(long)]
        address: String,
        /// The backend's id (default: its address).
        #[arg(long)]
        id: Option<String>,
        /// Relative share of new connections; 0 takes none.
        #[arg(long, default_value_t = config::defaults::BACKEND_WEIGHT)]
        weight: u32,
        /// Use it only when no primary backend of the cluster is available.
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend from a cluster.
    Remove {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        id: String,
    },
}

pub(super) fn backend_kind(action: &BackendAction) -> Kind {
    match action {
        BackendAction::Add {
            cluster,
            address,
            id,
            weight,
            backup,
        } => Kind::AddBackend(proto::Backend {
            cluster_id: cluster.clone(),
            backend_id: id.clone().unwrap_or_else(|| address.clone()),
            address: address.clone(),
            weight: *weight,
            backup: *backup,
        }),
        BackendAction::Remove { cluster, id } => Kind::RemoveBackend(proto::BackendId {
            cluster_id: cluster.clone(),
            backend_id: id.clone(),
        }),
    }
}
