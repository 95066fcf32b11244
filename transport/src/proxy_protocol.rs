//! PROXY protocol headers (v1 text, v2 binary) carrying the original client's addresses, written with
//! the `ppp` crate.
//!
//! Address families: when both addresses are IPv4 (or IPv4-mapped IPv6, `::ffff:a.b.c.d`, as a
//! dual-stack listener reports IPv4 clients) the header is `TCP4` / `AF_INET`; otherwise both are sent
//! as IPv6 (`TCP6` / `AF_INET6`), an IPv4 address being mapped to `::ffff:a.b.c.d`, as HAProxy does for
//! mixed pairs. A connection with no client (a health check, or [`crate::Transport::dial`] called
//! without [`ClientAddrs`]) gets `PROXY UNKNOWN` (v1) or a `LOCAL` command (v2), as the specification
//! says for connections the proxy makes on its own behalf.

use std::io;
use std::net::{IpAddr, SocketAddr};

use ppp::v2;

/// The addresses of the client connection a backend connection relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddrs {
    /// The client's address: the peer of the accepted connection, or the address an inbound PROXY
    /// header declared when the entry point trusts its sender.
    pub source: SocketAddr,
    /// The address the client connected to (the entry point's local address, or the inbound PROXY
    /// header's destination).
    pub destination: SocketAddr,
}

/// PROXY protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    /// Version 1, human-readable (`PROXY TCP4 … \r\n`).
    V1,
    /// Version 2, binary.
    V2,
}

impl ProxyVersion {
    /// From `proxyProtocol.version`.
    pub fn from_number(version: u8) -> Option<Self> {
        match version {
            1 => Some(ProxyVersion::V1),
            2 => Some(ProxyVersion::V2),
            _ => None,
        }
    }
}

/// Where the PROXY header goes on a TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ProxyPlacement {
    /// On the TCP connection, before the TLS handshake (Traefik's behaviour; HAProxy's
    /// `accept-proxy` on a TLS bind).
    #[default]
    BeforeTls,
    /// As the first bytes inside the TLS stream, after the handshake (what a Consul Connect sidecar,
    /// which terminates the mesh TLS and then reads PROXY, expects).
    InsideTls,
}

/// Normalises a pair of addresses to one family; see the module documentation.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canonical(source), canonical(destination));
    if s.is_ipv4() && d.is_ipv4() {
        return (s, d);
    }
    let v6 = |a: SocketAddr| {
        let ip = match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        SocketAddr::new(IpAddr::V6(ip), a.port())
    };
    (v6(s), v6(d))
}

/// The header bytes for `version`, relaying `client` (`None`: the UNKNOWN / LOCAL form).
pub fn header(version: ProxyVersion, client: Option<&ClientAddrs>) -> io::Result<Vec<u8>> {
    let pair = client.map(|c| same_family(c.source, c.destination));
    match version {
        ProxyVersion::V1 => {
            let addresses = match pair {
                Some(pair) => ppp::v1::Addresses::from(pair),
                None => ppp::v1::Addresses::Unknown,
            };
            Ok(addresses.to_string().into_bytes())
        }
        ProxyVersion::V2 => match pair {
            Some(pair) => v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                v2::Addresses::from(pair),
            )
            .build(),
            None => v2::Builder::new(
                v2::Version::Two | v2::Command::Local,
                v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
            )
            .build(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(s: &str, d: &str) -> ClientAddrs {
        ClientAddrs {
            source: s.parse().unwrap(),
            destination: d.parse().unwrap(),
        }
    }

    #[test]
    fn v1_ipv4_ipv6_mixed_and_unknown() {
        let h = |c: &ClientAddrs| {
            String::from_utf8(header(ProxyVersion::V1, Some(c)).unwrap()).unwrap()
        };
        assert_eq!(
            h(&addrs("192.0.2.1:5000", "198.51.100.2:443")),
            "PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n"
        );
        assert_eq!(
            h(&addrs("[2001:db8::1]:5000", "[2001:db8::2]:443")),
            "PROXY TCP6 2001:db8::1 2001:db8::2 5000 443\r\n"
        );
        // Mixed: the IPv4 side is mapped into IPv6.
        assert_eq!(
            h(&addrs("192.0.2.1:5000", "[2001:db8::2]:443")),
            "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 5000 443\r\n"
        );
        // Both IPv4-mapped (a dual-stack listener): sent as plain IPv4.
        assert_eq!(
            h(&addrs(
                "[::ffff:192.0.2.1]:5000",
                "[::ffff:198.51.100.2]:443"
            )),
            "PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n"
        );
        assert_eq!(
            header(ProxyVersion::V1, None).unwrap(),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn v2_bytes() {
        let sig = b"\r\n\r\n\0\r\nQUIT\n";
        let b = header(
            ProxyVersion::V2,
            Some(&addrs("192.0.2.1:5000", "198.51.100.2:443")),
        )
        .unwrap();
        let mut want = sig.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0x01, 0xbb,
        ]);
        assert_eq!(b, want);

        let b = header(
            ProxyVersion::V2,
            Some(&addrs("192.0.2.1:5000", "[2001:db8::2]:443")),
        )
        .unwrap();
        assert_eq!(b[12..16], [0x21, 0x21, 0, 36]);
        assert_eq!(
            b[16..32],
            "192.0.2.1"
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .to_ipv6_mapped()
                .octets()
        );

        let b = header(ProxyVersion::V2, None).unwrap();
        let mut want = sig.to_vec();
        want.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(b, want);
    }
}
