//! Data-plane behaviour through the library API over real sockets on 127.0.0.1.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;
use tagway_config::{
    CertificateEntry, Dynamic, FileOrContent, HealthCheck, InFlightConn, IpAllowList, Middleware,
    Router,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[tokio::test]
async fn weighted_three_to_one_is_exact_and_smooth() {
    let a = named_backend("A").await;
    let b = named_backend("B").await;
    let z = named_backend("Z").await;
    let gw = start(static_cfg(), simple(&[(a, 3), (b, 1), (z, 0)])).await;
    let mut seq = String::new();
    for _ in 0..400 {
        seq.push_str(&read_all(gw.addr()).await);
    }
    let na = seq.matches('A').count();
    let nb = seq.matches('B').count();
    assert_eq!(seq.len(), 400, "{seq}");
    assert!(!seq.contains('Z'), "weight 0 was picked");
    assert!((292..=308).contains(&na), "A = {na}");
    assert!((92..=108).contains(&nb), "B = {nb}");
    // Smooth: never more than 3 A in a row, B never twice in a row.
    assert!(!seq.contains("AAAA") && !seq.contains("BB"), "{seq}");
}

#[tokio::test]
async fn half_close_client_reads_whole_answer() {
    // The backend reads until EOF, then answers 1 MiB and closes.
    let addr = answer_after_eof_backend().await;
    let mut st = static_cfg();
    st.tcp_servers_transport.termination_delay = tagway_config::Duration::from_secs(10);
    let gw = start(st, simple(&[(addr, 1)])).await;
    assert_half_close(gw.addr()).await;
}

#[tokio::test]
async fn termination_delay_cuts_a_peer_that_never_closes() {
    // The backend never closes and never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let mut st = static_cfg();
    st.tcp_servers_transport.termination_delay = tagway_config::Duration::from_millis(300);
    let gw = start(st, simple(&[(addr, 1)])).await;
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("gateway closed the connection");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[tokio::test]
async fn server_first_backend_speaks_first() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 smtp ready\r\n").await.unwrap();
                let mut b = [0u8; 64];
                let n = s.read(&mut b).await.unwrap();
                s.write_all(&b[..n]).await.unwrap();
            });
        }
    });
    let gw = start(static_cfg(), simple(&[(addr, 1)])).await;
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    let mut banner = [0u8; 16];
    // The client sends nothing: the banner must arrive anyway (no peek on this entry point).
    tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"220 smtp ready\r\n");
    c.write_all(b"HELO").await.unwrap();
    let mut e = [0u8; 4];
    c.read_exact(&mut e).await.unwrap();
    assert_eq!(&e, b"HELO");
}

fn sni_config(one: SocketAddr, two: SocketAddr, passthrough: bool) -> Dynamic {
    let mut d = Dynamic::default();
    d.tcp.services.insert("one".into(), lb(&[(one, 1)]));
    d.tcp.services.insert("two".into(), lb(&[(two, 1)]));
    d.tcp.routers.insert(
        "one".into(),
        router("HostSNI(`one.example`)", "one", Some(passthrough)),
    );
    d.tcp.routers.insert(
        "two".into(),
        router("HostSNI(`two.example`)", "two", Some(passthrough)),
    );
    d
}

#[tokio::test]
async fn sni_routing_with_passthrough() {
    let (c1, k1) = cert(&["one.example"]);
    let (c2, k2) = cert(&["two.example"]);
    let one = tls_backend("ONE", &c1, &k1).await;
    let two = tls_backend("TWO", &c2, &k2).await;
    let gw = start(static_cfg(), sni_config(one, two, true)).await;
    assert_eq!(tls_read(gw.addr(), &c1, "one.example").await, "ONE");
    assert_eq!(tls_read(gw.addr(), &c2, "two.example").await, "TWO");
    // Plaintext on an entry point with only TLS routers: closed and counted.
    assert_eq!(read_all_after_write(gw.addr(), b"hello").await, "");
    let ep = gw.handle.entry_point("tcp").unwrap();
    assert_eq!(ep.unrouted.load(Ordering::Relaxed), 1);
}

