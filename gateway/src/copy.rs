//! Bidirectional copy with half-close and `terminationDelay`.
//!
//! Both directions are driven by one task (no split, no locks). When one side sends FIN, the write
//! side toward the other is shut down and the other direction keeps flowing; from then on the
//! termination delay bounds how long the other side may keep the connection open (`None` = no
//! deadline). An error in either direction (reset, broken pipe) ends the connection: both sockets
//! are closed when the caller drops them.
//!
//! Two engines: a buffered copy for any stream (TLS), and on Linux a zero-copy path for two plain
//! TCP sockets that moves bytes with splice(2) through a pipe, so payload never enters user space.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Size of each direction's buffer in the buffered engine.
pub const BUF_SIZE: usize = 64 * 1024;

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the client to the backend.
    pub to_backend: u64,
    /// From the backend to the client.
    pub to_client: u64,
}

/// Where the byte counts of a connection go while it is open (router, service, server counters).
///
/// The copy adds what moved since the last time after each wake-up of the connection task (a
/// few relaxed atomic adds per wake-up, none per byte), so long-lived connections show in the
/// metrics before they close.
#[derive(Clone, Copy, Debug, Default)]
pub struct Meter<'a> {
    sinks: &'a [&'a crate::metrics::Counters],
    to_backend: u64,
    to_client: u64,
}

impl<'a> Meter<'a> {
    /// Counts into `sinks`.
    pub fn new(sinks: &'a [&'a crate::metrics::Counters]) -> Self {
        Meter {
            sinks,
            to_backend: 0,
            to_client: 0,
        }
    }

    /// Adds to the sinks what `to_backend`/`to_client` (running totals) grew by since the last
    /// call.
    #[inline]
    pub fn flush(&mut self, to_backend: u64, to_client: u64) {
        if to_backend == self.to_backend && to_client == self.to_client {
            return;
        }
        let (up, down) = (to_backend - self.to_backend, to_client - self.to_client);
        self.to_backend = to_backend;
        self.to_client = to_client;
        for c in self.sinks {
            c.add_bytes(up, down);
        }
    }
}

/// How a proxied connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both sides closed their write side.
    Closed,
    /// One side closed and the other did not within the termination delay.
    TerminationDelay,
    /// A read or write failed (reset, broken pipe …); the connection was ended.
    Error(io::Error),
}

/// The termination-delay timer, armed when the first direction finishes.
///
/// The timer lives in the copy's own future (pinned there), not in an allocation of its own.
struct Deadline<'a> {
    delay: Option<Duration>,
    sleep: Pin<&'a mut Option<Sleep>>,
}

impl<'a> Deadline<'a> {
    fn new(delay: Option<Duration>, sleep: Pin<&'a mut Option<Sleep>>) -> Self {
        Deadline { delay, sleep }
    }

    /// Arms the timer (once); returns Ready when it has fired.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(d) = self.delay else {
            return Poll::Pending;
        };
        if self.sleep.is_none() {
            self.sleep.set(Some(tokio::time::sleep(d)));
        }
        self.sleep
            .as_mut()
            .as_pin_mut()
            .map_or(Poll::Pending, |sleep| sleep.poll(cx))
    }
}

use std::future::Future;

/// One direction of the buffered engine.
struct BufDir {
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    eof: bool,
    done: bool,
    need_flush: bool,
    amt: u64,
}

