//! TLS termination: a rustls server configuration (ring provider) built from the dynamic
//! `tls.certificates`; the client's SNI selects the certificate (exact names, then `*.` wildcards),
//! the default store's `defaultCertificate` (else the first certificate) answers otherwise.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tagway_config::{CertificateEntry, TlsSection};

/// A certificate that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The chain or key cannot be read.
    #[error("tls certificate {what} {source_name}: {message}")]
    Read {
        /// `certFile` or `keyFile`.
        what: &'static str,
        /// The path, or `<inline PEM>`.
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// The TLS configuration cannot be built.
    #[error("tls configuration: {message}")]
    Config {
        /// What went wrong.
        message: String,
    },
    /// The key does not fit the provider or the certificate.
    #[error("tls certificate {cert}: {message}")]
    Key {
        /// The certificate's path, or `<inline PEM>`.
        cert: String,
        /// What went wrong.
        message: String,
    },
}

fn source_name(f: &tagway_config::FileOrContent) -> String {
    f.path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<inline PEM>".into())
}

/// Loads one certificate entry; returns the key and the DNS names it is valid for.
pub fn load_certificate(
    e: &CertificateEntry,
) -> Result<(Arc<CertifiedKey>, Vec<String>), CertError> {
    let read = |what, f: &tagway_config::FileOrContent| {
        f.read().map_err(|err| CertError::Read {
            what,
            source_name: source_name(f),
            message: err.to_string(),
        })
    };
    let cert_pem = read("certFile", &e.cert_file)?;
    let key_pem = read("keyFile", &e.key_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|err| CertError::Read {
            what: "certFile",
            source_name: source_name(&e.cert_file),
            message: err.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::Read {
            what: "certFile",
            source_name: source_name(&e.cert_file),
            message: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| CertError::Read {
        what: "keyFile",
        source_name: source_name(&e.key_file),
        message: err.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|err| CertError::Key {
        cert: source_name(&e.cert_file),
        message: err.to_string(),
    })?;
    let names = webpki::EndEntityCert::try_from(&ck.cert[0])
        .map(|c| {
            c.valid_dns_names()
                .map(|n| n.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    Ok((Arc::new(ck), names))
}

/// Picks a certificate by SNI.
#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// Adds a certificate under its names (the first one added becomes the default unless one is
    /// set explicitly).
    pub fn add(&mut self, key: Arc<CertifiedKey>, names: &[String]) {
        for n in names {
            match n.strip_prefix("*.") {
                Some(suffix) => self
                    .wildcard
                    .entry(suffix.to_owned())
                    .or_insert(key.clone()),
                None => self.exact.entry(n.clone()).or_insert(key.clone()),
            };
        }
        if self.default.is_none() {
            self.default = Some(key);
        }
    }

    /// The certificate for `sni`.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = sni {
            let sni = sni.to_ascii_lowercase();
            if let Some(k) = self.exact.get(&sni) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = sni.split_once('.')
                && let Some(k) = self.wildcard.get(parent)
            {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }

    /// True when no certificate is known.
    pub fn is_empty(&self) -> bool {
        self.default.is_none()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// Builds the termination configuration from the dynamic `tls` section; errors are per
/// certificate (the others still load).
pub fn server_config(tls: &TlsSection) -> (Option<Arc<rustls::ServerConfig>>, Vec<CertError>) {
    let mut resolver = SniResolver::default();
    let mut errors = Vec::new();
    if let Some(def) = tls
        .stores
        .get("default")
        .and_then(|s| s.default_certificate.as_ref())
    {
        match load_certificate(def) {
            Ok((k, _)) => resolver.default = Some(k),
            Err(e) => errors.push(e),
        }
    }
    for e in &tls.certificates {
        match load_certificate(e) {
            Ok((k, names)) => resolver.add(k, &names),
            Err(err) => errors.push(err),
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            Arc::new(
                b.with_no_client_auth()
                    .with_cert_resolver(Arc::new(resolver)),
            )
        })
        .map_err(|e| {
            errors.push(CertError::Config {
                message: e.to_string(),
            })
        })
        .ok();
    (cfg, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> CertificateEntry {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        CertificateEntry {
            cert_file: tagway_config::FileOrContent(c.cert.pem()),
            key_file: tagway_config::FileOrContent(c.signing_key.serialize_pem()),
            stores: vec![],
        }
    }

    #[test]
    fn sni_selects() {
        let mut r = SniResolver::default();
        let a = cert(&["a.example"]);
        let w = cert(&["*.w.example"]);
        let (ka, na) = load_certificate(&a).unwrap();
        let (kw, nw) = load_certificate(&w).unwrap();
        assert_eq!(na, vec!["a.example"]);
        r.add(ka.clone(), &na);
        r.add(kw.clone(), &nw);
        assert!(Arc::ptr_eq(&r.lookup(Some("A.example")).unwrap(), &ka));
        assert!(Arc::ptr_eq(&r.lookup(Some("x.w.example")).unwrap(), &kw));
        assert!(Arc::ptr_eq(&r.lookup(Some("other")).unwrap(), &ka));
        assert!(Arc::ptr_eq(&r.lookup(None).unwrap(), &ka));
    }

    #[test]
    fn bad_certificates_are_named() {
        let mut bad = cert(&["a"]);
        bad.key_file = tagway_config::FileOrContent("/nonexistent/key.pem".into());
        let e = load_certificate(&bad).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/key.pem"), "{e}");
        let tls = TlsSection {
            certificates: vec![bad, cert(&["ok.example"])],
            ..Default::default()
        };
        let (_, errs) = server_config(&tls);
        assert_eq!(errs.len(), 1);
    }
}
