//! The gateway's own SPIFFE identity: the X.509-SVID it presents to backends and the trust bundles
//! it checks their certificates against, from one of three sources:
//!
//! - the SPIFFE **Workload API** (SPIRE agent, …), rotating as the agent pushes
//!   ([`IdentitySource::workload_api`]);
//! - **PEM files** (certificate chain, key, bundle) as a Nomad `template` or spiffe-helper writes
//!   them, re-read when they change ([`IdentitySource::from_files`]);
//! - **pushes** from code, e.g. the Consul Connect leaf certificate and CA roots
//!   ([`IdentitySource::manual`] and [`IdentitySource::update`]).
//!
//! Every change replaces the current [`Identity`] atomically. Transports rebuild their rustls client
//! configuration from the new identity on their next dial; connections already open keep the
//! identity they were established with.

mod files;
mod manual;
mod workload_api;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use tagway_config::SpiffeSource;

pub use files::DEFAULT_POLL_INTERVAL;
pub use workload_api::{SPIFFE_ENDPOINT_SOCKET, WORKLOAD_API_START_TIMEOUT};

/// An SVID with its key and the trust bundles, parsed and ready for rustls.
pub struct Identity {
    spiffe_id: Option<String>,
    key: Arc<CertifiedKey>,
    /// Bundles by trust domain name (from the Workload API: the own and federated domains).
    by_domain: HashMap<String, Arc<RootCertStore>>,
    /// A bundle that applies to every trust domain (a bundle file, Consul Connect roots).
    any_domain: Option<Arc<RootCertStore>>,
}

impl Identity {
    /// From PEM: the SVID's certificate chain (leaf first), its private key, and the trust bundle
    /// (CA certificates), which is used for backends of every trust domain.
    pub fn from_pem(chain: &[u8], key: &[u8], bundle: &[u8]) -> Result<Self, IdentityError> {
        let chain = crate::pem::certificates(chain)
            .map_err(|m| IdentityError::invalid("SVID certificate", m))?;
        let key =
            crate::pem::private_key(key).map_err(|m| IdentityError::invalid("SVID key", m))?;
        let bundle = crate::pem::certificates(bundle)
            .map_err(|m| IdentityError::invalid("trust bundle", m))?;
        Self::from_der(chain, key, bundle)
    }

    /// From DER: the SVID's certificate chain (leaf first), its private key, and the trust bundle,
    /// which is used for backends of every trust domain.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let mut identity = Self::without_bundles(chain, key)?;
        let roots = crate::pem::root_store(bundle)
            .map_err(|m| IdentityError::invalid("trust bundle", m))?;
        identity.any_domain = Some(Arc::new(roots));
        Ok(identity)
    }

    /// The SVID alone; bundles are added with [`Identity::with_trust_domain_bundle`].
    fn without_bundles(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, IdentityError> {
        let Some(leaf) = chain.first() else {
            return Err(IdentityError::invalid(
                "SVID certificate",
                "empty certificate chain",
            ));
        };
        let spiffe_id = match crate::spiffe::svid_id(leaf) {
            Ok(id) => Some(id.to_string()),
            Err(_) => None,
        };
        let key =
            crate::pem::certified_key(chain, key).map_err(|m| IdentityError::invalid("SVID", m))?;
        Ok(Identity {
            spiffe_id,
            key,
            by_domain: HashMap::new(),
            any_domain: None,
        })
    }

    /// Adds the bundle of one trust domain (federation). Backends whose SPIFFE ID is in
    /// `trust_domain` are checked against it instead of the all-domain bundle.
    pub fn with_trust_domain_bundle(
        mut self,
        trust_domain: &str,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let roots = crate::pem::root_store(bundle)
            .map_err(|m| IdentityError::invalid(format!("trust bundle of {trust_domain}"), m))?;
        self.by_domain
            .insert(trust_domain.to_owned(), Arc::new(roots));
        Ok(self)
    }

    /// The SPIFFE ID of the SVID (its URI SAN), when it has one.
    pub fn spiffe_id(&self) -> Option<&str> {
        self.spiffe_id.as_deref()
    }

    /// The SVID's certificate chain, leaf first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }

    /// The trust domains with their own bundle.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.by_domain.keys().map(String::as_str)
    }

    pub(crate) fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.key
    }

    /// The roots that backends of `trust_domain` must chain to.
    pub(crate) fn roots_for(&self, trust_domain: &str) -> Option<&RootCertStore> {
        self.by_domain
            .get(trust_domain)
            .or(self.any_domain.as_ref())
            .map(Arc::as_ref)
    }
}

impl fmt::Debug for Identity {
    /// The private key is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.key.cert.len())
            .field("trust_domains", &self.by_domain.keys().collect::<Vec<_>>())
            .field("any_domain_bundle", &self.any_domain.is_some())
            .finish()
    }
}

