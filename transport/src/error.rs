//! Typed errors: building a transport ([`TransportError`]), dialing a server ([`DialError`]) and
//! health-checking one ([`CheckError`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::verify::IdentityMismatch;

/// A servers transport cannot be built from its configuration.
///
/// Every variant names the transport and the configuration key at fault, e.g.
/// `serversTransport "mytransport": tls.certificates[0]: cannot read /x: No such file or directory`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A certificate, key or CA file cannot be read.
    #[error("serversTransport {transport:?}: {key}: cannot read {}: {error}", path.display())]
    Read {
        /// The transport's name.
        transport: String,
        /// The configuration key, e.g. `tls.rootCAs[1]`.
        key: String,
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
    /// A value is wrong: PEM without a certificate, a key that does not match its certificate, an
    /// invalid server name or SPIFFE ID, an unsupported PROXY protocol version.
    #[error("serversTransport {transport:?}: {key}: {message}")]
    Invalid {
        /// The transport's name.
        transport: String,
        /// The configuration key, e.g. `tls.serverName`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// TLS is enabled but nothing says how to verify the server.
    #[error(
        "serversTransport {transport:?}: tls: no way to verify the servers: set tls.serverName (the name \
         their certificates must carry), tls.peerCertURI, a spiffe section, or tls.insecureSkipVerify"
    )]
    NoServerIdentity {
        /// The transport's name.
        transport: String,
    },
    /// The transport has a `spiffe` section but the gateway has no SPIFFE identity source.
    #[error(
        "serversTransport {transport:?}: spiffe: SPIFFE is enabled for this transport but the gateway has \
         no SPIFFE identity (set providers.spiffe in the static configuration)"
    )]
    NoIdentitySource {
        /// The transport's name.
        transport: String,
    },
}

impl TransportError {
    /// The name of the transport at fault.
    pub fn transport(&self) -> &str {
        match self {
            TransportError::Read { transport, .. }
            | TransportError::Invalid { transport, .. }
            | TransportError::NoServerIdentity { transport }
            | TransportError::NoIdentitySource { transport } => transport,
        }
    }

