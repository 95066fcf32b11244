//! floor-proxy: the least a TCP proxy can do per connection with the sockets tagway uses. It
//! measures the floor under tagway's data plane: what the kernel work that issue 3 requires costs
//! with no runtime, routing, metrics or configuration on top.
//!
//! One thread (N with `--threads N`), each with one `epoll` instance (through `mio`, which closes
//! a socket without deleting it from epoll first: the kernel removes it at close), and per
//! connection only the system calls tagway makes:
//!
//! - the listener is bound by tagway's own code (`tagway::entrypoint::bind_addr`: TCP_NODELAY,
//!   which Linux copies to every accepted socket);
//! - the server socket gets the default transport's options through tagway's own code
//!   (`tagway_transport::socket::SocketOptions`: Traefik's `dialKeepAlive` default of 15s and
//!   TCP_NODELAY), and is connected without blocking; the connect completes at writability
//!   (SO_ERROR);
//! - bytes are copied through a 16 KiB stack buffer; a short read ends a burst (no call that only
//!   returns `EAGAIN`) unless the peer's FIN came with it;
//! - half-close, as tagway does it: the FIN of one side becomes a `shutdown(SHUT_WR)` toward the
//!   other, which keeps being read until its own FIN; then both sockets are closed.
//!
//! With `--close-at-eof` the first FIN closes both sockets instead (what nginx's `stream` proxy
//! does by default, `proxy_half_close off`). With `--threads N`, N threads each run this loop
//! with their own epoll instance on one shared listening socket (tagway's worker model: every
//! idle thread is woken for a new connection).
//!
//! With `--exclusive-accept` the listener is accepted from as nginx's workers do (Linux): it is
//! registered level-triggered with `EPOLLEXCLUSIVE`, so a new connection wakes one idle thread,
//! and each wake accepts one connection (nginx's `multi_accept off`); a backlog that is not empty
//! is reported again by the next `epoll_wait`. Without it the listener is edge-triggered (through
//! `mio`, as in tokio) and each wake accepts until `EAGAIN`.
//!
//! It has no timers (a peer that never closes keeps its connection), no limits and no logging:
//! a measuring instrument, not a gateway.
//!
//! ```text
//! cargo build --release -p tagway-integration --bin floor-proxy
//! target/release/floor-proxy 127.0.0.1:7000 127.0.0.1:8080 [--close-at-eof] [--threads N]
//!     [--exclusive-accept]
//! scripts/bench-dataplane --floor --tests cc     # beside tagway, HAProxy and nginx
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};

use anyhow::{Context, bail};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, SockRef, Socket, Type};
use tagway_transport::socket::{DEFAULT_KEEP_ALIVE, SocketOptions};

/// The command line, for errors.
const USAGE: &str = "usage: floor-proxy LISTEN_ADDR BACKEND_ADDR [--close-at-eof] [--threads N] [--exclusive-accept]";

/// The listener's token (connections use `2 * slot` and `2 * slot + 1`).
const LISTENER: Token = Token(usize::MAX);
/// The copy buffer (on the stack), as tagway's small-message path.
const BUF: usize = 16 * 1024;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let close_at_eof = args.iter().any(|a| a == "--close-at-eof");
    let exclusive_accept = args.iter().any(|a| a == "--exclusive-accept");
    let mut threads = 1usize;
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n = args.get(i + 1).context("--threads needs a number")?;
        threads = n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("--threads {n:?}: a positive number"))?;
        args.drain(i..i + 2);
    }
    if let Some(unknown) = args
        .iter()
        .find(|a| a.starts_with("--") && *a != "--close-at-eof" && *a != "--exclusive-accept")
    {
        bail!("unknown option {unknown:?}; {USAGE}");
    }
    let addrs: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let [listen, backend] = addrs[..] else {
        bail!("{USAGE}");
    };
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?}"))?;
    let backend: SocketAddr = backend
        .parse()
        .with_context(|| format!("backend address {backend:?}"))?;
    let listener = tagway::entrypoint::bind_addr(listen, false)
        .with_context(|| format!("listening on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let proxy = |listener: std::net::TcpListener| Proxy {
        listener: TcpListener::from_std(listener),
        backend,
        close_at_eof,
        exclusive_accept,
        conns: Vec::new(),
        free: Vec::new(),
    };
    for _ in 1..threads {
        let p = proxy(listener.try_clone().context("sharing the listener")?);
        // The threads run until the process is killed; an error in any of them ends it.
        std::thread::spawn(move || {
            if let Err(e) = p.run() {
                eprintln!("floor-proxy: {e:#}");
                std::process::exit(1);
            }
        });
    }
    proxy(listener).run()
}

