//! The sandbox's example TCP backends, served in-process on `127.0.0.1:0`.
//!
//! Each one answers first (a greeting line naming who answered), then echoes every line it
//! receives, prefixed with its name, until the client closes. Connections without the expected
//! preamble (the dev catalog's TCP health checks open and close at once) are dropped quietly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::SandboxError;

/// The SNI name the TLS passthrough backend's certificate is issued for.
pub const SECURE_SERVER_NAME: &str = "secure.sandbox.test";

/// How long a backend waits for a PROXY header or a TLS handshake before dropping a connection.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest line echoed back; longer input is cut into pieces of this size.
const MAX_LINE: usize = 4096;
/// Largest PROXY header (v2 with TLVs is bounded by the 16-byte prefix plus a u16 length; the
/// gateway sends none) the backend reads.
const MAX_PROXY_HEADER: usize = 16 + 512;

/// What kind of example backend this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// A plain echo server greeting with its service name and version.
    Echo {
        /// Consul service name (`pg-echo`).
        service: String,
        /// Version label (`v1`).
        version: String,
        /// Weight it is registered with (shown in the greeting).
        weight: u32,
    },
    /// TLS terminated by the backend itself (the gateway passes the stream through).
    Tls,
    /// Expects a PROXY protocol header (v1 or v2) and tells the client what it said.
    ProxyProtocol,
    /// An echo server that is not registered at start: the walkthrough registers it.
    Hello,
}

/// One running backend.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Consul service name it is (or will be) registered as.
    pub service: String,
    /// Consul service ID.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it does.
    pub kind: BackendKind,
}

/// The certificate material of the TLS backend: a sandbox CA and a leaf for
/// [`SECURE_SERVER_NAME`] it signed.
#[derive(Clone, Debug)]
pub struct SecureCertificates {
    /// The CA certificate (PEM): what a client trusts (`openssl s_client -CAfile`).
    pub ca_pem: String,
    /// The CA certificate (DER).
    pub ca_der: Vec<u8>,
    leaf_der: Vec<u8>,
    leaf_key_der: Vec<u8>,
}

impl SecureCertificates {
    /// Generates a fresh CA (ECDSA P-256, "tagway sandbox CA") and a leaf for
    /// [`SECURE_SERVER_NAME`].
    pub fn generate() -> Result<Self, SandboxError> {
        let cert_err = |what: &'static str| {
            move |e: rcgen::Error| SandboxError::Certificate {
                what,
                message: e.to_string(),
            }
        };
        let ca_key = KeyPair::generate().map_err(cert_err("CA key"))?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tagway sandbox CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params
            .self_signed(&ca_key)
            .map_err(cert_err("CA certificate"))?;

        let leaf_key = KeyPair::generate().map_err(cert_err("leaf key"))?;
        let mut leaf_params = CertificateParams::new(vec![SECURE_SERVER_NAME.to_owned()])
            .map_err(cert_err("leaf parameters"))?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, SECURE_SERVER_NAME);
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf = leaf_params
            .signed_by(&leaf_key, &issuer)
            .map_err(cert_err("leaf certificate"))?;
        Ok(SecureCertificates {
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            leaf_der: leaf.der().to_vec(),
            leaf_key_der: leaf_key.serialize_der(),
        })
    }

    fn acceptor(&self) -> Result<TlsAcceptor, SandboxError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth().with_single_cert(
                    vec![self.leaf_der.clone().into()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key_der.clone())),
                )
            })
            .map_err(|e| SandboxError::Certificate {
                what: "TLS server configuration",
                message: e.to_string(),
            })?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// The running example backends; stopped by [`Backends::shutdown`] (or when dropped, at the next