impl BufDir {
    fn new() -> Self {
        BufDir {
            buf: None,
            pos: 0,
            cap: 0,
            eof: false,
            done: false,
            need_flush: false,
            amt: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.eof {
                let buf = self
                    .buf
                    .get_or_insert_with(|| vec![0u8; BUF_SIZE].into_boxed_slice());
                let mut rb = ReadBuf::new(buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(w.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let buf = self.buf.as_deref().unwrap_or_default();
                let n = ready!(w.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.amt += n as u64;
                self.need_flush = true;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx))?;
                match ready!(w.as_mut().poll_shutdown(cx)) {
                    Ok(()) | Err(_) => {}
                }
                self.done = true;
                // The other side reads its last bytes: the buffer is no longer needed.
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies both ways between `client` and `backend` until both sides closed, an error, or the
/// termination delay after the first close.
pub async fn copy_buffered<C, B>(
    client: &mut C,
    backend: &mut B,
    termination_delay: Option<Duration>,
    meter: &mut Meter<'_>,
) -> (Outcome, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = BufDir::new();
    let mut down = BufDir::new();
    let sleep = std::pin::pin!(None);
    let mut deadline = Deadline::new(termination_delay, sleep);
    let outcome = poll_fn(|cx| {
        let up_res = if up.done {
            Poll::Pending
        } else {
            up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *backend))
        };
        let down_res = if down.done || matches!(up_res, Poll::Ready(Err(_))) {
            Poll::Pending
        } else {
            down.poll_copy(cx, Pin::new(&mut *backend), Pin::new(&mut *client))
        };
        meter.flush(up.amt, down.amt);
        if let Poll::Ready(Err(e)) = up_res {
            return Poll::Ready(Outcome::Error(e));
        }
        if let Poll::Ready(Err(e)) = down_res {
            return Poll::Ready(Outcome::Error(e));
        }
        match (up.done, down.done) {
            (true, true) => Poll::Ready(Outcome::Closed),
            (false, false) => Poll::Pending,
            _ => deadline.poll(cx).map(|()| Outcome::TerminationDelay),
        }
    })
    .await;
    (
        outcome,
        Transferred {
            to_backend: up.amt,
            to_client: down.amt,
        },
    )
}

#[cfg(target_os = "linux")]
pub use splice::copy_spliced;

#[cfg(target_os = "linux")]
pub(crate) mod splice {
    //! Zero-copy engine: socket → pipe → socket with splice(2).

    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::Mutex;
    use std::task::{Context, Poll, ready};
    use std::time::Duration;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Deadline, Meter, Outcome, Transferred};

    /// Bytes asked of one splice call (the pipe bounds what moves).
    pub(crate) const CHUNK: usize = 1 << 20;
    /// Pipe capacity asked for (bulk transfers).
    const PIPE_SIZE: libc::c_int = 256 * 1024;
    /// Pipes kept for reuse (empty ones only), so short connections skip pipe2/close.
    const POOL_MAX: usize = 128;

    static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

    /// A non-blocking pipe.
    pub(crate) struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
    }

    impl Pipe {
        /// A pipe from the pool, else a new one.
        pub(crate) fn new() -> io::Result<Pipe> {
            if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                return Ok(p);
            }
            let mut fds = [0 as RawFd; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, both descriptors are open and owned by nobody else.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // A larger pipe moves more per splice pair (fewer syscalls and wake-ups on bulk
            // transfers); best effort, the default 64 KiB works too.
            // SAFETY: fcntl on a pipe descriptor we own.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
            Ok(Pipe { r, w })
        }

        /// The read end.
        pub(crate) fn reader(&self) -> RawFd {
            self.r.as_raw_fd()
        }

        /// The write end.
        pub(crate) fn writer(&self) -> RawFd {
            self.w.as_raw_fd()
        }

        /// Returns an empty pipe to the pool (a pipe holding bytes is closed instead).
        pub(crate) fn recycle(self, empty: bool) {
            if empty {
                let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < POOL_MAX {
                    pool.push(self);
                }
            }
        }
    }

    /// A system call's count, or the error in `errno` for a negative result.
    fn checked(n: isize) -> io::Result<usize> {
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// splice(2) of up to `len` bytes, non-blocking.
    pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain syscall on descriptors owned by the caller; null offsets (sockets, pipes).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        checked(n)
    }

    /// recv(2) and send(2) through `syscall(2)` rather than glibc's wrappers: those are thread
    /// cancellation points, and in a process with several threads each call is bracketed by two
    /// atomic read-modify-writes of the thread's cancellation state (1.5-2 % of the gateway's
    /// CPU on small keep-alive requests, perf). tagway never cancels a thread.
    pub(crate) fn recv(fd: RawFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; recvfrom accepts null address
        // pointers; the descriptor is owned by the caller's socket for the whole call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                libc::c_long::from(fd),
                buf.as_mut_ptr(),
                buf.len(),
                0 as libc::c_long,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        checked(n as isize)
    }

    /// See [`recv`]. `MSG_NOSIGNAL`: a closed peer is an `EPIPE` error, not a signal.
    pub(crate) fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
        // SAFETY: `data` is valid for reads of `data.len()` bytes; null destination address
        // (a connected socket); the descriptor is owned by the caller's socket.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                libc::c_long::from(fd),
                data.as_ptr(),
                data.len(),
                libc::c_long::from(libc::MSG_NOSIGNAL),
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::socklen_t,
            )
        };
        checked(n as isize)
    }

    /// One readiness-driven call of `op` on `sock`, as tokio's own `poll_read`/`poll_write`: a
    /// result shorter than `len` shows the socket drained (or its buffer full) and consumes the
    /// readiness, so the next call waits for the next edge instead of making a call that only
    /// returns `EAGAIN`.
    fn poll_op(
        sock: &TcpStream,
        cx: &mut Context<'_>,
        interest: Interest,
        len: usize,
        mut op: impl FnMut(RawFd) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if interest.is_readable() {
                ready!(sock.poll_read_ready(cx))?;
            } else {
                ready!(sock.poll_write_ready(cx))?;
            }
            let mut short = None;
            match sock.try_io(interest, || {
                let n = op(sock.as_raw_fd())?;
                if 0 < n && n < len {
                    // Reported as WouldBlock so that tokio clears the readiness; the count is
                    // handed back through `short`.
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            }) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(n) = short {
                        return Poll::Ready(Ok(n));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// What a short read showed about what follows it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum After {
        /// Nothing known: read again.
        Unknown,
        /// Nothing more to read yet; the task's waker is registered for the next bytes.
        Pending,
        /// The peer's FIN came before the read, which took everything: the stream has ended.
        End,
    }

    /// A readiness-driven recv(2) into `buf`.
    ///
    /// With `exact_end`, a short read also tells whether the stream ended, so that the call
    /// that would only return 0 is not made (HAProxy does the same with `EPOLLRDHUP`). A short
    /// read consumes the readable state but not tokio's `READ_CLOSED`, which only the peer's FIN
    /// or a reset sets. On a current-thread runtime no event is dispatched while this task runs,
    /// so the socket being ready again right after the read means that FIN or reset was known
    /// before the read: the read drained everything that preceded it. A reset is told apart by
    /// the error readiness and left to the next call, which reports it.
    fn poll_recv(
        sock: &TcpStream,
        cx: &mut Context<'_>,
        buf: &mut [MaybeUninit<u8>],
        exact_end: bool,
    ) -> Poll<io::Result<(usize, After)>> {
        let len = buf.len();
        let n = ready!(poll_op(sock, cx, Interest::READABLE, len, |fd| recv(
            fd, buf
        )))?;
        if n == 0 || n == len || !exact_end {
            return Poll::Ready(Ok((n, After::Unknown)));
        }
        let after = match sock.poll_read_ready(cx) {
            Poll::Pending => After::Pending,
            Poll::Ready(Ok(())) => {
                let ready = std::pin::pin!(sock.ready(Interest::READABLE | Interest::ERROR));
                match std::future::Future::poll(ready, cx) {
                    Poll::Ready(Ok(r)) if r.is_read_closed() && !r.is_error() => After::End,
                    _ => After::Unknown,
                }
            }
            Poll::Ready(Err(_)) => After::Unknown,
        };
        Poll::Ready(Ok((n, after)))
    }

    /// How a direction currently moves bytes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Mode {
        /// read(2)/write(2) through a small buffer: two syscalls per message, best for small
        /// messages (a short read tells the socket is drained, no extra EAGAIN call).
        Buffered,
        /// splice(2) through a pipe: no copy to user space, best for bulk.
        Splice,
    }

    /// Keeps `rest` (what the destination did not take of one read, at most [`SMALL`] bytes) in
    /// `buf`, allocated on first use; returns its length.
    pub(crate) fn keep(buf: &mut Option<Box<[u8]>>, rest: &[u8]) -> usize {
        let b = buf.get_or_insert_with(|| vec![0u8; SMALL].into_boxed_slice());
        b[..rest.len()].copy_from_slice(rest);
        rest.len()
    }

    /// Buffer of the buffered mode; a read that fills it switches the direction to splice.
    pub(crate) const SMALL: usize = 16 * 1024;

    struct Dir {
        mode: Mode,
        buf: Option<Box<[u8]>>,
        pos: usize,
        cap: usize,
        pipe: Option<Pipe>,
        in_pipe: usize,
        /// Size of the last successful splice into the pipe.
        last_in: usize,
        /// Short reads tell the end of the stream ([`poll_recv`]): the runtime is current-thread.
        exact_end: bool,
        eof: bool,
        done: bool,
        amt: u64,
    }

    impl Dir {
        fn new(exact_end: bool) -> Self {
            Dir {
                mode: Mode::Buffered,
                buf: None,
                pos: 0,
                cap: 0,
                pipe: None,
                in_pipe: 0,
                last_in: 0,
                exact_end,
                eof: false,
                done: false,
                amt: 0,
            }
        }

        /// Moves bytes from `src` to `dst` until both would block (Pending) or `src` ended and
        /// everything was written (Ready(Ok)). `other_done`: the opposite direction already
        /// finished, so the sockets are about to be closed and no shutdown is needed.
        fn poll(
            &mut self,
            cx: &mut Context<'_>,
            src: &mut TcpStream,
            dst: &mut TcpStream,
            other_done: bool,
        ) -> Poll<io::Result<()>> {
            loop {
                // Write out what is pending (buffer, then pipe).
                while self.pos < self.cap {
                    let data = &self.buf.as_deref().unwrap_or_default()[self.pos..self.cap];
                    let n = ready!(poll_op(dst, cx, Interest::WRITABLE, data.len(), |fd| send(
                        fd, data
                    )))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.amt += n as u64;
                }
                while self.in_pipe > 0 {
                    ready!(dst.poll_write_ready(cx))?;
                    let pipe = self.pipe.as_ref().map(|p| p.r.as_raw_fd()).unwrap_or(-1);
                    match dst.try_io(Interest::WRITABLE, || {
                        splice(pipe, dst.as_raw_fd(), self.in_pipe)
                    }) {
                        Ok(n) => {
                            self.in_pipe -= n;
                            self.amt += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                if self.eof {
                    if !other_done {
                        let _ = socket2::SockRef::from(&*dst).shutdown(std::net::Shutdown::Write);
                    }
                    self.done = true;
                    self.buf = None;
                    if let Some(p) = self.pipe.take() {
                        p.recycle(true);
                    }
                    return Poll::Ready(Ok(()));
                }
                match self.mode {
                    Mode::Buffered => {
                        // Read into a stack buffer and write straight out: no per-connection
                        // buffer, no zeroing. Only what the destination does not take at once is
                        // kept (in `self.buf`).
                        let mut stack = [MaybeUninit::<u8>::uninit(); SMALL];
                        let (n, after) = ready!(poll_recv(src, cx, &mut stack, self.exact_end))?;
                        // SAFETY: recv initialised the first `n` bytes of `stack`.
                        let data: &[u8] =
                            unsafe { std::slice::from_raw_parts(stack.as_ptr().cast::<u8>(), n) };
                        if n == 0 {
                            self.eof = true;
                            continue;
                        }
                        if n == SMALL {
                            // Bulk transfer: move the rest without copying.
                            self.mode = Mode::Splice;
                        }
                        let mut off = 0;
                        while off < n {
                            let rest = &data[off..];
                            match poll_op(dst, cx, Interest::WRITABLE, rest.len(), |fd| {
                                send(fd, rest)
                            }) {
                                Poll::Ready(Ok(0)) => {
                                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                                }
                                Poll::Ready(Ok(w)) => {
                                    off += w;
                                    self.amt += w as u64;
                                }
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => break,
                            }
                        }
                        if off < n {
                            self.pos = 0;
                            self.cap = keep(&mut self.buf, &data[off..]);
                        }
                        match after {
                            // Written out (or kept) first, then shut down at the loop's top.
                            After::End => self.eof = true,
                            // All written and the read waker registered: nothing to do until a
                            // wake-up (reading again would only check the same readiness).
                            After::Pending if off == n => return Poll::Pending,
                            After::Pending | After::Unknown => {}
                        }
                    }
                    Mode::Splice => {
                        ready!(src.poll_read_ready(cx))?;
                        if self.pipe.is_none() {
                            self.pipe = Some(Pipe::new()?);
                        }
                        let pipe = self.pipe.as_ref().map(|p| p.w.as_raw_fd()).unwrap_or(-1);
                        match src
                            .try_io(Interest::READABLE, || splice(src.as_raw_fd(), pipe, CHUNK))
                        {
                            Ok(0) => self.eof = true,
                            Ok(n) => {
                                self.in_pipe += n;
                                self.last_in = n;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                if self.last_in < SMALL {
                                    // Small messages again: back to two syscalls per message.
                                    self.mode = Mode::Buffered;
                                }
                                // Loop: the next readiness poll registers the waker.
                            }
                            Err(e) => return Poll::Ready(Err(e)),
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

    /// Bidirectional copy between two plain TCP sockets: small messages through a buffer, bulk
    /// with zero-copy splice(2). Initial bytes are sent to the backend first by the caller.
    /// `exact_end`: the task runs on a current-thread runtime, so a short read tells whether the
    /// stream ended ([`poll_recv`]).
    pub async fn copy_spliced(
        client: &mut TcpStream,
        backend: &mut TcpStream,
        termination_delay: Option<Duration>,
        meter: &mut Meter<'_>,
        exact_end: bool,
    ) -> (Outcome, Transferred) {
        let mut up = Dir::new(exact_end);
        let mut down = Dir::new(exact_end);
        let sleep = std::pin::pin!(None);
        let mut deadline = Deadline::new(termination_delay, sleep);
        let outcome = std::future::poll_fn(|cx| {
            let up_res = if up.done {
                Poll::Pending
            } else {
                up.poll(cx, client, backend, down.done)
            };
            let down_res = if down.done || matches!(up_res, Poll::Ready(Err(_))) {
                Poll::Pending
            } else {
                down.poll(cx, backend, client, up.done)
            };
            meter.flush(up.amt, down.amt);
            if let Poll::Ready(Err(e)) = up_res {
                return Poll::Ready(Outcome::Error(e));
            }
            if let Poll::Ready(Err(e)) = down_res {
                return Poll::Ready(Outcome::Error(e));
            }
            match (up.done, down.done) {
                (true, true) => Poll::Ready(Outcome::Closed),
                (false, false) => Poll::Pending,
                _ => deadline.poll(cx).map(|()| Outcome::TerminationDelay),
            }
        })
        .await;
        up.finish();
        down.finish();
        (
            outcome,
            Transferred {
                to_backend: up.amt,
                to_client: down.amt,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Two connected socket pairs: (client, proxy-side client) and (proxy-side backend, backend).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (d, _) = l.accept().await.unwrap();
        ((a, b), (c, d))
    }

    async fn run(
        engine: u8,
        delay: Option<Duration>,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(Outcome, Transferred)>,
    ) {
        let ((client, mut pc), (mut pb, backend)) = pairs().await;
        let h = tokio::spawn(async move {
            match engine {
                #[cfg(target_os = "linux")]
                1 => {
                    let exact_end = crate::entrypoint::on_current_thread_runtime();
                    copy_spliced(&mut pc, &mut pb, delay, &mut Meter::default(), exact_end).await
                }
                _ => copy_buffered(&mut pc, &mut pb, delay, &mut Meter::default()).await,
            }
        });
        (client, backend, h)
    }

    async fn half_close(engine: u8) {
        let (mut client, mut backend, h) = run(engine, Some(Duration::from_secs(5))).await;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(b"question").await.unwrap();
        client.shutdown().await.unwrap();
        let mut q = Vec::new();
        backend.read_to_end(&mut q).await.unwrap();
        assert_eq!(q, b"question");
        let p2 = payload.clone();
        let w = tokio::spawn(async move {
            backend.write_all(&p2).await.unwrap();
            backend.shutdown().await.unwrap();
            backend
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == payload, "answer differs ({} bytes)", got.len());
        let _backend = w.await.unwrap();
        let (outcome, t) = h.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed), "{outcome:?}");
        assert_eq!(t.to_backend, 8);
        assert_eq!(t.to_client, payload.len() as u64);
    }

    /// Writes `data` in pieces of varying size (1 B to 48 KiB: small messages, buffer-filling
    /// reads and bulk; with `small_only`, up to 2 KiB), then shuts its write side.
    async fn write_mixed(
        mut w: impl AsyncWriteExt + Unpin,
        data: Vec<u8>,
        seed: u32,
        small_only: bool,
    ) {
        let mut x = seed;
        let mut off = 0;
        while off < data.len() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let n = match if small_only { x % 2 } else { x % 4 } {
                0 => 1 + (x as usize >> 8) % 64,
                1 => 1 + (x as usize >> 8) % 2048,
                2 => 16 * 1024,
                _ => 1 + (x as usize >> 8) % (48 * 1024),
            }
            .min(data.len() - off);
            w.write_all(&data[off..off + n]).await.unwrap();
            off += n;
            if x.is_multiple_of(16) {
                tokio::task::yield_now().await;
            }
        }
        w.shutdown().await.unwrap();
    }

    /// Reads to the end, pausing now and then so that the proxy finds the socket buffer full.
    async fn read_slowly(mut r: impl AsyncReadExt + Unpin) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 7000];
        let mut reads = 0u32;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
            reads += 1;
            if reads.is_multiple_of(8) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Both directions at once, messages from 1 byte to bulk, slow readers on both ends: every
    /// byte arrives once and in order (short writes, the kept remainder, the switches between
    /// the small-message and splice modes).
    async fn both_ways_mixed_sizes(engine: u8, small_only: bool) {
        const RCVBUF: usize = 32 * 1024;
        let ((client, mut pc), (mut pb, backend)) = pairs().await;
        // Small socket buffers: the proxy's writes come back short and it keeps the rest.
        for s in [&pc, &pb] {
            socket2::SockRef::from(s)
                .set_send_buffer_size(8192)
                .unwrap();
        }
        for s in [&client, &pc, &pb, &backend] {
            s.set_nodelay(true).unwrap();
        }
        for s in [&client, &backend] {
            socket2::SockRef::from(s)
                .set_recv_buffer_size(RCVBUF)
                .unwrap();
        }
        // No termination delay: the shorter direction ends first, the other goes on to its end.
        let delay = None;
        let h = tokio::spawn(async move {
            match engine {
                #[cfg(target_os = "linux")]
                1 => {
                    let exact_end = crate::entrypoint::on_current_thread_runtime();
                    copy_spliced(&mut pc, &mut pb, delay, &mut Meter::default(), exact_end).await
                }
                _ => copy_buffered(&mut pc, &mut pb, delay, &mut Meter::default()).await,
            }
        });
        let up: Vec<u8> = (0..6_000_000u32)
            .map(|i| (i.wrapping_mul(7) % 253) as u8)
            .collect();
        let down: Vec<u8> = (0..9_000_000u32)
            .map(|i| (i.wrapping_mul(13) % 241) as u8)
            .collect();
        let (cr, cw) = client.into_split();
        let (br, bw) = backend.into_split();
        let writers = tokio::spawn(write_mixed(cw, up.clone(), 0x9e37_79b9, small_only));
        let writerb = tokio::spawn(write_mixed(bw, down.clone(), 0x85eb_ca6b, small_only));
        let (got_up, got_down) = tokio::join!(read_slowly(br), read_slowly(cr));
        writers.await.unwrap();
        writerb.await.unwrap();
        assert!(
            got_up == up,
            "to the backend: {} of {} bytes, or reordered",
            got_up.len(),
            up.len()
        );
        assert!(
            got_down == down,
            "to the client: {} of {} bytes, or reordered",
            got_down.len(),
            down.len()
        );
        let (outcome, t) = h.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed), "{outcome:?}");
        assert_eq!(t.to_backend, up.len() as u64);
        assert_eq!(t.to_client, down.len() as u64);
    }

    #[tokio::test]
    async fn both_ways_mixed_sizes_buffered() {
        both_ways_mixed_sizes(0, false).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn both_ways_mixed_sizes_spliced() {
        both_ways_mixed_sizes(1, false).await;
    }

    /// Small messages only: the spliced engine stays in its small-message mode, and what a full
    /// socket does not take is kept and written later.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn both_ways_small_messages_spliced() {
        both_ways_mixed_sizes(1, true).await;
    }

    #[tokio::test]
    async fn half_close_buffered() {
        half_close(0).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn half_close_spliced() {
        half_close(1).await;
    }

    /// The backend's last bytes and its FIN come together (before the copy reads them): the
    /// client gets the bytes, then the end; the other direction goes on until the client's FIN.
    async fn last_bytes_with_fin(engine: u8) {
        let (mut client, mut backend, h) = run(engine, Some(Duration::from_secs(5))).await;
        backend.write_all(b"answer").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"answer");
        client.write_all(b"more").await.unwrap();
        client.shutdown().await.unwrap();
        let mut q = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), backend.read_to_end(&mut q))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(q, b"more");
        let (outcome, t) = h.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed), "{outcome:?}");
        assert_eq!((t.to_backend, t.to_client), (4, 6));
    }

    #[tokio::test]
    async fn last_bytes_with_fin_buffered() {
        last_bytes_with_fin(0).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn last_bytes_with_fin_spliced() {
        last_bytes_with_fin(1).await;
    }

    /// The backend's last bytes come with a reset, not a FIN: the client gets the bytes, and the
    /// connection ends as an error (not as a half-close that waits for the client).
    async fn last_bytes_with_reset(engine: u8) {
        let (mut client, mut backend, h) = run(engine, Some(Duration::from_secs(5))).await;
        backend.write_all(b"answer").await.unwrap();
        socket2::SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        let (outcome, t) = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("a reset ends the copy at once")
            .unwrap();
        assert!(matches!(outcome, Outcome::Error(_)), "{outcome:?}");
        assert_eq!(t.to_client, 6);
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
        assert_eq!(got, b"answer");
    }

    #[tokio::test]
    async fn last_bytes_with_reset_buffered() {
        last_bytes_with_reset(0).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn last_bytes_with_reset_spliced() {
        last_bytes_with_reset(1).await;
    }

    async fn termination_delay(engine: u8) {
        let (mut client, backend, h) = run(engine, Some(Duration::from_millis(200))).await;
        client.shutdown().await.unwrap();
        let start = std::time::Instant::now();
        let (outcome, _) = h.await.unwrap();
        let took = start.elapsed();
        assert!(matches!(outcome, Outcome::TerminationDelay), "{outcome:?}");
        assert!(took >= Duration::from_millis(190), "{took:?}");
        // The client sees the connection end.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
        drop(backend);
    }

    #[tokio::test]
    async fn termination_delay_buffered() {
        termination_delay(0).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn termination_delay_spliced() {
        termination_delay(1).await;
    }

    async fn reset(engine: u8) {
        let (client, backend, h) = run(engine, None).await;
        // The backend resets (SO_LINGER 0): the copy ends with an error or a close, no panic.
        socket2::SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        let (outcome, _) = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = client;
            c.write_all(b"x").await.ok();
            h.await.unwrap()
        })
        .await
        .unwrap();
        assert!(!matches!(outcome, Outcome::TerminationDelay));
    }

    #[tokio::test]
    async fn reset_buffered() {
        reset(0).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn reset_spliced() {
        reset(1).await;
    }
}
