//! The real `tagway run --config …` child process: spawning it, waiting until it is ready and
//! stopping it (SIGTERM, a bounded wait, SIGKILL as the last resort).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::SandboxError;

/// Where the gateway's own output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayLogs {
    /// Appended to this file (stdout and stderr).
    File(PathBuf),
    /// The sandbox's own stdout and stderr.
    Inherit,
}

/// How readiness was established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The admin API's `GET /ready` answered 200: every provider's first configuration is applied.
    Ready,
    /// The gateway has no readiness endpoint; its entry point accepts connections.
    EntryPointAccepting {
        /// Why `/ready` could not be used.
        why: String,
    },
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Readiness::Ready => f.write_str("admin /ready answered 200"),
            Readiness::EntryPointAccepting { why } => {
                write!(f, "entry point accepting ({why})")
            }
        }
    }
}

/// How the gateway stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayStop {
    /// Its exit status.
    pub status: ExitStatus,
    /// It did not stop within the limit after SIGTERM and was killed.
    pub killed: bool,
}

/// The running gateway process. Dropping it kills the process (a safety net: use
/// [`GatewayProcess::stop`]).
#[derive(Debug)]
pub struct GatewayProcess {
    child: Child,
    pid: u32,
    logs: GatewayLogs,
    exited: Option<ExitStatus>,
}

