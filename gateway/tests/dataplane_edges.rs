//! Edge cases of the data plane through the library API over real sockets on 127.0.0.1, with
//! dynamic configurations written in TOML (the keys users write): re-encryption after TLS
//! termination, `ipAllowList` on the PROXY-decoded client address, a service whose only server
//! fails its health check, and a negative `terminationDelay`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::ServerName;
use support::*;
use tagway::observability::counters::Failure;
use tagway_config::{Dynamic, Format};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Bound on every single wait of these tests.
const WAIT: Duration = Duration::from_secs(5);

/// A dynamic configuration from TOML text, read as the file provider reads it.
fn dynamic(toml: &str) -> Dynamic {
    tagway_config::load_dynamic_str(toml, Format::Toml, "edges.toml")
        .unwrap_or_else(|e| panic!("invalid test configuration: {e}\n{toml}"))
}

/// TOML multi-line string holding a PEM.
fn toml_pem(pem: &str) -> String {
    format!("\"\"\"\n{pem}\"\"\"")
}

/// Reads until EOF (a reset counts as the end), bounded by [`WAIT`].
async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no EOF within {WAIT:?} (got {out:?})"),
        }
    }
}

/// Connects, writes `data`, reads everything until EOF.
async fn exchange(to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(to))
        .await
        .unwrap()
        .unwrap();
    if !data.is_empty() {
        // A refused connection may already be closed: the write result does not matter.
        let _ = s.write_all(data).await;
    }
    read_to_end(&mut s).await
}

/// Polls `cond` every 20 ms until it holds, at most [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Re-encryption after termination
// ---------------------------------------------------------------------------------------------

/// A CA, and a certificate for `back.example` it signed: (CA PEM, leaf PEM, leaf key PEM).
fn backend_pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edges backend CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["back.example".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "back.example");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// What the TLS-only echo backend saw.
#[derive(Default)]
struct TlsBackendLog {
    /// The SNI of every completed handshake.
    sni: Mutex<Vec<Option<String>>>,
    /// Connections whose handshake failed (e.g. plaintext).
    failed: AtomicUsize,
    /// Bytes echoed over TLS.
    echoed: AtomicUsize,
}

/// A backend that only speaks TLS (rustls, `cert_pem`/`key_pem`): it records the SNI of each
/// handshake and echoes the decrypted bytes until EOF.
async fn tls_echo_backend(cert_pem: &str, key_pem: &str) -> (SocketAddr, Arc<TlsBackendLog>) {
    let acceptor = tls_acceptor(cert_pem, key_pem);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log = Arc::new(TlsBackendLog::default());
    let log2 = log.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let log = log2.clone();
            tokio::spawn(async move {
                let Ok(Ok(mut t)) = tokio::time::timeout(WAIT, acceptor.accept(s)).await else {
                    log.failed.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                let sni = t.get_ref().1.server_name().map(str::to_owned);
                log.sni.lock().unwrap().push(sni);
                let mut b = [0u8; 4096];
                loop {
                    match tokio::time::timeout(WAIT, t.read(&mut b)).await {
                        Ok(Ok(n)) if n > 0 => {
                            if t.write_all(&b[..n]).await.is_err() {
                                return;
                            }
                            log.echoed.fetch_add(n, Ordering::SeqCst);
                        }
                        _ => break,
                    }
                }
                let _ = t.shutdown().await;
            });
        }
    });
    (addr, log)
}

#[tokio::test]
async fn terminated_tls_is_reencrypted_toward_the_server() {
    let (ca_pem, back_cert, back_key) = backend_pki();
    let (back, log) = tls_echo_backend(&back_cert, &back_key).await;
    // The gateway's own certificate for the name clients use (a different key and name).
    let (front_cert, front_key) = cert(&["front.example"]);
    let toml = format!(
        r#"
[tcp.routers.front]
rule = "HostSNI(`front.example`)"
service = "back"
[tcp.routers.front.tls]

[tcp.services.back.loadBalancer]
serversTransport = "reencrypt"
servers = [{{ address = "{back}" }}]

[tcp.serversTransports.reencrypt.tls]
serverName = "back.example"
rootCAs = [{ca}]

[[tls.certificates]]
certFile = {fc}
keyFile = {fk}
"#,
        ca = toml_pem(&ca_pem),
        fc = toml_pem(&front_cert),
        fk = toml_pem(&front_key),
    );
    let gw = start(static_cfg(), dynamic(&toml)).await;

    // The backend is TLS-only: plaintext gets no echo, at most a TLS alert record (type 21), so
    // a gateway that sent plaintext would fail.
    let reply = exchange(back, b"plain").await;
    assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    wait_until("the backend to refuse plaintext", || {
        log.failed.load(Ordering::SeqCst) == 1
    })
    .await;

    // The client trusts only the gateway's certificate for front.example: the gateway terminates.
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let sn = ServerName::try_from("front.example").unwrap();
    let mut t = tokio::time::timeout(WAIT, tls_client(&front_cert).connect(sn, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake with the gateway's certificate");
    t.write_all(b"ping-1").await.unwrap();
    let mut b = [0u8; 6];
    tokio::time::timeout(WAIT, t.read_exact(&mut b))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&b, b"ping-1");
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    t.write_all(&big).await.unwrap();
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut rest))
        .await
        .expect("EOF in time")
        .unwrap();
    assert_eq!(rest, big);

    // The server saw a TLS handshake with the transport's serverName, and echoed over TLS.
    assert_eq!(
        *log.sni.lock().unwrap(),
        vec![Some("back.example".to_owned())]
    );
    assert_eq!(
        log.failed.load(Ordering::SeqCst),
        1,
        "only the plaintext probe failed"
    );
    assert_eq!(log.echoed.load(Ordering::SeqCst), 6 + big.len());
    let ep = gw.handle.entry_point("tcp").unwrap();
    assert_eq!(ep.tls_errors.load(Ordering::Relaxed), 0);
}

