//! Active TCP health checks (`loadBalancer.healthCheck`): connect through the service's transport,
//! optionally send bytes and expect a response prefix, within a timeout. Every server is checked
//! by its own task, so checks run concurrently; a verdict reaches the balancer at once (an atomic
//! flag on the server).

use std::sync::Arc;
use std::time::Duration;

use tagway_config::HealthCheck;
use tokio::task::JoinHandle;

use crate::balancer::ServerState;
use crate::dial::Transport;

/// A compiled health check.
#[derive(Clone, Debug)]
pub struct CheckSpec {
    /// Port to check instead of the server's.
    pub port: Option<u16>,
    /// Bytes sent after connecting.
    pub send: Option<Vec<u8>>,
    /// Bytes the response must start with.
    pub expect: Option<Vec<u8>>,
    /// Interval while healthy.
    pub interval: Duration,
    /// Interval while unhealthy.
    pub unhealthy_interval: Duration,
    /// Timeout of one check.
    pub timeout: Duration,
}

impl CheckSpec {
    /// Compiles `healthCheck` (non-positive durations fall back to the defaults).
    pub fn from_config(h: &HealthCheck) -> Self {
        let pos = |d: tagway_config::Duration, def: tagway_config::Duration| {
            d.to_std()
                .filter(|d| !d.is_zero())
                .or_else(|| def.to_std())
                .unwrap_or(Duration::from_secs(30))
        };
        let interval = pos(h.interval(), HealthCheck::DEFAULT_INTERVAL);
        CheckSpec {
            port: h.port,
            send: h.send.as_ref().map(|s| s.as_bytes().to_vec()),
            expect: h.expect.as_ref().map(|s| s.as_bytes().to_vec()),
            interval,
            unhealthy_interval: h
                .unhealthy_interval()
                .to_std()
                .filter(|d| !d.is_zero())
                .unwrap_or(interval),
            timeout: pos(h.timeout(), HealthCheck::DEFAULT_TIMEOUT),
        }
    }
}

/// Runs one check of `server` through `transport` (its PROXY and TLS settings apply); `Err` says
/// why it failed.
pub async fn check_once(
    spec: &CheckSpec,
    transport: &Transport,
    server: &ServerState,
) -> Result<(), tagway_transport::CheckError> {
    transport
        .check_with_tls(
            &server.address,
            server.tls,
            spec.port,
            spec.send.as_deref(),
            spec.expect.as_deref(),
            spec.timeout,
        )
        .await
}

/// The running checks of one runtime table; dropping it stops them.
#[derive(Debug, Default)]
pub struct HealthChecks {
    tasks: Vec<JoinHandle<()>>,
}

impl HealthChecks {
    /// Starts a check loop for every server of a service. Needs a tokio runtime.
    pub fn spawn(
        &mut self,
        service: &str,
        spec: CheckSpec,
        transport: Transport,
        servers: &[Arc<ServerState>],
    ) {
        for server in servers {
            let spec = spec.clone();
            let transport = transport.clone();
            let server = server.clone();
            let service = service.to_owned();
            self.tasks.push(tokio::spawn(async move {
                loop {
                    let res = check_once(&spec, &transport, &server).await;
                    let up = res.is_ok();
                    if up != server.is_healthy() {
                        match &res {
                            Ok(()) => tracing::info!(
                                service = %service, server = %server.address,
                                "health check passes: server back in rotation"
                            ),
                            Err(e) => tracing::warn!(
                                service = %service, server = %server.address, error = %e,
                                "health check fails: server out of rotation"
                            ),
                        }
                    }
                    server.set_healthy(up);
                    let wait = if up {
                        spec.interval
                    } else {
                        spec.unhealthy_interval
                    };
                    tokio::time::sleep(wait).await;
                }
            }));
        }
    }