/// ``ALPN(`h2`)`` routes on the protocols the ClientHello offers; the longer rule wins.
#[tokio::test]
async fn alpn_routing_with_passthrough() {
    let (c1, k1) = cert(&["one.example"]);
    let one = tls_backend("ONE", &c1, &k1).await;
    let h2 = tls_backend("H2", &c1, &k1).await;
    let mut d = sni_config(one, one, true);
    d.tcp.services.insert("h2".into(), lb(&[(h2, 1)]));
    d.tcp.routers.insert(
        "h2".into(),
        router("HostSNI(`one.example`) && ALPN(`h2`)", "h2", Some(true)),
    );
    let gw = start(static_cfg(), d).await;
    assert_eq!(
        tls_read_alpn(gw.addr(), &c1, "one.example", &[b"h2"]).await,
        "H2"
    );
    assert_eq!(
        tls_read_alpn(gw.addr(), &c1, "one.example", &[b"http/1.1", b"h2"]).await,
        "H2"
    );
    assert_eq!(
        tls_read_alpn(gw.addr(), &c1, "one.example", &[b"http/1.1"]).await,
        "ONE"
    );
    assert_eq!(tls_read(gw.addr(), &c1, "one.example").await, "ONE");
}

async fn read_all_after_write(addr: SocketAddr, data: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(data).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn sni_routing_with_termination() {
    let one = named_backend("ONE").await;
    let two = named_backend("TWO").await;
    let (c1, k1) = cert(&["one.example"]);
    let (c2, k2) = cert(&["two.example"]);
    let mut d = sni_config(one, two, false);
    for (c, k) in [(&c1, &k1), (&c2, &k2)] {
        d.tls.certificates.push(CertificateEntry {
            cert_file: FileOrContent(c.clone()),
            key_file: FileOrContent(k.clone()),
            stores: vec![],
        });
    }
    let gw = start(static_cfg(), d).await;
    // Each name gets its own certificate (the client trusts only that one).
    assert_eq!(tls_read(gw.addr(), &c1, "one.example").await, "ONE");
    assert_eq!(tls_read(gw.addr(), &c2, "two.example").await, "TWO");
}

#[tokio::test]
async fn fragmented_client_hello_is_reassembled() {
    let (c1, k1) = cert(&["one.example"]);
    let (c2, k2) = cert(&["two.example"]);
    let one = tls_backend("ONE", &c1, &k1).await;
    let two = tls_backend("TWO", &c2, &k2).await;
    let gw = start(static_cfg(), sni_config(one, two, true)).await;
    // A rustls client whose first flight is re-framed into 1-byte records sent one by one.
    let (mut app, proxy_side) = tokio::io::duplex(1 << 16);
    let gw_addr = gw.addr();
    let relay = tokio::spawn(async move {
        let mut up = TcpStream::connect(gw_addr).await.unwrap();
        up.set_nodelay(true).unwrap();
        let (mut pr, mut pw) = tokio::io::split(proxy_side);
        // Read the ClientHello record from the client.
        let mut hdr = [0u8; 5];
        pr.read_exact(&mut hdr).await.unwrap();
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len];
        pr.read_exact(&mut body).await.unwrap();
        for b in body {
            up.write_all(&[22, 3, 1, 0, 1, b]).await.unwrap();
            up.flush().await.unwrap();
        }
        let (mut ur, mut uw) = up.into_split();
        let a = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut pr, &mut uw).await;
            let _ = uw.shutdown().await;
        });
        let _ = tokio::io::copy(&mut ur, &mut pw).await;
        let _ = pw.shutdown().await;
        a.abort();
    });
    let sn = rustls_pki_types::ServerName::try_from("two.example").unwrap();
    let mut t = tls_client(&c2).connect(sn, &mut app).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out)).await;
    assert_eq!(out, b"TWO");
    drop(t);
    drop(app);
    relay.abort();
}

