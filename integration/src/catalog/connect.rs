//! The Connect CA: roots generated with rcgen (ECDSA P-256, as Consul's built-in CA), leaf
//! certificates whose only URI SAN is the service's SPIFFE ID, and rotation on demand.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::digest;
use time::OffsetDateTime;

use super::error::CatalogError;
use super::util::{colon_hex, random_bytes, uuid_v4};

/// Lifetime of generated roots (Consul's built-in CA uses 10 years).
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Consul back-dates leaves by a minute to tolerate clock skew.
const LEAF_BACKDATE: Duration = Duration::from_secs(60);

/// A Connect CA root as `/v1/agent/connect/ca/roots` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RootCertificate {
    /// `ID`: the SHA-1 fingerprint of the certificate, colon-separated hex.
    pub id: String,
    /// `Name`.
    pub name: String,
    /// `SerialNumber`.
    pub serial_number: u64,
    /// `SigningKeyID`: the subject key identifier, colon-separated hex.
    pub signing_key_id: String,
    /// `NotBefore`.
    pub not_before: SystemTime,
    /// `NotAfter`.
    pub not_after: SystemTime,
    /// `RootCert`: the PEM certificate.
    pub pem: String,
    /// `Active`: whether new leaves are signed by this root.
    pub active: bool,
    /// `RotatedOutAt`, once a rotation replaced this root.
    pub rotated_out_at: Option<SystemTime>,
    /// `CreateIndex`.
    pub create_index: u64,
    /// `ModifyIndex`.
    pub modify_index: u64,
}

/// A leaf certificate as `/v1/agent/connect/ca/leaf/<service>` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeafCertificate {
    /// `Service`.
    pub service: String,
    /// `ServiceURI`: `spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>`, the
    /// certificate's only URI SAN.
    pub service_uri: String,
    /// `SerialNumber`: colon-separated hex.
    pub serial_number: String,
    /// `CertPEM`.
    pub cert_pem: String,
    /// `PrivateKeyPEM` (PKCS#8 `PRIVATE KEY`, ECDSA P-256).
    pub private_key_pem: String,
    /// `ValidAfter`.
    pub valid_after: SystemTime,
    /// `ValidBefore`.
    pub valid_before: SystemTime,
    /// The `ID` of the root that signed it.
    pub root_id: String,
    /// `CreateIndex`.
    pub create_index: u64,
    /// `ModifyIndex` (the `X-Consul-Index` of the leaf endpoint).
    pub modify_index: u64,
}

struct Root {
    info: RootCertificate,
    params: CertificateParams,
    key: KeyPair,
}

/// The CA: trust domain, roots (active last), and what leaves need.
pub(crate) struct Ca {
    cluster_id: String,
    trust_domain: String,
    datacenter: String,
    roots: Vec<Root>,
    next_serial: u64,
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn minimal_serial(bytes: &[u8]) -> SerialNumber {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len() - 1);
    SerialNumber::from_slice(&bytes[start..])
}

impl Ca {
    /// A new CA with a fresh cluster ID (`<uuid>`, trust domain `<uuid>.consul`) and one root.
    pub(crate) fn new(datacenter: &str, index: u64) -> Result<Self, CatalogError> {
        let cluster_id = uuid_v4();
        let trust_domain = format!("{cluster_id}.consul");
        let mut ca = Ca {
            cluster_id,
            trust_domain,
            datacenter: datacenter.to_owned(),
            roots: Vec::new(),
            next_serial: 1,
        };
        let root = ca.generate_root(index)?;
        ca.roots.push(root);
        Ok(ca)
    }

    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub(crate) fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    fn generate_root(&mut self, index: u64) -> Result<Root, CatalogError> {
        let err = |source| CatalogError::Certificate {
            subject: "Connect CA root".to_owned(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let short: String = colon_hex(&random_bytes::<4>()).replace(':', "");
        dn.push(
            DnType::CommonName,
            format!("pri-{short}.consul.ca.{}.consul", &self.cluster_id[..8]),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let uri = format!("spiffe://{}", self.trust_domain);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(err)?)];
        let serial = self.next_serial;
        self.next_serial += 1;
        params.serial_number = Some(minimal_serial(&serial.to_be_bytes()));
        let now = SystemTime::now();
        let not_before = now - LEAF_BACKDATE;
        let not_after = now + ROOT_LIFETIME;
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        let cert = params.self_signed(&key).map_err(err)?;
        let fingerprint = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, cert.der());
        let info = RootCertificate {
            id: colon_hex(fingerprint.as_ref()),
            name: "Consul CA Primary Cert".to_owned(),
            serial_number: serial,
            signing_key_id: colon_hex(&params.key_identifier(&key)),
            // Certificates carry whole seconds.
            not_before: truncate_secs(not_before),
            not_after: truncate_secs(not_after),
            pem: cert.pem(),
            active: true,
            rotated_out_at: None,
            create_index: index,
            modify_index: index,
        };
        Ok(Root { info, params, key })
    }

    /// Generates a new active root; the previous active root stays listed as inactive (so
    /// leaves it signed keep verifying) and older inactive roots are dropped.
    pub(crate) fn rotate(&mut self, index: u64) -> Result<RootCertificate, CatalogError> {
        let root = self.generate_root(index)?;
        let now = SystemTime::now();
        self.roots.retain(|r| r.info.active);
        for r in &mut self.roots {
            r.info.active = false;
            r.info.rotated_out_at = Some(now);
            r.info.modify_index = index;
        }
        let info = root.info.clone();
        self.roots.push(root);
        Ok(info)
    }

