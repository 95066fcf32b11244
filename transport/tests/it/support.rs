//! Test support: certificates made with rcgen, rustls backends on 127.0.0.1 that record what they
//! see (PROXY header, client certificate), transports from YAML-ish literals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use tagway_config::{ServersTransport, Spiffe, TransportTls};
use tagway_transport::tls::provider;

/// A certificate authority.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert: rcgen::Certificate,
}

/// A leaf certificate and its key.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Leaf {
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key")
    }

    /// Certificate and key in one PEM text.
    pub fn bundle_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

/// What a leaf carries.
#[derive(Default)]
pub struct LeafSpec<'a> {
    pub dns: &'a [&'a str],
    pub uris: &'a [&'a str],
    pub expired: bool,
    pub cn: &'a str,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA cert");
        Ca { params, key, cert }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    pub fn leaf(&self, spec: LeafSpec<'_>) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(spec.dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        for uri in spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("uri")));
        }
        params.distinguished_name.push(
            DnType::CommonName,
            if spec.cn.is_empty() { "leaf" } else { spec.cn },
        );
        // X.509-SVIDs must say they are not CAs.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A leaf for `dns` names.
    pub fn server(&self, dns: &[&str]) -> Leaf {
        self.leaf(LeafSpec {
            dns,
            ..LeafSpec::default()
        })
    }

    /// An X.509-SVID for `id`.
    pub fn svid(&self, id: &str) -> Leaf {
        self.leaf(LeafSpec {
            uris: &[id],
            ..LeafSpec::default()
        })
    }
}

/// A self-signed certificate for `localhost`.
pub fn self_signed() -> Leaf {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("self-signed");
    Leaf {
        cert_pem: cert.pem(),
        key_pem: signing_key.serialize_pem(),
        der: cert.der().clone(),
    }
}

/// TLS settings of a test backend.
pub fn server_tls(leaf: &Leaf, client_ca: Option<&[CertificateDer<'static>]>) -> Arc<ServerConfig> {
    server_tls_versions(leaf, client_ca, rustls::DEFAULT_VERSIONS)
}

pub fn server_tls_versions(
    leaf: &Leaf,
    client_ca: Option<&[CertificateDer<'static>]>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions");
    let builder = match client_ca {
        Some(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca.clone()).expect("client CA");
            }
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .expect("client verifier"),
            )
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(vec![leaf.der.clone()], leaf.key_der())
            .expect("server cert"),
    )
}

/// Where a test backend expects a PROXY header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExpectProxy {
    No,
    BeforeTls,
    InsideTls,
}

/// What a test backend saw on one connection.
#[derive(Debug, Default)]
pub struct Seen {
    /// The raw PROXY header.
    pub proxy_header: Option<Vec<u8>>,
    /// The client certificate chain, on TLS connections.
    pub client_certs: Option<Vec<CertificateDer<'static>>>,
    /// The SNI sent.
    pub sni: Option<String>,
    /// The TLS handshake error, if it failed.
    pub tls_error: Option<String>,
}

/// A backend on 127.0.0.1 that records each connection and then echoes.
pub struct Backend {
    pub addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    _task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn plain(proxy: ExpectProxy) -> Backend {
        Self::start("127.0.0.1:0", None, proxy, None).await
    }

    pub async fn tls(config: Arc<ServerConfig>, proxy: ExpectProxy) -> Backend {
        Self::start("127.0.0.1:0", Some(config), proxy, None).await
    }

    /// A plain backend that greets each connection with `greeting` before echoing.
    pub async fn greeting(greeting: &'static [u8]) -> Backend {
        Self::start("127.0.0.1:0", None, ExpectProxy::No, Some(greeting)).await
    }

    pub async fn start(
        bind: &str,
        tls: Option<Arc<ServerConfig>>,
        proxy: ExpectProxy,
        greeting: Option<&'static [u8]>,
    ) -> Backend {
        let listener = TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = serve(tcp, tls, proxy, greeting, tx).await;
                });
            }
        });
        Backend {
            addr,
            seen,
            _task: task,
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// What the next connection showed.
    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("backend saw no connection within 10s")
            .expect("backend stopped")
    }
}

async fn serve(
    mut tcp: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    proxy: ExpectProxy,
    greeting: Option<&'static [u8]>,
    tx: mpsc::UnboundedSender<Seen>,
) -> Result<()> {
    let mut seen = Seen::default();
    if proxy == ExpectProxy::BeforeTls {
        seen.proxy_header = Some(read_proxy_header(&mut tcp).await?);
    }
    let Some(config) = tls else {
        let _ = tx.send(seen);
        if let Some(greeting) = greeting {
            tcp.write_all(greeting).await?;
        }
        return echo(tcp).await;
    };
    let mut stream = match TlsAcceptor::from(config).accept(tcp).await {
        Ok(stream) => stream,
        Err(e) => {
            seen.tls_error = Some(e.to_string());
            let _ = tx.send(seen);
            return Ok(());
        }
    };
    {
        let conn = stream.get_ref().1;
        seen.client_certs = conn.peer_certificates().map(|c| c.to_vec());
        seen.sni = conn.server_name().map(str::to_owned);
    }
    if proxy == ExpectProxy::InsideTls {
        seen.proxy_header = Some(read_proxy_header(&mut stream).await?);
    }
    let _ = tx.send(seen);
    echo(stream).await
}

async fn echo<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: S) -> Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await?;
    Ok(())
}

/// Reads exactly one PROXY header (v1 up to CRLF, v2 by its length field), byte by byte so that
/// nothing after it is consumed.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>> {
    const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut header = Vec::new();
    while header.len() < 16 {
        header.push(stream.read_u8().await.context("reading PROXY header")?);
        if header.len() == 6 && header.as_slice() == b"PROXY " {
            // v1: up to CRLF, at most 107 bytes.
            while !header.ends_with(b"\r\n") {
                if header.len() > 107 {
                    bail!("v1 header too long");
                }
                header.push(stream.read_u8().await?);
            }
            return Ok(header);
        }
    }
    if &header[..12] != V2_SIG {
        bail!("not a PROXY header: {header:?}");
    }
    let len = u16::from_be_bytes([header[14], header[15]]) as usize;
    let mut rest = vec![0; len];
    stream.read_exact(&mut rest).await?;
    header.extend_from_slice(&rest);
    Ok(header)
}

/// Writes `msg` and reads the same bytes back.
pub async fn round_trip<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> Result<()> {
    stream.write_all(msg).await?;
    stream.flush().await?;
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .context("echo timed out")??;
    if buf != msg {
        bail!("echo mismatch: {buf:?}");
    }
    Ok(())
}

/// A transport configuration with a `tls` section.
pub fn tls_transport(tls: TransportTls) -> ServersTransport {
    ServersTransport {
        tls: Some(tls),
        ..ServersTransport::default()
    }
}

/// A transport configuration with a `spiffe` section.
pub fn spiffe_transport(ids: &[&str], trust_domain: Option<&str>) -> ServersTransport {
    ServersTransport {
        spiffe: Some(Spiffe {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            trust_domain: trust_domain.map(str::to_owned),
        }),
        ..ServersTransport::default()
    }
}

/// The URI SANs of a certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate");
    cert.subject_alternative_name()
        .expect("SAN")
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}