#[tokio::test]
async fn reload_removing_a_route_keeps_established_connection() {
    let echo = echo_backend().await;
    let mut gw = start(static_cfg(), simple(&[(echo, 1)])).await;
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).await.unwrap();
    gw.reload(Dynamic::default()).await;
    // New connections are not routed any more …
    assert_eq!(read_all(gw.addr()).await, "");
    // … the established one keeps working.
    c.write_all(b"pong").await.unwrap();
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"pong");
    // Putting the route back serves new connections again, on the same listener.
    gw.reload(simple(&[(echo, 1)])).await;
    let mut c2 = TcpStream::connect(gw.addr()).await.unwrap();
    c2.write_all(b"back").await.unwrap();
    c2.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"back");
}

#[tokio::test]
async fn shutdown_drains_open_connection() {
    let echo = echo_backend().await;
    let mut st = static_cfg();
    st.shutdown.grace_period = tagway_config::Duration::from_secs(10);
    let mut gw = start(st, simple(&[(echo, 1)])).await;
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"one").await.unwrap();
    let mut b = [0u8; 3];
    c.read_exact(&mut b).await.unwrap();
    gw.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new connections …
    assert!(TcpStream::connect(gw.addr()).await.is_err() || read_all(gw.addr()).await.is_empty());
    // … the open one still works, and the gateway ends once it closes.
    c.write_all(b"two").await.unwrap();
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"two");
    assert!(!gw.task.is_finished());
    drop(c);
    tokio::time::timeout(Duration::from_secs(5), &mut gw.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_closes_after_grace_period() {
    let echo = echo_backend().await;
    let mut st = static_cfg();
    st.shutdown.grace_period = tagway_config::Duration::from_millis(200);
    let mut gw = start(st, simple(&[(echo, 1)])).await;
    let mut c = TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"one").await.unwrap();
    let mut b = [0u8; 3];
    c.read_exact(&mut b).await.unwrap();
    gw.shutdown();
    tokio::time::timeout(Duration::from_secs(5), &mut gw.task)
        .await
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
}

#[tokio::test]
async fn health_check_removes_and_readds_a_backend() {
    let a = named_backend("A").await;
    // B: a port we can close and reopen.
    let lb_ = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = lb_.local_addr().unwrap();
    drop(lb_);
    let mut d = simple(&[(a, 1), (b, 1)]);
    d.tcp
        .services
        .get_mut("s")
        .unwrap()
        .load_balancer
        .as_mut()
        .unwrap()
        .health_check = Some(HealthCheck {
        interval: Some(tagway_config::Duration::from_millis(100)),
        timeout: Some(tagway_config::Duration::from_millis(500)),
        ..Default::default()
    });
    let gw = start(static_cfg(), d).await;
    let server_b = || {
        gw.handle
            .tables()
            .servers()
            .find(|(k, _)| k.1 == b.to_string())
            .map(|(_, s)| s.clone())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while server_b().is_healthy() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!server_b().is_healthy());
    for _ in 0..10 {
        assert_eq!(read_all(gw.addr()).await, "A");
    }
    // B comes back.
    let l = TcpListener::bind(b).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"B").await;
        }
    });
    while !server_b().is_healthy() && Instant::now() < deadline + Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = String::new();
    for _ in 0..10 {
        seen.push_str(&read_all(gw.addr()).await);
    }
    assert!(seen.contains('B') && seen.contains('A'), "{seen}");
}

/// Dials to `server` refused so far.
fn refused_dials(gw: &Gw, server: SocketAddr) -> u64 {
    let t = gw.handle.tables();
    let (_, s) = t
        .servers()
        .find(|(k, _)| k.1 == server.to_string())
        .unwrap();
    s.counters
        .dial_errors(tagway::dial::DialErrorReason::Refused)
}

/// Connections of service `s` closed for want of a server.
fn no_server(gw: &Gw) -> u64 {
    gw.handle.tables().services["s"]
        .service
        .counters
        .no_server
        .load(Ordering::Relaxed)
}

#[tokio::test]
async fn dial_failure_retries_next_server() {
    let a = named_backend("A").await;
    let dead_addr = closed_port().await;
    let gw = start(static_cfg(), simple(&[(dead_addr, 5), (a, 1)])).await;
    for _ in 0..5 {
        assert_eq!(read_all(gw.addr()).await, "A");
    }
    let refused = refused_dials(&gw, dead_addr);
    // One failure, then the server is held out.
    assert_eq!(refused, 1);
}

