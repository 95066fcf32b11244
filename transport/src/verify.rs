//! Verifying a backend's certificate, in two separate steps (as linkerd does):
//!
//! 1. **chain**: the certificate chains to the trusted roots (webpki, through rustls'
//!    [`WebPkiServerVerifier`] when a host name is checked too, or
//!    [`verify_server_cert_signed_by_trust_anchor`] alone when it is not);
//! 2. **identity**: the certificate names the expected peer — a URI SAN equal to `peerCertURI`, or a
//!    SPIFFE ID the transport's `spiffe` section allows (read with x509-parser).
//!
//! Identity failures travel through rustls as [`rustls::CertificateError::Other`] holding an
//! [`IdentityMismatch`], so the dialer can tell them apart from untrusted chains.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::error::DialErrorReason;
use crate::identity::Identity;
use crate::spiffe::{SpiffePolicy, svid_id};

/// The backend's certificate does not name the expected peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityMismatch {
    /// The certificate is not valid for the server name (`tls.serverName`, or the host dialed).
    #[error("the certificate is not valid for {expected:?} (it names {presented:?})")]
    ServerName {
        /// The name checked.
        expected: String,
        /// The DNS names and IP addresses the certificate carries.
        presented: Vec<String>,
    },
    /// No URI SAN equals `peerCertURI`.
    #[error(
        "no URI SAN of the certificate equals peerCertURI {expected:?} (URI SANs: {presented:?})"
    )]
    PeerCertUri {
        /// `tls.peerCertURI`.
        expected: String,
        /// The URI SANs the certificate carries.
        presented: Vec<String>,
    },
    /// The certificate is not an X.509-SVID: it must carry exactly one URI SAN, a SPIFFE ID.
    #[error(
        "the certificate is not an X.509-SVID: it must carry exactly one URI SAN holding a SPIFFE ID (URI SANs: {presented:?})"
    )]
    NotSvid {
        /// The URI SANs the certificate carries.
        presented: Vec<String>,
    },
    /// The SPIFFE ID is not allowed.
    #[error("SPIFFE ID {presented} is not allowed (expected {expected})")]
    SpiffeId {
        /// What the transport accepts (`spiffe.ids` / `spiffe.trustDomain`).
        expected: String,
        /// The certificate's SPIFFE ID.
        presented: String,
    },
}

impl IdentityMismatch {
    /// The metric label of this failure.
    pub fn reason(&self) -> DialErrorReason {
        match self {
            IdentityMismatch::ServerName { .. } | IdentityMismatch::PeerCertUri { .. } => {
                DialErrorReason::SanMismatch
            }
            IdentityMismatch::NotSvid { .. } | IdentityMismatch::SpiffeId { .. } => {
                DialErrorReason::SpiffeIdMismatch
            }
        }
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The URI SANs of a DER certificate (empty when it has none or cannot be parsed; webpki has already
/// parsed the certificate by the time this is asked).
pub(crate) fn uri_sans(der: &[u8]) -> Vec<String> {
    sans(der, |name| match name {
        GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    })
}

fn sans(der: &[u8], pick: impl Fn(&GeneralName<'_>) -> Option<String>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().filter_map(pick).collect(),
        _ => Vec::new(),
    }
}

/// How the chain is checked.
pub(crate) enum ChainCheck {
    /// Chain and the server name rustls passes (`tls.serverName`, or the host dialed).
    WithName(Arc<WebPkiServerVerifier>),
    /// Chain only, against these roots (`peerCertURI`).
    ChainOnly(Arc<RootCertStore>),
    /// Chain only, against the trust bundle of the backend's SPIFFE trust domain, taken from the
    /// gateway's identity.
    SpiffeBundle(Arc<Identity>),
    /// No check (`insecureSkipVerify`).
    Skip,
}

/// Which identity the certificate must carry, beyond what [`ChainCheck`] checked.
pub(crate) enum IdentityCheck {
    /// Nothing more.
    None,
    /// A URI SAN equal to this (`peerCertURI`).
    UriSan(String),
    /// A SPIFFE ID the policy allows.
    Spiffe(SpiffePolicy),
}

/// The rustls server-certificate verifier of a transport.
pub(crate) struct BackendVerifier {
    chain: ChainCheck,
    identity: IdentityCheck,
    algorithms: WebPkiSupportedAlgorithms,
}

impl BackendVerifier {
    pub(crate) fn new(chain: ChainCheck, identity: IdentityCheck) -> Self {
        BackendVerifier {
            chain,
            identity,
            algorithms: crate::tls::provider().signature_verification_algorithms,
        }
    }

    fn chain_only(
        &self,
        roots: &RootCertStore,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )
    }
}

impl fmt::Debug for BackendVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain = match &self.chain {
            ChainCheck::WithName(_) => "chain+name",
            ChainCheck::ChainOnly(_) => "chain",
            ChainCheck::SpiffeBundle(_) => "spiffe bundle",
            ChainCheck::Skip => "skip",
        };
        let identity = match &self.identity {
            IdentityCheck::None => "none".to_owned(),
            IdentityCheck::UriSan(uri) => format!("uri {uri}"),
            IdentityCheck::Spiffe(policy) => format!("spiffe {policy}"),
        };
        f.debug_struct("BackendVerifier")
            .field("chain", &chain)
            .field("identity", &identity)
            .finish()
    }
}

