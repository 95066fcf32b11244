//! End-to-end tests of the data plane: the real `tagway` binary (`tagway run --config`) with a
//! file-provider configuration, real backends and clients on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tagway_integration::e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn one_route(servers: &[(SocketAddr, i64)]) -> String {
    format!(
        "{}{}",
        router_toml("r", "HostSNI(`*`)", "s", ""),
        service_toml("s", servers)
    )
}

#[tokio::test]
async fn weighted_three_to_one_smooth_and_weight_zero_never_chosen() -> anyhow::Result<()> {
    let a = named_backend("A").await?;
    let b = named_backend("B").await?;
    let z = named_backend("Z").await?;
    let gw = Gateway::start(&["tcp"], "", &one_route(&[(a, 3), (b, 1), (z, 0)]))?;
    let mut seq = String::new();
    for _ in 0..400 {
        seq.push_str(&String::from_utf8(
            exchange(gw.addr("tcp"), None, b"").await?,
        )?);
    }
    let na = seq.matches('A').count();
    let nb = seq.matches('B').count();
    assert_eq!(seq.len(), 400, "{seq}");
    assert!(!seq.contains('Z'), "weight 0 was chosen: {seq}");
    // 3:1 within ±2% of the 400 connections.
    assert!((292..=308).contains(&na), "A = {na}");
    assert!((92..=108).contains(&nb), "B = {nb}");
    // Smooth: no long bursts of one server.
    assert!(!seq.contains("AAAA") && !seq.contains("BB"), "{seq}");
    Ok(())
}

#[tokio::test]
async fn half_close_client_reads_the_whole_answer() -> anyhow::Result<()> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let mut q = Vec::new();
            let _ = s.read_to_end(&mut q).await;
            let answer: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
            let _ = s.write_all(&q).await;
            let _ = s.write_all(&answer).await;
            let _ = s.shutdown().await;
        }
    });
    // The answer must come within terminationDelay of the client's FIN (Traefik's semantics);
    // a generous one keeps the test independent of the machine's load.
    let gw = Gateway::start(
        &["tcp"],
        "[tcpServersTransport]\nterminationDelay = \"10s\"\n",
        &one_route(&[(addr, 1)]),
    )?;
    let mut c = TcpStream::connect(gw.addr("tcp")).await?;
    c.write_all(b"question").await?;
    c.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut got)).await??;
    assert!(
        got.len() >= 8,
        "got {} bytes; log:\n{}",
        got.len(),
        gw.log_text()
    );
    assert_eq!(&got[..8], b"question");
    assert_eq!(got.len(), 8 + (1 << 20));
    assert!(
        got[8..]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 253) as u8)
    );
    Ok(())
}

#[tokio::test]
async fn termination_delay_cuts_a_peer_that_never_closes() -> anyhow::Result<()> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let gw = Gateway::start(
        &["tcp"],
        "[tcpServersTransport]\nterminationDelay = \"400ms\"\n",
        &one_route(&[(addr, 1)]),
    )?;
    let mut c = TcpStream::connect(gw.addr("tcp")).await?;
    c.write_all(b"x").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    c.shutdown().await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut rest)).await?;
    let took = start.elapsed();
    // Cut after the delay, with a generous tolerance for shared CI cores.
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn server_first_backend_speaks_first() -> anyhow::Result<()> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 smtp ready\r\n").await;
                let mut b = [0u8; 64];
                if let Ok(n) = s.read(&mut b).await {
                    let _ = s.write_all(&b[..n]).await;
                }
            });
        }
    });
    let gw = Gateway::start(&["tcp"], "", &one_route(&[(addr, 1)]))?;
    let mut c = TcpStream::connect(gw.addr("tcp")).await?;
    let mut banner = [0u8; 16];
    // The client sends nothing: the banner arrives anyway.
    tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut banner)).await??;
    assert_eq!(&banner, b"220 smtp ready\r\n");
    c.write_all(b"HELO").await?;
    let mut e = [0u8; 4];
    c.read_exact(&mut e).await?;
    assert_eq!(&e, b"HELO");
    Ok(())
}

fn sni_routes(one: SocketAddr, two: SocketAddr, tls_section: &str) -> String {
    format!(
        "{}{}{}{}",
        router_toml("one", "HostSNI(`one.example`)", "one", tls_section),
        router_toml("two", "HostSNI(`two.example`)", "two", tls_section),
        service_toml("one", &[(one, 1)]),
        service_toml("two", &[(two, 1)]),
    )
}

