//! Entry points: binding listeners and the accept loop.
//!
//! `:5432` binds every address (IPv6 `[::]` dual-stack, IPv4 `0.0.0.0` when the host has no
//! IPv6). The accept loop survives EMFILE/ENFILE and other accept errors (logs, backs off,
//! continues); `maxConnections` is a semaphore taken before accepting, so excess clients wait in the
//! kernel's backlog instead of being accepted and dropped.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::metrics::EntryPointCounters;

/// An entry point address that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The address cannot be read.
    #[error("entry point {entry_point}: invalid address {address:?}: {message}")]
    Address {
        /// The entry point.
        entry_point: String,
        /// The address as written.
        address: String,
        /// What is wrong.
        message: String,
    },
    /// The listener cannot be bound (`EADDRINUSE`: another process, e.g. another tagway,
    /// listens there).
    #[error("entry point {entry_point}: cannot listen on {address}: {source}{}",
        if source.kind() == io::ErrorKind::AddrInUse {
            " (another process listens there: is another tagway running?)"
        } else { "" })]
    Bind {
        /// The entry point.
        entry_point: String,
        /// The address.
        address: SocketAddr,
        /// The error.
        source: io::Error,
    },
}

/// Reads an entry point address: `host:port`, `[v6]:port` or `:port` (every address).
pub fn parse_address(entry_point: &str, address: &str) -> Result<Vec<SocketAddr>, BindError> {
    let err = |message: String| BindError::Address {
        entry_point: entry_point.to_owned(),
        address: address.to_owned(),
        message,
    };
    let a = address.trim();
    // Traefik accepts a trailing "/tcp".
    let a = a.strip_suffix("/tcp").unwrap_or(a);
    if let Some(port) = a.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| err(format!("invalid port {port:?}")))?;
        return Ok(vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ]);
    }
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Ok(vec![sa]);
    }
    a.to_socket_addrs()
        .map(|it| it.take(1).collect::<Vec<_>>())
        .map_err(|e| err(e.to_string()))
        .and_then(|v| {
            if v.is_empty() {
                Err(err("resolves to no address".into()))
            } else {
                Ok(v)
            }
        })
}

/// Binds a non-blocking listener with SO_REUSEADDR and, when `shared` (Unix), SO_REUSEPORT, so
/// several listening sockets can have the same address and the kernel spreads connections over
/// them. Use [`bind_group`] for an entry point: it refuses an address another process listens on.
pub fn bind_addr(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    let sock = socket(addr)?;
    #[cfg(all(unix, not(target_os = "solaris"), not(target_os = "illumos")))]
    if shared {
        sock.set_reuse_port(true)?;
    }
    #[cfg(not(all(unix, not(target_os = "solaris"), not(target_os = "illumos"))))]
    let _ = shared;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR: restart while old connections are in TIME_WAIT. It never lets two listeners
    // share an address.
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    // Linux copies TCP_NODELAY from the listener to every accepted socket: set once here
    // instead of once per connection.
    #[cfg(target_os = "linux")]
    sock.set_tcp_nodelay(true)?;
    Ok(sock)
}

/// Worker threads that accept from one listening socket. Up to this many workers share an
/// accept queue (each holds a duplicate of the socket): a new connection goes to whichever of
/// them is free first, instead of waiting in the queue of a busy thread while another idles. A
/// shared queue wakes every idle worker of the group for each connection (all but one find it
/// taken), so larger worker counts get several sockets in an SO_REUSEPORT group, each shared by
/// at most this many workers.
///
/// Measured on the 2-core bench (`docs/performance.md`, fifth round): against one SO_REUSEPORT
/// socket per worker, CPU per request 0.92 and per new connection 0.96 (paired medians), req/s
/// 1.06 and connections/s 1.02.
pub const WORKERS_PER_SOCKET: usize = 4;

