//! TLS termination with BoringSSL: one context per certificate, chosen by SNI (exact name, then
//! the most specific `*.` wildcard, then the listener's default certificate: its
//! `default_certificate`, else the one whose first name sorts first, exact names before
//! wildcards; a `strict_sni` listener refuses the handshake with the alert unrecognized_name
//! instead), TLS 1.2 minimum (1.3 when the listener asks), ALPN `http/1.1`.
//!
//! Every context carries the names of the certificate it serves, so that once a handshake is
//! done the session knows which names its connection may carry requests for (a request for
//! another host is answered 421, never routed: one tenant's certificate does not front another
//! tenant's site).
//!
//! The contexts are rebuilt from the state when certificates change; connections keep the
//! context they started with. Certificates arrive as PEM bytes in the state; nothing here reads
//! a file.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use boring::pkey::PKey;
use boring::ssl::{
    AlpnError, HandshakeError, MidHandshakeSslStream, NameType, SniError, Ssl, SslAcceptor, SslAlert, SslContext,
    SslMethod, SslStream, SslVersion,
};
use boring::x509::X509;
use mio::net::TcpStream;
use rampart_command::proto;
use rampart_command::state::State;

use crate::keyring::{KeyringClient, KeyringMethod};

/// The contexts of one HTTPS listener.
struct ListenerContexts {
    default: SslContext,
}

/// Every HTTPS listener's contexts.
#[derive(Default)]
pub struct TlsContexts {
    listeners: HashMap<String, ListenerContexts>,
    /// Every certificate's context by listener and fingerprint, with what it was built from:
    /// the next rebuild reuses it when nothing it depends on changed, so a certificate added
    /// next to thousands of others costs one context, not thousands.
    built: HashMap<(String, String), BuiltContext>,
}

struct BuiltContext {
    settings: Settings,
    chain: Vec<String>,
    names: Vec<String>,
    context: SslContext,
}

/// What a rebuild gathers about one listener.
#[derive(Default)]
struct PerListener<'a> {
    names: Names,
    first: Option<&'a proto::Certificate>,
    configured: Option<&'a proto::Certificate>,
}

/// Certificate contexts by server name, shared with the SNI callback.
#[derive(Default)]
struct Names {
    exact: HashMap<String, SslContext>,
    /// `*.example.com` stored as `.example.com`.
    wildcard: HashMap<String, SslContext>,
}

impl Names {
    fn find(&self, name: &str) -> Option<&SslContext> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ctx) = self.exact.get(&name) {
            return Some(ctx);
        }
        let mut rest = name.as_str();
        while let Some(dot) = rest.find('.') {
            let suffix = rest.get(dot..).unwrap_or("");
            if let Some(ctx) = self.wildcard.get(suffix) {
                return Some(ctx);
            }
            rest = suffix.get(1..).unwrap_or("");
        }
        None
    }
}

/// The names of the certificate a context serves, attached to the context.
type ServedNames = Arc<Vec<String>>;

fn served_index() -> Option<boring::ex_data::Index<SslContext, ServedNames>> {
    static INDEX: OnceLock<Option<boring::ex_data::Index<SslContext, ServedNames>>> = OnceLock::new();
    *INDEX.get_or_init(|| SslContext::new_ex_index().ok())
}

fn alpn<'a>(_: &mut boring::ssl::SslRef, client: &'a [u8]) -> Result<&'a [u8], AlpnError> {
    boring::ssl::select_next_proto(b"\x08http/1.1", client).ok_or(AlpnError::NOACK)
}

/// TLS settings of a listener.
#[derive(Clone, Default, PartialEq)]
struct Settings {
    min_version: String,
    cipher_suites: Vec<String>,
    groups: Vec<String>,
    /// Shared by every worker so that sessions resume on any of them.
    ticket_key: Option<Vec<u8>>,
}

