//! [`Transport`]: dialing a backend as its servers transport says — resolve, connect (each address in
//! turn, within the dial timeout), PROXY header, TLS handshake.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use tagway_config::ServersTransport;

use crate::error::{DialError, DialErrorKind, DialStage, TransportError};
use crate::identity::IdentitySource;
use crate::proxy_protocol::{self, ClientAddrs, ProxyPlacement, ProxyVersion};
use crate::socket::SocketOptions;
use crate::stream::BackendStream;
use crate::tls::{NamePolicy, TlsMode};
use crate::verify::{HandshakeFailure, classify};

/// A server's `host:port` (or `[v6]:port`), split once, when the configuration is compiled: the
/// host and port, and the socket address when the host is an IP address. Dialing it parses
/// nothing; a host name is resolved at every dial. An address that is not a valid `host:port`
/// fails at the dial, which says why.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    text: String,
    /// Where the host is in `text`, and the port (`None`: not a valid `host:port`).
    host_port: Option<(std::ops::Range<usize>, u16)>,
    ip: Option<SocketAddr>,
}

impl ServerAddr {
    /// Splits `text` now (see the type).
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let (host_port, ip) = match split_host_port(&text) {
            Ok((host, port)) => {
                // `host` is a slice of `text`: its place, kept as a range.
                let start = host.as_ptr() as usize - text.as_ptr() as usize;
                let ip = host
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, port));
                (Some((start..start + host.len(), port)), ip)
            }
            Err(_) => (None, None),
        };
        ServerAddr {
            text,
            host_port,
            ip,
        }
    }

    /// The socket address when the host is an IP address (`None` for a host name, which is
    /// resolved at every dial, or an invalid address).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.ip
    }

    /// The address as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host (without brackets) and the port; why not, for an invalid address.
    fn host_port(&self) -> Result<(&str, u16), DialErrorKind> {
        match &self.host_port {
            Some((host, port)) => Ok((&self.text[host.clone()], *port)),
            None => split_host_port(&self.text),
        }
    }
}

impl std::ops::Deref for ServerAddr {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq<str> for ServerAddr {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for ServerAddr {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl PartialEq<String> for ServerAddr {
    fn eq(&self, other: &String) -> bool {
        &self.text == other
    }
}

/// When several addresses are tried within a dial timeout, each gets an equal share of the time
/// left, but never less than this (or the time left), as Go's dialer does.
const MIN_ATTEMPT: Duration = Duration::from_secs(2);

/// A servers transport, built once when its configuration loads; cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
    proxy: Option<ProxyVersion>,
    placement: ProxyPlacement,
}

struct Inner {
    name: String,
    config: ServersTransport,
    dial_timeout: Option<Duration>,
    socket: SocketOptions,
    tls: TlsMode,
    has_identity: bool,
}

impl Transport {
    /// Builds the transport `name` (used in errors and logs) from its configuration: parses and
    /// checks certificates, keys and roots, and builds the TLS client configuration and verifiers.
    /// `identity` is the gateway's SPIFFE identity, required when `cfg` has a `spiffe` section.
    pub fn new(
        name: &str,
        cfg: &ServersTransport,
        identity: Option<IdentitySource>,
    ) -> Result<Transport, TransportError> {
        let proxy = match &cfg.proxy_protocol {
            None => None,
            Some(pp) => Some(ProxyVersion::from_number(pp.version).ok_or_else(|| {
                TransportError::invalid(
                    name,
                    "proxyProtocol.version",
                    format!(
                        "unsupported PROXY protocol version {} (use 1 or 2)",
                        pp.version
                    ),
                )
            })?),
        };
        let dial_timeout = cfg.dial_timeout.to_std().filter(|d| !d.is_zero());
        let tls = TlsMode::build(name, cfg, identity.as_ref())?;
        Ok(Transport {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                config: cfg.clone(),
                dial_timeout,
                socket: SocketOptions::from_keep_alive(cfg.dial_keep_alive),
                tls,
                has_identity: identity.is_some(),
            }),
            proxy,
            placement: match &cfg.proxy_protocol {
                Some(pp) if pp.inside_tls => ProxyPlacement::InsideTls,
                _ => ProxyPlacement::default(),
            },
        })
    }

    /// Where the PROXY header goes on TLS connections: `true` = inside the TLS stream, after the
    /// handshake (what Consul Connect sidecars expect); `false` (the default) = before the
    /// handshake, on the TCP connection, as Traefik does.
    pub fn with_proxy_protocol_inside_tls(mut self, inside: bool) -> Self {
        self.placement = if inside {
            ProxyPlacement::InsideTls
        } else {
            ProxyPlacement::BeforeTls
        };
        self
    }