/// accept).
#[derive(Debug)]
pub struct Backends {
    /// `pg-echo` v1 (weight 3).
    pub echo_v1: Backend,
    /// `pg-echo` v2 (weight 1).
    pub echo_v2: Backend,
    /// `secure`: TLS passthrough target.
    pub secure: Backend,
    /// `client-addr`: behind PROXY protocol.
    pub client_addr: Backend,
    /// `hello`: running, not registered at start.
    pub hello: Backend,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Backends {
    /// Binds every backend on `127.0.0.1:0` and starts serving.
    pub async fn start(certs: &SecureCertificates) -> Result<Backends, SandboxError> {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let acceptor = certs.acceptor()?;
        let spawn = |service: &str, id: &str, kind: BackendKind, listener: TcpListener| {
            let addr = listener
                .local_addr()
                .map_err(|source| SandboxError::Backend {
                    service: service.to_owned(),
                    source,
                })?;
            let backend = Backend {
                service: service.to_owned(),
                id: id.to_owned(),
                addr,
                kind,
            };
            tracker.spawn(serve(
                listener,
                backend.clone(),
                acceptor.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
            Ok::<_, SandboxError>(backend)
        };
        let echo = |version: &str, weight: u32| BackendKind::Echo {
            service: "pg-echo".to_owned(),
            version: version.to_owned(),
            weight,
        };
        let echo_v1 = spawn(
            "pg-echo",
            "pg-echo-v1",
            echo("v1", 3),
            bind_local("pg-echo").await?,
        )?;
        let echo_v2 = spawn(
            "pg-echo",
            "pg-echo-v2",
            echo("v2", 1),
            bind_local("pg-echo").await?,
        )?;
        let secure = spawn(
            "secure",
            "secure-1",
            BackendKind::Tls,
            bind_local("secure").await?,
        )?;
        let client_addr = spawn(
            "client-addr",
            "client-addr-1",
            BackendKind::ProxyProtocol,
            bind_local("client-addr").await?,
        )?;
        let hello = spawn(
            "hello",
            "hello-1",
            BackendKind::Hello,
            bind_local("hello").await?,
        )?;
        Ok(Backends {
            echo_v1,
            echo_v2,
            secure,
            client_addr,
            hello,
            shutdown,
            tracker,
        })
    }

    /// Every backend.
    pub fn all(&self) -> [&Backend; 5] {
        [
            &self.echo_v1,
            &self.echo_v2,
            &self.secure,
            &self.client_addr,
            &self.hello,
        ]
    }

    /// Stops accepting, closes open connections and waits (at most `limit`) for their tasks.
    pub async fn shutdown(self, limit: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(limit, self.tracker.wait()).await;
    }
}

async fn bind_local(service: &str) -> Result<TcpListener, SandboxError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| SandboxError::Backend {
            service: service.to_owned(),
            source,
        })
}

async fn serve(
    listener: TcpListener,
    backend: Backend,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(service = %backend.service, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let backend = backend.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                r = handle(stream, peer, &backend, &acceptor) => {
                    if let Err(e) = r {
                        tracing::debug!(service = %backend.id, %peer, error = %e, "backend connection ended");
                    }
                }
            }
        });
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    backend: &Backend,
    acceptor: &TlsAcceptor,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    match &backend.kind {
        BackendKind::Echo {
            service,
            version,
            weight,
        } => {
            let greeting = format!(
                "{service} {version} answered (weight {weight}, server {}); type a line, {version} echoes it\n",
                backend.addr
            );
            echo(stream, &greeting, version).await
        }
        BackendKind::Hello => {
            let greeting = format!(
                "hello answered: a service registered at run time is live (server {})\n",
                backend.addr
            );
            echo(stream, &greeting, "hello").await
        }
        BackendKind::Tls => {
            let tls = tokio::time::timeout(PREAMBLE_TIMEOUT, acceptor.accept(stream))
                .await
                .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
            let sni = tls.get_ref().1.server_name().unwrap_or("(none)").to_owned();
            tracing::info!(%peer, %sni, "secure: TLS handshake done (the backend terminates TLS)");
            let greeting = format!(
                "secure answered over TLS it terminated itself (SNI {sni}); the gateway only passed the bytes through\n"
            );
            echo(tls, &greeting, "secure").await
        }
        BackendKind::ProxyProtocol => {
            let mut stream = stream;
            let header = tokio::time::timeout(PREAMBLE_TIMEOUT, read_proxy_header(&mut stream))
                .await
                .map_err(|_| std::io::Error::other("no PROXY header within 5s"))??;
            tracing::info!(
                gateway = %peer,
                client = %header.source,
                "client-addr: the PROXY header says the client is {}", header.source
            );
            let greeting = format!(
                "client-addr answered: the gateway says you are {} (PROXY protocol {}: {})\n",
                header.source, header.version, header.text
            );
            let (reader, writer) = tokio::io::split(stream);
            let reader = BufReader::new(std::io::Cursor::new(header.rest).chain(reader));
            echo_split(reader, writer, &greeting, "client-addr").await
        }
    }
}