#[tokio::test]
async fn sni_routing_with_passthrough() -> anyhow::Result<()> {
    let (c1, k1) = cert(&["one.example"])?;
    let (c2, k2) = cert(&["two.example"])?;
    let one = tls_backend("ONE", &c1, &k1).await?;
    let two = tls_backend("TWO", &c2, &k2).await?;
    let tls = "[tcp.routers.NAME.tls]\npassthrough = true\n";
    let mut cfg = String::new();
    cfg.push_str(&router_toml(
        "one",
        "HostSNI(`one.example`)",
        "one",
        &tls.replace("NAME", "one"),
    ));
    cfg.push_str(&router_toml(
        "two",
        "HostSNI(`two.example`)",
        "two",
        &tls.replace("NAME", "two"),
    ));
    cfg.push_str(&service_toml("one", &[(one, 1)]));
    cfg.push_str(&service_toml("two", &[(two, 1)]));
    let gw = Gateway::start(&["tcp"], "", &cfg)?;
    // The backends' own certificates reach the client: the stream is untouched.
    assert_eq!(
        tls_exchange(gw.addr("tcp"), &c1, "one.example").await?,
        b"ONE"
    );
    assert_eq!(
        tls_exchange(gw.addr("tcp"), &c2, "two.example").await?,
        b"TWO"
    );
    // Plaintext on an entry point with only TLS routers is closed.
    assert_eq!(exchange(gw.addr("tcp"), None, b"hello").await?, b"");
    Ok(())
}

#[tokio::test]
async fn sni_routing_with_termination() -> anyhow::Result<()> {
    let one = named_backend("ONE").await?;
    let two = named_backend("TWO").await?;
    let (c1, k1) = cert(&["one.example"])?;
    let (c2, k2) = cert(&["two.example"])?;
    let mut cfg = String::new();
    cfg.push_str(&router_toml(
        "one",
        "HostSNI(`one.example`)",
        "one",
        "[tcp.routers.one.tls]\n",
    ));
    cfg.push_str(&router_toml(
        "two",
        "HostSNI(`two.example`)",
        "two",
        "[tcp.routers.two.tls]\n",
    ));
    cfg.push_str(&service_toml("one", &[(one, 1)]));
    cfg.push_str(&service_toml("two", &[(two, 1)]));
    for (c, k) in [(&c1, &k1), (&c2, &k2)] {
        cfg.push_str(&format!(
            "[[tls.certificates]]\ncertFile = {}\nkeyFile = {}\n",
            toml_pem(c),
            toml_pem(k)
        ));
    }
    let gw = Gateway::start(&["tcp"], "", &cfg)?;
    // Each client trusts only its name's certificate: SNI selected it.
    assert_eq!(
        tls_exchange(gw.addr("tcp"), &c1, "one.example").await?,
        b"ONE"
    );
    assert_eq!(
        tls_exchange(gw.addr("tcp"), &c2, "two.example").await?,
        b"TWO"
    );
    Ok(())
}

#[tokio::test]
async fn fragmented_client_hello_is_reassembled() -> anyhow::Result<()> {
    let (c1, k1) = cert(&["one.example"])?;
    let (c2, k2) = cert(&["two.example"])?;
    let one = tls_backend("ONE", &c1, &k1).await?;
    let two = tls_backend("TWO", &c2, &k2).await?;
    let cfg = sni_routes(one, two, "")
        .replace(
            "service = \"one\"\n",
            "service = \"one\"\n[tcp.routers.one.tls]\npassthrough = true\n",
        )
        .replace(
            "service = \"two\"\n",
            "service = \"two\"\n[tcp.routers.two.tls]\npassthrough = true\n",
        );
    let gw = Gateway::start(&["tcp"], "", &cfg)?;
    // The client's first flight is re-framed into 1-byte TLS records, each written separately.
    let (mut app, relay_side) = tokio::io::duplex(1 << 16);
    let up_addr = gw.addr("tcp");
    let relay = tokio::spawn(async move {
        let mut up = TcpStream::connect(up_addr).await?;
        up.set_nodelay(true)?;
        let (mut rr, mut rw) = tokio::io::split(relay_side);
        let mut hdr = [0u8; 5];
        rr.read_exact(&mut hdr).await?;
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len];
        rr.read_exact(&mut body).await?;
        for b in body {
            up.write_all(&[22, 3, 1, 0, 1, b]).await?;
            up.flush().await?;
        }
        let (mut ur, mut uw) = up.into_split();
        let a = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut rr, &mut uw).await;
            let _ = uw.shutdown().await;
        });
        let _ = tokio::io::copy(&mut ur, &mut rw).await;
        let _ = rw.shutdown().await;
        a.abort();
        anyhow::Ok(())
    });
    let sn = rustls_pki_types::ServerName::try_from("two.example")?;
    let mut t = tokio::time::timeout(WAIT, tls_connector(&c2)?.connect(sn, &mut app)).await??;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, t.read_to_end(&mut out)).await?;
    assert_eq!(out, b"TWO");
    drop(t);
    drop(app);
    relay.abort();
    Ok(())
}

