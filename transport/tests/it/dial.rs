//! Dialing: refused, timeouts, keep-alive and TCP_NODELAY read back, host names, the health check,
//! the transports registry.

use std::time::Duration;

use anyhow::Result;
use socket2::SockRef;
use tagway_config::{Duration as ConfigDuration, ProxyProtocol, ServersTransport, TransportTls};
use tagway_transport::{
    CheckError, DEFAULT_TRANSPORT, DialErrorKind, DialErrorReason, DialStage, Transport,
    TransportError, Transports,
};

use crate::support::*;

#[tokio::test]
async fn refused() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    drop(listener);
    let transport = Transport::new("t", &ServersTransport::default(), None)?;
    let err = transport
        .dial(&addr.to_string(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::Refused, "{err}");
    assert_eq!(err.peer(), Some(addr));
    assert!(
        err.to_string()
            .starts_with(&format!("dial {addr}: connect to {addr}")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_addresses() -> Result<()> {
    let transport = Transport::new("t", &ServersTransport::default(), None)?;
    for bad in ["no-port", "::1:80", "host:notaport"] {
        let err = transport.dial(bad, false, None).await.unwrap_err();
        assert_eq!(err.reason(), DialErrorReason::Other, "{bad}: {err}");
        assert!(
            matches!(err.kind(), DialErrorKind::InvalidAddress { .. }),
            "{err}"
        );
    }
    Ok(())
}

/// A backend whose accept queue is full drops the SYN: the connect stays in progress (no
/// answer at once, unlike a local port that accepts or refuses), and `dialTimeout` ends it in
/// the connect stage.
#[tokio::test]
async fn dial_timeout_bounds_a_connect_without_answer() -> Result<()> {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    listener.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    // Linux queues backlog + 1 connections: this one fills the queue.
    listener.listen(0)?;
    let addr = listener.local_addr()?.as_socket().expect("an inet address");
    let _queued = std::net::TcpStream::connect(addr)?;
    let transport = Transport::new(
        "t",
        &ServersTransport {
            dial_timeout: ConfigDuration::from_millis(300),
            ..ServersTransport::default()
        },
        None,
    )?;
    let started = std::time::Instant::now();
    let err = transport
        .dial(&addr.to_string(), false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), DialErrorKind::Timeout { after, stage: DialStage::Connect } if *after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(err.to_string().contains("timed out after 300ms"), "{err}");
    Ok(())
}

/// A backend that accepts (the kernel completes the TCP handshake) and never answers: the TLS
/// handshake waits for a ServerHello that never comes, and `dialTimeout` ends it.
#[tokio::test(start_paused = true)]
async fn dial_timeout_bounds_the_tls_handshake() -> Result<()> {
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = silent.local_addr()?;
    let transport = Transport::new(
        "slow",
        &ServersTransport {
            dial_timeout: ConfigDuration::from_secs(5),
            tls: Some(TransportTls {
                insecure_skip_verify: true,
                ..TransportTls::default()
            }),
            ..ServersTransport::default()
        },
        None,
    )?;
    let started = tokio::time::Instant::now();
    let err = transport
        .dial(&addr.to_string(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::Timeout, "{err}");
    assert!(
        matches!(err.kind(), DialErrorKind::Timeout { after, stage: DialStage::TlsHandshake } if *after == Duration::from_secs(5)),
        "{err:?}"
    );
    // Paused clock: exactly the timeout elapsed, in virtual time.
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert!(
        err.to_string()
            .contains("timed out after 5s during the TLS handshake"),
        "{err}"
    );
    drop(silent);
    Ok(())
}

#[tokio::test]
async fn keep_alive_and_nodelay_are_set_on_the_socket() -> Result<()> {
    let backend = Backend::plain(ExpectProxy::No).await;
    let cases = [
        (ConfigDuration::ZERO, Some(Duration::from_secs(15))),
        (ConfigDuration::from_secs(20), Some(Duration::from_secs(20))),
        (ConfigDuration::from_secs(-1), None),
    ];
    for (configured, expected) in cases {
        let transport = Transport::new(
            "ka",
            &ServersTransport {
                dial_keep_alive: configured,
                ..ServersTransport::default()
            },
            None,
        )?;
        assert_eq!(transport.keep_alive(), expected);
        let stream = transport.dial(&backend.address(), false, None).await?;
        let sock = SockRef::from(stream.as_tcp());
        assert!(sock.tcp_nodelay()?);
        match expected {
            Some(every) => {
                assert!(sock.keepalive()?);
                assert_eq!(sock.tcp_keepalive_time()?, every);
                assert_eq!(sock.tcp_keepalive_interval()?, every);
                assert_eq!(sock.tcp_keepalive_retries()?, 9);
            }
            None => assert!(!sock.keepalive()?),
        }
    }
    Ok(())
}

#[tokio::test]
async fn host_names_are_resolved() -> Result<()> {
    let mut backend = Backend::plain(ExpectProxy::No).await;
    let transport = Transport::new("t", &ServersTransport::default(), None)?;
    let mut stream = transport
        .dial(&format!("localhost:{}", backend.addr.port()), false, None)
        .await?;
    round_trip(&mut stream, b"resolved").await?;
    backend.next().await;
    Ok(())
}

#[test]
fn durations_and_proxy_version() -> Result<()> {
    let t = Transport::new("t", &ServersTransport::default(), None)?;
    assert_eq!(t.dial_timeout(), Some(Duration::from_secs(30)));
    assert_eq!(t.termination_delay(), Some(Duration::from_millis(100)));
    let t = Transport::new(
        "t",
        &ServersTransport {
            dial_timeout: ConfigDuration::ZERO,
            termination_delay: ConfigDuration::from_secs(-1),
            ..ServersTransport::default()
        },
        None,
    )?;
    assert_eq!(t.dial_timeout(), None);
    assert_eq!(t.termination_delay(), None);

    let err = Transport::new(
        "pp",
        &ServersTransport {
            proxy_protocol: Some(ProxyProtocol {
                version: 3,
                ..Default::default()
            }),
            ..ServersTransport::default()
        },
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("\"pp\": proxyProtocol.version: unsupported PROXY protocol version 3"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn health_check_send_expect() -> Result<()> {
    let greeter = Backend::greeting(b"220 smtp.test ESMTP ready\r\n").await;
    let transport = Transport::new("t", &ServersTransport::default(), None)?;
    let timeout = Duration::from_secs(5);

    transport
        .check(&greeter.address(), None, None, Some(b"220 "), timeout)
        .await?;
    let err = transport
        .check(&greeter.address(), None, None, Some(b"500 "), timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckError::UnexpectedResponse { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("220 smtp.test"), "{err}");

    // Echo: what is sent comes back.
    let echo = Backend::plain(ExpectProxy::No).await;
    transport
        .check(
            &echo.address(),
            None,
            Some(b"PING\r\n"),
            Some(b"PING"),
            timeout,
        )
        .await?;
    // Connect-only check.
    transport
        .check(&echo.address(), None, None, None, timeout)
        .await?;
    // Port override: the configured port is dead, the override is the echo server.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    transport
        .check(
            &dead.to_string(),
            Some(echo.addr.port()),
            Some(b"x"),
            Some(b"x"),
            timeout,
        )
        .await?;
    let err = transport
        .check(&dead.to_string(), None, None, None, timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CheckError::Dial(e) if e.reason() == DialErrorReason::Refused),
        "{err}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn health_check_times_out_on_a_silent_server() -> Result<()> {
    let echo = Backend::plain(ExpectProxy::No).await;
    let transport = Transport::new("t", &ServersTransport::default(), None)?;
    // The echo server never sends anything unless asked.
    let err = transport
        .check(
            &echo.address(),
            None,
            None,
            Some(b"hello"),
            Duration::from_secs(3),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckError::Timeout { after, .. } if after == Duration::from_secs(3)),
        "{err}"
    );
    Ok(())
}

#[test]
fn registry_resolves_names_and_keeps_errors_per_transport() -> Result<()> {
    let default = Transport::new(DEFAULT_TRANSPORT, &ServersTransport::default(), None)?;
    let mut configs = tagway_config::Resources::new();
    configs.insert(
        "fast@file".to_owned(),
        ServersTransport {
            dial_timeout: ConfigDuration::from_secs(1),
            ..ServersTransport::default()
        },
    );
    configs.insert(
        "broken@file".to_owned(),
        ServersTransport {
            tls: Some(TransportTls::default()),
            ..ServersTransport::default()
        },
    );
    let (transports, errors) = Transports::build(default, &configs, None, None);
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(&errors[0], TransportError::NoServerIdentity { transport } if transport == "broken@file")
    );
    assert_eq!(transports.get(None).unwrap().name(), DEFAULT_TRANSPORT);
    assert_eq!(
        transports.get(Some(DEFAULT_TRANSPORT)).unwrap().name(),
        DEFAULT_TRANSPORT
    );
    assert_eq!(
        transports.get(Some("fast@file")).unwrap().dial_timeout(),
        Some(Duration::from_secs(1))
    );
    assert!(transports.get(Some("broken@file")).is_none());
    assert!(transports.get(Some("missing@file")).is_none());

    // Rebuilding with the same configuration reuses the built transport.
    let before = transports.get(Some("fast@file")).unwrap().clone();
    let (again, _) = Transports::build(
        transports.default_transport().clone(),
        &configs,
        None,
        Some(&transports),
    );
    let after = again.get(Some("fast@file")).unwrap();
    assert!(std::ptr::eq(before.config(), after.config()));
    Ok(())
}