/// `loadBalancer.holdOut = "0s"`: a server whose dial failed stays in the rotation, so every
/// turn of the round-robin dials it again (against once with the default hold-out, above).
#[tokio::test]
async fn hold_out_zero_keeps_a_failed_server_in_the_rotation() {
    let a = named_backend("A").await;
    let dead_addr = closed_port().await;
    let mut st = static_cfg();
    st.load_balancer.hold_out = tagway_config::Duration::ZERO;
    let gw = start(st, simple(&[(dead_addr, 1), (a, 1)])).await;
    for _ in 0..6 {
        assert_eq!(read_all(gw.addr()).await, "A");
    }
    let refused = refused_dials(&gw, dead_addr);
    assert!(refused >= 3, "dialled {refused} times in 6 connections");
}

/// `loadBalancer.dialAttempts = 1`: a failed dial is not retried; the connection is closed and
/// counted as having no server.
#[tokio::test]
async fn dial_attempts_one_closes_on_the_first_failure() {
    let a = named_backend("A").await;
    let dead_addr = closed_port().await;
    let mut st = static_cfg();
    st.load_balancer.hold_out = tagway_config::Duration::ZERO;
    st.load_balancer.dial_attempts = 1;
    let gw = start(st, simple(&[(dead_addr, 1), (a, 1)])).await;
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(read_all(gw.addr()).await);
    }
    let closed = answers.iter().filter(|a| a.is_empty()).count();
    assert!(
        closed >= 2 && answers.iter().all(|a| a.is_empty() || a == "A"),
        "{answers:?}"
    );
    assert_eq!(no_server(&gw), closed as u64);
}

#[tokio::test]
async fn no_server_closes_and_counts() {
    let dead_addr = closed_port().await;
    let gw = start(static_cfg(), simple(&[(dead_addr, 1)])).await;
    assert_eq!(read_all(gw.addr()).await, "");
    assert_eq!(no_server(&gw), 1);
}

async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

