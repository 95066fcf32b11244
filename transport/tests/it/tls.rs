//! The `tls` section: serverName, rootCAs, certificates (mTLS), peerCertURI, insecureSkipVerify.

use anyhow::Result;
use tagway_config::{ClientCertificate, FileOrContent, TransportTls};
use tagway_transport::{DialErrorKind, DialErrorReason, Transport, TransportError};

use crate::support::*;

fn roots(ca: &Ca) -> Vec<FileOrContent> {
    vec![FileOrContent(ca.pem())]
}

#[tokio::test]
async fn server_name_is_sent_and_verified() -> Result<()> {
    let ca = Ca::new("test CA");
    let leaf = ca.server(&["backend.test"]);
    let mut backend = Backend::tls(server_tls(&leaf, None), ExpectProxy::No).await;

    let good = Transport::new(
        "good",
        &tls_transport(TransportTls {
            server_name: Some("backend.test".into()),
            root_cas: roots(&ca),
            ..TransportTls::default()
        }),
        None,
    )?;
    let mut stream = good.dial(&backend.address(), false, None).await?;
    assert!(stream.is_tls());
    round_trip(&mut stream, b"hello over TLS").await?;
    assert_eq!(backend.next().await.sni.as_deref(), Some("backend.test"));

    let wrong = Transport::new(
        "wrong",
        &tls_transport(TransportTls {
            server_name: Some("other.test".into()),
            root_cas: roots(&ca),
            ..TransportTls::default()
        }),
        None,
    )?;
    let err = wrong
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::SanMismatch, "{err}");
    assert_eq!(err.reason().as_str(), "san_mismatch");
    assert_eq!(err.server(), backend.address());
    assert_eq!(err.peer(), Some(backend.addr));
    assert!(err.to_string().contains("other.test"), "{err}");
    Ok(())
}

#[tokio::test]
async fn foreign_ca_and_expired_certificates_are_untrusted() -> Result<()> {
    let ca = Ca::new("test CA");
    let foreign = Ca::new("foreign CA");
    let transport = Transport::new(
        "t",
        &tls_transport(TransportTls {
            server_name: Some("backend.test".into()),
            root_cas: roots(&ca),
            ..TransportTls::default()
        }),
        None,
    )?;

    let by_foreign = foreign.server(&["backend.test"]);
    let backend = Backend::tls(server_tls(&by_foreign, None), ExpectProxy::No).await;
    let err = transport
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");
    assert!(
        matches!(
            err.kind(),
            DialErrorKind::UntrustedCertificate {
                error: rustls::CertificateError::UnknownIssuer,
                ..
            }
        ),
        "{err:?}"
    );

    let expired = ca.leaf(LeafSpec {
        dns: &["backend.test"],
        expired: true,
        ..LeafSpec::default()
    });
    let backend = Backend::tls(server_tls(&expired, None), ExpectProxy::No).await;
    let err = transport
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
    Ok(())
}

