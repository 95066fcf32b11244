//! Active TCP health checks through a transport: dial (with the transport's PROXY and TLS
//! settings), optionally send bytes, optionally read until the answer starts with the expected
//! bytes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dial::{Transport, split_host_port};
use crate::error::{CheckError, DialError, DialErrorKind};

/// How long a successful check waits for its polite close (TLS `close_notify`, FIN).
const CLOSE_GRACE: Duration = Duration::from_millis(200);

impl Transport {
    /// Checks `server` (`host:port`): dials it (on `port_override` instead of its port when set)
    /// through this transport, sends `send`, and reads until the answer starts with `expect`; all
    /// within `timeout`. TLS is used when the transport has a `tls` or `spiffe` section (see
    /// [`Transport::check_with_tls`] for servers flagged `tls`). With PROXY protocol configured the
    /// check sends a LOCAL (v2) / UNKNOWN (v1) header, as the specification says for connections
    /// a proxy makes on its own behalf.
    pub async fn check(
        &self,
        server: &str,
        port_override: Option<u16>,
        send: Option<&[u8]>,
        expect: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), CheckError> {
        self.check_with_tls(server, false, port_override, send, expect, timeout)
            .await
    }

    /// [`Transport::check`] for a server whose `tls` flag is `tls`.
    pub async fn check_with_tls(
        &self,
        server: &str,
        tls: bool,
        port_override: Option<u16>,
        send: Option<&[u8]>,
        expect: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), CheckError> {
        let target = match port_override {
            Some(port) => with_port(server, port).map_err(CheckError::Dial)?,
            None => server.to_owned(),
        };
        let run = async {
            let mut stream = self.dial(&target, tls, None).await?;
            if let Some(bytes) = send.filter(|b| !b.is_empty()) {
                let sent = async {
                    stream.write_all(bytes).await?;
                    stream.flush().await
                };
                sent.await.map_err(|error| CheckError::Send {
                    server: target.clone(),
                    error,
                })?;
            }
            if let Some(expect) = expect.filter(|b| !b.is_empty()) {
                let mut received = Vec::with_capacity(expect.len());
                let mut buf = [0u8; 1024];
                while received.len() < expect.len() {
                    let n = stream
                        .read(&mut buf)
                        .await
                        .map_err(|error| CheckError::Receive {
                            server: target.clone(),
                            error,
                        })?;
                    if n == 0 {
                        return Err(CheckError::Closed {
                            server: target.clone(),
                            expected: lossy(expect),
                            received: lossy(&received),
                        });
                    }
                    received.extend_from_slice(&buf[..n]);
                    let k = received.len().min(expect.len());
                    if received[..k] != expect[..k] {
                        return Err(CheckError::UnexpectedResponse {
                            server: target.clone(),
                            expected: lossy(expect),
                            received: lossy(&received),
                        });
                    }
                }
            }
            Ok(stream)
        };
        let mut stream = match tokio::time::timeout(timeout, run).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(CheckError::Timeout {
                    server: target,
                    after: timeout,
                });
            }
        };
        // The check passed; closing politely is best effort.
        let _closed = tokio::time::timeout(CLOSE_GRACE, stream.shutdown()).await;
        Ok(())
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `server` with its port replaced.
fn with_port(server: &str, port: u16) -> Result<String, DialError> {
    let (host, _) =
        split_host_port(server).map_err(|kind: DialErrorKind| DialError::new(server, kind))?;
    Ok(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}
