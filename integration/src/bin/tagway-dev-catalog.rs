//! `tagway-dev-catalog`: a Consul-HTTP-API-compatible server for local trials and benchmarks.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tagway_integration::catalog::{DevCatalog, FleetSpec};

/// A Consul-HTTP-API-compatible dev catalog (catalog, health, agent, Connect CA, ACLs).
#[derive(Debug, Parser)]
#[command(name = "tagway-dev-catalog", version)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        default_value = "127.0.0.1:8500",
        env = "TAGWAY_DEV_CATALOG_ADDR"
    )]
    addr: String,
    /// Datacenter name.
    #[arg(long, default_value = "dc1")]
    datacenter: String,
    /// Management token: turns ACLs on (requests need X-Consul-Token or Authorization: Bearer).
    #[arg(long, env = "TAGWAY_DEV_CATALOG_TOKEN")]
    token: Option<String>,
    /// Node name of the agent (where /v1/agent/service/register puts services).
    #[arg(long, default_value = "dev-catalog")]
    node_name: String,
    /// Lifetime of Connect leaf certificates (e.g. 72h, 10m).
    #[arg(long, default_value = "72h", value_parser = humantime::parse_duration)]
    leaf_ttl: Duration,
    /// Do not list the `consul` service a real server always has.
    #[arg(long)]
    without_consul_service: bool,
    /// Register this many synthetic services (svc-00000…) at start, for benchmarks.
    #[arg(long, default_value_t = 0)]
    fleet_services: usize,
    /// Instances per synthetic service (one node per instance).
    #[arg(long, default_value_t = 3)]
    fleet_instances: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut builder = DevCatalog::builder()
        .datacenter(&args.datacenter)
        .node_name(&args.node_name)
        .leaf_ttl(args.leaf_ttl);
    if let Some(t) = &args.token {
        builder = builder.management_token(t);
    }
    if args.without_consul_service {
        builder = builder.without_consul_service();
    }
    let catalog = builder
        .start(&args.addr)
        .await
        .with_context(|| format!("starting the dev catalog on {}", args.addr))?;
    if args.fleet_services > 0 {
        let spec = FleetSpec::new(args.fleet_services, args.fleet_instances);
        let index = catalog
            .register_fleet(&spec)
            .context("registering the synthetic fleet")?;
        tracing::info!(
            services = args.fleet_services,
            instances = spec.instance_count(),
            index,
            "synthetic fleet registered"
        );
    }
    println!(
        "tagway dev catalog: {} (datacenter {}, trust domain {}{})",
        catalog.http_url(),
        catalog.datacenter(),
        catalog.trust_domain(),
        if args.token.is_some() {
            ", ACLs on"
        } else {
            ""
        }
    );
    println!("  export CONSUL_HTTP_ADDR={}", catalog.addr());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("shutting down");
    catalog.shutdown().await;
    Ok(())
}