/// Binds the listeners of `count` worker threads on `addr`, one per worker, that only this
/// process shares: `count.div_ceil(WORKERS_PER_SOCKET)` sockets, each duplicated for the
/// workers that share it (worker `w` gets socket `w % sockets`).
///
/// With several sockets:
/// - before the SO_REUSEPORT group is created, the address is bound once without SO_REUSEPORT:
///   a listener of another process (another tagway included) makes that fail with
///   `EADDRINUSE`, so a second gateway cannot silently share the port;
/// - on Linux the group gets a classic BPF program that spreads new connections over the first
///   sockets only (ours, created first): a socket another process of the same user adds later
///   with SO_REUSEPORT receives no connection.
///
/// With one socket (up to [`WORKERS_PER_SOCKET`] workers) it has no SO_REUSEPORT at all.
/// Fewer than `count` listeners are returned when a worker's cannot be made (logged here): the
/// first one always is.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let count = count.max(1);
    let mut all = bind_sockets(addr, count.div_ceil(WORKERS_PER_SOCKET))?;
    let sockets = all.len();
    for w in sockets..count {
        match all[w % sockets].try_clone() {
            Ok(l) => all.push(l),
            Err(e) => {
                tracing::warn!(address = %addr, error = %e,
                    "cannot share the listener with another worker; fewer threads serve it");
                break;
            }
        }
    }
    Ok(all)
}

/// Binds `count` listening sockets on `addr` (see [`bind_group`]).
fn bind_sockets(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if count <= 1 {
        return Ok(vec![bind_addr(addr, false)?]);
    }
    let first = if addr.port() != 0 {
        // The probe: exclusive, not listening; released right after.
        let probe = socket(addr)?;
        probe.bind(&addr.into())?;
        drop(probe);
        bind_addr(addr, true)?
    } else {
        bind_addr(addr, true)?
    };
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count {
        match bind_addr(bound, true) {
            Ok(l) => all.push(l),
            Err(e) => {
                tracing::warn!(address = %bound, error = %e,
                    "cannot add a listening socket (SO_REUSEPORT); fewer sockets serve it");
                break;
            }
        }
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = spread_over_first(&all[0], all.len() as u32) {
        tracing::debug!(address = %bound, error = %e,
            "no SO_ATTACH_REUSEPORT_CBPF: the kernel's hash spreads connections");
    }
    Ok(all)
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic value; the libc crate lacks it for Linux).
#[cfg(target_os = "linux")]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Attaches `A = random() % n; return A` to the SO_REUSEPORT group of `l`: each new connection
/// goes to one of the group's first `n` sockets (ours), never to a socket added later.
#[cfg(all(
    target_os = "linux",
    not(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))
))]
fn spread_over_first(l: &std::net::TcpListener, n: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let mut prog = [
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        ),
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, n.max(1)),
        op(libc::BPF_RET | libc::BPF_A, 0),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a valid sock_fprog whose filter
    // array outlives the call (the kernel copies it).
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )
))]
fn spread_over_first(_l: &std::net::TcpListener, _n: u32) -> io::Result<()> {
    Err(io::Error::other(
        "SO_ATTACH_REUSEPORT_CBPF has another value on this architecture",
    ))
}

/// Binds an entry point (the first candidate address that works: `[::]` then `0.0.0.0` for
/// `:port`) with `count` listeners (one per worker thread; see [`bind_group`]).
pub fn bind(
    entry_point: &str,
    address: &str,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, BindError> {
    let candidates = parse_address(entry_point, address)?;
    let mut last = None;
    for a in &candidates {
        match bind_group(*a, count) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some((*a, e)),
        }
    }
    let (address, source) = last.unwrap_or_else(|| {
        (
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            io::Error::other("no address"),
        )
    });
    Err(BindError::Bind {
        entry_point: entry_point.to_owned(),
        address,
        source,
    })
}

