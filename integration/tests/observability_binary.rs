//! End to end through the real `tagway` binary: `tagway run` with the file provider, an admin
//! listener and a JSON access log. Known traffic (a fixed number of connections and bytes, one
//! routing failure of each reason, one dial failure), then `/metrics` is scraped and parsed with a
//! Prometheus text parser and every counter checked exactly; a reload of the file shows in the
//! configuration metrics; the access log has one line per connection.
//!
//! The binary is `target/<profile>/tagway` next to this test (`scripts/test` builds it first), or
//! `$TAGWAY_BIN` ([`tagway_integration::e2e::tagway_bin`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The running binary; killed (by its PID) when dropped.
struct Tagway {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Tagway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tagway {
    fn start(config: &Path) -> Tagway {
        let mut child =
            Command::new(tagway_integration::e2e::tagway_bin().expect("the tagway binary"))
                .args(["run", "--config", config.to_str().unwrap()])
                .env("RUST_LOG", "info")
                .env("TOKIO_WORKER_THREADS", "2")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("tagway starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Tagway {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (≤ 10 s) for a JSON log line whose `fields` satisfy `pred`.
    fn wait_log(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        for l in &self.seen {
            if let Ok(v) = serde_json::from_str::<Value>(l)
                && pred(&v["fields"])
            {
                return v;
            }
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            self.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && pred(&v["fields"])
            {
                return v;
            }
        }
        panic!("no log line for {what}; got:\n{}", self.seen.join("\n"));
    }

    fn listening(&mut self, entry_point: &str) -> SocketAddr {
        let v = self.wait_log(entry_point, |f| {
            f["message"] == "listening" && f["entry_point"] == entry_point
        });
        v["fields"]["address"].as_str().unwrap().parse().unwrap()
    }
}

async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn exchange(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
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

async fn closed_by_gateway(mut s: TcpStream, within: Duration) {
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(within, s.read(&mut buf))
        .await
        .expect("closed by the gateway in time");
    assert!(matches!(r, Ok(0) | Err(_)), "expected a close, got {r:?}");
}

async fn refused(addr: SocketAddr) {
    closed_by_gateway(
        TcpStream::connect(addr).await.unwrap(),
        Duration::from_secs(5),
    )
    .await;
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("HTTP answer within 5 s")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

struct Scrape(prometheus_parse::Scrape, String);

impl Scrape {
    async fn fetch(admin: SocketAddr) -> Scrape {
        let (status, body) = get(admin, "/metrics").await;
        assert_eq!(status, 200);
        let s = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
        Scrape(s, body)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.0.samples.iter().filter(|s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        });
        let s = found.next()?;
        assert!(found.next().is_none(), "{name} {labels:?}: several samples");
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => panic!("{name}: not a counter or gauge"),
        }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} missing in:\n{}", self.1))
    }

    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                _ => 0.0,
            })
            .sum()
    }
}

const PAYLOAD: usize = 4096;
const CONNECTIONS: usize = 5;

fn dynamic_toml(e1: SocketAddr, e2: SocketAddr, dead: SocketAddr, extra: bool) -> String {
    let mut s = format!(
        r#"
[tcp.routers.app]
entryPoints = ["tcp"]
rule = "HostSNI(`*`)"
service = "app"

[tcp.routers.deny]
entryPoints = ["deny"]
rule = "HostSNI(`*`)"
service = "app"
middlewares = ["deny"]

[tcp.routers.limited]
entryPoints = ["limited"]
rule = "HostSNI(`*`)"
service = "one"
middlewares = ["limit"]

[tcp.routers.zero]
entryPoints = ["zero"]
rule = "HostSNI(`*`)"
service = "zero"

[tcp.routers.dial]
entryPoints = ["dial"]
rule = "HostSNI(`*`)"
service = "dial"

[tcp.routers.sni]
entryPoints = ["tls"]
rule = "HostSNI(`db.example`)"
service = "one"
[tcp.routers.sni.tls]
passthrough = true

[tcp.middlewares.deny.ipAllowList]
sourceRange = ["10.0.0.0/8"]

[tcp.middlewares.limit.inFlightConn]
amount = 1

[tcp.services.app.loadBalancer]
servers = [{{ address = "{e1}" }}, {{ address = "{e2}" }}]

[tcp.services.one.loadBalancer]
servers = [{{ address = "{e1}" }}]

[tcp.services.zero.loadBalancer]
servers = [{{ address = "{e1}", weight = 0 }}]

[tcp.services.dial.loadBalancer]
servers = [{{ address = "{dead}" }}]
"#
    );
    if extra {
        s.push_str(
            r#"
[tcp.routers.extra]
entryPoints = ["empty"]
rule = "ClientIP(`10.0.0.0/8`)"
service = "one"
"#,
        );
    }
    s
}