// ---------------------------------------------------------------------------------------------
// 2. ipAllowList on the PROXY-decoded client address
// ---------------------------------------------------------------------------------------------

/// A backend that writes `name` and closes; counts the connections it accepted.
async fn counting_backend(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
                let mut sink = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
            });
        }
    });
    (addr, n)
}

fn v2_header(src: &str, dst: &str) -> Vec<u8> {
    let src: SocketAddr = src.parse().unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

fn with_payload(mut header: Vec<u8>) -> Vec<u8> {
    header.extend_from_slice(b"hello");
    header
}

#[tokio::test]
async fn ip_allow_list_matches_the_proxy_decoded_client() {
    let (a, accepted) = counting_backend("A").await;
    let mut st = static_cfg();
    st.entry_points.get_mut("tcp").unwrap().proxy_protocol =
        Some(tagway_config::InboundProxyProtocol {
            trusted_ips: vec!["127.0.0.1".into()],
            insecure: false,
        });
    let toml = format!(
        r#"
[tcp.routers.r]
rule = "HostSNI(`*`)"
service = "s"
middlewares = ["only"]

[tcp.services.s.loadBalancer]
servers = [{{ address = "{a}" }}]

[tcp.middlewares.only.ipAllowList]
sourceRange = ["10.1.2.3/32"]
"#
    );
    let gw = start(st, dynamic(&toml)).await;
    let to = gw.addr();
    let ep = gw.handle.entry_point("tcp").unwrap().clone();

    // The peer itself (127.0.0.1, trusted for PROXY) is not in the list: without a header it is
    // refused, so what lets the next ones through is the address inside their header.
    assert_eq!(exchange(to, b"hello").await, b"");
    assert_eq!(ep.refused.load(Ordering::Relaxed), 1);

    let allowed: Vec<(&str, Vec<u8>)> = vec![
        (
            "v1 10.1.2.3",
            b"PROXY TCP4 10.1.2.3 127.0.0.1 4444 80\r\nhello".to_vec(),
        ),
        (
            "v2 10.1.2.3",
            with_payload(v2_header("10.1.2.3:4444", "127.0.0.1:80")),
        ),
        (
            "v1 ::ffff:10.1.2.3",
            b"PROXY TCP6 ::ffff:10.1.2.3 ::1 4444 80\r\nhello".to_vec(),
        ),
        (
            "v2 ::ffff:10.1.2.3",
            with_payload(v2_header("[::ffff:10.1.2.3]:4444", "[::1]:80")),
        ),
    ];
    let refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "v1 10.9.9.9",
            b"PROXY TCP4 10.9.9.9 127.0.0.1 4444 80\r\nhello".to_vec(),
        ),
        (
            "v2 10.9.9.9",
            with_payload(v2_header("10.9.9.9:4444", "127.0.0.1:80")),
        ),
        (
            "v2 ::ffff:10.9.9.9",
            with_payload(v2_header("[::ffff:10.9.9.9]:4444", "[::1]:80")),
        ),
        (
            "v1 10.1.2.4",
            b"PROXY TCP4 10.1.2.4 127.0.0.1 4444 80\r\nhello".to_vec(),
        ),
    ];
    // Interleaved, so that a refused connection that reached the backend would be counted before
    // the next allowed one is answered.
    let mut served = 0;
    for i in 0..allowed.len().max(refused.len()) {
        if let Some((what, bytes)) = allowed.get(i) {
            assert_eq!(exchange(to, bytes).await, b"A", "{what} was not served");
            served += 1;
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                served,
                "after {what}: a refused connection reached the backend"
            );
        }
        if let Some((what, bytes)) = refused.get(i) {
            assert_eq!(exchange(to, bytes).await, b"", "{what} was served");
        }
    }
    // One last allowed connection: every refused one before it would have been accepted first.
    assert_eq!(exchange(to, &allowed[0].1).await, b"A");
    assert_eq!(accepted.load(Ordering::SeqCst), allowed.len() + 1);
    assert_eq!(ep.refused.load(Ordering::Relaxed), 1 + refused.len() as u64);
    assert_eq!(ep.proxy_protocol_errors.load(Ordering::Relaxed), 0);
    let t = gw.handle.tables();
    assert_eq!(
        t.routers["r"].counters.failures.get(Failure::IpAllowList),
        1 + refused.len() as u64
    );
}

