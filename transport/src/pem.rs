//! Reading certificates and keys from PEM, shared by transports' `tls` sections and identity
//! sources. Errors are plain messages; callers add the key or file they came from.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Every `CERTIFICATE` block, in order; at least one.
pub(crate) fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".to_owned());
    }
    Ok(certs)
}

/// The first private key block (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PRIVATE KEY block found (PKCS#8, PKCS#1 or SEC1)".to_owned()
        }
        other => format!("invalid PEM: {other}"),
    })
}

/// A certificate chain with its key, checked to match, ready to present.
pub(crate) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let provider = crate::tls::provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err("the private key does not match the certificate".to_owned())
        }
        Err(e) => Err(format!("invalid certificate: {e}")),
    }
}

/// A root store holding `certs` (each must be a usable trust anchor).
pub(crate) fn root_store(certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    add_roots(&mut roots, certs)?;
    Ok(roots)
}

/// Adds trust anchors to `roots`.
pub(crate) fn add_roots(
    roots: &mut RootCertStore,
    certs: Vec<CertificateDer<'static>>,
) -> Result<(), String> {
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate #{} is not a usable CA: {e}", i + 1))?;
    }
    Ok(())
}
