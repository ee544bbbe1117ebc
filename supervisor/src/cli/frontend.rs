//! `rampart frontend http|https|tcp add|remove`, `frontend list`.

use super::*;

#[derive(Subcommand, Debug, Clone)]
pub enum FrontendAction {
    /// Routing rules of HTTP listeners.
    Http {
        #[command(subcommand)]
        action: HttpFrontendAction,
    },
    /// Routing rules of HTTPS listeners.
    Https {
        #[command(subcommand)]
        action: HttpFrontendAction,
    },
    /// TCP listeners forwarded to a cluster.
    Tcp {
        #[command(subcommand)]
        action: TcpFrontendAction,
    },
    /// List the frontends, optionally of one cluster or one hostname.
    List {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum HttpFrontendAction {
    /// Route the requests that match to a cluster.
    Add(HttpFrontendArgs),
    /// Remove a routing rule (all its fields identify it).
    Remove(HttpFrontendArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HttpFrontendArgs {
    /// The listener (IP:PORT).
    #[arg(long)]
    pub address: String,
    /// Host to match: exact, or `*.example.com`.
    #[arg(long)]
    pub hostname: String,
    /// Path to match; an empty prefix matches every path.
    #[arg(long, default_value = "")]
    pub path: String,
    #[arg(long, value_enum, default_value_t = PathKindArg::Prefix)]
    pub path_kind: PathKindArg,
    /// Method to match, upper case (any method when absent).
    #[arg(long)]
    pub method: Option<String>,
    /// The cluster that receives the matching requests.
    #[arg(long)]
    pub cluster: String,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKindArg {
    Prefix,
    Equals,
    Regex,
}

impl PathKindArg {
    fn to_proto(self) -> proto::PathKind {
        match self {
            PathKindArg::Prefix => proto::PathKind::Prefix,
            PathKindArg::Equals => proto::PathKind::Equals,
            PathKindArg::Regex => proto::PathKind::Regex,
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum TcpFrontendAction {
    /// Forward every connection of a TCP listener to a cluster.
    Add(TcpFrontendArgs),
    /// Stop forwarding a TCP listener.
    Remove(TcpFrontendArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TcpFrontendArgs {
    /// The listener (IP:PORT).
    #[arg(long)]
    pub address: String,
    #[arg(long)]
    pub cluster: String,
}

pub(super) fn http_frontend(args: &HttpFrontendArgs) -> proto::HttpFrontend {
    proto::HttpFrontend {
        address: args.address.clone(),
        hostname: args.hostname.clone(),
        path: Some(proto::PathRule {
            kind: args.path_kind.to_proto() as i32,
            value: args.path.clone(),
        }),
        method: args.method.clone().unwrap_or_default(),
        cluster_id: args.cluster.clone(),
        tags: Default::default(),
    }
}

pub(super) fn tcp_frontend(args: &TcpFrontendArgs) -> proto::TcpFrontend {
    proto::TcpFrontend {
        address: args.address.clone(),
        cluster_id: args.cluster.clone(),
    }
}

pub(super) fn frontend_kind(action: &FrontendAction) -> Kind {
    match action {
        FrontendAction::Http { action } => match action {
            HttpFrontendAction::Add(args) => Kind::AddHttpFrontend(http_frontend(args)),
            HttpFrontendAction::Remove(args) => Kind::RemoveHttpFrontend(http_frontend(args)),
        },
        FrontendAction::Https { action } => match action {
            HttpFrontendAction::Add(args) => Kind::AddHttpsFrontend(http_frontend(args)),
            HttpFrontendAction::Remove(args) => Kind::RemoveHttpsFrontend(http_frontend(args)),
        },
        FrontendAction::Tcp { action } => match action {
            TcpFrontendAction::Add(args) => Kind::AddTcpFrontend(tcp_frontend(args)),
            TcpFrontendAction::Remove(args) => Kind::RemoveTcpFrontend(tcp_frontend(args)),
        },
        FrontendAction::List { cluster, hostname } => Kind::ListFrontends(proto::FrontendFilter {
            cluster_id: cluster.clone().unwrap_or_default(),
            hostname: hostname.clone().unwrap_or_default(),
        }),
    }
}