/// Opens the server socket with tagway's options (those of the default transport) and starts a
/// non-blocking connect.
fn dial(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    SocketOptions {
        keep_alive: Some(DEFAULT_KEEP_ALIVE),
        nodelay: true,
    }
    .apply(SockRef::from(&s))?;
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

/// One direction's source side.
#[derive(Default)]
struct Side {
    /// Readiness not yet consumed by a read.
    readable: bool,
    /// The peer's FIN (or an error) was signalled: read on after a short read.
    closed: bool,
    /// Read returned 0.
    eof: bool,
    /// Bytes read but not yet written to the other side (it was full).
    pending: Vec<u8>,
    /// The FIN was passed on (`shutdown(SHUT_WR)` of the other side).
    forwarded: bool,
}

struct Conn {
    /// 0: the client, 1: the server.
    socks: [TcpStream; 2],
    sides: [Side; 2],
    connected: bool,
}

enum Step {
    Open,
    Close,
}

struct Proxy {
    listener: TcpListener,
    backend: SocketAddr,
    close_at_eof: bool,
    /// Level-triggered `EPOLLEXCLUSIVE` registration, one accept per wake.
    exclusive_accept: bool,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
}

impl Proxy {
    fn run(mut self) -> anyhow::Result<()> {
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(256);
        if self.exclusive_accept {
            register_exclusive(&poll, &self.listener)?;
        } else {
            poll.registry()
                .register(&mut self.listener, LISTENER, Interest::READABLE)?;
        }
        let mut buf = [0u8; BUF];
        loop {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    self.accept(&poll);
                    continue;
                }
                let slot = ev.token().0 / 2;
                let which = ev.token().0 % 2;
                let Some(Some(conn)) = self.conns.get_mut(slot) else {
                    continue;
                };
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    conn.sides[which].readable = true;
                }
                if ev.is_read_closed() || ev.is_error() {
                    conn.sides[which].closed = true;
                }
                if which == 1 && !conn.connected {
                    if !(ev.is_writable() || ev.is_error()) {
                        continue;
                    }
                    match conn.socks[1].take_error() {
                        Ok(None) => conn.connected = true,
                        _ => {
                            self.close(slot);
                            continue;
                        }
                    }
                }
                if !conn.connected {
                    continue;
                }
                if let Step::Close = pump(conn, &mut buf, self.close_at_eof) {
                    self.close(slot);
                }
            }
        }
    }

    /// Accepts until `EAGAIN`, or one connection with `--exclusive-accept`.
    fn accept(&mut self, poll: &Poll) {
        loop {
            let client = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    eprintln!("accept: {e}");
                    return;
                }
            };
            let server = match dial(self.backend) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("dial {}: {e}", self.backend);
                    continue;
                }
            };
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            let mut conn = Conn {
                socks: [client, server],
                sides: Default::default(),
                connected: false,
            };
            let both = Interest::READABLE | Interest::WRITABLE;
            let registered = poll
                .registry()
                .register(&mut conn.socks[0], Token(2 * slot), both)
                .and_then(|()| {
                    poll.registry()
                        .register(&mut conn.socks[1], Token(2 * slot + 1), both)
                });
            match registered {
                Ok(()) => {
                    self.conns[slot] = Some(conn);
                    if self.exclusive_accept {
                        return;
                    }
                }
                Err(e) => {
                    eprintln!("epoll: {e}");
                    self.free.push(slot);
                }
            }
        }
    }

    /// Closes both sockets (the kernel drops them from epoll at close).
    fn close(&mut self, slot: usize) {
        self.conns[slot] = None;
        self.free.push(slot);
    }
}

/// Registers the listener in `poll`'s epoll instance level-triggered with `EPOLLEXCLUSIVE`
/// (`mio` registers edge-triggered and has no exclusive wake-ups), under the [`LISTENER`] token.
fn register_exclusive(poll: &Poll, listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
        u64: LISTENER.0 as u64,
    };
    // SAFETY: both descriptors are open for the duration of the call (`poll` and `listener` are
    // borrowed) and `ev` is a valid event; mio reads the token back from `u64`.
    let r = unsafe {
        libc::epoll_ctl(
            poll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            &mut ev,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves what can be moved in both directions; says when the connection is over.
fn pump(conn: &mut Conn, buf: &mut [u8; BUF], close_at_eof: bool) -> Step {
    for from in 0..2 {
        let to = 1 - from;
        let [a, b] = &mut conn.socks;
        let (src, dst) = if from == 0 { (a, b) } else { (b, a) };
        let side = &mut conn.sides[from];
        // First what the other socket could not take before.
        if !side.pending.is_empty() {
            match write_some(dst, &side.pending) {
                Ok(n) => {
                    side.pending.drain(..n);
                }
                Err(_) => return Step::Close,
            }
            if !side.pending.is_empty() {
                continue;
            }
        }
        while side.readable && !side.eof {
            match src.read(buf) {
                Ok(0) => {
                    side.eof = true;
                    side.readable = false;
                }
                Ok(n) => {
                    let w = match write_some(dst, &buf[..n]) {
                        Ok(w) => w,
                        Err(_) => return Step::Close,
                    };
                    if w < n {
                        side.pending.extend_from_slice(&buf[w..n]);
                        break;
                    }
                    if n < BUF && !side.closed {
                        side.readable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => side.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        if side.eof && side.pending.is_empty() && !side.forwarded {
            if close_at_eof {
                return Step::Close;
            }
            side.forwarded = true;
            if !conn.sides[to].eof && dst.shutdown(Shutdown::Write).is_err() {
                return Step::Close;
            }
        }
    }
    if conn.sides.iter().all(|s| s.eof && s.pending.is_empty()) {
        Step::Close
    } else {
        Step::Open
    }
}

/// Writes what the socket takes now (0 when it is full).
fn write_some(dst: &mut TcpStream, mut bytes: &[u8]) -> io::Result<usize> {
    let total = bytes.len();
    while !bytes.is_empty() {
        match dst.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total - bytes.len())
}
