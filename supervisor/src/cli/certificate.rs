//! `rampart certificate add|replace|remove|list`: the client reads the PEM files and sends their contents.

use super::*;

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

pub(super) fn read_pem(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|source| ClientError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn certificate(address: &str, files: &CertificateFiles) -> Result<proto::Certificate, ClientError> {
    Ok(proto::Certificate {
        address: address.to_string(),
        certificate: read_pem(&files.certificate)?,
        chain: files.chain.iter().map(|p| read_pem(p)).collect::<Result<_, _>>()?,
        key: read_pem(&files.key)?,
        names: files.name.clone(),
    })
}

pub(super) fn certificate_kind(action: &CertificateAction) -> Result<Kind, ClientError> {
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
