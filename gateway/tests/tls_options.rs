//! `tls.options` on TLS termination, over real sockets with rcgen certificates: minimum version,
//! client certificates (RequireAndVerifyClientCert, VerifyClientCertIfGiven, RequireAnyClientCert),
//! `sniStrict` and ALPN.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::*;
use tagway_config::{
    CertificateEntry, ClientAuth, Dynamic, EntryPoint, FileOrContent, RouterTls, StaticConfig,
    TlsOptions,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const EPS: &[&str] = &["v13", "mtls", "optional", "any", "strict", "lax", "alpn"];

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn dup(id: &Identity) -> Identity {
    (id.0.clone(), id.1.clone_key())
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: Identity,
    stranger: Identity,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let client_cert = |issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let c = p.signed_by(&key, issuer).unwrap();
        (
            vec![c.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
    };
    let client = client_cert(&issuer);
    // Same shape, another CA.
    let other_key = KeyPair::generate().unwrap();
    let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let stranger = client_cert(&Issuer::new(other_params, other_key));
    Pki {
        ca_pem: ca.pem(),
        server: cert(&["a.example"]),
        client,
        stranger,
    }
}

fn options(f: impl FnOnce(&mut TlsOptions)) -> TlsOptions {
    let mut o = TlsOptions::default();
    f(&mut o);
    o
}

fn config(pki: &Pki, app: SocketAddr) -> Dynamic {
    let mut d = Dynamic::default();
    d.tls.certificates.push(CertificateEntry {
        cert_file: FileOrContent(pki.server.0.clone()),
        key_file: FileOrContent(pki.server.1.clone()),
        stores: vec![],
    });
    let client_auth = |kind: &str, ca: bool| {
        Some(ClientAuth {
            ca_files: if ca {
                vec![FileOrContent(pki.ca_pem.clone())]
            } else {
                vec![]
            },
            client_auth_type: Some(kind.to_owned()),
        })
    };
    let o = &mut d.tls.options;
    o.insert(
        "v13".into(),
        options(|o| o.min_version = Some("VersionTLS13".into())),
    );
    o.insert(
        "mtls".into(),
        options(|o| o.client_auth = client_auth("RequireAndVerifyClientCert", true)),
    );
    o.insert(
        "optional".into(),
        options(|o| o.client_auth = client_auth("VerifyClientCertIfGiven", true)),
    );
    o.insert(
        "any".into(),
        options(|o| o.client_auth = client_auth("RequireAnyClientCert", false)),
    );
    o.insert("strict".into(), options(|o| o.sni_strict = true));
    o.insert(
        "alpn".into(),
        options(|o| o.alpn_protocols = vec!["h2".into(), "x-tagway".into()]),
    );
    d.tcp.services.insert("app".into(), lb(&[(app, 1)]));
    for ep in EPS {
        let mut r = router("HostSNI(`*`)", "app", None);
        r.entry_points = vec![(*ep).to_owned()];
        r.tls = Some(RouterTls {
            options: (*ep != "lax").then(|| (*ep).to_owned()),
            ..Default::default()
        });
        d.tcp.routers.insert((*ep).to_owned(), r);
    }
    d
}

fn static_config() -> StaticConfig {
    let mut s = StaticConfig::default();
    for ep in EPS {
        s.entry_points.insert(
            (*ep).to_owned(),
            EntryPoint {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            },
        );
    }
    s
}

/// A client trusting `ca_pem`, with the given versions, client certificate, SNI and ALPN.
struct Client {
    tls12_only: bool,
    cert: Option<Identity>,
    sni: bool,
    alpn: Vec<Vec<u8>>,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            tls12_only: false,
            cert: None,
            sni: true,
            alpn: vec![],
        }
    }
}