/// Where an identity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SourceKind {
    /// The SPIFFE Workload API.
    WorkloadApi,
    /// PEM files, re-read when they change.
    Files,
    /// Pushed by code ([`IdentitySource::update`]), e.g. Consul Connect.
    Manual,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::WorkloadApi => "SPIFFE Workload API",
            SourceKind::Files => "PEM files",
            SourceKind::Manual => "pushed (Consul Connect)",
        })
    }
}

/// An identity cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file cannot be read.
    #[error("{what}: cannot read {}: {error}", path.display())]
    Read {
        /// Which file (`providers.spiffe.certificate`, …).
        what: String,
        /// The path.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
    /// The material is wrong (bad PEM, key not matching the certificate, not a CA).
    #[error("{what}: {message}")]
    Invalid {
        /// Which part (`SVID certificate`, `SVID key`, `trust bundle`, possibly with a file name).
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The Workload API could not be reached or gave no usable SVID.
    #[error("SPIFFE Workload API at {endpoint}: {error}")]
    WorkloadApi {
        /// The endpoint (`unix:///run/spire/agent.sock`, `tcp:127.0.0.1:8081`).
        endpoint: String,
        /// The `spiffe` crate's error.
        error: spiffe::X509SourceError,
    },
    /// The Workload API gave no SVID in time (agent absent, or the gateway not attested).
    #[error("SPIFFE Workload API at {endpoint}: no SVID within {after:?}")]
    WorkloadApiTimeout {
        /// The endpoint.
        endpoint: String,
        /// How long the source waited.
        after: std::time::Duration,
    },
    /// No source is configured.
    #[error(
        "providers.spiffe: no identity source: set workloadAPIAddr (or the SPIFFE_ENDPOINT_SOCKET \
         environment variable), or certificate, key and bundle"
    )]
    NotConfigured,
    /// The files source needs all three files.
    #[error("providers.spiffe: {missing} is missing (certificate, key and bundle go together)")]
    Incomplete {
        /// The missing key.
        missing: &'static str,
    },
}

impl IdentityError {
    fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        IdentityError::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }

    /// Prefixes the part with a file name (`SVID key /run/secrets/key.pem`).
    fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            IdentityError::Invalid { what, message } => IdentityError::Invalid {
                what: format!("{what} {}", path.display()),
                message,
            },
            other => other,
        }
    }
}

/// State shared by an [`IdentitySource`] and the task that refreshes it.
struct Shared {
    kind: SourceKind,
    current: ArcSwapOption<Identity>,
    generation: watch::Sender<u64>,
}

impl Shared {
    fn new(kind: SourceKind) -> Arc<Self> {
        Arc::new(Shared {
            kind,
            current: ArcSwapOption::empty(),
            generation: watch::Sender::new(0),
        })
    }

    fn publish(&self, identity: Identity) {
        tracing::info!(
            source = %self.kind,
            spiffe_id = identity.spiffe_id().unwrap_or("-"),
            "SPIFFE identity loaded"
        );
        self.current.store(Some(Arc::new(identity)));
        self.generation.send_modify(|g| *g += 1);
    }
}

/// Aborts the refresh task when the last [`IdentitySource`] clone goes away.
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The gateway's current SPIFFE identity, kept up to date by its source. Cheap to clone; clones
/// share the identity.
#[derive(Clone)]
pub struct IdentitySource {
    shared: Arc<Shared>,
    _task: Option<Arc<TaskGuard>>,
}

impl IdentitySource {
    /// Builds the source `providers.spiffe` describes: the PEM files when `certificate`, `key` and
    /// `bundle` are set, else the Workload API at `workloadAPIAddr` or `SPIFFE_ENDPOINT_SOCKET`.
    pub async fn from_config(cfg: &SpiffeSource) -> Result<Self, IdentityError> {
        match (&cfg.certificate, &cfg.key, &cfg.bundle) {
            (None, None, None) => Self::workload_api(cfg.workload_api_addr.as_deref()).await,
            (Some(certificate), Some(key), Some(bundle)) => {
                Self::from_files(certificate, key, bundle).await
            }
            (None, _, _) => Err(IdentityError::Incomplete {
                missing: "certificate",
            }),
            (_, None, _) => Err(IdentityError::Incomplete { missing: "key" }),
            (_, _, None) => Err(IdentityError::Incomplete { missing: "bundle" }),
        }
    }

    fn with_task(shared: Arc<Shared>, task: tokio::task::JoinHandle<()>) -> Self {
        IdentitySource {
            shared,
            _task: Some(Arc::new(TaskGuard(task.abort_handle()))),
        }
    }

    /// Where the identity comes from.
    pub fn kind(&self) -> SourceKind {
        self.shared.kind
    }

    /// The current identity, `None` until the first one arrives (pushed sources only).
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.shared.current.load_full()
    }

    /// A counter bumped at every new identity; `changed()` on the receiver waits for a rotation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }
}

impl fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentitySource")
            .field("kind", &self.shared.kind)
            .field("current", &self.current())
            .finish()
    }
}
