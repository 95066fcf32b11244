//! Consul Connect end to end: the dev catalog's Connect CA, the Consul provider (leaf + roots
//! watches, the `connect-<service>` transport it emits, the identity it pushes) and the transport
//! crate dialling mTLS backends that present Connect leaves: the exact SPIFFE ID is required, a
//! rotated CA is followed, and PROXY protocol goes inside the mTLS stream.

mod consul_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use consul_common::{catalog, consul_cfg, options};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tagway_config::{Dynamic, ServersTransport};
use tagway_integration::catalog::{
    CheckDefinition, CheckStatus, DevCatalogHandle, LeafCertificate, ServiceRegistration,
};
use tagway_provider_consul::ConsulProvider;
use tagway_transport::{ClientAddrs, DialErrorReason, IdentitySource, Transport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// An mTLS backend presenting a Connect leaf, requiring a client certificate from the CA roots,
/// recording the client's URI SAN and (optionally) the PROXY line read inside TLS.
/// Per connection: the client's URI SAN and the PROXY line read inside TLS.
type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

struct TlsBackend {
    addr: std::net::SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBackend {
    async fn start(leaf: &LeafCertificate, catalog: &DevCatalogHandle, proxy_inside: bool) -> Self {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.private_key_pem.as_bytes()).unwrap();
        let mut roots = RootCertStore::empty();
        for r in catalog.ca_roots() {
            for c in CertificateDer::pem_slice_iter(r.pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    return;
                };
                let (acceptor, seen) = (acceptor.clone(), s2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let uri = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first().cloned())
                        .and_then(|der| {
                            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
                            let san = cert.subject_alternative_name().ok()??;
                            san.value.general_names.iter().find_map(|n| match n {
                                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                                _ => None,
                            })
                        });
                    let mut r = BufReader::new(tls);
                    let proxy = if proxy_inside {
                        let mut line = String::new();
                        let _ = r.read_line(&mut line).await;
                        Some(line.trim_end().to_owned())
                    } else {
                        None
                    };
                    seen.lock().unwrap().push((uri, proxy));
                    let _ = r.get_mut().write_all(b"hello from db\n").await;
                    let _ = r.get_mut().flush().await;
                    let mut buf = [0u8; 64];
                    let _ = r.read(&mut buf).await;
                });
            }
        });
        TlsBackend { addr, seen, task }
    }
}

