//! An identity read from PEM files (certificate chain, key, bundle), as a Nomad `template` block or
//! spiffe-helper writes them, and re-read when they change.
//!
//! The files are polled (every second by default) and compared by content, which works on every
//! file system and with writers that replace files by renaming. A change is applied once two polls in
//! a row see the same content (a writer updating the three files one after the other is seen once
//! it is done). Content that cannot be used (half-written PEM, a key that does not match the
//! certificate) is logged once and the last good identity is kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::{Identity, IdentityError, IdentitySource, Shared, SourceKind};

/// How often the files are checked by [`IdentitySource::from_files`].
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

impl IdentitySource {
    /// Reads the SVID certificate chain, its key and the trust bundle from PEM files, and keeps
    /// re-reading them every [`DEFAULT_POLL_INTERVAL`]. Fails when the files cannot be read or used
    /// now. Must be called within a tokio runtime.
    pub async fn from_files(
        certificate: &Path,
        key: &Path,
        bundle: &Path,
    ) -> Result<Self, IdentityError> {
        Self::from_files_every(certificate, key, bundle, DEFAULT_POLL_INTERVAL).await
    }

    /// [`IdentitySource::from_files`] with another poll interval.
    pub async fn from_files_every(
        certificate: &Path,
        key: &Path,
        bundle: &Path,
        poll: Duration,
    ) -> Result<Self, IdentityError> {
        let paths = Paths {
            certificate: certificate.to_owned(),
            key: key.to_owned(),
            bundle: bundle.to_owned(),
        };
        let contents = paths.read().await?;
        let identity = contents.parse(&paths)?;
        let shared = Shared::new(SourceKind::Files);
        shared.publish(identity);
        let task = tokio::spawn(watch(Arc::clone(&shared), paths, contents, poll));
        Ok(Self::with_task(shared, task))
    }
}

struct Paths {
    certificate: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

impl Paths {
    async fn read(&self) -> Result<Contents, IdentityError> {
        async fn one(what: &str, path: &Path) -> Result<Vec<u8>, IdentityError> {
            tokio::fs::read(path)
                .await
                .map_err(|error| IdentityError::Read {
                    what: format!("providers.spiffe.{what}"),
                    path: path.to_owned(),
                    error,
                })
        }
        Ok(Contents {
            certificate: one("certificate", &self.certificate).await?,
            key: one("key", &self.key).await?,
            bundle: one("bundle", &self.bundle).await?,
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Contents {
    certificate: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

impl Contents {
    fn parse(&self, paths: &Paths) -> Result<Identity, IdentityError> {
        let chain = crate::pem::certificates(&self.certificate).map_err(|m| {
            IdentityError::invalid("SVID certificate", m).in_file(&paths.certificate)
        })?;
        let key = crate::pem::private_key(&self.key)
            .map_err(|m| IdentityError::invalid("SVID key", m).in_file(&paths.key))?;
        let bundle = crate::pem::certificates(&self.bundle)
            .map_err(|m| IdentityError::invalid("trust bundle", m).in_file(&paths.bundle))?;
        Identity::from_der(chain, key, bundle)
    }
}

async fn watch(shared: Arc<Shared>, paths: Paths, mut applied: Contents, poll: Duration) {
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut pending: Option<Contents> = None;
    let mut rejected: Option<Contents> = None;
    let mut read_failing = false;
    loop {
        ticker.tick().await;
        let contents = match paths.read().await {
            Ok(contents) => {
                read_failing = false;
                contents
            }
            Err(error) => {
                if !read_failing {
                    tracing::warn!(%error, "cannot read the SVID files; keeping the current identity");
                    read_failing = true;
                }
                pending = None;
                continue;
            }
        };
        if contents == applied {
            pending = None;
            continue;
        }
        if pending.as_ref() != Some(&contents) {
            pending = Some(contents);
            continue;
        }
        pending = None;
        if rejected.as_ref() == Some(&contents) {
            continue;
        }
        match contents.parse(&paths) {
            Ok(identity) => {
                shared.publish(identity);
                applied = contents;
                rejected = None;
            }
            Err(error) => {
                tracing::warn!(%error, "the SVID files changed but cannot be used; keeping the current identity");
                rejected = Some(contents);
            }
        }
    }
}
