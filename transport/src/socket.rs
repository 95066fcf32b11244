//! Socket options, all in one place: TCP keep-alive and TCP_NODELAY on every backend connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpSocket;

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
