//! Shared harness of the Consul provider end-to-end tests: the dev catalog, the Consul provider,
//! the file provider, the merge/validate step and the gateway's data plane, as `tagway run`
//! assembles them, with TCP backends on 127.0.0.1 that answer their own name.

#![allow(dead_code)] // each test file uses part of the harness

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tagway::server::Gateway;
use tagway_config::{ConsulCatalog, ConsulEndpoint, Dynamic, EntryPoint, StaticConfig};
use tagway_integration::catalog::{DevCatalog, DevCatalogHandle};
use tagway_provider_consul::{ConsulProvider, ProviderOptions, Running, watch::WatchTiming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// Everything a test needs.
pub struct Harness {
    pub catalog: DevCatalogHandle,
    pub gateway: SocketAddr,
    pub provider: Running,
    pub merged: watch::Receiver<Arc<Dynamic>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Test timing: short waits, small coalescing window.
pub fn options() -> ProviderOptions {
    ProviderOptions {
        timing: WatchTiming {
            wait: Duration::from_secs(5),
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_millis(500),
            coalesce: Duration::from_millis(10),
            ..WatchTiming::default()
        },
        ..ProviderOptions::default()
    }
}

pub async fn catalog() -> DevCatalogHandle {
    DevCatalog::builder()
        .without_consul_service()
        .start("127.0.0.1:0")
        .await
        .expect("dev catalog")
}

pub fn consul_cfg(catalog: &DevCatalogHandle) -> ConsulCatalog {
    ConsulCatalog {
        endpoint: ConsulEndpoint {
            address: Some(catalog.http_url()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Starts provider + (optional) file provider + gateway with one entry point `tcp`.
pub async fn start(
    catalog: DevCatalogHandle,
    cfg: ConsulCatalog,
    opts: ProviderOptions,
    file: Option<&Path>,
) -> Harness {
    let mut st = StaticConfig::default();
    st.entry_points.insert(
        "tcp".into(),
        EntryPoint {
            address: "127.0.0.1:0".into(),
            ..Default::default()
        },
    );
    st.providers.consul_catalog = Some(cfg.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (provider_stop_tx, provider_stop_rx) = oneshot::channel::<()>();
    let provider = ConsulProvider::with_env(&cfg, &|_| None)
        .expect("provider settings")
        .with_options(opts)
        .start(async move {
            let _ = provider_stop_rx.await;
        })
        .expect("provider start");
    let mut sources = vec![("consulcatalog".to_owned(), provider.config())];
    let mut file_handle = None;
    if let Some(path) = file {
        let (rx, h) = tagway::providers::file::start(tagway_config::FileProvider {
            filename: Some(path.to_path_buf()),
            directory: None,
            watch: true,
        });
        sources.push(("file".to_owned(), rx));
        file_handle = Some(h);
    }
    let st = Arc::new(st);
    let merged = tagway::cli::run::combine(st.clone(), sources, None);
    let mut gateway = Gateway::new((*st).clone());
    gateway.bind().expect("bind");
    let addr = gateway.local_addr("tcp").expect("entry point");
    let rx = merged.clone();
    tokio::spawn(async move {
        let _keep = file_handle;
        let _ = gateway
            .run(rx, async move {
                let _ = stop_rx.await;
                let _ = provider_stop_tx.send(());
            })
            .await;
    });
    Harness {
        catalog,
        gateway: addr,
        provider,
        merged,
        stop: Some(stop_tx),
    }
}

/// A TCP backend answering `<name>\n` to every connection, then echoing what it reads; records
/// the first line a client sends before its name when `read_first_line` (PROXY headers).
pub struct Backend {
    pub addr: SocketAddr,
    pub first_lines: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_inner(name, false).await
    }

    /// A backend that expects a PROXY v1 header line and records it.
    pub async fn start_proxy_v1(name: &str) -> Backend {
        Self::start_inner(name, true).await
    }

    async fn start_inner(name: &str, read_first_line: bool) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let name = name.to_owned();
        let first_lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = first_lines.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let name = name.clone();
                let lines = lines.clone();
                tokio::spawn(async move {
                    if read_first_line {
                        let mut line = Vec::new();
                        let mut b = [0u8; 1];
                        while s.read_exact(&mut b).await.is_ok() && line.len() < 256 {
                            line.push(b[0]);
                            if b[0] == b'\n' {
                                break;
                            }
                        }
                        lines
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&line).trim_end().to_owned());
                    }
                    let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            first_lines,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Connects through the gateway and returns the backend's name, or `None` when the gateway
/// closes the connection without one (no route, no healthy server).
pub async fn hit(gateway: SocketAddr) -> Option<String> {
    let attempt = async {
        let mut s = TcpStream::connect(gateway).await.ok()?;
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b).await {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) => out.push(b[0]),
                _ => return None,
            }
        }
        String::from_utf8(out).ok()
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

/// Waits (at most 15 s) until a connection through the gateway satisfies `ok`; returns how
/// long it took.
pub async fn until_hit(
    gateway: SocketAddr,
    what: &str,
    ok: impl Fn(Option<&str>) -> bool,
) -> Duration {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < Duration::from_secs(15) {
        last = hit(gateway).await;
        if ok(last.as_deref()) {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}; last answer: {last:?}");
}

/// Counts which backend answers `n` connections.
pub async fn spread(gateway: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let name = hit(gateway).await.unwrap_or_else(|| "<none>".into());
        *m.entry(name).or_insert(0) += 1;
    }
    m
}
