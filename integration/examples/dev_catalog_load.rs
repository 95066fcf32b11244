//! Load generator for a running dev catalog: thousands of concurrent blocking queries, then a
//! series of health changes; prints the server's memory and CPU use read from `/proc/<pid>`.
//!
//! ```sh
//! target/release/tagway-dev-catalog --addr 127.0.0.1:18500 --fleet-services 10000 --without-consul-service &
//! cargo run -p tagway-integration --example dev_catalog_load -- 127.0.0.1:18500 $! 5000 100
//! ```
//!
//! Arguments: address, server pid, number of watchers (default 5000), number of changes
//! (default 100). The fleet's services are `svc-00000`…; watcher `w` watches `svc-<w>` (modulo
//! the number of services). Loopback only; every loop is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

struct Usage {
    rss_kib: u64,
    cpu_ticks: u64,
}

fn usage(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/pid/stat (11 and 12 after the name).
    let cpu_ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Usage { rss_kib, cpu_ticks })
}

fn index_of(r: &reqwest::Response) -> Result<u64> {
    r.headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .context("X-Consul-Index")
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .context("usage: dev_catalog_load ADDR PID [WATCHERS] [CHANGES]")?;
    let pid: u32 = args.get(2).context("server pid")?.parse()?;
    let watchers: usize = args.get(3).map_or(Ok(5000), |s| s.parse())?;
    let changes: usize = args.get(4).map_or(Ok(100), |s| s.parse())?;
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(watchers + 16)
        .timeout(Duration::from_secs(700))
        .build()?;

    let services: Value = http
        .get(format!("{base}/v1/catalog/services"))
        .send()
        .await?
        .json()
        .await?;
    let count = services.as_object().map_or(0, |m| m.len());
    ensure!(
        count > 0,
        "the catalog lists no service: start it with --fleet-services"
    );
    let names: Vec<String> = (0..count).map(|i| format!("svc-{i:05}")).collect();
    let u0 = usage(pid)?;
    println!(
        "services: {count}; server RSS {} MiB before watchers",
        u0.rss_kib / 1024
    );

    let wakeups = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(watchers);
    for w in 0..watchers {
        let name = names[w % names.len()].clone();
        let http = http.clone();
        let base = base.clone();
        let wakeups = wakeups.clone();
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let url = format!("{base}/v1/health/service/{name}");
            let mut index = index_of(&http.get(&url).send().await?)?;
            // Bounded: at most 1000 rounds per watcher.
            for _ in 0..1000 {
                requests.fetch_add(1, Ordering::Relaxed);
                let r = http
                    .get(format!("{url}?index={index}&wait=5m"))
                    .send()
                    .await?;
                let next = index_of(&r)?;
                let _ = r.bytes().await?;
                if next > index {
                    wakeups.fetch_add(1, Ordering::Relaxed);
                }
                index = next;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while requests.load(Ordering::Relaxed) < watchers as u64 {
        ensure!(Instant::now() < deadline, "watchers did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "{watchers} blocking queries open after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let u1 = usage(pid)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let u2 = usage(pid)?;
    let tick = 100.0; // USER_HZ on Linux
    println!(
        "idle with {watchers} watchers: server RSS {} MiB (+{} KiB per watcher), CPU {:.2}s over 10s",
        u2.rss_kib / 1024,
        (u2.rss_kib.saturating_sub(u0.rss_kib)) / watchers.max(1) as u64,
        (u2.cpu_ticks - u1.cpu_ticks) as f64 / tick
    );

    let before = wakeups.load(Ordering::Relaxed);
    let t = Instant::now();
    for c in 0..changes {
        let s = c % names.len();
        // Alternate per round so every change really changes the check.
        let status = if (c / names.len()).is_multiple_of(2) {
            "critical"
        } else {
            "passing"
        };
        let r = http
            .put(format!("{base}/v1/catalog/register"))
            .json(&json!({"Node": "svc-node-0", "SkipNodeUpdate": true,
                          "Check": {"CheckID": format!("service:{}-0", names[s]),
                                    "ServiceID": format!("{}-0", names[s]),
                                    "Name": format!("Service '{}' check", names[s]),
                                    "Status": status}}))
            .send()
            .await?;
        ensure!(r.status() == 200, "change {c}: {}", r.status());
    }
    let expected = (0..changes)
        .map(|c| {
            (0..watchers)
                .filter(|w| w % names.len() == c % names.len())
                .count() as u64
        })
        .sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(60);
    while wakeups.load(Ordering::Relaxed) - before < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let u3 = usage(pid)?;
    println!(
        "{changes} changes: {} wake-ups (expected {expected}) in {:.2}s, server CPU {:.2}s",
        wakeups.load(Ordering::Relaxed) - before,
        t.elapsed().as_secs_f64(),
        (u3.cpu_ticks - u2.cpu_ticks) as f64 / tick
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}
