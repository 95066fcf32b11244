//! Edge cases of the data plane through the real `tagway run --config` binary: connections that
//! end abruptly (client reset while the server streams, server reset mid-stream, client reset
//! while the dial is in progress) release every file descriptor and open-connection gauge.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tagway_integration::e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The open file descriptors of a process, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fds {
    sockets: usize,
    pipes: usize,
    other: usize,
}

fn fds(pid: u32) -> anyhow::Result<Fds> {
    let dir = format!("/proc/{pid}/fd");
    let mut n = Fds {
        sockets: 0,
        pipes: 0,
        other: 0,
    };
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        // A descriptor closed between the listing and the readlink is simply gone.
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if t.starts_with("socket:") {
            n.sockets += 1;
        } else if t.starts_with("pipe:") {
            n.pipes += 1;
        } else {
            n.other += 1;
        }
    }
    Ok(n)
}

/// Waits (bounded) until three readings 100 ms apart agree; returns that count.
async fn settled_fds(pid: u32) -> anyhow::Result<Fds> {
    let deadline = Instant::now() + WAIT;
    let mut last = fds(pid)?;
    let mut same = 0;
    while same < 2 {
        ensure!(
            Instant::now() < deadline,
            "fd count never settled: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = fds(pid)?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

/// The sum of the samples of `metric` with every label of `labels`.
fn sum(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    metric_values(scrape, metric, labels).iter().sum()
}

/// A server that streams 64 KiB chunks to every connection until a write fails (or 10 s pass);
/// counts the connections that ended by a failed write (the gateway closed its side).
async fn streaming_backend() -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let ended = Arc::new(AtomicUsize::new(0));
    let ended2 = ended.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let ended = ended2.clone();
            tokio::spawn(async move {
                let chunk = vec![b's'; 64 * 1024];
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    match tokio::time::timeout_at(until, s.write_all(&chunk)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => {
                            ended.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    Ok((addr, ended))
}

/// A server that waits for the client's first bytes (so the gateway's dial is over and the copy
/// runs), sends 256 KiB, then resets the connection (SO_LINGER 0).
async fn resetting_backend() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 2];
                if !matches!(
                    tokio::time::timeout(WAIT, s.read_exact(&mut first)).await,
                    Ok(Ok(_))
                ) {
                    return;
                }
                let chunk = vec![b'r'; 256 * 1024];
                let _ = tokio::time::timeout(WAIT, s.write_all(&chunk)).await;
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    Ok(addr)
}

/// A server that accepts and never answers (a TLS dial toward it stalls in the handshake);
/// counts accepted connections and holds each until its peer closes (bounded).
async fn stalling_backend() -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let accepted2 = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            accepted2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut sink)).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    Ok((addr, accepted))
}

/// Reads until the gateway ends the connection (EOF or reset), bounded by [`WAIT`].
async fn read_until_closed(s: &mut TcpStream) -> anyhow::Result<usize> {
    let mut total = 0;
    let mut b = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(total),
            Ok(Ok(n)) => total += n,
            Err(_) => bail!("the connection was not ended within {WAIT:?} ({total} bytes read)"),
        }
    }
}

/// Sends `data` through an echo route, half-closes, reads the whole echo (bounded).
async fn echo_once(to: SocketAddr, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut c = TcpStream::connect(to).await?;
    c.write_all(data).await?;
    c.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut back)).await??;
    Ok(back)
}

/// Connections per batch run at the same time.
const BATCH: usize = 5;
/// Connections reset by the client while the server streams.
const CLIENT_RESETS: usize = 20;
/// Connections reset by the server mid-stream.
const SERVER_RESETS: usize = 20;
/// Connections reset by the client while the gateway's dial is in progress.
const DIAL_RESETS: usize = 10;

