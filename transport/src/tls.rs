//! Building a transport's rustls client configuration once, when its configuration loads: roots,
//! client certificates, the verifier, the server name. rustls always runs with the **ring**
//! provider, passed explicitly (never the process-wide default).

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName};

use tagway_config::{ClientCertificate, FileOrContent, ServersTransport, TransportTls};

use crate::error::TransportError;
use crate::identity::{Identity, IdentitySource, SourceKind};
use crate::spiffe::SpiffePolicy;
use crate::verify::{BackendVerifier, ChainCheck, IdentityCheck};

static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

static WEBPKI_ROOTS: LazyLock<Arc<RootCertStore>> = LazyLock::new(|| {
    Arc::new(RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
});

/// The ring crypto provider every TLS configuration of this crate uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::clone(&PROVIDER)
}

/// Which name a handshake sends as SNI and hands to the verifier.
#[derive(Clone, Debug)]
pub(crate) enum NamePolicy {
    /// `tls.serverName`.
    Fixed(ServerName<'static>),
    /// The host of the server address (a DNS name is sent as SNI and verified; an IP address is
    /// verified against the certificate's IP SANs, without SNI).
    AddressHost,
    /// No SNI: the peer's IP address is passed, which the verifier ignores (peerCertURI, SPIFFE,
    /// insecureSkipVerify without a serverName).
    PeerIp,
}

/// A transport's TLS, decided when it is built.
pub(crate) enum TlsMode {
    /// No `tls` or `spiffe` section: TLS only toward servers flagged `tls`, verified with the webpki
    /// roots against the host of their address.
    FlagOnly { config: Arc<ClientConfig> },
    /// A `tls` section: always TLS.
    Static {
        config: Arc<ClientConfig>,
        name: NamePolicy,
    },
    /// A `spiffe` section: always TLS with the gateway's SVID, rebuilt when it rotates.
    Spiffe(SpiffeTls),
}

impl TlsMode {
    /// Builds the TLS of transport `name` from its configuration.
    pub(crate) fn build(
        transport: &str,
        cfg: &ServersTransport,
        identity: Option<&IdentitySource>,
    ) -> Result<Self, TransportError> {
        if let Some(spiffe) = &cfg.spiffe {
            let policy = SpiffePolicy::from_config(transport, spiffe)?;
            let source = identity
                .cloned()
                .ok_or_else(|| TransportError::NoIdentitySource {
                    transport: transport.to_owned(),
                })?;
            let name = match cfg.tls.as_ref().and_then(|t| t.server_name.as_deref()) {
                Some(sni) => NamePolicy::Fixed(server_name(transport, sni)?),
                None => NamePolicy::PeerIp,
            };
            if let Some(tls) = &cfg.tls {
                warn_ignored_with_spiffe(transport, tls);
            }
            return Ok(TlsMode::Spiffe(SpiffeTls {
                source,
                policy,
                name,
                built: ArcSwapOption::empty(),
            }));
        }
        match &cfg.tls {
            Some(tls) => Self::from_section(transport, tls),
            None => {
                let verifier = webpki_verifier(transport, Arc::clone(&WEBPKI_ROOTS))?;
                let config = client_config(
                    transport,
                    Arc::new(BackendVerifier::new(
                        ChainCheck::WithName(verifier),
                        IdentityCheck::None,
                    )),
                    None,
                )?;
                Ok(TlsMode::FlagOnly { config })
            }
        }
    }

