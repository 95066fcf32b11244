//! The access log: one line per TCP connection, written to `accessLog.filePath` off the data
//! path, in JSON and in text.

mod obs_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use obs_support::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tagway::observability::Observability;
use tagway_config::{AccessLog, Dynamic, LogFormat, RouterTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TLS backend for `name` that echoes one line.
async fn tls_echo(name: &str) -> (SocketAddr, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(c.cert.pem().as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(c.signing_key.serialize_pem().as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = acceptor.accept(s).await {
                    let mut buf = [0u8; 5];
                    if t.read_exact(&mut buf).await.is_ok() {
                        let _ = t.write_all(&buf).await;
                    }
                    let _ = t.shutdown().await;
                }
            });
        }
    });
    (addr, c.cert.pem())
}

async fn tls_exchange(gw: SocketAddr, sni: &str, ca_pem: &str) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(gw).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut t = connector.connect(name, tcp).await.unwrap();
    t.write_all(b"hello").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, b"hello");
}

async fn lines(path: &Path, n: usize) -> Vec<String> {
    for _ in 0..500 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let l: Vec<String> = text.lines().map(str::to_owned).collect();
        if l.len() >= n {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} access-log lines in {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.json");
    let mut st = static_with(&["tcp", "tls", "empty"]);
    st.access_log = Some(AccessLog {
        file_path: Some(path.clone()),
        format: LogFormat::Json,
    });
    let obs = Observability::new(&st).unwrap();
    let echo = echo_backend().await;
    let (tls_backend, ca) = tls_echo("db.example").await;
    let mut d = Dynamic::default();
    d.tcp.services.insert("echo@file".into(), lb(&[(echo, 1)]));
    d.tcp
        .services
        .insert("db@file".into(), lb(&[(tls_backend, 1)]));
    d.tcp.routers.insert(
        "plain@file".into(),
        router("tcp", "HostSNI(`*`)", "echo@file"),
    );
    let mut db = router("tls", "HostSNI(`db.example`)", "db@file");
    db.tls = Some(RouterTls {
        passthrough: true,
        ..Default::default()
    });
    d.tcp.routers.insert("db@file".into(), db);
    let gw = start_with(st, obs.clone(), None, Some(d)).await;
    wait_until(|| obs.is_ready()).await;

    // 1: plain, 300 bytes each way.
    let payload = vec![7u8; 300];
    let mut c = TcpStream::connect(gw.addr("tcp")).await.unwrap();
    let client = c.local_addr().unwrap();
    c.write_all(&payload).await.unwrap();
    c.shutdown().await.unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, payload);
    let first = lines(&path, 1).await;
    // 2: no router on the entry point.
    refused(gw.addr("empty")).await;
    let second = lines(&path, 2).await;
    // 3: TLS passthrough, routed by SNI.
    tls_exchange(gw.addr("tls"), "db.example", &ca).await;
    let all = lines(&path, 3).await;
    assert_eq!(&all[..1], &first[..]);
    assert_eq!(&all[..2], &second[..]);

    let v: Vec<Value> = all
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let plain = &v[0];
    assert_eq!(plain["entry_point"], "tcp");
    assert_eq!(plain["client"], client.to_string());
    assert_eq!(plain["router"], "plain@file");
    assert_eq!(plain["service"], "echo@file");
    assert_eq!(plain["server"], echo.to_string());
    assert_eq!(plain["sni"], Value::Null);
    assert_eq!(plain["bytes_to_server"], 300);
    assert_eq!(plain["bytes_to_client"], 300);
    assert_eq!(plain["close"], "closed");
    assert!(plain["duration"].as_f64().unwrap() >= 0.0);
    assert!(plain["time"].as_str().unwrap().ends_with('Z'));

    let nowhere = &v[1];
    assert_eq!(nowhere["entry_point"], "empty");
    assert_eq!(nowhere["router"], Value::Null);
    assert_eq!(nowhere["server"], Value::Null);
    assert_eq!(nowhere["bytes_to_server"], 0);
    assert_eq!(nowhere["close"], "no_route");

    let tls = &v[2];
    assert_eq!(tls["entry_point"], "tls");
    assert_eq!(tls["router"], "db@file");
    assert_eq!(tls["service"], "db@file");
    assert_eq!(tls["server"], tls_backend.to_string());
    assert_eq!(tls["sni"], "db.example");
    assert!(tls["bytes_to_server"].as_u64().unwrap() > 5);
    assert!(tls["bytes_to_client"].as_u64().unwrap() > 5);
    assert_eq!(tls["close"], "closed");
    assert_eq!(obs.access_log_lines(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut st = static_with(&["tcp"]);
    st.access_log = Some(AccessLog {
        file_path: Some(path.clone()),
        format: LogFormat::Text,
    });
    let obs = Observability::new(&st).unwrap();
    let dead = closed_port().await;
    let mut d = Dynamic::default();
    d.tcp.services.insert("gone@file".into(), lb(&[(dead, 1)]));
    d.tcp
        .routers
        .insert("r@file".into(), router("tcp", "HostSNI(`*`)", "gone@file"));
    let gw = start_with(st, obs.clone(), None, Some(d)).await;
    wait_until(|| obs.is_ready()).await;
    let mut c = TcpStream::connect(gw.addr("tcp")).await.unwrap();
    let client = c.local_addr().unwrap();
    let mut buf = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)));
    let l = lines(&path, 1).await;
    let line = &l[0];
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(time.starts_with("time=20") && time.ends_with('Z'), "{line}");
    let (fields, duration_close) = rest.split_once(" duration=").unwrap();
    assert_eq!(
        fields,
        format!(
            "entry_point=tcp client={client} router=r@file service=gone@file server=- sni=- \
             bytes_to_server=0 bytes_to_client=0"
        )
    );
    assert!(duration_close.ends_with(" close=dial_failed"), "{line}");
}

#[test]
fn unwritable_access_log_is_named() {
    let mut st = static_with(&["tcp"]);
    st.access_log = Some(AccessLog {
        file_path: Some("/nonexistent-dir/access.log".into()),
        format: LogFormat::Text,
    });
    let e = Observability::new(&st).unwrap_err().to_string();
    assert!(
        e.contains("accessLog.filePath /nonexistent-dir/access.log"),
        "{e}"
    );
}