// ---------------------------------------------------------------------------------------------
// 3. No healthy server: closed and counted, served again once healthy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn failing_health_check_closes_and_counts_then_recovers() {
    // The server listens (a dial would succeed) but answers its health check `NOPE` until it is
    // told to be healthy; client connections are answered `SERVED:` + what they sent.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let data_conns = Arc::new(AtomicUsize::new(0));
    {
        let healthy = healthy.clone();
        let data_conns = data_conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let healthy = healthy.clone();
                let data_conns = data_conns.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 4];
                    let Ok(Ok(_)) = tokio::time::timeout(WAIT, s.read_exact(&mut first)).await
                    else {
                        return;
                    };
                    if &first == b"PING" {
                        let answer: &[u8] = if healthy.load(Ordering::SeqCst) {
                            b"PONG"
                        } else {
                            b"NOPE"
                        };
                        let _ = s.write_all(answer).await;
                    } else {
                        data_conns.fetch_add(1, Ordering::SeqCst);
                        let _ = s.write_all(b"SERVED:").await;
                        let _ = s.write_all(&first).await;
                    }
                    let _ = s.shutdown().await;
                    let mut sink = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
                });
            }
        });
    }
    let toml = format!(
        r#"
[tcp.routers.r]
rule = "HostSNI(`*`)"
service = "s"

[tcp.services.s.loadBalancer]
servers = [{{ address = "{addr}" }}]

[tcp.services.s.loadBalancer.healthCheck]
send = "PING"
expect = "PONG"
interval = "100ms"
timeout = "500ms"
"#
    );
    let gw = start(static_cfg(), dynamic(&toml)).await;
    let server = || {
        gw.handle
            .tables()
            .server("s", &addr.to_string())
            .cloned()
            .expect("server in the tables")
    };
    wait_until("the health check to mark the server down", || {
        !server().is_healthy()
    })
    .await;

    // Down: the connection is closed without data and never reaches the server.
    assert_eq!(exchange(gw.addr(), b"DATA").await, b"");
    let t = gw.handle.tables();
    let svc = &t.services["s"].service.counters;
    let route = &t.routers["r"].counters;
    assert_eq!(svc.no_server.load(Ordering::Relaxed), 1);
    assert_eq!(route.failures.get(Failure::NoHealthyServer), 1);
    assert_eq!(route.failures.get(Failure::DialFailed), 0);
    let ep = gw.handle.entry_point("tcp").unwrap();
    assert_eq!(ep.failures.get(Failure::NoHealthyServer), 1);
    // Nothing was dialled: no dial error, no connection to the server.
    for reason in tagway::dial::DialErrorReason::ALL {
        assert_eq!(server().counters.dial_errors(reason), 0, "{reason:?}");
    }
    assert_eq!(server().counters.connections.load(Ordering::Relaxed), 0);
    assert_eq!(data_conns.load(Ordering::SeqCst), 0);
    drop(t);

    // Healthy again: the next check puts it back, and connections are served.
    healthy.store(true, Ordering::SeqCst);
    wait_until("the health check to mark the server up", || {
        server().is_healthy()
    })
    .await;
    assert_eq!(exchange(gw.addr(), b"DATA").await, b"SERVED:DATA");
    assert_eq!(data_conns.load(Ordering::SeqCst), 1);
    let t = gw.handle.tables();
    assert_eq!(
        t.services["s"]
            .service
            .counters
            .no_server
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        t.routers["r"]
            .counters
            .failures
            .get(Failure::NoHealthyServer),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Negative terminationDelay: no deadline after the server's half-close
// ---------------------------------------------------------------------------------------------

/// What the half-closing server observed on one connection.
#[derive(Debug)]
struct AfterFin {
    /// Bytes received after its own FIN.
    late: Vec<u8>,
    /// Time from its FIN to the end of its side (EOF, reset or the bound).
    lasted: Duration,
}

/// A server that reads `hello`, answers `answer` then half-closes (FIN), and keeps reading what
/// the client sends after that until EOF (bounded): reports it on `tx`.
async fn half_closing_server(tx: mpsc::UnboundedSender<AfterFin>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut hello = [0u8; 5];
                if tokio::time::timeout(WAIT, s.read_exact(&mut hello))
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = s.write_all(b"answer").await;
                let _ = s.shutdown().await; // shutdown(Write): FIN, still reading
                let fin = Instant::now();
                let mut late = Vec::new();
                let mut b = [0u8; 256];
                let deadline = tokio::time::Instant::now() + WAIT;
                loop {
                    match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
                        Ok(Ok(n)) if n > 0 => late.extend_from_slice(&b[..n]),
                        _ => break,
                    }
                }
                let _ = tx.send(AfterFin {
                    late,
                    lasted: fin.elapsed(),
                });
            });
        }
    });
    addr
}

