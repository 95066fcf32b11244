//! The event-loop data path (Linux): plain-TCP connections served by threads that own their
//! `epoll_wait`, as nginx's workers do, instead of tasks on tokio's runtimes.
//!
//! An entry point without inbound PROXY protocol and without `maxConnections` is served here
//! while its routes need nothing this path does not do: no router with `tls` (no ClientHello to
//! peek), and services whose servers are dialled as plain TCP to an IP address (no TLS, no PROXY
//! header, no host name to resolve; [`Balancer::is_plain`](crate::balancer::Balancer::is_plain)).
//! Whenever a configuration changes that, the server flips the entry point's [`Switch`]: the
//! event loops stop accepting on it and its tokio accept loops resume, and back. A connection
//! that one of these loops accepted while the configuration changed under it is handed to a
//! tokio accept loop of its entry point ([`Handoff`]), which serves it from the start.
//!
//! Each loop thread has its own epoll instance. The listening sockets are registered
//! level-triggered with `EPOLLEXCLUSIVE` (one idle loop is woken per new connection) and one
//! connection is accepted per wake; connections are registered edge-triggered once and closed
//! without `EPOLL_CTL_DEL`. Per connection the semantics are the tokio path's (`conn`, `copy`):
//! routing by client IP, middlewares, smooth weighted round-robin with next-server retry and
//! hold-out, `dialTimeout`, `dialKeepAlive`, the copy with half-close and `terminationDelay`
//! (small messages through a buffer, bulk with splice(2)), the same counters, access log and
//! logs. Measured in `docs/performance.md` (thirteenth round).

use std::collections::BTreeSet;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::SockRef;
use tagway_transport::{DialError, DialErrorKind, DialStage};
use tokio::sync::{mpsc, watch};

use crate::balancer::{Pick, Tried};
use crate::conn::{EntryPointState, Options};
use crate::copy::splice::{CHUNK, Mode, Pipe, SMALL, keep, recv, send, splice};
use crate::copy::{Outcome, Transferred};
use crate::entrypoint::{is_per_connection_error, is_resource_error};
use crate::metrics::EntryPointCounters;
use crate::observability::counters::Failure;
use crate::observability::tally::Tally;
use crate::router::{ConnInfo, Route};
use crate::runtime::Tables;

/// A connection an event loop accepted but cannot serve (the configuration changed under it),
/// handed to a tokio accept loop of the same entry point, which serves it from the start.
pub type Handoff = (std::net::TcpStream, SocketAddr);

/// Which path accepts an entry point's connections now: the event loops (`true`) or its tokio
/// accept loops. Set by the server after every configuration change.
/// One value (`true`: the event loops) that the event loops read when woken and the tokio accept
/// loops watch.
#[derive(Debug)]
pub struct Switch {
    to_loops: watch::Sender<bool>,
}

impl Switch {
    /// A switch with the tokio accept loops accepting.
    pub fn new() -> Arc<Switch> {
        Arc::new(Switch {
            to_loops: watch::channel(false).0,
        })
    }

    /// Hands the entry point to the event loops (`true`) or to tokio; true when that changed
    /// (the event loops must then be woken: [`Waker::wake`]).
    pub fn set(&self, event_loops: bool) -> bool {
        self.to_loops.send_if_modified(|v| {
            let changed = *v != event_loops;
            *v = event_loops;
            changed
        })
    }

    /// True while the event loops accept.
    pub fn event_loops(&self) -> bool {
        *self.to_loops.borrow()
    }

    /// For a tokio accept loop: `true` while it must not accept.
    pub fn tokio_paused(&self) -> watch::Receiver<bool> {
        self.to_loops.subscribe()
    }
}

/// True when the event loops can serve every connection `tables` route on `entry_point`: no
/// router with `tls` (nothing to peek) and only services dialled as plain TCP to IP addresses.
/// An entry point without routes qualifies (its connections are counted as unrouted and closed).
pub fn can_serve(tables: &Tables, entry_point: &str) -> bool {
    tables
        .entry_points
        .get(entry_point)
        .is_none_or(|t| !t.needs_peek() && t.routes().all(|r| r.service.is_plain()))
}

/// An entry point as one event loop serves it.
#[derive(Debug)]
pub struct EntrySpec {
    /// This loop's descriptor of the entry point's listening socket.
    pub listener: std::net::TcpListener,
    /// The entry point.
    pub state: Arc<EntryPointState>,
    /// Whether the event loops accept on it now.
    pub switch: Arc<Switch>,
    /// Where connections this loop cannot serve go (a tokio accept loop of the entry point).
    pub handoff: mpsc::UnboundedSender<Handoff>,
}

