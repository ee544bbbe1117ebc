//! The command-line client of the command socket: `rampart status`, `rampart cluster add`,
//! `rampart apply -f`, ...
//!
//! Each invocation opens one connection, sends one request (two for `apply`: a dump, then the
//! batch) and prints the answer as a table or as JSON. The client is an ordinary peer of the
//! supervisor: it writes delimited `Request` frames and reads `Response` frames, skipping
//! `PROCESSING` ones until the final `OK` or `FAILURE`.
//!
//! The client reads the files a person names on its own command line (certificates, the file of
//! `apply -f`) and sends their contents, because the supervisor's jail may not let it read them.
//! `state save|load` paths are the exception: they name files in the supervisor's state
//! directory, so they are sent as given.
//!
//! Exit codes: 0 when the supervisor answered OK, 1 when it answered FAILURE (its message on
//! stderr), 2 for unreadable files, connection and protocol errors.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::{Args, Subcommand, ValueEnum};
use rampart_command::config::{self, Config, ConfigError};
use rampart_command::framing::{self, FrameError, FrameReader};
use rampart_command::proto::{self, Request, Response, ResponseStatus, request::Kind, response::Content};
use rampart_command::request_kind_name;
use rampart_command::state::{self, FrontendKey};

/// Health check defaults, the same as the configuration file's.
const HEALTH_CHECK_INTERVAL_MS: u32 = 5_000;
const HEALTH_CHECK_TIMEOUT_MS: u32 = 2_000;
const HEALTH_CHECK_THRESHOLD: u32 = 3;
const HEALTH_CHECK_EXPECTED_STATUS: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the command socket {}: {source}; is the supervisor running (`rampart start`)? \
         Name another socket with -s",
        socket.display()
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error on the command socket while {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading the supervisor's answer: {0}")]
    Frame(#[from] FrameError),
    #[error("the supervisor closed the connection before answering request {request_id}")]
    Closed { request_id: String },
    #[error("the supervisor answered request `{got}` while request `{expected}` was waiting")]
    WrongRequestId { expected: String, got: String },
    #[error("the supervisor answered with unknown status {status}: is it a newer version than this client?")]
    UnknownStatus { status: i32 },
    /// The supervisor answered FAILURE; the message says what was wrong and what to do.
    #[error("{message}")]
    Failure { request_id: String, message: String },
    #[error("the answer to `{kind}` has no {expected}: is the supervisor another version than this client?")]
    MissingContent { kind: &'static str, expected: &'static str },
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{flag} {value}: expected {expected}")]
    Argument {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("cannot encode the answer as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

impl ClientError {
    /// 1 when the supervisor refused the request, 2 for everything that kept it from answering.
    fn exit_code(&self) -> u8 {
        match self {
            ClientError::Failure { .. } => 1,
            _ => 2,
        }
    }
}

/// The largest answer the client reads.
const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// A connection to the command socket.
pub struct Client {
    stream: UnixStream,
    frames: FrameReader,
    show_progress: bool,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        Ok(Client {
            stream,
            // The supervisor's answers are trusted; a dump of a large state is tens of MiB.
            frames: FrameReader::new(MAX_RESPONSE_BYTES),
            show_progress: true,
        })
    }

    /// Whether [`call`](Self::call) prints the messages of PROCESSING responses on stderr (the
    /// default). JSON output turns it off so that stderr holds only errors.
    pub fn show_progress(&mut self, show: bool) {
        self.show_progress = show;
    }

    /// Sends one request (with a generated id if empty) and returns the final OK/FAILURE response,
    /// skipping PROCESSING ones (their messages go to stderr unless progress is turned off).
    /// A FAILURE is returned as a response, not an error: see [`expect_ok`].
    pub fn call(&mut self, mut request: Request) -> Result<Response, ClientError> {
        if request.id.is_empty() {
            request.id = next_request_id();
        }
        if let Err(source) = framing::write_frame(&mut self.stream, &request) {
            // A supervisor that refuses the connection answers, then closes: the answer says why,
            // where the write only says "broken pipe".
            if source.kind() == io::ErrorKind::BrokenPipe
                && let Ok(Some(response)) = self.frames.read_message::<Response, _>(&mut self.stream)
                && response.status == ResponseStatus::Failure as i32
            {
                return Ok(response);
            }
            return Err(ClientError::Io {
                action: "sending the request",
                source,
            });
        }
        loop {
            let response = self
                .frames
                .read_message::<Response, _>(&mut self.stream)?
                .ok_or_else(|| ClientError::Closed {
                    request_id: request.id.clone(),
                })?;
            // An answer the supervisor could not tie to a request (a frame it could not decode)
            // carries no id.
            if !response.request_id.is_empty() && response.request_id != request.id {
                return Err(ClientError::WrongRequestId {
                    expected: request.id,
                    got: response.request_id,
                });
            }
            match ResponseStatus::try_from(response.status) {
                Ok(ResponseStatus::Processing) => {
                    if self.show_progress && !response.message.is_empty() {
                        warn(&response.message);
                    }
                }
                Ok(ResponseStatus::Ok | ResponseStatus::Failure) => return Ok(response),
                Err(_) => {
                    return Err(ClientError::UnknownStatus {
                        status: response.status,
                    });
                }
            }
        }
    }
}

/// Turns a FAILURE response into [`ClientError::Failure`].
pub fn expect_ok(response: Response) -> Result<Response, ClientError> {
    if response.status == ResponseStatus::Failure as i32 {
        let message = if response.message.is_empty() {
            "the supervisor refused the request without saying why".to_string()
        } else {
            response.message
        };
        return Err(ClientError::Failure {
            request_id: response.request_id,
            message,
        });
    }
    Ok(response)
}

fn next_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("cli-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn request_of(kind: Kind) -> Request {
    Request {
        id: String::new(),
        kind: Some(kind),
    }
}

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Subcommand, Debug, Clone)]
pub enum ClientCommand {
    /// Show the supervisor's version, state hash and what the state holds.
    Status,
    /// List the workers and what their jails enforce.
    Workers,
    /// Add, remove or list clusters.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Add, remove or list frontends: the rules that route requests to clusters.
    Frontend {
        #[command(subcommand)]
        action: FrontendAction,
    },
    /// Add or remove the servers of a cluster.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Add, remove, activate, deactivate or list listeners.
    Listener {
        #[command(subcommand)]
        action: ListenerAction,
    },
    /// Add, replace, remove or list the certificates of HTTPS listeners.
    Certificate {
        #[command(subcommand)]
        action: CertificateAction,
    },
    /// Save, load or dump the whole configuration.
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// Make the running configuration match a configuration file, in one atomic batch that adds,
    /// updates and removes (listeners included).
    Apply {
        /// The configuration file.
        #[arg(short, long)]
        file: PathBuf,
        /// Print the changes the supervisor computed, and the state they apply to, without
        /// applying them.
        #[arg(long)]
        dry_run: bool,
        /// Apply only if the running state still has this hash (the `base` a dry run printed),
        /// so that what is applied is exactly what was reviewed.
        #[arg(long, value_name = "HASH")]
        expect_state: Option<String>,
    },
    /// Stop the supervisor and its workers, letting in-flight requests finish.
    Shutdown {
        /// Stop now, closing in-flight connections.
        #[arg(long)]
        hard: bool,
    },
    /// Set, remove or list active health checks.
    HealthCheck {
        #[command(subcommand)]
        action: HealthCheckAction,
    },
    /// Print the access policy and worker profile the running supervisor enforces.
    #[command(name = "access")]
    Policy,
    /// Read the access policy file again (admin only; audited).
    ReloadPolicy,
    /// Change the log filter of the supervisor and its workers.
    Logging {
        /// A filter such as `info` or `debug`.
        filter: String,
    },
    /// Query the workers' metrics.
    Metrics {
        /// Only the metrics of this cluster.
        #[arg(long)]
        cluster: Option<String>,
    },
}

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

#[derive(Subcommand, Debug, Clone)]
pub enum ListenerAction {
    /// Add a listener (active unless --inactive). Refused when the address has a listener with
    /// other settings: change those with `listener update`.
    Add {
        /// The address to listen on (IP:PORT).
        #[arg(long)]
        address: String,
        #[arg(long, value_enum)]
        protocol: ProtocolArg,
        /// Create it without accepting connections yet.
        #[arg(long)]
        inactive: bool,
        #[command(flatten)]
        fields: ListenerFields,
    },
    /// Change the given settings of a listener in place; the others keep their values.
    Update {
        /// The listener's address (IP:PORT).
        address: String,
        #[command(flatten)]
        fields: ListenerFields,
    },
    /// Remove a listener (refused while frontends or certificates use it).
    Remove {
        #[arg(long)]
        address: String,
    },
    /// Start accepting connections on a listener.
    Activate {
        #[arg(long)]
        address: String,
    },
    /// Stop accepting connections on a listener.
    Deactivate {
        #[arg(long)]
        address: String,
    },
    /// List the listeners.
    List,
}

/// A listener's settings, each optional: `listener add` takes what is given (defaults for the
/// rest), `listener update` changes exactly what is given.
#[derive(Args, Debug, Clone, Default)]
pub struct ListenerFields {
    /// Address announced to backends in forwarding headers, when it differs (empty: none).
    #[arg(long, value_name = "IP:PORT")]
    pub public_address: Option<String>,
    /// Milliseconds a client connection may stay silent (0: the global default).
    #[arg(long, value_name = "MS")]
    pub client_idle_timeout_ms: Option<u32>,
    /// Milliseconds a client has to send a whole request head (0: the global default).
    #[arg(long, value_name = "MS")]
    pub request_timeout_ms: Option<u32>,
    /// Milliseconds to connect to a backend (0: the global default).
    #[arg(long, value_name = "MS")]
    pub backend_connect_timeout_ms: Option<u32>,
    /// Milliseconds a backend has to answer (0: the global default).
    #[arg(long, value_name = "MS")]
    pub backend_response_timeout_ms: Option<u32>,
    /// HTTPS: the lowest TLS version accepted, 1.2 or 1.3 (empty: 1.2).
    #[arg(long, value_name = "VERSION")]
    pub tls_min_version: Option<String>,
    /// HTTPS: TLS 1.2 cipher suites, separated by `:` (empty: the defaults).
    #[arg(long, value_name = "LIST")]
    pub cipher_suites: Option<String>,
    /// HTTPS: key exchange groups, most preferred first, separated by `:` (empty: the defaults).
    #[arg(long, value_name = "LIST")]
    pub groups: Option<String>,
    /// The body of a default answer, `CODE=FILE` (read from FILE); `CODE=` removes it. Repeat
    /// for each code.
    #[arg(long = "answer", value_name = "CODE=FILE")]
    pub answers: Vec<String>,
    /// HTTPS: close a connection whose TLS handshake is not complete after this many
    /// milliseconds (0: the global timeouts.tls_handshake).
    #[arg(long, value_name = "MS")]
    pub tls_handshake_timeout_ms: Option<u32>,
    /// HTTPS: the certificate served when the SNI names none of the listener's certificates
    /// (its fingerprint, or a server name one of them serves; empty: the first by name).
    #[arg(long, value_name = "FINGERPRINT|NAME")]
    pub default_certificate: Option<String>,
    /// HTTPS: refuse a handshake whose SNI names no certificate, or that has no SNI, with the
    /// alert unrecognized_name instead of serving a default (`--strict-sni false` turns it off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub strict_sni: Option<bool>,
}

impl ListenerFields {
    /// The listener these flags describe, and the names of the fields they set (the mask of
    /// `update_listener`). Reads the answer files.
    fn to_listener(&self) -> Result<(proto::Listener, Vec<String>), ClientError> {
        let list = |text: &str| -> Vec<String> {
            text.split([':', ','])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        let mut l = proto::Listener::default();
        let mut fields = Vec::new();
        let mut set = |name: &str, given: bool| {
            if given {
                fields.push(name.to_string());
            }
        };
        if let Some(v) = &self.public_address {
            l.public_address.clone_from(v);
        }
        set("public_address", self.public_address.is_some());
        l.client_idle_timeout_ms = self.client_idle_timeout_ms.unwrap_or(0);
        set("client_idle_timeout_ms", self.client_idle_timeout_ms.is_some());
        l.request_timeout_ms = self.request_timeout_ms.unwrap_or(0);
        set("request_timeout_ms", self.request_timeout_ms.is_some());
        l.backend_connect_timeout_ms = self.backend_connect_timeout_ms.unwrap_or(0);
        set("backend_connect_timeout_ms", self.backend_connect_timeout_ms.is_some());
        l.backend_response_timeout_ms = self.backend_response_timeout_ms.unwrap_or(0);
        set(
            "backend_response_timeout_ms",
            self.backend_response_timeout_ms.is_some(),
        );
        if let Some(v) = &self.tls_min_version {
            l.tls_min_version.clone_from(v);
        }
        set("tls_min_version", self.tls_min_version.is_some());
        if let Some(v) = &self.cipher_suites {
            l.cipher_suites = list(v);
        }
        set("cipher_suites", self.cipher_suites.is_some());
        if let Some(v) = &self.groups {
            l.groups = list(v);
        }
        set("groups", self.groups.is_some());
        l.tls_handshake_timeout_ms = self.tls_handshake_timeout_ms.unwrap_or(0);
        set("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms.is_some());
        if let Some(v) = &self.default_certificate {
            l.default_certificate.clone_from(v);
        }
        set("default_certificate", self.default_certificate.is_some());
        l.strict_sni = self.strict_sni.unwrap_or(false);
        set("strict_sni", self.strict_sni.is_some());
        for answer in &self.answers {
            let Some((code, file)) = answer.split_once('=') else {
                return Err(ClientError::Argument {
                    flag: "--answer",
                    value: answer.clone(),
                    expected: "CODE=FILE, such as 404=/etc/rampart/404.html (CODE= removes the answer)",
                });
            };
            let code = code.trim().to_string();
            if !file.is_empty() {
                let body = std::fs::read_to_string(file).map_err(|source| ClientError::ReadFile {
                    path: PathBuf::from(file),
                    source,
                })?;
                l.answers.insert(code.clone(), body);
            }
            set(&format!("answers.{code}"), true);
        }
        Ok((l, fields))
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolArg {
    Http,
    Https,
    Tcp,
}

impl ProtocolArg {
    fn to_proto(self) -> proto::Protocol {
        match self {
            ProtocolArg::Http => proto::Protocol::Http,
            ProtocolArg::Https => proto::Protocol::Https,
            ProtocolArg::Tcp => proto::Protocol::Tcp,
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum CertificateAction {
    /// Add a certificate to an HTTPS listener.
    Add {
        /// The HTTPS listener (IP:PORT).
        #[arg(long)]
        address: String,
        #[command(flatten)]
        files: CertificateFiles,
    },
    /// Replace a certificate of an HTTPS listener in one step.
    Replace {
        #[arg(long)]
        address: String,
        /// Fingerprint of the certificate to replace (see `certificate list`).
        #[arg(long)]
        old_fingerprint: String,
        #[command(flatten)]
        files: CertificateFiles,
    },
    /// Remove a certificate from an HTTPS listener.
    Remove {
        #[arg(long)]
        address: String,
        #[arg(long)]
        fingerprint: String,
    },
    /// List certificates, optionally of one listener.
    List {
        #[arg(long)]
        address: Option<String>,
        /// Only the certificates that answer for this server name.
        #[arg(long)]
        name: Option<String>,
    },
}

/// PEM files read by the client; their contents are sent.
#[derive(Args, Debug, Clone)]
pub struct CertificateFiles {
    /// PEM file of the leaf certificate.
    #[arg(long)]
    pub certificate: PathBuf,
    /// PEM file of an intermediate certificate (repeat for each).
    #[arg(long)]
    pub chain: Vec<PathBuf>,
    /// PEM file of the private key.
    #[arg(long)]
    pub key: PathBuf,
    /// Server name it answers for (repeat for each; default: the names in the certificate).
    #[arg(long)]
    pub name: Vec<String>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum StateAction {
    /// Save the state to a file of the supervisor's state directory.
    Save {
        /// Relative to the supervisor's state directory.
        path: String,
    },
    /// Replace the state with one saved in the supervisor's state directory.
    Load {
        /// Relative to the supervisor's state directory.
        path: String,
    },
    /// Print the requests that rebuild the running state, and its hash.
    Dump,
}

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

/// The request a command sends, or `None` for `apply`, which needs the running state first.
/// Reads the files the command names.
fn to_request(command: &ClientCommand) -> Result<Option<Request>, ClientError> {
    let kind = match command {
        ClientCommand::Status => Kind::Status(proto::Empty {}),
        ClientCommand::Workers => Kind::ListWorkers(proto::Empty {}),
        ClientCommand::Cluster { action } => cluster_kind(action),
        ClientCommand::Frontend { action } => frontend_kind(action),
        ClientCommand::Backend { action } => backend_kind(action),
        ClientCommand::Listener { action } => listener_kind(action)?,
        ClientCommand::Certificate { action } => certificate_kind(action)?,
        ClientCommand::State { action } => match action {
            StateAction::Save { path } => Kind::SaveState(proto::StatePath { path: path.clone() }),
            StateAction::Load { path } => Kind::LoadState(proto::StatePath { path: path.clone() }),
            StateAction::Dump => Kind::DumpState(proto::Empty {}),
        },
        ClientCommand::Apply { .. } => return Ok(None),
        ClientCommand::Shutdown { hard: false } => Kind::SoftStop(proto::Empty {}),
        ClientCommand::Shutdown { hard: true } => Kind::HardStop(proto::Empty {}),
        ClientCommand::HealthCheck { action } => health_check_kind(action),
        ClientCommand::Policy => Kind::ShowPolicy(proto::Empty {}),
        ClientCommand::ReloadPolicy => Kind::ReloadPolicy(proto::Empty {}),
        ClientCommand::Logging { filter } => Kind::SetLoggingLevel(proto::LoggingLevel { filter: filter.clone() }),
        ClientCommand::Metrics { cluster } => Kind::QueryMetrics(proto::MetricsQuery {
            cluster_id: cluster.clone().unwrap_or_default(),
            names: Vec::new(),
        }),
    };
    Ok(Some(request_of(kind)))
}

fn cluster_kind(action: &ClusterAction) -> Kind {
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

fn http_frontend(args: &HttpFrontendArgs) -> proto::HttpFrontend {
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

fn tcp_frontend(args: &TcpFrontendArgs) -> proto::TcpFrontend {
    proto::TcpFrontend {
        address: args.address.clone(),
        cluster_id: args.cluster.clone(),
    }
}

fn frontend_kind(action: &FrontendAction) -> Kind {
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

fn backend_kind(action: &BackendAction) -> Kind {
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

fn listener_kind(action: &ListenerAction) -> Result<Kind, ClientError> {
    let address_of = |address: &String| proto::ListenerAddress {
        address: address.clone(),
    };
    Ok(match action {
        ListenerAction::Add {
            address,
            protocol,
            inactive,
            fields,
        } => {
            let (listener, _) = fields.to_listener()?;
            Kind::AddListener(proto::Listener {
                address: address.clone(),
                protocol: protocol.to_proto() as i32,
                active: !*inactive,
                ..listener
            })
        }
        ListenerAction::Update { address, fields } => {
            let (listener, fields) = fields.to_listener()?;
            Kind::UpdateListener(proto::ListenerUpdate {
                address: address.clone(),
                listener: Some(listener),
                fields,
            })
        }
        ListenerAction::Remove { address } => Kind::RemoveListener(address_of(address)),
        ListenerAction::Activate { address } => Kind::ActivateListener(address_of(address)),
        ListenerAction::Deactivate { address } => Kind::DeactivateListener(address_of(address)),
        ListenerAction::List => Kind::ListListeners(proto::Empty {}),
    })
}

fn read_pem(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|source| ClientError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

fn certificate(address: &str, files: &CertificateFiles) -> Result<proto::Certificate, ClientError> {
    Ok(proto::Certificate {
        address: address.to_string(),
        certificate: read_pem(&files.certificate)?,
        chain: files.chain.iter().map(|p| read_pem(p)).collect::<Result<_, _>>()?,
        key: read_pem(&files.key)?,
        names: files.name.clone(),
    })
}

fn certificate_kind(action: &CertificateAction) -> Result<Kind, ClientError> {
    Ok(match action {
        CertificateAction::Add { address, files } => Kind::AddCertificate(certificate(address, files)?),
        CertificateAction::Replace {
            address,
            old_fingerprint,
            files,
        } => Kind::ReplaceCertificate(proto::ReplaceCertificate {
            address: address.clone(),
            old_fingerprint: old_fingerprint.clone(),
            new_certificate: Some(certificate(address, files)?),
        }),
        CertificateAction::Remove { address, fingerprint } => Kind::RemoveCertificate(proto::CertificateId {
            address: address.clone(),
            fingerprint: fingerprint.clone(),
        }),
        CertificateAction::List { address, name } => Kind::ListCertificates(proto::CertificateFilter {
            address: address.clone().unwrap_or_default(),
            name: name.clone().unwrap_or_default(),
        }),
    })
}

fn health_check_kind(action: &HealthCheckAction) -> Kind {
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

// ---------------------------------------------------------------------------------------------
// Running a command

/// Runs one client command against `socket`; prints a readable table (or JSON with `json`).
/// Exit codes: 0 OK, 1 FAILURE answered by the server (message on stderr), 2 usage/connection errors.
pub fn run(command: ClientCommand, socket: &Path, json: bool) -> ExitCode {
    match execute(&command, socket, json, &mut io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            warn(&format!("error: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs `command`, writing its output on `out`.
fn execute(command: &ClientCommand, socket: &Path, json: bool, out: &mut dyn io::Write) -> Result<(), ClientError> {
    if let ClientCommand::Apply {
        file,
        dry_run,
        expect_state,
    } = command
    {
        return apply(file, *dry_run, expect_state.as_deref(), socket, json, out);
    }
    // Files are read before connecting: a typo in a path is not the supervisor's business.
    let Some(request) = to_request(command)? else {
        return Ok(());
    };
    let mut client = Client::connect(socket)?;
    client.show_progress(!json);
    let response = client.call(request)?;
    if json {
        // `state dump --json` prints the dump itself, without the response around it.
        let text = match (&response.content, response.status == ResponseStatus::Ok as i32) {
            (Some(Content::State(dump)), true) => serde_json::to_string_pretty(dump)?,
            _ => serde_json::to_string_pretty(&response)?,
        };
        print_out(out, &format!("{text}\n"))?;
        expect_ok(response)?;
    } else {
        let response = expect_ok(response)?;
        let detail = matches!(
            command,
            ClientCommand::Cluster {
                action: ClusterAction::List { id: Some(_) }
            }
        );
        print_out(out, &render(&response, detail))?;
    }
    Ok(())
}

/// Writes output; a reader that went away (`rampart cluster list | head`) is not an error.
fn print_out(out: &mut dyn io::Write, text: &str) -> Result<(), ClientError> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(ClientError::Output),
    }
}

fn warn(text: &str) {
    // Nowhere left to report a failure to write on stderr.
    let _ = writeln!(io::stderr().lock(), "{text}");
}

// ---------------------------------------------------------------------------------------------
// apply

/// Warnings about what a plan does that a person may not expect: listeners it removes (their
/// connections close), with whether it adds them back (a protocol change).
fn plan_warnings(plan: &proto::Plan) -> Vec<String> {
    let added: std::collections::BTreeSet<&str> = plan
        .requests
        .iter()
        .filter_map(|r| match &r.kind {
            Some(Kind::AddListener(l)) => Some(l.address.as_str()),
            _ => None,
        })
        .collect();
    plan.requests
        .iter()
        .filter_map(|r| match &r.kind {
            Some(Kind::RemoveListener(l)) if added.contains(l.address.as_str()) => Some(format!(
                "warning: listener {} changes protocol: it is removed and added again, closing its connections",
                l.address
            )),
            Some(Kind::RemoveListener(l)) => Some(format!(
                "warning: the file has no listener {}: it is removed and its connections are closed",
                l.address
            )),
            _ => None,
        })
        .collect()
}

/// One line per request of a plan, or "no change".
fn plan_text(plan: &proto::Plan) -> String {
    if plan.requests.is_empty() {
        return "no change\n".to_string();
    }
    plan.requests.iter().map(|r| format!("{}\n", describe(r))).collect()
}

/// `apply -f`: sends the file's whole state; the supervisor computes the difference from the
/// running state (the same code as `state load`) and applies it as one atomic batch, or only
/// returns it with `--dry-run`. With `--expect-state`, it applies only to that running state.
/// The file is validated here first, so that its errors name its lines.
fn apply(
    file: &Path,
    dry_run: bool,
    expect_state: Option<&str>,
    socket: &Path,
    json: bool,
    out: &mut dyn io::Write,
) -> Result<(), ClientError> {
    let target = Config::load(file)?.to_state()?;
    let mut requests = target.to_requests();
    if dry_run {
        // The difference needs no private key: a certificate is known by its fingerprint.
        for r in &mut requests {
            if let Some(Kind::AddCertificate(c)) = &mut r.kind {
                c.key.clear();
            }
        }
    }
    let mut client = Client::connect(socket)?;
    client.show_progress(!json);
    let response = client.call(request_of(Kind::ApplyState(proto::ApplyState {
        target: requests,
        base_state_hash: expect_state.unwrap_or_default().to_string(),
        dry_run,
    })))?;
    if json {
        print_out(out, &format!("{}\n", serde_json::to_string_pretty(&response)?))?;
        expect_ok(response)?;
        return Ok(());
    }
    let response = expect_ok(response)?;
    let Some(Content::Plan(plan)) = &response.content else {
        return Err(ClientError::MissingContent {
            kind: "apply_state",
            expected: "plan",
        });
    };
    for warning in plan_warnings(plan) {
        warn(&warning);
    }
    print_out(out, &plan_text(plan))?;
    let summary = if dry_run {
        format!(
            "dry run: nothing was applied; the running state is {}. Apply exactly this with `rampart apply -f {} --expect-state {}`\n",
            plan.base_state_hash,
            file.display(),
            plan.base_state_hash
        )
    } else if plan.applied {
        format!(
            "{}\nstate {} -> {}\n",
            response.message, plan.base_state_hash, plan.target_state_hash
        )
    } else {
        format!("{}\n", response.message)
    };
    print_out(out, &summary)
}

// ---------------------------------------------------------------------------------------------
// Human output

/// Aligned columns under a header row; the last column is not padded.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// The table, or `empty` on a line of its own when there is no row.
    fn render_or(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{empty}\n");
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(&widths) {
                let _ = write!(line, "{cell:<width$}  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

fn or_dash(value: &str) -> String {
    if value.is_empty() { "-" } else { value }.to_string()
}

fn protocol_name(value: i32) -> String {
    proto::Protocol::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |p| p.as_str_name().to_ascii_lowercase(),
    )
}

fn load_balancing_name(value: i32) -> String {
    proto::LoadBalancing::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |l| l.as_str_name().to_ascii_lowercase(),
    )
}

fn path_text(rule: Option<&proto::PathRule>) -> String {
    let rule = rule.cloned().unwrap_or_default();
    match proto::PathKind::try_from(rule.kind) {
        Ok(proto::PathKind::Prefix) if rule.value.is_empty() => "any".to_string(),
        Ok(kind) => format!("{} {}", kind.as_str_name().to_ascii_lowercase(), rule.value),
        Err(_) => format!("unknown({}) {}", rule.kind, rule.value),
    }
}

/// The readable form of a final OK response.
fn render(response: &Response, detail: bool) -> String {
    match &response.content {
        None if response.message.is_empty() => "ok\n".to_string(),
        None => format!("{}\n", response.message),
        Some(Content::State(dump)) => render_dump(dump),
        Some(Content::Clusters(list)) => render_clusters(list, detail),
        Some(Content::Frontends(list)) => render_frontends(list),
        Some(Content::Listeners(list)) => render_listeners(list),
        Some(Content::Certificates(list)) => render_certificates(list),
        Some(Content::Workers(list)) => render_workers(list),
        Some(Content::StatusReport(status)) => render_status(status),
        Some(Content::Metrics(report)) => render_metrics(report),
        Some(Content::Event(event)) => format!("{} {} {}\n", event.time_ms, event.kind, event.detail),
        Some(Content::Policy(policy)) if policy.text.ends_with('\n') => policy.text.clone(),
        Some(Content::Policy(policy)) => format!("{}\n", policy.text),
        Some(Content::HealthChecks(list)) => render_health_checks(list),
        Some(Content::Plan(plan)) => format!("{}{}\n", plan_text(plan), response.message),
    }
}

fn render_status(s: &proto::StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "version     {}", s.version);
    let _ = writeln!(out, "state hash  {}", s.state_hash);
    let _ = writeln!(out, "workers     {}", s.workers);
    let _ = writeln!(out, "listeners   {}", s.listeners);
    let _ = writeln!(out, "clusters    {}", s.clusters);
    let _ = writeln!(out, "frontends   {}", s.frontends);
    let _ = writeln!(out, "backends    {}", s.backends);
    if let Some(j) = &s.supervisor {
        let _ = writeln!(
            out,
            "supervisor  uid {} capabilities {:#x} landlock {}",
            j.uid, j.cap_effective, j.landlock_status
        );
    }
    out
}

fn render_workers(list: &proto::WorkerList) -> String {
    let mut table = Table::new(&["ID", "PID", "STATE", "UID", "LANDLOCK", "SECCOMP"]);
    for w in &list.workers {
        let (uid, landlock, seccomp) = match &w.jail {
            Some(j) => (j.uid.to_string(), or_dash(&j.landlock_status), or_dash(&j.seccomp_mode)),
            None => ("-".to_string(), "-".to_string(), "-".to_string()),
        };
        table.push(vec![
            w.id.to_string(),
            w.pid.to_string(),
            or_dash(&w.run_state),
            uid,
            landlock,
            seccomp,
        ]);
    }
    table.render_or("no workers")
}

fn render_clusters(list: &proto::ClusterList, detail: bool) -> String {
    let mut table = Table::new(&[
        "CLUSTER",
        "LOAD BALANCING",
        "STICKY",
        "HTTPS REDIRECT",
        "BACKENDS",
        "FRONTENDS",
    ]);
    for info in &list.clusters {
        let cluster = info.cluster.clone().unwrap_or_default();
        let frontends = info.http_frontends.len() + info.https_frontends.len() + info.tcp_frontends.len();
        table.push(vec![
            cluster.cluster_id,
            load_balancing_name(cluster.load_balancing),
            yes_no(cluster.sticky_session),
            yes_no(cluster.https_redirect),
            info.backends.len().to_string(),
            frontends.to_string(),
        ]);
    }
    let mut out = table.render_or("no clusters");
    if detail {
        for info in &list.clusters {
            out.push('\n');
            out.push_str(&render_backends(&info.backends));
            out.push('\n');
            out.push_str(&render_frontends(&proto::FrontendList {
                http: info.http_frontends.clone(),
                https: info.https_frontends.clone(),
                tcp: info.tcp_frontends.clone(),
            }));
        }
    }
    out
}

fn render_backends(backends: &[proto::Backend]) -> String {
    let mut table = Table::new(&["BACKEND", "ADDRESS", "WEIGHT", "BACKUP"]);
    for b in backends {
        table.push(vec![
            b.backend_id.clone(),
            b.address.clone(),
            b.weight.to_string(),
            yes_no(b.backup),
        ]);
    }
    table.render_or("no backends")
}

fn render_frontends(list: &proto::FrontendList) -> String {
    let mut table = Table::new(&["PROTOCOL", "ADDRESS", "HOSTNAME", "PATH", "METHOD", "CLUSTER"]);
    for (protocol, frontends) in [("http", &list.http), ("https", &list.https)] {
        for f in frontends {
            table.push(vec![
                protocol.to_string(),
                f.address.clone(),
                f.hostname.clone(),
                path_text(f.path.as_ref()),
                if f.method.is_empty() {
                    "any".to_string()
                } else {
                    f.method.clone()
                },
                f.cluster_id.clone(),
            ]);
        }
    }
    for f in &list.tcp {
        table.push(vec![
            "tcp".to_string(),
            f.address.clone(),
            "-".to_string(),
            "-".to_string(),
            "-".to_string(),
            f.cluster_id.clone(),
        ]);
    }
    table.render_or("no frontends")
}

fn render_listeners(list: &proto::ListenerList) -> String {
    let mut table = Table::new(&[
        "ADDRESS",
        "PROTOCOL",
        "STATE",
        "PUBLIC ADDRESS",
        "DEFAULT CERTIFICATE",
        "STRICT SNI",
        "TLS HANDSHAKE",
    ]);
    for l in &list.listeners {
        let https = l.protocol == proto::Protocol::Https as i32;
        let tls = |value: String| if https { value } else { "-".to_string() };
        table.push(vec![
            l.address.clone(),
            protocol_name(l.protocol),
            if l.active { "active" } else { "inactive" }.to_string(),
            or_dash(&l.public_address),
            tls(if l.strict_sni {
                "none (strict)".to_string()
            } else if l.default_certificate.is_empty() {
                "first name".to_string()
            } else {
                l.default_certificate.clone()
            }),
            tls(yes_no(l.strict_sni)),
            tls(if l.tls_handshake_timeout_ms == 0 {
                "default".to_string()
            } else {
                format!("{} ms", l.tls_handshake_timeout_ms)
            }),
        ]);
    }
    table.render_or("no listeners")
}

fn render_certificates(list: &proto::CertificateList) -> String {
    let mut table = Table::new(&["ADDRESS", "FINGERPRINT", "NAMES", "EXPIRES"]);
    for c in &list.certificates {
        table.push(vec![
            c.address.clone(),
            c.fingerprint.clone(),
            or_dash(&c.names.join(",")),
            utc_time(c.not_after),
        ]);
    }
    table.render_or("no certificates")
}

fn render_metrics(report: &proto::MetricsReport) -> String {
    let mut table = Table::new(&["NAME", "CLUSTER", "COUNT", "VALUE"]);
    for m in &report.values {
        table.push(vec![
            m.name.clone(),
            or_dash(&m.cluster_id),
            m.count.to_string(),
            m.value.to_string(),
        ]);
    }
    table.render_or("no metrics")
}

fn render_health_checks(list: &proto::HealthCheckList) -> String {
    let mut table = Table::new(&[
        "CLUSTER",
        "PATH",
        "INTERVAL",
        "TIMEOUT",
        "HEALTHY",
        "UNHEALTHY",
        "STATUS",
    ]);
    for h in &list.checks {
        table.push(vec![
            h.cluster_id.clone(),
            h.path.clone(),
            format!("{} ms", h.interval_ms),
            format!("{} ms", h.timeout_ms),
            h.healthy_threshold.to_string(),
            h.unhealthy_threshold.to_string(),
            h.expected_status.to_string(),
        ]);
    }
    table.render_or("no health checks")
}

fn render_dump(dump: &proto::StateDump) -> String {
    let mut out: String = dump.requests.iter().map(|r| format!("{}\n", describe(r))).collect();
    let _ = writeln!(out, "hash {}", dump.hash);
    out
}

/// Seconds since the epoch as a UTC date and time; "unknown" for 0 or before.
fn utc_time(seconds: i64) -> String {
    if seconds <= 0 {
        return "unknown".to_string();
    }
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Civil date from a day count (H. Hinnant's algorithm), with March as the first month so
    // that the leap day ends the year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        of_day / 3_600,
        of_day % 3_600 / 60
    )
}

fn frontend_text(f: &proto::HttpFrontend) -> String {
    let path = f.path.clone().unwrap_or_default();
    let key = FrontendKey {
        address: f.address.clone(),
        hostname: f.hostname.clone(),
        path_kind: path.kind,
        path: path.value,
        method: f.method.clone(),
    };
    format!("{key} -> {}", or_dash(&f.cluster_id))
}

fn certificate_text(c: &proto::Certificate) -> String {
    let fingerprint = state::certificate_fingerprint(&c.certificate).unwrap_or_else(|_| "(invalid)".to_string());
    if c.names.is_empty() {
        format!("{} {fingerprint}", c.address)
    } else {
        format!("{} {fingerprint} {}", c.address, c.names.join(","))
    }
}

/// One line for a request: its kind and the fields that identify what it changes. Never the
/// private key of a certificate.
fn describe(request: &Request) -> String {
    let detail = match &request.kind {
        None => String::new(),
        Some(kind) => match kind {
            Kind::AddCluster(c) => {
                let mut text = format!("{} {}", c.cluster_id, load_balancing_name(c.load_balancing));
                if c.sticky_session {
                    text.push_str(" sticky_session");
                }
                if c.https_redirect {
                    text.push_str(" https_redirect");
                }
                text
            }
            Kind::RemoveCluster(c) | Kind::RemoveHealthCheck(c) => c.cluster_id.clone(),
            Kind::QueryClusters(c) => c.cluster_id.clone(),
            Kind::AddHttpFrontend(f)
            | Kind::RemoveHttpFrontend(f)
            | Kind::AddHttpsFrontend(f)
            | Kind::RemoveHttpsFrontend(f) => frontend_text(f),
            Kind::AddTcpFrontend(f) | Kind::RemoveTcpFrontend(f) => {
                format!("{} -> {}", f.address, or_dash(&f.cluster_id))
            }
            Kind::ListFrontends(f) => [f.cluster_id.as_str(), f.hostname.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            Kind::AddBackend(b) => {
                let mut text = format!("{}/{} {} weight {}", b.cluster_id, b.backend_id, b.address, b.weight);
                if b.backup {
                    text.push_str(" backup");
                }
                text
            }
            Kind::RemoveBackend(b) => format!("{}/{}", b.cluster_id, b.backend_id),
            Kind::AddListener(l) => {
                let mut text = format!(
                    "{} {} {}",
                    l.address,
                    protocol_name(l.protocol),
                    if l.active { "active" } else { "inactive" }
                );
                if !l.public_address.is_empty() {
                    let _ = write!(text, " public {}", l.public_address);
                }
                if !l.default_certificate.is_empty() {
                    let _ = write!(text, " default_certificate {}", l.default_certificate);
                }
                if l.strict_sni {
                    text.push_str(" strict_sni");
                }
                if l.tls_handshake_timeout_ms != 0 {
                    let _ = write!(text, " tls_handshake {} ms", l.tls_handshake_timeout_ms);
                }
                text
            }
            Kind::RemoveListener(l) | Kind::ActivateListener(l) | Kind::DeactivateListener(l) => l.address.clone(),
            Kind::UpdateListener(u) => {
                let l = u.listener.clone().unwrap_or_default();
                let values: Vec<String> = u
                    .fields
                    .iter()
                    .map(|f| match f.as_str() {
                        "public_address" => format!("public_address={}", l.public_address),
                        "client_idle_timeout_ms" => format!("{f}={}", l.client_idle_timeout_ms),
                        "request_timeout_ms" => format!("{f}={}", l.request_timeout_ms),
                        "backend_connect_timeout_ms" => format!("{f}={}", l.backend_connect_timeout_ms),
                        "backend_response_timeout_ms" => format!("{f}={}", l.backend_response_timeout_ms),
                        "tls_min_version" => format!("{f}={}", l.tls_min_version),
                        "cipher_suites" => format!("{f}={}", l.cipher_suites.join(":")),
                        "groups" => format!("{f}={}", l.groups.join(":")),
                        "tls_handshake_timeout_ms" => format!("{f}={}", l.tls_handshake_timeout_ms),
                        "default_certificate" => format!("{f}={}", l.default_certificate),
                        "strict_sni" => format!("{f}={}", l.strict_sni),
                        other => other.to_string(),
                    })
                    .collect();
                format!("{} {}", u.address, values.join(" "))
            }
            Kind::AddCertificate(c) => certificate_text(c),
            Kind::ReplaceCertificate(r) => {
                let new = r
                    .new_certificate
                    .as_ref()
                    .and_then(|c| state::certificate_fingerprint(&c.certificate).ok())
                    .unwrap_or_else(|| "(invalid)".to_string());
                format!("{} {} -> {new}", r.address, r.old_fingerprint)
            }
            Kind::RemoveCertificate(c) => format!("{} {}", c.address, c.fingerprint),
            Kind::ListCertificates(c) => [c.address.as_str(), c.name.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            Kind::SaveState(p) | Kind::LoadState(p) => p.path.clone(),
            Kind::Apply(b) => format!("{} request(s)", b.requests.len()),
            Kind::ApplyState(a) => format!("state of {} request(s)", a.target.len()),
            Kind::QueryMetrics(m) => m.cluster_id.clone(),
            Kind::SetLoggingLevel(l) => l.filter.clone(),
            Kind::UpgradeWorker(w) => w.id.to_string(),
            Kind::SetHealthCheck(h) => format!(
                "{} {} every {} ms, timeout {} ms",
                h.cluster_id, h.path, h.interval_ms, h.timeout_ms
            ),
            Kind::ConfigureMetrics(m) => {
                if m.enabled {
                    format!("statsd {} prefix {}", m.statsd_address, m.prefix)
                } else {
                    "disabled".to_string()
                }
            }
            Kind::SubscribeEvents(e) => e.kinds.join(","),
            Kind::DumpState(_)
            | Kind::Status(_)
            | Kind::ListWorkers(_)
            | Kind::ListListeners(_)
            | Kind::SoftStop(_)
            | Kind::HardStop(_)
            | Kind::UpgradeMain(_)
            | Kind::ListHealthChecks(_)
            | Kind::ShowPolicy(_)
            | Kind::ReloadPolicy(_) => String::new(),
        },
    };
    let kind = request_kind_name(request);
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::os::unix::net::UnixListener;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> ClientCommand {
        let argv = std::iter::once("rampart").chain(args.iter().copied());
        TestCli::try_parse_from(argv).unwrap().command
    }

    fn kind_of(args: &[&str]) -> Kind {
        to_request(&parse(args)).unwrap().unwrap().kind.unwrap()
    }

    #[test]
    fn command_line_definition_is_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn backend_add_defaults_id_to_address_and_weight_to_100() {
        let kind = kind_of(&["backend", "add", "--cluster", "shop", "--address", "10.0.0.1:8080"]);
        assert_eq!(
            kind,
            Kind::AddBackend(proto::Backend {
                cluster_id: "shop".into(),
                backend_id: "10.0.0.1:8080".into(),
                address: "10.0.0.1:8080".into(),
                weight: 100,
                backup: false,
            })
        );
        let kind = kind_of(&[
            "backend",
            "add",
            "--cluster",
            "shop",
            "--address",
            "10.0.0.2:80",
            "--id",
            "b2",
            "--weight",
            "5",
            "--backup",
        ]);
        assert!(matches!(kind, Kind::AddBackend(b) if b.backend_id == "b2" && b.weight == 5 && b.backup));
        assert_eq!(
            kind_of(&["backend", "remove", "--cluster", "shop", "--id", "b2"]),
            Kind::RemoveBackend(proto::BackendId {
                cluster_id: "shop".into(),
                backend_id: "b2".into(),
            })
        );
    }

    #[test]
    fn frontend_requests() {
        let kind = kind_of(&[
            "frontend",
            "http",
            "add",
            "--address",
            "0.0.0.0:80",
            "--hostname",
            "example.com",
            "--path",
            "/login",
            "--path-kind",
            "equals",
            "--method",
            "POST",
            "--cluster",
            "shop",
        ]);
        assert_eq!(
            kind,
            Kind::AddHttpFrontend(proto::HttpFrontend {
                address: "0.0.0.0:80".into(),
                hostname: "example.com".into(),
                path: Some(proto::PathRule {
                    kind: proto::PathKind::Equals as i32,
                    value: "/login".into(),
                }),
                method: "POST".into(),
                cluster_id: "shop".into(),
                tags: Default::default(),
            })
        );
        // Without --path: an empty prefix, every path, as in the configuration file.
        let kind = kind_of(&[
            "frontend",
            "https",
            "remove",
            "--address",
            "0.0.0.0:443",
            "--hostname",
            "a.com",
            "--cluster",
            "c",
        ]);
        assert!(matches!(kind, Kind::RemoveHttpsFrontend(f)
            if f.path == Some(proto::PathRule { kind: proto::PathKind::Prefix as i32, value: String::new() })
                && f.method.is_empty()));
        assert_eq!(
            kind_of(&["frontend", "tcp", "add", "--address", "0.0.0.0:5432", "--cluster", "db"]),
            Kind::AddTcpFrontend(proto::TcpFrontend {
                address: "0.0.0.0:5432".into(),
                cluster_id: "db".into(),
            })
        );
        assert_eq!(
            kind_of(&["frontend", "list", "--hostname", "a.com"]),
            Kind::ListFrontends(proto::FrontendFilter {
                cluster_id: String::new(),
                hostname: "a.com".into(),
            })
        );
    }

    #[test]
    fn cluster_listener_and_other_requests() {
        assert_eq!(
            kind_of(&[
                "cluster",
                "add",
                "shop",
                "--load-balancing",
                "least_connections",
                "--sticky-session"
            ]),
            Kind::AddCluster(proto::Cluster {
                cluster_id: "shop".into(),
                load_balancing: proto::LoadBalancing::LeastConnections as i32,
                sticky_session: true,
                https_redirect: false,
                answer_503: String::new(),
            })
        );
        assert_eq!(
            kind_of(&["cluster", "list"]),
            Kind::QueryClusters(proto::ClusterFilter::default())
        );
        let kind = kind_of(&[
            "listener",
            "add",
            "--address",
            "0.0.0.0:443",
            "--protocol",
            "https",
            "--inactive",
        ]);
        assert!(matches!(kind, Kind::AddListener(l)
            if l.protocol == proto::Protocol::Https as i32 && !l.active && l.public_address.is_empty()));
        let kind = kind_of(&["listener", "add", "--address", "0.0.0.0:80", "--protocol", "http"]);
        assert!(matches!(kind, Kind::AddListener(l) if l.active));
        let kind = kind_of(&[
            "listener",
            "add",
            "--address",
            "0.0.0.0:443",
            "--protocol",
            "https",
            "--default-certificate",
            "shop.example",
            "--tls-handshake-timeout-ms",
            "2500",
        ]);
        assert!(matches!(kind, Kind::AddListener(l)
            if l.default_certificate == "shop.example" && !l.strict_sni && l.tls_handshake_timeout_ms == 2500));
        let kind = kind_of(&[
            "listener",
            "add",
            "--address",
            "0.0.0.0:443",
            "--protocol",
            "https",
            "--strict-sni",
        ]);
        assert!(matches!(kind, Kind::AddListener(l) if l.strict_sni && l.default_certificate.is_empty()));
        assert!(matches!(
            kind_of(&["listener", "deactivate", "--address", "0.0.0.0:80"]),
            Kind::DeactivateListener(a) if a.address == "0.0.0.0:80"
        ));
        assert!(matches!(kind_of(&["shutdown"]), Kind::SoftStop(_)));
        assert!(matches!(kind_of(&["shutdown", "--hard"]), Kind::HardStop(_)));
        assert!(matches!(kind_of(&["state", "dump"]), Kind::DumpState(_)));
        assert!(matches!(kind_of(&["state", "save", "today.jsonl"]), Kind::SaveState(p) if p.path == "today.jsonl"));
        assert!(matches!(kind_of(&["status"]), Kind::Status(_)));
        assert!(matches!(kind_of(&["workers"]), Kind::ListWorkers(_)));
        assert!(matches!(kind_of(&["access"]), Kind::ShowPolicy(_)));
        assert!(matches!(kind_of(&["logging", "debug"]), Kind::SetLoggingLevel(l) if l.filter == "debug"));
        assert!(matches!(kind_of(&["metrics", "--cluster", "shop"]), Kind::QueryMetrics(m) if m.cluster_id == "shop"));
        assert_eq!(
            kind_of(&["health-check", "set", "--cluster", "shop", "--path", "/health"]),
            Kind::SetHealthCheck(proto::HealthCheck {
                cluster_id: "shop".into(),
                path: "/health".into(),
                interval_ms: 5_000,
                timeout_ms: 2_000,
                healthy_threshold: 3,
                unhealthy_threshold: 3,
                expected_status: 200,
            })
        );
        assert!(to_request(&parse(&["apply", "-f", "rampart.toml"])).unwrap().is_none());
    }

    fn pem(label: &str, base64: &str) -> String {
        format!("-----BEGIN {label}-----\n{base64}\n-----END {label}-----\n")
    }

    #[test]
    fn certificate_add_sends_file_contents() {
        let dir = std::env::temp_dir().join(format!("rampart-client-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, chain, key) = (dir.join("cert.pem"), dir.join("chain.pem"), dir.join("key.pem"));
        std::fs::write(&cert, pem("CERTIFICATE", "MAEC")).unwrap();
        std::fs::write(&chain, pem("CERTIFICATE", "MAME")).unwrap();
        std::fs::write(&key, pem("PRIVATE KEY", "MAU=")).unwrap();
        let command = parse(&[
            "certificate",
            "add",
            "--address",
            "0.0.0.0:443",
            "--certificate",
            cert.to_str().unwrap(),
            "--chain",
            chain.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--name",
            "a.com",
        ]);
        let kind = to_request(&command).unwrap().unwrap().kind.unwrap();
        assert_eq!(
            kind,
            Kind::AddCertificate(proto::Certificate {
                address: "0.0.0.0:443".into(),
                certificate: pem("CERTIFICATE", "MAEC"),
                chain: vec![pem("CERTIFICATE", "MAME")],
                key: pem("PRIVATE KEY", "MAU="),
                names: vec!["a.com".into()],
            })
        );
        // The key never appears in the one-line description.
        let line = describe(&request_of(kind));
        assert!(line.starts_with("add_certificate 0.0.0.0:443 "), "{line}");
        assert!(!line.contains("PRIVATE"), "{line}");

        std::fs::remove_file(&key).unwrap();
        let err = to_request(&command).unwrap_err();
        assert!(
            matches!(&err, ClientError::ReadFile { path, .. } if *path == key),
            "{err:?}"
        );
        assert_eq!(err.exit_code(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cluster_table() {
        let list = proto::ClusterList {
            clusters: vec![
                proto::ClusterInfo {
                    cluster: Some(proto::Cluster {
                        cluster_id: "shop".into(),
                        load_balancing: proto::LoadBalancing::LeastConnections as i32,
                        sticky_session: true,
                        ..Default::default()
                    }),
                    backends: vec![proto::Backend::default(); 3],
                    http_frontends: vec![proto::HttpFrontend::default(); 2],
                    https_frontends: vec![proto::HttpFrontend::default()],
                    tcp_frontends: vec![],
                },
                proto::ClusterInfo {
                    cluster: Some(proto::Cluster {
                        cluster_id: "db".into(),
                        https_redirect: true,
                        ..Default::default()
                    }),
                    backends: vec![proto::Backend::default(); 12],
                    tcp_frontends: vec![proto::TcpFrontend::default()],
                    ..Default::default()
                },
            ],
        };
        let expected = "\
CLUSTER  LOAD BALANCING     STICKY  HTTPS REDIRECT  BACKENDS  FRONTENDS
shop     least_connections  yes     no              3         3
db       round_robin        no      yes             12        1
";
        assert_eq!(render_clusters(&list, false), expected);
        assert_eq!(render_clusters(&proto::ClusterList::default(), false), "no clusters\n");
    }

    #[test]
    fn cluster_detail_shows_backends_and_frontends() {
        let list = proto::ClusterList {
            clusters: vec![proto::ClusterInfo {
                cluster: Some(proto::Cluster {
                    cluster_id: "shop".into(),
                    ..Default::default()
                }),
                backends: vec![proto::Backend {
                    cluster_id: "shop".into(),
                    backend_id: "b1".into(),
                    address: "10.0.0.1:8080".into(),
                    weight: 100,
                    backup: false,
                }],
                http_frontends: vec![proto::HttpFrontend {
                    address: "0.0.0.0:80".into(),
                    hostname: "shop.example".into(),
                    path: Some(proto::PathRule {
                        kind: proto::PathKind::Prefix as i32,
                        value: "/api".into(),
                    }),
                    method: String::new(),
                    cluster_id: "shop".into(),
                    tags: Default::default(),
                }],
                ..Default::default()
            }],
        };
        let expected = "\
CLUSTER  LOAD BALANCING  STICKY  HTTPS REDIRECT  BACKENDS  FRONTENDS
shop     round_robin     no      no              1         1

BACKEND  ADDRESS        WEIGHT  BACKUP
b1       10.0.0.1:8080  100     no

PROTOCOL  ADDRESS     HOSTNAME      PATH         METHOD  CLUSTER
http      0.0.0.0:80  shop.example  prefix /api  any     shop
";
        assert_eq!(render_clusters(&list, true), expected);
    }

    #[test]
    fn listener_table() {
        let list = proto::ListenerList {
            listeners: vec![
                proto::Listener {
                    address: "0.0.0.0:80".into(),
                    protocol: proto::Protocol::Http as i32,
                    active: true,
                    ..Default::default()
                },
                proto::Listener {
                    address: "[::]:443".into(),
                    protocol: proto::Protocol::Https as i32,
                    public_address: "203.0.113.7:443".into(),
                    active: false,
                    default_certificate: "a.example".into(),
                    tls_handshake_timeout_ms: 1500,
                    ..Default::default()
                },
            ],
        };
        let expected = "\
ADDRESS     PROTOCOL  STATE     PUBLIC ADDRESS   DEFAULT CERTIFICATE  STRICT SNI  TLS HANDSHAKE
0.0.0.0:80  http      active    -                -                    -           -
[::]:443    https     inactive  203.0.113.7:443  a.example            no          1500 ms
";
        assert_eq!(render_listeners(&list), expected);
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc_time(0), "unknown");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00 UTC");
    }

    fn cluster(id: &str) -> Request {
        request_of(Kind::AddCluster(proto::Cluster {
            cluster_id: id.into(),
            ..Default::default()
        }))
    }

    fn backend(cluster: &str, address: &str) -> Request {
        request_of(Kind::AddBackend(proto::Backend {
            cluster_id: cluster.into(),
            backend_id: address.into(),
            address: address.into(),
            weight: 100,
            backup: false,
        }))
    }

    fn socket_path(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("rampart-client-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A server that accepts one connection, reads one request, and lets `answer` reply.
    fn serve_once<F>(path: &Path, answer: F) -> std::thread::JoinHandle<Request>
    where
        F: FnOnce(&mut UnixStream, &Request) + Send + 'static,
    {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut frames = FrameReader::default();
            let request = frames.read_message::<Request, _>(&mut stream).unwrap().unwrap();
            answer(&mut stream, &request);
            request
        })
    }

    fn response(request: &Request, status: ResponseStatus, message: &str, content: Option<Content>) -> Response {
        Response {
            request_id: request.id.clone(),
            status: status as i32,
            message: message.into(),
            content,
        }
    }

    #[test]
    fn call_skips_processing_and_returns_the_final_answer() {
        let path = socket_path("ok");
        let server = serve_once(&path, |stream, request| {
            framing::write_frame(stream, &response(request, ResponseStatus::Processing, "working", None)).unwrap();
            let report = proto::StatusReport {
                version: "0.1.0".into(),
                workers: 2,
                ..Default::default()
            };
            let ok = response(request, ResponseStatus::Ok, "", Some(Content::StatusReport(report)));
            framing::write_frame(stream, &ok).unwrap();
        });
        let mut client = Client::connect(&path).unwrap();
        client.show_progress(false);
        let answer = client.call(request_of(Kind::Status(proto::Empty {}))).unwrap();
        let sent = server.join().unwrap();
        assert!(sent.id.starts_with("cli-"), "{}", sent.id);
        assert_eq!(answer.request_id, sent.id);
        assert_eq!(answer.status, ResponseStatus::Ok as i32);
        assert!(matches!(answer.content, Some(Content::StatusReport(s)) if s.workers == 2 && s.version == "0.1.0"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_failure_is_returned_then_typed_with_exit_code_1() {
        let path = socket_path("failure");
        let server = serve_once(&path, |stream, request| {
            let failure = response(
                request,
                ResponseStatus::Failure,
                "unknown cluster `x`: add the cluster first",
                None,
            );
            framing::write_frame(stream, &failure).unwrap();
        });
        let mut client = Client::connect(&path).unwrap();
        let answer = client
            .call(request_of(Kind::RemoveCluster(proto::ClusterId {
                cluster_id: "x".into(),
            })))
            .unwrap();
        server.join().unwrap();
        let err = expect_ok(answer).unwrap_err();
        assert_eq!(err.to_string(), "unknown cluster `x`: add the cluster first");
        assert_eq!(err.exit_code(), 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_server_closing_mid_frame_is_a_typed_error() {
        let path = socket_path("truncated");
        let server = serve_once(&path, |stream, _| {
            // Declares 50 bytes, sends 10, closes.
            stream.write_all(&[50]).unwrap();
            stream.write_all(&[0u8; 10]).unwrap();
        });
        let mut client = Client::connect(&path).unwrap();
        let err = client.call(request_of(Kind::Status(proto::Empty {}))).unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(err, ClientError::Frame(FrameError::Truncated { buffered: 11 })),
            "{err:?}"
        );
        assert_eq!(err.exit_code(), 2);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_server_closing_without_answering_is_a_typed_error() {
        let path = socket_path("closed");
        let server = serve_once(&path, |_, _| {});
        let mut client = Client::connect(&path).unwrap();
        let err = client.call(request_of(Kind::Status(proto::Empty {}))).unwrap_err();
        let sent = server.join().unwrap();
        assert!(
            matches!(&err, ClientError::Closed { request_id } if *request_id == sent.id),
            "{err:?}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn apply_sends_the_file_state_and_prints_the_supervisors_plan() {
        let dir = std::env::temp_dir().join(format!("rampart-client-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rampart.toml");
        let toml = "[[listeners]]\naddress = \"127.0.0.1:8080\"\n\n[clusters.shop]\n\
                    backends = [{ address = \"10.0.0.1:80\" }]\n";
        std::fs::write(&file, toml).unwrap();
        let path = socket_path("apply");
        let socket = UnixListener::bind(&path).unwrap();
        let plan = vec![
            request_of(Kind::RemoveCluster(proto::ClusterId {
                cluster_id: "old".into(),
            })),
            cluster("shop"),
            backend("shop", "10.0.0.1:80"),
        ];
        // Two connections: the dry run, then the real one.
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for round in 0..2 {
                let (mut stream, _) = socket.accept().unwrap();
                let mut frames = FrameReader::default();
                while let Some(request) = frames.read_message::<Request, _>(&mut stream).unwrap() {
                    let content = Some(Content::Plan(proto::Plan {
                        requests: plan.clone(),
                        base_state_hash: "aa".into(),
                        target_state_hash: "bb".into(),
                        applied: round == 1,
                    }));
                    let message = if round == 0 { "dry run" } else { "applied 3 change(s)" };
                    let ok = response(&request, ResponseStatus::Ok, message, content);
                    framing::write_frame(&mut stream, &ok).unwrap();
                    seen.push(request);
                }
            }
            seen
        });
        let diff = "\
remove_cluster old
add_cluster shop round_robin
add_backend shop/10.0.0.1:80 10.0.0.1:80 weight 100
";
        let file = file.to_str().unwrap();
        let mut out = Vec::new();
        execute(&parse(&["apply", "-f", file, "--dry-run"]), &path, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(diff), "{text}");
        assert!(text.contains("--expect-state aa"), "{text}");
        let mut out = Vec::new();
        execute(
            &parse(&["apply", "-f", file, "--expect-state", "aa"]),
            &path,
            false,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{diff}applied 3 change(s)\nstate aa -> bb\n")
        );

        let seen = server.join().unwrap();
        let kinds: Vec<&str> = seen.iter().map(request_kind_name).collect();
        assert_eq!(kinds, ["apply_state", "apply_state"]);
        let (Some(Kind::ApplyState(dry)), Some(Kind::ApplyState(real))) = (&seen[0].kind, &seen[1].kind) else {
            panic!("{seen:?}");
        };
        assert!(dry.dry_run && !real.dry_run);
        assert_eq!(
            (dry.base_state_hash.as_str(), real.base_state_hash.as_str()),
            ("", "aa")
        );
        // The whole state of the file: its listener, cluster and backend.
        let sent: Vec<&str> = real.target.iter().map(request_kind_name).collect();
        assert_eq!(sent, ["add_listener", "add_cluster", "add_backend"]);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listener_update_sends_only_the_given_fields() {
        let Kind::UpdateListener(u) = kind_of(&[
            "listener",
            "update",
            "127.0.0.1:80",
            "--request-timeout-ms",
            "2500",
            "--groups",
            "X25519:P-256",
            "--answer",
            "404=",
        ]) else {
            panic!()
        };
        assert_eq!(u.address, "127.0.0.1:80");
        assert_eq!(u.fields, ["request_timeout_ms", "groups", "answers.404"]);
        let l = u.listener.unwrap();
        assert_eq!(l.request_timeout_ms, 2500);
        assert_eq!(l.groups, ["X25519", "P-256"]);
        assert!(l.answers.is_empty());
    }

    #[test]
    fn connecting_to_a_missing_socket_says_what_to_do() {
        let path = socket_path("missing");
        let err = Client::connect(&path).err().unwrap();
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("rampart start") && message.contains("-s"), "{message}");
        assert_eq!(err.exit_code(), 2);
    }
}
