//! The gateway's own SPIFFE identity from `providers.spiffe` PEM files, end to end through the real
//! `tagway` binary: a transport with `spiffe.ids` dials a backend that requires a client
//! certificate; the backend sees the gateway's SVID, and a backend presenting another SPIFFE ID is
//! refused. Then the SVID files are rotated and new connections present the new SVID.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tagway_integration::e2e::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new() -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "spiffe test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok(Ca { params, key, pem })
    }

    /// An X.509-SVID for `id`: (chain PEM, key PEM).
    fn svid(&self, id: &str) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names.push(SanType::URI(id.try_into()?));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The URI SAN of a DER certificate.
fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    })
}

/// A TLS backend presenting `svid`, requiring a client certificate from `ca`, answering with the
/// client's SPIFFE ID.
async fn spiffe_backend(ca_pem: &str, svid: &(String, String)) -> Result<SocketAddr> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(svid.0.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(svid.1.as_bytes())?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = acceptor.accept(s).await {
                    let id = t
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| uri_san(c))
                        .unwrap_or_default();
                    let _ = t.write_all(id.as_bytes()).await;
                    let _ = t.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn file_svid_is_presented_checked_and_rotated() -> Result<()> {
    let ca = Ca::new()?;
    let gateway_v1 = ca.svid("spiffe://example.org/gateway")?;
    let good = spiffe_backend(&ca.pem, &ca.svid("spiffe://example.org/db")?).await?;
    let other = spiffe_backend(&ca.pem, &ca.svid("spiffe://example.org/intruder")?).await?;

    let dynamic = format!(
        "{}{}{}{}\
         [tcp.services.good.loadBalancer]\nserversTransport = \"svid\"\nservers = [{{ address = \"{good}\" }}]\n\
         [tcp.services.other.loadBalancer]\nserversTransport = \"svid\"\nservers = [{{ address = \"{other}\" }}]\n\
         [tcp.serversTransports.svid]\ndialTimeout = \"5s\"\n\
         [tcp.serversTransports.svid.spiffe]\nids = [\"spiffe://example.org/db\"]\n",
        router_toml("good", "HostSNI(`*`)", "good", "entryPoints = [\"good\"]"),
        "",
        router_toml(
            "other",
            "HostSNI(`*`)",
            "other",
            "entryPoints = [\"other\"]"
        ),
        "",
    );
    // The SVID files are written before the gateway starts (the gateway refuses to start without
    // its identity) into the gateway's folder; the static file names them relatively.
    let dir = tempfile::tempdir()?;
    let write = |svid: &(String, String)| -> Result<()> {
        std::fs::write(dir.path().join("svid.pem.tmp"), &svid.0)?;
        std::fs::write(dir.path().join("svid-key.pem.tmp"), &svid.1)?;
        std::fs::rename(dir.path().join("svid.pem.tmp"), dir.path().join("svid.pem"))?;
        std::fs::rename(
            dir.path().join("svid-key.pem.tmp"),
            dir.path().join("svid-key.pem"),
        )?;
        Ok(())
    };
    write(&gateway_v1)?;
    std::fs::write(dir.path().join("bundle.pem"), &ca.pem)?;
    let spiffe = format!(
        "[providers.spiffe]\ncertificate = \"{0}/svid.pem\"\nkey = \"{0}/svid-key.pem\"\nbundle = \"{0}/bundle.pem\"\n",
        dir.path().display()
    );
    let gw = Gateway::start(&["good", "other"], &spiffe, &dynamic)?;

    let seen = exchange(gw.addr("good"), None, b"").await?;
    assert_eq!(String::from_utf8(seen)?, "spiffe://example.org/gateway");
    // The backend with an ID not in `ids` is refused: the client gets no data.
    let refused = exchange(gw.addr("other"), None, b"").await?;
    assert!(
        refused.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&refused)
    );

    // Rotation: new dials present the new SVID (the files are polled about once a second).
    write(&ca.svid("spiffe://example.org/gateway-v2")?)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = String::from_utf8(exchange(gw.addr("good"), None, b"").await?)?;
        if seen == "spiffe://example.org/gateway-v2" {
            break;
        }
        assert_eq!(seen, "spiffe://example.org/gateway", "unexpected identity");
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rotated SVID was not used; log:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gw.log_text();
    assert!(
        log.contains("spiffe://example.org/intruder"),
        "the refused dial is logged with the SPIFFE ID it refused: {log}"
    );
    Ok(())
}
