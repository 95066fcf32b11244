//! Live state of the data plane through the library API and the admin listener: byte counters
//! of connections that are still open, and `/ready` while draining.

mod obs_support;

use std::time::Duration;

use obs_support::*;
use tagway::observability::Observability;
use tagway_config::Dynamic;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn one_route(backend: std::net::SocketAddr) -> Dynamic {
    let mut d = Dynamic::default();
    d.tcp
        .services
        .insert("app@file".into(), lb(&[(backend, 1)]));
    d.tcp
        .routers
        .insert("app@file".into(), router("tcp", "HostSNI(`*`)", "app@file"));
    d
}

/// Scrapes until the service's byte counters reach `(to_backend, to_client)` (bounded).
async fn wait_bytes(admin: std::net::SocketAddr, to_backend: f64, to_client: f64) -> Scrape {
    let mut m = Scrape::fetch(admin).await;
    for _ in 0..500 {
        let up = m.value(
            "tagway_service_bytes_total",
            &[("service", "app@file"), ("direction", "to_server")],
        );
        let down = m.value(
            "tagway_service_bytes_total",
            &[("service", "app@file"), ("direction", "to_client")],
        );
        if up == Some(to_backend) && down == Some(to_client) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = Scrape::fetch(admin).await;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_an_open_connection_show_before_it_closes() {
    let st = static_with(&["tcp"]);
    let obs = Observability::new(&st).unwrap();
    let echo = echo_backend().await;
    let gw = start_with(st, obs.clone(), None, Some(one_route(echo))).await;
    wait_until(|| obs.is_ready()).await;
    let mut c = TcpStream::connect(gw.addr("tcp")).await.unwrap();
    // Small messages (buffered path), then a bulk transfer (splice on Linux).
    let mut total = 0usize;
    for i in 0..10u8 {
        let msg = vec![i; 100];
        c.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
        total += msg.len();
    }
    let m = wait_bytes(gw.admin, total as f64, total as f64).await;
    let labels = [("service", "app@file"), ("direction", "to_client")];
    assert_eq!(m.get("tagway_service_bytes_total", &labels), total as f64);
    let bulk: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = c.into_split();
    let sent = bulk.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w
    });
    let mut back = vec![0u8; bulk.len()];
    tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert!(back == bulk);
    let w = writer.await.unwrap();
    total += bulk.len();
    // Still open: the counters already hold every byte, each way, on router, service and server.
    let m = wait_bytes(gw.admin, total as f64, total as f64).await;
    for dir in ["to_server", "to_client"] {
        assert_eq!(
            m.get(
                "tagway_service_bytes_total",
                &[("service", "app@file"), ("direction", dir)]
            ),
            total as f64,
            "{dir}"
        );
        assert_eq!(
            m.get(
                "tagway_router_bytes_total",
                &[("router", "app@file"), ("direction", dir)]
            ),
            total as f64,
            "{dir}"
        );
    }
    assert_eq!(m.sum("tagway_entrypoint_open_connections", &[]), 1.0);
    // Closing adds nothing twice.
    drop(w);
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    let mut m = Scrape::fetch(gw.admin).await;
    for _ in 0..500 {
        if m.sum("tagway_entrypoint_open_connections", &[]) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = Scrape::fetch(gw.admin).await;
    }
    assert_eq!(m.sum("tagway_entrypoint_open_connections", &[]), 0.0);
    assert_eq!(m.get("tagway_service_bytes_total", &labels), total as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_while_draining() {
    let mut st = static_with(&["tcp"]);
    st.shutdown.grace_period = tagway_config::Duration::from_millis(10_000);
    let obs = Observability::new(&st).unwrap();
    let echo = echo_backend().await;
    let mut gw = start_with(st, obs.clone(), None, Some(one_route(echo))).await;
    wait_until(|| obs.is_ready()).await;
    assert_eq!(get(gw.admin, "/ready").await.0, 200);
    // An open connection keeps the gateway draining after the shutdown signal.
    let mut c = TcpStream::connect(gw.addr("tcp")).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).await.unwrap();
    gw.shutdown();
    wait_until(|| gw.handle.is_draining()).await;
    let (status, _, body) = get(gw.admin, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    // Draining: the open connection still works.
    c.write_all(b"pong").await.unwrap();
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"pong");
    assert_eq!(get(gw.admin, "/ping").await.0, 200);
    drop(c);
    tokio::time::timeout(Duration::from_secs(10), &mut gw.task)
        .await
        .expect("drained within 10 s")
        .unwrap();
}
