//! `rampart listener add|update|remove|activate|deactivate|list`.

use super::*;

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

pub(super) fn listener_kind(action: &ListenerAction) -> Result<Kind, ClientError> {
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
