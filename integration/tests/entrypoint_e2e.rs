//! End-to-end tests of the entry points through the real `tagway` binary (`tagway run --config`)
//! on 127.0.0.1: the accept loop surviving EMFILE, `entryPoints.<name>.maxConnections`, listeners
//! kept across a reload (file change + SIGHUP), and the `shutdown.gracePeriod` drain on SIGTERM
//! and SIGINT.
//!
//! The binary is started with [`spawn_tagway`](tagway_integration::e2e::spawn_tagway) rather than
//! with [`Gateway`](tagway_integration::e2e::Gateway):
//! these tests need keys inside the entry point's table (`maxConnections`), the admin listener,
//! the process id (`/proc/PID/fd`, `prlimit(2)`) and raw signals. Every port is chosen by the
//! kernel (`127.0.0.1:0`, read back from the `listening` log line), every wait is bounded and the
//! child is killed (by its own handle) when dropped.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tagway_integration::e2e::{
    LogLines, echo_backend, metric_values, named_backend, router_toml, scrape, service_toml,
    spawn_tagway,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Bound of every wait that should succeed.
const WAIT: Duration = Duration::from_secs(10);
/// How long a client that must NOT be served waits for its echo.
const NOT_SERVED: Duration = Duration::from_millis(400);
/// The warn line of the accept loop on EMFILE/ENFILE/ENOBUFS/ENOMEM (gateway/src/entrypoint.rs).
const ACCEPT_BACKOFF_LOG: &str = "accept failed: out of resources, backing off";

/// What goes into the static file besides the `tcp` entry point and the file provider.
#[derive(Default)]
struct Opts<'a> {
    /// Extra keys of `[entryPoints.tcp]`.
    entry_point: &'a str,
    /// Extra keys of `[providers.file]`.
    file: &'a str,
    /// An admin listener on a kernel-chosen port.
    admin: bool,
    /// Appended at the end (whole tables).
    extra: &'a str,
}

/// A running `tagway run --config …`.
struct Tagway {
    child: Child,
    dir: tempfile::TempDir,
    log: LogLines,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
}

