//! Inbound PROXY protocol (v1 and v2), accepted only from trusted addresses.
//!
//! A trusted peer (in `trustedIPs`, or every peer with `insecure`) may start its connection with a
//! PROXY header; the addresses it carries replace the peer's. A peer that is not trusted is never
//! waited for; if its first bytes are a PROXY header anyway, the connection is refused.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::middleware::canonical_ip;

/// Signature of a v2 header.
const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature of a v1 header.
const V1_SIG: &[u8] = b"PROXY ";
/// Largest v1 header (107 bytes) and a generous bound on v2 headers with TLVs.
const MAX_HEADER: usize = 4096;
/// Default bound on the time a trusted peer has to send its header.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an inbound PROXY header was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyInError {
    /// A peer that is not in `trustedIPs` sent a PROXY header.
    #[error("PROXY protocol header from untrusted address {peer}")]
    Untrusted {
        /// The peer address.
        peer: SocketAddr,
    },
    /// The header is malformed.
    #[error("invalid PROXY protocol header from {peer}: {reason}")]
    Invalid {
        /// The peer address.
        peer: SocketAddr,
        /// What is wrong.
        reason: String,
    },
    /// The header did not arrive in time.
    #[error("timed out reading the PROXY protocol header from {peer}")]
    Timeout {
        /// The peer address.
        peer: SocketAddr,
    },
    /// The peer closed before a whole header.
    #[error("{peer} closed before a whole PROXY protocol header")]
    Eof {
        /// The peer address.
        peer: SocketAddr,
    },
    /// A read error.
    #[error("reading the PROXY protocol header from {peer}: {source}")]
    Io {
        /// The peer address.
        peer: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// An entry point's inbound PROXY protocol policy.
#[derive(Clone, Debug)]
pub struct ProxyInbound {
    trusted: Vec<IpNet>,
    insecure: bool,
    /// How long a trusted peer has to send its header.
    pub timeout: Duration,
}

/// The addresses a PROXY header announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxiedAddrs {
    /// The original client.
    pub src: SocketAddr,
    /// The original destination.
    pub dst: SocketAddr,
}

impl ProxyInbound {
    /// A policy trusting `trusted` (CIDRs or bare IPs), or every peer when `insecure`.
    pub fn new(trusted: &[String], insecure: bool) -> Result<Self, crate::middleware::RangeError> {
        Ok(ProxyInbound {
            trusted: crate::middleware::parse_ranges(trusted)?,
            insecure,
            timeout: DEFAULT_READ_TIMEOUT,
        })
    }

    /// True when `peer` may send a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let ip = canonical_ip(peer);
        self.insecure || self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// True when `buf` starts with (or, when shorter, could start) a PROXY header.
pub fn looks_like_header(buf: &[u8]) -> bool {
    let n = buf.len().min(V2_SIG.len());
    let m = buf.len().min(V1_SIG.len());
    n > 0 && (buf[..n] == V2_SIG[..n] || buf[..m] == V1_SIG[..m])
}

/// True when `buf` starts with a whole PROXY signature (`PROXY ` or the v2 signature).
pub fn is_header(buf: &[u8]) -> bool {
    buf.starts_with(V1_SIG) || buf.starts_with(V2_SIG)
}

/// Reads an optional PROXY header from a trusted peer into `buf`. On return, `buf` holds the bytes
/// read after the header (to be replayed). `Ok(None)` when the peer sent no header (its first
/// bytes are something else, or it sent nothing within the timeout).
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Option<ProxiedAddrs>, ProxyInError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !buf.is_empty() {
            if !looks_like_header(buf) {
                return Ok(None);
            }
            match parse(buf, peer)? {
                Some((addrs, used)) => {
                    buf.drain(..used);
                    // A LOCAL / UNKNOWN header keeps the peer's own address.
                    return Ok(addrs);
                }
                None if buf.len() >= MAX_HEADER => {
                    return Err(ProxyInError::Invalid {
                        peer,
                        reason: format!("header longer than {MAX_HEADER} bytes"),
                    });
                }
                None => {}
            }
        }
        let len = buf.len();
        let want = (MAX_HEADER - len).min(512);
        buf.resize(len + want, 0);
        let read = tokio::time::timeout_at(deadline, r.read(&mut buf[len..])).await;
        buf.truncate(
            len + read
                .as_ref()
                .ok()
                .and_then(|r| r.as_ref().ok())
                .copied()
                .unwrap_or(0),
        );
        match read {
            Err(_) if buf.is_empty() => return Ok(None),
            Err(_) => return Err(ProxyInError::Timeout { peer }),
            Ok(Err(source)) => return Err(ProxyInError::Io { peer, source }),
            Ok(Ok(0)) => return Err(ProxyInError::Eof { peer }),
            Ok(Ok(_)) => {}
        }
    }
}

