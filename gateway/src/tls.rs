//! TLS termination: rustls server configurations (ring provider) built from the dynamic `tls`
//! section: one per `tls.options` entry (versions, cipher suites, groups, ALPN, client
//! authentication, `sniStrict`), all sharing the certificates of `tls.certificates`. The client's
//! SNI selects the certificate (exact names, then `*.` wildcards), the default store's
//! `defaultCertificate` (else the first certificate) answers otherwise (unless `sniStrict`).

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CipherSuite, DigitallySignedStruct, DistinguishedName, NamedGroup, RootCertStore,
    SignatureScheme, SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tagway_config::{CertificateEntry, TlsOptions, TlsSection};

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
    /// A `tls.options` entry cannot be built.
    #[error("tls options {options}, key {key}: {message}")]
    Options {
        /// The options name (`name@provider`, or `default`).
        options: String,
        /// The offending key (`minVersion`, `cipherSuites[1]`, `clientAuth.caFiles[0]` …).
        key: String,
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
        sni.and_then(|s| self.lookup_name(s))
            .or_else(|| self.default.clone())
    }

    /// The certificate whose names match `sni` (exact, then `*.` wildcard), no default.
    pub fn lookup_name(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let sni = sni.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&sni) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = sni.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return Some(k.clone());
        }
        None
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

/// `sniStrict`: only a ClientHello with an SNI that a certificate's names match gets one; the
/// others fail the handshake.
#[derive(Debug)]
struct StrictSni(Arc<SniResolver>);

impl ResolvesServerCert for StrictSni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.lookup_name(hello.server_name()?)
    }
}

/// Go's (Traefik's) cipher suite names and the rustls suites they are.
const SUITES: &[(&str, CipherSuite)] = &[
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_AES_128_GCM_SHA256,
    ),
    (
        "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_AES_256_GCM_SHA384,
    ),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ),
];

/// Go's (Traefik's) group names and the rustls groups they are.
const GROUPS: &[(&str, NamedGroup)] = &[
    ("X25519", NamedGroup::X25519),
    ("CurveP256", NamedGroup::secp256r1),
    ("CurveP384", NamedGroup::secp384r1),
];

/// `RequestClientCert` / `RequireAnyClientCert`: a client certificate is asked for (and required
/// by the second), its chain is not verified; the handshake signature made with its key is.
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The termination configurations of a dynamic `tls` section: one per `tls.options` entry, and
/// `default` (the `default` entry when declared, else TLS 1.2 and 1.3 with rustls' suites, no
/// ALPN, no client authentication).
#[derive(Clone, Debug, Default)]
pub struct TlsConfigs {
    by_name: HashMap<String, Arc<rustls::ServerConfig>>,
    default: Option<Arc<rustls::ServerConfig>>,
}

impl TlsConfigs {
    /// The configuration of a router's `tls.options` (`None` = `default`).
    pub fn get(&self, options: Option<&str>) -> Result<Arc<rustls::ServerConfig>, String> {
        match options {
            None | Some("default") => self
                .default
                .clone()
                .ok_or_else(|| "the default TLS options could not be built".to_owned()),
            Some(name) => {
                self.by_name.get(name).cloned().ok_or_else(|| {
                    format!("tls options `{name}` do not exist or could not be built")
                })
            }
        }
    }
}