impl GatewayProcess {
    /// Starts `tagway run --config <config>`.
    ///
    /// The child gets its own process group (a Ctrl-C in the terminal reaches the sandbox only,
    /// which then stops the gateway in order) and, on Linux, `PR_SET_PDEATHSIG` = SIGTERM so it
    /// stops even if the sandbox is killed outright. The death signal fires when the *thread*
    /// that spawned the child exits: call this from the thread that lives as long as the sandbox
    /// (the `block_on` thread), not from a short-lived blocking thread.
    pub fn spawn(tagway: &Path, config: &Path, logs: GatewayLogs) -> Result<Self, SandboxError> {
        if !tagway.is_file() {
            return Err(SandboxError::TagwayNotFound {
                path: tagway.to_owned(),
            });
        }
        let mut cmd = Command::new(tagway);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .process_group(0);
        match &logs {
            GatewayLogs::File(path) => {
                let open = || {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|source| SandboxError::WorkDir {
                            path: path.clone(),
                            source,
                        })
                };
                cmd.stdout(open()?).stderr(open()?);
            }
            GatewayLogs::Inherit => {
                cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
            }
        }
        #[cfg(target_os = "linux")]
        {
            // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
            // functions (prctl, getppid) without allocating.
            let parent = std::process::id() as libc::pid_t;
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent died before prctl took effect: do not run orphaned.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::other("the sandbox exited"));
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|source| SandboxError::Spawn {
            path: tagway.to_owned(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| SandboxError::Spawn {
            path: tagway.to_owned(),
            source: std::io::Error::other("the process exited at once"),
        })?;
        Ok(GatewayProcess {
            child,
            pid,
            logs,
            exited: None,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The log file, when the output goes to one.
    pub fn log_file(&self) -> Option<&Path> {
        match &self.logs {
            GatewayLogs::File(p) => Some(p),
            GatewayLogs::Inherit => None,
        }
    }

    /// The last `lines` lines of the log file (empty when the output is inherited).
    pub fn log_tail(&self, lines: usize) -> String {
        self.log_file().map(|p| tail(p, lines)).unwrap_or_default()
    }

    fn exited_error(&self, status: ExitStatus) -> SandboxError {
        SandboxError::GatewayExited {
            status: describe(status),
            log: self.log_file().map(Path::to_owned),
            tail: self.log_tail(30),
        }
    }

    /// Waits until the gateway is ready: `GET /ready` on the admin listener answers 200; when the
    /// gateway has no `/ready` (404) or no admin listener (refused while `probe` accepts for 3s),
    /// until `probe` (an entry point) accepts connections. Fails when the process exits or
    /// `limit` passes.
    pub async fn wait_ready(
        &mut self,
        admin: SocketAddr,
        probe: SocketAddr,
        limit: Duration,
    ) -> Result<Readiness, SandboxError> {
        let start = Instant::now();
        let mut entry_accepting_since: Option<Instant> = None;
        loop {
            if let Some(status) = self.try_exited()? {
                return Err(self.exited_error(status));
            }
            let last = match http_get(admin, "/ready").await {
                Ok((200, _)) => return Ok(Readiness::Ready),
                Ok((404, _)) => {
                    if accepts(probe).await {
                        return Ok(Readiness::EntryPointAccepting {
                            why: "the admin API has no /ready".into(),
                        });
                    }
                    format!("/ready answered 404 and {probe} refuses connections")
                }
                Ok((status, body)) => format!("/ready answered {status}: {}", body.trim()),
                Err(e) => {
                    if accepts(probe).await {
                        let since = *entry_accepting_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= Duration::from_secs(3) {
                            return Ok(Readiness::EntryPointAccepting {
                                why: format!("no admin API at {admin}: {e}"),
                            });
                        }
                    }
                    format!("admin API at {admin}: {e}")
                }
            };
            if start.elapsed() >= limit {
                return Err(SandboxError::NotReady {
                    waited: limit,
                    last,
                    log: self.log_file().map(Path::to_owned),
                    tail: self.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the admin API's `GET /api/tcp/routers` lists every router of `expected`
    /// (`name@provider`) enabled: `/ready` says each provider delivered a first configuration,
    /// this says the example routes are in use. Returns `false` when the gateway has no such
    /// endpoint (nothing to wait for); fails when the process exits or `limit` passes.
    pub async fn wait_routers(
        &mut self,
        admin: SocketAddr,
        expected: &[&str],
        limit: Duration,
    ) -> Result<bool, SandboxError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_exited()? {
                return Err(self.exited_error(status));
            }
            let last = match http_get(admin, "/api/tcp/routers").await {
                Ok((200, body)) => match enabled_routers(&body) {
                    Some(names) => {
                        let missing: Vec<&str> = expected
                            .iter()
                            .copied()
                            .filter(|e| !names.iter().any(|n| n == e))
                            .collect();
                        if missing.is_empty() {
                            return Ok(true);
                        }
                        format!(
                            "routers {} not in use yet (enabled: {names:?})",
                            missing.join(", ")
                        )
                    }
                    None => return Ok(false),
                },
                Ok((404, _)) => return Ok(false),
                Ok((status, body)) => {
                    format!("/api/tcp/routers answered {status}: {}", body.trim())
                }
                Err(e) => format!("admin API at {admin}: {e}"),
            };
            if start.elapsed() >= limit {
                return Err(SandboxError::NotReady {
                    waited: limit,
                    last,
                    log: self.log_file().map(Path::to_owned),
                    tail: self.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn try_exited(&mut self) -> Result<Option<ExitStatus>, SandboxError> {
        if let Some(s) = self.exited {
            return Ok(Some(s));
        }
        let status = self
            .child
            .try_wait()
            .map_err(|source| SandboxError::Wait { source })?;
        self.exited = status;
        Ok(status)
    }

    /// Resolves when the gateway exits by itself; an error describes how (with its log's tail).
    pub async fn exited(&mut self) -> SandboxError {
        match self.exited {
            Some(s) => self.exited_error(s),
            None => match self.child.wait().await {
                Ok(s) => {
                    self.exited = Some(s);
                    self.exited_error(s)
                }
                Err(source) => SandboxError::Wait { source },
            },
        }
    }

    /// Sends SIGTERM, waits up to `limit` for the process to exit, then kills it.
    pub async fn stop(mut self, limit: Duration) -> Result<GatewayStop, SandboxError> {
        if let Some(status) = self.try_exited()? {
            return Ok(GatewayStop {
                status,
                killed: false,
            });
        }
        terminate(self.pid);
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => Ok(GatewayStop {
                status,
                killed: false,
            }),
            Ok(Err(source)) => Err(SandboxError::Wait { source }),
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "the gateway did not stop within {limit:?} after SIGTERM; killing it"
                );
                self.child
                    .kill()
                    .await
                    .map_err(|source| SandboxError::Wait { source })?;
                let status = self
                    .child
                    .wait()
                    .await
                    .map_err(|source| SandboxError::Wait { source })?;
                Ok(GatewayStop {
                    status,
                    killed: true,
                })
            }
        }
    }
}

/// The names of the enabled routers in a `/api/tcp/routers` answer (a JSON array of objects with
/// `name` and `status`); `None` when the body is not such an array.
fn enabled_routers(body: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter(|r| r["status"].as_str().is_none_or(|s| s == "enabled"))
            .filter_map(|r| r["name"].as_str().map(str::to_owned))
            .collect(),
    )
}

#[cfg(unix)]
fn terminate(pid: u32) {
    // SAFETY: kill(2) with a PID of our own, not yet reaped, child: it cannot name another
    // process.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    if rc != 0 {
        tracing::debug!(pid, error = %std::io::Error::last_os_error(), "SIGTERM failed");
    }
}

#[cfg(not(unix))]
fn terminate(_pid: u32) {}

/// `exit status 0`, `killed by signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                _ => "",
            };
            return format!("killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => "unknown exit status".into(),
    }
}

/// The last `lines` lines of a file (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn accepts(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// A minimal `GET` over HTTP/1.1 (`Connection: close`): the status code and the body. Bounded
/// to 2 seconds and 64 KiB.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        (&mut s).take(64 * 1024).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 2s"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn http_get_reads_status_and_body() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.expect("read");
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 15\r\n\r\n{\"ready\":false}",
            )
            .await
            .expect("write");
            req
        });
        let (status, body) = http_get(addr, "/ready").await.expect("answer");
        assert_eq!(status, 503);
        assert_eq!(body, "{\"ready\":false}");
        let req = server.await.expect("server");
        assert!(req.starts_with("GET /ready HTTP/1.1\r\n"), "{req}");
    }