/// The client side: sends `hello`, reads the answer up to the (half-close) EOF, stays open for
/// `hold`, then sends `late` and closes.
async fn client_after_server_fin(to: SocketAddr, hold: Duration) -> Vec<u8> {
    let mut c = TcpStream::connect(to).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let answer = read_to_end(&mut c).await;
    tokio::time::sleep(hold).await;
    // With a deadline the gateway may have closed the connection: errors are expected then.
    let _ = c.write_all(b"late").await;
    let _ = c.shutdown().await;
    answer
}

#[tokio::test]
async fn negative_termination_delay_lets_the_client_outlive_the_server_fin() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = half_closing_server(tx).await;
    let st = static_with(&["nodeadline", "legacy", "default"]);
    let toml = format!(
        r#"
[tcp.routers.nodeadline]
entryPoints = ["nodeadline"]
rule = "HostSNI(`*`)"
service = "nodeadline"

[tcp.routers.legacy]
entryPoints = ["legacy"]
rule = "HostSNI(`*`)"
service = "legacy"

[tcp.routers.default]
entryPoints = ["default"]
rule = "HostSNI(`*`)"
service = "default"

[tcp.serversTransports.nodeadline]
terminationDelay = "-1s"

[tcp.services.nodeadline.loadBalancer]
serversTransport = "nodeadline"
servers = [{{ address = "{server}" }}]

# Traefik v2's per-service key, in milliseconds: negative = no deadline too.
[tcp.services.legacy.loadBalancer]
terminationDelay = -1
servers = [{{ address = "{server}" }}]

# The default transport: terminationDelay 100ms.
[tcp.services.default.loadBalancer]
servers = [{{ address = "{server}" }}]
"#
    );
    let gw = start(st, dynamic(&toml)).await;
    let hold = Duration::from_millis(600);
    for ep in ["nodeadline", "legacy"] {
        let answer = client_after_server_fin(gw.addrs[ep], hold).await;
        assert_eq!(answer, b"answer", "{ep}");
        let seen = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("server report")
            .unwrap();
        // The bytes sent 600 ms after the server's FIN reached it, then the client's FIN.
        assert_eq!(seen.late, b"late", "{ep}: {seen:?}");
        assert!(seen.lasted >= hold, "{ep}: {seen:?}");
    }
    // The default 100 ms: the gateway cuts the connection long before the client's late bytes.
    let answer = client_after_server_fin(gw.addrs["default"], hold).await;
    assert_eq!(answer, b"answer");
    let seen = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("server report")
        .unwrap();
    assert!(seen.late.is_empty(), "default: {seen:?}");
    assert!(
        seen.lasted >= Duration::from_millis(80) && seen.lasted < hold,
        "default: {seen:?}"
    );
}

/// A `weighted` service of two load balancers (and one of weight 0): sequential connections
/// follow the smooth weighted round-robin exactly, through real sockets.
#[tokio::test]
async fn nested_weighted_services_split_three_to_one() {
    let a = named_backend("A").await;
    let b = named_backend("B").await;
    let z = named_backend("Z").await;
    let d = dynamic(&format!(
        r#"
[tcp.routers.r]
rule = "HostSNI(`*`)"
service = "w"

[[tcp.services.w.weighted.services]]
name = "a"
weight = 3
[[tcp.services.w.weighted.services]]
name = "b"
weight = 1
[[tcp.services.w.weighted.services]]
name = "z"
weight = 0

[[tcp.services.a.loadBalancer.servers]]
address = "{a}"
[[tcp.services.b.loadBalancer.servers]]
address = "{b}"
[[tcp.services.z.loadBalancer.servers]]
address = "{z}"
"#
    ));
    let gw = start(static_cfg(), d).await;
    let mut seen = String::new();
    for _ in 0..16 {
        seen.push_str(&read_all(gw.addr()).await);
    }
    assert_eq!(seen.matches('A').count(), 12, "{seen}");
    assert_eq!(seen.matches('B').count(), 4, "{seen}");
    // Smooth: never more than three A in a row.
    assert!(!seen.contains("AAAA"), "{seen}");
}