#[tokio::test]
async fn client_certificates_for_mtls() -> Result<()> {
    let ca = Ca::new("test CA");
    let leaf = ca.server(&["backend.test"]);
    let client = ca.leaf(LeafSpec {
        cn: "gateway",
        dns: &["gateway.test"],
        ..LeafSpec::default()
    });
    let mut backend = Backend::tls(server_tls(&leaf, Some(&[ca.der()])), ExpectProxy::No).await;
    let base = TransportTls {
        server_name: Some("backend.test".into()),
        root_cas: roots(&ca),
        ..TransportTls::default()
    };

    // Inline PEM holding chain and key.
    let inline = Transport::new(
        "inline",
        &tls_transport(TransportTls {
            certificates: vec![ClientCertificate::Bundle(FileOrContent(
                client.bundle_pem(),
            ))],
            ..base.clone()
        }),
        None,
    )?;
    let mut stream = inline.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"mtls").await?;
    let seen = backend.next().await;
    assert_eq!(
        seen.client_certs.as_deref(),
        Some(&[client.der.clone()][..])
    );

    // certFile / keyFile and rootCAs as files.
    let dir = tempfile::tempdir()?;
    let cert_path = dir.path().join("client.pem");
    let key_path = dir.path().join("client.key");
    std::fs::write(&cert_path, &client.cert_pem)?;
    std::fs::write(&key_path, &client.key_pem)?;
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    let files = Transport::new(
        "files",
        &tls_transport(TransportTls {
            certificates: vec![ClientCertificate::Pair {
                cert_file: cert_path.clone().into(),
                key_file: key_path.clone().into(),
            }],
            root_cas: vec![ca_path.into()],
            ..base.clone()
        }),
        None,
    )?;
    let mut stream = files.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"mtls from files").await?;
    assert!(backend.next().await.client_certs.is_some());

    // Without a client certificate: with TLS 1.3 the client's handshake completes before the
    // server has checked it, so the refusal arrives as an alert on the first read.
    let none = Transport::new("none", &tls_transport(base.clone()), None)?;
    let mut stream = none.dial(&backend.address(), false, None).await?;
    let err = round_trip(&mut stream, b"no cert").await.unwrap_err();
    assert!(
        format!("{err:#}").contains("CertificateRequired"),
        "{err:#}"
    );
    assert!(backend.next().await.tls_error.is_some());
    // The health check sees it the same way.
    let err = none
        .check(
            &backend.address(),
            None,
            Some(b"ping"),
            Some(b"ping"),
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, tagway_transport::CheckError::Receive { .. }),
        "{err}"
    );
    // With TLS 1.2 the refusal is part of the handshake.
    let backend12 = Backend::tls(
        server_tls_versions(&leaf, Some(&[ca.der()]), &[&rustls::version::TLS12]),
        ExpectProxy::No,
    )
    .await;
    let err = none
        .dial(&backend12.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::TlsHandshake, "{err}");
    Ok(())
}

#[tokio::test]
async fn the_client_certificate_the_server_asks_for_is_chosen() -> Result<()> {
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let leaf = ca.server(&["backend.test"]);
    let from_other = other.leaf(LeafSpec {
        cn: "gateway-other",
        ..LeafSpec::default()
    });
    let from_ca = ca.leaf(LeafSpec {
        cn: "gateway",
        ..LeafSpec::default()
    });
    let mut backend = Backend::tls(server_tls(&leaf, Some(&[ca.der()])), ExpectProxy::No).await;
    let transport = Transport::new(
        "two-certs",
        &tls_transport(TransportTls {
            server_name: Some("backend.test".into()),
            root_cas: roots(&ca),
            certificates: vec![
                ClientCertificate::Bundle(FileOrContent(from_other.bundle_pem())),
                ClientCertificate::Bundle(FileOrContent(from_ca.bundle_pem())),
            ],
            ..TransportTls::default()
        }),
        None,
    )?;
    let mut stream = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"picked").await?;
    assert_eq!(
        backend.next().await.client_certs.as_deref(),
        Some(&[from_ca.der.clone()][..])
    );
    Ok(())
}

#[tokio::test]
async fn peer_cert_uri_checks_chain_and_uri_but_not_the_host_name() -> Result<()> {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(LeafSpec {
        dns: &["unrelated.test"],
        uris: &["spiffe://example.org/db", "https://example.org/other"],
        ..LeafSpec::default()
    });
    let mut backend = Backend::tls(server_tls(&leaf, None), ExpectProxy::No).await;
    let transport = |uri: &str, ca: &Ca| {
        Transport::new(
            "uri",
            &tls_transport(TransportTls {
                peer_cert_uri: Some(uri.into()),
                root_cas: roots(ca),
                ..TransportTls::default()
            }),
            None,
        )
    };

    let mut stream = transport("spiffe://example.org/db", &ca)?
        .dial(&backend.address(), false, None)
        .await?;
    round_trip(&mut stream, b"uri ok").await?;
    // No serverName: no SNI.
    assert_eq!(backend.next().await.sni, None);

    let err = transport("spiffe://example.org/web", &ca)?
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::SanMismatch, "{err}");
    assert!(err.to_string().contains("spiffe://example.org/db"), "{err}");

    let err = transport("spiffe://example.org/db", &Ca::new("foreign"))?
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");
    Ok(())
}