    fn from_section(transport: &str, tls: &TransportTls) -> Result<Self, TransportError> {
        let server_name = tls
            .server_name
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| server_name(transport, s))
            .transpose()?;
        let peer_cert_uri = tls
            .peer_cert_uri
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let roots = if tls.root_cas.is_empty() {
            Arc::clone(&WEBPKI_ROOTS)
        } else {
            Arc::new(load_roots(transport, &tls.root_cas)?)
        };
        // The strongest configured check wins: peerCertURI, then insecureSkipVerify, then the name.
        let (chain, identity) = if let Some(uri) = peer_cert_uri {
            if tls.insecure_skip_verify {
                tracing::warn!(
                    transport,
                    "tls.insecureSkipVerify is ignored: tls.peerCertURI is set, so the chain and the URI SAN are verified"
                );
            }
            (
                ChainCheck::ChainOnly(roots),
                IdentityCheck::UriSan(uri.to_owned()),
            )
        } else if tls.insecure_skip_verify {
            tracing::warn!(
                transport,
                "tls.insecureSkipVerify is set: the servers' certificates are NOT verified"
            );
            (ChainCheck::Skip, IdentityCheck::None)
        } else if server_name.is_some() {
            (
                ChainCheck::WithName(webpki_verifier(transport, roots)?),
                IdentityCheck::None,
            )
        } else {
            return Err(TransportError::NoServerIdentity {
                transport: transport.to_owned(),
            });
        };
        let mut certs = Vec::with_capacity(tls.certificates.len());
        for (i, cert) in tls.certificates.iter().enumerate() {
            certs.push(ClientCert::load(transport, i, cert)?);
        }
        let resolver: Option<Arc<dyn ResolvesClientCert>> = if certs.is_empty() {
            None
        } else {
            Some(Arc::new(ClientCerts { certs }))
        };
        let config = client_config(
            transport,
            Arc::new(BackendVerifier::new(chain, identity)),
            resolver,
        )?;
        let name = match server_name {
            Some(name) => NamePolicy::Fixed(name),
            None => NamePolicy::PeerIp,
        };
        Ok(TlsMode::Static { config, name })
    }

    /// True when every connection of the transport is TLS, whatever the server's flag.
    pub(crate) fn always(&self) -> bool {
        !matches!(self, TlsMode::FlagOnly { .. })
    }
}

fn warn_ignored_with_spiffe(transport: &str, tls: &TransportTls) {
    let mut ignored = Vec::new();
    if !tls.certificates.is_empty() {
        ignored.push("tls.certificates");
    }
    if !tls.root_cas.is_empty() {
        ignored.push("tls.rootCAs");
    }
    if tls.insecure_skip_verify {
        ignored.push("tls.insecureSkipVerify");
    }
    if tls.peer_cert_uri.is_some() {
        ignored.push("tls.peerCertURI");
    }
    if !ignored.is_empty() {
        tracing::warn!(
            transport,
            ignored = ignored.join(", "),
            "spiffe is set: the gateway's SVID and the SPIFFE trust bundle are used instead"
        );
    }
}

fn server_name(transport: &str, name: &str) -> Result<ServerName<'static>, TransportError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).map_err(|e| {
        TransportError::invalid(
            transport,
            "tls.serverName",
            format!("{name:?} is not a valid DNS name: {e}"),
        )
    })
}

fn webpki_verifier(
    transport: &str,
    roots: Arc<RootCertStore>,
) -> Result<Arc<WebPkiServerVerifier>, TransportError> {
    WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TransportError::invalid(transport, "tls.rootCAs", e.to_string()))
}