    /// Drops inactive roots.
    pub(crate) fn prune_inactive(&mut self) -> bool {
        let before = self.roots.len();
        self.roots.retain(|r| r.info.active);
        before != self.roots.len()
    }

    pub(crate) fn roots(&self) -> Vec<RootCertificate> {
        self.roots.iter().map(|r| r.info.clone()).collect()
    }

    pub(crate) fn active(&self) -> &RootCertificate {
        // Invariant: there is always exactly one active root, the last one.
        &self.roots[self.roots.len() - 1].info
    }

    /// Sets every index to at most `to` (index rewind).
    pub(crate) fn clamp_indexes(&mut self, to: u64) {
        for r in &mut self.roots {
            r.info.create_index = r.info.create_index.min(to);
            r.info.modify_index = r.info.modify_index.min(to);
        }
    }

    /// The SPIFFE ID of a service in this CA's trust domain and datacenter.
    pub(crate) fn service_uri(&self, service: &str) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{}/svc/{}",
            self.trust_domain, self.datacenter, service
        )
    }

    /// Signs a new leaf for `service`, valid from a minute ago for `ttl`.
    pub(crate) fn sign_leaf(
        &self,
        service: &str,
        ttl: Duration,
        index: u64,
    ) -> Result<LeafCertificate, CatalogError> {
        let err = |source| CatalogError::Certificate {
            subject: format!("service {service:?}"),
            source,
        };
        let root = &self.roots[self.roots.len() - 1];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, service);
        params.distinguished_name = dn;
        let uri = self.service_uri(service);
        params.subject_alt_names = vec![SanType::URI(uri.clone().try_into().map_err(err)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut serial = random_bytes::<16>();
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = SystemTime::now();
        let valid_after = truncate_secs(now - LEAF_BACKDATE);
        let valid_before = truncate_secs(now + ttl);
        params.not_before = offset(valid_after);
        params.not_after = offset(valid_before);
        let issuer = Issuer::from_params(&root.params, &root.key);
        let cert = params.signed_by(&key, &issuer).map_err(err)?;
        Ok(LeafCertificate {
            service: service.to_owned(),
            service_uri: uri,
            serial_number: colon_hex(&serial),
            cert_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
            valid_after,
            valid_before,
            root_id: root.info.id.clone(),
            create_index: index,
            modify_index: index,
        })
    }
}

fn truncate_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn der_of(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
        p.contents
    }

    #[test]
    fn root_is_a_ca_with_the_trust_domain_uri() {
        let ca = Ca::new("dc1", 3).expect("CA");
        assert!(ca.trust_domain().ends_with(".consul"));
        assert_eq!(ca.trust_domain().len(), 36 + ".consul".len());
        let root = ca.active().clone();
        assert!(root.active);
        assert_eq!(root.create_index, 3);
        let der = der_of(&root.pem);
        let (_, cert) = X509Certificate::from_der(&der).expect("parse root");
        assert!(cert.is_ca());
        let sans = cert
            .subject_alternative_name()
            .expect("SAN ext")
            .expect("SAN present");
        let uris: Vec<_> = sans
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec![format!("spiffe://{}", ca.trust_domain())]);
        let fp = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
        assert_eq!(root.id, colon_hex(fp.as_ref()));
    }

    #[test]
    fn leaf_has_only_the_spiffe_uri_san() {
        let ca = Ca::new("dc7", 1).expect("CA");
        let leaf = ca
            .sign_leaf("web", Duration::from_secs(3600), 9)
            .expect("leaf");
        assert_eq!(
            leaf.service_uri,
            format!("spiffe://{}/ns/default/dc/dc7/svc/web", ca.trust_domain())
        );
        let der = der_of(&leaf.cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).expect("parse leaf");
        assert!(!cert.is_ca());
        let sans = cert
            .subject_alternative_name()
            .expect("SAN ext")
            .expect("SAN present");
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|g| format!("{g:?}"))
            .collect();
        assert_eq!(names.len(), 1, "only one SAN: {names:?}");
        assert!(matches!(
            sans.value.general_names[0],
            GeneralName::URI(u) if u == leaf.service_uri
        ));
        let lifetime = leaf
            .valid_before
            .duration_since(leaf.valid_after)
            .expect("ordered");
        assert_eq!(lifetime, Duration::from_secs(3660));
        assert_eq!(leaf.root_id, ca.active().id);
    }

    #[test]
    fn rotation_keeps_the_previous_root_inactive() {
        let mut ca = Ca::new("dc1", 1).expect("CA");
        let old = ca.active().id.clone();
        let new = ca.rotate(5).expect("rotate");
        assert_ne!(old, new.id);
        let roots = ca.roots();
        assert_eq!(roots.len(), 2);
        assert!(!roots[0].active && roots[0].rotated_out_at.is_some());
        assert!(roots[1].active);
        ca.rotate(6).expect("rotate again");
        assert_eq!(ca.roots().len(), 2, "only the previous root is kept");
        assert!(ca.prune_inactive());
        assert_eq!(ca.roots().len(), 1);
    }
}
