//! The ACL token sent to Consul: fixed, or read from a file that is re-read when it changes.
//!
//! Nomad's workload identity writes the Consul token to a file and rewrites it when the token is
//! renewed; [`TokenSource::File`] notices the new content (by modification time, size and inode)
//! at most once per [`TokenSource::RECHECK`], and at once after Consul refused a request
//! (`401`/`403`), so a renewed token is used without a restart. The token is never logged: it only
//! ever lives in a sensitive [`HeaderValue`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderValue;
use tokio::time::Instant;

use crate::client::ClientError;

/// Where the ACL token comes from.
#[derive(Debug)]
pub enum TokenSource {
    /// No token: Consul applies its anonymous token.
    None,
    /// A fixed token (configuration or `CONSUL_HTTP_TOKEN`).
    Static(HeaderValue),
    /// A file, re-read when it changes (`tokenFile` or `CONSUL_HTTP_TOKEN_FILE`).
    File(FileToken),
}

/// A token read from a file; see the module documentation.
#[derive(Debug)]
pub struct FileToken {
    path: PathBuf,
    state: Mutex<FileState>,
}

#[derive(Debug)]
struct FileState {
    checked: Option<Instant>,
    stamp: Option<Stamp>,
    value: Option<HeaderValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl TokenSource {
    /// How often a token file is checked for a change (besides after a refused request).
    pub const RECHECK: Duration = Duration::from_secs(1);

    /// A fixed token; an empty one means no token.
    pub fn fixed(token: &str) -> Result<TokenSource, ClientError> {
        let token = token.trim();
        if token.is_empty() {
            return Ok(TokenSource::None);
        }
        Ok(TokenSource::Static(header(token).ok_or(
            ClientError::InvalidToken {
                origin: "token".into(),
            },
        )?))
    }

    /// A token file; it is read at once so that a missing file is reported at start.
    pub fn file(path: &Path) -> Result<TokenSource, ClientError> {
        let ft = FileToken {
            path: path.to_path_buf(),
            state: Mutex::new(FileState {
                checked: None,
                stamp: None,
                value: None,
            }),
        };
        ft.current()?;
        Ok(TokenSource::File(ft))
    }

    /// The token to send now, re-reading the file if it may have changed.
    pub fn current(&self) -> Result<Option<HeaderValue>, ClientError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(v) => Ok(Some(v.clone())),
            TokenSource::File(f) => f.current(),
        }
    }

    /// Consul refused the token: check the file again on the next request.
    pub fn invalidate(&self) {
        if let TokenSource::File(f) = self {
            f.state.lock().unwrap_or_else(|e| e.into_inner()).checked = None;
        }
    }
}

impl FileToken {
    fn current(&self) -> Result<Option<HeaderValue>, ClientError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(at) = st.checked
            && now.duration_since(at) < TokenSource::RECHECK
        {
            return Ok(st.value.clone());
        }
        st.checked = Some(now);
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if st.value.is_some() => {
                // Being rewritten (or briefly gone): keep the token we have.
                tracing::debug!(path = %self.path.display(), error = %e, "Consul token file unreadable, keeping the current token");
                return Ok(st.value.clone());
            }
            Err(source) => {
                return Err(ClientError::ReadFile {
                    what: "Consul ACL token file",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: inode(&meta),
        };
        if st.stamp == Some(stamp) {
            return Ok(st.value.clone());
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if st.value.is_some() => {
                tracing::debug!(path = %self.path.display(), error = %e, "Consul token file unreadable, keeping the current token");
                return Ok(st.value.clone());
            }
            Err(source) => {
                return Err(ClientError::ReadFile {
                    what: "Consul ACL token file",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let token = text.trim();
        let value = if token.is_empty() {
            None
        } else {
            Some(header(token).ok_or_else(|| ClientError::InvalidToken {
                origin: self.path.display().to_string(),
            })?)
        };
        if st.stamp.is_some() {
            tracing::info!(path = %self.path.display(), "Consul ACL token file changed, using the new token");
        }
        st.stamp = Some(stamp);
        st.value = value;
        Ok(st.value.clone())
    }
}

fn header(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(token).ok()?;
    v.set_sensitive(true);
    Some(v)
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn file_token_follows_rewrites_after_the_recheck_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let src = TokenSource::file(&path).unwrap();
        assert_eq!(src.current().unwrap().unwrap(), "first-token");

        // Rewritten the way Nomad does it: a new file renamed over the old one.
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, "second-token-longer").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(
            src.current().unwrap().unwrap(),
            "first-token",
            "within the recheck interval the cached token is used"
        );
        tokio::time::advance(TokenSource::RECHECK).await;
        assert_eq!(src.current().unwrap().unwrap(), "second-token-longer");

        // After a refusal the file is looked at again at once.
        std::fs::write(&tmp, "third").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        src.invalidate();
        assert_eq!(src.current().unwrap().unwrap(), "third");
    }

    #[tokio::test(start_paused = true)]
    async fn missing_file_is_an_error_at_start_but_not_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let err = TokenSource::file(&path).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");

        std::fs::write(&path, "tok").unwrap();
        let src = TokenSource::file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        tokio::time::advance(TokenSource::RECHECK).await;
        assert_eq!(src.current().unwrap().unwrap(), "tok");
    }

    #[test]
    fn tokens_are_sensitive_and_never_printed() {
        let src = TokenSource::fixed("s3cr3t").unwrap();
        let v = src.current().unwrap().unwrap();
        assert!(v.is_sensitive());
        assert!(!format!("{src:?}").contains("s3cr3t"));
        assert!(matches!(
            TokenSource::fixed("  ").unwrap(),
            TokenSource::None
        ));
    }
}