/// A client configuration with the ring provider, the default protocol versions (TLS 1.2 and 1.3),
/// `verifier` and, for mTLS, `client_certs`.
pub(crate) fn client_config(
    transport: &str,
    verifier: Arc<dyn ServerCertVerifier>,
    client_certs: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<Arc<ClientConfig>, TransportError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::invalid(transport, "tls", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client_certs {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read(transport: &str, key: &str, source: &FileOrContent) -> Result<Vec<u8>, TransportError> {
    source.read().map_err(|error| TransportError::Read {
        transport: transport.to_owned(),
        key: key.to_owned(),
        path: source.path().map(ToOwned::to_owned).unwrap_or_default(),
        error,
    })
}

fn load_roots(transport: &str, cas: &[FileOrContent]) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    for (i, ca) in cas.iter().enumerate() {
        let key = format!("tls.rootCAs[{i}]");
        let pem = read(transport, &key, ca)?;
        let certs = crate::pem::certificates(&pem)
            .map_err(|m| TransportError::invalid(transport, &key, m))?;
        crate::pem::add_roots(&mut roots, certs)
            .map_err(|m| TransportError::invalid(transport, &key, m))?;
    }
    Ok(roots)
}

/// One client certificate of `tls.certificates`, with the issuers of its chain (to pick the one a
/// server's certificate request names).
struct ClientCert {
    key: Arc<CertifiedKey>,
    issuers: Vec<Vec<u8>>,
}

impl ClientCert {
    fn load(transport: &str, i: usize, cert: &ClientCertificate) -> Result<Self, TransportError> {
        let key_name = format!("tls.certificates[{i}]");
        let (chain, key) = match cert {
            ClientCertificate::Bundle(source) => {
                let pem = read(transport, &key_name, source)?;
                let chain = crate::pem::certificates(&pem)
                    .map_err(|m| TransportError::invalid(transport, &key_name, m))?;
                let key = crate::pem::private_key(&pem).map_err(|m| {
                    TransportError::invalid(
                        transport,
                        &key_name,
                        format!("{m}: a certificate given as one value must hold the chain and its key (or use certFile and keyFile)"),
                    )
                })?;
                (chain, key)
            }
            ClientCertificate::Pair {
                cert_file,
                key_file,
            } => {
                let cert_key = format!("{key_name}.certFile");
                let key_key = format!("{key_name}.keyFile");
                let pem = read(transport, &cert_key, cert_file)?;
                let chain = crate::pem::certificates(&pem)
                    .map_err(|m| TransportError::invalid(transport, &cert_key, m))?;
                let pem = read(transport, &key_key, key_file)?;
                let key = crate::pem::private_key(&pem)
                    .map_err(|m| TransportError::invalid(transport, &key_key, m))?;
                (chain, key)
            }
        };
        let issuers = issuers(&chain);
        let key = crate::pem::certified_key(chain, key)
            .map_err(|m| TransportError::invalid(transport, &key_name, m))?;
        Ok(ClientCert { key, issuers })
    }
}

fn issuers(chain: &[CertificateDer<'_>]) -> Vec<Vec<u8>> {
    chain
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, cert)| cert.issuer().as_raw().to_vec())
        .collect()
}

/// Picks the client certificate to present: the first whose key can sign with a scheme the server
/// accepts and whose chain names a CA the server asked for; else the first whose key fits.
struct ClientCerts {
    certs: Vec<ClientCert>,
}

impl fmt::Debug for ClientCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCerts")
            .field("count", &self.certs.len())
            .finish()
    }
}

impl ResolvesClientCert for ClientCerts {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let usable = || {
            self.certs
                .iter()
                .filter(|c| c.key.key.choose_scheme(sigschemes).is_some())
        };
        usable()
            .find(|c| {
                c.issuers
                    .iter()
                    .any(|issuer| root_hint_subjects.contains(&issuer.as_slice()))
            })
            .or_else(|| usable().next())
            .map(|c| Arc::clone(&c.key))
    }

    fn has_certs(&self) -> bool {
        !self.certs.is_empty()
    }
}

/// The TLS of a transport with a `spiffe` section: the client configuration for the current SVID,
/// rebuilt (once) after each rotation and swapped atomically.
pub(crate) struct SpiffeTls {
    source: IdentitySource,
    policy: SpiffePolicy,
    pub(crate) name: NamePolicy,
    built: ArcSwapOption<Built>,
}

struct Built {
    identity: Arc<Identity>,
    config: Arc<ClientConfig>,
}

impl SpiffeTls {
    /// The client configuration for the current identity, or `Err(kind)` when there is none yet.
    pub(crate) fn config(&self, transport: &str) -> Result<Arc<ClientConfig>, SourceKind> {
        let identity = self.source.current().ok_or(self.source.kind())?;
        if let Some(built) = self.built.load().as_ref()
            && Arc::ptr_eq(&built.identity, &identity)
        {
            return Ok(Arc::clone(&built.config));
        }
        let verifier = BackendVerifier::new(
            ChainCheck::SpiffeBundle(Arc::clone(&identity)),
            IdentityCheck::Spiffe(self.policy.clone()),
        );
        let resolver = ClientCerts {
            certs: vec![ClientCert {
                key: Arc::clone(identity.certified_key()),
                issuers: Vec::new(),
            }],
        };
        // Building cannot fail with the ring provider and its default versions; should it ever,
        // the previous configuration (if any) is kept.
        match client_config(transport, Arc::new(verifier), Some(Arc::new(resolver))) {
            Ok(config) => {
                tracing::debug!(
                    transport,
                    spiffe_id = identity.spiffe_id().unwrap_or("-"),
                    "TLS client configuration rebuilt for a new SVID"
                );
                self.built.store(Some(Arc::new(Built {
                    identity,
                    config: Arc::clone(&config),
                })));
                Ok(config)
            }
            Err(error) => {
                tracing::error!(%error, "cannot build the TLS client configuration for the new SVID");
                self.built
                    .load()
                    .as_ref()
                    .map(|b| Arc::clone(&b.config))
                    .ok_or(self.source.kind())
            }
        }
    }
}