#[tokio::test]
async fn reload_removing_the_route_keeps_the_open_connection() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let other = named_backend("OTHER").await?;
    let gw = Gateway::start(&["tcp"], "", &one_route(&[(echo, 1)]))?;
    let mut c = TcpStream::connect(gw.addr("tcp")).await?;
    c.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    c.read_exact(&mut b).await?;
    // The route now goes elsewhere: the old service and server are gone from the tables.
    gw.reload(&format!(
        "{}{}",
        router_toml("r2", "HostSNI(`*`)", "s2", ""),
        service_toml("s2", &[(other, 1)])
    ))
    .await?;
    assert_eq!(exchange(gw.addr("tcp"), None, b"").await?, b"OTHER");
    // The established connection keeps flowing to its removed server.
    c.write_all(b"pong").await?;
    c.read_exact(&mut b).await?;
    assert_eq!(&b, b"pong");
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_an_open_connection() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let mut gw = Gateway::start(
        &["tcp"],
        "[shutdown]\ngracePeriod = \"10s\"\n",
        &one_route(&[(echo, 1)]),
    )?;
    let mut c = TcpStream::connect(gw.addr("tcp")).await?;
    c.write_all(b"one").await?;
    let mut b = [0u8; 3];
    c.read_exact(&mut b).await?;
    gw.signal("-TERM")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still draining: the open connection works, the process runs.
    c.write_all(b"two").await?;
    c.read_exact(&mut b).await?;
    assert_eq!(&b, b"two");
    assert!(gw.is_running());
    // New connections are refused.
    assert!(TcpStream::connect(gw.addr("tcp")).await.is_err());
    drop(c);
    assert_eq!(gw.wait_exit(WAIT).await?, Some(0));
    Ok(())
}