/// Wakes an event loop (an eventfd in its epoll instance): to re-read the switches, or to stop.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
    stop: AtomicBool,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: a new descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            stop: AtomicBool::new(false),
        })
    }

    /// Makes the loop re-read its entry points' switches.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. EAGAIN (the counter is
        // full) means a wake-up is pending anyway.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Makes the loop stop accepting, drain its connections up to the grace period, and end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }
}

/// Starts an event-loop thread serving `entries`; it ends after [`Waker::stop`] once its
/// connections have closed or `grace` has passed. Returns its waker and its thread.
pub fn spawn(
    index: usize,
    entries: Vec<EntrySpec>,
    tables: Arc<ArcSwap<Tables>>,
    opts: Arc<Options>,
    grace: Duration,
) -> io::Result<(Arc<Waker>, std::thread::JoinHandle<()>)> {
    let waker = Arc::new(Waker::new()?);
    let mut lp = EventLoop::new(entries, tables, opts, grace, waker.clone())?;
    let thread = std::thread::Builder::new()
        .name(format!("tagway-loop-{index}"))
        .spawn(move || lp.run())?;
    Ok((waker, thread))
}

/// Readiness of one socket, as its edge-triggered events reported it.
#[derive(Clone, Copy, Debug, Default)]
struct Ready {
    r: bool,
    w: bool,
    /// The peer's FIN came (`EPOLLRDHUP`): a short read drained the stream to its end.
    rdhup: bool,
    /// An error is pending (`EPOLLERR`): the next read or write reports it.
    err: bool,
}

impl Ready {
    fn update(&mut self, ev: u32) {
        let ev = ev as libc::c_int;
        if ev & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
            self.r = true;
        }
        if ev & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
            self.w = true;
        }
        if ev & (libc::EPOLLRDHUP | libc::EPOLLHUP) != 0 {
            self.rdhup = true;
        }
        if ev & libc::EPOLLERR != 0 {
            self.err = true;
        }
    }
}

