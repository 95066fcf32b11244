//! The sandbox end to end, as the README runs it: the built `tagway-sandbox` binary with the
//! `tagway` binary next to it (`scripts/test` builds every binary first; this test does not call
//! cargo). It connects through the gateway (weighted split, TLS passthrough by SNI, PROXY client
//! address), registers a new service through the dev catalog's HTTP API and sees it routed, then
//! stops the sandbox and checks that nothing it started is left.
//!
//! Every listener is on a free port (`--catalog-addr 127.0.0.1:0 --free-ports`): parallel-safe.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const READY_PREFIX: &str = "TAGWAY_SANDBOX_READY ";
/// Upper bound for each wait (ready line, a route going live, the sandbox stopping).
const WAIT: Duration = Duration::from_secs(90);

fn binaries() -> Result<(PathBuf, PathBuf)> {
    let sandbox = PathBuf::from(env!("CARGO_BIN_EXE_tagway-sandbox"));
    let tagway = sandbox
        .parent()
        .context("sandbox binary has no folder")?
        .join(format!("tagway{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        tagway.is_file(),
        "{} is missing: build every binary first (scripts/test does: cargo build --workspace --bins)",
        tagway.display()
    );
    Ok((sandbox, tagway))
}

/// A running `tagway-sandbox`; killed when dropped (a failing test leaves nothing behind).
struct Running {
    child: Child,
    info: Value,
    stderr_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(extra: &[&str]) -> Result<Running> {
        let (sandbox, tagway) = binaries()?;
        let dir = tempfile::tempdir()?;
        let stderr_file = dir.path().join("sandbox.stderr");
        let mut child = Command::new(&sandbox)
            .args([
                "--catalog-addr",
                "127.0.0.1:0",
                "--free-ports",
                "--ready-line",
                "--ready-timeout",
                "60s",
            ])
            .arg("--tagway")
            .arg(&tagway)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", sandbox.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(json) = line.strip_prefix(READY_PREFIX) {
                    return Ok::<_, anyhow::Error>(Some(json.to_owned()));
                }
            }
            Ok(None)
        })
        .await;
        let stderr = || std::fs::read_to_string(&stderr_file).unwrap_or_default();
        let json = match ready {
            Ok(Ok(Some(json))) => json,
            Ok(Ok(None)) => bail!(
                "the sandbox ended without a ready line; stderr:\n{}",
                stderr()
            ),
            Ok(Err(e)) => bail!("reading the sandbox's stdout: {e}; stderr:\n{}", stderr()),
            Err(_) => bail!("no ready line within {WAIT:?}; stderr:\n{}", stderr()),
        };
        // Keep draining stdout so the sandbox never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let info: Value = serde_json::from_str(&json).context("ready line JSON")?;
        Ok(Running {
            child,
            info,
            stderr_file,
            _dir: dir,
        })
    }

    fn addr(&self, pointer: &str) -> SocketAddr {
        self.info
            .pointer(pointer)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{pointer} in {}", self.info))
    }

    fn entry(&self, name: &str) -> SocketAddr {
        self.addr(&format!("/entryPoints/{name}"))
    }

    fn str(&self, key: &str) -> String {
        self.info[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {}", self.info))
            .to_owned()
    }

    fn gateway_pid(&self) -> u32 {
        self.info["gatewayPid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_else(|| panic!("gatewayPid in {}", self.info))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self.child.id().context("sandbox already reaped")?;
        // SAFETY: kill(2) on our own child, not yet reaped.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Waits for the sandbox to exit by itself; returns its exit code.
    async fn wait(&mut self) -> Result<i32> {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .with_context(|| format!("the sandbox did not exit within {WAIT:?}"))??;
        status
            .code()
            .with_context(|| format!("the sandbox died by a signal: {status:?}"))
    }
}

/// Connects and reads the first line (the backend's greeting), bounded to 5 seconds.
async fn greeting(addr: SocketAddr) -> Result<(String, TcpStream)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let line = read_line(&mut s).await?;
    Ok((line, s))
}

/// Reads one line byte by byte (nothing is buffered past it), bounded to 5 seconds.
async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    let mut line = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read_u8().await {
                Ok(b'\n') => return Ok(()),
                Ok(b) => line.push(b),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && line.is_empty() => {
                    bail!("connection closed without a line")
                }
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await
    .context("no line within 5s")??;
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn refuses(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Err(_))
    )
}

