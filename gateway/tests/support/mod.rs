//! Shared helpers of the gateway's library-level tests: a gateway on 127.0.0.1:0, backends, certs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tagway::server::{Gateway, GatewayHandle};
use tagway_config::{
    Dynamic, EntryPoint, LoadBalancer, Router, RouterTls, Server, Service, StaticConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// A running gateway.
pub struct Gw {
    pub addrs: std::collections::HashMap<String, SocketAddr>,
    pub config: watch::Sender<Arc<Dynamic>>,
    pub handle: GatewayHandle,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
    applied: u64,
}

impl Gw {
    pub fn addr(&self) -> SocketAddr {
        self.addrs["tcp"]
    }

    /// Applies a new configuration and waits until it is in use.
    pub async fn reload(&mut self, d: Dynamic) {
        self.config.send_replace(Arc::new(d));
        self.applied += 1;
        let n = self.applied;
        tokio::time::timeout(Duration::from_secs(5), self.handle.applied(n))
            .await
            .expect("configuration applied");
    }

    /// Triggers the shutdown.
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A static configuration with one entry point `tcp` on 127.0.0.1:0.
pub fn static_cfg() -> StaticConfig {
    static_with(&["tcp"])
}

/// A static configuration with the entry points `names`, each on 127.0.0.1:0.
pub fn static_with(names: &[&str]) -> StaticConfig {
    let mut s = StaticConfig::default();
    for n in names {
        s.entry_points.insert(
            (*n).into(),
            EntryPoint {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            },
        );
    }
    s
}

/// A local address nothing listens on (bound, then released): a dial is refused.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub async fn start(st: StaticConfig, d: Dynamic) -> Gw {
    start_with(st, d, None).await
}

/// [`start`] with data-plane options of its own (the `loadBalancer` ones still come from `st`).
pub async fn start_with(st: StaticConfig, d: Dynamic, opts: Option<tagway::conn::Options>) -> Gw {
    let mut gw = Gateway::new(st.clone());
    if let Some(o) = opts {
        gw = gw.with_options(o);
    }
    gw.bind().unwrap();
    let addrs = st
        .entry_points
        .keys()
        .map(|k| (k.clone(), gw.local_addr(k).unwrap()))
        .collect();
    let mut handle = gw.handle();
    let (tx, rx) = watch::channel(Arc::new(d));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        gw.run(rx, async move {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    handle.applied(1).await;
    Gw {
        addrs,
        config: tx,
        handle,
        stop: Some(stop_tx),
        task,
        applied: 1,
    }
}

pub fn lb(servers: &[(SocketAddr, i64)]) -> Service {
    Service {
        load_balancer: Some(LoadBalancer {
            servers: servers
                .iter()
                .map(|(a, w)| Server {
                    address: a.to_string(),
                    weight: Some(*w),
                    tls: false,
                })
                .collect(),
            ..Default::default()
        }),
        weighted: None,
    }
}

pub fn router(rule: &str, service: &str, tls: Option<bool>) -> Router {
    Router {
        rule: rule.into(),
        service: service.into(),
        tls: tls.map(|passthrough| RouterTls {
            passthrough,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One router `r` → service `s` over the given servers.
pub fn simple(servers: &[(SocketAddr, i64)]) -> Dynamic {
    let mut d = Dynamic::default();
    d.tcp.services.insert("s".into(), lb(servers));
    d.tcp
        .routers
        .insert("r".into(), router("HostSNI(`*`)", "s", None));
    d
}

/// A backend that writes `name` to each connection and closes it.
pub async fn named_backend(name: &str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
            });
        }
    });
    addr
}

/// A backend that echoes every connection until EOF, then closes.
pub async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Connects, reads everything until EOF (bounded by 5 s).
pub async fn read_all(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("read within 5 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// A self-signed certificate (PEM chain, PEM key) for `names`.
pub fn cert(names: &[&str]) -> (String, String) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// A rustls client trusting `ca_pem`.
pub fn tls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    tls_client_alpn(ca_pem, &[])
}

/// A rustls client trusting `ca_pem` that offers the ALPN protocols `alpn`.
pub fn tls_client_alpn(ca_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A rustls server (ring, no client authentication) presenting the PEM chain `cert_pem`.
pub fn tls_acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A TLS backend (for passthrough) that answers `name` to each connection.
pub async fn tls_backend(name: &str, cert_pem: &str, key_pem: &str) -> SocketAddr {
    let acceptor = tls_acceptor(cert_pem, key_pem);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let name = name.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = acceptor.accept(s).await {
                    let _ = t.write_all(name.as_bytes()).await;
                    let _ = t.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A backend for one connection that reads until the client's EOF, then answers what it read
/// followed by 1 MiB (bytes `i % 253`) and closes.
pub async fn answer_after_eof_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut q = Vec::new();
        s.read_to_end(&mut q).await.unwrap();
        let answer: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        s.write_all(&q).await.unwrap();
        s.write_all(&answer).await.unwrap();
        s.shutdown().await.unwrap();
    });
    addr
}

/// Through `gw`, to an [`answer_after_eof_backend`]: the client shuts its write side after a
/// question, and reads the whole answer.
pub async fn assert_half_close(gw: SocketAddr) {
    let mut c = TcpStream::connect(gw).await.unwrap();
    c.write_all(b"question").await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..8], b"question");
    assert_eq!(got.len(), 8 + (1 << 20));
    assert!(
        got[8..]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 253) as u8)
    );
}

/// Connects with TLS (SNI `name`, trusting `ca`) and reads until EOF (bounded by 5 s).
pub async fn tls_read(addr: SocketAddr, ca: &str, name: &str) -> String {
    tls_read_alpn(addr, ca, name, &[]).await
}

/// [`tls_read`] with a client offering the ALPN protocols `alpn`.
pub async fn tls_read_alpn(addr: SocketAddr, ca: &str, name: &str, alpn: &[&[u8]]) -> String {
    let c = TcpStream::connect(addr).await.unwrap();
    let sn = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut t = tls_client_alpn(ca, alpn).connect(sn, c).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
