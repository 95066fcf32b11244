//! PROXY protocol headers as the backend reads them, byte for byte: v1 and v2, IPv4, IPv6 and mixed
//! pairs, on plain TCP, before the TLS handshake and inside the TLS stream.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use tagway_config::{ProxyProtocol, ServersTransport, TransportTls};
use tagway_transport::{ClientAddrs, ProxyPlacement, ProxyVersion, Transport};

use crate::support::*;

const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn client(source: &str, destination: &str) -> ClientAddrs {
    ClientAddrs {
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
    }
}

/// The expected headers, written out by hand.
fn expected(version: u8, case: &str) -> (ClientAddrs, Vec<u8>) {
    match (version, case) {
        (1, "v4") => (
            client("192.0.2.10:40000", "198.51.100.1:5432"),
            b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 5432\r\n".to_vec(),
        ),
        (1, "v6") => (
            client("[2001:db8::10]:40000", "[2001:db8::1]:5432"),
            b"PROXY TCP6 2001:db8::10 2001:db8::1 40000 5432\r\n".to_vec(),
        ),
        (1, "mixed") => (
            client("192.0.2.10:40000", "[2001:db8::1]:5432"),
            b"PROXY TCP6 ::ffff:192.0.2.10 2001:db8::1 40000 5432\r\n".to_vec(),
        ),
        (2, "v4") => {
            let mut b = V2_SIG.to_vec();
            b.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
            b.extend_from_slice(&[192, 0, 2, 10, 198, 51, 100, 1]);
            b.extend_from_slice(&40000u16.to_be_bytes());
            b.extend_from_slice(&5432u16.to_be_bytes());
            (client("192.0.2.10:40000", "198.51.100.1:5432"), b)
        }
        (2, "v6") => {
            let mut b = V2_SIG.to_vec();
            b.extend_from_slice(&[0x21, 0x21, 0x00, 36]);
            b.extend_from_slice(
                &"2001:db8::10"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            b.extend_from_slice(
                &"2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            b.extend_from_slice(&40000u16.to_be_bytes());
            b.extend_from_slice(&5432u16.to_be_bytes());
            (client("[2001:db8::10]:40000", "[2001:db8::1]:5432"), b)
        }
        (2, "mixed") => {
            let mut b = V2_SIG.to_vec();
            b.extend_from_slice(&[0x21, 0x21, 0x00, 36]);
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]);
            b.extend_from_slice(
                &"2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            b.extend_from_slice(&40000u16.to_be_bytes());
            b.extend_from_slice(&5432u16.to_be_bytes());
            (client("192.0.2.10:40000", "[2001:db8::1]:5432"), b)
        }
        _ => unreachable!(),
    }
}

/// The addresses `ppp` reads back from a header.
fn parsed(header: &[u8]) -> (SocketAddr, SocketAddr) {
    match ppp::HeaderResult::parse(header) {
        ppp::HeaderResult::V1(Ok(h)) => match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => (
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            ),
            ppp::v1::Addresses::Tcp6(a) => (
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            ),
            other => panic!("unexpected {other:?}"),
        },
        ppp::HeaderResult::V2(Ok(h)) => {
            assert_eq!(h.command, ppp::v2::Command::Proxy);
            match h.addresses {
                ppp::v2::Addresses::IPv4(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                ppp::v2::Addresses::IPv6(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                other => panic!("unexpected {other:?}"),
            }
        }
        other => panic!("not a PROXY header: {other:?}"),
    }
}

fn pp_transport(version: u8, tls: bool) -> ServersTransport {
    ServersTransport {
        proxy_protocol: Some(ProxyProtocol {
            version,
            ..Default::default()
        }),
        tls: tls.then(|| TransportTls {
            server_name: Some("backend.test".into()),
            ..TransportTls::default()
        }),
        ..ServersTransport::default()
    }
}

#[tokio::test]
async fn headers_on_plain_tcp() -> Result<()> {
    let mut backend = Backend::plain(ExpectProxy::BeforeTls).await;
    for version in [1, 2] {
        let transport = Transport::new("pp", &pp_transport(version, false), None)?;
        for case in ["v4", "v6", "mixed"] {
            let (addrs, bytes) = expected(version, case);
            let mut stream = transport
                .dial(&backend.address(), false, Some(addrs))
                .await?;
            // The data after the header is intact.
            round_trip(&mut stream, b"after the header").await?;
            let header = backend.next().await.proxy_header.unwrap();
            assert_eq!(header, bytes, "v{version} {case}");
            let (src, dst) = parsed(&header);
            assert_eq!(src.port(), 40000);
            assert_eq!(dst.port(), 5432);
            if case != "mixed" {
                assert_eq!(
                    (src, dst),
                    (addrs.source, addrs.destination),
                    "v{version} {case}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn headers_before_and_inside_tls() -> Result<()> {
    let ca = Ca::new("CA");
    let leaf = ca.server(&["backend.test"]);
    let tls = |mut t: ServersTransport| {
        t.tls.as_mut().unwrap().root_cas = vec![ca.pem().as_str().into()];
        t
    };
    let mut before = Backend::tls(server_tls(&leaf, None), ExpectProxy::BeforeTls).await;
    let mut inside = Backend::tls(server_tls(&leaf, None), ExpectProxy::InsideTls).await;
    for version in [1, 2] {
        let transport = Transport::new("pp", &tls(pp_transport(version, true)), None)?;
        assert_eq!(transport.proxy_placement(), ProxyPlacement::BeforeTls);
        // `proxyProtocol.insideTLS = true` in the configuration selects the same placement.
        let mut inside_cfg = tls(pp_transport(version, true));
        inside_cfg.proxy_protocol.as_mut().unwrap().inside_tls = true;
        let inside_transport = Transport::new("pp-inside", &inside_cfg, None)?;
        assert_eq!(
            inside_transport.proxy_placement(),
            ProxyPlacement::InsideTls
        );
        assert_eq!(
            transport
                .clone()
                .with_proxy_protocol_inside_tls(true)
                .proxy_placement(),
            ProxyPlacement::InsideTls
        );
        for case in ["v4", "v6", "mixed"] {
            let (addrs, bytes) = expected(version, case);

            let mut stream = transport
                .dial(&before.address(), false, Some(addrs))
                .await?;
            assert!(stream.is_tls());
            round_trip(&mut stream, b"tls payload").await?;
            assert_eq!(
                before.next().await.proxy_header.unwrap(),
                bytes,
                "before v{version} {case}"
            );

            let mut stream = inside_transport
                .dial(&inside.address(), false, Some(addrs))
                .await?;
            round_trip(&mut stream, b"tls payload").await?;
            assert_eq!(
                inside.next().await.proxy_header.unwrap(),
                bytes,
                "inside v{version} {case}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn over_ipv6_loopback() -> Result<()> {
    let mut backend = Backend::start("[::1]:0", None, ExpectProxy::BeforeTls, None).await;
    let transport = Transport::new("pp", &pp_transport(2, false), None)?;
    let (addrs, bytes) = expected(2, "v6");
    let mut stream = transport
        .dial(&backend.address(), false, Some(addrs))
        .await?;
    assert!(stream.peer_addr()?.is_ipv6());
    round_trip(&mut stream, b"v6").await?;
    assert_eq!(backend.next().await.proxy_header.unwrap(), bytes);
    Ok(())
}

#[tokio::test]
async fn health_checks_and_dials_without_a_client_send_local_or_unknown() -> Result<()> {
    let mut backend = Backend::plain(ExpectProxy::BeforeTls).await;
    let v2 = Transport::new("pp", &pp_transport(2, false), None)?;
    v2.check(
        &backend.address(),
        None,
        Some(b"ok"),
        Some(b"ok"),
        Duration::from_secs(5),
    )
    .await?;
    let header = backend.next().await.proxy_header.unwrap();
    let mut local = V2_SIG.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    assert_eq!(header, local);

    // Traefik v2's service-level proxyProtocol, applied over a transport without one.
    let v1 = Transport::new("plain", &ServersTransport::default(), None)?
        .with_proxy_protocol(Some(ProxyVersion::V1));
    assert_eq!(v1.proxy_protocol(), Some(ProxyVersion::V1));
    let mut stream = v1.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"x").await?;
    assert_eq!(
        backend.next().await.proxy_header.unwrap(),
        b"PROXY UNKNOWN\r\n"
    );
    Ok(())
}