#[tokio::test]
async fn health_check_removes_a_dead_backend_and_readds_it() -> anyhow::Result<()> {
    let a = named_backend("A").await?;
    let b_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let cfg = format!(
        "{}[tcp.services.s.loadBalancer.healthCheck]\ninterval = \"100ms\"\ntimeout = \"500ms\"\n",
        one_route(&[(a, 1), (b_addr, 1)])
    );
    // No passive hold-out and no retry: without the health check, every connection that picks
    // B would be closed unanswered, so "AAAAAA" shows the check took B out of the rotation.
    let gw = Gateway::start(
        &["tcp"],
        "[loadBalancer]\nholdOut = \"0s\"\ndialAttempts = 1\n",
        &cfg,
    )?;
    // B is down: after a check or two every connection goes to A.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut seen = String::new();
        for _ in 0..6 {
            seen.push_str(&String::from_utf8(
                exchange(gw.addr("tcp"), None, b"").await?,
            )?);
        }
        if seen == "AAAAAA" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never left the rotation: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // B comes back and is picked again.
    let l = TcpListener::bind(b_addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"B").await;
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let mut seen = String::new();
        for _ in 0..4 {
            seen.push_str(&String::from_utf8(
                exchange(gw.addr("tcp"), None, b"").await?,
            )?);
        }
        if seen.contains('B') {
            break;
        }
        assert!(Instant::now() < deadline, "B never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gw.log_text();
    assert!(
        log.contains("health check fails: server out of rotation")
            && log.contains("health check passes: server back in rotation"),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn dial_failure_is_retried_on_the_next_server() -> anyhow::Result<()> {
    let a = named_backend("A").await?;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    // The dead server has the larger weight: it is picked first, fails, and A answers.
    let gw = Gateway::start(&["tcp"], "", &one_route(&[(dead, 5), (a, 1)]))?;
    for _ in 0..5 {
        assert_eq!(exchange(gw.addr("tcp"), None, b"").await?, b"A");
    }
    assert!(gw.log_text().contains("dial failed"), "{}", gw.log_text());
    Ok(())
}

#[tokio::test]
async fn ip_allow_list_refuses_a_client() -> anyhow::Result<()> {
    let a = named_backend("A").await?;
    let cfg = format!(
        "{}{}[tcp.middlewares.allow.ipAllowList]\nsourceRange = [\"127.0.0.1/32\"]\n",
        router_toml("r", "HostSNI(`*`)", "s", "middlewares = [\"allow\"]"),
        service_toml("s", &[(a, 1)])
    );
    let gw = Gateway::start(&["tcp"], "", &cfg)?;
    assert_eq!(
        exchange(gw.addr("tcp"), Some("127.0.0.1"), b"").await?,
        b"A"
    );
    assert_eq!(exchange(gw.addr("tcp"), Some("127.0.0.2"), b"").await?, b"");
    Ok(())
}

#[tokio::test]
async fn inbound_proxy_protocol_from_trusted_and_untrusted_addresses() -> anyhow::Result<()> {
    // A ClientIP router sends 192.0.2.0/24 (the address inside the PROXY header) to PROXIED.
    let proxied = named_backend("PROXIED").await?;
    let direct = named_backend("DIRECT").await?;
    let (c1, k1) = cert(&["one.example"])?;
    let tls_b = tls_backend("ONE", &c1, &k1).await?;
    let mut cfg = String::new();
    cfg.push_str(&router_toml(
        "p",
        "ClientIP(`192.0.2.0/24`)",
        "p",
        "priority = 100",
    ));
    cfg.push_str(&router_toml("d", "HostSNI(`*`)", "d", ""));
    // A TLS router makes the entry point read the first bytes, where a header would be.
    cfg.push_str(&router_toml(
        "t",
        "HostSNI(`one.example`)",
        "t",
        "[tcp.routers.t.tls]\npassthrough = true\n",
    ));
    cfg.push_str(&service_toml("p", &[(proxied, 1)]));
    cfg.push_str(&service_toml("d", &[(direct, 1)]));
    cfg.push_str(&service_toml("t", &[(tls_b, 1)]));
    let gw = Gateway::start(
        &["tcp"],
        "[entryPoints.tcp.proxyProtocol]\ntrustedIPs = [\"127.0.0.1\"]\n",
        &cfg,
    )?;
    let header = b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 80\r\nhello";
    // Trusted: the header's address is the client's.
    assert_eq!(
        exchange(gw.addr("tcp"), Some("127.0.0.1"), header).await?,
        b"PROXIED"
    );
    // Trusted without a header: its own address.
    assert_eq!(
        exchange(gw.addr("tcp"), Some("127.0.0.1"), b"hello").await?,
        b"DIRECT"
    );
    // Untrusted with a header: refused.
    assert_eq!(
        exchange(gw.addr("tcp"), Some("127.0.0.2"), header).await?,
        b""
    );
    // Untrusted without a header: served with its own address.
    assert_eq!(
        exchange(gw.addr("tcp"), Some("127.0.0.2"), b"hello").await?,
        b"DIRECT"
    );
    Ok(())
}

/// Opens a connection through `to` and checks it is proxied (echo).
async fn open_echo(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut c = TcpStream::connect(to).await?;
    c.write_all(b"hi").await?;
    let mut b = [0u8; 2];
    tokio::time::timeout(WAIT, c.read_exact(&mut b)).await??;
    anyhow::ensure!(&b == b"hi", "not echoed: {b:?}");
    Ok(c)
}

#[tokio::test]
async fn in_flight_conn_counts_survive_a_reload() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let other = named_backend("OTHER").await?;
    let cfg = |extra: &str| {
        format!(
            "{}{}{}[tcp.middlewares.limit.inFlightConn]\namount = 2\n{extra}",
            router_toml("r", "HostSNI(`*`)", "s", "middlewares = [\"limit\"]"),
            service_toml("s", &[(echo, 1)]),
            service_toml("o", &[(other, 1)]),
        )
    };
    let gw = Gateway::start(&["tcp"], "", &cfg(""))?;
    let a = open_echo(gw.addr("tcp")).await?;
    let b = open_echo(gw.addr("tcp")).await?;
    assert_eq!(exchange(gw.addr("tcp"), None, b"").await?, b"");
    // A reload that changes something else: the middleware keeps its counts.
    gw.reload(&cfg(&router_toml(
        "unrelated",
        "ClientIP(`192.0.2.1`)",
        "o",
        "",
    )))
    .await?;
    assert_eq!(exchange(gw.addr("tcp"), None, b"").await?, b"");
    // Connections opened before the reload release their slot when they end.
    drop(a);
    let deadline = Instant::now() + WAIT;
    let c = loop {
        match open_echo(gw.addr("tcp")).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e),
        }
    };
    assert_eq!(exchange(gw.addr("tcp"), None, b"").await?, b"");
    drop((b, c));
    Ok(())
}