/// One direction of a proxied connection.
struct Dir {
    mode: Mode,
    /// What the destination did not take at once (buffered mode).
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    pipe: Option<Pipe>,
    in_pipe: usize,
    last_in: usize,
    eof: bool,
    done: bool,
    amt: u64,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Dir {
    fn new() -> Dir {
        Dir {
            mode: Mode::Buffered,
            buf: None,
            pos: 0,
            cap: 0,
            pipe: None,
            in_pipe: 0,
            last_in: 0,
            eof: false,
            done: false,
            amt: 0,
        }
    }

    /// Sends `data` while `dst` takes it; returns how much it took.
    fn send_out(&mut self, dst: RawFd, dr: &mut Ready, data: &[u8]) -> io::Result<usize> {
        let mut off = 0;
        while off < data.len() && dr.w {
            match send(dst, &data[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    if n < data.len() - off {
                        // The socket's buffer is full: wait for the next writable edge.
                        dr.w = false;
                    }
                    off += n;
                    self.amt += n as u64;
                }
                Err(e) if would_block(&e) => dr.w = false,
                Err(e) => return Err(e),
            }
        }
        Ok(off)
    }

    /// Moves bytes from `src` to `dst` until one of them would block or `src` ended and
    /// everything was written (then `dst`'s write side is shut down, unless `other_done`: the
    /// sockets are about to be closed). `budget`: reads left in this turn.
    #[allow(clippy::too_many_arguments)]
    fn pump(
        &mut self,
        src: RawFd,
        sr: &mut Ready,
        dst: RawFd,
        dr: &mut Ready,
        other_done: bool,
        splice_ok: bool,
        budget: &mut u32,
    ) -> io::Result<()> {
        if self.done {
            return Ok(());
        }
        loop {
            if self.pos < self.cap {
                let buf = self.buf.take().unwrap_or_default();
                let n = self.send_out(dst, dr, &buf[self.pos..self.cap]);
                self.buf = Some(buf);
                self.pos += n?;
                if self.pos < self.cap {
                    return Ok(());
                }
            }
            while self.in_pipe > 0 {
                if !dr.w {
                    return Ok(());
                }
                let from = self.pipe.as_ref().map_or(-1, Pipe::reader);
                match splice(from, dst, self.in_pipe) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.amt += n as u64;
                    }
                    Err(e) if would_block(&e) => dr.w = false,
                    Err(e) => return Err(e),
                }
            }
            if self.eof {
                if !other_done {
                    // SAFETY (of the descriptor): `dst` is open for the whole call.
                    unsafe { libc::shutdown(dst, libc::SHUT_WR) };
                }
                self.done = true;
                self.buf = None;
                if let Some(p) = self.pipe.take() {
                    p.recycle(true);
                }
                return Ok(());
            }
            if !sr.r || *budget == 0 {
                return Ok(());
            }
            *budget -= 1;
            match self.mode {
                Mode::Buffered => {
                    let mut stack = [MaybeUninit::<u8>::uninit(); SMALL];
                    let n = match recv(src, &mut stack) {
                        Ok(n) => n,
                        Err(e) if would_block(&e) => {
                            sr.r = false;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if n == 0 {
                        self.eof = true;
                        continue;
                    }
                    let mut ended = false;
                    if n == SMALL {
                        if splice_ok {
                            self.mode = Mode::Splice;
                        }
                    } else if sr.err {
                        // Read on: the next call reports the error.
                    } else if sr.rdhup {
                        // The FIN came before this read, which took everything before it.
                        ended = true;
                    } else {
                        sr.r = false;
                    }
                    // SAFETY: recv initialised the first `n` bytes of `stack`.
                    let data: &[u8] =
                        unsafe { std::slice::from_raw_parts(stack.as_ptr().cast::<u8>(), n) };
                    let off = self.send_out(dst, dr, data)?;
                    if off < n {
                        self.pos = 0;
                        self.cap = keep(&mut self.buf, &data[off..]);
                    }
                    if ended {
                        self.eof = true;
                    }
                }
                Mode::Splice => {
                    if self.pipe.is_none() {
                        self.pipe = Some(Pipe::new()?);
                    }
                    let to = self.pipe.as_ref().map_or(-1, Pipe::writer);
                    match splice(src, to, CHUNK) {
                        Ok(0) => self.eof = true,
                        Ok(n) => {
                            self.in_pipe += n;
                            self.last_in = n;
                        }
                        Err(e) if would_block(&e) => {
                            sr.r = false;
                            if self.last_in < SMALL {
                                // Small messages again: back to two system calls per message.
                                self.mode = Mode::Buffered;
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some(p) = self.pipe.take() {
            p.recycle(self.in_pipe == 0);
        }
    }
}

/// A connection being dialled.
struct Dialing {
    pick: Pick,
    /// The server's address (`is_plain`: an IP address).
    peer: SocketAddr,
    started: Instant,
    deadline: Option<Instant>,
}

/// A connection being proxied (the server's and service's open gauges count it while it lives).
struct Proxying {
    pick: Pick,
    up: Dir,
    down: Dir,
    /// `terminationDelay`, armed when the first direction finished.
    deadline: Option<Instant>,
    /// Bytes already added to the counters.
    metered: (u64, u64),
}

impl Proxying {
    fn new(pick: Pick) -> Proxying {
        pick.server.counters.opened();
        pick.service.counters.opened();
        Proxying {
            pick,
            up: Dir::new(),
            down: Dir::new(),
            deadline: None,
            metered: (0, 0),
        }
    }
}

impl Drop for Proxying {
    fn drop(&mut self) {
        self.up.finish();
        self.down.finish();
        self.pick.server.counters.closed();
        self.pick.service.counters.closed();
    }
}

enum State {
    /// Between two dials (or before the first).
    Idle,
    Dialing(Dialing),
    Proxying(Proxying),
}

/// One client connection (closed, with its backend, when dropped).
struct Conn {
    client: OwnedFd,
    cr: Ready,
    backend: Option<OwnedFd>,
    br: Ready,
    peer: SocketAddr,
    route: Arc<Route>,
    tried: Tried,
    attempts: usize,
    state: State,
    // Dropped after the sockets were closed, like the tokio path's guards.
    _guards: Vec<crate::middleware::InFlightGuard>,
    tally: Tally<Arc<EntryPointState>>,
}

impl Conn {
    /// The deadline the timer of this connection is for now.
    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Idle => None,
            State::Dialing(d) => d.deadline,
            State::Proxying(p) => p.deadline,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.route.counters.closed();
    }
}

struct Slot {
    epoch: u32,
    conn: Option<Conn>,
}

/// Reads (recv or splice) one connection makes per turn before the others get theirs.
const READS_PER_TURN: u32 = 64;

/// Token of the eventfd.
const WAKE: u64 = 0;
/// Tokens of listeners: `LISTENER + entry index`.
const LISTENER: u64 = 1;
/// Tokens of connection sockets: `CONN | epoch << 33 | slot << 1 | side`.
const CONN: u64 = 1 << 63;
const EPOCH_MASK: u32 = (1 << 30) - 1;

fn conn_token(slot: usize, epoch: u32, backend: bool) -> u64 {
    CONN | (u64::from(epoch & EPOCH_MASK) << 33) | ((slot as u64) << 1) | u64::from(backend)
}

/// An entry point in one loop.
struct Entry {
    spec: EntrySpec,
    registered: bool,
    /// After an accept error that may repeat (EMFILE …): not registered until then.
    backoff_until: Option<Instant>,
    backoff: Duration,
}

struct EventLoop {
    epfd: OwnedFd,
    waker: Arc<Waker>,
    entries: Vec<Entry>,
    tables: Arc<ArcSwap<Tables>>,
    opts: Arc<Options>,
    grace: Duration,
    slots: Vec<Slot>,
    free: Vec<usize>,
    open: usize,
    /// (deadline, slot, epoch) of each connection's pending timer: removed when the connection
    /// leaves the state it was for, so it holds no more than the open connections.
    timers: BTreeSet<(Instant, usize, u32)>,
    draining: Option<Instant>,
    /// Connections whose turn ended with bytes possibly left to move.
    again: Vec<(usize, u32)>,
}

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: a valid epoll_event for the call's duration; descriptors owned by the caller.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Edge-triggered interest of a connection's socket.
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

impl EventLoop {
    fn new(
        entries: Vec<EntrySpec>,
        tables: Arc<ArcSwap<Tables>>,
        opts: Arc<Options>,
        grace: Duration,
        waker: Arc<Waker>,
    ) -> io::Result<EventLoop> {
        // SAFETY: no memory arguments; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        epoll_ctl(
            epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            waker.fd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            WAKE,
        )?;
        for e in &entries {
            e.listener.set_nonblocking(true)?;
        }
        Ok(EventLoop {
            epfd,
            waker,
            entries: entries
                .into_iter()
                .map(|spec| Entry {
                    spec,
                    registered: false,
                    backoff_until: None,
                    backoff: Duration::from_millis(5),
                })
                .collect(),
            tables,
            opts,
            grace,
            slots: Vec::new(),
            free: Vec::new(),
            open: 0,
            timers: BTreeSet::new(),
            draining: None,
            again: Vec::new(),
        })
    }

    fn run(&mut self) {
        self.sync_listeners();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let timeout = self.next_timeout();
            // SAFETY: `events` is valid for `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "event loop: epoll_wait failed; stopping");
                    return;
                }
                continue;
            }
            for ev in &events[..n as usize] {
                let (flags, token) = (ev.events, ev.u64);
                if token == WAKE {
                    self.on_wake();
                } else if token & CONN != 0 {
                    let slot = ((token >> 1) & 0xFFFF_FFFF) as usize;
                    let epoch = ((token >> 33) as u32) & EPOCH_MASK;
                    self.on_conn_event(slot, epoch, token & 1 == 1, flags);
                } else {
                    self.accept((token - LISTENER) as usize);
                }
            }
            for (slot, epoch) in std::mem::take(&mut self.again) {
                self.pump(slot, epoch);
            }
            self.fire_timers();
            if let Some(until) = self.draining {
                if self.open == 0 {
                    return;
                }
                if Instant::now() >= until {
                    tracing::info!(
                        left = self.open,
                        "grace period over; closing the remaining connections"
                    );
                    self.slots.clear();
                    return;
                }
            }
        }
    }

    /// Milliseconds until the next timer (rounded up), or -1.
    fn next_timeout(&mut self) -> libc::c_int {
        if !self.again.is_empty() {
            return 0;
        }
        let mut next = self.draining;
        for e in &self.entries {
            if let Some(b) = e.backoff_until {
                next = Some(next.map_or(b, |n| n.min(b)));
            }
        }
        if let Some(&(at, _, _)) = self.timers.first() {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        match next {
            None => -1,
            Some(at) => {
                let d = at.saturating_duration_since(Instant::now());
                d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
            }
        }
    }

    fn timer_live(&self, at: Instant, slot: usize, epoch: u32) -> bool {
        self.slots
            .get(slot)
            .filter(|s| s.epoch == epoch)
            .and_then(|s| s.conn.as_ref())
            .is_some_and(|c| c.deadline() == Some(at))
    }

    fn on_wake(&mut self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our eventfd (non-blocking).
        unsafe { libc::read(self.waker.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if self.waker.stop.load(Ordering::Acquire) && self.draining.is_none() {
            for e in std::mem::take(&mut self.entries) {
                // Removed explicitly: closing this loop's descriptor would not remove it while
                // other descriptors of the socket are open (tokio's, the other loops').
                if e.registered {
                    let fd = e.spec.listener.as_raw_fd();
                    let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, 0);
                }
            }
            if self.open > 0 {
                tracing::info!(open = self.open, grace = ?self.grace, "stopped accepting; draining connections");
            }
            self.draining = Some(Instant::now() + self.grace);
            return;
        }
        self.sync_listeners();
    }

    /// Registers or removes each listener as its switch (and accept back-off) says.
    fn sync_listeners(&mut self) {
        let now = Instant::now();
        for (i, e) in self.entries.iter_mut().enumerate() {
            if e.backoff_until.is_some_and(|b| b <= now) {
                e.backoff_until = None;
            }
            let want = e.spec.switch.event_loops() && e.backoff_until.is_none();
            if want == e.registered {
                continue;
            }
            let fd = e.spec.listener.as_raw_fd();
            let res = if want {
                epoll_ctl(
                    self.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    fd,
                    (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                    LISTENER + i as u64,
                )
            } else {
                epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, 0)
            };
            match res {
                Ok(()) => e.registered = want,
                Err(err) => {
                    tracing::error!(entry_point = %e.spec.state.name, error = %err,
                        "event loop: cannot (un)register the listener")
                }
            }
        }
    }

    /// Accepts one connection (level-triggered: a backlog that is not empty wakes a loop again).
    fn accept(&mut self, idx: usize) {
        let Some(e) = self.entries.get_mut(idx) else {
            return;
        };
        let listener = e.spec.listener.as_raw_fd();
        // SAFETY: try_init hands accept4 a zeroed address storage and its length to fill; the
        // descriptor accept4 returns is new and owned by nobody else.
        let accepted = unsafe {
            socket2::SockAddr::try_init(|storage, len| {
                let fd = libc::accept4(
                    listener,
                    storage.cast(),
                    len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                );
                if fd < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(OwnedFd::from_raw_fd(fd))
                }
            })
        };
        let (client, addr) = match accepted {
            Ok(a) => a,
            Err(err) => {
                if backs_off(e, &err) {
                    self.sync_listeners();
                }
                return;
            }
        };
        e.backoff = Duration::from_millis(5);
        let Some(peer) = addr.as_socket() else {
            return;
        };
        EntryPointCounters::inc(&e.spec.state.counters.accepted);
        let ep = e.spec.state.clone();
        self.route(idx, client, peer, ep);
    }

    /// Routes a new connection and starts dialling; hands it to tokio when it needs that path.
    fn route(&mut self, idx: usize, client: OwnedFd, peer: SocketAddr, ep: Arc<EntryPointState>) {
        let tables = self.tables.load();
        let Some(table) = tables.entry_points.get(&*ep.name) else {
            EntryPointCounters::inc(&ep.counters.unrouted);
            Tally::start(ep, peer).fail(Failure::NoRoute);
            return;
        };
        if table.needs_peek() {
            self.hand_off(idx, client, peer);
            return;
        }
        let info = ConnInfo {
            sni: None,
            alpn: &[],
            client_ip: peer.ip(),
            tls: false,
        };
        let Some(route) = table.route(&info).cloned() else {
            EntryPointCounters::inc(&ep.counters.unrouted);
            tracing::debug!(entry_point = %ep.name, client = %peer, tls = false, "no router matches; closing");
            Tally::start(ep, peer).fail(Failure::NoRoute);
            return;
        };
        drop(tables);
        if !route.service.is_plain() {
            self.hand_off(idx, client, peer);
            return;
        }
        let mut tally = Tally::start(ep.clone(), peer);
        tally.routed(&route, None);
        let guards = match crate::middleware::apply(&route.middlewares, peer.ip()) {
            Ok(g) => g,
            Err(r) => {
                EntryPointCounters::inc(&ep.counters.refused);
                tally.refused(&route, r);
                tracing::debug!(router = %route.name, client = %peer, reason = r.as_str(), "refused by a middleware");
                return;
            }
        };
        route.counters.opened();
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    epoch: 0,
                    conn: None,
                });
                self.slots.len() - 1
            }
        };
        let epoch = self.slots[slot].epoch.wrapping_add(1) & EPOCH_MASK;
        self.slots[slot].epoch = epoch;
        if let Err(e) = epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            client.as_raw_fd(),
            CONN_EVENTS,
            conn_token(slot, epoch, false),
        ) {
            tracing::warn!(entry_point = %ep.name, error = %e, "event loop: cannot register a connection");
            route.counters.closed();
            self.free.push(slot);
            return;
        }
        self.open += 1;
        let conn = Conn {
            client,
            cr: Ready::default(),
            backend: None,
            br: Ready::default(),
            peer,
            route,
            tried: Vec::new(),
            attempts: 0,
            state: State::Idle,
            _guards: guards,
            tally,
        };
        self.slots[slot].conn = Some(conn);
        self.dial(slot);
    }

    fn hand_off(&mut self, idx: usize, client: OwnedFd, peer: SocketAddr) {
        if let Some(e) = self.entries.get(idx) {
            let _ = e
                .spec
                .handoff
                .send((std::net::TcpStream::from(client), peer));
        }
    }

    fn conn_mut(&mut self, slot: usize, epoch: u32) -> Option<&mut Conn> {
        self.slots
            .get_mut(slot)
            .filter(|s| s.epoch == epoch)
            .and_then(|s| s.conn.as_mut())
    }

    /// Ends a connection: closes both sockets, frees the slot.
    fn close(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot)
            && let Some(c) = s.conn.take()
        {
            if let Some(at) = c.deadline() {
                self.timers.remove(&(at, slot, s.epoch));
            }
            drop(c);
            self.open -= 1;
            self.free.push(slot);
        }
    }

    /// Dials the next server for the connection in `slot` (the first one, or after a failure).
    fn dial(&mut self, slot: usize) {
        let epfd = self.epfd.as_raw_fd();
        let attempts = self.opts.dial_attempts.max(1);
        let hold_out = self.opts.hold_out;
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        let epoch = s.epoch;
        let Some(c) = s.conn.as_mut() else {
            return;
        };
        loop {
            let pick = if c.attempts < attempts {
                c.route.service.pick(&c.tried)
            } else {
                None
            };
            let Some(pick) = pick else {
                let route = c.route.clone();
                let tried = !c.tried.is_empty();
                crate::conn::no_server(&route, &mut c.tally, tried, c.peer);
                self.close(slot);
                return;
            };
            c.attempts += 1;
            let (Some(transport), Some(peer)) = (
                pick.service.transport.as_ref(),
                pick.server.address.socket_addr(),
            ) else {
                // `is_plain` rules this out; counted as no server.
                c.attempts = attempts;
                continue;
            };
            let started = Instant::now();
            let registered = connect(peer, transport.socket_options()).and_then(|fd| {
                epoll_ctl(
                    epfd,
                    libc::EPOLL_CTL_ADD,
                    fd.as_raw_fd(),
                    CONN_EVENTS,
                    conn_token(slot, epoch, true),
                )
                .map(|()| fd)
                .map_err(|error| DialErrorKind::Socket { peer, error })
            });
            match registered {
                Ok(fd) => {
                    let deadline = transport.dial_timeout().map(|t| started + t);
                    c.backend = Some(fd);
                    c.br = Ready::default();
                    c.state = State::Dialing(Dialing {
                        pick,
                        peer,
                        started,
                        deadline,
                    });
                    if let Some(at) = deadline {
                        self.timers.insert((at, slot, epoch));
                    }
                    return;
                }
                Err(kind) => dial_failed(c, pick, kind, hold_out),
            }
        }
    }

    fn on_conn_event(&mut self, slot: usize, epoch: u32, backend: bool, flags: u32) {
        let hold_out = self.opts.hold_out;
        let Some(c) = self
            .slots
            .get_mut(slot)
            .filter(|s| s.epoch == epoch)
            .and_then(|s| s.conn.as_mut())
        else {
            return;
        };
        if backend {
            c.br.update(flags);
        } else {
            c.cr.update(flags);
        }
        if let State::Dialing(d) = &c.state {
            if !backend {
                // The client's bytes wait until the server is connected.
                return;
            }
            if c.br.err {
                let peer = d.peer;
                let error = c
                    .backend
                    .as_ref()
                    .and_then(|fd| SockRef::from(fd).take_error().ok().flatten())
                    .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into());
                let State::Dialing(d) = std::mem::replace(&mut c.state, State::Idle) else {
                    return;
                };
                if let Some(at) = d.deadline {
                    self.timers.remove(&(at, slot, epoch));
                }
                dial_failed(c, d.pick, DialErrorKind::Connect { peer, error }, hold_out);
                self.dial(slot);
                return;
            }
            if !c.br.w {
                return;
            }
            let State::Dialing(d) = std::mem::replace(&mut c.state, State::Idle) else {
                return;
            };
            if let Some(at) = d.deadline {
                self.timers.remove(&(at, slot, epoch));
            }
            crate::conn::dialled(&d.pick, d.started.elapsed());
            c.tally.connected(&d.pick);
            c.state = State::Proxying(Proxying::new(d.pick));
        }
        self.pump(slot, epoch);
    }

    /// Copies what can be copied now; ends the connection when both sides closed or on error,
    /// and arms `terminationDelay` when one side closed.
    fn pump(&mut self, slot: usize, epoch: u32) {
        let splice_ok = self.opts.splice;
        let Some(c) = self.conn_mut(slot, epoch) else {
            return;
        };
        let (Some(backend), State::Proxying(p)) = (c.backend.as_ref(), &mut c.state) else {
            return;
        };
        let (cfd, bfd) = (c.client.as_raw_fd(), backend.as_raw_fd());
        let mut budget = READS_PER_TURN;
        let up = p.up.pump(
            cfd,
            &mut c.cr,
            bfd,
            &mut c.br,
            p.down.done,
            splice_ok,
            &mut budget,
        );
        let down = if up.is_ok() {
            p.down.pump(
                bfd,
                &mut c.br,
                cfd,
                &mut c.cr,
                p.up.done,
                splice_ok,
                &mut budget,
            )
        } else {
            Ok(())
        };
        let again = budget == 0;
        let (tb, tc) = (p.up.amt, p.down.amt);
        if (tb, tc) != p.metered {
            let (d_up, d_down) = (tb - p.metered.0, tc - p.metered.1);
            p.metered = (tb, tc);
            for sink in crate::conn::sinks(&c.route, &p.pick) {
                sink.add_bytes(d_up, d_down);
            }
        }
        let outcome = match (up, down) {
            (Err(e), _) | (_, Err(e)) => Some(Outcome::Error(e)),
            _ => match (p.up.done, p.down.done) {
                (true, true) => Some(Outcome::Closed),
                (false, false) => None,
                _ => {
                    if p.deadline.is_none()
                        && let Some(d) = p.pick.service.termination_delay
                    {
                        let at = Instant::now() + d;
                        p.deadline = Some(at);
                        self.timers.insert((at, slot, epoch));
                    }
                    None
                }
            },
        };
        match outcome {
            Some(o) => self.finish(slot, o),
            // More may be readable without a new edge: this connection's turn comes again
            // after the others'.
            None if again => self.again.push((slot, epoch)),
            None => {}
        }
    }

    /// Ends a proxied connection with `outcome`.
    fn finish(&mut self, slot: usize, outcome: Outcome) {
        if let Some(c) = self.slots.get_mut(slot).and_then(|s| s.conn.as_mut())
            && let State::Proxying(p) = &c.state
        {
            let t = Transferred {
                to_backend: p.up.amt,
                to_client: p.down.amt,
            };
            c.tally.finished(&p.pick, &t, &outcome);
            crate::conn::ended(&c.route, &p.pick, &outcome);
        }
        self.close(slot);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        if self
            .entries
            .iter()
            .any(|e| e.backoff_until.is_some_and(|b| b <= now))
        {
            self.sync_listeners();
        }
        let hold_out = self.opts.hold_out;
        while let Some(&(at, slot, epoch)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if !self.timer_live(at, slot, epoch) {
                continue;
            }
            let Some(c) = self.conn_mut(slot, epoch) else {
                continue;
            };
            match &c.state {
                State::Idle => {}
                State::Dialing(_) => {
                    let State::Dialing(d) = std::mem::replace(&mut c.state, State::Idle) else {
                        continue;
                    };
                    c.backend = None;
                    let after = d
                        .pick
                        .service
                        .transport
                        .as_ref()
                        .and_then(|t| t.dial_timeout())
                        .unwrap_or_default();
                    dial_failed(
                        c,
                        d.pick,
                        DialErrorKind::Timeout {
                            after,
                            stage: DialStage::Connect,
                        },
                        hold_out,
                    );
                    self.dial(slot);
                }
                State::Proxying(_) => self.finish(slot, Outcome::TerminationDelay),
            }
        }
    }
}

