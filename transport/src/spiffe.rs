//! SPIFFE authorization: which backend SPIFFE IDs a transport accepts (`spiffe.ids`,
//! `spiffe.trustDomain`, or any), and reading the SPIFFE ID out of an X.509-SVID.

use std::fmt;

use spiffe::{SpiffeId, TrustDomain};
use tagway_config::Spiffe;

use crate::error::TransportError;
use crate::verify::{IdentityMismatch, uri_sans};

/// The SPIFFE IDs a transport accepts from its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpiffePolicy {
    /// Exactly one of these IDs (`spiffe.ids`; takes precedence over the trust domain).
    Ids(Vec<String>),
    /// Any ID in this trust domain (`spiffe.trustDomain`).
    TrustDomain(String),
    /// Any SPIFFE ID (an empty `spiffe` section). The chain must still verify against the trust
    /// bundle.
    Any,
}

impl SpiffePolicy {
    /// Reads and checks a transport's `spiffe` section.
    pub fn from_config(transport: &str, cfg: &Spiffe) -> Result<Self, TransportError> {
        if !cfg.ids.is_empty() {
            let mut ids = Vec::with_capacity(cfg.ids.len());
            for (i, id) in cfg.ids.iter().enumerate() {
                let parsed = SpiffeId::new(id).map_err(|e| {
                    TransportError::invalid(
                        transport,
                        format!("spiffe.ids[{i}]"),
                        format!("{id:?} is not a SPIFFE ID: {e}"),
                    )
                })?;
                ids.push(parsed.to_string());
            }
            return Ok(SpiffePolicy::Ids(ids));
        }
        match cfg.trust_domain.as_deref().map(str::trim) {
            Some(td) if !td.is_empty() => {
                let parsed = TrustDomain::new(td).map_err(|e| {
                    TransportError::invalid(
                        transport,
                        "spiffe.trustDomain",
                        format!("{td:?} is not a SPIFFE trust domain: {e}"),
                    )
                })?;
                Ok(SpiffePolicy::TrustDomain(parsed.as_str().to_owned()))
            }
            _ => Ok(SpiffePolicy::Any),
        }
    }

    /// Checks a backend's SPIFFE ID.
    pub fn check(&self, id: &SpiffeId) -> Result<(), IdentityMismatch> {
        let ok = match self {
            SpiffePolicy::Ids(ids) => ids.iter().any(|allowed| *allowed == id.to_string()),
            SpiffePolicy::TrustDomain(td) => id.trust_domain_name() == td,
            SpiffePolicy::Any => true,
        };
        if ok {
            Ok(())
        } else {
            Err(IdentityMismatch::SpiffeId {
                expected: self.to_string(),
                presented: id.to_string(),
            })
        }
    }
}

impl fmt::Display for SpiffePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffePolicy::Ids(ids) if ids.len() == 1 => write!(f, "{}", ids[0]),
            SpiffePolicy::Ids(ids) => write!(f, "one of {}", ids.join(", ")),
            SpiffePolicy::TrustDomain(td) => write!(f, "an ID in trust domain {td}"),
            SpiffePolicy::Any => f.write_str("any SPIFFE ID"),
        }
    }
}

/// The SPIFFE ID of an X.509-SVID: its one URI SAN, which must be a valid SPIFFE ID.
pub fn svid_id(leaf_der: &[u8]) -> Result<SpiffeId, IdentityMismatch> {
    let uris = uri_sans(leaf_der);
    match uris.as_slice() {
        [one] => SpiffeId::new(one).map_err(|_| IdentityMismatch::NotSvid {
            presented: uris.clone(),
        }),
        _ => Err(IdentityMismatch::NotSvid { presented: uris }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ids: &[&str], td: Option<&str>) -> Result<SpiffePolicy, TransportError> {
        SpiffePolicy::from_config(
            "t",
            &Spiffe {
                ids: ids.iter().map(|s| s.to_string()).collect(),
                trust_domain: td.map(str::to_owned),
            },
        )
    }

    #[test]
    fn ids_take_precedence_over_trust_domain() {
        let p = policy(&["spiffe://example.org/db"], Some("other.org")).unwrap();
        assert!(
            p.check(&SpiffeId::new("spiffe://example.org/db").unwrap())
                .is_ok()
        );
        assert!(
            p.check(&SpiffeId::new("spiffe://other.org/db").unwrap())
                .is_err()
        );
        assert!(
            p.check(&SpiffeId::new("spiffe://example.org/web").unwrap())
                .is_err()
        );
    }

    #[test]
    fn trust_domain_and_any() {
        let p = policy(&[], Some("example.org")).unwrap();
        assert!(
            p.check(&SpiffeId::new("spiffe://example.org/x/y").unwrap())
                .is_ok()
        );
        assert!(
            p.check(&SpiffeId::new("spiffe://example.com/x").unwrap())
                .is_err()
        );
        // Written as an ID, too.
        let p = policy(&[], Some("spiffe://example.org")).unwrap();
        assert_eq!(p, SpiffePolicy::TrustDomain("example.org".into()));
        let p = policy(&[], None).unwrap();
        assert!(
            p.check(&SpiffeId::new("spiffe://any.where/x").unwrap())
                .is_ok()
        );
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = policy(&["spiffe://example.org/ok", "http://example.org/x"], None).unwrap_err();
        assert!(e.to_string().contains("spiffe.ids[1]"), "{e}");
        let e = policy(&[], Some("Bad Domain!")).unwrap_err();
        assert!(e.to_string().contains("spiffe.trustDomain"), "{e}");
    }
}
