//! Socket options, all in one place: TCP keep-alive and TCP_NODELAY on every backend connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::TcpStream;

use tagway_config::Duration as ConfigDuration;

/// `dialKeepAlive: 0` means this.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Unanswered probes before the kernel drops the connection (Go's default, which Traefik uses).
pub const KEEP_ALIVE_PROBES: u32 = 9;

/// False when the kernel's default probe count (`net.ipv4.tcp_keepalive_probes`, read once) is
/// already [`KEEP_ALIVE_PROBES`]: setting TCP_KEEPCNT would change nothing and costs a syscall per
/// dial.
fn system_probes_differ() -> bool {
    #[cfg(target_os = "linux")]
    {
        static DIFFER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DIFFER.get_or_init(|| {
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_probes")
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                != Some(KEEP_ALIVE_PROBES)
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        true
    }
}

/// The options set on every backend socket before it connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    /// Keep-alive idle time and probe interval; `None` = keep-alive off.
    pub keep_alive: Option<Duration>,
    /// TCP_NODELAY (always on for a proxy: the client's segments are forwarded as they come).
    pub nodelay: bool,
}

impl SocketOptions {
    /// From `dialKeepAlive`: 0 → 15s, negative → off, else that interval.
    pub fn from_keep_alive(keep_alive: ConfigDuration) -> Self {
        let keep_alive = if keep_alive.is_negative() {
            None
        } else if keep_alive.is_zero() {
            Some(DEFAULT_KEEP_ALIVE)
        } else {
            keep_alive.to_std()
        };
        SocketOptions {
            keep_alive,
            nodelay: true,
        }
    }

    /// Applies the options to a socket (connected or not).
    ///
    /// Keep-alive sets the idle time before the first probe (TCP_KEEPIDLE) and the interval between
    /// probes (TCP_KEEPINTVL) both to the configured value, with [`KEEP_ALIVE_PROBES`] probes
    /// (TCP_KEEPCNT), as Go does for Traefik's `dialKeepAlive`.
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        self.apply_inner(socket, false)
    }

    /// Applies the options; `fresh` sockets start with keep-alive and TCP_NODELAY off, so turning
    /// them off is skipped (one syscall less per dial).
    fn apply_inner(&self, socket: SockRef<'_>, fresh: bool) -> io::Result<()> {
        match self.keep_alive {
            Some(every) => {
                // The kernel takes whole seconds; round anything below one second up.
                let every = every.max(Duration::from_secs(1));
                let params = TcpKeepalive::new().with_time(every);
                #[cfg(any(
                    target_os = "linux",
                    target_os = "android",
                    target_vendor = "apple",
                    target_os = "freebsd",
                    target_os = "netbsd",
                    target_os = "windows"
                ))]
                let params = params.with_interval(every);
                #[cfg(any(
                    target_os = "linux",
                    target_os = "android",
                    target_vendor = "apple",
                    target_os = "freebsd",
                    target_os = "netbsd"
                ))]
                let params = if system_probes_differ() {
                    params.with_retries(KEEP_ALIVE_PROBES)
                } else {
                    params
                };
                socket.set_tcp_keepalive(&params)?;
            }
            None if fresh => {}
            None => socket.set_keepalive(false)?,
        }
        if fresh && !self.nodelay {
            return Ok(());
        }
        socket.set_tcp_nodelay(self.nodelay)
    }

    /// Opens a non-blocking socket for `peer` with the options applied, ready for [`connect`].
    pub fn socket(&self, peer: SocketAddr) -> io::Result<Socket> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let socket = Socket::new(
            Domain::for_address(peer),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let socket = {
            let socket = Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            socket
        };
        self.apply_inner(SockRef::from(&socket), true)?;
        Ok(socket)
    }
}

/// Connects a non-blocking `socket` (from [`SocketOptions::socket`]) to `peer`.
///
/// A peer on the same host usually completes the handshake inside connect(2): the loopback
/// delivers the SYN and its answer before the call returns, yet a non-blocking connect still
/// reports `EINPROGRESS`. A second connect(2) tells at once (in place of the `SO_ERROR` read
/// that would follow the wait): 0 or `EISCONN` = connected, so the dial skips the wait for
/// writability, its timer and a wake-up of the task; `EALREADY` = still in progress, wait for
/// writability and read `SO_ERROR` as usual; any other error is the connect's failure (a
/// refused port on this host answers before the first call returns).
pub async fn connect(socket: Socket, peer: SocketAddr) -> io::Result<TcpStream> {
    let addr = SockAddr::from(peer);
    if connected_at_once(&socket, &addr)? {
        return TcpStream::from_std(socket.into());
    }
    let stream = TcpStream::from_std(socket.into())?;
    stream.writable().await?;
    match stream.take_error()? {
        Some(error) => Err(error),
        None => Ok(stream),
    }
}

/// Starts a non-blocking connect; true when the connection is already established (see
/// [`connect`]), false when the caller has to wait for it.
fn connected_at_once(socket: &Socket, addr: &SockAddr) -> io::Result<bool> {
    match socket.connect(addr) {
        Ok(()) => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EISCONN) => return Ok(true),
        Err(e) if in_progress(&e) => {}
        Err(e) => return Err(e),
    }
    match socket.connect(addr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EISCONN) => Ok(true),
        Err(e) if in_progress(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `EINPROGRESS` (a connect started) or `EALREADY` (one is under way).
fn in_progress(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EALREADY))
        || e.kind() == io::ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
    /// stays in progress until a slot frees and the SYN is retransmitted (~1 s).
    fn full_listener() -> (Socket, SocketAddr, std::net::TcpStream) {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        // Linux queues backlog + 1 connections: one.
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        (listener, addr, queued)
    }

    #[tokio::test]
    async fn a_local_connect_completes_inside_the_first_call() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let options = SocketOptions::from_keep_alive(ConfigDuration::ZERO);
        let socket = options.socket(peer).unwrap();
        #[cfg(target_os = "linux")]
        assert!(
            connected_at_once(&socket, &SockAddr::from(peer)).unwrap(),
            "the loopback handshake completes before connect(2) returns"
        );
        let mut stream = connect(socket, peer).await.unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        accepted.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(stream.peer_addr().unwrap(), peer);
        drop(stream);
        let mut rest = Vec::new();
        accepted.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_refused_connect_fails_without_waiting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        drop(listener);
        let options = SocketOptions::from_keep_alive(ConfigDuration::ZERO);
        let err = connect(options.socket(peer).unwrap(), peer)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[tokio::test]
    async fn a_connect_in_progress_waits_for_the_handshake() {
        let (listener, peer, queued) = full_listener();
        let options = SocketOptions::from_keep_alive(ConfigDuration::ZERO);
        let socket = options.socket(peer).unwrap();
        // The SYN was dropped: neither connected nor failed.
        assert!(!connected_at_once(&socket, &SockAddr::from(peer)).unwrap());
        let connecting = tokio::spawn(connect(socket, peer));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!connecting.is_finished(), "no answer to the SYN yet");
        // Free the queue: the retransmitted SYN is answered.
        let (first, _) = listener.accept().unwrap();
        let stream = tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
            .await
            .expect("the retransmitted SYN completes the connect")
            .unwrap()
            .unwrap();
        let (_, from) = listener.accept().unwrap();
        assert_eq!(from.as_socket(), Some(stream.local_addr().unwrap()));
        drop((first, queued));
    }
}