/// Counts, holds out and logs a failed dial; the next pick skips the server.
fn dial_failed(c: &mut Conn, pick: Pick, kind: DialErrorKind, hold_out: Duration) {
    c.backend = None;
    let e = DialError::new(pick.server.address.as_str(), kind);
    crate::conn::dial_failed(&c.route, &pick, &e, hold_out);
    c.tried.push(pick.server);
}

/// Counts and logs a failed accept on `e`; true for an error that may repeat (EMFILE …): the
/// listener then stays out of the epoll instance until the back-off has passed.
fn backs_off(e: &mut Entry, err: &io::Error) -> bool {
    if would_block(err) {
        return false;
    }
    EntryPointCounters::inc(&e.spec.state.counters.accept_errors);
    let name = &e.spec.state.name;
    if is_per_connection_error(err) {
        tracing::debug!(entry_point = %name, error = %err, "accept failed");
        return false;
    }
    if is_resource_error(err) {
        tracing::warn!(entry_point = %name, error = %err, backoff = ?e.backoff,
            "accept failed: out of resources, backing off");
    } else {
        tracing::warn!(entry_point = %name, error = %err, backoff = ?e.backoff,
            "accept failed, backing off");
    }
    e.backoff_until = Some(Instant::now() + e.backoff);
    e.backoff = (e.backoff * 2).min(Duration::from_secs(1));
    true
}