/// Builds one `tls.options` entry (`name`) over the certificates of `resolver`.
pub fn options_config(
    name: &str,
    o: &TlsOptions,
    resolver: &Arc<SniResolver>,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let err = |key: &str, message: String| CertError::Options {
        options: name.to_owned(),
        key: key.to_owned(),
        message,
    };
    let version = |key: &str, v: &Option<String>, dflt: u8| match v.as_deref() {
        None => Ok(dflt),
        Some("VersionTLS12") => Ok(2),
        Some("VersionTLS13") => Ok(3),
        Some(other) => Err(err(
            key,
            format!(
                "unsupported TLS version `{other}` (TLS 1.0 and 1.1 are not available in rustls): use VersionTLS12 or VersionTLS13"
            ),
        )),
    };
    let min = version("minVersion", &o.min_version, 2)?;
    let max = version("maxVersion", &o.max_version, 3)?;
    if min > max {
        return Err(err(
            "maxVersion",
            "maxVersion is below minVersion".to_owned(),
        ));
    }
    let versions: Vec<&'static SupportedProtocolVersion> =
        [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect();

    let mut provider = rustls::crypto::ring::default_provider();
    if !o.cipher_suites.is_empty() {
        let mut wanted = Vec::new();
        for (i, n) in o.cipher_suites.iter().enumerate() {
            match SUITES.iter().find(|(go, _)| go == n) {
                Some((_, s)) => wanted.push(*s),
                None => {
                    return Err(err(
                        &format!("cipherSuites[{i}]"),
                        format!("unknown or unsupported cipher suite `{n}`"),
                    ));
                }
            }
        }
        // Go does not let TLS 1.3 suites be configured: they stay enabled unless named.
        let names_tls13 = provider
            .cipher_suites
            .iter()
            .any(|s| s.tls13().is_some() && wanted.contains(&s.suite()));
        provider
            .cipher_suites
            .retain(|s| wanted.contains(&s.suite()) || (s.tls13().is_some() && !names_tls13));
        // The list's order is the server's preference.
        provider.cipher_suites.sort_by_key(|s| {
            wanted
                .iter()
                .position(|w| *w == s.suite())
                .unwrap_or(usize::MAX)
        });
    }
    if !o.curve_preferences.is_empty() {
        let all = std::mem::take(&mut provider.kx_groups);
        for (i, n) in o.curve_preferences.iter().enumerate() {
            let group = GROUPS
                .iter()
                .find(|(go, _)| go == n)
                .and_then(|(_, g)| all.iter().find(|k| k.name() == *g));
            match group {
                Some(g) => provider.kx_groups.push(*g),
                None => {
                    return Err(err(
                        &format!("curvePreferences[{i}]"),
                        format!(
                            "unknown or unsupported group `{n}`: use X25519, CurveP256 or CurveP384"
                        ),
                    ));
                }
            }
        }
    }
    let provider = Arc::new(provider);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| err("cipherSuites", e.to_string()))?;

    let ca = o.client_auth.clone().unwrap_or_default();
    let kind = ca
        .client_auth_type
        .as_deref()
        .unwrap_or(if ca.ca_files.is_empty() {
            "NoClientCert"
        } else {
            // Traefik: CA files without a type require a verified certificate.
            "RequireAndVerifyClientCert"
        });
    let roots = || -> Result<Arc<RootCertStore>, CertError> {
        if ca.ca_files.is_empty() {
            return Err(err(
                "clientAuth.caFiles",
                format!("clientAuthType {kind} needs clientAuth.caFiles"),
            ));
        }
        let mut roots = RootCertStore::empty();
        for (i, f) in ca.ca_files.iter().enumerate() {
            let key = format!("clientAuth.caFiles[{i}]");
            let what = source_name(f);
            let pem = f.read().map_err(|e| err(&key, format!("{what}: {e}")))?;
            let mut n = 0;
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| err(&key, format!("{what}: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| err(&key, format!("{what}: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(err(&key, format!("{what}: no CERTIFICATE block")));
            }
        }
        Ok(Arc::new(roots))
    };
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match kind {
        "NoClientCert" => None,
        "RequestClientCert" | "RequireAnyClientCert" => Some(Arc::new(AnyClientCert {
            mandatory: kind == "RequireAnyClientCert",
            provider: provider.clone(),
        })),
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let b = WebPkiClientVerifier::builder_with_provider(roots()?, provider.clone());
            let b = if kind == "VerifyClientCertIfGiven" {
                b.allow_unauthenticated()
            } else {
                b
            };
            Some(
                b.build()
                    .map_err(|e| err("clientAuth.caFiles", e.to_string()))?,
            )
        }
        other => {
            return Err(err(
                "clientAuth.clientAuthType",
                format!("unknown clientAuthType `{other}`"),
            ));
        }
    };
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = if o.sni_strict {
        builder.with_cert_resolver(Arc::new(StrictSni(resolver.clone())))
    } else {
        builder.with_cert_resolver(resolver.clone())
    };
    cfg.alpn_protocols = o
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(Arc::new(cfg))
}