    /// Number of running check loops.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no check runs.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tagway_config::ServersTransport;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn transport() -> Transport {
        Transport::new("t", &ServersTransport::default(), None).unwrap()
    }

    fn spec(send: Option<&str>, expect: Option<&str>) -> CheckSpec {
        CheckSpec {
            port: None,
            send: send.map(|s| s.as_bytes().to_vec()),
            expect: expect.map(|s| s.as_bytes().to_vec()),
            interval: Duration::from_millis(50),
            unhealthy_interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
        }
    }

    #[tokio::test]
    async fn send_expect() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 4];
                    if s.read_exact(&mut b).await.is_ok() && &b == b"PING" {
                        let _ = s.write_all(b"PONG+").await;
                    } else {
                        let _ = s.write_all(b"NOPE").await;
                    }
                });
            }
        });
        let server = ServerState::new(addr.to_string(), 1, false);
        let t = transport();
        check_once(&spec(Some("PING"), Some("PONG")), &t, &server)
            .await
            .unwrap();
        let e = check_once(&spec(Some("PANG"), Some("PONG")), &t, &server)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected"), "{e}");
    }

    /// A server that counts the checks it gets and answers each with `answer` (None: never).
    async fn counting_server(answer: Option<&'static [u8]>) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let checks = Arc::new(AtomicUsize::new(0));
        let n = checks.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut b = [0u8; 4];
                    let _ = s.read_exact(&mut b).await;
                    match answer {
                        Some(a) => drop(s.write_all(a).await),
                        None => std::future::pending().await,
                    }
                });
            }
        });
        (addr, checks)
    }

    /// Healthy servers are checked every `interval`, unhealthy ones every `unhealthyInterval`,
    /// and each server has its own loop: a check that hangs until its timeout does not delay
    /// the others.
    #[tokio::test]
    async fn intervals_and_concurrent_checks() {
        let (good, good_n) = counting_server(Some(b"PONG")).await;
        let (bad, bad_n) = counting_server(Some(b"NOPE")).await;
        let (hung, hung_n) = counting_server(None).await;
        let servers: Vec<_> = [&good, &bad, &hung]
            .into_iter()
            .map(|a| Arc::new(ServerState::new(a.clone(), 1, false)))
            .collect();
        let mut hc = HealthChecks::default();
        let spec = CheckSpec {
            interval: Duration::from_millis(300),
            unhealthy_interval: Duration::from_millis(20),
            timeout: Duration::from_secs(2),
            ..spec(Some("PING"), Some("PONG"))
        };
        let start = std::time::Instant::now();
        hc.spawn("svc", spec, transport(), &servers);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let elapsed = start.elapsed().as_millis() as usize;
        let (g, b, h) = (
            good_n.load(Ordering::SeqCst),
            bad_n.load(Ordering::SeqCst),
            hung_n.load(Ordering::SeqCst),
        );
        assert!(servers[0].is_healthy() && !servers[1].is_healthy());
        // One check per timeout at most for the hung server (2 s), one per interval (300 ms)
        // for the healthy one, many more for the unhealthy one (20 ms), all at the same time.
        assert!(
            h <= 1 + elapsed / 2000,
            "hung server checked {h} times in {elapsed} ms"
        );
        assert!(
            (2..=2 + elapsed / 300).contains(&g),
            "healthy server checked {g} times in {elapsed} ms"
        );
        assert!(
            b >= 10 && b >= 3 * g,
            "unhealthy server checked {b} times, healthy {g}, in {elapsed} ms"
        );
        drop(hc);
    }

    #[tokio::test]
    async fn loop_flips_status() {
        // A port with nothing listening: the check fails and the server leaves the rotation.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let server = Arc::new(ServerState::new(addr.to_string(), 1, false));
        let mut hc = HealthChecks::default();
        hc.spawn(
            "svc",
            spec(None, None),
            transport(),
            std::slice::from_ref(&server),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.is_healthy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!server.is_healthy());
        // It comes back when something listens again.
        let l = TcpListener::bind(addr).await.unwrap();
        let acc = tokio::spawn(async move {
            loop {
                let _ = l.accept().await;
            }
        });
        while !server.is_healthy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(server.is_healthy());
        assert_eq!(hc.len(), 1);
        drop(hc);
        acc.abort();
    }
}