#[tokio::test]
async fn ready_is_503_while_draining_after_sigterm() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut gw = Gateway::start(
        &["tcp"],
        &format!("[admin]\naddress = \"{admin}\"\n[shutdown]\ngracePeriod = \"10s\"\n"),
        &one_route(&[(echo, 1)]),
    )?;
    let deadline = Instant::now() + WAIT;
    while admin_get(admin, "/ready").await.map(|r| r.0).unwrap_or(0) != 200 {
        anyhow::ensure!(Instant::now() < deadline, "never ready:\n{}", gw.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = open_echo(gw.addr("tcp")).await?;
    gw.signal("-TERM")?;
    let deadline = Instant::now() + WAIT;
    let (status, body) = loop {
        let r = admin_get(admin, "/ready").await?;
        if r.0 != 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    assert!(gw.is_running());
    drop(c);
    assert_eq!(gw.wait_exit(WAIT).await?, Some(0));
    Ok(())
}

/// Connects from `source`, sends `send`, half-closes, reads until EOF (bounded).
async fn sent_then_closed(to: SocketAddr, source: &str, send: &[u8]) -> anyhow::Result<Vec<u8>> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{source}:0").parse()?)?;
    let mut s = sock.connect(to).await?;
    s.write_all(send).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    // A reset after the data still tells what arrived.
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await?;
    Ok(out)
}

#[tokio::test]
async fn inbound_proxy_protocol_on_an_entry_point_without_tls_routers() -> anyhow::Result<()> {
    let proxied = named_backend("PROXIED").await?;
    let first = named_backend("FIRST").await?;
    let echo = echo_backend().await?;
    let mut cfg = String::new();
    cfg.push_str(&router_toml(
        "p",
        "ClientIP(`192.0.2.0/24`)",
        "p",
        "priority = 100",
    ));
    cfg.push_str(&router_toml(
        "f",
        "ClientIP(`127.0.0.3`)",
        "f",
        "priority = 90",
    ));
    cfg.push_str(&router_toml("d", "HostSNI(`*`)", "d", ""));
    cfg.push_str(&service_toml("p", &[(proxied, 1)]));
    cfg.push_str(&service_toml("f", &[(first, 1)]));
    cfg.push_str(&service_toml("d", &[(echo, 1)]));
    let gw = Gateway::start(
        &["tcp"],
        "[entryPoints.tcp.proxyProtocol]\ntrustedIPs = [\"127.0.0.1\"]\n",
        &cfg,
    )?;
    let header = b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 80\r\nhello";
    // Trusted: decoded and stripped; the header's address is the client's.
    assert_eq!(
        exchange(gw.addr("tcp"), Some("127.0.0.1"), header).await?,
        b"PROXIED"
    );
    // Untrusted with a header: refused, nothing reaches the (echo) backend.
    assert_eq!(
        sent_then_closed(gw.addr("tcp"), "127.0.0.2", header).await?,
        b""
    );
    let v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x09\x7f\x00\x00\x01\x15\xb3\x00\x50hello";
    assert_eq!(
        sent_then_closed(gw.addr("tcp"), "127.0.0.2", v2).await?,
        b""
    );
    // Untrusted without a header: passed through.
    assert_eq!(
        sent_then_closed(gw.addr("tcp"), "127.0.0.2", b"hello").await?,
        b"hello"
    );
    assert_eq!(
        sent_then_closed(gw.addr("tcp"), "127.0.0.2", b"PRIVMSG x").await?,
        b"PRIVMSG x"
    );
    // A server-first backend still speaks first to an untrusted client that sends nothing.
    assert_eq!(
        exchange(gw.addr("tcp"), Some("127.0.0.3"), b"").await?,
        b"FIRST"
    );
    Ok(())
}

#[tokio::test]
async fn a_second_tagway_on_the_same_port_fails_to_bind() -> anyhow::Result<()> {
    let a = named_backend("A").await?;
    let gw = Gateway::start(&["tcp"], "", &one_route(&[(a, 1)]))?;
    let second = tokio::process::Command::new(tagway_bin()?)
        .args(["run", "--config"])
        .arg(gw.dir().join("static.toml"))
        .env("RUST_LOG", "info")
        .env("TOKIO_WORKER_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = tokio::time::timeout(WAIT, second.wait_with_output()).await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second tagway runs:\n{log}");
    let addr = gw.addr("tcp").to_string();
    assert!(
        log.contains("entry point tcp") && log.contains(&addr) && log.contains("in use"),
        "{log}"
    );
    // The first one still serves every connection.
    for _ in 0..20 {
        assert_eq!(exchange(gw.addr("tcp"), None, b"").await?, b"A");
    }
    Ok(())
}

#[tokio::test]
async fn tls_options_from_the_file_provider() -> anyhow::Result<()> {
    use rustls_pki_types::pem::PemObject;
    let one = named_backend("ONE").await?;
    let (c1, k1) = cert(&["one.example"])?;
    let mut cfg = String::new();
    cfg.push_str(&router_toml(
        "one",
        "HostSNI(`one.example`)",
        "one",
        "[tcp.routers.one.tls]\noptions = \"modern\"\n",
    ));
    cfg.push_str(&service_toml("one", &[(one, 1)]));
    cfg.push_str(&format!(
        "[[tls.certificates]]\ncertFile = {}\nkeyFile = {}\n",
        toml_pem(&c1),
        toml_pem(&k1)
    ));
    cfg.push_str(
        "[tls.options.modern]\nminVersion = \"VersionTLS13\"\nalpnProtocols = [\"x-tagway\"]\n\
         curvePreferences = [\"X25519\"]\ncipherSuites = [\"TLS_AES_256_GCM_SHA384\"]\n",
    );
    let gw = Gateway::start(&["tcp"], "", &cfg)?;
    let client = |versions: &[&'static rustls::SupportedProtocolVersion]| -> anyhow::Result<_> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(c1.as_bytes()) {
            roots.add(c?)?;
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"x-tagway".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    };
    let name = rustls_pki_types::ServerName::try_from("one.example")?;
    // TLS 1.3: served, with the options' ALPN and cipher suite.
    let tcp = TcpStream::connect(gw.addr("tcp")).await?;
    let mut t = tokio::time::timeout(
        WAIT,
        client(&[&rustls::version::TLS13])?.connect(name.clone(), tcp),
    )
    .await??;
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"x-tagway"[..]));
    assert_eq!(
        t.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut out)).await??;
    assert_eq!(out, b"ONE");
    // A TLS 1.2-only client is refused by minVersion.
    let tcp = TcpStream::connect(gw.addr("tcp")).await?;
    let r =
        tokio::time::timeout(WAIT, client(&[&rustls::version::TLS12])?.connect(name, tcp)).await?;
    assert!(r.is_err(), "a TLS 1.2 handshake succeeded");
    Ok(())
}

