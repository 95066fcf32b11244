//! One client connection: inbound PROXY header, routing (at once, or after peeking the
//! ClientHello), middlewares, dial with next-server retry, TLS termination, then the copy.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::balancer::{Pick, Tried};
use crate::clienthello::{self, Peeked};
use crate::copy::{self, Outcome, Transferred};
use crate::dial::{BackendStream, ClientAddrs, DialError};
use crate::metrics::{Counters, EntryPointCounters};
use crate::observability::counters::Failure;
use crate::observability::tally::Tally;
use crate::proxy_in::{self, ProxyInbound};
use crate::router::{ConnInfo, Route, TlsMode};
use crate::runtime::Tables;

/// Data-plane tunables. `dial_attempts` and `hold_out` come from the static `loadBalancer`
/// section ([`Gateway::new`](crate::server::Gateway::new)); the others are not in the
/// configuration files (their defaults suit most deployments).
#[derive(Clone, Debug)]
pub struct Options {
    /// Bound on the time to receive a whole ClientHello.
    pub peek_timeout: Duration,
    /// Bound on the bytes of a ClientHello (records included).
    pub peek_limit: usize,
    /// Dial attempts per connection (each on a different server).
    pub dial_attempts: usize,
    /// How long a server whose dial failed is left out of the rotation.
    pub hold_out: Duration,
    /// Use splice(2) between two plain TCP sockets (Linux).
    pub splice: bool,
    /// Threads serving connections, each with its own single-thread runtime, accepting from a
    /// listening socket per entry point shared by up to
    /// [`WORKERS_PER_SOCKET`](crate::entrypoint::WORKERS_PER_SOCKET) threads (several sockets
    /// in an SO_REUSEPORT group beyond that). Default: `TOKIO_WORKER_THREADS`, else the number
    /// of CPUs.
    pub workers: usize,
    /// Serve plain-TCP entry points from the event loops ([`crate::evloop`], Linux) when their
    /// routes allow it. Default: on, unless `TAGWAY_EVENT_LOOP` is `0`, `off` or `false`.
    pub event_loop: bool,
}

/// `TAGWAY_EVENT_LOOP` (on unless `0`, `off` or `false`); always off outside Linux.
pub fn default_event_loop() -> bool {
    cfg!(target_os = "linux")
        && !std::env::var("TAGWAY_EVENT_LOOP").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "off" | "false" | "no"
            )
        })
}

/// `TOKIO_WORKER_THREADS`, else the number of CPUs.
pub fn default_workers() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl Default for Options {
    fn default() -> Self {
        Options {
            peek_timeout: clienthello::DEFAULT_PEEK_TIMEOUT,
            peek_limit: clienthello::DEFAULT_MAX_PEEK,
            dial_attempts: 3,
            hold_out: Duration::from_secs(5),
            splice: cfg!(target_os = "linux"),
            workers: default_workers(),
            event_loop: default_event_loop(),
        }
    }
}

/// What a connection needs from its entry point.
#[derive(Debug)]
pub struct EntryPointState {
    /// The entry point name.
    pub name: Arc<str>,
    /// Inbound PROXY protocol policy.
    pub proxy_in: Option<ProxyInbound>,
    /// Counters.
    pub counters: Arc<EntryPointCounters>,
    /// Where access-log records go (None: access log off).
    pub access_log: Option<crate::observability::accesslog::AccessLogSender>,
}

