//! consul-bench: how fast a change in the catalog becomes a live route through the gateway, how
//! long the first sync of a large catalog takes, and what the gateway costs at that size.
//!
//! The dev catalog runs in this process with N services × M instances; the gateway runs as its
//! own process (the `tagway` binary given with `--tagway`, or this program's `gateway`
//! subcommand, which assembles the Consul provider, the merge/validate step and the data plane as
//! `tagway run` does), so its memory and CPU are measured alone from `/proc`.
//!
//! Every service `i` has one router, ``ClientIP(`127.1.x.y`)`` with a client address of its own,
//! so a probe connecting from that address reaches exactly that service. Its instances point at
//! a few shared backends that answer their instance number, so a probe tells which instance
//! served it. Measured events (time from the catalog write to the first probe showing the
//! change, probing every millisecond or so):
//!
//! * **health**: an instance that was critical becomes passing → it receives connections;
//! * **new instance**: an instance is registered (passing at once) → it receives connections;
//! * **tag change**: the service's rule moves to another client address → that address is routed.
//!
//! ```text
//! cargo build --release -p tagway -p tagway-integration --bin tagway --bin consul-bench
//! target/release/consul-bench --services 1000,10000 --tagway target/release/tagway
//! ```
//!
//! It prints the load average next to each size (numbers from a busy machine are not release
//! numbers) and, at 10,000 services, whether each target of the issue is met.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tagway_integration::catalog::{
    CheckDefinition, CheckStatus, DevCatalog, NodeRegistration, ServiceRegistration,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

#[derive(Parser)]
#[command(about = "Consul catalog change → live route latency, initial sync, gateway RSS/CPU")]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Catalog sizes to measure (services).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    services: Vec<usize>,
    /// Instances per service.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Events of each kind per size.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// The gateway binary; without it, this program's `gateway` subcommand is the gateway.
    #[arg(long)]
    tagway: Option<PathBuf>,
    /// Seconds of idle measured after the sync (CPU).
    #[arg(long, default_value_t = 10)]
    idle: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a gateway as `tagway run --config FILE` does, with the Consul catalog provider.
    Gateway {
        /// Static configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Cmd::Gateway { config }) = &args.cmd {
        return gateway(config);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

/// `tagway run` with the Consul provider plugged into the provider combination.
fn gateway(config: &Path) -> Result<()> {
    let st = tagway_config::load_static(config)?;
    let rt = tagway::server::build_runtime()?;
    rt.block_on(async move {
        let st = Arc::new(st);
        let consul = st
            .providers
            .consul_catalog
            .clone()
            .context("providers.consulCatalog is required")?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let provider = tagway_provider_consul::ConsulProvider::new(&consul)?.start(async move {
            let _ = stop_rx.await;
        })?;
        let merged = tagway::cli::run::combine(
            st.clone(),
            vec![("consulcatalog".into(), provider.config())],
            None,
        );
        if std::env::var_os("CONSUL_BENCH_TRACE").is_some() {
            // Timestamps of each stage, to see where the time goes.
            for (stage, mut rx) in [("provider", provider.config()), ("merged", merged.clone())] {
                tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        eprintln!("trace {stage} {}", now_us());
                    }
                });
            }
        }
        let gateway = tagway::server::Gateway::new((*st).clone());
        gateway
            .run(merged, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        let _ = stop_tx.send(());
        Ok(())
    })
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// The client address routed to service `i`.
fn client_ip(i: usize, moved: bool) -> Ipv4Addr {
    let base = if moved { 3 } else { 1 };
    Ipv4Addr::new(127, base + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

fn service(i: usize) -> String {
    format!("svc-{i:05}")
}

fn tags(i: usize, moved: bool) -> Vec<String> {
    let name = service(i);
    vec![format!(
        "traefik.tcp.routers.{name}.rule=ClientIP(`{}`)",
        client_ip(i, moved)
    )]
}

/// Backends answering `<instance>\n`, one per instance slot.
async fn backends(n: usize) -> Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for slot in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        out.push(l.local_addr()?);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(format!("{slot}\n").as_bytes()).await;
                    let mut b = [0u8; 16];
                    let _ = s.read(&mut b).await;
                });
            }
        });
    }
    Ok(out)
}

fn registration(i: usize, slot: usize, addr: SocketAddr, moved: bool) -> ServiceRegistration {
    ServiceRegistration::new(service(i))
        .id(format!("{}-{slot}", service(i)))
        .address(addr.ip().to_string())
        .port(addr.port())
        .tags(tags(i, moved))
        .check(
            CheckDefinition::static_status(CheckStatus::Passing)
                .id(format!("check-{}-{slot}", service(i))),
        )
}

