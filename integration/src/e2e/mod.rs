//! Shared end-to-end test support: runs the real `tagway` binary with a temporary configuration
//! (static file + file-provider dynamic file), waits for its ports, and provides backends, rcgen
//! certificates and TLS clients, all on 127.0.0.1.
//!
//! Every wait is bounded; every process started here is killed (by its PID) when dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Default bound on every wait of these helpers.
pub const WAIT: Duration = Duration::from_secs(10);

/// The `tagway` binary of this build: `TAGWAY_BIN`, else `target/<profile>/tagway` next to the
/// running test executable (`scripts/test` builds the binaries first).
pub fn tagway_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("TAGWAY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/tagway
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target/<profile> folder")?;
    let bin = profile_dir.join(format!("tagway{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        bail!(
            "{} does not exist: build it first (cargo build --bins)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A free loopback port (bound then released; the gateway binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The lines a running tagway wrote to stderr, collected as they come.
#[derive(Clone, Debug, Default)]
pub struct LogLines(Arc<Mutex<Vec<String>>>);

impl LogLines {
    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Number of lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Whether a line satisfies `f`.
    pub fn any(&self, f: impl FnMut(&String) -> bool) -> bool {
        self.lines().iter().any(f)
    }

    /// The first line for which `f` gives a value.
    pub fn find_map<T>(&self, f: impl FnMut(&String) -> Option<T>) -> Option<T> {
        self.lines().iter().find_map(f)
    }
}

/// Starts `tagway run --config <config>` with `RUST_LOG=info` and `envs`, stdin and stdout
/// closed; every line it writes to stderr is collected into the returned log.
pub fn spawn_tagway(
    config: &std::path::Path,
    envs: &[(&str, &str)],
) -> anyhow::Result<(Child, LogLines)> {
    let mut child = Command::new(tagway_bin()?)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tagway")?;
    let log = LogLines::default();
    if let Some(err) = child.stderr.take() {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                log.lines().push(line);
            }
        });
    }
    Ok((child, log))
}

/// One HTTP/1.0 GET against the admin listener: (status, body).
pub async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(admin)).await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP head: {text}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status: {head}"))?;
    Ok((status, body.to_owned()))
}

/// The admin listener's `/metrics`, parsed (an error unless it answers 200).
pub async fn scrape(admin: SocketAddr) -> anyhow::Result<prometheus_parse::Scrape> {
    let (status, body) = admin_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
    Ok(prometheus_parse::Scrape::parse(
        body.lines().map(|l| Ok(l.to_owned())),
    )?)
}

/// The values of the samples of `metric` whose labels include every `(name, value)` of
/// `labels` (counters, gauges and untyped samples).
pub fn metric_values(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Vec<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect()
}

/// A running `tagway run --config …` process.
pub struct Gateway {
    child: Child,
    dir: tempfile::TempDir,
    addrs: HashMap<String, SocketAddr>,
    log: LogLines,
}

impl Gateway {
    /// Starts tagway with the entry points `entry_points` (each on a free 127.0.0.1 port),
    /// `static_extra` appended to the static TOML, and `dynamic` as the file provider's file.
    /// Returns once every entry point accepts connections.
    pub fn start(entry_points: &[&str], static_extra: &str, dynamic: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut addrs = HashMap::new();
        let mut st = String::new();
        for ep in entry_points {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            st.push_str(&format!("[entryPoints.{ep}]\naddress = \"{addr}\"\n"));
            addrs.insert((*ep).to_owned(), addr);
        }
        st.push_str("[providers.file]\nfilename = \"dynamic.toml\"\n");
        st.push_str(static_extra);
        std::fs::write(dir.path().join("static.toml"), st)?;
        std::fs::write(dir.path().join("dynamic.toml"), dynamic)?;
        let (child, log) = spawn_tagway(&dir.path().join("static.toml"), &[])?;
        let gw = Gateway {
            child,
            dir,
            addrs,
            log,
        };
        for addr in gw.addrs.values() {
            gw.wait_listening(*addr)?;
        }
        Ok(gw)
    }