/// A socket with the transport's options (the tokio path's socket set-up: non-blocking,
/// close-on-exec, `dialKeepAlive`, TCP_NODELAY), connecting to `addr`.
fn connect(
    addr: SocketAddr,
    opts: tagway_transport::socket::SocketOptions,
) -> Result<OwnedFd, DialErrorKind> {
    let socket = opts
        .socket(addr)
        .map_err(|error| DialErrorKind::Socket { peer: addr, error })?;
    // SAFETY: the socket gives up its descriptor, which nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(socket)) };
    match SockRef::from(&fd).connect(&addr.into()) {
        Ok(()) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(fd),
        Err(error) => Err(DialErrorKind::Connect { peer: addr, error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tagway_config::{Dynamic, EntryPoint, LoadBalancer, Router, RouterTls, Server, Service};

    /// Tables for one entry point `ep`: `rule` (TLS passthrough when `tls`) to a server.
    fn tables(rule: &str, tls: bool, server: &str) -> Arc<ArcSwap<Tables>> {
        let mut st = tagway_config::StaticConfig::default();
        st.entry_points.insert(
            "ep".into(),
            EntryPoint {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            },
        );
        let mut d = Dynamic::default();
        d.tcp.services.insert(
            "s".into(),
            Service {
                load_balancer: Some(LoadBalancer {
                    servers: vec![Server {
                        address: server.into(),
                        weight: Some(1),
                        tls: false,
                    }],
                    ..Default::default()
                }),
                weighted: None,
            },
        );
        d.tcp.routers.insert(
            "r".into(),
            Router {
                rule: rule.into(),
                service: "s".into(),
                tls: tls.then(|| RouterTls {
                    passthrough: true,
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let (t, errors) = crate::runtime::compile_shared(&Arc::new(d), &st, None, None);
        assert!(errors.is_empty(), "{errors:?}");
        Arc::new(ArcSwap::from_pointee(t))
    }

    /// Starts a loop on a new listener with its switch on; connects once; returns what was
    /// handed over, and the entry point's counters.
    fn hand_over_once(tables: Arc<ArcSwap<Tables>>) -> (Option<Handoff>, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let switch = Switch::new();
        assert!(switch.set(true));
        let state = Arc::new(EntryPointState {
            name: "ep".into(),
            proxy_in: None,
            counters: Arc::default(),
            access_log: None,
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (waker, thread) = spawn(
            0,
            vec![EntrySpec {
                listener,
                state: state.clone(),
                switch,
                handoff: tx,
            }],
            tables,
            Arc::new(Options::default()),
            Duration::ZERO,
        )
        .unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            match rx.try_recv() {
                Ok(h) => break Some(h),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break None,
            }
        };
        assert_eq!(state.counters.accepted.load(Ordering::Relaxed), 1);
        waker.stop();
        thread.join().unwrap();
        // The loop closed its listening descriptor (the only one): nothing listens any more.
        assert!(std::net::TcpStream::connect(addr).is_err());
        (got, client.local_addr().unwrap())
    }

    #[test]
    fn a_connection_that_needs_a_peek_is_handed_to_tokio() {
        // The switch still says "event loops" while the tables already have a TLS router: the
        // moment between a reload and the switch.
        let (got, client) = hand_over_once(tables("HostSNI(`a.example`)", true, "127.0.0.1:1"));
        let (stream, peer) = got.expect("handed over");
        assert_eq!(peer, client);
        assert_eq!(stream.peer_addr().unwrap(), client);
    }

    #[test]
    fn a_connection_to_a_server_given_by_name_is_handed_to_tokio() {
        let (got, client) = hand_over_once(tables("HostSNI(`*`)", false, "localhost:1"));
        assert_eq!(got.expect("handed over").1, client);
    }

    #[test]
    fn only_routes_the_loops_can_serve_switch_an_entry_point_to_them() {
        let plain = tables("HostSNI(`*`)", false, "127.0.0.1:1");
        assert!(can_serve(&plain.load(), "ep"));
        assert!(can_serve(&plain.load(), "no-routes-here"));
        assert!(!can_serve(
            &tables("HostSNI(`a.example`)", true, "127.0.0.1:1").load(),
            "ep"
        ));
        assert!(!can_serve(
            &tables("HostSNI(`*`)", false, "localhost:1").load(),
            "ep"
        ));
    }

    #[test]
    fn a_switch_reports_changes_once() {
        let s = Switch::new();
        let rx = s.tokio_paused();
        assert!(!s.event_loops() && !*rx.borrow());
        assert!(s.set(true));
        assert!(!s.set(true));
        assert!(s.event_loops() && *rx.borrow());
        assert!(s.set(false));
        assert!(!*rx.borrow());
    }
}