fn node(slot: usize) -> String {
    format!("bench-node-{slot}")
}

/// Which instance a connection from `ip` reaches (`None`: refused, closed or no answer).
async fn probe(gateway: SocketAddr, ip: Ipv4Addr) -> Option<String> {
    let attempt = async {
        let s = TcpSocket::new_v4().ok()?;
        s.bind(SocketAddr::new(ip.into(), 0)).ok()?;
        let mut c = s.connect(gateway).await.ok()?;
        let mut buf = [0u8; 16];
        let n = c.read(&mut buf).await.ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
}

/// Probes until `ok`, at most `limit`; the time from `t0`.
async fn until(
    gateway: SocketAddr,
    ip: Ipv4Addr,
    t0: Instant,
    limit: Duration,
    ok: impl Fn(Option<&str>) -> bool,
) -> Result<Duration> {
    loop {
        if ok(probe(gateway, ip).await.as_deref()) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            bail!("no change seen within {limit:?} (client {ip})");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

struct Proc {
    child: std::process::Child,
    pid: u32,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn status(&self, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU seconds.
    fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let tick = 100.0;
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (get(11) + get(12)) / tick
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn bench(args: Args) -> Result<()> {
    let exe = std::env::current_exe()?;
    println!(
        "consul-bench: {} instances per service, {} events of each kind, gateway: {}",
        args.instances,
        args.events,
        args.tagway
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("{} gateway", exe.display()))
    );
    for &n in &args.services {
        run_size(&args, &exe, n).await?;
    }
    Ok(())
}

async fn run_size(args: &Args, exe: &Path, n: usize) -> Result<()> {
    let m = args.instances;
    println!(
        "\n{n} services: load average (1 5 15 min) at the start: {}",
        load_average()
    );
    let catalog = DevCatalog::builder()
        .without_consul_service()
        .start("127.0.0.1:0")
        .await?;
    let slots = backends(m + 1).await?;
    let nodes = (0..m).map(|slot| {
        let mut node = NodeRegistration::new(node(slot), "127.0.0.1");
        for i in 0..n {
            node = node.service(registration(i, slot, slots[slot], false));
        }
        node
    });
    catalog.register_many(nodes)?;
    // Three disjoint sets of services, spread over the catalog, one per kind of event.
    let e = args.events;
    if n < 3 * e {
        bail!("{n} services are too few for 3 × {e} events");
    }
    let stride = n / (3 * e);
    let pick = |k: usize, kind: usize| (3 * k + kind) * stride;
    let picks: Vec<usize> = (0..e).map(|k| pick(k, 0)).collect();
    // Instance 0 of the services used by the health events starts critical.
    for &i in &picks {
        catalog.set_check_status_on_node(
            &node(0),
            &format!("check-{}-0", service(i)),
            CheckStatus::Critical,
            "",
        )?;
    }

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let gw_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let gateway: SocketAddr = ([127, 0, 0, 1], gw_port).into();
    let config = dir.join("tagway.yaml");
    std::fs::write(
        &config,
        format!(
            "entryPoints:\n  tcp:\n    address: \"127.0.0.1:{gw_port}\"\nproviders:\n  consulCatalog:\n    endpoint:\n      address: \"{}\"\nlog:\n  level: warn\n",
            catalog.http_url()
        ),
    )?;
    let mut cmd = match &args.tagway {
        Some(bin) => {
            let mut c = std::process::Command::new(bin);
            c.arg("run").arg("--config").arg(&config);
            c
        }
        None => {
            let mut c = std::process::Command::new(exe);
            c.arg("gateway").arg("--config").arg(&config);
            c
        }
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
    let t0 = Instant::now();
    let child = cmd.spawn().context("starting the gateway")?;
    let pid = child.id();
    let proc = Proc { child, pid };

    // Initial sync: every sampled service is routed.
    let sample: Vec<usize> = (0..50).map(|k| k * (n - 1) / 49).collect();
    for &i in &sample {
        until(
            gateway,
            client_ip(i, false),
            t0,
            Duration::from_secs(120),
            |r| r.is_some(),
        )
        .await
        .context("initial sync")?;
    }
    let sync = t0.elapsed();
    let cpu_sync = proc.cpu();
    let rss_sync = proc.status("VmRSS:");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = proc.cpu();
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    let idle_cpu = proc.cpu() - cpu0;
    let rss = proc.status("VmRSS:");
    let hwm = proc.status("VmHWM:");

    let limit = Duration::from_secs(60);
    // The highest RSS read after each change went live.
    let mut rss_changes = 0;
    // Health: instance 0 of the picked services becomes passing.
    let mut health = Vec::new();
    for &i in &picks {
        let t = Instant::now();
        if std::env::var_os("CONSUL_BENCH_TRACE").is_some() {
            eprintln!("trace write {}", now_us());
        }
        catalog.set_check_status_on_node(
            &node(0),
            &format!("check-{}-0", service(i)),
            CheckStatus::Passing,
            "",
        )?;
        health.push(until(gateway, client_ip(i, false), t, limit, |r| r == Some("0")).await?);
        rss_changes = rss_changes.max(proc.status("VmRSS:"));
    }
    // New instance: the spare backend joins the service.
    let mut added = Vec::new();
    for k in 0..e {
        let i = pick(k, 1);
        let t = Instant::now();
        if std::env::var_os("CONSUL_BENCH_TRACE").is_some() {
            eprintln!("trace write-instance {}", now_us());
        }
        catalog.register_node(
            NodeRegistration::new(format!("bench-extra-{k}"), "127.0.0.1")
                .service(registration(i, m, slots[m], false)),
        )?;
        let want = m.to_string();
        added.push(
            until(gateway, client_ip(i, false), t, limit, |r| {
                r == Some(want.as_str())
            })
            .await?,
        );
        rss_changes = rss_changes.max(proc.status("VmRSS:"));
    }
    // Tag change: the rule of every instance moves to another client address.
    let mut retagged = Vec::new();
    for k in 0..e {
        let i = pick(k, 2);
        let t = Instant::now();
        if std::env::var_os("CONSUL_BENCH_TRACE").is_some() {
            eprintln!("trace write-tags {}", now_us());
        }
        let nodes = (0..m).map(|slot| {
            NodeRegistration::new(node(slot), "127.0.0.1").service(registration(
                i,
                slot,
                slots[slot],
                true,
            ))
        });
        catalog.register_many(nodes)?;
        retagged.push(until(gateway, client_ip(i, true), t, limit, |r| r.is_some()).await?);
        rss_changes = rss_changes.max(proc.status("VmRSS:"));
    }

    println!("\n## {n} services × {m} instances");
    println!(
        "initial sync: {} (gateway CPU {:.2} s, RSS {} MiB)",
        ms(sync),
        cpu_sync,
        rss_sync / 1024
    );
    println!(
        "after sync: RSS {} MiB (peak {} MiB); idle CPU {:.3} s over {} s",
        rss / 1024,
        hwm / 1024,
        idle_cpu,
        args.idle
    );
    println!("| change → live route | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (what, v) in [
        ("health flip (critical → passing)", &mut health),
        ("new instance (passing)", &mut added),
        ("tag change (rule)", &mut retagged),
    ] {
        let max = *v.iter().max().unwrap_or(&Duration::ZERO);
        println!(
            "| {what} | {} | {} | {} |",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(max)
        );
    }
    let mut all: Vec<Duration> = health
        .iter()
        .chain(&added)
        .chain(&retagged)
        .copied()
        .collect();
    println!(
        "| all | {} | {} | |",
        ms(pct(&mut all, 0.5)),
        ms(pct(&mut all, 0.99))
    );
    let final_rss = proc.status("VmRSS:");
    println!(
        "RSS at the end: {} MiB; highest after a change: {} MiB",
        final_rss / 1024,
        rss_changes / 1024
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "RSS 2 s after the last change: {} MiB",
        proc.status("VmRSS:") / 1024
    );
    println!("load average (1 5 15 min) at the end: {}", load_average());
    if n >= 10_000 {
        println!("\n| issue target at {n} services | measured | target | |");
        println!("|---|---|---|---|");
        let p99 = pct(&mut all, 0.99);
        verdict(
            "change → live route p99",
            ms(p99),
            "≤ 100 ms",
            p99 <= Duration::from_millis(100),
        );
        verdict(
            "initial sync",
            ms(sync),
            "≤ 5 s",
            sync <= Duration::from_secs(5),
        );
        let peak = rss.max(final_rss).max(rss_changes) / 1024;
        verdict(
            "gateway RSS (max seen)",
            format!("{peak} MiB"),
            "≤ 100 MiB",
            peak <= 100,
        );
        verdict(
            "idle CPU",
            format!("{:.1} %", 100.0 * idle_cpu / args.idle as f64),
            "no burn",
            idle_cpu / (args.idle as f64) < 0.01,
        );
    }
    drop(proc);
    catalog.shutdown().await;
    drop(tmp);
    Ok(())
}

/// The machine's load average (1, 5, 15 minutes), as `/proc/loadavg` gives it: the numbers are
/// only comparable between runs on an equally quiet machine.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// One line per issue target: the measured value and whether it is met.
fn verdict(what: &str, measured: String, target: &str, met: bool) {
    let v = if met { "met" } else { "MISSED" };
    println!("| {what} | {measured} | {target} | {v} |");
}