fn settings(state: &State, address: &str, ticket_key: Option<&[u8]>) -> Settings {
    state
        .listeners()
        .get(address)
        .map(|l| Settings {
            min_version: l.tls_min_version.clone(),
            cipher_suites: l.cipher_suites.clone(),
            groups: l.groups.clone(),
            ticket_key: ticket_key.map(<[u8]>::to_vec),
        })
        .unwrap_or_default()
}

fn builder(settings: &Settings) -> Result<boring::ssl::SslAcceptorBuilder, String> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| e.to_string())?;
    if let Some(key) = &settings.ticket_key {
        // SAFETY: the context pointer is valid for the builder's lifetime; BoringSSL copies the
        // bytes (48; the function itself checks the length).
        let ok = unsafe { boring_sys::SSL_CTX_set_tlsext_ticket_keys(b.as_ptr(), key.as_ptr().cast(), key.len()) };
        if ok != 1 {
            return Err(format!("session ticket key of {} bytes refused", key.len()));
        }
    }
    let min = if settings.min_version == "1.3" {
        SslVersion::TLS1_3
    } else {
        SslVersion::TLS1_2
    };
    b.set_min_proto_version(Some(min)).map_err(|e| e.to_string())?;
    if !settings.cipher_suites.is_empty() {
        // TLS 1.2 suites; BoringSSL's TLS 1.3 suites are fixed.
        b.set_cipher_list(&settings.cipher_suites.join(":"))
            .map_err(|e| format!("cipher_suites {:?}: {e}", settings.cipher_suites))?;
    }
    if !settings.groups.is_empty() {
        b.set_curves_list(&settings.groups.join(":"))
            .map_err(|e| format!("groups {:?}: {e}", settings.groups))?;
    }
    // The server's order (strongest first) wins over the client's.
    b.set_options(boring::ssl::SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_alpn_select_callback(alpn);
    Ok(b)
}

/// A context builder serving one certificate.
fn certificate_builder(
    cert: &proto::Certificate,
    settings: &Settings,
    keyring: &Arc<Mutex<KeyringClient>>,
) -> Result<boring::ssl::SslAcceptorBuilder, String> {
    let mut b = builder(settings)?;
    let index = served_index().ok_or("no ex_data index for the served names")?;
    b.set_ex_data(index, Arc::new(cert.names.clone()));
    let leaf = X509::from_pem(cert.certificate.as_bytes()).map_err(|e| format!("certificate: {e}"))?;
    b.set_certificate(&leaf).map_err(|e| e.to_string())?;
    for chain in &cert.chain {
        for c in X509::stack_from_pem(chain.as_bytes()).map_err(|e| format!("chain: {e}"))? {
            b.add_extra_chain_cert(c).map_err(|e| e.to_string())?;
        }
    }
    if cert.key.is_empty() {
        // Key isolation: the keyring signs.
        let fingerprint =
            rampart_command::state::certificate_fingerprint(&cert.certificate).map_err(|e| e.to_string())?;
        b.set_private_key_method(KeyringMethod {
            fingerprint,
            client: Arc::clone(keyring),
        });
        return Ok(b);
    }
    let key = PKey::private_key_from_pem(cert.key.as_bytes()).map_err(|e| format!("key: {e}"))?;
    b.set_private_key(&key).map_err(|e| e.to_string())?;
    b.check_private_key()
        .map_err(|_| "the key does not match the certificate".to_string())?;
    Ok(b)
}