#[tokio::test]
async fn insecure_skip_verify_accepts_a_self_signed_backend() -> Result<()> {
    let leaf = self_signed();
    let backend = Backend::tls(server_tls(&leaf, None), ExpectProxy::No).await;
    let insecure = Transport::new(
        "insecure",
        &tls_transport(TransportTls {
            insecure_skip_verify: true,
            ..TransportTls::default()
        }),
        None,
    )?;
    let mut stream = insecure.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"trust me").await?;

    // The same backend through a verifying transport is refused.
    let strict = Transport::new(
        "strict",
        &tls_transport(TransportTls {
            server_name: Some("localhost".into()),
            ..TransportTls::default()
        }),
        None,
    )?;
    let err = strict
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");
    Ok(())
}

#[tokio::test]
async fn the_servers_tls_flag_without_a_tls_section() -> Result<()> {
    let ca = Ca::new("private CA");
    let leaf = ca.server(&["localhost"]);
    let backend = Backend::tls(server_tls(&leaf, None), ExpectProxy::No).await;
    let default = Transport::new("default@internal", &Default::default(), None)?;
    assert!(!default.always_tls());
    // TLS with the webpki roots, which do not know the private CA.
    let err = default
        .dial(&format!("localhost:{}", backend.addr.port()), true, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");
    // Without the flag the connection is plain TCP.
    let stream = default.dial(&backend.address(), false, None).await?;
    assert!(!stream.is_tls());
    Ok(())
}

#[test]
fn configuration_errors_name_the_transport_and_key() {
    let build =
        |tls: TransportTls| Transport::new("mytransport", &tls_transport(tls), None).unwrap_err();

    let err = build(TransportTls::default());
    assert!(
        matches!(err, TransportError::NoServerIdentity { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("serverName"), "{err}");
    assert_eq!(err.transport(), "mytransport");

    let err = build(TransportTls {
        server_name: Some("backend.test".into()),
        certificates: vec![ClientCertificate::Bundle("/nonexistent/cert.pem".into())],
        ..TransportTls::default()
    });
    let msg = err.to_string();
    assert!(
        msg.contains(
            "\"mytransport\": tls.certificates[0]: cannot read /nonexistent/cert.pem: No such file"
        ),
        "{msg}"
    );

    let ca = Ca::new("CA");
    let a = ca.server(&["a.test"]);
    let b = ca.server(&["b.test"]);
    let err = build(TransportTls {
        server_name: Some("backend.test".into()),
        certificates: vec![ClientCertificate::Pair {
            cert_file: FileOrContent(a.cert_pem.clone()),
            key_file: FileOrContent(b.key_pem.clone()),
        }],
        ..TransportTls::default()
    });
    assert!(
        err.to_string()
            .contains("tls.certificates[0]: the private key does not match"),
        "{err}"
    );

    let err = build(TransportTls {
        server_name: Some("backend.test".into()),
        certificates: vec![ClientCertificate::Bundle(FileOrContent(a.cert_pem.clone()))],
        ..TransportTls::default()
    });
    assert!(
        err.to_string()
            .contains("tls.certificates[0]: no PRIVATE KEY"),
        "{err}"
    );

    let err = build(TransportTls {
        server_name: Some("backend.test".into()),
        root_cas: vec![
            FileOrContent(ca.pem()),
            FileOrContent(
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
            ),
        ],
        ..TransportTls::default()
    });
    assert!(err.to_string().contains("tls.rootCAs[1]"), "{err}");

    let err = build(TransportTls {
        server_name: Some("not a name!".into()),
        ..TransportTls::default()
    });
    assert!(err.to_string().contains("tls.serverName"), "{err}");
}
