//! Socket options, all in one place: TCP keep-alive and TCP_NODELAY on every backend connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};

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

    /// Opens a socket for `addr` with the options applied, ready to connect.
    pub fn socket(&self, addr: SocketAddr) -> io::Result<TcpSocket> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        self.apply_inner(SockRef::from(&socket), true)?;
        Ok(socket)
    }
}

/// Connects `socket` (non-blocking, from [`SocketOptions::socket`]) to `peer`.
///
/// As tokio's `TcpSocket::connect`, but the outcome is read from the readiness the connect
/// completed with: a refused or unreachable connect reports an error (`EPOLLERR`) with its
/// writability, and only then is `SO_ERROR` read for the reason. A connect that succeeded needs
/// no `getsockopt` (nginx, HAProxy and Go make that call after every connect).
pub async fn connect(socket: TcpSocket, peer: SocketAddr) -> io::Result<TcpStream> {
    match SockRef::from(&socket).connect(&peer.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the descriptor comes out of `socket`, which gives up its ownership; nothing
        // else holds it.
        let std = unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) };
        TcpStream::from_std(std)?
    };
    // Writable when connected; a failed connect is writable too, with an error readiness.
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if (ready.is_error() || ready.is_write_closed())
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn opts() -> SocketOptions {
        SocketOptions::from_keep_alive(ConfigDuration::default())
    }

    async fn connects_and_refuses() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = tokio::net::TcpListener::bind(host).await else {
                continue; // no IPv6 on this machine
            };
            let addr = l.local_addr().unwrap();
            let mut s = connect(opts().socket(addr).unwrap(), addr).await.unwrap();
            let (mut a, _) = l.accept().await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            a.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"ping");
            assert_eq!(s.peer_addr().unwrap(), addr);
            // The port closed: the connect's error readiness carries the reason.
            drop((l, a, s));
            let e = connect(opts().socket(addr).unwrap(), addr)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{addr}: {e}");
        }
    }

    /// A connect that fails after it started (not in the connect call): its SYN is dropped by a
    /// listener whose queue is full, and the retransmitted SYN meets the closed port.
    async fn refused_later() {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        // Fill the accept queue (never accepted), then one more: its SYN is dropped.
        let mut queued = Vec::new();
        let mut pending = None;
        for _ in 0..8 {
            let attempt = tokio::spawn(connect(opts().socket(addr).unwrap(), addr));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if attempt.is_finished() {
                queued.push(attempt.await.unwrap().unwrap());
            } else {
                pending = Some(attempt);
                break;
            }
        }
        let pending = pending.expect("a full accept queue drops the next SYN");
        drop(l);
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), pending)
            .await
            .expect("the retransmitted SYN is refused")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }

    #[tokio::test]
    async fn refused_later_current_thread() {
        refused_later().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_later_multi_thread() {
        refused_later().await;
    }

    #[tokio::test]
    async fn connects_and_refuses_current_thread() {
        connects_and_refuses().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connects_and_refuses_multi_thread() {
        connects_and_refuses().await;
    }
}