impl ServerCertVerifier for BackendVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // 1. The chain.
        match &self.chain {
            ChainCheck::WithName(webpki) => {
                webpki.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )?;
            }
            ChainCheck::ChainOnly(roots) => {
                self.chain_only(roots, end_entity, intermediates, now)?;
            }
            ChainCheck::SpiffeBundle(identity) => {
                // The bundle to check against is the one of the backend's trust domain.
                let id = svid_id(end_entity).map_err(IdentityMismatch::into_rustls)?;
                let roots = identity.roots_for(id.trust_domain_name()).ok_or(
                    rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                )?;
                self.chain_only(roots, end_entity, intermediates, now)?;
            }
            ChainCheck::Skip => {}
        }
        // 2. The identity.
        match &self.identity {
            IdentityCheck::None => {}
            IdentityCheck::UriSan(expected) => {
                let presented = uri_sans(end_entity);
                if !presented.iter().any(|uri| uri == expected) {
                    return Err(IdentityMismatch::PeerCertUri {
                        expected: expected.clone(),
                        presented,
                    }
                    .into_rustls());
                }
            }
            IdentityCheck::Spiffe(policy) => {
                let id = svid_id(end_entity).map_err(IdentityMismatch::into_rustls)?;
                policy.check(&id).map_err(IdentityMismatch::into_rustls)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Sorts a failed TLS handshake into untrusted chain, identity mismatch or other failure.
pub(crate) enum HandshakeFailure {
    Untrusted(CertificateError),
    Mismatch(IdentityMismatch),
    Other,
}

/// Reads the rustls error inside a failed handshake's I/O error.
pub(crate) fn classify(error: &std::io::Error) -> HandshakeFailure {
    let Some(rustls::Error::InvalidCertificate(cert_error)) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return HandshakeFailure::Other;
    };
    match cert_error {
        CertificateError::Other(OtherError(inner)) => {
            match inner.downcast_ref::<IdentityMismatch>() {
                Some(mismatch) => HandshakeFailure::Mismatch(mismatch.clone()),
                None => HandshakeFailure::Untrusted(cert_error.clone()),
            }
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => HandshakeFailure::Mismatch(IdentityMismatch::ServerName {
            expected: expected.to_str().into_owned(),
            presented: presented.clone(),
        }),
        CertificateError::NotValidForName => {
            HandshakeFailure::Mismatch(IdentityMismatch::ServerName {
                expected: String::new(),
                presented: Vec::new(),
            })
        }
        other => HandshakeFailure::Untrusted(other.clone()),
    }
}