/// True for accept errors that mean "out of descriptors or memory".
pub(crate) fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// True for accept errors that concern only the connection being accepted (it was reset
/// before accept, or a firewall or the network refused it; accept(2) says to retry at once).
/// Other errors may repeat on every call: the loop backs off on them instead of spinning.
pub(crate) fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EINTR
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// True when the calling task runs on a current-thread runtime (each of tagway's workers has
/// one): its tasks stay on this thread, and no event is dispatched while one of them runs.
/// Settled once per accept loop, for the loop and its connections.
pub fn on_current_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// The semaphore of `maxConnections` (shared by the entry point's listeners on every worker).
pub fn connection_limit(max_connections: Option<u64>) -> Option<Arc<Semaphore>> {
    max_connections.map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS as u64) as usize)))
}

/// What an accept loop shares with the event loops of its entry point (Linux): while `paused`
/// says so the event loops accept and this loop does not (its listener is out of the runtime's
/// epoll instance); `handoff` brings it the connections they accepted but cannot serve.
#[derive(Debug)]
pub struct Shared {
    /// `true` while the event loops accept.
    pub paused: watch::Receiver<bool>,
    /// Connections handed over by an event loop.
    pub handoff: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
}

/// The listener of an accept loop: in the runtime, or parked outside it while the event loops
/// accept.
enum Listening {
    Registered(TcpListener),
    Parked(std::net::TcpListener),
}

impl Listening {
    /// Parks or registers the listener as `paused` says.
    fn set(self, paused: bool) -> io::Result<Listening> {
        Ok(match (self, paused) {
            (Listening::Registered(l), true) => Listening::Parked(l.into_std()?),
            (Listening::Parked(l), false) => Listening::Registered(TcpListener::from_std(l)?),
            (l, _) => l,
        })
    }

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match self {
            Listening::Registered(l) => l.accept().await,
            Listening::Parked(_) => std::future::pending().await,
        }
    }
}