async fn read_to_end(mut s: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn ip_allow_list_refuses_a_client() {
    let a = named_backend("A").await;
    let mut d = simple(&[(a, 1)]);
    d.tcp.middlewares.insert(
        "allow".into(),
        Middleware {
            ip_allow_list: Some(IpAllowList {
                source_range: vec!["127.0.0.1/32".into()],
            }),
            in_flight_conn: None,
        },
    );
    d.tcp.routers.get_mut("r").unwrap().middlewares = vec!["allow".into()];
    let gw = start(static_cfg(), d).await;
    assert_eq!(
        read_to_end(connect_from("127.0.0.1", gw.addr()).await).await,
        "A"
    );
    assert_eq!(
        read_to_end(connect_from("127.0.0.2", gw.addr()).await).await,
        ""
    );
    let ep = gw.handle.entry_point("tcp").unwrap();
    assert_eq!(ep.refused.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn in_flight_conn_limits_per_client() {
    let echo = echo_backend().await;
    let mut d = simple(&[(echo, 1)]);
    d.tcp.middlewares.insert(
        "one".into(),
        Middleware {
            ip_allow_list: None,
            in_flight_conn: Some(InFlightConn { amount: 1 }),
        },
    );
    d.tcp.routers.get_mut("r").unwrap().middlewares = vec!["one".into()];
    let gw = start(static_cfg(), d).await;
    let mut first = TcpStream::connect(gw.addr()).await.unwrap();
    first.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).await.unwrap();
    assert_eq!(
        read_to_end(connect_from("127.0.0.1", gw.addr()).await).await,
        ""
    );
    let mut other = connect_from("127.0.0.3", gw.addr()).await;
    other.write_all(b"b").await.unwrap();
    other.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b");
    drop(first);
}

#[tokio::test]
async fn inbound_proxy_protocol_trusted_and_untrusted() {
    // The backend reports the client address the router matched on: a ClientIP router sends
    // 192.0.2.0/24 to "PROXIED", everything else to "DIRECT".
    let proxied = named_backend("PROXIED").await;
    let direct = named_backend("DIRECT").await;
    let mut st = static_cfg();
    st.entry_points.get_mut("tcp").unwrap().proxy_protocol =
        Some(tagway_config::InboundProxyProtocol {
            trusted_ips: vec!["127.0.0.1".into()],
            insecure: false,
        });
    let mut d = Dynamic::default();
    d.tcp.services.insert("p".into(), lb(&[(proxied, 1)]));
    d.tcp.services.insert("d".into(), lb(&[(direct, 1)]));
    d.tcp.routers.insert(
        "p".into(),
        Router {
            rule: "ClientIP(`192.0.2.0/24`)".into(),
            service: "p".into(),
            priority: Some(10),
            ..Default::default()
        },
    );
    d.tcp
        .routers
        .insert("d".into(), router("HostSNI(`*`)", "d", None));
    let gw = start(st, d).await;
    // Trusted peer with a v1 header.
    let mut s = connect_from("127.0.0.1", gw.addr()).await;
    s.write_all(b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 80\r\n")
        .await
        .unwrap();
    assert_eq!(read_to_end(s).await, "PROXIED");
    // Trusted peer with a v2 header.
    let mut s = connect_from("127.0.0.1", gw.addr()).await;
    let src: SocketAddr = "192.0.2.10:4444".parse().unwrap();
    let dst: SocketAddr = "127.0.0.1:80".parse().unwrap();
    let hdr = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap();
    s.write_all(&hdr).await.unwrap();
    assert_eq!(read_to_end(s).await, "PROXIED");
    // Trusted peer without a header: its own address.
    let mut s = connect_from("127.0.0.1", gw.addr()).await;
    s.write_all(b"hello").await.unwrap();
    assert_eq!(read_to_end(s).await, "DIRECT");
}

#[tokio::test]
async fn inbound_proxy_protocol_untrusted_is_refused() {
    let a = named_backend("A").await;
    let (c1, k1) = cert(&["one.example"]);
    let tls_b = tls_backend("ONE", &c1, &k1).await;
    let mut st = static_cfg();
    st.entry_points.get_mut("tcp").unwrap().proxy_protocol =
        Some(tagway_config::InboundProxyProtocol {
            trusted_ips: vec!["127.0.0.1".into()],
            insecure: false,
        });
    let mut d = simple(&[(a, 1)]);
    d.tcp.services.insert("one".into(), lb(&[(tls_b, 1)]));
    d.tcp.routers.insert(
        "one".into(),
        router("HostSNI(`one.example`)", "one", Some(true)),
    );
    let gw = start(st, d).await;
    let mut s = connect_from("127.0.0.2", gw.addr()).await;
    s.write_all(b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 80\r\n")
        .await
        .unwrap();
    assert_eq!(read_to_end(s).await, "");
    let ep = gw.handle.entry_point("tcp").unwrap();
    assert_eq!(ep.proxy_protocol_errors.load(Ordering::Relaxed), 1);
    // Without a header the untrusted peer is served as usual.
    let mut s = connect_from("127.0.0.2", gw.addr()).await;
    s.write_all(b"plain").await.unwrap();
    assert_eq!(read_to_end(s).await, "A");
    // A header sent in pieces, the first shorter than any signature, is refused all the same:
    // the server-first backend A never answers.
    for first in [&b"P"[..], b"PRO", b"\r\n\r"] {
        let mut s = connect_from("127.0.0.2", gw.addr()).await;
        s.set_nodelay(true).unwrap();
        s.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rest: &[u8] = if first.starts_with(b"P") {
            &b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 80\r\n"[first.len()..]
        } else {
            &b"\r\n\r\n\x00\r\nQUIT\n"[first.len()..]
        };
        let _ = s.write_all(rest).await;
        assert_eq!(read_to_end(s).await, "", "first piece {first:?}");
    }
    assert_eq!(ep.proxy_protocol_errors.load(Ordering::Relaxed), 4);
    // Plain data that starts like a signature and then differs is served.
    let mut s = connect_from("127.0.0.2", gw.addr()).await;
    s.write_all(b"PR").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"INT").await.unwrap();
    assert_eq!(read_to_end(s).await, "A");
}