#[tokio::test]
async fn sigterm_exits_at_once_even_with_a_blocked_file_read() -> anyhow::Result<()> {
    let a = named_backend("A").await?;
    let mut gw = Gateway::start(
        &["tcp"],
        "[shutdown]\ngracePeriod = \"30s\"\n",
        &one_route(&[(a, 1)]),
    )?;
    assert_eq!(exchange(gw.addr("tcp"), None, b"").await?, b"A");
    // The dynamic file becomes a FIFO nobody writes: the file provider's next load blocks one
    // of the runtime's blocking threads in open(2) for good.
    let file = gw.dir().join("dynamic.toml");
    std::fs::remove_file(&file)?;
    let made = std::process::Command::new("mkfifo").arg(&file).status()?;
    anyhow::ensure!(made.success(), "mkfifo failed");
    gw.signal("-HUP")?;
    let deadline = Instant::now() + WAIT;
    while gw.log_count("SIGHUP") == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no SIGHUP log:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No open connection: SIGTERM ends the process, exit code 0, well within the grace period
    // (a runtime waiting for the blocked thread would never exit).
    gw.signal("-TERM")?;
    assert_eq!(gw.wait_exit(WAIT).await?, Some(0), "{}", gw.log_text());
    assert_eq!(gw.log_count("tagway stopped"), 1);
    Ok(())
}