impl Drop for Tagway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tagway {
    async fn start(opts: Opts<'_>, dynamic: &str) -> anyhow::Result<Tagway> {
        let dir = tempfile::tempdir()?;
        let mut st = format!(
            "[entryPoints.tcp]\naddress = \"127.0.0.1:0\"\n{}\n\
             [providers.file]\nfilename = \"dynamic.toml\"\n{}\n",
            opts.entry_point, opts.file
        );
        if opts.admin {
            st.push_str("[admin]\naddress = \"127.0.0.1:0\"\n");
        }
        st.push_str(opts.extra);
        std::fs::write(dir.path().join("static.toml"), st)?;
        std::fs::write(dir.path().join("dynamic.toml"), dynamic)?;
        // Two worker threads sharing one listening socket, whatever the machine.
        let (child, log) = spawn_tagway(
            &dir.path().join("static.toml"),
            &[("NO_COLOR", "1"), ("TOKIO_WORKER_THREADS", "2")],
        )?;
        let mut gw = Tagway {
            child,
            dir,
            log,
            addr: "127.0.0.1:0".parse()?,
            admin: None,
        };
        gw.addr = gw
            .wait_field("listening entry_point=tcp address=")
            .await?
            .parse()?;
        if opts.admin {
            gw.admin = Some(
                gw.wait_field("admin API listening address=")
                    .await?
                    .parse()?,
            );
        }
        Ok(gw)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_text(&self) -> String {
        self.log.text()
    }

    fn log_count(&self, needle: &str) -> usize {
        self.log.count(needle)
    }

    /// Waits for a log line containing `prefix`; returns the word that follows it.
    async fn wait_field(&mut self, prefix: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self.log.find_map(|l| {
                let rest = &l[l.find(prefix)? + prefix.len()..];
                rest.split_whitespace().next().map(str::to_owned)
            });
            if let Some(f) = found {
                return Ok(f);
            }
            if !self.is_running() || Instant::now() > deadline {
                bail!("no log line {prefix:?}; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until at least `n` log lines contain `needle`.
    async fn wait_log(&self, needle: &str, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        while self.log_count(needle) < n {
            if Instant::now() > deadline {
                bail!(
                    "fewer than {n} log lines {needle:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn signal(&self, sig: libc::c_int) -> anyhow::Result<()> {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped (we hold it).
        let rc = unsafe { libc::kill(self.pid(), sig) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        Ok(())
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the exit; returns the exit code.
    async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!(
                    "tagway still running after {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sample of `name` with the label `entrypoint="tcp"` in `/metrics`.
    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let admin = self.admin.context("no admin listener")?;
        let m = scrape(admin).await?;
        metric_values(&m, name, &[("entrypoint", "tcp")])
            .first()
            .copied()
            .with_context(|| format!("{name}{{entrypoint=\"tcp\"}} missing in {:?}", m.samples))
    }
}

/// The catch-all route to `server`.
fn one_route(server: SocketAddr) -> String {
    format!(
        "{}{}",
        router_toml("r", "HostSNI(`*`)", "s", ""),
        service_toml("s", &[(server, 1)])
    )
}

/// Writes `msg` and reads it back (bounded): the connection is proxied to the echo backend.
async fn ping(c: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    c.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    timeout(WAIT, c.read_exact(&mut back))
        .await
        .context("no echo")??;
    ensure!(back == msg, "echo {back:?} instead of {msg:?}");
    Ok(())
}

/// A new client proxied to the echo backend.
async fn echo_client(addr: SocketAddr, msg: &[u8]) -> anyhow::Result<TcpStream> {
    let mut c = timeout(WAIT, TcpStream::connect(addr)).await??;
    ping(&mut c, msg).await?;
    Ok(c)
}

/// Sends `msg` and checks that nothing comes back for [`NOT_SERVED`] (the client is not
/// served); the connection itself was established by the kernel.
async fn assert_not_served(c: &mut TcpStream, msg: &[u8], why: &str) -> anyhow::Result<()> {
    c.write_all(msg).await?;
    let mut b = [0u8; 1];
    match timeout(NOT_SERVED, c.read(&mut b)).await {
        Err(_) => Ok(()),
        Ok(r) => bail!("{why}: the client got an answer or a close: {r:?}"),
    }
}

/// Descriptors open in process `pid`: number → link target.
fn open_fds(pid: i32) -> anyhow::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let Some(n) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A descriptor closed since read_dir listed it is skipped.
        if let Ok(target) = std::fs::read_link(e.path()) {
            out.push((n, target.to_string_lossy().into_owned()));
        }
    }
    Ok(out)
}

/// The lowest descriptor number not open in `pid`: the kernel's next allocation.
fn lowest_free_fd(pid: i32) -> anyhow::Result<u32> {
    let open: BTreeSet<u32> = open_fds(pid)?.into_iter().map(|(n, _)| n).collect();
    Ok((0..).find(|n| !open.contains(n)).unwrap_or(0))
}

/// Sets RLIMIT_NOFILE (soft and hard) of process `pid`: no descriptor numbered `n` or more
/// can be created any more.
fn set_nofile(pid: i32, n: u32) -> anyhow::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: n.into(),
        rlim_max: n.into(),
    };
    // SAFETY: prlimit(2) with a valid rlimit and no old-limit output, on our own child.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Inodes of the sockets listening on 127.0.0.1:`port` (`/proc/net/tcp`, state 0A = LISTEN).
fn listening_inodes(port: u16) -> anyhow::Result<BTreeSet<u64>> {
    let local = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let mut out = BTreeSet::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[1] == local && f[3] == "0A" {
            out.insert(f[9].parse()?);
        }
    }
    Ok(out)
}

/// Inodes of the sockets open in process `pid`.
fn socket_inodes(pid: i32) -> anyhow::Result<BTreeSet<u64>> {
    Ok(open_fds(pid)?
        .into_iter()
        .filter_map(|(_, t)| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect())
}

#[tokio::test]
async fn accept_loop_backs_off_on_emfile_and_recovers() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let mut gw = Tagway::start(
        Opts {
            admin: true,
            ..Opts::default()
        },
        &one_route(echo),
    )
    .await?;
    let addr = gw.addr;
    let pid = gw.pid();
    // Proxied connections to release later: each holds a client and a backend socket (and
    // splice pipes) in the gateway, on the lowest free descriptor numbers.
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(echo_client(addr, format!("held {i}").as_bytes()).await?);
    }
    // RLIMIT_NOFILE = the lowest free descriptor number: every descriptor below it is open, so
    // the next accept(2) fails with EMFILE, and closing the held connections frees numbers
    // below it again. (Set on the running process: the idle count is only known once it runs.)
    let mut limit = None;
    for _ in 0..5 {
        let n = lowest_free_fd(pid)?;
        set_nofile(pid, n)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if lowest_free_fd(pid)? == n {
            limit = Some(n);
            break;
        }
    }
    let limit = limit.context("the gateway's descriptor table never settled")?;
    let warned = gw.log_count(ACCEPT_BACKOFF_LOG);
    // The kernel completes the handshake (backlog); accept(2) fails and leaves it queued.
    let mut queued = timeout(WAIT, TcpStream::connect(addr)).await??;
    assert_not_served(&mut queued, b"queued", "out of descriptors").await?;
    gw.wait_log(ACCEPT_BACKOFF_LOG, warned + 1).await?;
    assert!(
        gw.is_running(),
        "tagway died on EMFILE (limit {limit}); log:\n{}",
        gw.log_text()
    );
    // Descriptors come back: the loop's next try (backoff ≤ 1 s) takes the queued client.
    drop(held);
    let mut back = [0u8; 6];
    timeout(WAIT, queued.read_exact(&mut back))
        .await
        .context("the queued client was never served after descriptors were freed")??;
    assert_eq!(&back, b"queued");
    ping(&mut queued, b"again").await?;
    // And new clients are proxied end to end.
    for i in 0..3 {
        echo_client(addr, format!("after {i}").as_bytes()).await?;
    }
    assert!(gw.is_running());
    // Every failed accept is counted (each logged one at least).
    let warned = gw.log_count(ACCEPT_BACKOFF_LOG);
    let errors = gw.metric("tagway_entrypoint_accept_errors_total").await?;
    assert!(
        warned >= 1 && errors >= warned as f64,
        "accept errors {errors}, warn lines {warned}"
    );
    Ok(())
}

#[tokio::test]
async fn max_connections_holds_the_third_client_in_the_backlog() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let gw = Tagway::start(
        Opts {
            entry_point: "maxConnections = 2",
            admin: true,
            ..Opts::default()
        },
        &one_route(echo),
    )
    .await?;
    let addr = gw.addr;
    let mut first = echo_client(addr, b"one").await?;
    let mut second = echo_client(addr, b"two").await?;
    // Semantics (gateway/src/entrypoint.rs, accept_loop): a permit of the entry point's
    // semaphore, shared by the accept loops of every worker thread, is taken BEFORE accept(2)
    // and released when the connection ends. A third client is neither refused nor accepted and
    // dropped: the kernel completes its handshake and it waits in the listen backlog.
    let mut third = timeout(WAIT, TcpStream::connect(addr)).await??;
    assert_not_served(
        &mut third,
        b"three",
        "2 connections open, maxConnections = 2",
    )
    .await?;
    assert_eq!(
        gw.metric("tagway_entrypoint_connections_total").await?,
        2.0,
        "the third client was accepted"
    );
    // The two open ones are unaffected.
    ping(&mut first, b"still one").await?;
    ping(&mut second, b"still two").await?;
    // One ends: its permit goes to the waiting client, whose bytes were queued meanwhile.
    drop(first);
    let mut back = [0u8; 5];
    timeout(WAIT, third.read_exact(&mut back))
        .await
        .context("the third client was not served after one of the two closed")??;
    assert_eq!(&back, b"three");
    ping(&mut third, b"served").await?;
    assert_eq!(gw.metric("tagway_entrypoint_connections_total").await?, 3.0);
    // Two open again (second, third): a fourth waits in turn.
    let mut fourth = timeout(WAIT, TcpStream::connect(addr)).await??;
    assert_not_served(&mut fourth, b"four", "2 connections open again").await?;
    drop(second);
    let mut back = [0u8; 4];
    timeout(WAIT, fourth.read_exact(&mut back)).await??;
    assert_eq!(&back, b"four");
    Ok(())
}

#[tokio::test]
async fn reload_and_sighup_keep_the_listening_socket() -> anyhow::Result<()> {
    let echo = echo_backend().await?;
    let new = named_backend("NEW").await?;
    // watch = false: only SIGHUP makes the file provider read the file again.
    let gw = Tagway::start(
        Opts {
            file: "watch = false",
            ..Opts::default()
        },
        &one_route(echo),
    )
    .await?;
    let addr = gw.addr;
    let pid = gw.pid();
    let before = listening_inodes(addr.port())?;
    ensure!(!before.is_empty(), "no listening socket on {addr}");
    let ours = socket_inodes(pid)?;
    assert!(
        before.is_subset(&ours),
        "listening sockets {before:?} are not tagway's ({ours:?})"
    );
    let mut open = echo_client(addr, b"before").await?;

    // Add a router (ClientIP outranks the HostSNI(`*`) catch-all) and its service.
    let dynamic = format!(
        "{}{}{}",
        one_route(echo),
        router_toml("from2", "ClientIP(`127.0.0.2`)", "new", ""),
        service_toml("new", &[(new, 1)])
    );
    std::fs::write(gw.dir.path().join("dynamic.toml"), dynamic)?;
    let applied = gw.log_count("configuration applied");
    gw.signal(libc::SIGHUP)?;
    gw.wait_log("SIGHUP: reloading", 1).await?;
    gw.wait_log("configuration applied", applied + 1).await?;
    // The data plane swaps its tables right after: poll (bounded) for the new route.
    let deadline = Instant::now() + WAIT;
    loop {
        let sock = TcpSocket::new_v4()?;
        sock.bind("127.0.0.2:0".parse()?)?;
        let mut c = timeout(WAIT, sock.connect(addr)).await??;
        let mut got = [0u8; 3];
        if let Ok(Ok(_)) = timeout(Duration::from_millis(300), c.read_exact(&mut got)).await
            && &got == b"NEW"
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the new router never served; log:\n{}",
            gw.log_text()
        );
    }
    // Other clients still reach the echo service.
    echo_client(addr, b"catch-all").await?;

    // Same listening socket (inode), still tagway's; the connection from before still works.
    let after = listening_inodes(addr.port())?;
    assert_eq!(before, after, "the listener was rebound on reload");
    assert!(after.is_subset(&socket_inodes(pid)?));
    ping(&mut open, b"after reload").await?;
    Ok(())
}

/// With `shutdown.gracePeriod = 2s`: after `sig`, an open connection keeps working, new ones are
/// refused, the open one is closed by the gateway once the grace period is over, and the process
/// exits 0.
async fn grace_period_expires(sig: libc::c_int) -> anyhow::Result<()> {
    const GRACE: Duration = Duration::from_secs(2);
    let echo = echo_backend().await?;
    let mut gw = Tagway::start(
        Opts {
            extra: "[shutdown]\ngracePeriod = \"2s\"\n",
            ..Opts::default()
        },
        &one_route(echo),
    )
    .await?;
    let addr = gw.addr;
    // A client that never closes (nor does the echo backend before it does).
    let mut open = echo_client(addr, b"hello").await?;
    let signalled = Instant::now();
    gw.signal(sig)?;
    gw.wait_log("shutting down: no new connections", 1).await?;
    // Draining: the open connection is still proxied.
    ping(&mut open, b"during grace").await?;
    assert!(
        signalled.elapsed() < GRACE,
        "too slow to test within the grace period"
    );
    // The listener is closed: new clients are refused (bounded poll; a connect that made it
    // into the backlog just before is dropped).
    let deadline = Instant::now() + WAIT;
    loop {
        match timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {}
        }
        ensure!(Instant::now() < deadline, "the listener still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The gateway closes the connection when the grace period is over.
    let mut b = [0u8; 16];
    let r = timeout(GRACE + Duration::from_secs(5), open.read(&mut b))
        .await
        .context("the open connection outlived the grace period by 5 s")?;
    let closed_after = signalled.elapsed();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "expected EOF or a reset, got {r:?}"
    );
    assert!(
        closed_after >= GRACE - Duration::from_millis(250),
        "closed after {closed_after:?}, before the grace period ({GRACE:?})"
    );
    assert_eq!(
        gw.wait_exit(WAIT).await?,
        Some(0),
        "log:\n{}",
        gw.log_text()
    );
    assert!(
        gw.log_count("grace period over; closing the remaining connections") >= 1,
        "log:\n{}",
        gw.log_text()
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_then_closes_at_the_grace_period_and_exits_zero() -> anyhow::Result<()> {
    grace_period_expires(libc::SIGTERM).await
}

#[tokio::test]
async fn sigint_drains_then_closes_at_the_grace_period_and_exits_zero() -> anyhow::Result<()> {
    grace_period_expires(libc::SIGINT).await
}