#[tokio::test]
async fn abrupt_ends_release_every_fd_and_gauge() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let (stream, stream_ended) = streaming_backend().await?;
    let rst = resetting_backend().await?;
    let (stall, stall_accepted) = stalling_backend().await?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut cfg = String::new();
    for (ep, addr) in [
        ("tcp", echo),
        ("stream", stream),
        ("rst", rst),
        ("stall", stall),
    ] {
        // Router and service named after their entry point.
        cfg.push_str(&router_toml(
            ep,
            "HostSNI(`*`)",
            ep,
            &format!("entryPoints = [\"{ep}\"]"),
        ));
        cfg.push_str(&service_toml(ep, &[(addr, 1)]));
    }
    // The stall service is the last one written: this line belongs to its loadBalancer table.
    // The stalled server is dialled with TLS: the dial waits for a ServerHello that never comes,
    // up to the transport's dialTimeout.
    cfg.push_str(
        "serversTransport = \"stall\"\n\
         [tcp.serversTransports.stall]\ndialTimeout = \"2s\"\n\
         [tcp.serversTransports.stall.tls]\nserverName = \"stall.example\"\n",
    );
    let gw = Gateway::start(
        &["tcp", "stream", "rst", "stall"],
        &format!("[admin]\naddress = \"{admin}\"\n"),
        &cfg,
    )?;
    let pid = gw.pid();

    // Idle: after one normal connection and one scrape, once the count is stable.
    assert_eq!(echo_once(gw.addr("tcp"), b"warm").await?, b"warm");
    let deadline = Instant::now() + WAIT;
    while scrape(admin).await.is_err() {
        ensure!(Instant::now() < deadline, "no /metrics:\n{}", gw.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle = settled_fds(pid).await?;

    // 1. The client resets (SO_LINGER 0) while the server streams to it.
    for _ in 0..CLIENT_RESETS / BATCH {
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            let to = gw.addr("stream");
            batch.push(tokio::spawn(async move {
                let mut c = TcpStream::connect(to).await?;
                let mut b = vec![0u8; 64 * 1024];
                let mut got = 0;
                while got < 512 * 1024 {
                    let n = tokio::time::timeout(WAIT, c.read(&mut b)).await??;
                    ensure!(n > 0, "stream ended after {got} bytes");
                    got += n;
                }
                c.set_zero_linger()?;
                drop(c);
                anyhow::Ok(())
            }));
        }
        for t in batch {
            t.await??;
        }
    }

    // 2. The server resets mid-stream: the gateway ends the client's connection.
    for _ in 0..SERVER_RESETS / BATCH {
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            let to = gw.addr("rst");
            batch.push(tokio::spawn(async move {
                let mut c = TcpStream::connect(to).await?;
                c.write_all(b"go").await?;
                read_until_closed(&mut c).await
            }));
        }
        for t in batch {
            let got = t.await??;
            ensure!(got <= 256 * 1024, "{got} bytes from a 256 KiB server");
        }
    }

    // 3. The client resets while the gateway is still dialling (TLS handshake stalled).
    let mut clients = Vec::new();
    for _ in 0..DIAL_RESETS {
        let mut c = TcpStream::connect(gw.addr("stall")).await?;
        c.write_all(b"x").await?;
        clients.push(c);
    }
    let deadline = Instant::now() + WAIT;
    while stall_accepted.load(Ordering::SeqCst) < DIAL_RESETS {
        ensure!(
            Instant::now() < deadline,
            "the gateway dialled {} of {DIAL_RESETS}:\n{}",
            stall_accepted.load(Ordering::SeqCst),
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for c in clients {
        c.set_zero_linger()?;
        drop(c);
    }
    // The count sees the gateway's connections: the stalled dials still hold their sockets (the
    // server side at least) until the dialTimeout.
    let during = fds(pid)?;
    ensure!(
        during.sockets >= idle.sockets + DIAL_RESETS,
        "idle {idle:?}, during the stalled dials {during:?}"
    );

    // Every descriptor is released. Sockets and everything else come back to the idle count
    // exactly; pipes may stay in the splice engine's pool of empty pipes, which never holds more
    // than the pipes in use at once (at most one per direction of the BATCH connections).
    let pipe_slack = 2 * 2 * BATCH;
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let now = fds(pid)?;
        if now.sockets == idle.sockets
            && now.other == idle.other
            && now.pipes <= idle.pipes + pipe_slack
        {
            break now;
        }
        ensure!(
            Instant::now() < deadline,
            "fds not released: idle {idle:?}, now {now:?}\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("tagway {pid}: fds idle {idle:?}, during {during:?}, after the resets {after:?}");
    // The gateway closed its side of every streaming server connection.
    let deadline = Instant::now() + WAIT;
    while stream_ended.load(Ordering::SeqCst) < CLIENT_RESETS {
        ensure!(
            Instant::now() < deadline,
            "{} of {CLIENT_RESETS} streaming server connections were closed",
            stream_ended.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The open-connection gauges are back to 0, and every connection was really proxied (or,
    // for the stalled dials, failed its dial) rather than refused early.
    let m = scrape(admin).await?;
    let text = format!("{:?}", m.samples);
    for metric in [
        "tagway_entrypoint_open_connections",
        "tagway_router_open_connections",
        "tagway_service_open_connections",
        "tagway_server_open_connections",
    ] {
        let s = metric_values(&m, metric, &[]);
        ensure!(!s.is_empty(), "no {metric} in:\n{text}");
        ensure!(s.iter().all(|v| *v == 0.0), "{metric}: {s:?}");
    }
    let accepted = |ep: &str| {
        sum(
            &m,
            "tagway_entrypoint_connections_total",
            &[("entrypoint", ep)],
        )
    };
    assert_eq!(accepted("stream"), CLIENT_RESETS as f64, "{text}");
    assert_eq!(accepted("rst"), SERVER_RESETS as f64, "{text}");
    assert_eq!(accepted("stall"), DIAL_RESETS as f64, "{text}");
    let proxied = |svc: &str| {
        sum(
            &m,
            "tagway_service_connections_total",
            &[("service", &format!("{svc}@file"))],
        )
    };
    assert_eq!(proxied("stream"), CLIENT_RESETS as f64, "{text}");
    assert_eq!(proxied("rst"), SERVER_RESETS as f64, "{text}");
    assert_eq!(
        sum(
            &m,
            "tagway_routing_failures_total",
            &[("entrypoint", "stall"), ("reason", "dial_failed")]
        ),
        DIAL_RESETS as f64,
        "{text}"
    );
    assert_eq!(
        sum(
            &m,
            "tagway_server_dial_errors_total",
            &[("service", "stall@file")]
        ),
        DIAL_RESETS as f64,
        "{text}"
    );

    // Still serving, and the normal connection leaves nothing behind either.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(echo_once(gw.addr("tcp"), &payload).await?, payload);
    let deadline = Instant::now() + WAIT;
    loop {
        let now = fds(pid)?;
        if now.sockets == idle.sockets && now.other == idle.other && now.pipes <= after.pipes {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "fds after a normal connection: idle {idle:?}, now {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(Path::new(&format!("/proc/{pid}")).exists(), "tagway exited");
    Ok(())
}
