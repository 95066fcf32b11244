//! Dialing backends: a small plain-TCP adapter with the exact shape of
//! `tagway_transport::Transport` (CONTRACTS.md), used until the transport crate lands. Swapping
//! is a `pub use` change in this module.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tagway_config::ServersTransport;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Original client addresses, for a PROXY header toward the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddrs {
    /// The client.
    pub src: SocketAddr,
    /// The address it connected to.
    pub dst: SocketAddr,
}

/// Why a dial failed (metric label via [`DialErrorReason::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DialErrorReason {
    /// Dial timeout expired.
    Timeout,
    /// Connection refused.
    Refused,
    /// Host or network unreachable, or the address does not resolve.
    Unreachable,
    /// The TLS handshake failed.
    TlsHandshake,
    /// The server's certificate is not trusted.
    UntrustedCertificate,
    /// The server's certificate does not name the expected host.
    SanMismatch,
    /// The server's SPIFFE ID is not allowed.
    SpiffeIdMismatch,
    /// Writing the PROXY header failed.
    ProxyHeader,
    /// Anything else.
    Other,
}

impl DialErrorReason {
    /// Number of reasons.
    pub const COUNT: usize = 9;
    /// Every reason, in index order.
    pub const ALL: [DialErrorReason; Self::COUNT] = [
        DialErrorReason::Timeout,
        DialErrorReason::Refused,
        DialErrorReason::Unreachable,
        DialErrorReason::TlsHandshake,
        DialErrorReason::UntrustedCertificate,
        DialErrorReason::SanMismatch,
        DialErrorReason::SpiffeIdMismatch,
        DialErrorReason::ProxyHeader,
        DialErrorReason::Other,
    ];

    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DialErrorReason::Timeout => "timeout",
            DialErrorReason::Refused => "refused",
            DialErrorReason::Unreachable => "unreachable",
            DialErrorReason::TlsHandshake => "tls_handshake",
            DialErrorReason::UntrustedCertificate => "untrusted_certificate",
            DialErrorReason::SanMismatch => "san_mismatch",
            DialErrorReason::SpiffeIdMismatch => "spiffe_id_mismatch",
            DialErrorReason::ProxyHeader => "proxy_header",
            DialErrorReason::Other => "other",
        }
    }

    /// Position in [`DialErrorReason::ALL`].
    pub fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(Self::COUNT - 1)
    }
}

/// A failed dial, naming the server.
#[derive(Debug, thiserror::Error)]
#[error("dialing {server}: {message}")]
#[non_exhaustive]
pub struct DialError {
    /// The server address.
    pub server: String,
    /// Why.
    pub reason: DialErrorReason,
    /// Details.
    pub message: String,
}

impl DialError {
    /// Why the dial failed.
    pub fn reason(&self) -> DialErrorReason {
        self.reason
    }
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// This build cannot do what the transport asks.
    #[error("servers transport {name}: {what} is not supported by the plain-TCP dialer")]
    Unsupported {
        /// The transport name.
        name: String,
        /// The unsupported setting.
        what: &'static str,
    },
}

/// A connection to a backend.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendStream {
    /// Plain TCP (zero-copy paths apply).
    Plain(TcpStream),
}

impl BackendStream {
    /// The TCP socket under the stream.
    pub fn as_tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(s) => s,
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[derive(Debug)]
struct Inner {
    dial_timeout: Option<Duration>,
    keep_alive: Option<Duration>,
    termination_delay: Option<Duration>,
}

/// Dials servers as a servers transport says. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Transport {
    inner: Arc<Inner>,
}

/// Placeholder for the transport crate's identity source (SVID + bundle).
#[derive(Clone, Debug)]
pub struct IdentitySource;

impl Transport {
    /// Builds the transport `name` from its configuration.
    pub fn new(
        name: &str,
        cfg: &ServersTransport,
        _identity: Option<IdentitySource>,
    ) -> Result<Transport, TransportError> {
        if cfg.tls.is_some() {
            return Err(TransportError::Unsupported {
                name: name.to_owned(),
                what: "tls",
            });
        }
        let keep_alive = if cfg.dial_keep_alive.is_negative() {
            None
        } else if cfg.dial_keep_alive.is_zero() {
            Some(Duration::from_secs(15))
        } else {
            cfg.dial_keep_alive.to_std()
        };
        Ok(Transport {
            inner: Arc::new(Inner {
                dial_timeout: cfg.dial_timeout.to_std().filter(|d| !d.is_zero()),
                keep_alive,
                termination_delay: cfg.termination_delay.to_std(),
            }),
        })
    }

    /// How long the other side may stay open after one side half-closed (None = no deadline).
    pub fn termination_delay(&self) -> Option<Duration> {
        self.inner.termination_delay
    }

    /// Dials `server` (`host:port`).
    pub async fn dial(
        &self,
        server: &str,
        tls: bool,
        _client: Option<ClientAddrs>,
    ) -> Result<BackendStream, DialError> {
        let err = |reason, message: String| DialError {
            server: server.to_owned(),
            reason,
            message,
        };
        if tls {
            return Err(err(
                DialErrorReason::Other,
                "TLS toward servers needs the transport crate".into(),
            ));
        }
        let connect = TcpStream::connect(server);
        let stream = match self.inner.dial_timeout {
            Some(t) => match tokio::time::timeout(t, connect).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(err(
                        DialErrorReason::Timeout,
                        format!("no connection within {t:?}"),
                    ));
                }
            },
            None => connect.await,
        }
        .map_err(|e| err(io_reason(&e), e.to_string()))?;
        let _ = stream.set_nodelay(true);
        if let Some(k) = self.inner.keep_alive {
            let ka = socket2::TcpKeepalive::new().with_time(k).with_interval(k);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
        }
        Ok(BackendStream::Plain(stream))
    }
}

/// Classifies a connect error.
pub fn io_reason(e: &io::Error) -> DialErrorReason {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => DialErrorReason::Refused,
        io::ErrorKind::TimedOut => DialErrorReason::Timeout,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable => DialErrorReason::Unreachable,
        _ => DialErrorReason::Other,
    }
}
