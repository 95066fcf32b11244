//! The Connect CA: leaves served over HTTP chain to the served roots in a real mTLS handshake,
//! carry only the service's SPIFFE ID, and follow a rotation.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use serde_json::Value;
use tagway_integration::catalog::{DevCatalog, DevCatalogHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::prelude::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client() -> reqwest::Client {
    provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

struct Leaf {
    cert: String,
    key: String,
    uri: String,
    index: u64,
}

async fn fetch_leaf(http: &reqwest::Client, base: &str, service: &str, index: u64) -> Result<Leaf> {
    let resp = http
        .get(format!(
            "{base}/v1/agent/connect/ca/leaf/{service}?index={index}&wait=20s"
        ))
        .send()
        .await?;
    ensure!(resp.status() == 200, "leaf: {}", resp.status());
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .context("index")?;
    let v: Value = resp.json().await?;
    Ok(Leaf {
        cert: v["CertPEM"].as_str().context("CertPEM")?.to_owned(),
        key: v["PrivateKeyPEM"]
            .as_str()
            .context("PrivateKeyPEM")?
            .to_owned(),
        uri: v["ServiceURI"].as_str().context("ServiceURI")?.to_owned(),
        index,
    })
}

async fn fetch_roots(http: &reqwest::Client, base: &str) -> Result<Vec<String>> {
    let v: Value = http
        .get(format!("{base}/v1/agent/connect/ca/roots"))
        .send()
        .await?
        .json()
        .await?;
    v["Roots"]
        .as_array()
        .context("Roots")?
        .iter()
        .map(|r| Ok(r["RootCert"].as_str().context("RootCert")?.to_owned()))
        .collect()
}

/// A TLS server requiring a client certificate chained to `roots`; answers "ok" and closes.
/// Returns its address and a task giving whether the handshake succeeded.
async fn mtls_server(
    roots: &[String],
) -> Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<bool>,
    CertificateDer<'static>,
)> {
    let mut store = RootCertStore::empty();
    for pem in roots {
        store.add(CertificateDer::from_pem_slice(pem.as_bytes())?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider()).build()?;
    let server_key = rcgen::KeyPair::generate()?;
    let server_cert =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&server_key)?;
    let server_der = server_cert.der().clone();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_der.clone()],
            PrivateKeyDer::try_from(server_key.serialize_der()).map_err(anyhow::Error::msg)?,
        )?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return false;
        };
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let _ = tls.write_all(b"ok").await;
                let _ = tls.shutdown().await;
                true
            }
            Err(_) => false,
        }
    });
    Ok((addr, task, server_der))
}

/// Connects presenting `leaf`; true when the server accepted it.
async fn handshake(roots: &[String], leaf: &Leaf) -> Result<bool> {
    let (addr, server, server_der) = mtls_server(roots).await?;
    let mut trust = RootCertStore::empty();
    trust.add(server_der)?;
    let chain = vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes())?];
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes())?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(trust)
        .with_client_auth_cert(chain, key)?;
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let client_ok = match connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
    {
        Ok(mut tls) => {
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.is_ok() && buf == b"ok"
        }
        Err(_) => false,
    };
    let server_ok = tokio::time::timeout(Duration::from_secs(10), server).await??;
    Ok(client_ok && server_ok)
}

async fn start() -> DevCatalogHandle {
    DevCatalog::builder()
        .datacenter("dc1")
        .start("127.0.0.1:0")
        .await
        .expect("dev catalog starts")
}

#[tokio::test]
async fn served_leaf_has_only_the_spiffe_uri_and_chains_to_the_root() -> Result<()> {
    let catalog = start().await;
    let http = client();
    let base = catalog.http_url();
    let leaf = fetch_leaf(&http, &base, "web", 0).await?;
    let expected = format!(
        "spiffe://{}/ns/default/dc/dc1/svc/web",
        catalog.trust_domain()
    );
    ensure!(leaf.uri == expected, "{} != {expected}", leaf.uri);
    let der = CertificateDer::from_pem_slice(leaf.cert.as_bytes())?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .context("SAN")?;
    let names = &san.value.general_names;
    ensure!(names.len() == 1, "only one SAN: {names:?}");
    ensure!(matches!(names[0], GeneralName::URI(u) if u == expected));
    let roots = fetch_roots(&http, &base).await?;
    ensure!(roots.len() == 1);
    ensure!(
        handshake(&roots, &leaf).await?,
        "the leaf chains to the served root"
    );
    catalog.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn rotation_wakes_the_leaf_watch_and_the_old_leaf_stops_verifying_once_pruned() -> Result<()>
{
    let catalog = start().await;
    let http = client();
    let base = catalog.http_url();
    let old = fetch_leaf(&http, &base, "web", 0).await?;
    let old_roots = fetch_roots(&http, &base).await?;
    let waiter = {
        let http = http.clone();
        let base = base.clone();
        let index = old.index;
        tokio::spawn(async move { fetch_leaf(&http, &base, "web", index).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(!waiter.is_finished(), "the leaf query blocks");
    catalog.rotate_ca()?;
    let new = tokio::time::timeout(Duration::from_secs(10), waiter).await???;
    ensure!(new.index > old.index);
    ensure!(new.cert != old.cert);
    let roots = fetch_roots(&http, &base).await?;
    ensure!(roots.len() == 2, "old root kept while its leaves live");
    ensure!(
        handshake(&roots, &old).await?,
        "old leaf still verifies against the bundle"
    );
    ensure!(handshake(&roots, &new).await?);
    ensure!(
        !handshake(&old_roots, &new).await?,
        "new leaf is not signed by the old root"
    );
    catalog.prune_inactive_roots();
    let roots = fetch_roots(&http, &base).await?;
    ensure!(roots.len() == 1);
    ensure!(
        !handshake(&roots, &old).await?,
        "old leaf no longer verifies"
    );
    ensure!(handshake(&roots, &new).await?);
    catalog.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn issued_leaf_for_a_test_backend_verifies() -> Result<()> {
    let catalog = start().await;
    let leaf = catalog.issue_leaf("backend")?;
    ensure!(leaf.service_uri == catalog.spiffe_id("backend"));
    let roots = vec![catalog.active_root().pem];
    let as_leaf = Leaf {
        cert: leaf.cert_pem,
        key: leaf.private_key_pem,
        uri: leaf.service_uri,
        index: leaf.modify_index,
    };
    ensure!(handshake(&roots, &as_leaf).await?);
    catalog.shutdown().await;
    Ok(())
}
