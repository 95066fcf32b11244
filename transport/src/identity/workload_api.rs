//! An identity from the SPIFFE Workload API (a SPIRE agent, …) through the `spiffe` crate's
//! `X509Source`, which keeps a streaming connection to the agent, reconnects with backoff, and
//! notifies every rotation.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;
use spiffe::x509_source::X509SourceState;

use super::{Identity, IdentityError, IdentitySource, Shared, SourceKind};

/// How long [`IdentitySource::workload_api`] waits for the first SVID.
pub const WORKLOAD_API_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable naming the Workload API endpoint when `workloadAPIAddr` is not set.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

impl IdentitySource {
    /// Connects to the Workload API at `endpoint` (`unix:///run/spire/agent.sock`,
    /// `tcp:127.0.0.1:8081`), or at `SPIFFE_ENDPOINT_SOCKET` when `None`, waits for the first SVID,
    /// then follows every rotation the agent pushes. Gives up after
    /// [`WORKLOAD_API_START_TIMEOUT`] without an SVID (the agent may be absent or not attest the
    /// gateway). Must be called within a tokio runtime.
    pub async fn workload_api(endpoint: Option<&str>) -> Result<Self, IdentityError> {
        Self::workload_api_within(endpoint, WORKLOAD_API_START_TIMEOUT).await
    }

    /// [`IdentitySource::workload_api`], waiting at most `start_timeout` for the first SVID.
    pub async fn workload_api_within(
        endpoint: Option<&str>,
        start_timeout: Duration,
    ) -> Result<Self, IdentityError> {
        let endpoint = match endpoint {
            Some(endpoint) => endpoint.to_owned(),
            None => {
                std::env::var(SPIFFE_ENDPOINT_SOCKET).map_err(|_| IdentityError::NotConfigured)?
            }
        };
        let build = X509Source::builder().endpoint(&endpoint).build();
        let source = match tokio::time::timeout(start_timeout, build).await {
            Ok(Ok(source)) => source,
            Ok(Err(error)) => return Err(IdentityError::WorkloadApi { endpoint, error }),
            Err(_) => {
                return Err(IdentityError::WorkloadApiTimeout {
                    endpoint,
                    after: start_timeout,
                });
            }
        };
        let identity = from_state(&endpoint, &source.state())?;
        let shared = Shared::new(SourceKind::WorkloadApi);
        shared.publish(identity);
        let task = tokio::spawn(follow(Arc::clone(&shared), source, endpoint));
        Ok(Self::with_task(shared, task))
    }
}

/// Applies every update the source notifies until it closes.
async fn follow(shared: Arc<Shared>, source: X509Source, endpoint: String) {
    let mut updates = source.updated();
    loop {
        if let Err(error) = updates.changed().await {
            tracing::warn!(%endpoint, %error, "SPIFFE Workload API source closed; keeping the last identity");
            return;
        }
        match from_state(&endpoint, &source.state()) {
            Ok(identity) => shared.publish(identity),
            Err(error) => {
                tracing::warn!(%error, "unusable SVID from the SPIFFE Workload API; keeping the last identity");
            }
        }
    }
}

/// The selected SVID and every trust bundle of one coherent observation.
fn from_state(endpoint: &str, state: &X509SourceState) -> Result<Identity, IdentityError> {
    let wrap = |error| IdentityError::WorkloadApi {
        endpoint: endpoint.to_owned(),
        error,
    };
    let svid = state.svid().map_err(wrap)?;
    let context = state.context().map_err(wrap)?;
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let mut identity = Identity::without_bundles(chain, key)?;
    for (trust_domain, bundle) in context.bundle_set().iter() {
        let roots = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        identity = identity.with_trust_domain_bundle(trust_domain.as_str(), roots)?;
    }
    Ok(identity)
}