async fn weighted_split(sb: &Running) -> Result<()> {
    let echo = sb.entry("echo");
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..16 {
        let (line, _s) = greeting(echo).await?;
        if line.starts_with("pg-echo v1 ") {
            v1 += 1;
        } else if line.starts_with("pg-echo v2 ") {
            v2 += 1;
        } else {
            bail!("unexpected greeting on {echo}: {line:?}");
        }
    }
    // 3:1 smooth weighted round-robin: 12/4 over 16 connections (a configuration reload resets
    // the balancer, so leave room for that).
    ensure!(
        v2 >= 1 && v1 >= 2 * v2,
        "split v1={v1} v2={v2}, expected 3:1"
    );

    // The echo itself, through the gateway, with a half-close.
    let (line, mut s) = greeting(echo).await?;
    let version = if line.starts_with("pg-echo v1 ") {
        "v1"
    } else {
        "v2"
    };
    s.write_all(b"ping through tagway\n").await?;
    s.shutdown().await?;
    let echoed = read_line(&mut s).await?;
    ensure!(
        echoed == format!("{version}: ping through tagway"),
        "echo {echoed:?}"
    );
    Ok(())
}

async fn tls_passthrough(sb: &Running) -> Result<()> {
    let ca = std::fs::read(sb.str("secureCaFile"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&ca)?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = sb.str("secureServerName");
    ensure!(name == "secure.sandbox.test", "server name {name}");
    let tcp = TcpStream::connect(sb.entry("tls")).await?;
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        connector.connect(ServerName::try_from(name.clone())?, tcp),
    )
    .await
    .context("TLS handshake timed out")?
    .context("TLS handshake through the gateway (passthrough) with the backend's certificate")?;
    let line = read_line(&mut tls).await?;
    ensure!(
        line.starts_with("secure answered over TLS") && line.contains("SNI secure.sandbox.test"),
        "{line:?}"
    );
    tls.write_all(b"secret\n").await?;
    let echoed = read_line(&mut tls).await?;
    ensure!(echoed == "secure: secret", "{echoed:?}");
    Ok(())
}