impl TlsContexts {
    /// Builds every HTTPS listener's contexts. Returns the contexts and one message per
    /// certificate that could not be used.
    pub fn from_state(
        state: &State,
        ticket_key: Option<&[u8]>,
        keyring: &Arc<Mutex<KeyringClient>>,
        previous: &mut TlsContexts,
    ) -> (TlsContexts, Vec<String>) {
        let mut errors = Vec::new();
        let mut built = HashMap::new();
        // Per listener: the contexts by name, the certificate whose first name sorts first, and
        // the one its default_certificate names (when it is usable).
        let mut per_listener: HashMap<String, PerListener<'_>> = HashMap::new();
        for (fingerprint, cert) in state.certificates() {
            let settings = settings(state, &cert.address, ticket_key);
            let id = (cert.address.clone(), fingerprint.to_string());
            let reusable = previous
                .built
                .remove(&id)
                .filter(|b| b.settings == settings && b.chain == cert.chain && b.names == cert.names);
            let ctx = match reusable {
                Some(b) => b.context,
                None => match certificate_builder(cert, &settings, keyring) {
                    Ok(b) => b.build().into_context(),
                    Err(e) => {
                        errors.push(format!("certificate {fingerprint} on {}: {e}", cert.address));
                        continue;
                    }
                },
            };
            built.insert(
                id,
                BuiltContext {
                    settings,
                    chain: cert.chain.clone(),
                    names: cert.names.clone(),
                    context: ctx.clone(),
                },
            );
            let entry = per_listener.entry(cert.address.clone()).or_default();
            // Without a default_certificate, the default (no SNI, or an unknown name) is the
            // certificate whose first name sorts first, exact names before wildcards: a rule an
            // operator can predict.
            let first = |c: &proto::Certificate| {
                let name = c.names.first().cloned().unwrap_or_default();
                (name.starts_with('*'), name)
            };
            if entry.first.is_none_or(|d| first(cert) < first(d)) {
                entry.first = Some(cert);
            }
            let configured = state
                .listeners()
                .get(&cert.address)
                .map(|l| l.default_certificate.as_str())
                .filter(|r| !r.is_empty())
                .and_then(|r| state.resolve_default(&cert.address, r));
            if configured == Some(fingerprint) {
                entry.configured = Some(cert);
            }
            for name in &cert.names {
                match name.strip_prefix('*') {
                    Some(suffix) => entry.names.wildcard.insert(suffix.to_string(), ctx.clone()),
                    None => entry.names.exact.insert(name.clone(), ctx.clone()),
                };
            }
        }
        let mut listeners = HashMap::new();
        for (address, entry) in per_listener {
            let listener = state.listeners().get(&address);
            let wants_default = listener.is_some_and(|l| !l.default_certificate.is_empty());
            // A strict listener serves no default; nor does one whose default certificate could
            // not be used (its error is logged): refusing is better than serving another one.
            let refuse_unknown =
                listener.is_some_and(|l| l.strict_sni) || (wants_default && entry.configured.is_none());
            if wants_default && entry.configured.is_none() {
                errors.push(format!(
                    "listener {address}: its default_certificate cannot be served: handshakes whose SNI names no certificate are refused"
                ));
            }
            let Some(default_cert) = entry.configured.or(entry.first) else {
                continue;
            };
            let names = Arc::new(entry.names);
            // The listener's context serves the default certificate and, when the client names
            // a server, switches to that name's context.
            match certificate_builder(default_cert, &settings(state, &address, ticket_key), keyring) {
                Ok(mut b) => {
                    let names = Arc::clone(&names);
                    b.set_servername_callback(move |ssl, alert| {
                        let found = ssl.servername(NameType::HOST_NAME).and_then(|n| names.find(n)).cloned();
                        match found {
                            Some(ctx) => ssl.set_ssl_context(&ctx).map_err(|_| SniError::ALERT_FATAL),
                            None if refuse_unknown => {
                                *alert = SslAlert::UNRECOGNIZED_NAME;
                                Err(SniError::ALERT_FATAL)
                            }
                            None => Ok(()),
                        }
                    });
                    listeners.insert(
                        address,
                        ListenerContexts {
                            default: b.build().into_context(),
                        },
                    );
                }
                Err(e) => errors.push(format!("listener {address}: {e}")),
            }
        }
        (TlsContexts { listeners, built }, errors)
    }

    /// Starts the server side of a handshake on a new connection.
    pub fn accept(&self, listener: &str, stream: TcpStream, session: usize) -> Option<FrontStream> {
        let ctx = &self.listeners.get(listener)?.default;
        let mut ssl = Ssl::new(ctx).ok()?;
        crate::keyring::tag_session(&mut ssl, session);
        Some(match ssl.accept(stream) {
            Ok(s) => FrontStream::Tls(Box::new(s)),
            Err(HandshakeError::WouldBlock(mid)) => FrontStream::Handshake(Some(Box::new(mid))),
            Err(_) => return None,
        })
    }

