//! The dev catalog over real TCP on 127.0.0.1: blocking queries, dropped connections, hangs,
//! shutdown, and the `tagway-dev-catalog` binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tagway_integration::catalog::{
    CheckStatus, DevCatalog, DevCatalogHandle, FaultRule, ServiceRegistration,
};
use tokio::time::{Instant, timeout};

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

fn index_of(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("X-Consul-Index")
}

async fn start() -> DevCatalogHandle {
    DevCatalog::builder()
        .start("127.0.0.1:0")
        .await
        .expect("dev catalog starts")
}

#[tokio::test]
async fn blocking_health_query_over_tcp_returns_when_the_check_passes() -> Result<()> {
    let catalog = start().await;
    let http = client();
    let base = catalog.http_url();
    let reg = http
        .put(format!("{base}/v1/agent/service/register"))
        .json(&json!({"Name": "web", "ID": "web-1", "Port": 8080, "Address": "127.0.0.1",
                      "Tags": ["traefik.enable=true"], "Check": {"CheckID": "web-ttl", "TTL": "30s"}}))
        .send()
        .await?;
    ensure!(reg.status() == 200, "register: {}", reg.status());
    let first = http
        .get(format!("{base}/v1/health/service/web?passing"))
        .send()
        .await?;
    let index = index_of(&first);
    ensure!(
        first.json::<Value>().await? == json!([]),
        "critical at first"
    );
    let waiter = {
        let http = http.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let r = http
                .get(format!(
                    "{base}/v1/health/service/web?passing&index={index}&wait=30s"
                ))
                .send()
                .await?;
            let i = index_of(&r);
            Ok::<_, anyhow::Error>((i, r.json::<Value>().await?))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(!waiter.is_finished(), "the query blocks");
    let pass = http
        .put(format!("{base}/v1/agent/check/pass/web-ttl"))
        .send()
        .await?;
    ensure!(pass.status() == 200);
    let (new_index, body) = timeout(Duration::from_secs(10), waiter).await???;
    ensure!(new_index > index, "{new_index} > {index}");
    ensure!(body[0]["Service"]["ID"] == "web-1", "{body}");
    catalog.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn injected_connection_drops_and_errors_reach_the_client() -> Result<()> {
    let catalog = start().await;
    let http = client();
    let base = catalog.http_url();
    let url = format!("{base}/v1/catalog/services");

    catalog.faults().drop_next(1);
    let err = http
        .get(&url)
        .send()
        .await
        .expect_err("dropped before answering");
    ensure!(!err.is_status(), "{err}");

    catalog
        .faults()
        .add(FaultRule::drop_connection().mid_body().times(1));
    let resp = http.get(&url).send().await?;
    ensure!(resp.status() == 200, "headers arrive");
    ensure!(resp.bytes().await.is_err(), "the body is cut");

    // A blocking query cut while it waits, as when a server dies.
    let index = index_of(&http.get(&url).send().await?);
    catalog.faults().add(
        FaultRule::drop_connection()
            .after(Duration::from_millis(300))
            .path_prefix("/v1/catalog/services")
            .times(1),
    );
    let started = Instant::now();
    let err = http
        .get(format!("{url}?index={index}&wait=1m"))
        .send()
        .await
        .expect_err("cut mid-query");
    ensure!(started.elapsed() >= Duration::from_millis(300), "{err}");

    catalog.faults().fail_next(1);
    let resp = http.get(&url).send().await?;
    ensure!(resp.status() == 500);
    ensure!(resp.text().await? == "rpc error making call: No cluster leader");

    catalog.faults().hang_next(1, Duration::from_millis(400));
    let started = Instant::now();
    let resp = http.get(&url).send().await?;
    ensure!(resp.status() == 200 && started.elapsed() >= Duration::from_millis(400));

    // The service keeps working afterwards, on fresh connections.
    let resp = http.get(&url).send().await?;
    ensure!(resp.status() == 200);
    ensure!(catalog.faults().requests_to("/v1/catalog/services") == 7);
    catalog.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_blocking_queries_and_closes_the_port() -> Result<()> {
    let catalog = start().await;
    let http = client();
    let base = catalog.http_url();
    let index = index_of(
        &http
            .get(format!("{base}/v1/catalog/services"))
            .send()
            .await?,
    );
    let waiter = {
        let http = http.clone();
        let base = base.clone();
        tokio::spawn(async move {
            http.get(format!("{base}/v1/catalog/services?index={index}&wait=5m"))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = catalog.addr();
    timeout(Duration::from_secs(10), catalog.shutdown())
        .await
        .context("shutdown completes")?;
    let answer = timeout(Duration::from_secs(10), waiter).await??;
    if let Ok(resp) = answer {
        ensure!(resp.status() == 200, "a finished query answers normally");
        ensure!(index_of(&resp) == index);
    }
    ensure!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens any more"
    );
    Ok(())
}

#[tokio::test]
async fn rust_api_changes_are_visible_over_http() -> Result<()> {
    let catalog = start().await;
    let http = client();
    let base = catalog.http_url();
    catalog.register(ServiceRegistration::new("api").id("api-1").port(9000))?;
    let v: Value = http
        .get(format!("{base}/v1/catalog/service/api"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(v[0]["ServiceID"] == "api-1", "{v}");
    ensure!(
        v[0]["Address"] == "127.0.0.1",
        "node address is the listen address: {v}"
    );
    catalog.set_node_maintenance(catalog.node_name(), true, Some("reboot"))?;
    let v: Value = http
        .get(format!("{base}/v1/health/service/api"))
        .send()
        .await?
        .json()
        .await?;
    let maint = v[0]["Checks"]
        .as_array()
        .context("checks")?
        .iter()
        .find(|c| c["CheckID"] == "_node_maintenance")
        .context("node maintenance check")?
        .clone();
    ensure!(maint["Notes"] == "reboot" && maint["Status"] == "critical");
    ensure!(catalog.check_status("_node_maintenance") == Some(CheckStatus::Critical));
    catalog.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn tcp_checks_follow_the_backend() -> Result<()> {
    let catalog = start().await;
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = backend.local_addr()?;
    catalog.register(
        ServiceRegistration::new("tcp-svc").port(addr.port()).check(
            tagway_integration::catalog::CheckDefinition::tcp(
                addr.to_string(),
                Duration::from_secs(1),
            )
            .id("tcp-alive"),
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while catalog.check_status("tcp-alive") != Some(CheckStatus::Passing) {
        ensure!(Instant::now() < deadline, "TCP check never passed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(backend);
    let deadline = Instant::now() + Duration::from_secs(10);
    while catalog.check_status("tcp-alive") != Some(CheckStatus::Critical) {
        ensure!(Instant::now() < deadline, "TCP check never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    catalog.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_binary_serves_consul_api_until_killed() -> Result<()> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tagway-dev-catalog"))
        .args([
            "--addr",
            "127.0.0.1:0",
            "--datacenter",
            "dc7",
            "--token",
            "root",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning tagway-dev-catalog")?;
    let stdout = child.stdout.take().context("stdout")?;
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let result = async {
        let line = timeout(Duration::from_secs(30), first_line).await???;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .with_context(|| format!("no URL in {line:?}"))?
            .to_owned();
        let http = client();
        let denied = http
            .get(format!("{url}/v1/catalog/services"))
            .send()
            .await?;
        ensure!(denied.status() == 403, "ACLs are on: {}", denied.status());
        let ok = http
            .get(format!("{url}/v1/catalog/services"))
            .header("X-Consul-Token", "root")
            .send()
            .await?;
        ensure!(ok.status() == 200);
        let dcs: Value = http
            .get(format!("{url}/v1/catalog/datacenters"))
            .send()
            .await?
            .json()
            .await?;
        ensure!(dcs == json!(["dc7"]), "{dcs}");
        Ok(())
    }
    .await;
    child.kill().context("killing the child we started")?;
    let _ = child.wait();
    result
}
