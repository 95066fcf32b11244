//! An identity pushed by code: the Consul Connect provider feeds the agent's leaf certificate and
//! CA roots here, and pushes again when Consul rotates them.

use super::{Identity, IdentityError, IdentitySource, Shared, SourceKind};

impl IdentitySource {
    /// A source with no identity until [`IdentitySource::update`] (or
    /// [`IdentitySource::update_pem`]) is called. Transports using it fail their dials with
    /// [`crate::DialErrorReason::NoIdentity`] until then.
    pub fn manual() -> Self {
        IdentitySource {
            shared: Shared::new(SourceKind::Manual),
            _task: None,
        }
    }

    /// Replaces the identity. New dials use it; open connections are not touched.
    pub fn update(&self, identity: Identity) {
        self.shared.publish(identity);
    }

    /// Replaces the identity from PEM: the leaf certificate (and intermediates), its private key,
    /// and the CA roots backends must chain to (Consul's `CertPEM`, `PrivateKeyPEM` and the
    /// concatenated `RootCert`s). On error the current identity is kept.
    pub fn update_pem(&self, chain: &[u8], key: &[u8], roots: &[u8]) -> Result<(), IdentityError> {
        let identity = Identity::from_pem(chain, key, roots)?;
        self.update(identity);
        Ok(())
    }
}
