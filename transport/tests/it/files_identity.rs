//! The PEM-files identity source: rotation when the files change, the last good identity kept on a
//! bad write.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tagway_config::SpiffeSource;
use tagway_transport::{IdentityError, IdentitySource, SourceKind, Transport};

use crate::support::*;

const GATEWAY: &str = "spiffe://example.org/gateway";
const DB: &str = "spiffe://example.org/db";
const POLL: Duration = Duration::from_millis(50);

struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Files {
    fn new() -> Result<Files> {
        let dir = tempfile::tempdir()?;
        Ok(Files {
            cert: dir.path().join("svid.pem"),
            key: dir.path().join("svid_key.pem"),
            bundle: dir.path().join("bundle.pem"),
            _dir: dir,
        })
    }

    /// Writes the files as spiffe-helper does: each one replaced by a rename.
    fn write(&self, svid: &Leaf, ca: &Ca) -> Result<()> {
        for (path, content) in [
            (&self.cert, svid.cert_pem.as_str()),
            (&self.key, svid.key_pem.as_str()),
            (&self.bundle, ca.pem().as_str()),
        ] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, content)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    }
}

async fn rotated(rx: &mut tokio::sync::watch::Receiver<u64>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .context("no rotation within 10s")??;
    Ok(())
}

#[tokio::test]
async fn file_rotation_and_bad_writes() -> Result<()> {
    let ca = Ca::new("example.org CA");
    let svids = [ca.svid(GATEWAY), ca.svid(GATEWAY), ca.svid(GATEWAY)];
    let files = Files::new()?;
    files.write(&svids[0], &ca)?;

    let identity =
        IdentitySource::from_files_every(&files.cert, &files.key, &files.bundle, POLL).await?;
    assert_eq!(identity.kind(), SourceKind::Files);
    assert_eq!(identity.current().unwrap().spiffe_id(), Some(GATEWAY));
    let mut rotations = identity.subscribe();
    let transport = Transport::new(
        "mesh",
        &spiffe_transport(&[DB], None),
        Some(identity.clone()),
    )?;
    let mut backend =
        Backend::tls(server_tls(&ca.svid(DB), Some(&[ca.der()])), ExpectProxy::No).await;

    let mut open = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut open, b"first").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], svids[0].der);

    // Rotation.
    files.write(&svids[1], &ca)?;
    rotated(&mut rotations).await?;
    let mut stream = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"second").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], svids[1].der);
    round_trip(&mut open, b"the first connection continues").await?;

    // A bad write (a truncated certificate) is not applied: the last good identity stays.
    std::fs::write(&files.cert, &svids[2].cert_pem[..40])?;
    tokio::time::sleep(POLL * 10).await;
    assert!(!rotations.has_changed()?);
    let mut stream = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"still second").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], svids[1].der);

    // A certificate whose key has not been written yet is not applied either...
    std::fs::write(&files.cert, &svids[2].cert_pem)?;
    tokio::time::sleep(POLL * 10).await;
    assert!(!rotations.has_changed()?);
    // ...until the key follows.
    std::fs::write(&files.key, &svids[2].key_pem)?;
    rotated(&mut rotations).await?;
    let mut stream = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"third").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], svids[2].der);
    Ok(())
}

#[tokio::test]
async fn configuration_errors() -> Result<()> {
    let err = IdentitySource::from_config(&SpiffeSource {
        certificate: Some("/x/svid.pem".into()),
        key: Some("/x/key.pem".into()),
        ..SpiffeSource::default()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, IdentityError::Incomplete { missing: "bundle" }),
        "{err}"
    );

    let err = IdentitySource::from_config(&SpiffeSource {
        certificate: Some("/nonexistent/svid.pem".into()),
        key: Some("/nonexistent/key.pem".into()),
        bundle: Some("/nonexistent/bundle.pem".into()),
        ..SpiffeSource::default()
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("providers.spiffe.certificate: cannot read /nonexistent/svid.pem"),
        "{err}"
    );

    let files = Files::new()?;
    let ca = Ca::new("CA");
    files.write(&ca.svid(GATEWAY), &ca)?;
    std::fs::write(&files.bundle, "not PEM")?;
    let err = IdentitySource::from_files(&files.cert, &files.key, &files.bundle)
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("trust bundle "), "{err}");
    assert!(
        err.to_string()
            .contains("bundle.pem: no CERTIFICATE block found"),
        "{err}"
    );
    Ok(())
}