    #[test]
    fn enabled_routers_are_read_from_the_admin_answer() {
        let body = r#"[{"name":"a@consulcatalog","status":"enabled"},
                       {"name":"b@consulcatalog","status":"disabled","error":["x"]},
                       {"name":"c@file"}]"#;
        assert_eq!(
            enabled_routers(body),
            Some(vec!["a@consulcatalog".to_owned(), "c@file".to_owned()])
        );
        assert_eq!(
            enabled_routers("{\"message\":\"404 page not found\"}"),
            None
        );
        assert_eq!(enabled_routers("not json"), None);
    }

    #[test]
    fn a_missing_binary_is_named() {
        let err = GatewayProcess::spawn(
            Path::new("/nonexistent/tagway"),
            Path::new("/nonexistent/tagway.toml"),
            GatewayLogs::Inherit,
        )
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/tagway"), "{err}");
    }

    #[tokio::test]
    async fn a_child_that_exits_at_once_is_reported_with_its_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("fake-tagway");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"error: no such config $3\" >&2\nexit 3\n",
        )
        .expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let log = dir.path().join("tagway.log");
        let mut gw = GatewayProcess::spawn(
            &script,
            Path::new("missing.toml"),
            GatewayLogs::File(log.clone()),
        )
        .expect("spawns");
        let closed = "127.0.0.1:1".parse().expect("literal");
        let err = gw
            .wait_ready(closed, closed, Duration::from_secs(20))
            .await
            .expect_err("exits");
        let text = err.to_string();
        assert!(text.contains("exit status 3"), "{text}");
        assert!(text.contains("no such config missing.toml"), "{text}");
    }

    #[tokio::test]
    async fn stop_sends_sigterm_and_reports_the_status() {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("fake-tagway");
        // Exits 0 on SIGTERM, like the gateway.
        std::fs::write(
            &script,
            "#!/bin/sh\ntrap 'exit 0' TERM\nwhile :; do sleep 0.05; done\n",
        )
        .expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let gw = GatewayProcess::spawn(&script, Path::new("x.toml"), GatewayLogs::Inherit)
            .expect("spawns");
        let pid = gw.pid();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stop = gw.stop(Duration::from_secs(10)).await.expect("stops");
        assert!(stop.status.success(), "{}", describe(stop.status));
        assert!(!stop.killed);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[tokio::test]
    async fn stop_kills_a_child_that_ignores_sigterm() {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("fake-tagway");
        std::fs::write(
            &script,
            "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.05; done\n",
        )
        .expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let gw = GatewayProcess::spawn(&script, Path::new("x.toml"), GatewayLogs::Inherit)
            .expect("spawns");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stop = gw.stop(Duration::from_millis(500)).await.expect("stops");
        assert!(stop.killed);
        assert_eq!(describe(stop.status), "killed by signal 9 (SIGKILL)");
    }
}