async fn proxy_protocol(sb: &Running) -> Result<()> {
    let (line, s) = greeting(sb.entry("proxied")).await?;
    let me = s.local_addr()?;
    let said = line
        .split("you are ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("no client address in {line:?}"))?;
    ensure!(
        said == me.to_string(),
        "the backend was told {said}, the client is {me}: {line:?}"
    );
    ensure!(line.contains("PROXY protocol v1"), "{line:?}");
    Ok(())
}

async fn register_hello_and_see_it_routed(sb: &Running) -> Result<()> {
    let extra = sb.entry("extra");
    // Nothing routes the entry point yet: no greeting.
    ensure!(
        greeting(extra).await.is_err(),
        "{extra} answered before hello was registered"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://{}/v1/agent/service/register", sb.str("catalog"));
    let resp = http
        .put(&url)
        .body(sb.str("helloRegistration"))
        .send()
        .await?;
    ensure!(resp.status().is_success(), "PUT {url}: {}", resp.status());

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match greeting(extra).await {
            Ok((line, _)) if line.starts_with("hello answered") => break,
            Ok((line, _)) => bail!("unexpected greeting on {extra}: {line:?}"),
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("hello not routed within {WAIT:?}: {e}"),
        }
    }
    Ok(())
}

async fn admin_api(sb: &Running) -> Result<()> {
    ensure!(
        sb.str("readiness").contains("/ready answered 200"),
        "readiness {}",
        sb.str("readiness")
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let admin = sb.str("admin");
    let services: Value = http
        .get(format!("http://{admin}/api/tcp/services"))
        .send()
        .await?
        .json()
        .await?;
    let names: Vec<&str> = services
        .as_array()
        .context("services array")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for want in [
        "pg-echo@consulcatalog",
        "secure@consulcatalog",
        "client-addr@consulcatalog",
    ] {
        ensure!(names.contains(&want), "{want} not in {names:?}");
    }
    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    // Every connection of the weighted-split check (16 + 1) went through router pg-echo.
    let routed: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tagway_router_connections_total{")
                && l.contains("router=\"pg-echo@consulcatalog\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(
        routed >= 17.0,
        "tagway_router_connections_total for pg-echo@consulcatalog = {routed}:\n{metrics}"
    );
    Ok(())
}

async fn assert_all_stopped(sb: &Running, gateway_pid: u32) -> Result<()> {
    ensure!(
        !process_exists(gateway_pid),
        "the gateway (pid {gateway_pid}) is still running"
    );
    ensure!(
        !Path::new(&sb.str("workDir")).exists(),
        "the work folder is left"
    );
    for addr in [
        sb.entry("echo"),
        sb.entry("tls"),
        sb.entry("proxied"),
        sb.entry("extra"),
        sb.addr("/catalog"),
        sb.addr("/admin"),
    ] {
        ensure!(refuses(addr).await, "{addr} still accepts connections");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_routes_everything_and_stops_cleanly_on_sigterm() -> Result<()> {
    // The safety net: should the test hang, the sandbox stops itself.
    let mut sb = Running::start(&["--exit-after", "10m"]).await?;
    let gateway_pid = sb.gateway_pid();
    ensure!(process_exists(gateway_pid), "gateway pid {gateway_pid}");
    let checks = async {
        weighted_split(&sb).await.context("weighted split")?;
        tls_passthrough(&sb).await.context("TLS passthrough")?;
        proxy_protocol(&sb).await.context("PROXY protocol")?;
        register_hello_and_see_it_routed(&sb)
            .await
            .context("registering a new service")?;
        admin_api(&sb).await.context("admin API")
    };
    if let Err(e) = checks.await {
        let log = std::fs::read_to_string(sb.str("gatewayLog")).unwrap_or_default();
        bail!(
            "{e:#}\nsandbox stderr:\n{}\ngateway log:\n{log}",
            sb.stderr()
        );
    }

    sb.signal(libc::SIGTERM)?;
    let code = sb.wait().await?;
    ensure!(code == 0, "exit code {code}; stderr:\n{}", sb.stderr());
    assert_all_stopped(&sb, gateway_pid).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_after_and_ctrl_c_stop_everything_with_status_0() -> Result<()> {
    // Non-interactive: stops by itself.
    let mut sb = Running::start(&["--exit-after", "1s"]).await?;
    let pid = sb.gateway_pid();
    let code = sb.wait().await?;
    ensure!(code == 0, "exit code {code}; stderr:\n{}", sb.stderr());
    ensure!(
        sb.stderr().contains("--exit-after elapsed"),
        "{}",
        sb.stderr()
    );
    assert_all_stopped(&sb, pid).await?;

    // Ctrl-C (SIGINT).
    let mut sb = Running::start(&["--exit-after", "10m"]).await?;
    let pid = sb.gateway_pid();
    sb.signal(libc::SIGINT)?;
    let code = sb.wait().await?;
    ensure!(code == 0, "exit code {code}; stderr:\n{}", sb.stderr());
    ensure!(sb.stderr().contains("Ctrl-C"), "{}", sb.stderr());
    assert_all_stopped(&sb, pid).await
}

#[tokio::test]
async fn a_taken_catalog_address_is_refused_clearly() -> Result<()> {
    let (sandbox, tagway) = binaries()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let out = tokio::time::timeout(
        WAIT,
        Command::new(sandbox)
            .arg("--catalog-addr")
            .arg(addr.to_string())
            .arg("--free-ports")
            .arg("--tagway")
            .arg(tagway)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    ensure!(
        stderr.contains(&format!("cannot listen on {addr}: the port is in use"))
            && stderr.contains("--catalog-addr 127.0.0.1:0"),
        "{stderr}"
    );
    Ok(())
}
