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
use tokio::task::JoinSet;

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
    /// The listener cannot be bound.
    #[error("entry point {entry_point}: cannot listen on {address}: {source}")]
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

/// Binds a non-blocking listener with SO_REUSEADDR and (Unix) SO_REUSEPORT, so every worker
/// thread can have its own listener on the same address and the kernel spreads connections.
pub fn bind_addr(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    #[cfg(all(unix, not(target_os = "solaris"), not(target_os = "illumos")))]
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Binds an entry point (the first candidate address that works: `[::]` then `0.0.0.0` for
/// `:port`).
pub fn bind(entry_point: &str, address: &str) -> Result<std::net::TcpListener, BindError> {
    let candidates = parse_address(entry_point, address)?;
    let mut last = None;
    for a in &candidates {
        match bind_addr(*a) {
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

/// True for accept errors that mean "out of descriptors or memory": back off before retrying.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The semaphore of `maxConnections` (shared by the entry point's listeners on every worker).
pub fn connection_limit(max_connections: Option<u64>) -> Option<Arc<Semaphore>> {
    max_connections.map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS as u64) as usize)))
}

/// Accepts connections until `stop` turns true, then waits for the open ones up to `grace` and
/// aborts the rest. `handle` serves one connection.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop<F, Fut>(
    name: Arc<str>,
    listener: std::net::TcpListener,
    max_connections: Option<Arc<Semaphore>>,
    counters: Arc<EntryPointCounters>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = max_connections;
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(entry_point = %name, error = %e, "cannot register the listener");
            return;
        }
    };
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    'accept: loop {
        if *stop.borrow() {
            break;
        }
        let permit = match &sem {
            None => None,
            Some(s) => loop {
                tokio::select! {
                    p = s.clone().acquire_owned() => match p {
                        Ok(p) => break Some(p),
                        Err(_) => break 'accept,
                    },
                    _ = stop.changed() => break 'accept,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            },
        };
        let (stream, peer) = loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break 'accept,
                res = listener.accept() => match res {
                    Ok(c) => break c,
                    Err(e) => {
                        EntryPointCounters::inc(&counters.accept_errors);
                        if is_resource_error(&e) {
                            tracing::warn!(entry_point = %name, error = %e, backoff = ?backoff,
                                "accept failed: out of resources, backing off");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        } else {
                            tracing::debug!(entry_point = %name, error = %e, "accept failed");
                        }
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        };
        backoff = Duration::from_millis(5);
        EntryPointCounters::inc(&counters.accepted);
        let _ = stream.set_nodelay(true);
        let fut = handle(stream, peer);
        conns.spawn(async move {
            fut.await;
            drop(permit);
        });
    }
    drop(listener);
    let open = conns.len();
    if open > 0 {
        tracing::info!(entry_point = %name, open, grace = ?grace, "stopped accepting; draining connections");
        let drained =
            tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::info!(entry_point = %name, left = conns.len(), "grace period over; closing the remaining connections");
            conns.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let l = TcpListener::from_std(bind("ep", ":0").unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        let c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (_s, peer) = l.accept().await.unwrap();
        assert_eq!(
            crate::middleware::canonical_ip(peer.ip()),
            c.local_addr().unwrap().ip()
        );
    }
}