/// A PROXY header as the backend understood it.
#[derive(Debug)]
struct ProxyHeader {
    /// `v1` or `v2`.
    version: &'static str,
    /// The client's address (`source`), or `unknown` for `LOCAL`/`UNKNOWN`.
    source: String,
    /// A readable rendering of the header.
    text: String,
    /// Bytes read after the header.
    rest: Vec<u8>,
}

async fn read_proxy_header(stream: &mut TcpStream) -> std::io::Result<ProxyHeader> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a PROXY header",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_proxy_header(&buf) {
            Ok(Some(h)) => return Ok(h),
            Ok(None) if buf.len() < MAX_PROXY_HEADER => continue,
            Ok(None) => return Err(std::io::Error::other("PROXY header too long")),
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

/// Parses a PROXY v1 or v2 header at the start of `buf`: `Ok(None)` when more bytes are needed.
fn parse_proxy_header(buf: &[u8]) -> Result<Option<ProxyHeader>, String> {
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        return Ok(None);
    }
    match parsed {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    SocketAddr::from((a.source_address, a.source_port)).to_string()
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    SocketAddr::from((a.source_address, a.source_port)).to_string()
                }
                ppp::v1::Addresses::Unknown => "unknown".to_owned(),
            };
            let len = h.header.len();
            Ok(Some(ProxyHeader {
                version: "v1",
                source,
                text: format!("`{}`", h.header.trim_end()),
                rest: buf[len..].to_vec(),
            }))
        }
        HeaderResult::V2(Ok(h)) => {
            let (source, destination) = match h.addresses {
                ppp::v2::Addresses::IPv4(a) => (
                    SocketAddr::from((a.source_address, a.source_port)).to_string(),
                    SocketAddr::from((a.destination_address, a.destination_port)).to_string(),
                ),
                ppp::v2::Addresses::IPv6(a) => (
                    SocketAddr::from((a.source_address, a.source_port)).to_string(),
                    SocketAddr::from((a.destination_address, a.destination_port)).to_string(),
                ),
                _ => ("unknown".to_owned(), "unknown".to_owned()),
            };
            let len = h.header.len();
            Ok(Some(ProxyHeader {
                version: "v2",
                text: format!("binary header, {len} bytes, {source} -> {destination}"),
                source,
                rest: buf[len..].to_vec(),
            }))
        }
        HeaderResult::V1(Err(e)) => Err(format!("invalid PROXY v1 header: {e}")),
        HeaderResult::V2(Err(e)) => Err(format!("invalid PROXY v2 header: {e}")),
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    greeting: &str,
    label: &str,
) -> std::io::Result<()> {
    let (reader, writer) = tokio::io::split(stream);
    echo_split(BufReader::new(reader), writer, greeting, label).await
}

async fn echo_split<R, W>(
    mut reader: BufReader<R>,
    mut writer: W,
    greeting: &str,
    label: &str,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(greeting.as_bytes()).await?;
    writer.flush().await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        writer
            .write_all(format!("{label}: {text}\n").as_bytes())
            .await?;
        writer.flush().await?;
    }
    writer.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v1_header_is_parsed_with_the_bytes_after_it() {
        let h = parse_proxy_header(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 15400\r\nhi\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.version, "v1");
        assert_eq!(h.source, "127.0.0.9:40000");
        assert_eq!(h.rest, b"hi\n");
        assert!(h.text.contains("PROXY TCP4 127.0.0.9"), "{}", h.text);
    }

    #[test]
    fn proxy_v2_header_is_parsed() {
        let src: SocketAddr = "[::1]:40001".parse().expect("literal");
        let dst: SocketAddr = "[::1]:15400".parse().expect("literal");
        let mut bytes = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .expect("builds");
        bytes.extend_from_slice(b"x");
        let h = parse_proxy_header(&bytes)
            .expect("valid")
            .expect("complete");
        assert_eq!(h.version, "v2");
        assert_eq!(h.source, "[::1]:40001");
        assert_eq!(h.rest, b"x");
    }

    #[test]
    fn partial_and_invalid_headers() {
        assert!(matches!(parse_proxy_header(b"PROXY TCP4 127.0"), Ok(None)));
        assert!(parse_proxy_header(b"GET / HTTP/1.1\r\n\r\n").is_err());
    }
}
