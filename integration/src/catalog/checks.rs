//! Check runners: TCP and HTTP checks run on their interval, TTL checks expire.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::model::{CheckKind, CheckStatus};
use super::state::Store;

/// Consul's default check timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of an HTTP check's body kept as output (Consul keeps 4 KiB).
const OUTPUT_MAX: usize = 4096;

fn go_dial_error(address: &str, e: &std::io::Error) -> String {
    let reason = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect: connection refused".to_owned(),
        std::io::ErrorKind::TimedOut => "i/o timeout".to_owned(),
        _ => e.to_string(),
    };
    format!("dial tcp {address}: {reason}")
}

async fn tcp_probe(address: &str, limit: Duration) -> (CheckStatus, String) {
    match timeout(limit, TcpStream::connect(address)).await {
        Ok(Ok(_stream)) => (
            CheckStatus::Passing,
            format!("TCP connect {address}: Success"),
        ),
        Ok(Err(e)) => (CheckStatus::Critical, go_dial_error(address, &e)),
        Err(_) => (
            CheckStatus::Critical,
            format!("dial tcp {address}: i/o timeout"),
        ),
    }
}

/// Splits `http://host:port/path` into (host:port, host, path).
fn split_http_url(url: &str) -> Option<(String, String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let addr = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Some((addr, authority.to_owned(), path.to_owned()))
}

async fn http_probe(url: &str, limit: Duration) -> (CheckStatus, String) {
    let Some((addr, host, path)) = split_http_url(url) else {
        return (
            CheckStatus::Critical,
            format!("the tagway dev catalog runs only plain http:// checks, not {url:?}"),
        );
    };
    let attempt = async {
        let mut stream = TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("Get {url:?}: {}", go_dial_error(&addr, &e)))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Consul Health Check\r\nAccept: text/plain, text/*, */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("Get {url:?}: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("Get {url:?}: {e}"))?;
            if n == 0 || buf.len() > 64 * 1024 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<Vec<u8>, String>(buf)
    };
    let raw = match timeout(limit, attempt).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(msg)) => return (CheckStatus::Critical, msg),
        Err(_) => {
            return (
                CheckStatus::Critical,
                format!(
                    "Get {url:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
                ),
            );
        }
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let _version = parts.next();
    let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let reason = parts.next().unwrap_or("");
    let body: String = body.chars().take(OUTPUT_MAX).collect();
    let output = format!("HTTP GET {url}: {code} {reason} Output: {body}");
    let status = match code {
        200..=299 => CheckStatus::Passing,
        429 => CheckStatus::Warning,
        _ => CheckStatus::Critical,
    };
    (status, output)
}

/// Runs a TCP or HTTP check until it is removed (or the catalog stops).
pub(crate) async fn run_check(store: Weak<Store>, node: String, check_id: String, kind: CheckKind) {
    let (interval, limit) = match &kind {
        CheckKind::Tcp {
            interval, timeout, ..
        }
        | CheckKind::Http {
            interval, timeout, ..
        } => (*interval, timeout.unwrap_or(DEFAULT_TIMEOUT)),
        _ => return,
    };
    loop {
        let (status, output) = match &kind {
            CheckKind::Tcp { address, .. } => tcp_probe(address, limit).await,
            CheckKind::Http { url, .. } => http_probe(url, limit).await,
            _ => return,
        };
        let Some(store) = store.upgrade() else {
            return;
        };
        let result =
            store.write(|st, txn| st.set_check_status(txn, &node, &check_id, status, output));
        drop(store);
        if result.is_err() {
            return;
        }
        sleep(interval).await;
    }
}

/// Marks TTL checks critical when their deadline passes.
pub(crate) async fn ttl_reaper(store: Arc<Store>) {
    loop {
        let next = store.with_state(|s| s.next_ttl_deadline());
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = sleep_until(deadline) => {}
                    () = store.ttl_changed() => {}
                }
            }
            None => store.ttl_changed().await,
        }
        let now = Instant::now();
        store.write(|st, txn| st.expire_ttls(txn, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_split() {
        assert_eq!(
            split_http_url("http://127.0.0.1:8080/health"),
            Some((
                "127.0.0.1:8080".to_owned(),
                "127.0.0.1:8080".to_owned(),
                "/health".to_owned()
            ))
        );
        assert_eq!(
            split_http_url("http://example.test"),
            Some((
                "example.test:80".to_owned(),
                "example.test".to_owned(),
                "/".to_owned()
            ))
        );
        assert_eq!(split_http_url("https://x/"), None);
    }

    #[tokio::test]
    async fn tcp_probe_reports_success_and_refusal() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let (status, output) = tcp_probe(&addr, Duration::from_secs(5)).await;
        assert_eq!(status, CheckStatus::Passing);
        assert_eq!(output, format!("TCP connect {addr}: Success"));
        drop(l);
        let (status, output) = tcp_probe(&addr, Duration::from_secs(5)).await;
        assert_eq!(status, CheckStatus::Critical);
        assert!(output.contains("connection refused"), "{output}");
    }

    #[tokio::test]
    async fn http_probe_maps_status_codes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for answer in ["200 OK", "429 Too Many Requests", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {answer}\r\nContent-Length: 2\r\n\r\nok");
                s.write_all(resp.as_bytes()).await.expect("write");
            }
        });
        let url = format!("http://{addr}/health");
        let (s1, o1) = http_probe(&url, Duration::from_secs(5)).await;
        assert_eq!(s1, CheckStatus::Passing);
        assert_eq!(o1, format!("HTTP GET {url}: 200 OK Output: ok"));
        assert_eq!(
            http_probe(&url, Duration::from_secs(5)).await.0,
            CheckStatus::Warning
        );
        assert_eq!(
            http_probe(&url, Duration::from_secs(5)).await.0,
            CheckStatus::Critical
        );
        server.await.expect("server");
    }
}