/// Handshakes with `addr` and reads to EOF: the backend's answer and the negotiated ALPN, or
/// the error that ended it.
async fn talk(
    addr: SocketAddr,
    server_pem: &str,
    c: Client,
) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if c.tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS12, &rustls::version::TLS13]
    };
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match c.cert {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.enable_sni = c.sni;
    cfg.alpn_protocols = c.alpn;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from("a.example").unwrap();
    let work = async {
        let mut t = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let alpn = t.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mut out = Vec::new();
        t.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok((out, alpn))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timed out".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_options_apply_per_router() {
    let pki = pki();
    let app = named_backend("APP").await;
    let gw = start(static_config(), config(&pki, app)).await;
    let at = |ep: &str| gw.addrs[ep];
    let server = pki.server.0.as_str();
    let ok = |r: Result<(Vec<u8>, Option<Vec<u8>>), String>| match r {
        Ok((data, _)) => data == b"APP",
        Err(_) => false,
    };

    // minVersion = VersionTLS13: a TLS 1.2-only client is refused, TLS 1.3 works.
    let r = talk(
        at("v13"),
        server,
        Client {
            tls12_only: true,
            ..Default::default()
        },
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    assert!(ok(talk(at("v13"), server, Client::default()).await));
    // Without options (default), TLS 1.2 is accepted.
    assert!(ok(talk(
        at("lax"),
        server,
        Client {
            tls12_only: true,
            ..Default::default()
        }
    )
    .await));

    // RequireAndVerifyClientCert: no certificate or one from another CA → refused.
    let r = talk(at("mtls"), server, Client::default()).await;
    assert!(!ok(r.clone()), "{r:?}");
    let r = talk(
        at("mtls"),
        server,
        Client {
            cert: Some(dup(&pki.stranger)),
            ..Default::default()
        },
    )
    .await;
    assert!(!ok(r.clone()), "{r:?}");
    assert!(ok(talk(
        at("mtls"),
        server,
        Client {
            cert: Some(dup(&pki.client)),
            ..Default::default()
        }
    )
    .await));
    // VerifyClientCertIfGiven: none is fine, a wrong one is not.
    assert!(ok(talk(at("optional"), server, Client::default()).await));
    let r = talk(
        at("optional"),
        server,
        Client {
            cert: Some(dup(&pki.stranger)),
            ..Default::default()
        },
    )
    .await;
    assert!(!ok(r.clone()), "{r:?}");
    assert!(ok(talk(
        at("optional"),
        server,
        Client {
            cert: Some(dup(&pki.client)),
            ..Default::default()
        }
    )
    .await));
    // RequireAnyClientCert: any certificate, but one is needed.
    let r = talk(at("any"), server, Client::default()).await;
    assert!(!ok(r.clone()), "{r:?}");
    assert!(ok(talk(
        at("any"),
        server,
        Client {
            cert: Some(dup(&pki.stranger)),
            ..Default::default()
        }
    )
    .await));

    // sniStrict: a ClientHello without SNI is refused; with a matching SNI it works. Without
    // sniStrict the default certificate answers a ClientHello without SNI.
    let r = talk(
        at("strict"),
        server,
        Client {
            sni: false,
            ..Default::default()
        },
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    assert!(ok(talk(at("strict"), server, Client::default()).await));
    assert!(ok(talk(
        at("lax"),
        server,
        Client {
            sni: false,
            ..Default::default()
        }
    )
    .await));

    // ALPN: the client's choice among the options' protocols is negotiated.
    let (data, alpn) = talk(
        at("alpn"),
        server,
        Client {
            alpn: vec![b"x-tagway".to_vec(), b"http/1.1".to_vec()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(data, b"APP");
    assert_eq!(alpn.as_deref(), Some(&b"x-tagway"[..]));
    let (_, alpn) = talk(
        at("lax"),
        server,
        Client {
            alpn: vec![b"h2".to_vec()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(alpn, None, "no ALPN without alpnProtocols");

    // Every refused handshake is counted.
    let tls_errors = EPS
        .iter()
        .map(|ep| {
            gw.handle
                .entry_point(ep)
                .unwrap()
                .tls_errors
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum::<u64>();
    assert!(tls_errors >= 5, "{tls_errors}");
}