/// A stream that first yields `prefix` (bytes already read), then the inner stream.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one accepted connection to its end. `current_thread`: the task runs on a
/// current-thread runtime ([`on_current_thread_runtime`](crate::entrypoint::on_current_thread_runtime),
/// settled once by the accept loop), which lets the copy tell a stream's end from a short read.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    ep: Arc<EntryPointState>,
    tables: Arc<Tables>,
    opts: Arc<Options>,
    current_thread: bool,
) {
    let mut tally = Tally::start(&*ep, peer);
    let mut stream = stream;
    let mut buf: Vec<u8> = Vec::new();
    // `dst` is filled in (getsockname) only when a PROXY header toward the backend needs it.
    let mut client = ClientAddrs {
        source: peer,
        destination: peer,
    };
    let mut dst_known = false;
    let mut trusted = false;
    if let Some(p) = &ep.proxy_in
        && p.trusts(peer.ip())
    {
        trusted = true;
        // Boxed (like the peek, the untrusted check and TLS termination below): these paths are
        // rare or costly anyway, and inline they would make every connection's task bigger.
        match Box::pin(proxy_in::read_header(
            &mut stream,
            peer,
            &mut buf,
            p.timeout,
        ))
        .await
        {
            Ok(Some(a)) => {
                client = ClientAddrs {
                    source: a.src,
                    destination: a.dst,
                };
                dst_known = true;
                tally.client(a.src);
            }
            Ok(None) => {}
            Err(e) => {
                EntryPointCounters::inc(&ep.counters.proxy_protocol_errors);
                tally.fail(Failure::ProxyProtocol);
                tracing::debug!(entry_point = %ep.name, error = %e, "PROXY header refused");
                return;
            }
        }
    }
    // Routing, in a block: what it borrows (the table, the ClientHello, the rule's input) ends
    // here instead of taking room in the connection's future until its end.
    let (route, is_tls) = {
        let Some(table) = tables.entry_points.get(&*ep.name) else {
            EntryPointCounters::inc(&ep.counters.unrouted);
            tally.fail(Failure::NoRoute);
            return;
        };
        let peeked = if table.needs_peek() {
            match Box::pin(clienthello::peek(
                &mut stream,
                &mut buf,
                opts.peek_limit,
                opts.peek_timeout,
            ))
            .await
            {
                Ok(p) => p,
                Err(e) => {
                    EntryPointCounters::inc(&ep.counters.peek_errors);
                    tally.fail(match e {
                        clienthello::PeekError::Timeout { .. } => Failure::PeekTimeout,
                        _ => Failure::PeekError,
                    });
                    tracing::debug!(entry_point = %ep.name, client = %client.source, error = %e, "ClientHello peek failed");
                    return;
                }
            }
        } else {
            Peeked::Plain
        };
        // A peer the entry point does not trust, whose first bytes (not a ClientHello) may
        // start a PROXY signature: read on until it is clear, so that a header sent in small
        // pieces is refused too.
        if let Some(p) = &ep.proxy_in
            && !trusted
            && proxy_in::looks_like_header(&buf)
        {
            let settled = Box::pin(settle_signature(&mut stream, &mut buf, p.timeout)).await;
            if settled.is_err() || proxy_in::looks_like_header(&buf) {
                refuse_untrusted_header(&ep, &mut tally, peer);
                return;
            }
        }
        let (sni, alpn, is_tls) = match &peeked {
            Peeked::Tls(h) => (h.sni.as_deref(), h.alpn.as_slice(), true),
            Peeked::Plain => (None, &[][..], false),
        };
        let info = ConnInfo {
            sni,
            alpn,
            client_ip: client.source.ip(),
            tls: is_tls,
        };
        let Some(route) = table.route(&info).cloned() else {
            EntryPointCounters::inc(&ep.counters.unrouted);
            tally.fail(Failure::NoRoute);
            tracing::debug!(entry_point = %ep.name, client = %client.source, sni = ?sni, tls = is_tls, "no router matches; closing");
            return;
        };
        tally.routed(&route, sni);
        (route, is_tls)
    };
    let _guards = match crate::middleware::apply(&route.middlewares, client.source.ip()) {
        Ok(g) => g,
        Err(r) => {
            EntryPointCounters::inc(&ep.counters.refused);
            tally.refused(&route, r);
            tracing::debug!(router = %route.name, client = %client.source, reason = r.as_str(), "refused by a middleware");
            return;
        }
    };
    let _route_open = route.counters.open();
    if route.tls == TlsMode::Terminate && is_tls {
        if !dst_known {
            client.destination = stream.local_addr().unwrap_or(peer);
        }
        let cfg = route.tls_config.clone();
        drop(tables);
        // Boxed: the TLS state is large and only this path needs it.
        Box::pin(terminate(
            stream, buf, cfg, &route, client, &ep, &opts, &mut tally,
        ))
        .await;
        return;
    }
    drop(tables);
    let local = || {
        if dst_known {
            client.destination
        } else {
            stream.local_addr().unwrap_or(peer)
        }
    };
    // Boxed: the dial's state (timers, connect, the transport's steps) is as large as the rest
    // of this future; on the heap only while dialing, the connection's task stays small.
    let Some((pick, mut backend)) = Box::pin(dial(&route, client, &local, &opts, &mut tally)).await
    else {
        return;
    };
    tally.connected(&pick);
    let _srv_open = pick.server.counters.open();
    let _svc_open = pick.service.counters.open();
    let sinks = sinks(&route, &pick);
    let delay = pick.service.termination_delay;
    // An entry point that accepts PROXY headers, a peer it does not trust, and no byte read yet
    // (no peek): the client's first bytes must not be a PROXY header. They are checked when they
    // come, while the server's first bytes flow to the client (server-first protocols).
    let mut early_to_client = 0;
    if let Some(p) = &ep.proxy_in
        && !trusted
        && buf.is_empty()
    {
        match Box::pin(untrusted_first_bytes(
            &mut stream,
            &mut backend,
            &mut buf,
            p.timeout,
            delay,
        ))
        .await
        {
            Ok(First::Data(n)) => early_to_client = n,
            Ok(First::Header(n)) => {
                for c in sinks {
                    c.add_bytes(0, n);
                }
                refuse_untrusted_header(&ep, &mut tally, peer);
                return;
            }
            Ok(First::Ended(n, outcome)) => {
                for c in sinks {
                    c.add_bytes(0, n);
                }
                let t = Transferred {
                    to_backend: 0,
                    to_client: n,
                };
                tally.finished(&pick, &t, &outcome);
                ended(&route, &pick, &outcome);
                return;
            }
            Err(e) => {
                tally.finished(&pick, &Transferred::default(), &Outcome::Error(e));
                return;
            }
        }
    }
    let initial = buf.len() as u64;
    if !buf.is_empty() {
        if let Err(e) = backend.write_all(&buf).await {
            tracing::debug!(server = %pick.server.address, error = %e, "writing the peeked bytes failed");
            tally.finished(&pick, &Transferred::default(), &Outcome::Error(e));
            return;
        }
        buf = Vec::new();
    }
    drop(buf);
    let mut meter = copy::Meter::new(&sinks);
    if initial != 0 || early_to_client != 0 {
        for c in sinks {
            c.add_bytes(initial, early_to_client);
        }
    }
    // The copy engines are boxed too: their state is only needed once connected, and it would
    // otherwise be added to every connection's future for all of its life.
    let (outcome, mut t) = match &mut backend {
        #[cfg(target_os = "linux")]
        BackendStream::Plain(b) if opts.splice => {
            Box::pin(copy::copy_spliced(
                &mut stream,
                b,
                delay,
                &mut meter,
                current_thread,
            ))
            .await
        }
        _ => {
            Box::pin(copy::copy_buffered(
                &mut stream,
                &mut backend,
                delay,
                &mut meter,
            ))
            .await
        }
    };
    t.to_backend += initial;
    t.to_client += early_to_client;
    tally.finished(&pick, &t, &outcome);
    ended(&route, &pick, &outcome);
}