const EPS: &[&str] = &["tcp", "empty", "deny", "limited", "zero", "dial", "tls"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binary_known_traffic_exact_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let e1 = echo_backend().await;
    let e2 = echo_backend().await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let dynamic = dir.path().join("dynamic.toml");
    std::fs::write(&dynamic, dynamic_toml(e1, e2, dead, false)).unwrap();
    let access = dir.path().join("access.json");
    let mut st = String::new();
    for ep in EPS {
        st.push_str(&format!(
            "[entryPoints.{ep}]\naddress = \"127.0.0.1:0\"\n\n"
        ));
    }
    st.push_str(&format!(
        r#"
[providers.file]
filename = "{}"
watch = true

[admin]
address = "127.0.0.1:0"

[log]
level = "info"
format = "json"

[accessLog]
filePath = "{}"
format = "json"
"#,
        dynamic.display(),
        access.display()
    ));
    let static_path = dir.path().join("tagway.toml");
    std::fs::write(&static_path, st).unwrap();

    let mut gw = Tagway::start(&static_path);
    let admin: SocketAddr = gw
        .wait_log("admin listener", |f| f["message"] == "admin API listening")["fields"]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let addr: std::collections::HashMap<&str, SocketAddr> =
        EPS.iter().map(|ep| (*ep, gw.listening(ep))).collect();
    let mut ready = false;
    for _ in 0..500 {
        if get(admin, "/ready").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "/ready never answered 200");
    assert_eq!(get(admin, "/ping").await, (200, "OK".to_owned()));

    // peek_timeout: the start of a TLS record, then a stall (the gateway's peek timeout is 10 s;
    // the rest of the traffic runs meanwhile).
    let mut stall = TcpStream::connect(addr["tls"]).await.unwrap();
    stall
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x50, 0x01])
        .await
        .unwrap();
    let stalled = tokio::spawn(closed_by_gateway(stall, Duration::from_secs(20)));

    for i in 0..CONNECTIONS {
        let payload: Vec<u8> = (0..PAYLOAD).map(|b| (b * 7 + i) as u8).collect();
        assert_eq!(exchange(addr["tcp"], &payload).await, payload);
    }
    let mut held = TcpStream::connect(addr["limited"]).await.unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    held.read_exact(&mut pong).await.unwrap();
    refused(addr["limited"]).await; // in_flight_limit
    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).await.unwrap();
    refused(addr["empty"]).await; // no_route
    refused(addr["deny"]).await; // ip_allow_list
    refused(addr["zero"]).await; // no_healthy_server
    refused(addr["dial"]).await; // dial_failed
    stalled.await.unwrap(); // peek_timeout

    let mut m = Scrape::fetch(admin).await;
    for _ in 0..500 {
        if m.sum("tagway_entrypoint_open_connections", &[]) == 0.0
            && m.get(
                "tagway_service_bytes_total",
                &[("service", "app@file"), ("direction", "to_client")],
            ) == (CONNECTIONS * PAYLOAD) as f64
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = Scrape::fetch(admin).await;
    }

    let accepted = [
        ("tcp", CONNECTIONS as f64),
        ("empty", 1.0),
        ("deny", 1.0),
        ("limited", 2.0),
        ("zero", 1.0),
        ("dial", 1.0),
        ("tls", 1.0),
    ];
    for (ep, n) in accepted {
        assert_eq!(
            m.get("tagway_entrypoint_connections_total", &[("entrypoint", ep)]),
            n,
            "{ep}"
        );
        assert_eq!(
            m.get("tagway_entrypoint_open_connections", &[("entrypoint", ep)]),
            0.0
        );
    }
    let failures = [
        ("empty", "no_route"),
        ("deny", "ip_allow_list"),
        ("limited", "in_flight_limit"),
        ("zero", "no_healthy_server"),
        ("dial", "dial_failed"),
        ("tls", "peek_timeout"),
    ];
    for (ep, reason) in failures {
        assert_eq!(
            m.get(
                "tagway_routing_failures_total",
                &[("entrypoint", ep), ("reason", reason)]
            ),
            1.0,
            "{ep} {reason}"
        );
    }
    assert_eq!(m.sum("tagway_routing_failures_total", &[]), 6.0);
    assert_eq!(m.sum("tagway_router_failures_total", &[]), 4.0);
    let total = (CONNECTIONS * PAYLOAD) as f64;
    for dir in ["to_server", "to_client"] {
        assert_eq!(
            m.get(
                "tagway_service_bytes_total",
                &[("service", "app@file"), ("direction", dir)]
            ),
            total
        );
        assert_eq!(
            m.get(
                "tagway_router_bytes_total",
                &[("router", "app@file"), ("direction", dir)]
            ),
            total
        );
        assert_eq!(
            m.sum(
                "tagway_server_bytes_total",
                &[("service", "app@file"), ("direction", dir)]
            ),
            total
        );
    }
    assert_eq!(
        m.get(
            "tagway_service_connections_total",
            &[("service", "app@file")]
        ),
        CONNECTIONS as f64
    );
    assert_eq!(
        m.get("tagway_router_connections_total", &[("router", "app@file")]),
        CONNECTIONS as f64
    );
    // 5 connections over two servers of weight 1: 3 and 2.
    let per: Vec<f64> = [e1, e2]
        .iter()
        .map(|e| {
            m.get(
                "tagway_server_connections_total",
                &[("service", "app@file"), ("server", &e.to_string())],
            )
        })
        .collect();
    assert_eq!(per.iter().sum::<f64>(), CONNECTIONS as f64);
    assert!(per.contains(&3.0) && per.contains(&2.0), "{per:?}");
    assert_eq!(
        m.get(
            "tagway_server_dial_errors_total",
            &[
                ("service", "dial@file"),
                ("server", &dead.to_string()),
                ("reason", "refused")
            ]
        ),
        1.0
    );
    assert_eq!(m.sum("tagway_server_dial_errors_total", &[]), 1.0);
    assert_eq!(
        m.get("tagway_config_reloads_total", &[("provider", "file")]),
        1.0
    );
    assert_eq!(m.get("tagway_config_routers", &[("provider", "file")]), 6.0);
    assert_eq!(m.get("tagway_config_applied_total", &[]), 1.0);

    // The access log: one line per connection, the proxied ones with their bytes.
    let expected_lines = accepted.iter().map(|(_, n)| *n as usize).sum::<usize>();
    let mut lines = Vec::new();
    for _ in 0..500 {
        lines = std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= expected_lines {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lines.len(), expected_lines);
    let v: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let proxied: Vec<&Value> = v.iter().filter(|l| l["router"] == "app@file").collect();
    assert_eq!(proxied.len(), CONNECTIONS);
    for l in proxied {
        assert_eq!(l["bytes_to_server"], PAYLOAD);
        assert_eq!(l["bytes_to_client"], PAYLOAD);
        assert_eq!(l["close"], "closed");
    }
    assert_eq!(v.iter().filter(|l| l["close"] == "peek_timeout").count(), 1);

    // A reload of the file shows in the configuration metrics.
    std::fs::write(&dynamic, dynamic_toml(e1, e2, dead, true)).unwrap();
    let mut reloaded = false;
    for _ in 0..1000 {
        let m = Scrape::fetch(admin).await;
        if m.get("tagway_config_reloads_total", &[("provider", "file")]) == 2.0
            && m.get("tagway_config_applied_total", &[]) == 2.0
        {
            assert_eq!(m.get("tagway_config_routers", &[("provider", "file")]), 7.0);
            assert_eq!(
                m.get(
                    "tagway_router_connections_total",
                    &[("router", "extra@file")]
                ),
                0.0
            );
            assert_eq!(
                m.get("tagway_router_connections_total", &[("router", "app@file")]),
                CONNECTIONS as f64,
                "counters survive the reload"
            );
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reloaded, "the file change was not applied within 10 s");
    let routers = get(admin, "/api/tcp/routers/extra@file").await;
    assert_eq!(routers.0, 200, "{}", routers.1);

    // A broken edit is a failed reload, in force until the file loads again.
    std::fs::write(&dynamic, "[tcp.routers.broken\n").unwrap();
    let mut failed = false;
    for _ in 0..1000 {
        let m = Scrape::fetch(admin).await;
        if m.value(
            "tagway_config_reload_failures_total",
            &[("provider", "file")],
        ) == Some(1.0)
        {
            assert_eq!(m.get("tagway_config_errors", &[("provider", "file")]), 1.0);
            assert_eq!(
                m.get("tagway_config_reloads_total", &[("provider", "file")]),
                2.0
            );
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(failed, "the broken edit was not counted within 10 s");
    let (_, errors) = get(admin, "/api/errors").await;
    let errors: Value = serde_json::from_str(&errors).unwrap();
    assert_eq!(errors[0]["stage"], "provider", "{errors}");
    assert_eq!(errors[0]["provider"], "file");
    assert_eq!(
        get(admin, "/ready").await.0,
        200,
        "still ready: the last good configuration runs"
    );
    // Restoring the previous content (no configuration change) clears the error.
    std::fs::write(&dynamic, dynamic_toml(e1, e2, dead, true)).unwrap();
    let mut cleared = false;
    for _ in 0..1000 {
        let (_, body) = get(admin, "/api/errors").await;
        if body == "[]" {
            cleared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cleared, "the provider error was not cleared within 10 s");
}