    /// Waits for tagway's `listening` log line of `addr`. No probe connection is made: it
    /// would be proxied to a backend and disturb the test.
    fn wait_listening(&self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        let addr = addr.to_string();
        while Instant::now() < deadline {
            if self
                .log
                .any(|l| l.contains("listening") && l.contains(&addr))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("tagway did not listen on {addr}; log:\n{}", self.log_text())
    }

    /// The address of an entry point.
    pub fn addr(&self, entry_point: &str) -> SocketAddr {
        self.addrs[entry_point]
    }

    /// The process id of the running binary (for `/proc/PID/…`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary folder holding the configuration (certificates can be written there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything tagway logged so far.
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Number of log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log.count(needle)
    }

    /// Rewrites the dynamic file and waits (bounded) until tagway applied a new configuration.
    pub async fn reload(&self, dynamic: &str) -> anyhow::Result<()> {
        let before = self.log_count("configuration applied");
        std::fs::write(self.dir.path().join("dynamic.toml"), dynamic)?;
        let deadline = Instant::now() + WAIT;
        while self.log_count("configuration applied") <= before {
            if Instant::now() > deadline {
                bail!("no new configuration applied; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The data plane swaps its tables right after the providers publish.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }

    /// Sends a signal (`-TERM`, `-HUP`, …) to the process.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {sig} failed");
        }
        Ok(())
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("tagway still running after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TOML of a service `name` balancing over `servers` (address, weight).
pub fn service_toml(name: &str, servers: &[(SocketAddr, i64)]) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[tcp.services.{name}.loadBalancer]\nservers = [{}]\n",
        list.join(", ")
    )
}

/// TOML of a router.
pub fn router_toml(name: &str, rule: &str, service: &str, extra: &str) -> String {
    format!("[tcp.routers.{name}]\nrule = \"{rule}\"\nservice = \"{service}\"\n{extra}\n")
}

/// A backend that writes `name` to every connection, then closes it.
pub async fn named_backend(name: &str) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
            });
        }
    });
    Ok(addr)
}

/// A backend that echoes each connection until EOF, then closes.
pub async fn echo_backend() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Connects (from `source` when given, e.g. `127.0.0.2`), optionally writes `send`, reads until
/// EOF (bounded by [`WAIT`]).
pub async fn exchange(
    to: SocketAddr,
    source: Option<&str>,
    send: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut s = match source {
        Some(src) => {
            let sock = TcpSocket::new_v4()?;
            sock.bind(format!("{src}:0").parse()?)?;
            sock.connect(to).await?
        }
        None => TcpStream::connect(to).await?,
    };
    if !send.is_empty() {
        s.write_all(send).await?;
    }
    let mut out = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Ok(out),
        // A reset after the data (e.g. a refused client) still tells what arrived.
        Ok(Err(_)) => Ok(out),
        Err(_) => bail!("no EOF from {to} within {WAIT:?}"),
    }
}

/// A self-signed certificate for `names`: (chain PEM, key PEM).
pub fn cert(names: &[&str]) -> anyhow::Result<(String, String)> {
    let c = rcgen::generate_simple_self_signed(
        names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )?;
    Ok((c.cert.pem(), c.signing_key.serialize_pem()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client trusting only `ca_pem`.
pub fn tls_connector(ca_pem: &str) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// Connects with TLS (SNI `name`, trusting `ca_pem`) and reads everything.
pub async fn tls_exchange(to: SocketAddr, ca_pem: &str, name: &str) -> anyhow::Result<Vec<u8>> {
    let tcp = TcpStream::connect(to).await?;
    let sn = ServerName::try_from(name.to_owned())?;
    let mut t = tokio::time::timeout(WAIT, tls_connector(ca_pem)?.connect(sn, tcp)).await??;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, t.read_to_end(&mut out)).await?;
    Ok(out)
}

/// A TLS backend (for passthrough) answering `name` on every connection.
pub async fn tls_backend(name: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<SocketAddr> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let name = name.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = acceptor.accept(s).await {
                    let _ = t.write_all(name.as_bytes()).await;
                    let _ = t.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

/// TOML string literal of a PEM (multi-line basic string).
pub fn toml_pem(pem: &str) -> String {
    format!("\"\"\"\n{pem}\"\"\"")
}
