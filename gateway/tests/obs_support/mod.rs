//! Helpers of the observability tests: a gateway with observability and its admin listener on
//! 127.0.0.1:0, backends, a minimal HTTP/1.0 client and a Prometheus scrape reader.
#![allow(dead_code)]

// The plain helpers (static configuration, backends, services) are the data-plane tests' own.
#[path = "../support/mod.rs"]
mod base;
#[allow(unused_imports)] // each test crate uses some of them
pub use base::{closed_port, echo_backend, lb, static_with};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tagway::admin::{self, AdminState};
use tagway::observability::Observability;
use tagway::server::{Gateway, GatewayHandle};
use tagway_config::{Dynamic, Router, StaticConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

/// A running gateway with its admin API.
pub struct Running {
    pub addrs: HashMap<String, SocketAddr>,
    pub admin: SocketAddr,
    pub config: watch::Sender<Arc<Dynamic>>,
    pub handle: GatewayHandle,
    pub obs: Observability,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn addr(&self, ep: &str) -> SocketAddr {
        self.addrs[ep]
    }

    /// Publishes `d` as the orchestrator does (provider update, validation, publish, send) and
    /// waits until the data plane applied it.
    pub async fn reload_from(&mut self, provider: &str, d: Dynamic) {
        let before = self.obs.applied_count();
        self.obs.provider_updated(provider, &d);
        self.obs.validated(&[]);
        let d = Arc::new(d);
        self.obs.publish(&d);
        self.config.send_replace(d);
        wait_until(|| self.obs.applied_count() > before).await;
    }

    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `cond` every 10 ms for up to 5 s; panics when it never holds.
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 5 s");
}

/// Starts a gateway with observability (`obs`) and an admin listener; the first configuration
/// (`first`, from provider `file`) is published the way the pipeline does. Does not wait for it.
pub async fn start_with(
    st: StaticConfig,
    obs: Observability,
    options: Option<tagway::conn::Options>,
    first: Option<Dynamic>,
) -> Running {
    let mut gw = Gateway::new(st.clone()).with_observability(obs.clone());
    if let Some(o) = options {
        gw = gw.with_options(o);
    }
    gw.bind().unwrap();
    let addrs = st
        .entry_points
        .keys()
        .map(|k| (k.clone(), gw.local_addr(k).unwrap()))
        .collect();
    let handle = gw.handle();
    let initial = match &first {
        Some(d) => {
            obs.provider_updated("file", d);
            obs.validated(&[]);
            Arc::new(d.clone())
        }
        None => Arc::new(Dynamic::default()),
    };
    if first.is_some() {
        obs.publish(&initial);
    }
    let (tx, rx) = watch::channel(initial);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let listener = admin::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = listener.local_addr().unwrap();
    let state = AdminState::new(obs.clone(), handle.clone(), Arc::new(st));
    let (admin_stop_tx, admin_stop_rx) = oneshot::channel::<()>();
    tokio::spawn(admin::serve(listener, state, async move {
        let _ = admin_stop_rx.await;
    }));
    let task = tokio::spawn(async move {
        gw.run(rx, async move {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
        let _ = admin_stop_tx.send(());
    });
    Running {
        addrs,
        admin: admin_addr,
        config: tx,
        handle,
        obs,
        stop: Some(stop_tx),
        task,
    }
}

pub fn router(ep: &str, rule: &str, service: &str) -> Router {
    Router {
        entry_points: vec![ep.into()],
        rule: rule.into(),
        service: service.into(),
        ..Default::default()
    }
}

/// Sends `payload`, half-closes, reads the answer to EOF (bounded).
pub async fn exchange(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answer within 5 s")
        .unwrap();
    out
}

/// Connects and waits until the gateway closes the connection (it went nowhere): bounded.
pub async fn refused(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5 s");
    assert!(matches!(r, Ok(0) | Err(_)), "expected a close, got {r:?}");
}

/// One HTTP/1.0 GET: (status, content type, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("HTTP answer within 5 s")
        .unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

/// GET returning parsed JSON (asserts 200).
pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, ctype, body) = get(addr, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    assert!(ctype.starts_with("application/json"), "{path}: {ctype}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// A parsed `/metrics` scrape.
pub struct Scrape(pub prometheus_parse::Scrape, pub String);

impl Scrape {
    pub async fn fetch(admin: SocketAddr) -> Scrape {
        let (status, ctype, body) = get(admin, "/metrics").await;
        assert_eq!(status, 200);
        assert!(ctype.starts_with("text/plain"), "{ctype}");
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        Scrape(prometheus_parse::Scrape::parse(lines).unwrap(), body)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        self.0.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The value of the one counter or gauge sample with these labels (None when absent).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.matching(name, labels);
        let s = it.next()?;
        assert!(it.next().is_none(), "{name} {labels:?}: several samples");
        match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(*v),
            other => panic!("{name}: not a counter or gauge: {other:?}"),
        }
    }

    /// Like [`Scrape::value`], panicking when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} missing in:\n{}", self.1))
    }

    /// Sum over every sample of `name` matching `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                _ => 0.0,
            })
            .sum()
    }

    /// `(count, buckets)` of a histogram series.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let s = self
            .matching(name, labels)
            .next()
            .unwrap_or_else(|| panic!("{name} {labels:?} missing in:\n{}", self.1));
        match &s.value {
            prometheus_parse::Value::Histogram(b) => {
                b.iter().map(|h| (h.less_than, h.count)).collect()
            }
            other => panic!("{name}: not a histogram: {other:?}"),
        }
    }
}
