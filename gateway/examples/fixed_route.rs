//! Profiling aid (not shipped): runs the data plane with one entry point and one route, without
//! the configuration files. `cargo run --release -p tagway --example fixed_route -- LISTEN UPSTREAM`.
//! The real command is `tagway run --config FILE`.

use std::sync::Arc;

use tagway_config::{Dynamic, EntryPoint, LoadBalancer, Router, Server, Service, StaticConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: fixed_route LISTEN UPSTREAM");
    };
    let mut st = StaticConfig::default();
    st.entry_points.insert(
        "bench".into(),
        EntryPoint {
            address: listen,
            ..Default::default()
        },
    );
    st.shutdown.grace_period = tagway_config::Duration::from_secs(1);
    let mut d = Dynamic::default();
    d.tcp.services.insert(
        "up".into(),
        Service {
            load_balancer: Some(LoadBalancer {
                servers: vec![Server {
                    address: upstream,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            weighted: None,
        },
    );
    d.tcp.routers.insert(
        "all".into(),
        Router {
            rule: "HostSNI(`*`)".into(),
            service: "up".into(),
            ..Default::default()
        },
    );
    let rt = tagway::server::build_runtime()?;
    rt.block_on(async move {
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(d));
        let gw = tagway::server::Gateway::new(st);
        gw.run(rx, tagway::server::shutdown_signal()).await
    })?;
    Ok(())
}
