//! Scale: 10,000 services × 3 instances registered in one go and served, and a thousand
//! concurrent blocking queries over TCP where one change wakes only its own watchers.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tagway_integration::catalog::{CheckStatus, DevCatalog, FleetSpec};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_services_three_instances_and_a_thousand_watchers() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let catalog = DevCatalog::builder()
        .without_consul_service()
        .start("127.0.0.1:0")
        .await?;
    let spec = FleetSpec::new(10_000, 3).tags(|name, _| {
        vec![format!(
            "traefik.tcp.routers.{name}.rule=HostSNI(`{name}.test`)"
        )]
    });
    catalog.register_fleet(&spec)?;
    let base = catalog.http_url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(2000)
        .build()?;

    let services: Value = http
        .get(format!("{base}/v1/catalog/services"))
        .send()
        .await?
        .json()
        .await?;
    let map = services.as_object().context("object")?;
    ensure!(map.len() == 10_000, "{} services", map.len());
    ensure!(
        map["svc-04242"][0] == "traefik.tcp.routers.svc-04242.rule=HostSNI(`svc-04242.test`)",
        "{}",
        map["svc-04242"]
    );
    let entries: Value = http
        .get(format!("{base}/v1/health/service/svc-04242?passing"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(entries.as_array().map(Vec::len) == Some(3), "{entries}");

    // A thousand watchers, one per service, each blocking on its own index.
    const WATCHERS: usize = 1000;
    let mut tasks = Vec::with_capacity(WATCHERS);
    for i in 0..WATCHERS {
        let name = spec.service_name(i);
        let index = catalog.service_index(&name);
        let http = http.clone();
        let url = format!("{base}/v1/health/service/{name}?index={index}&wait=5m");
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).send().await?;
            let index = r
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .context("index")?;
            let body: Value = r.json().await?;
            Ok::<_, anyhow::Error>((index, body))
        }));
    }
    // Let every watcher reach the server and block.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while catalog.faults().requests_to("/v1/health/service/") < (WATCHERS + 1) as u64 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "watchers did not all arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(tasks.iter().all(|t| !t.is_finished()), "all block");

    // One check of svc-00007 fails: only that watcher returns.
    let changed = catalog.set_check_status_on_node(
        &spec.node_name(1),
        "service:svc-00007-1",
        CheckStatus::Critical,
        "down",
    )?;
    let seventh = tasks.remove(7);
    let (index, body) = timeout(Duration::from_secs(30), seventh).await???;
    ensure!(index == changed, "{index} == {changed}");
    ensure!(body[1]["Checks"][0]["Status"] == "critical", "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        tasks.iter().all(|t| !t.is_finished()),
        "no other watcher woke"
    );
    ensure!(
        catalog.faults().requests_to("/v1/health/service/") == (WATCHERS + 1) as u64,
        "no polling: one request per watcher"
    );

    // Shutdown releases every watcher.
    timeout(Duration::from_secs(30), catalog.shutdown()).await?;
    for t in tasks {
        let _ = timeout(Duration::from_secs(30), t).await?;
    }
    Ok(())
}
