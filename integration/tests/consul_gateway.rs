//! End to end through the data plane: the dev catalog, the Consul provider, the file provider,
//! merge/validate and the gateway's entry point, with real TCP backends on 127.0.0.1.

mod consul_common;

use std::time::Duration;

use consul_common::*;
use tagway_integration::catalog::{
    CheckDefinition, CheckStatus, FaultRule, ServiceRegistration, TokenPolicy,
};

const ANY: &str = "traefik.tcp.routers.r.rule=HostSNI(`*`)";

fn reg(name: &str, id: &str, b: &Backend, tags: &[&str]) -> ServiceRegistration {
    ServiceRegistration::new(name)
        .id(id)
        .address("127.0.0.1")
        .port(b.port())
        .tags(tags.iter().map(|t| t.to_string()))
        .check(CheckDefinition::static_status(CheckStatus::Passing).id(format!("check-{id}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_health_maintenance_and_deregistration_drive_the_route() {
    let catalog = catalog().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    catalog.register(reg("web", "web-a", &a, &[ANY])).unwrap();
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, options(), None).await;
    until_hit(h.gateway, "a", |n| n == Some("a")).await;

    h.catalog.register(reg("web", "web-b", &b, &[ANY])).unwrap();
    until_hit(h.gateway, "b joins", |n| n == Some("b")).await;

    h.catalog
        .set_check_status("check-web-a", CheckStatus::Critical, "down")
        .unwrap();
    until_hit(h.gateway, "a out", |n| n == Some("b")).await;
    assert_eq!(
        spread(h.gateway, 6).await.get("a"),
        None,
        "no connection to a critical instance"
    );

    h.catalog
        .set_check_status("check-web-a", CheckStatus::Passing, "up")
        .unwrap();
    until_hit(h.gateway, "a back", |n| n == Some("a")).await;

    h.catalog
        .set_service_maintenance("web-b", true, Some("deploy"))
        .unwrap();
    until_hit(h.gateway, "b in maintenance", |n| n == Some("a")).await;
    assert_eq!(spread(h.gateway, 6).await.get("b"), None);
    h.catalog
        .set_service_maintenance("web-b", false, None)
        .unwrap();
    until_hit(h.gateway, "b out of maintenance", |n| n == Some("b")).await;

    let node = h.catalog.node_name().to_owned();
    h.catalog.set_node_maintenance(&node, true, None).unwrap();
    until_hit(h.gateway, "node in maintenance: nothing", |n| n.is_none()).await;
    h.catalog.set_node_maintenance(&node, false, None).unwrap();
    until_hit(h.gateway, "node back", |n| n.is_some()).await;

    h.catalog.deregister("web-a").unwrap();
    h.catalog.deregister("web-b").unwrap();
    until_hit(h.gateway, "deregistered: no route", |n| n.is_none()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_from_tags_and_from_consul_split_the_connections() {
    let catalog = catalog().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let d = Backend::start("d").await;
    // Tags: 3 to 1.
    catalog
        .register(reg(
            "tagged",
            "t-a",
            &a,
            &[
                "traefik.tcp.routers.t.rule=HostSNI(`*`)",
                "traefik.tcp.routers.t.entrypoints=tcp",
                "traefik.tcp.services.tagged.loadbalancer.server.weight=3",
            ],
        ))
        .unwrap();
    catalog
        .register(reg(
            "tagged",
            "t-b",
            &b,
            &[
                "traefik.tcp.routers.t.rule=HostSNI(`*`)",
                "traefik.tcp.routers.t.entrypoints=tcp",
                "traefik.tcp.services.tagged.loadbalancer.server.weight=1",
            ],
        ))
        .unwrap();
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, options(), None).await;
    until_hit(h.gateway, "tagged", |n| n.is_some()).await;
    let s = spread(h.gateway, 40).await;
    assert_eq!((s.get("a"), s.get("b")), (Some(&30), Some(&10)), "{s:?}");

    // Consul's Weights.Passing (2 to 1) once the tagged service is gone.
    h.catalog.deregister("t-a").unwrap();
    h.catalog.deregister("t-b").unwrap();
    h.catalog
        .register(reg("weighted", "w-c", &c, &[ANY]).weights(2, 1))
        .unwrap();
    h.catalog
        .register(reg("weighted", "w-d", &d, &[ANY]).weights(1, 1))
        .unwrap();
    until_hit(h.gateway, "weighted", |n| n == Some("c") || n == Some("d")).await;
    until_hit(h.gateway, "both", |n| n == Some("d")).await;
    let s = spread(h.gateway, 30).await;
    assert_eq!((s.get("c"), s.get("d")), (Some(&20), Some(&10)), "{s:?}");

    // Weights.Warning while the instance warns.
    h.catalog
        .register(reg("weighted", "w-c", &c, &[ANY]).weights(2, 0))
        .unwrap();
    h.catalog
        .set_check_status("check-w-c", CheckStatus::Warning, "slow")
        .unwrap();
    until_hit(h.gateway, "c at weight 0", |n| n == Some("d")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = spread(h.gateway, 10).await;
    assert_eq!(s.get("c"), None, "weight 0 while warning: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_transport_tag_uses_the_file_providers_transport() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dynamic.yaml");
    std::fs::write(
        &file,
        "tcp:\n  serversTransports:\n    mytransport:\n      proxyProtocol:\n        version: 1\n",
    )
    .unwrap();
    let catalog = catalog().await;
    let backend = Backend::start_proxy_v1("pp").await;
    catalog
        .register(reg(
            "Service01",
            "s1",
            &backend,
            &[
                "traefik.tcp.routers.Router01.rule=HostSNI(`*`)",
                "traefik.tcp.routers.Router01.service=Service01",
                "traefik.tcp.services.Service01.loadBalancer.serversTransport=mytransport",
            ],
        ))
        .unwrap();
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, options(), Some(&file)).await;
    until_hit(h.gateway, "routed", |n| n == Some("pp")).await;
    let line = backend.first_lines.lock().unwrap()[0].clone();
    assert!(
        line.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_declared_in_tags_is_used() {
    let catalog = catalog().await;
    let backend = Backend::start_proxy_v1("tagged-pp").await;
    catalog
        .register(reg(
            "db",
            "db-1",
            &backend,
            &[
                ANY,
                "traefik.tcp.serversTransports.pp.proxyProtocol.version=1",
                "traefik.tcp.services.db.loadBalancer.serversTransport=pp",
            ],
        ))
        .unwrap();
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, options(), None).await;
    until_hit(h.gateway, "routed", |n| n == Some("tagged-pp")).await;
    assert!(backend.first_lines.lock().unwrap()[0].starts_with("PROXY TCP4 "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_at_start_and_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dynamic.yaml");
    let filed = Backend::start("from-file").await;
    std::fs::write(
        &file,
        format!(
            "tcp:\n  routers:\n    f:\n      rule: \"ClientIP(`127.0.0.2`)\"\n      service: f\n  services:\n    f:\n      loadBalancer:\n        servers:\n          - address: \"{}\"\n",
            filed.addr
        ),
    )
    .unwrap();
    let catalog = catalog().await;
    let a = Backend::start("a").await;
    catalog.register(reg("web", "web-a", &a, &[ANY])).unwrap();
    // Consul answers nothing but errors.
    catalog.faults().add(FaultRule::server_error());
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, options(), Some(&file)).await;
    // The file route works while Consul is down (a client at 127.0.0.2 matches it).
    let t0 = std::time::Instant::now();
    loop {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(2), s.connect(h.gateway)).await
        {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 10];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await
                && &buf[..n] == b"from-file\n"
            {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "file route never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hit(h.gateway).await, None, "no Consul route yet");
    assert!(!h.provider.status().borrow().synced);

    // Consul comes up: its routes appear without a restart.
    h.catalog.faults().clear();
    until_hit(h.gateway, "consul route", |n| n == Some("a")).await;

    // Down mid-run: connections cut, errors answered. The last configuration stays.
    h.catalog
        .faults()
        .add(FaultRule::drop_connection().path_prefix("/v1/"));
    let mut status = h.provider.status();
    tokio::time::timeout(Duration::from_secs(15), status.wait_for(|s| !s.reachable))
        .await
        .expect("outage noticed")
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            hit(h.gateway).await.as_deref(),
            Some("a"),
            "kept while Consul is down"
        );
    }
    // A change made during the outage is picked up at recovery.
    let b = Backend::start("b").await;
    h.catalog.register(reg("web", "web-b", &b, &[ANY])).unwrap();
    h.catalog.deregister("web-a").unwrap();
    h.catalog.faults().clear();
    until_hit(h.gateway, "recovered", |n| n == Some("b")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_going_backwards_is_recovered_from() {
    let catalog = catalog().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    catalog.register(reg("web", "web-a", &a, &[ANY])).unwrap();
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, options(), None).await;
    until_hit(h.gateway, "a", |n| n == Some("a")).await;
    // A snapshot restore: every index drops to 2.
    h.catalog.faults().rewind_index(2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.catalog.register(reg("web", "web-b", &b, &[ANY])).unwrap();
    h.catalog.deregister("web-a").unwrap();
    until_hit(h.gateway, "change after the restore", |n| n == Some("b")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_tags_on_one_service_leave_the_others_working() {
    let catalog = catalog().await;
    let good = Backend::start("good").await;
    let bad1 = Backend::start("bad1").await;
    let bad2 = Backend::start("bad2").await;
    catalog
        .register(reg(
            "good",
            "g",
            &good,
            &["traefik.tcp.routers.good.rule=ClientIP(`127.0.0.1`)"],
        ))
        .unwrap();
    // Two instances disagreeing about their router: that router is skipped.
    catalog
        .register(reg(
            "bad",
            "b1",
            &bad1,
            &[
                "traefik.tcp.routers.bad.rule=HostSNI(`*`)",
                "traefik.tcp.routers.bad.priority=1000",
            ],
        ))
        .unwrap();
    catalog
        .register(reg(
            "bad",
            "b2",
            &bad2,
            &[
                "traefik.tcp.routers.bad.rule=HostSNI(`*`)",
                "traefik.tcp.routers.bad.priority=notanumber",
            ],
        ))
        .unwrap();
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, options(), None).await;
    until_hit(h.gateway, "good", |n| n == Some("good")).await;
    let mut errors = h.provider.errors();
    let errors = tokio::time::timeout(Duration::from_secs(10), errors.wait_for(|e| e.len() >= 2))
        .await
        .unwrap()
        .unwrap()
        .clone();
    let tag = errors
        .iter()
        .find(|e| e.tag.is_some())
        .expect("the bad tag is reported");
    assert_eq!(
        tag.tag.as_deref(),
        Some("traefik.tcp.routers.bad.priority=notanumber")
    );
    assert_eq!(tag.service, "bad");
    let conflict = errors
        .iter()
        .find(|e| e.resource.as_deref() == Some("tcp.routers.bad"))
        .expect("the disagreement is reported");
    assert!(conflict.message.contains("differently"), "{conflict}");
    for _ in 0..5 {
        assert_eq!(hit(h.gateway).await.as_deref(), Some("good"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_token_read_from_a_file_that_changes() {
    let catalog = tagway_integration::catalog::DevCatalog::builder()
        .without_consul_service()
        .management_token("root")
        .acl_token("first", TokenPolicy::read_only())
        .start("127.0.0.1:0")
        .await
        .unwrap();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    catalog.register(reg("web", "web-a", &a, &[ANY])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("consul-token");
    std::fs::write(&token_file, "first\n").unwrap();
    let mut cfg = consul_cfg(&catalog);
    cfg.endpoint.token_file = Some(token_file.clone());
    let h = start(catalog, cfg, options(), None).await;
    until_hit(h.gateway, "a with the first token", |n| n == Some("a")).await;

    // The token is rotated: the old one stops working, the file gets the new one.
    h.catalog.set_acl_token("second", TokenPolicy::read_only());
    h.catalog.remove_acl_token("first");
    let tmp = dir.path().join("consul-token.new");
    std::fs::write(&tmp, "second\n").unwrap();
    std::fs::rename(&tmp, &token_file).unwrap();
    h.catalog.register(reg("web", "web-b", &b, &[ANY])).unwrap();
    h.catalog.deregister("web-a").unwrap();
    until_hit(h.gateway, "b seen with the second token", |n| {
        n == Some("b")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_mode_follows_health_new_instances_and_tags_through_the_gateway() {
    let catalog = catalog().await;
    let backends: Vec<Backend> = {
        let mut v = Vec::new();
        for i in 0..12 {
            v.push(Backend::start(&format!("s{i}")).await);
        }
        v
    };
    for (i, b) in backends.iter().enumerate() {
        catalog
            .register(reg(
                &format!("svc{i}"),
                &format!("svc{i}-1"),
                b,
                &[&format!(
                    "traefik.tcp.routers.r{i}.rule=ClientIP(`127.0.0.{}`)",
                    i + 10
                )],
            ))
            .unwrap();
    }
    // One more service routing every other client, watched like the others.
    let x = Backend::start("x").await;
    catalog
        .register(reg("catchall", "c-1", &x, &[ANY]))
        .unwrap();
    let opts = tagway_provider_consul::ProviderOptions {
        max_long_polls: 4,
        sweep_rate: 1,
        ..options()
    };
    let cfg = consul_cfg(&catalog);
    let h = start(catalog, cfg, opts, None).await;
    until_hit(h.gateway, "catch-all", |n| n == Some("x")).await;
    assert_eq!(
        h.provider.status().borrow().mode,
        tagway_provider_consul::Mode::Feed
    );
    // Health flip (critical feed).
    h.catalog
        .set_check_status("check-c-1", CheckStatus::Critical, "")
        .unwrap();
    until_hit(h.gateway, "catch-all down", |n| n.is_none()).await;
    // A new instance, passing at once, same tags (census of checks; a sweep at 1/s would take
    // 13 s, longer than the wait below allows… almost: the point is it is much faster).
    let y = Backend::start("y").await;
    let took = {
        let t0 = std::time::Instant::now();
        h.catalog
            .register(reg("catchall", "c-2", &y, &[ANY]))
            .unwrap();
        until_hit(h.gateway, "new instance", |n| n == Some("y")).await;
        t0.elapsed()
    };
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Tag change (catalog answer).
    h.catalog
        .register(reg(
            "catchall",
            "c-2",
            &y,
            &["traefik.tcp.routers.r.rule=ClientIP(`127.0.0.99`)"],
        ))
        .unwrap();
    until_hit(
        h.gateway,
        "rule changed: no longer matches 127.0.0.1",
        |n| n.is_none(),
    )
    .await;
}
