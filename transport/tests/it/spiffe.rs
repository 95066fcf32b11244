//! The `spiffe` section with an identity pushed by code (the Consul Connect path): ids, trustDomain,
//! any ID, foreign CA, not an SVID, no identity yet, rotation.

use anyhow::Result;
use tagway_transport::{
    DialErrorReason, Identity, IdentitySource, SourceKind, Transport, TransportError,
};

use crate::support::*;

const GATEWAY: &str = "spiffe://example.org/gateway";
const DB: &str = "spiffe://example.org/db";

struct Mesh {
    ca: Ca,
    identity: IdentitySource,
}

impl Mesh {
    fn new() -> Mesh {
        let ca = Ca::new("example.org CA");
        let svid = ca.svid(GATEWAY);
        let identity = IdentitySource::manual();
        identity
            .update_pem(
                svid.cert_pem.as_bytes(),
                svid.key_pem.as_bytes(),
                ca.pem().as_bytes(),
            )
            .expect("identity");
        Mesh { ca, identity }
    }

    /// A backend presenting `leaf` that requires a client certificate from the mesh CA.
    async fn backend(&self, leaf: &Leaf) -> Backend {
        Backend::tls(server_tls(leaf, Some(&[self.ca.der()])), ExpectProxy::No).await
    }

    fn transport(&self, ids: &[&str], trust_domain: Option<&str>) -> Transport {
        Transport::new(
            "mesh",
            &spiffe_transport(ids, trust_domain),
            Some(self.identity.clone()),
        )
        .expect("transport")
    }
}

#[tokio::test]
async fn ids_trust_domain_and_any() -> Result<()> {
    let mesh = Mesh::new();
    let mut backend = mesh.backend(&mesh.ca.svid(DB)).await;

    for (ids, td) in [
        (&[DB][..], None),
        (&["spiffe://example.org/other", DB][..], None),
        (&[DB][..], Some("other.org")), // ids take precedence
        (&[][..], Some("example.org")),
        (&[][..], None),
    ] {
        let mut stream = mesh
            .transport(ids, td)
            .dial(&backend.address(), false, None)
            .await
            .map_err(|e| anyhow::anyhow!("ids {ids:?} td {td:?}: {e}"))?;
        round_trip(&mut stream, b"svid").await?;
        // The backend got the gateway's SVID.
        let seen = backend.next().await;
        let certs = seen.client_certs.expect("client certificate");
        assert_eq!(uri_sans(&certs[0]), vec![GATEWAY.to_owned()]);
    }

    for (ids, td) in [
        (&["spiffe://example.org/web"][..], None),
        (&[][..], Some("other.org")),
    ] {
        let err = mesh
            .transport(ids, td)
            .dial(&backend.address(), false, None)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), DialErrorReason::SpiffeIdMismatch, "{err}");
        assert_eq!(err.reason().as_str(), "spiffe_id_mismatch");
        assert!(err.to_string().contains(DB), "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn foreign_ca_expired_svid_and_non_svid_are_refused() -> Result<()> {
    let mesh = Mesh::new();
    let transport = mesh.transport(&[], None);

    let foreign = Ca::new("foreign CA");
    let backend = mesh.backend(&foreign.svid(DB)).await;
    let err = transport
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");

    let expired = mesh.ca.leaf(LeafSpec {
        uris: &[DB],
        expired: true,
        ..LeafSpec::default()
    });
    let backend = mesh.backend(&expired).await;
    let err = transport
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");

    // A DNS-only certificate is not an SVID.
    let backend = mesh.backend(&mesh.ca.server(&["db.test"])).await;
    let err = transport
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::SpiffeIdMismatch, "{err}");
    assert!(err.to_string().contains("not an X.509-SVID"), "{err}");

    // Two URI SANs: not an SVID either.
    let two = mesh.ca.leaf(LeafSpec {
        uris: &[DB, "spiffe://example.org/db2"],
        ..LeafSpec::default()
    });
    let backend = mesh.backend(&two).await;
    let err = transport
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::SpiffeIdMismatch, "{err}");
    Ok(())
}

#[tokio::test]
async fn no_identity_yet_and_no_identity_source() -> Result<()> {
    let err = Transport::new("mesh", &spiffe_transport(&[], None), None).unwrap_err();
    assert!(
        matches!(err, TransportError::NoIdentitySource { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("providers.spiffe"), "{err}");

    let identity = IdentitySource::manual();
    assert_eq!(identity.kind(), SourceKind::Manual);
    let transport = Transport::new("mesh", &spiffe_transport(&[], None), Some(identity.clone()))?;
    // No connection is attempted: the port is never bound.
    let err = transport
        .dial("127.0.0.1:1", false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::NoIdentity, "{err}");

    // A bad push is refused and changes nothing.
    let ca = Ca::new("CA");
    let a = ca.svid(GATEWAY);
    let b = ca.svid(GATEWAY);
    let err = identity
        .update_pem(
            a.cert_pem.as_bytes(),
            b.key_pem.as_bytes(),
            ca.pem().as_bytes(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert!(identity.current().is_none());
    Ok(())
}

#[tokio::test]
async fn pushed_rotation_new_dials_use_the_new_svid_open_connections_continue() -> Result<()> {
    let ca = Ca::new("example.org CA");
    let first = ca.svid(GATEWAY);
    let second = ca.svid(GATEWAY);
    let identity = IdentitySource::manual();
    identity.update(Identity::from_der(
        vec![first.der.clone()],
        first.key_der(),
        vec![ca.der()],
    )?);
    let mut rotations = identity.subscribe();
    let transport = Transport::new(
        "mesh",
        &spiffe_transport(&[DB], None),
        Some(identity.clone()),
    )?;
    let mut backend =
        Backend::tls(server_tls(&ca.svid(DB), Some(&[ca.der()])), ExpectProxy::No).await;

    let mut open = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut open, b"before").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], first.der);

    identity.update_pem(
        second.cert_pem.as_bytes(),
        second.key_pem.as_bytes(),
        ca.pem().as_bytes(),
    )?;
    rotations.changed().await?;
    assert_eq!(
        identity.current().unwrap().certificate_chain()[0],
        second.der
    );

    let mut fresh = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut fresh, b"after").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], second.der);
    // The connection opened with the first SVID still works.
    round_trip(&mut open, b"still open").await?;
    Ok(())
}
