//! The measuring floor (`floor-proxy`, docs/performance.md) moves bytes like the gateway does:
//! half-close in both directions, large transfers through a full socket, and with
//! `--close-at-eof` the stock-nginx behaviour it is compared with; several threads on one
//! listener, also accepting as nginx does (`--exclusive-accept`). Real binary, real sockets.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// The running binary; killed (it has no shutdown of its own) when dropped.
struct Floor {
    child: Child,
    addr: SocketAddr,
}

impl Floor {
    async fn start(backend: SocketAddr, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_floor-proxy"))
            .arg("127.0.0.1:0")
            .arg(backend.to_string())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning floor-proxy")?;
        let stdout = child.stdout.take().context("stdout")?;
        // Owned from here, so that the child is killed even if its address never comes; the
        // address is filled in from its first line.
        let mut floor = Floor {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let line = timeout(
            WAIT,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await???;
        floor.addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(floor)
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server that writes `greeting`, half-closes, then reads until the client's EOF and returns
/// what it read.
async fn half_closing_server(
    greeting: &'static [u8],
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<Vec<u8>>>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        s.write_all(greeting).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        // A reset (the proxy closed at once) ends the read as well.
        let _ = s.read_to_end(&mut got).await;
        Ok(got)
    });
    Ok((addr, task))
}

#[tokio::test]
async fn server_fin_is_passed_on_and_the_client_may_still_send() -> Result<()> {
    let (backend, server) = half_closing_server(b"hello").await?;
    let floor = Floor::start(backend, &[]).await?;
    let mut c = TcpStream::connect(floor.addr).await?;
    let mut got = Vec::new();
    timeout(WAIT, c.read_to_end(&mut got)).await??;
    ensure!(got == b"hello", "client read {got:?}");
    c.write_all(b"late").await?;
    c.shutdown().await?;
    let at_server = timeout(WAIT, server).await???;
    ensure!(
        at_server == b"late",
        "server read {at_server:?} after its FIN"
    );
    Ok(())
}

#[tokio::test]
async fn close_at_eof_closes_both_sides_at_the_first_fin() -> Result<()> {
    let (backend, server) = half_closing_server(b"hello").await?;
    let floor = Floor::start(backend, &["--close-at-eof"]).await?;
    let mut c = TcpStream::connect(floor.addr).await?;
    let mut got = Vec::new();
    timeout(WAIT, c.read_to_end(&mut got)).await??;
    ensure!(got == b"hello", "client read {got:?}");
    // The server sees the connection end without the client having closed anything.
    let at_server = timeout(WAIT, server).await???;
    ensure!(at_server.is_empty(), "server read {at_server:?}");
    Ok(())
}

#[tokio::test]
async fn megabytes_cross_both_ways_through_full_sockets() -> Result<()> {
    // An echo server: what the client sends comes back, then the client's FIN.
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let backend = l.local_addr()?;
    tokio::spawn(async move {
        let (s, _) = l.accept().await?;
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    });
    let floor = Floor::start(backend, &[]).await?;
    let c = TcpStream::connect(floor.addr).await?;
    let (mut r, mut w) = c.into_split();
    let sent: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let expect = sent.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    });
    let mut back = Vec::new();
    timeout(WAIT, r.read_to_end(&mut back)).await??;
    writer.await??;
    ensure!(back.len() == expect.len(), "{} bytes back", back.len());
    ensure!(back == expect, "the bytes came back changed");
    Ok(())
}

/// Runs floor-proxy with `args` in front of an echo server and checks 40 concurrent
/// connections, each echoed; then that the process runs `threads` threads.
async fn serves_every_connection(args: &[&str], threads: usize) -> Result<()> {
    // An echo server for many connections.
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let backend = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await?;
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
                anyhow::Ok(())
            });
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    });
    let floor = Floor::start(backend, args).await?;
    let mut clients = Vec::new();
    for i in 0..40u32 {
        let addr = floor.addr;
        clients.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await?;
            let msg = format!("connection {i}");
            c.write_all(msg.as_bytes()).await?;
            c.shutdown().await?;
            let mut back = Vec::new();
            timeout(WAIT, c.read_to_end(&mut back)).await??;
            ensure!(back == msg.as_bytes(), "{msg}: got {back:?}");
            anyhow::Ok(())
        }));
    }
    for c in clients {
        c.await??;
    }
    let tasks = std::fs::read_dir(format!("/proc/{}/task", floor.child.id()))?.count();
    ensure!(
        tasks >= threads,
        "floor-proxy has {tasks} thread(s), not {threads}"
    );
    Ok(())
}

#[tokio::test]
async fn threads_share_the_listener_and_serve_every_connection() -> Result<()> {
    serves_every_connection(&["--threads", "2"], 2).await
}

#[tokio::test]
async fn exclusive_accept_takes_one_connection_per_wake_and_leaves_none_behind() -> Result<()> {
    // Level-triggered: connections still in the backlog after one accept are reported by the
    // next wait (an edge-triggered registration accepting one per wake would strand them, and
    // their clients would time out).
    serves_every_connection(&["--threads", "2", "--exclusive-accept"], 2).await?;
    serves_every_connection(&["--exclusive-accept"], 1).await
}

#[test]
fn a_thread_count_that_is_not_a_positive_number_is_refused() -> Result<()> {
    for bad in ["0", "two"] {
        let out = Command::new(env!("CARGO_BIN_EXE_floor-proxy"))
            .args(["127.0.0.1:0", "127.0.0.1:1", "--threads", bad])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "--threads {bad} accepted");
        ensure!(err.contains("--threads"), "--threads {bad}: {err}");
    }
    Ok(())
}

#[test]
fn an_unknown_option_is_refused_by_name() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_floor-proxy"))
        .args(["127.0.0.1:0", "127.0.0.1:1", "--exclusive"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "--exclusive accepted");
    ensure!(err.contains("unknown option \"--exclusive\""), "{err}");
    Ok(())
}