    /// Overrides the PROXY protocol version (`None` = no header), e.g. for a service that still uses
    /// Traefik v2's `loadBalancer.proxyProtocol`. The clone shares everything else.
    pub fn with_proxy_protocol(mut self, version: Option<ProxyVersion>) -> Self {
        self.proxy = version;
        self
    }

    /// The transport's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ServersTransport {
        &self.inner.config
    }

    /// True when the transport was built with an identity source (relevant only with `spiffe`).
    pub fn has_identity_source(&self) -> bool {
        self.inner.has_identity
    }

    /// The dial timeout (`dialTimeout`; `None` = no timeout, for 0 or a negative value).
    pub fn dial_timeout(&self) -> Option<Duration> {
        self.inner.dial_timeout
    }

    /// The keep-alive interval set on backend sockets (`None` = keep-alive off).
    pub fn keep_alive(&self) -> Option<Duration> {
        self.inner.socket.keep_alive
    }

    /// The PROXY protocol version sent to the servers, if any.
    pub fn proxy_protocol(&self) -> Option<ProxyVersion> {
        self.proxy
    }

    /// Where the PROXY header goes on TLS connections.
    pub fn proxy_placement(&self) -> ProxyPlacement {
        self.placement
    }

    /// The deadline for the other side to close once one side has half-closed
    /// (`terminationDelay`); `None` = no deadline (a negative value).
    pub fn termination_delay(&self) -> Option<Duration> {
        self.inner.config.termination_delay.to_std()
    }

    /// The options set on every backend socket before it connects (`dialKeepAlive`).
    pub fn socket_options(&self) -> SocketOptions {
        self.inner.socket
    }

    /// True when connections are TLS whatever the server's `tls` flag (a `tls` or `spiffe` section).
    pub fn always_tls(&self) -> bool {
        self.inner.tls.always()
    }

    /// Dials `server` (`host:port`, `[v6]:port`): resolves it, connects to each address in turn,
    /// sends the PROXY header relaying `client` (a LOCAL / UNKNOWN header when `None`), and does the
    /// TLS handshake when the transport has a `tls` or `spiffe` section or `tls` (the server's flag)
    /// is set. `dialTimeout` bounds all of it.
    pub async fn dial(
        &self,
        server: &str,
        tls: bool,
        client: Option<ClientAddrs>,
    ) -> Result<BackendStream, DialError> {
        self.dial_addr(&ServerAddr::new(server), tls, client).await
    }

    /// [`Transport::dial`] for an address split beforehand (the data plane's servers).
    pub async fn dial_addr(
        &self,
        server: &ServerAddr,
        tls: bool,
        client: Option<ClientAddrs>,
    ) -> Result<BackendStream, DialError> {
        let stage = Stage::default();
        // The steps' future is built inside each arm: built before the match, it would be kept
        // twice in this future (once alone, once inside the timeout).
        let result = match self.inner.dial_timeout {
            Some(after) => {
                let steps = self.dial_steps(server, tls, client.as_ref(), &stage);
                match tokio::time::timeout(after, steps).await {
                    Ok(result) => result,
                    Err(_) => Err(DialErrorKind::Timeout {
                        after,
                        stage: stage.get(),
                    }),
                }
            }
            None => self.dial_steps(server, tls, client.as_ref(), &stage).await,
        };
        result.map_err(|kind| {
            let error = DialError::new(server.as_str(), kind);
            tracing::debug!(transport = %self.inner.name, %error, reason = error.reason().as_str(), "dial failed");
            error
        })
    }

    async fn dial_steps(
        &self,
        server: &ServerAddr,
        tls: bool,
        client: Option<&ClientAddrs>,
        stage: &Stage,
    ) -> Result<BackendStream, DialErrorKind> {
        // An invalid address fails first. The split was made with the configuration.
        let (host, port) = server.host_port()?;
        // Decide TLS before connecting, so that a missing identity fails fast.
        let tls = self.tls_for(tls)?;
        stage.set(DialStage::Resolve);
        // An IP address (the common case) needs no lookup and no list; the lookup and the
        // several-address connect are boxed so that they do not enlarge every dial's future.
        let looked_up;
        let (addrs, deadline): (&[SocketAddr], _) = match &server.ip {
            // One address: `dial`'s timeout bounds its connect, no deadline to share out.
            Some(ip) => (std::slice::from_ref(ip), None),
            None => {
                let deadline = self.inner.dial_timeout.map(|t| Instant::now() + t);
                looked_up = Box::pin(resolve(host, port)).await?;
                (&looked_up, deadline)
            }
        };
        stage.set(DialStage::Connect);
        let (mut tcp, peer) = match addrs {
            [peer] => (self.connect_one(*peer).await?, *peer),
            _ => Box::pin(self.connect_any(addrs, deadline)).await?,
        };
        let header = match self.proxy {
            Some(version) => Some(
                proxy_protocol::header(version, client)
                    .map_err(|error| DialErrorKind::ProxyHeader { peer, error })?,
            ),
            None => None,
        };
        let Some((config, name)) = tls else {
            if let Some(header) = header {
                stage.set(DialStage::ProxyHeader);
                write_header(&mut tcp, &header, peer).await?;
            }
            return Ok(BackendStream::Plain(tcp));
        };
        // Boxed: the TLS handshake state is large (a rustls connection) and only TLS dials need
        // it; inline it would make every connection's task that much bigger.
        Box::pin(self.secure(tcp, peer, host, header, config, name, stage)).await
    }

    /// The TLS part of a dial: PROXY header before or inside TLS, handshake.
    #[allow(clippy::too_many_arguments)]
    async fn secure(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        host: &str,
        header: Option<Vec<u8>>,
        config: Arc<ClientConfig>,
        name: NamePolicy,
        stage: &Stage,
    ) -> Result<BackendStream, DialErrorKind> {
        if let Some(header) = &header
            && self.placement == ProxyPlacement::BeforeTls
        {
            stage.set(DialStage::ProxyHeader);
            write_header(&mut tcp, header, peer).await?;
        }
        stage.set(DialStage::TlsHandshake);
        let server_name = name_for(&name, host, peer)?;
        let mut stream = TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|error| match classify(&error) {
                HandshakeFailure::Untrusted(error) => {
                    DialErrorKind::UntrustedCertificate { peer, error }
                }
                HandshakeFailure::Mismatch(mismatch) => {
                    DialErrorKind::IdentityMismatch { peer, mismatch }
                }
                HandshakeFailure::Other => DialErrorKind::TlsHandshake { peer, error },
            })?;
        if let Some(header) = &header
            && self.placement == ProxyPlacement::InsideTls
        {
            stage.set(DialStage::ProxyHeader);
            write_header(&mut stream, header, peer).await?;
        }
        Ok(BackendStream::Tls(Box::new(stream)))
    }

    /// The TLS configuration and name policy for this dial, `None` for plain TCP.
    fn tls_for(
        &self,
        flag: bool,
    ) -> Result<Option<(Arc<ClientConfig>, NamePolicy)>, DialErrorKind> {
        match &self.inner.tls {
            TlsMode::FlagOnly { config } => {
                Ok(flag.then(|| (Arc::clone(config), NamePolicy::AddressHost)))
            }
            TlsMode::Static { config, name } => Ok(Some((Arc::clone(config), name.clone()))),
            TlsMode::Spiffe(spiffe) => match spiffe.config(&self.inner.name) {
                Ok(config) => Ok(Some((config, spiffe.name.clone()))),
                Err(source_kind) => Err(DialErrorKind::NoIdentity { source_kind }),
            },
        }
    }

    /// Connects to the only address (the dial timeout in [`Transport::dial`] bounds it).
    async fn connect_one(&self, peer: SocketAddr) -> Result<TcpStream, DialErrorKind> {
        let socket = self
            .inner
            .socket
            .socket(peer)
            .map_err(|error| DialErrorKind::Socket { peer, error })?;
        crate::socket::connect(socket, peer).await.map_err(|error| {
            tracing::debug!(transport = %self.inner.name, %peer, %error, "connect failed");
            DialErrorKind::Connect { peer, error }
        })
    }

    /// Connects to the first address that accepts; the error of the first failure otherwise.
    async fn connect_any(
        &self,
        addrs: &[SocketAddr],
        deadline: Option<Instant>,
    ) -> Result<(TcpStream, SocketAddr), DialErrorKind> {
        let mut first_error = None;
        for (i, &peer) in addrs.iter().enumerate() {
            let socket = match self.inner.socket.socket(peer) {
                Ok(socket) => socket,
                Err(error) => {
                    first_error.get_or_insert(DialErrorKind::Socket { peer, error });
                    continue;
                }
            };
            let attempt = crate::socket::connect(socket, peer);
            let result = match deadline {
                // A single address has the whole dial timeout, which `dial` already enforces:
                // no second timer per connection.
                Some(_) if addrs.len() == 1 => attempt.await,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let remaining_addrs = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
                    let share = (left / remaining_addrs).max(left.min(MIN_ATTEMPT));
                    match tokio::time::timeout(share, attempt).await {
                        Ok(result) => result,
                        Err(_) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer within {share:?}"),
                        )),
                    }
                }
                None => attempt.await,
            };
            match result {
                Ok(tcp) => return Ok((tcp, peer)),
                Err(error) => {
                    tracing::debug!(transport = %self.inner.name, %peer, %error, "connect failed");
                    first_error.get_or_insert(DialErrorKind::Connect { peer, error });
                }
            }
        }
        Err(
            first_error.unwrap_or_else(|| DialErrorKind::InvalidAddress {
                message: "no address to connect to".to_owned(),
            }),
        )
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("name", &self.inner.name)
            .field("dial_timeout", &self.inner.dial_timeout)
            .field("keep_alive", &self.inner.socket.keep_alive)
            .field("proxy", &self.proxy)
            .field("placement", &self.placement)
            .field("always_tls", &self.always_tls())
            .finish()
    }
}