    pub(crate) fn invalid(
        transport: &str,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        TransportError::Invalid {
            transport: transport.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Why a dial failed, as a metric label ([`DialErrorReason::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DialErrorReason {
    /// `dialTimeout` elapsed (connect, PROXY header and TLS handshake together), or the connect
    /// attempt timed out in the kernel.
    Timeout,
    /// The server refused the connection (nothing listens on the port).
    Refused,
    /// No route to the server's host or network.
    Unreachable,
    /// The host name could not be resolved, or resolved to no address.
    Resolve,
    /// The TLS handshake failed for a reason other than the server's identity (protocol error,
    /// alert from the server, connection closed during the handshake).
    TlsHandshake,
    /// The server's certificate chain is not trusted (unknown issuer, expired, bad signature).
    UntrustedCertificate,
    /// The server's certificate does not carry the expected DNS name, IP address or URI SAN.
    SanMismatch,
    /// The server's SPIFFE ID is not allowed by the transport's `spiffe` section, or its
    /// certificate is not an X.509-SVID.
    SpiffeIdMismatch,
    /// Writing the PROXY protocol header failed.
    ProxyHeader,
    /// The transport needs the gateway's SPIFFE identity and none has been received yet.
    NoIdentity,
    /// Anything else (invalid address, socket option failure, unexpected I/O error).
    Other,
}

impl DialErrorReason {
    /// Every reason, e.g. to pre-register metric series.
    pub const ALL: [DialErrorReason; 11] = [
        DialErrorReason::Timeout,
        DialErrorReason::Refused,
        DialErrorReason::Unreachable,
        DialErrorReason::Resolve,
        DialErrorReason::TlsHandshake,
        DialErrorReason::UntrustedCertificate,
        DialErrorReason::SanMismatch,
        DialErrorReason::SpiffeIdMismatch,
        DialErrorReason::ProxyHeader,
        DialErrorReason::NoIdentity,
        DialErrorReason::Other,
    ];

    /// The metric label: `timeout`, `refused`, `unreachable`, `resolve`, `tls_handshake`,
    /// `untrusted_certificate`, `san_mismatch`, `spiffe_id_mismatch`, `proxy_header`, `no_identity`,
    /// `other`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DialErrorReason::Timeout => "timeout",
            DialErrorReason::Refused => "refused",
            DialErrorReason::Unreachable => "unreachable",
            DialErrorReason::Resolve => "resolve",
            DialErrorReason::TlsHandshake => "tls_handshake",
            DialErrorReason::UntrustedCertificate => "untrusted_certificate",
            DialErrorReason::SanMismatch => "san_mismatch",
            DialErrorReason::SpiffeIdMismatch => "spiffe_id_mismatch",
            DialErrorReason::ProxyHeader => "proxy_header",
            DialErrorReason::NoIdentity => "no_identity",
            DialErrorReason::Other => "other",
        }
    }
}

impl fmt::Display for DialErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The step a dial was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DialStage {
    /// Resolving the server's host name.
    Resolve,
    /// Connecting (TCP).
    Connect,
    /// Writing the PROXY protocol header.
    ProxyHeader,
    /// The TLS handshake.
    TlsHandshake,
}

impl fmt::Display for DialStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DialStage::Resolve => "name resolution",
            DialStage::Connect => "connect",
            DialStage::ProxyHeader => "the PROXY protocol header",
            DialStage::TlsHandshake => "the TLS handshake",
        })
    }
}

/// A server could not be dialed. Carries the server address as configured (`host:port`).
#[derive(Debug, thiserror::Error)]
#[error("dial {server}: {kind}")]
pub struct DialError {
    server: String,
    kind: DialErrorKind,
}

impl DialError {
    /// A failed dial of `server` (the address as configured).
    pub fn new(server: &str, kind: DialErrorKind) -> Self {
        DialError {
            server: server.to_owned(),
            kind,
        }
    }

    /// The server address as given to [`crate::Transport::dial`].
    pub fn server(&self) -> &str {
        &self.server
    }

    /// What went wrong, with its context.
    pub fn kind(&self) -> &DialErrorKind {
        &self.kind
    }

    /// The address that was being connected to, when the failure happened after resolution.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.kind.peer()
    }

    /// Why, as a metric label.
    pub fn reason(&self) -> DialErrorReason {
        self.kind.reason()
    }
}

/// What went wrong in a dial.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialErrorKind {
    /// The server address is not `host:port`.
    #[error("invalid server address: {message}")]
    InvalidAddress {
        /// What is wrong with it.
        message: String,
    },
    /// The host name could not be resolved.
    #[error("cannot resolve {host}: {error}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        error: io::Error,
    },
    /// The host name resolved to no address.
    #[error("{host} resolves to no address")]
    NoAddress {
        /// The host name.
        host: String,
    },
    /// `dialTimeout` elapsed.
    #[error("timed out after {after:?} during {stage}")]
    Timeout {
        /// The dial timeout.
        after: Duration,
        /// What the dial was doing then.
        stage: DialStage,
    },
    /// The TCP connection failed (every resolved address was tried; this is the first failure).
    #[error("connect to {peer}: {error}")]
    Connect {
        /// The address.
        peer: SocketAddr,
        /// The operating system's error.
        error: io::Error,
    },
    /// Setting a socket option failed.
    #[error("socket options for {peer}: {error}")]
    Socket {
        /// The address.
        peer: SocketAddr,
        /// The operating system's error.
        error: io::Error,
    },
    /// Writing the PROXY protocol header failed.
    #[error("writing the PROXY protocol header to {peer}: {error}")]
    ProxyHeader {
        /// The address.
        peer: SocketAddr,
        /// The I/O error.
        error: io::Error,
    },
    /// The TLS handshake failed (not because of the server's identity).
    #[error("TLS handshake with {peer}: {error}")]
    TlsHandshake {
        /// The address.
        peer: SocketAddr,
        /// The I/O error; a [`rustls::Error`] inside when TLS itself failed.
        error: io::Error,
    },
    /// The server's certificate chain is not trusted.
    #[error("TLS handshake with {peer}: untrusted certificate: {error}")]
    UntrustedCertificate {
        /// The address.
        peer: SocketAddr,
        /// Why webpki refused the chain.
        error: rustls::CertificateError,
    },
    /// The server's certificate does not carry the expected identity.
    #[error("TLS handshake with {peer}: {mismatch}")]
    IdentityMismatch {
        /// The address.
        peer: SocketAddr,
        /// What was expected and what the certificate carries.
        mismatch: IdentityMismatch,
    },
    /// The transport needs the gateway's SPIFFE identity and none has been received yet.
    #[error("no SPIFFE identity (SVID) received yet from the {source_kind} source")]
    NoIdentity {
        /// Where the identity should come from.
        source_kind: crate::identity::SourceKind,
    },
}

impl DialErrorKind {
    fn peer(&self) -> Option<SocketAddr> {
        match self {
            DialErrorKind::Connect { peer, .. }
            | DialErrorKind::Socket { peer, .. }
            | DialErrorKind::ProxyHeader { peer, .. }
            | DialErrorKind::TlsHandshake { peer, .. }
            | DialErrorKind::UntrustedCertificate { peer, .. }
            | DialErrorKind::IdentityMismatch { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    fn reason(&self) -> DialErrorReason {
        match self {
            DialErrorKind::InvalidAddress { .. } | DialErrorKind::Socket { .. } => {
                DialErrorReason::Other
            }
            DialErrorKind::Resolve { .. } | DialErrorKind::NoAddress { .. } => {
                DialErrorReason::Resolve
            }
            DialErrorKind::Timeout { .. } => DialErrorReason::Timeout,
            DialErrorKind::Connect { error, .. } => match error.kind() {
                io::ErrorKind::ConnectionRefused => DialErrorReason::Refused,
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    DialErrorReason::Unreachable
                }
                io::ErrorKind::TimedOut => DialErrorReason::Timeout,
                _ => DialErrorReason::Other,
            },
            DialErrorKind::ProxyHeader { .. } => DialErrorReason::ProxyHeader,
            DialErrorKind::TlsHandshake { .. } => DialErrorReason::TlsHandshake,
            DialErrorKind::UntrustedCertificate { .. } => DialErrorReason::UntrustedCertificate,
            DialErrorKind::IdentityMismatch { mismatch, .. } => mismatch.reason(),
            DialErrorKind::NoIdentity { .. } => DialErrorReason::NoIdentity,
        }
    }
}

/// A health check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The server could not be dialed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The check did not finish within its timeout.
    #[error("health check of {server}: no answer within {after:?}")]
    Timeout {
        /// The address checked.
        server: String,
        /// The check's timeout.
        after: Duration,
    },
    /// Sending the probe failed.
    #[error("health check of {server}: sending: {error}")]
    Send {
        /// The address checked.
        server: String,
        /// The I/O error.
        error: io::Error,
    },
    /// Reading the answer failed.
    #[error("health check of {server}: reading: {error}")]
    Receive {
        /// The address checked.
        server: String,
        /// The I/O error.
        error: io::Error,
    },
    /// The answer does not start with the expected bytes.
    #[error(
        "health check of {server}: expected an answer starting with {expected:?}, got {received:?}"
    )]
    UnexpectedResponse {
        /// The address checked.
        server: String,
        /// The expected prefix (lossy UTF-8).
        expected: String,
        /// What was received (lossy UTF-8).
        received: String,
    },
    /// The server closed the connection before sending the expected bytes.
    #[error(
        "health check of {server}: connection closed after {received:?}, before the expected {expected:?}"
    )]
    Closed {
        /// The address checked.
        server: String,
        /// The expected prefix (lossy UTF-8).
        expected: String,
        /// What was received (lossy UTF-8).
        received: String,
    },
}