/// Builds the termination configurations from the dynamic `tls` section; errors are per
/// certificate and per options entry (the others still load).
pub fn server_configs(tls: &TlsSection) -> (TlsConfigs, Vec<CertError>) {
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
    let resolver = Arc::new(resolver);
    let mut out = TlsConfigs::default();
    for (name, o) in &tls.options {
        match options_config(name, o, &resolver) {
            Ok(c) => {
                out.by_name.insert(name.clone(), c);
            }
            Err(e) => errors.push(e),
        }
    }
    out.default = match out.by_name.get("default") {
        Some(c) => Some(c.clone()),
        None if tls.options.contains_key("default") => None,
        None => match options_config("default", &TlsOptions::default(), &resolver) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(e);
                None
            }
        },
    };
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_name_maps_to_a_ring_suite_or_group() {
        let p = rustls::crypto::ring::default_provider();
        for n in tagway_config::tls::CIPHER_SUITES {
            let (_, s) = SUITES.iter().find(|(go, _)| go == n).unwrap();
            assert!(p.cipher_suites.iter().any(|c| c.suite() == *s), "{n}");
        }
        for n in tagway_config::tls::CURVES {
            let (_, g) = GROUPS.iter().find(|(go, _)| go == n).unwrap();
            assert!(p.kx_groups.iter().any(|k| k.name() == *g), "{n}");
        }
    }

    #[test]
    fn options_errors_name_the_key() {
        let r = Arc::new(SniResolver::default());
        let bad = |o: TlsOptions| {
            options_config("o@file", &o, &r)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let e = bad(TlsOptions {
            min_version: Some("VersionTLS10".into()),
            ..Default::default()
        });
        assert!(
            e.starts_with(
                "tls options o@file, key minVersion: unsupported TLS version `VersionTLS10`"
            ),
            "{e}"
        );
        let e = bad(TlsOptions {
            cipher_suites: vec!["TLS_RSA_WITH_RC4_128_SHA".into()],
            ..Default::default()
        });
        assert!(
            e.contains("key cipherSuites[0]") && e.contains("TLS_RSA_WITH_RC4_128_SHA"),
            "{e}"
        );
        let e = bad(TlsOptions {
            client_auth: Some(tagway_config::ClientAuth {
                ca_files: vec![],
                client_auth_type: Some("VerifyClientCertIfGiven".into()),
            }),
            ..Default::default()
        });
        assert!(e.contains("key clientAuth.caFiles"), "{e}");
        let ok = options_config(
            "o@file",
            &TlsOptions {
                cipher_suites: vec!["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384".into()],
                curve_preferences: vec!["CurveP384".into()],
                alpn_protocols: vec!["h2".into()],
                ..Default::default()
            },
            &r,
        )
        .unwrap();
        let suites: Vec<_> = ok
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites[0],
            CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        );
        assert_eq!(
            suites.len(),
            4,
            "one TLS 1.2 suite and the three TLS 1.3 ones: {suites:?}"
        );
        assert_eq!(ok.crypto_provider().kx_groups.len(), 1);
        assert_eq!(ok.alpn_protocols, vec![b"h2".to_vec()]);
    }

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
        let (_, errs) = server_configs(&tls);
        assert_eq!(errs.len(), 1);
    }
}