/// Parses a header at the start of `buf`: `Ok(None)` = incomplete; `Ok(Some((addrs, len)))` with
/// `addrs` `None` for a `LOCAL`/`UNKNOWN` header (keep the peer's address).
fn parse(
    buf: &[u8],
    peer: SocketAddr,
) -> Result<Option<(Option<ProxiedAddrs>, usize)>, ProxyInError> {
    use ppp::PartialResult;
    let invalid = |reason: String| ProxyInError::Invalid { peer, reason };
    if buf.starts_with(V1_SIG) || V1_SIG.starts_with(buf) {
        let res = ppp::v1::Header::try_from(buf);
        if res.is_incomplete() {
            return Ok(None);
        }
        let h = res.map_err(|e| invalid(e.to_string()))?;
        let addrs = match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some(ProxiedAddrs {
                src: SocketAddr::new(a.source_address.into(), a.source_port),
                dst: SocketAddr::new(a.destination_address.into(), a.destination_port),
            }),
            ppp::v1::Addresses::Tcp6(a) => Some(ProxiedAddrs {
                src: SocketAddr::new(a.source_address.into(), a.source_port),
                dst: SocketAddr::new(a.destination_address.into(), a.destination_port),
            }),
            ppp::v1::Addresses::Unknown => None,
        };
        return Ok(Some((addrs, h.header.len())));
    }
    let res = ppp::v2::Header::try_from(buf);
    if res.is_incomplete() {
        return Ok(None);
    }
    let h = res.map_err(|e| invalid(e.to_string()))?;
    let addrs = match (h.command, h.addresses) {
        (ppp::v2::Command::Local, _) => None,
        (_, ppp::v2::Addresses::IPv4(a)) => Some(ProxiedAddrs {
            src: SocketAddr::new(a.source_address.into(), a.source_port),
            dst: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        (_, ppp::v2::Addresses::IPv6(a)) => Some(ProxiedAddrs {
            src: SocketAddr::new(a.source_address.into(), a.source_port),
            dst: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }),
        _ => None,
    };
    Ok(Some((addrs, h.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn peer() -> SocketAddr {
        "127.0.0.1:4000".parse().unwrap()
    }

    #[test]
    fn trust() {
        let p = ProxyInbound::new(&["10.0.0.0/8".into(), "127.0.0.1".into()], false).unwrap();
        assert!(p.trusts("10.1.2.3".parse().unwrap()));
        assert!(p.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.trusts("127.0.0.2".parse().unwrap()));
        let p = ProxyInbound::new(&[], true).unwrap();
        assert!(p.trusts("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn detection() {
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"PRO"));
        assert!(looks_like_header(b"\r\n\r\n\0\r\nQUIT\n\x21"));
        assert!(!looks_like_header(b"GET /"));
        assert!(!looks_like_header(b"\x16\x03\x01"));
        assert!(is_header(b"PROXY TCP4"));
        assert!(!is_header(b"PROX"));
        assert!(is_header(b"\r\n\r\n\0\r\nQUIT\n\x21"));
        assert!(!is_header(b"\r\n\r\n\0\r\n"));
    }

    #[tokio::test]
    async fn v1_in_pieces_keeps_the_rest() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let w = tokio::spawn(async move {
            for part in [
                &b"PROXY TCP4 192.0.2.1 "[..],
                b"198.51.100.2 5555 443\r\nhel",
                b"lo",
            ] {
                a.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        let mut buf = Vec::new();
        let got = read_header(&mut b, peer(), &mut buf, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.src, "192.0.2.1:5555".parse().unwrap());
        assert_eq!(got.dst, "198.51.100.2:443".parse().unwrap());
        let _a = w.await.unwrap();
        let mut rest = [0u8; 8];
        let n = if buf.len() < 5 {
            b.read(&mut rest).await.unwrap()
        } else {
            0
        };
        buf.extend_from_slice(&rest[..n]);
        assert!(b"hello".starts_with(&buf) && !buf.is_empty(), "{buf:?}");
    }

    #[tokio::test]
    async fn v2_header() {
        let src: SocketAddr = "[2001:db8::1]:1234".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let mut hdr = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap();
        hdr.extend_from_slice(b"data");
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&hdr).await.unwrap();
        let mut buf = Vec::new();
        let got = read_header(&mut b, peer(), &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Some(ProxiedAddrs { src, dst }));
        assert_eq!(buf, b"data");
    }

    #[tokio::test]
    async fn no_header_and_garbage() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.0\r\n").await.unwrap();
        let mut buf = Vec::new();
        let got = read_header(&mut b, peer(), &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, None);
        assert_eq!(buf, b"GET / HTTP/1.0\r\n");

        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"PROXY TCP9 what\r\n").await.unwrap();
        let mut buf = Vec::new();
        let got = read_header(&mut b, peer(), &mut buf, Duration::from_secs(5)).await;
        assert!(matches!(got, Err(ProxyInError::Invalid { .. })), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_and_stalled_header() {
        let (_a, mut b) = tokio::io::duplex(1024);
        let mut buf = Vec::new();
        let got = read_header(&mut b, peer(), &mut buf, Duration::from_secs(1)).await;
        assert!(matches!(got, Ok(None)));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"PROXY TCP4 1.2").await.unwrap();
        let got = read_header(&mut b, peer(), &mut buf, Duration::from_secs(1)).await;
        assert!(matches!(got, Err(ProxyInError::Timeout { .. })), "{got:?}");
    }
}
