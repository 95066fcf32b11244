//! `tagway run` with `providers.consulCatalog` against the dev catalog, through the real binary:
//! a service registered with tags becomes reachable, `/ready` turns 200 once Consul's first sync is
//! applied, a failing check and a deregistration take the route away, and file routes are served
//! while Consul is down at start.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tagway_integration::catalog::{CheckDefinition, CheckStatus, DevCatalog, ServiceRegistration};
use tagway_integration::e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Retries `exchange` until it answers `want` (an empty `want` = no data), within 10 s.
async fn until_answer(to: SocketAddr, want: &str, gw: &Gateway) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = exchange(to, None, b"").await.unwrap_or_default();
        if got == want.as_bytes() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "expected {want:?}, got {:?}; log:\n{}",
                String::from_utf8_lossy(&got),
                gw.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pg_tags() -> Vec<String> {
    vec![
        "traefik.enable=true".into(),
        "traefik.tcp.routers.pg.rule=HostSNI(`*`)".into(),
        "traefik.tcp.routers.pg.entryPoints=tcp".into(),
    ]
}

#[tokio::test]
async fn registered_service_is_routed_and_follows_health_and_deregistration() -> Result<()> {
    let catalog = DevCatalog::builder().start("127.0.0.1:0").await?;
    let backend = named_backend("pg-1").await?;
    let admin = free_port()?;
    let st = format!(
        "[admin]\naddress = \"127.0.0.1:{admin}\"\n\
         [providers.consulCatalog]\nexposedByDefault = false\n\
         [providers.consulCatalog.endpoint]\naddress = \"{}\"\nendpointWaitTime = \"2s\"\n",
        catalog.addr()
    );
    let gw = Gateway::start(&["tcp"], &st, "")?;
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse()?;

    // Ready once the (empty) catalog's first sync is applied.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_status(admin, "/ready").await.unwrap_or(0) != 200 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "never ready; log:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    catalog.register(
        ServiceRegistration::new("pg")
            .id("pg-1")
            .address("127.0.0.1")
            .port(backend.port())
            .tags(pg_tags())
            .check(CheckDefinition::ttl(Duration::from_secs(600)).id("pg-1-ttl")),
    )?;
    catalog.set_check_status("pg-1-ttl", CheckStatus::Passing, "")?;
    until_answer(gw.addr("tcp"), "pg-1", &gw).await?;

    // The provider's watches show on /metrics, labelled by fixed endpoint names only.
    let metrics = http_get(admin, "/metrics").await?;
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tagway_consul_watch_requests_total{"))
        .collect();
    assert!(
        requests
            .iter()
            .any(|l| l.contains("endpoint=\"catalog_services\"")),
        "{metrics}"
    );
    assert!(
        requests
            .iter()
            .any(|l| l.contains("endpoint=\"health_service\"")),
        "{metrics}"
    );
    assert!(requests.iter().all(|l| !l.contains("pg")), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "tagway_consul_services_watched 1"),
        "{metrics}"
    );

    // A critical check removes the only instance; recovery re-adds it.
    catalog.set_check_status("pg-1-ttl", CheckStatus::Critical, "down")?;
    until_answer(gw.addr("tcp"), "", &gw).await?;
    catalog.set_check_status("pg-1-ttl", CheckStatus::Passing, "")?;
    until_answer(gw.addr("tcp"), "pg-1", &gw).await?;

    // Deregistration removes the route.
    catalog.deregister("pg-1")?;
    until_answer(gw.addr("tcp"), "", &gw).await?;
    Ok(())
}

#[tokio::test]
async fn consul_down_at_start_serves_file_routes_then_consul_routes() -> Result<()> {
    // A port with nothing listening yet: Consul is down when the gateway starts.
    let consul_port = free_port()?;
    let file_backend = named_backend("from-file").await?;
    let consul_backend = named_backend("from-consul").await?;
    let st = format!(
        "[providers.consulCatalog]\n\
         [providers.consulCatalog.endpoint]\naddress = \"127.0.0.1:{consul_port}\"\nendpointWaitTime = \"2s\"\n"
    );
    let dynamic = format!(
        "{}{}",
        router_toml("f", "HostSNI(`*`)", "f", "entryPoints = [\"file\"]"),
        service_toml("f", &[(file_backend, 1)])
    );
    let gw = Gateway::start(&["file", "tcp"], &st, &dynamic)?;
    until_answer(gw.addr("file"), "from-file", &gw).await?;

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", consul_port)).await?;
    let catalog = DevCatalog::builder().start_on(listener).await?;
    catalog.register(
        ServiceRegistration::new("pg")
            .address("127.0.0.1")
            .port(consul_backend.port())
            .tags(pg_tags()),
    )?;
    until_answer(gw.addr("tcp"), "from-consul", &gw).await?;
    until_answer(gw.addr("file"), "from-file", &gw).await?;
    Ok(())
}

/// `/ready` answering 200 means Consul's routes are live: the first connection made right after
/// the first 200 reaches the backend (no retry). A few gateways in a row, `/ready` polled without
/// pause, so a gap between "ready" and "routes applied" would be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_means_the_consul_routes_are_live() -> Result<()> {
    const ROUNDS: usize = 3;
    let catalog = DevCatalog::builder().start("127.0.0.1:0").await?;
    let backend = named_backend("pg-ready").await?;
    catalog.register(
        ServiceRegistration::new("pg")
            .id("pg-1")
            .address("127.0.0.1")
            .port(backend.port())
            .tags(pg_tags())
            .check(CheckDefinition::static_status(CheckStatus::Passing).id("pg-1-check")),
    )?;
    for round in 0..ROUNDS {
        let admin = free_port()?;
        let st = format!(
            "[admin]\naddress = \"127.0.0.1:{admin}\"\n\
             [providers.consulCatalog]\nexposedByDefault = false\n\
             [providers.consulCatalog.endpoint]\naddress = \"{}\"\nendpointWaitTime = \"2s\"\n",
            catalog.addr()
        );
        let gw = Gateway::start(&["tcp"], &st, "")?;
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_status(admin, "/ready").await.unwrap_or(0) != 200 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "round {round}: never ready; log:\n{}",
                gw.log_text()
            );
            tokio::task::yield_now().await;
        }
        let got = exchange(gw.addr("tcp"), None, b"").await?;
        anyhow::ensure!(
            got == b"pg-ready",
            "round {round}: /ready said 200 but the Consul route answered {:?}; log:\n{}",
            String::from_utf8_lossy(&got),
            gw.log_text()
        );
    }
    Ok(())
}
