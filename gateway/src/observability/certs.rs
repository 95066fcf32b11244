//! Certificates in use and when they expire (`tagway_tls_certificate_not_after_timestamp_seconds`).
//!
//! Read when a configuration is applied (off the data path): the TLS termination certificates
//! (`tls.certificates`) and the client certificates of every servers transport
//! (`tls.certificates` of `tcp.serversTransports` and of the static `tcpServersTransport`).

use std::collections::BTreeMap;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tagway_config::{ClientCertificate, Dynamic, FileOrContent, ServersTransport};
use x509_parser::extensions::GeneralName;

/// What a certificate is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertKind {
    /// Served to clients (TLS termination).
    Server,
    /// Presented to servers (a servers transport's mTLS client certificate).
    Client,
}

impl CertKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CertKind::Server => "server",
            CertKind::Client => "client",
        }
    }
}

/// One certificate in use.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CertInfo {
    /// What it is used for.
    pub kind: CertKind,
    /// The serial number (hex, `:`-separated).
    pub serial: String,
    /// The subject's common name (may be empty).
    pub cn: String,
    /// The subject alternative names (DNS, IP, URI), comma-separated.
    pub sans: String,
    /// Where it is configured: the servers transport (`name@provider`) or `tls.certificates`.
    pub resource: String,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Reads the leaf certificate of a PEM chain.
pub fn describe_pem(pem: &[u8], kind: CertKind, resource: &str) -> Option<CertInfo> {
    let der: CertificateDer<'static> = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) => sans.push((*s).to_owned()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        sans.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some(CertInfo {
        kind,
        serial: cert.raw_serial_as_string(),
        cn,
        sans: sans.join(","),
        resource: resource.to_owned(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn read_one(f: &FileOrContent, kind: CertKind, resource: &str) -> Option<CertInfo> {
    let pem = f.read().ok()?;
    describe_pem(&pem, kind, resource)
}

fn client_certs(t: &ServersTransport, name: &str, out: &mut Vec<CertInfo>) {
    let Some(tls) = &t.tls else { return };
    for c in &tls.certificates {
        let f = match c {
            ClientCertificate::Bundle(f) => f,
            ClientCertificate::Pair { cert_file, .. } => cert_file,
        };
        out.extend(read_one(f, CertKind::Client, name));
    }
}

/// Every certificate `cfg` (and the default transport) uses, deduplicated, sorted.
pub fn in_use(cfg: &Dynamic, default_transport: &ServersTransport) -> Vec<CertInfo> {
    let mut out = Vec::new();
    for c in &cfg.tls.certificates {
        out.extend(read_one(&c.cert_file, CertKind::Server, "tls.certificates"));
    }
    for s in cfg.tls.stores.values() {
        if let Some(c) = &s.default_certificate {
            out.extend(read_one(&c.cert_file, CertKind::Server, "tls.stores"));
        }
    }
    client_certs(
        default_transport,
        crate::runtime::DEFAULT_TRANSPORT,
        &mut out,
    );
    for (name, t) in &cfg.tcp.servers_transports {
        client_certs(t, name, &mut out);
    }
    let mut seen = BTreeMap::new();
    for c in out {
        seen.entry((c.kind, c.serial.clone(), c.resource.clone()))
            .or_insert(c);
    }
    seen.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_leaf_names_and_expiry() {
        let mut p =
            rcgen::CertificateParams::new(vec!["db.example".into(), "10.0.0.1".into()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "db.example");
        p.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let info = describe_pem(cert.pem().as_bytes(), CertKind::Server, "tls.certificates")
            .expect("parsed");
        assert_eq!(info.cn, "db.example");
        assert_eq!(info.sans, "db.example,10.0.0.1");
        // 2031-01-02T00:00:00Z
        assert_eq!(info.not_after, 1_925_078_400);
        assert!(describe_pem(b"not pem", CertKind::Server, "x").is_none());
    }
}