    pub fn serves(&self, listener: &str) -> bool {
        self.listeners.contains_key(listener)
    }
}

/// The client side of a session: plain TCP or TLS.
pub enum FrontStream {
    Plain(TcpStream),
    Handshake(Option<Box<MidHandshakeSslStream<TcpStream>>>),
    Tls(Box<SslStream<TcpStream>>),
}

impl FrontStream {
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            FrontStream::Plain(s) => Some(s),
            FrontStream::Handshake(Some(m)) => Some(m.get_ref()),
            FrontStream::Handshake(None) => None,
            FrontStream::Tls(s) => Some(s.get_ref()),
        }
    }

    pub fn tcp_mut(&mut self) -> Option<&mut TcpStream> {
        match self {
            FrontStream::Plain(s) => Some(s),
            FrontStream::Handshake(Some(m)) => Some(m.get_mut()),
            FrontStream::Handshake(None) => None,
            FrontStream::Tls(s) => Some(s.get_mut()),
        }
    }

    /// For a TLS connection whose handshake is done: the names of the certificate it served,
    /// and whether the client sent SNI. None for plain TCP and during the handshake.
    pub fn served(&self) -> Option<(&[String], bool)> {
        let FrontStream::Tls(s) = self else { return None };
        let ssl = s.ssl();
        let names = served_index()
            .and_then(|i| ssl.ssl_context().ex_data(i))
            .map_or(&[][..], |n| n.as_slice());
        Some((names, ssl.servername(NameType::HOST_NAME).is_some()))
    }

    /// The negotiated protocol version of a completed handshake ("TLSv1.3").
    pub fn tls_version(&self) -> Option<&'static str> {
        match self {
            FrontStream::Tls(s) => Some(s.ssl().version_str()),
            _ => None,
        }
    }

    /// Whether the TLS handshake is still under way.
    pub fn in_handshake(&self) -> bool {
        matches!(self, FrontStream::Handshake(_))
    }

    /// Bytes already decrypted and waiting in the TLS layer: a read may return them with no
    /// new socket event.
    pub fn pending(&self) -> usize {
        match self {
            FrontStream::Tls(s) => s.ssl().pending(),
            _ => 0,
        }
    }

    /// Drives the handshake; Ok(true) once it is complete.
    fn handshake(&mut self) -> io::Result<bool> {
        let FrontStream::Handshake(mid) = self else {
            return Ok(true);
        };
        let Some(m) = mid.take() else {
            return Err(io::Error::other("TLS handshake failed earlier"));
        };
        match m.handshake() {
            Ok(s) => {
                *self = FrontStream::Tls(Box::new(s));
                Ok(true)
            }
            Err(HandshakeError::WouldBlock(m)) => {
                *mid = Some(Box::new(m));
                Ok(false)
            }
            Err(e) => Err(io::Error::other(format!("TLS handshake: {e}"))),
        }
    }

    pub fn shutdown_write(&mut self) {
        if let FrontStream::Tls(s) = self {
            let _ = s.shutdown();
        }
        if let Some(t) = self.tcp() {
            let _ = t.shutdown(std::net::Shutdown::Write);
        }
    }
}

