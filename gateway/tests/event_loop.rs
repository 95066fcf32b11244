//! The event-loop data path (Linux): which entry points it serves, how a configuration change
//! hands an entry point to tokio's accept loops and back without cutting open connections, and
//! the tokio path still serving plain entry points when the event loops are off.
#![cfg(target_os = "linux")]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tagway_config::Dynamic;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options with the event loops on (whatever `TAGWAY_EVENT_LOOP` says).
fn on() -> Option<tagway::conn::Options> {
    Some(tagway::conn::Options {
        event_loop: true,
        ..Default::default()
    })
}

/// Writes `msg` on `c` and reads its echo (bounded).
async fn echo(c: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    c.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .expect("echo within 5 s")
        .unwrap();
    got
}

/// A plain router on `tcp` to `plain`, and a TLS passthrough router for `one.example` to `tls`.
fn mixed(plain: SocketAddr, tls: SocketAddr) -> Dynamic {
    let mut d = simple(&[(plain, 1)]);
    d.tcp.services.insert("one".into(), lb(&[(tls, 1)]));
    d.tcp.routers.insert(
        "one".into(),
        router("HostSNI(`one.example`)", "one", Some(true)),
    );
    d
}

#[tokio::test]
async fn tls_routes_hand_the_entry_point_to_tokio_and_back_without_cutting_connections() {
    let plain = named_backend("PLAIN").await;
    let echo_addr = echo_backend().await;
    let (c1, k1) = cert(&["one.example"]);
    let tls = tls_backend("ONE", &c1, &k1).await;
    let mut st = static_with(&["tcp", "echo"]);
    st.tcp_servers_transport.termination_delay = tagway_config::Duration::from_secs(10);
    let mut d = simple(&[(plain, 1)]);
    d.tcp.services.insert("e".into(), lb(&[(echo_addr, 1)]));
    let mut echo_router = router("HostSNI(`*`)", "e", None);
    echo_router.entry_points = vec!["echo".into()];
    d.tcp.routers.insert("e".into(), echo_router.clone());
    let mut gw = start_with(st, d, on()).await;
    assert!(gw.handle.served_by_event_loops("tcp"));
    assert!(gw.handle.served_by_event_loops("echo"));
    assert_eq!(read_all(gw.addr()).await, "PLAIN");
    // A connection opened on the event loops, kept open across both switches.
    let mut kept = TcpStream::connect(gw.addrs["echo"]).await.unwrap();
    assert_eq!(echo(&mut kept, b"before").await, b"before");

    // A TLS router: the ClientHello must be peeked, which only the tokio path does.
    let mut d = mixed(plain, tls);
    d.tcp.services.insert("e".into(), lb(&[(echo_addr, 1)]));
    let mut tls_echo = router("HostSNI(`echo.example`)", "e", Some(true));
    tls_echo.entry_points = vec!["echo".into()];
    d.tcp.routers.insert("e-tls".into(), tls_echo);
    d.tcp.routers.insert("e".into(), echo_router.clone());
    gw.reload(d).await;
    assert!(!gw.handle.served_by_event_loops("tcp"));
    assert!(!gw.handle.served_by_event_loops("echo"));
    assert_eq!(tls_read(gw.addr(), &c1, "one.example").await, "ONE");
    // Plaintext on an entry point with TLS routers: routed once its first bytes show no
    // ClientHello.
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
        .await
        .expect("read within 5 s")
        .unwrap();
    assert_eq!(out, "PLAIN");
    assert_eq!(echo(&mut kept, b"during").await, b"during");
    // The client speaks first here: the peek sees no ClientHello and routes it at once.
    let mut on_tokio = TcpStream::connect(gw.addrs["echo"]).await.unwrap();
    assert_eq!(echo(&mut on_tokio, b"tokio").await, b"tokio");

    // Back to plain routes only: the event loops accept again.
    let mut d = simple(&[(plain, 1)]);
    d.tcp.services.insert("e".into(), lb(&[(echo_addr, 1)]));
    d.tcp.routers.insert("e".into(), echo_router);
    gw.reload(d).await;
    assert!(gw.handle.served_by_event_loops("tcp"));
    for _ in 0..20 {
        assert_eq!(read_all(gw.addr()).await, "PLAIN");
    }
    assert_eq!(echo(&mut kept, b"after").await, b"after");
    assert_eq!(echo(&mut on_tokio, b"still").await, b"still");
    // Both ends of each still half-close: the echo's answer, then its end.
    for mut c in [kept, on_tokio] {
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s")
            .unwrap();
        assert!(rest.is_empty());
    }
    let ep = gw.handle.entry_point("tcp").unwrap();
    assert_eq!(
        ep.accepted.load(std::sync::atomic::Ordering::Relaxed),
        23,
        "each connection counted once, whichever path accepted it"
    );
    let echo_ep = gw.handle.entry_point("echo").unwrap();
    assert_eq!(
        echo_ep.accepted.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn a_server_given_by_host_name_keeps_the_entry_point_on_tokio() {
    let plain = named_backend("BYNAME").await;
    let d = simple(&[(plain, 1)]);
    let mut by_name = d.clone();
    let svc = by_name.tcp.services.get_mut("s").unwrap();
    svc.load_balancer.as_mut().unwrap().servers[0].address = format!("localhost:{}", plain.port());
    let mut gw = start_with(static_cfg(), by_name, on()).await;
    // A host name is resolved at every dial, which the event loops do not do.
    assert!(!gw.handle.served_by_event_loops("tcp"));
    assert_eq!(read_all(gw.addr()).await, "BYNAME");
    gw.reload(d).await;
    assert!(gw.handle.served_by_event_loops("tcp"));
    assert_eq!(read_all(gw.addr()).await, "BYNAME");
}

#[tokio::test]
async fn entry_points_with_max_connections_or_proxy_protocol_stay_on_tokio() {
    let plain = named_backend("P").await;
    let mut st = static_with(&["tcp", "limited", "proxied"]);
    st.entry_points.get_mut("limited").unwrap().max_connections = Some(10);
    st.entry_points.get_mut("proxied").unwrap().proxy_protocol =
        Some(tagway_config::InboundProxyProtocol {
            trusted_ips: vec!["10.0.0.0/8".into()],
            ..Default::default()
        });
    let gw = start_with(st, simple(&[(plain, 1)]), on()).await;
    assert!(gw.handle.served_by_event_loops("tcp"));
    assert!(!gw.handle.served_by_event_loops("limited"));
    assert!(!gw.handle.served_by_event_loops("proxied"));
    for ep in ["tcp", "limited", "proxied"] {
        assert_eq!(read_all(gw.addrs[ep]).await, "P", "{ep}");
    }
}

#[tokio::test]
async fn with_the_event_loops_off_tokio_serves_plain_entry_points() {
    // The half-close test of dataplane.rs on the tokio path.
    let addr = answer_after_eof_backend().await;
    let mut st = static_cfg();
    st.tcp_servers_transport.termination_delay = tagway_config::Duration::from_secs(10);
    let opts = tagway::conn::Options {
        event_loop: false,
        ..Default::default()
    };
    let gw = start_with(st, simple(&[(addr, 1)]), Some(opts)).await;
    assert!(!gw.handle.served_by_event_loops("tcp"));
    assert_half_close(gw.addr()).await;
}