/// A handed-over connection, or never without a channel.
async fn handed_over(
    handoff: &mut Option<tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>>,
) -> Option<(std::net::TcpStream, SocketAddr)> {
    match handoff {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

/// The receiver back once the event loops started or stopped accepting (never without one).
/// Awaited from one pinned future until it resolves: not a new waiter per accept.
async fn next_switch(paused: Option<watch::Receiver<bool>>) -> watch::Receiver<bool> {
    if let Some(mut p) = paused
        && p.changed().await.is_ok()
    {
        return p;
    }
    std::future::pending().await
}

/// Accepts connections until `stop` turns true, then waits for the open ones up to `grace` and
/// aborts the rest. `handle` serves one connection. With `shared`, the loop accepts only while
/// the event loops do not, and serves what they hand over.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop<F, Fut>(
    name: Arc<str>,
    listener: std::net::TcpListener,
    max_connections: Option<Arc<Semaphore>>,
    counters: Arc<EntryPointCounters>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    shared: Option<Shared>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = max_connections;
    let (paused, mut handoff) = match shared {
        Some(s) => (Some(s.paused), Some(s.handoff)),
        None => (None, None),
    };
    // In the runtime unless the event loops accept; re-set only when that changes.
    let start_paused = paused.as_ref().is_some_and(|p| *p.borrow());
    let mut listener = match Listening::Parked(listener).set(start_paused) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(entry_point = %name, error = %e, "cannot register the listener");
            return;
        }
    };
    let switched = next_switch(paused);
    tokio::pin!(switched);
    let mut conns = Open::default();
    let mut backoff = Duration::from_millis(5);
    // tagway's workers are current-thread runtimes: keep their connections' timers from waking
    // them (`anchor`).
    let anchored = on_current_thread_runtime();
    // One `changed()` future for the whole loop: creating one per accept registers and removes
    // a waiter on the channel every time.
    if *stop.borrow_and_update() {
        return;
    }
    let stopped = stop.changed();
    tokio::pin!(stopped);
    'accept: loop {
        let permit = match &sem {
            None => None,
            Some(s) => tokio::select! {
                p = s.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => break 'accept,
                },
                _ = &mut stopped => break 'accept,
            },
        };
        let (stream, peer, handed) = loop {
            let Some(l) = listener.as_ref() else {
                break 'accept;
            };
            tokio::select! {
                biased;
                _ = &mut stopped => break 'accept,
                Some((s, peer)) = handed_over(&mut handoff) => match TcpStream::from_std(s) {
                    Ok(s) => break (s, peer, true),
                    Err(e) => {
                        tracing::warn!(entry_point = %name, error = %e, "cannot register a connection");
                        continue;
                    }
                },
                rx = &mut switched => {
                    let pause = *rx.borrow();
                    switched.set(next_switch(Some(rx)));
                    match listener.take().map(|l| l.set(pause)) {
                        Some(Ok(l)) => listener = Some(l),
                        Some(Err(e)) => {
                            tracing::error!(entry_point = %name, error = %e, "cannot register the listener");
                            break 'accept;
                        }
                        None => break 'accept,
                    }
                    continue;
                }
                res = l.accept() => match res {
                    Ok((s, peer)) => break (s, peer, false),
                    Err(e) => {
                        EntryPointCounters::inc(&counters.accept_errors);
                        if is_per_connection_error(&e) {
                            tracing::debug!(entry_point = %name, error = %e, "accept failed");
                            continue;
                        }
                        if is_resource_error(&e) {
                            tracing::warn!(entry_point = %name, error = %e, backoff = ?backoff,
                                "accept failed: out of resources, backing off");
                        } else {
                            tracing::warn!(entry_point = %name, error = %e, backoff = ?backoff,
                                "accept failed, backing off");
                        }
                        tokio::select! {
                            _ = &mut stopped => break 'accept,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
            }
        };
        backoff = Duration::from_millis(5);
        if !handed {
            // The event loop counted the handed-over ones.
            EntryPointCounters::inc(&counters.accepted);
        }
        if anchored {
            crate::anchor::accepted();
        }
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let fut = handle(stream, peer);
        conns.push(match permit {
            // The connection's future as it is: a wrapper would move it once more (it is large).
            None => tokio::spawn(fut),
            Some(permit) => tokio::spawn(async move {
                fut.await;
                drop(permit);
            }),
        });
    }
    drop(listener);
    conns.reap();
    let open = conns.handles.len();
    if open > 0 {
        tracing::info!(entry_point = %name, open, grace = ?grace, "stopped accepting; draining connections");
        let drained = tokio::time::timeout(grace, async {
            while let Some(h) = conns.handles.last_mut() {
                let _ = h.await;
                conns.handles.pop();
            }
        })
        .await;
        if drained.is_err() {
            conns.reap();
            tracing::info!(entry_point = %name, left = conns.handles.len(), "grace period over; closing the remaining connections");
            for h in conns.handles.drain(..) {
                h.abort();
                let _ = h.await;
            }
        }
    }
}

/// The tasks of an accept loop's connections, to wait for at shutdown and abort after the grace
/// period.
///
/// A plain list of join handles, cleared of the finished ones only when it has doubled since
/// the last time: per connection a push and, amortized, one `is_finished` check. (A `JoinSet`
/// costs an allocation, three lock round trips and a wake-up of the set per connection: ~0.6 %
/// of a short connection's CPU in a profile.) Finished tasks keep their task allocation until
/// then: at most as many as are open, or [`Open::MIN_REAP`].
#[derive(Default)]
struct Open {
    handles: Vec<JoinHandle<()>>,
    /// Reap when `handles` reaches this length.
    reap_at: usize,
}

impl Open {
    /// The fewest handles kept before the first reap.
    const MIN_REAP: usize = 64;

    fn push(&mut self, h: JoinHandle<()>) {
        self.handles.push(h);
        if self.handles.len() >= self.reap_at {
            self.reap();
        }
    }

    /// Drops the handles of finished connections.
    fn reap(&mut self) {
        self.handles.retain(|h| !h.is_finished());
        self.reap_at = (self.handles.len() * 2).max(Self::MIN_REAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_per_connection_or_backing_off() {
        let os = io::Error::from_raw_os_error;
        for per_connection in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM, libc::EINTR] {
            assert!(
                is_per_connection_error(&os(per_connection)),
                "{per_connection}"
            );
        }
        for back_off in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_per_connection_error(&os(back_off)));
            assert!(is_resource_error(&os(back_off)));
        }
        // An unexpected error (it may come on every call) backs off too.
        assert!(!is_per_connection_error(&os(libc::EINVAL)));
        assert!(!is_resource_error(&os(libc::EINVAL)));
    }

    /// The socket behind a descriptor (its inode).
    fn socket_id(l: &std::net::TcpListener) -> u64 {
        use std::os::fd::AsRawFd;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `st` for a descriptor we own.
        let rc = unsafe { libc::fstat(l.as_raw_fd(), st.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: fstat succeeded.
        unsafe { st.assume_init() }.st_ino
    }

    /// Accepts `n` connections from any of `ours` (bounded); returns how many each took.
    async fn accept_all(ours: &[TcpListener], n: usize) -> Vec<usize> {
        let mut taken = vec![0; ours.len()];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while taken.iter().sum::<usize>() < n && tokio::time::Instant::now() < deadline {
            for (i, l) in ours.iter().enumerate() {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(5), l.accept()).await
                {
                    taken[i] += 1;
                }
            }
        }
        taken
    }

    #[tokio::test]
    async fn workers_share_one_socket_up_to_the_group_size() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), WORKERS_PER_SOCKET).unwrap();
        assert_eq!(group.len(), WORKERS_PER_SOCKET);
        let id = socket_id(&group[0]);
        assert!(group.iter().all(|l| socket_id(l) == id), "one socket");
        let addr = group[0].local_addr().unwrap();
        // One socket, no SO_REUSEPORT: nothing else can join, with or without it.
        for shared in [false, true] {
            let e = bind_addr(addr, shared).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        }
        // Any worker's descriptor accepts from the one queue.
        let ours: Vec<TcpListener> = group
            .into_iter()
            .map(|l| TcpListener::from_std(l).unwrap())
            .collect();
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        assert_eq!(
            ours[3].accept().await.unwrap().1,
            clients[0].local_addr().unwrap()
        );
        assert_eq!(accept_all(&ours, 7).await.iter().sum::<usize>(), 7);
    }

    #[tokio::test]
    async fn a_group_is_not_shared_with_another_process() {
        let count = 2 * WORKERS_PER_SOCKET + 1;
        let group = bind_group("127.0.0.1:0".parse().unwrap(), count).unwrap();
        assert_eq!(group.len(), count);
        let addr = group[0].local_addr().unwrap();
        assert!(group.iter().all(|l| l.local_addr().unwrap() == addr));
        // Three sockets; worker w has socket w % 3.
        let ids: Vec<u64> = group.iter().map(socket_id).collect();
        for (w, id) in ids.iter().enumerate() {
            assert_eq!(*id, ids[w % 3], "worker {w}");
        }
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        // What a second gateway does: refused, with or without SO_REUSEPORT.
        let e = bind_group(addr, count).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert_eq!(
            bind_group(addr, 1).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        let e = bind("web", &addr.to_string(), 2).unwrap_err().to_string();
        assert!(
            e.contains("entry point web")
                && e.contains(&addr.to_string())
                && e.contains("another tagway"),
            "{e}"
        );
        // A foreign SO_REUSEPORT socket of the same user can join the group, but gets no
        // connection: every one lands on ours, on each of the three sockets.
        let foreign = bind_addr(addr, true).unwrap();
        foreign.set_nonblocking(true).unwrap();
        let ours: Vec<TcpListener> = group
            .into_iter()
            .take(3)
            .map(|l| TcpListener::from_std(l).unwrap())
            .collect();
        let mut clients = Vec::new();
        for _ in 0..60 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let taken = accept_all(&ours, clients.len()).await;
        assert_eq!(taken.iter().sum::<usize>(), clients.len());
        assert!(taken.iter().all(|n| *n > 0), "{taken:?}");
        assert!(
            foreign.accept().is_err(),
            "the foreign socket got a connection"
        );
    }

    #[tokio::test]
    async fn finished_connections_are_reaped_and_open_ones_kept() {
        let mut open = Open::default();
        let (release, wait) = tokio::sync::watch::channel(false);
        // Ten connections that stay open, then a thousand that end at once.
        for _ in 0..10 {
            let mut wait = wait.clone();
            open.push(tokio::spawn(async move {
                let _ = wait.wait_for(|r| *r).await;
            }));
        }
        for _ in 0..1000 {
            open.push(tokio::spawn(async {}));
            tokio::task::yield_now().await;
            // Eleven open at most: the list never grows past the floor of its reaps.
            assert!(
                open.handles.len() <= Open::MIN_REAP,
                "{}",
                open.handles.len()
            );
        }
        open.reap();
        assert_eq!(open.handles.len(), 10);
        release.send(true).unwrap();
        for h in open.handles.drain(..) {
            h.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_paused_loop_serves_handed_over_connections_and_resumes_accepting() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (paused_tx, paused) = watch::channel(true);
        let (handoff_tx, handoff) = tokio::sync::mpsc::unbounded_channel();
        let (stop_tx, stop) = watch::channel(false);
        let counters = Arc::new(EntryPointCounters::default());
        let task = tokio::spawn(accept_loop(
            "ep".into(),
            listener,
            None,
            counters.clone(),
            stop,
            Duration::from_secs(1),
            Some(Shared { paused, handoff }),
            |mut s: TcpStream, peer: SocketAddr| async move {
                let _ = s.write_all(peer.to_string().as_bytes()).await;
            },
        ));
        // Paused: a connection waits in the backlog; a handed-over one is served.
        let mut waiting = TcpStream::connect(addr).await.unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut handed = TcpStream::connect(other.local_addr().unwrap())
            .await
            .unwrap();
        let (s, peer) = other.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        handoff_tx.send((s, peer)).unwrap();
        let mut out = String::new();
        handed.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, handed.local_addr().unwrap().to_string());
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), waiting.read(&mut b))
                .await
                .is_err(),
            "a paused loop accepted"
        );
        assert_eq!(
            counters.accepted.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        // Resumed: the waiting connection is accepted and served.
        paused_tx.send(false).unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), waiting.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, waiting.local_addr().unwrap().to_string());
        assert_eq!(
            counters.accepted.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn addresses() {
        let v = parse_address("ep", ":5432").unwrap();
        assert_eq!(v[0], "[::]:5432".parse().unwrap());
        assert_eq!(v[1], "0.0.0.0:5432".parse().unwrap());
        assert_eq!(
            parse_address("ep", "127.0.0.1:80/tcp").unwrap(),
            vec!["127.0.0.1:80".parse().unwrap()]
        );
        let e = parse_address("ep", ":http").unwrap_err().to_string();
        assert!(e.contains("entry point ep") && e.contains(":http"), "{e}");
    }

    #[tokio::test]
    async fn dual_stack_all_addresses() {
        let l = TcpListener::from_std(bind("ep", ":0", 1).unwrap().remove(0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        // Accepted sockets inherit TCP_NODELAY from the listener (Linux) or get it per accept.
        #[cfg(target_os = "linux")]
        assert!(s.nodelay().unwrap(), "accepted socket without TCP_NODELAY");
        assert_eq!(
            crate::middleware::canonical_ip(peer.ip()),
            c.local_addr().unwrap().ip()
        );
    }
}