async fn wait_config(
    rx: &mut watch::Receiver<Arc<Dynamic>>,
    what: &str,
    f: impl FnMut(&Arc<Dynamic>) -> bool,
) -> Arc<Dynamic> {
    tokio::time::timeout(Duration::from_secs(15), rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .clone()
}

async fn greet(
    t: &Transport,
    addr: &str,
    client: Option<ClientAddrs>,
) -> Result<String, DialErrorReason> {
    let mut s = t.dial(addr, true, client).await.map_err(|e| e.reason())?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| DialErrorReason::Other)?
        .map_err(|_| DialErrorReason::Other)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_mtls_with_the_exact_spiffe_id_rotation_and_proxy_inside_tls() {
    let catalog = catalog().await;
    let leaf = catalog.issue_leaf("db").unwrap();
    let backend = TlsBackend::start(&leaf, &catalog, true).await;
    catalog
        .register(
            ServiceRegistration::new("db")
                .id("db-1")
                .address("127.0.0.1")
                .port(backend.addr.port())
                .connect_native(true)
                .tags([
                    "traefik.tcp.routers.db.rule=HostSNI(`*`)",
                    "traefik.tcp.services.db.loadbalancer.proxyProtocol.version=1",
                    "traefik.consulcatalog.connect=true",
                ])
                .check(CheckDefinition::static_status(CheckStatus::Passing)),
        )
        .unwrap();
    let mut cfg = consul_cfg(&catalog);
    cfg.connect_aware = true;
    let identity = IdentitySource::manual();
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = ConsulProvider::with_env(&cfg, &|_| None)
        .unwrap()
        .with_options(options())
        .with_identity_source(identity.clone())
        .start(async move {
            let _ = stop_rx.await;
        })
        .unwrap();
    let mut rx = running.config();
    let d = wait_config(&mut rx, "the Connect service", |d| {
        d.tcp.services.contains_key("db")
    })
    .await;
    let lb = d.tcp.services["db"].load_balancer.clone().unwrap();
    assert_eq!(
        lb.servers_transport.as_deref(),
        Some("connect-db@consulcatalog")
    );
    let server = lb.servers[0].clone();
    assert!(server.tls);
    let tcfg: ServersTransport = d.tcp.servers_transports["connect-db"].as_ref().clone();
    let want = catalog.spiffe_id("db");
    assert_eq!(
        tcfg.spiffe.as_ref().unwrap().ids,
        std::slice::from_ref(&want)
    );
    let pp = tcfg.proxy_protocol.clone().unwrap();
    assert!(pp.inside_tls && pp.version == 1);
    // The gateway's leaf and the roots are pushed to the identity source. They come through
    // their own watches, which may answer after the catalog's: wait for them (bounded).
    let mut pushed = identity.subscribe();
    let current = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(id) = identity.current() {
                break id;
            }
            pushed.changed().await.unwrap();
        }
    })
    .await
    .expect("the gateway's identity pushed");
    assert_eq!(
        current.spiffe_id(),
        Some(catalog.spiffe_id("tagway").as_str())
    );

    let transport =
        Transport::new("connect-db@consulcatalog", &tcfg, Some(identity.clone())).unwrap();
    let client = ClientAddrs {
        source: "192.0.2.7:4000".parse().unwrap(),
        destination: "127.0.0.1:5432".parse().unwrap(),
    };
    assert_eq!(
        greet(&transport, &server.address, Some(client))
            .await
            .unwrap(),
        "hello from db"
    );
    let (uri, proxy) = backend.seen.lock().unwrap()[0].clone();
    assert_eq!(
        uri.as_deref(),
        Some(catalog.spiffe_id("tagway").as_str()),
        "the backend saw the gateway's leaf"
    );
    assert_eq!(
        proxy.as_deref(),
        Some("PROXY TCP4 192.0.2.7 127.0.0.1 4000 5432"),
        "the PROXY header is the first thing inside the mTLS stream"
    );

    // A backend presenting another service's identity is refused.
    let impostor = TlsBackend::start(&catalog.issue_leaf("web").unwrap(), &catalog, false).await;
    assert_eq!(
        greet(&transport, &impostor.addr.to_string(), None).await,
        Err(DialErrorReason::SpiffeIdMismatch)
    );

    // CA rotation: the provider pushes the new roots and the re-issued leaf; backends with
    // leaves of the new root are accepted, and so are those of the old one until it is pruned.
    let before = identity.current().unwrap().certificate_chain().to_vec();
    let mut rotations = identity.subscribe();
    rotations.borrow_and_update();
    catalog.rotate_ca().unwrap();
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            rotations.changed().await.unwrap();
            if identity.current().unwrap().certificate_chain() != before.as_slice() {
                break;
            }
        }
    })
    .await
    .expect("rotated identity pushed");
    let rotated = TlsBackend::start(&catalog.issue_leaf("db").unwrap(), &catalog, false).await;
    // The transport built before the rotation picks the new identity on its next dial. The leaf
    // and the roots arrive through two watches in either order: once both have been pushed, the
    // backend with a leaf of the new root is trusted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match greet(&transport, &rotated.addr.to_string(), None).await {
            Ok(a) => break a,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the rotated roots never arrived: {e:?}"),
        }
    };
    assert_eq!(answer, "hello from db");
    assert_eq!(
        rotated.seen.lock().unwrap()[0].0.as_deref(),
        Some(catalog.spiffe_id("tagway").as_str())
    );
    // A backend still presenting its leaf of the previous root (and trusting both roots, as a
    // sidecar does after the rotation) is accepted too.
    let old_leaf = TlsBackend::start(&leaf, &catalog, false).await;
    assert_eq!(
        greet(&transport, &old_leaf.addr.to_string(), None)
            .await
            .unwrap(),
        "hello from db"
    );
    assert!(running.status().borrow().connect_ready);
}