/// Reads more of an untrusted client's first bytes while `buf` holds only the beginning of a
/// PROXY signature (`PRO`, part of the v2 signature), until they are a whole signature or
/// something else, the client stops sending, or `timeout` passes. A caller refuses the
/// connection when `buf` still looks like a header afterwards.
async fn settle_signature(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    let until = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 64];
    while proxy_in::looks_like_header(buf) && !proxy_in::is_header(buf) {
        match tokio::time::timeout_at(until, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Counts and logs a PROXY header sent by a peer the entry point does not trust (the caller
/// closes the connection).
fn refuse_untrusted_header(
    ep: &EntryPointState,
    tally: &mut Tally<&EntryPointState>,
    peer: SocketAddr,
) {
    EntryPointCounters::inc(&ep.counters.proxy_protocol_errors);
    tally.fail(Failure::ProxyProtocol);
    tracing::debug!(entry_point = %ep.name, peer = %peer, "PROXY header from an untrusted address refused");
}

/// What the first bytes of an untrusted client were.
enum First {
    /// Not a PROXY header (they are in the buffer); the count of bytes already relayed from the
    /// server to the client.
    Data(u64),
    /// A PROXY header: refuse (bytes relayed so far).
    Header(u64),
    /// The connection ended before the client sent a byte (bytes relayed, how).
    Ended(u64, Outcome),
}

/// Waits for the client's first bytes (into `buf`) while relaying what the server sends first,
/// so that server-first protocols work; bounded by `timeout` once a byte that may start a PROXY
/// signature came, and by the termination delay once one side closed.
async fn untrusted_first_bytes(
    stream: &mut TcpStream,
    backend: &mut BackendStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
    delay: Option<Duration>,
) -> io::Result<First> {
    use tokio::io::AsyncReadExt;
    let mut relay: Vec<u8> = Vec::new();
    let mut relayed = 0u64;
    let mut backend_eof = false;
    let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut chunk = [0u8; 1024];
    loop {
        tokio::select! {
            r = stream.read(&mut chunk) => {
                let n = r?;
                if n == 0 {
                    // The client closed without a byte: the copy sees its EOF and half-closes.
                    return Ok(First::Data(relayed));
                }
                buf.extend_from_slice(&chunk[..n]);
                break;
            }
            r = async {
                if relay.is_empty() {
                    relay = vec![0u8; 16 * 1024];
                }
                backend.read(&mut relay).await
            }, if !backend_eof => {
                let n = r?;
                if n == 0 {
                    backend_eof = true;
                    let _ = stream.shutdown().await;
                    deadline = delay.map(|d| Box::pin(tokio::time::sleep(d)));
                } else {
                    stream.write_all(&relay[..n]).await?;
                    relayed += n as u64;
                }
            }
            () = async {
                match deadline.as_mut() {
                    Some(d) => d.as_mut().await,
                    None => std::future::pending().await,
                }
            } => return Ok(First::Ended(relayed, Outcome::TerminationDelay)),
        }
    }
    settle_signature(stream, buf, timeout).await?;
    if proxy_in::looks_like_header(buf) {
        Ok(First::Header(relayed))
    } else {
        Ok(First::Data(relayed))
    }
}

/// Terminates TLS (replaying the peeked bytes to rustls), then copies plaintext to the server.
#[allow(clippy::too_many_arguments)]
async fn terminate(
    stream: TcpStream,
    buf: Vec<u8>,
    cfg: Option<Arc<rustls::ServerConfig>>,
    route: &Route,
    client: ClientAddrs,
    ep: &EntryPointState,
    opts: &Options,
    tally: &mut Tally<&EntryPointState>,
) {
    let Some(cfg) = cfg else {
        EntryPointCounters::inc(&ep.counters.tls_errors);
        tally.tls_failed();
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let pre = Prefixed {
        prefix: buf,
        pos: 0,
        inner: stream,
    };
    let mut tls = match acceptor.accept(pre).await {
        Ok(s) => s,
        Err(e) => {
            EntryPointCounters::inc(&ep.counters.tls_errors);
            tally.tls_failed();
            tracing::debug!(router = %route.name, client = %client.source, error = %e, "TLS handshake failed");
            return;
        }
    };
    let Some((pick, mut backend)) = dial(route, client, &|| client.destination, opts, tally).await
    else {
        return;
    };
    tally.connected(&pick);
    let _srv_open = pick.server.counters.open();
    let _svc_open = pick.service.counters.open();
    let sinks = sinks(route, &pick);
    let mut meter = copy::Meter::new(&sinks);
    let (outcome, t) = copy::copy_buffered(
        &mut tls,
        &mut backend,
        pick.service.termination_delay,
        &mut meter,
    )
    .await;
    tally.finished(&pick, &t, &outcome);
    ended(route, &pick, &outcome);
}

/// The counters a connection's bytes go to (while it is open: see [`copy::Meter`]).
pub(crate) fn sinks<'a>(route: &'a Route, pick: &'a Pick) -> [&'a Counters; 3] {
    [
        &*route.counters,
        &*pick.service.counters,
        &pick.server.counters,
    ]
}

/// Logs how a proxied connection ended when an error ended it.
pub(crate) fn ended(route: &Route, pick: &Pick, outcome: &Outcome) {
    if let Outcome::Error(e) = outcome {
        tracing::trace!(router = %route.name, server = %pick.server.address, error = %e, "connection ended by an error");
    }
}

/// Picks and dials a server, trying the next one on failure (bounded attempts); failed servers
/// are held out for a while.
async fn dial(
    route: &Route,
    client: ClientAddrs,
    dst: &(dyn Fn() -> SocketAddr + Sync),
    opts: &Options,
    tally: &mut Tally<&EntryPointState>,
) -> Option<(Pick, BackendStream)> {
    let mut tried: Tried = Vec::new();
    for _ in 0..opts.dial_attempts.max(1) {
        let Some(pick) = route.service.pick(&tried) else {
            break;
        };
        let Some(transport) = pick.service.transport.as_ref() else {
            break;
        };
        let start = tokio::time::Instant::now();
        // The original addresses only matter to a PROXY header toward the server.
        let addrs = pick.service.proxy_protocol.then(|| ClientAddrs {
            source: client.source,
            destination: dst(),
        });
        // Boxed on its own (as this future is by the caller): each stays small enough for the
        // allocator's per-thread cache (glibc: up to 1032 bytes); one ~1 KiB block would take the
        // allocator's slow path (and its consolidation of free chunks) on every connection.
        match Box::pin(transport.dial_addr(&pick.server.address, pick.server.tls, addrs)).await {
            Ok(s) => {
                dialled(&pick, start.elapsed());
                return Some((pick, s));
            }
            Err(e) => {
                dial_failed(route, &pick, &e, opts.hold_out);
                tried.push(pick.server);
            }
        }
    }
    no_server(route, tally, !tried.is_empty(), client.source);
    None
}

/// Counts a successful dial of `pick` that took `took`.
pub(crate) fn dialled(pick: &Pick, took: Duration) {
    pick.server.counters.dial_duration.observe(took);
    pick.server.counters.dial_micros.fetch_add(
        took.as_micros() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Counts, holds out (for `hold_out`) and logs a failed dial of `pick` for `route`; the caller
/// tries the next server.
pub(crate) fn dial_failed(route: &Route, pick: &Pick, e: &DialError, hold_out: Duration) {
    let reason = e.reason();
    pick.server.counters.dial_error(reason);
    pick.service.counters.dial_error(reason);
    pick.server.hold_out(hold_out);
    tracing::warn!(router = %route.name, service = %pick.service.name, error = %e,
        reason = reason.as_str(), "dial failed; trying the next server");
}

/// Counts and logs a connection of `route` closed because no server was dialled (`dial_failed`:
/// some were tried, else none was available).
pub(crate) fn no_server<E: std::ops::Deref<Target = EntryPointState>>(
    route: &Route,
    tally: &mut Tally<E>,
    dial_failed: bool,
    client: SocketAddr,
) {
    route
        .service
        .service
        .counters
        .no_server
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tally.fail_route(
        route,
        if dial_failed {
            Failure::DialFailed
        } else {
            Failure::NoHealthyServer
        },
    );
    tracing::warn!(router = %route.name, service = %route.service.service.name, client = %client,
        "no server available; closing the connection");
}