impl Read for FrontStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.handshake()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self {
            FrontStream::Plain(s) => s.read(buf),
            FrontStream::Tls(s) => s.read(buf),
            FrontStream::Handshake(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for FrontStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.handshake()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self {
            FrontStream::Plain(s) => s.write(buf),
            FrontStream::Tls(s) => s.write(buf),
            FrontStream::Handshake(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            FrontStream::Plain(s) => s.write_vectored(bufs),
            _ => {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
                self.write(first)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_command::proto::request::Kind;

    fn self_signed(name: &str) -> (String, String) {
        use boring::{asn1::Asn1Time, bn::BigNum, ec, hash::MessageDigest, nid::Nid, pkey::PKey, x509};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut subject = x509::X509NameBuilder::new().unwrap();
        subject.append_entry_by_text("CN", name).unwrap();
        let subject = subject.build();
        let mut b = x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&subject).unwrap();
        b.set_issuer_name(&subject).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        b.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
            .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        (
            String::from_utf8(b.build().to_pem().unwrap()).unwrap(),
            String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
        )
    }

    const ADDRESS: &str = "127.0.0.1:443";

    fn listener(min_version: &str) -> proto::Request {
        proto::Request {
            id: String::new(),
            kind: Some(Kind::AddListener(proto::Listener {
                address: ADDRESS.into(),
                protocol: proto::Protocol::Https as i32,
                active: true,
                tls_min_version: min_version.into(),
                ..Default::default()
            })),
        }
    }

    fn add(state: &mut State, name: &str) -> String {
        let (certificate, key) = self_signed(name);
        let fingerprint = rampart_command::state::certificate_fingerprint(&certificate).unwrap();
        state
            .apply(&proto::Request {
                id: String::new(),
                kind: Some(Kind::AddCertificate(proto::Certificate {
                    address: ADDRESS.into(),
                    certificate,
                    chain: vec![],
                    key,
                    names: vec![name.into()],
                })),
            })
            .unwrap();
        fingerprint
    }

    /// The address of a certificate's SSL_CTX (the same object when a context is reused).
    fn context_of(tls: &TlsContexts, fingerprint: &str) -> usize {
        tls.built
            .get(&(ADDRESS.to_string(), fingerprint.to_string()))
            .map(|b| std::ptr::from_ref::<boring::ssl::SslContextRef>(&b.context) as usize)
            .unwrap()
    }

    /// A rebuild builds only what changed: a new certificate gets a context, the others keep
    /// theirs; new listener settings or a new ticket key rebuild everything they touch.
    #[test]
    fn rebuilds_reuse_the_contexts_of_unchanged_certificates() {
        let keyring = Arc::new(Mutex::new(KeyringClient::default()));
        let mut state = State::new();
        state.apply(&listener("")).unwrap();
        let a = add(&mut state, "a.test");
        let b = add(&mut state, "b.test");
        let (mut first, errors) = TlsContexts::from_state(&state, None, &keyring, &mut TlsContexts::default());
        assert!(errors.is_empty(), "{errors:?}");
        let (a1, b1) = (context_of(&first, &a), context_of(&first, &b));

        let c = add(&mut state, "c.test");
        let (mut second, _) = TlsContexts::from_state(&state, None, &keyring, &mut first);
        assert_eq!(context_of(&second, &a), a1, "a was rebuilt for nothing");
        assert_eq!(context_of(&second, &b), b1, "b was rebuilt for nothing");
        assert_eq!(second.built.len(), 3);
        let c2 = context_of(&second, &c);

        state
            .apply(&proto::Request {
                id: String::new(),
                kind: Some(Kind::UpdateListener(proto::ListenerUpdate {
                    address: ADDRESS.into(),
                    listener: Some(proto::Listener {
                        tls_min_version: "1.3".into(),
                        ..Default::default()
                    }),
                    fields: vec!["tls_min_version".into()],
                })),
            })
            .unwrap();
        let (mut third, _) = TlsContexts::from_state(&state, None, &keyring, &mut second);
        assert_ne!(
            context_of(&third, &a),
            a1,
            "the listener's settings changed: a is rebuilt"
        );
        assert_ne!(context_of(&third, &c), c2);
        let a3 = context_of(&third, &a);

        let (fourth, _) = TlsContexts::from_state(&state, Some(&[7u8; 48]), &keyring, &mut third);
        assert_ne!(context_of(&fourth, &a), a3, "a new ticket key reaches every context");
        assert!(fourth.listeners.contains_key(ADDRESS));
    }
}