async fn write_header<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    header: &[u8],
    peer: SocketAddr,
) -> Result<(), DialErrorKind> {
    async {
        stream.write_all(header).await?;
        stream.flush().await
    }
    .await
    .map_err(|error| DialErrorKind::ProxyHeader { peer, error })
}

/// The name for the handshake under `policy`.
fn name_for(
    policy: &NamePolicy,
    host: &str,
    peer: SocketAddr,
) -> Result<ServerName<'static>, DialErrorKind> {
    match policy {
        NamePolicy::Fixed(name) => Ok(name.clone()),
        NamePolicy::PeerIp => Ok(ServerName::IpAddress(peer.ip().into())),
        NamePolicy::AddressHost => match host.parse::<IpAddr>() {
            Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
            Err(_) => {
                ServerName::try_from(host.to_owned()).map_err(|e| DialErrorKind::InvalidAddress {
                    message: format!("{host:?} cannot be used as a TLS server name: {e}"),
                })
            }
        },
    }
}

/// `host:port` or `[v6]:port` → host (without brackets) and port.
pub(crate) fn split_host_port(server: &str) -> Result<(&str, u16), DialErrorKind> {
    let invalid = |message: String| DialErrorKind::InvalidAddress { message };
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("{server:?} has no port (want host:port)")))?;
    let host = match host.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .ok_or_else(|| invalid(format!("{server:?}: unclosed '['")))?,
        None if host.contains(':') => {
            return Err(invalid(format!(
                "{server:?}: an IPv6 address must be written in brackets, e.g. [::1]:5432"
            )));
        }
        None => host,
    };
    if host.is_empty() {
        return Err(invalid(format!("{server:?} has no host")));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid(format!("{server:?}: {port:?} is not a port number")))?;
    Ok((host, port))
}

