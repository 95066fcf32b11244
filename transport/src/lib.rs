//! Dialing backends as a tagway serversTransport says.
//!
//! A [`Transport`] is built once from a [`tagway_config::ServersTransport`] when a configuration
//! loads (certificates parsed, TLS client configuration and verifiers built) and is cheap to clone.
//! [`Transport::dial`] then opens a backend connection:
//!
//! 1. resolves the server's host and connects to each address in turn (`dialTimeout` bounds the
//!    whole dial: connect, PROXY header and TLS handshake; 0 = none), with TCP keep-alive
//!    (`dialKeepAlive`: 0 → 15s, negative → off) and TCP_NODELAY;
//! 2. writes a PROXY protocol v1/v2 header relaying the original client (`proxyProtocol`), before the
//!    TLS handshake or, as an option, inside the TLS stream;
//! 3. does the TLS handshake (`tls` section, `spiffe` section, or the server's `tls` flag): SNI and
//!    verified name `serverName`, client certificates for mTLS, `rootCAs`, `insecureSkipVerify`,
//!    `peerCertURI`, SPIFFE IDs / trust domain with the gateway's own SVID from an
//!    [`IdentitySource`] (Workload API, PEM files or Consul Connect pushes) that rotates atomically.
//!
//! Failures are typed: [`TransportError`] at build time (naming the transport and the key),
//! [`DialError`] per dial with a [`DialErrorReason`] for metrics. [`Transport::check`] is the health
//! check the gateway runs through a transport.
//!
//! rustls runs with the ring provider only, passed explicitly ([`tls::provider`]).
#![warn(missing_docs)]

mod check;
mod dial;
pub mod error;
pub mod identity;
mod pem;
pub mod proxy_protocol;
mod registry;
pub mod socket;
pub mod spiffe;
mod stream;
pub mod tls;
pub mod verify;

pub use dial::{ServerAddr, Transport};
pub use error::{CheckError, DialError, DialErrorKind, DialErrorReason, DialStage, TransportError};
pub use identity::{Identity, IdentityError, IdentitySource, SourceKind};
pub use proxy_protocol::{ClientAddrs, ProxyPlacement, ProxyVersion};
pub use registry::{DEFAULT_TRANSPORT, Transports};
pub use stream::BackendStream;
pub use verify::IdentityMismatch;