/// The addresses of `host` (an IP literal is used as is).
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, DialErrorKind> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| DialErrorKind::Resolve {
            host: host.to_owned(),
            error,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(DialErrorKind::NoAddress {
            host: host.to_owned(),
        });
    }
    Ok(addrs)
}

/// The dial's current step, read when the timeout fires.
#[derive(Default)]
struct Stage(AtomicU8);

impl Stage {
    fn set(&self, stage: DialStage) {
        let n = match stage {
            DialStage::Resolve => 0,
            DialStage::Connect => 1,
            DialStage::ProxyHeader => 2,
            DialStage::TlsHandshake => 3,
        };
        self.0.store(n, Ordering::Relaxed);
    }

    fn get(&self) -> DialStage {
        match self.0.load(Ordering::Relaxed) {
            0 => DialStage::Resolve,
            1 => DialStage::Connect,
            2 => DialStage::ProxyHeader,
            _ => DialStage::TlsHandshake,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addr_splits_once() {
        let v4 = ServerAddr::new("10.0.0.5:5432");
        assert_eq!(v4.ip, Some("10.0.0.5:5432".parse().unwrap()));
        assert_eq!(v4.host_port().unwrap(), ("10.0.0.5", 5432));
        assert_eq!(v4, "10.0.0.5:5432");
        assert_eq!(v4.to_string(), "10.0.0.5:5432");
        let v6 = ServerAddr::new("[::1]:443");
        assert_eq!(v6.ip, Some("[::1]:443".parse().unwrap()));
        assert_eq!(v6.host_port().unwrap(), ("::1", 443));
        assert_eq!(&*v6, "[::1]:443");
        // A name is resolved at each dial.
        let name = ServerAddr::new("db.service:5432");
        assert_eq!(name.ip, None);
        assert_eq!(name.host_port().unwrap(), ("db.service", 5432));
        // An invalid address is left for the dial to explain, with the same words.
        for invalid in ["10.0.0.5", "::1:443", "10.0.0.5:http", "[::1:443", ":80"] {
            let a = ServerAddr::new(invalid);
            assert_eq!(a.ip, None, "{invalid}");
            let why = a.host_port().unwrap_err().to_string();
            assert_eq!(why, split_host_port(invalid).unwrap_err().to_string());
        }
    }

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("db.service:5432").unwrap(),
            ("db.service", 5432)
        );
        assert_eq!(split_host_port("127.0.0.1:80").unwrap(), ("127.0.0.1", 80));
        assert_eq!(split_host_port("[::1]:443").unwrap(), ("::1", 443));
        for bad in ["db", "::1:443", "[::1:443", ":80", "db:http", "db:70000"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }
}
