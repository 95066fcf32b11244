//! End to end through the library API: known traffic (a fixed number of connections and bytes,
//! one routing failure of each reason, one dial failure), then `/metrics` is scraped from the
//! admin listener, parsed with a Prometheus text parser, and every counter is checked exactly.

mod obs_support;

use std::time::Duration;

use obs_support::*;
use tagway::conn::Options;
use tagway::observability::{Observability, consul};
use tagway_config::{Dynamic, HealthCheck, InFlightConn, IpAllowList, Middleware, RouterTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EPS: &[&str] = &[
    "tcp", "empty", "deny", "limited", "zero", "dial", "tls", "checked",
];
const PAYLOAD: usize = 1000;
const CONNECTIONS: usize = 4;

async fn config() -> (
    Dynamic,
    std::net::SocketAddr,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let e1 = echo_backend().await;
    let e2 = echo_backend().await;
    let dead = closed_port().await;
    let mut d = Dynamic::default();
    let s = &mut d.tcp.services;
    s.insert("app@file".into(), lb(&[(e1, 1), (e2, 1)]));
    s.insert("limited@file".into(), lb(&[(e1, 1)]));
    s.insert("zero@file".into(), lb(&[(e1, 0)]));
    s.insert("dial@file".into(), lb(&[(dead, 1)]));
    s.insert("tls@file".into(), lb(&[(e1, 1)]));
    let mut checked = lb(&[(dead, 1)]);
    checked.load_balancer.as_mut().unwrap().health_check = Some(HealthCheck {
        interval: Some(tagway_config::Duration::from_millis(50)),
        timeout: Some(tagway_config::Duration::from_millis(200)),
        ..Default::default()
    });
    s.insert("checked@file".into(), checked);
    d.tcp.middlewares.insert(
        "deny@file".into(),
        Middleware {
            ip_allow_list: Some(IpAllowList {
                source_range: vec!["10.0.0.0/8".into()],
            }),
            in_flight_conn: None,
        },
    );
    d.tcp.middlewares.insert(
        "limit@file".into(),
        Middleware {
            ip_allow_list: None,
            in_flight_conn: Some(InFlightConn { amount: 1 }),
        },
    );
    let r = &mut d.tcp.routers;
    r.insert("app@file".into(), router("tcp", "HostSNI(`*`)", "app@file"));
    let mut deny = router("deny", "HostSNI(`*`)", "app@file");
    deny.middlewares = vec!["deny@file".into()];
    r.insert("deny@file".into(), deny);
    let mut limited = router("limited", "HostSNI(`*`)", "limited@file");
    limited.middlewares = vec!["limit@file".into()];
    r.insert("limited@file".into(), limited);
    r.insert(
        "zero@file".into(),
        router("zero", "HostSNI(`*`)", "zero@file"),
    );
    r.insert(
        "dial@file".into(),
        router("dial", "HostSNI(`*`)", "dial@file"),
    );
    let mut tls = router("tls", "HostSNI(`a.example`)", "tls@file");
    tls.tls = Some(RouterTls {
        passthrough: true,
        ..Default::default()
    });
    r.insert("tls@file".into(), tls);
    r.insert(
        "checked@file".into(),
        router("checked", "HostSNI(`*`)", "checked@file"),
    );
    (d, e1, e2, dead)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_traffic_gives_exact_metrics() {
    let st = static_with(EPS);
    let obs = Observability::new(&st).unwrap();
    obs.expect_provider("file");
    let (d, e1, e2, dead) = config().await;
    let opts = Options {
        peek_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let gw = start_with(st, obs.clone(), Some(opts), Some(d)).await;
    wait_until(|| obs.is_ready()).await;
    assert_eq!(get(gw.admin, "/ready").await.0, 200);

    // Proxied traffic: CONNECTIONS × PAYLOAD bytes each way.
    for i in 0..CONNECTIONS {
        let payload: Vec<u8> = (0..PAYLOAD).map(|b| (b + i) as u8).collect();
        assert_eq!(exchange(gw.addr("tcp"), &payload).await, payload);
    }
    // in_flight_limit: one connection held open, the second is refused.
    let mut held = TcpStream::connect(gw.addr("limited")).await.unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    held.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    refused(gw.addr("limited")).await;
    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // One failure of each other reason.
    refused(gw.addr("empty")).await; // no_route
    refused(gw.addr("deny")).await; // ip_allow_list
    refused(gw.addr("zero")).await; // no_healthy_server
    refused(gw.addr("dial")).await; // dial_failed (refused)
    // peek_timeout: the start of a TLS record, then a stall (a silent client would be taken for
    // a server-first protocol and find no router).
    let mut stall = TcpStream::connect(gw.addr("tls")).await.unwrap();
    stall
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x50, 0x01])
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), stall.read(&mut buf))
        .await
        .expect("closed after the peek timeout");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");

    // Consul provider metrics recorded through the facade show on the same endpoint.
    metrics::with_local_recorder(&**obs.metrics().recorder(), || {
        consul::watch_request(consul::endpoint::HEALTH_SERVICE, consul::outcome::CHANGED);
        consul::watch_request(consul::endpoint::HEALTH_SERVICE, consul::outcome::CHANGED);
        consul::watch_request(consul::endpoint::CATALOG_SERVICES, consul::outcome::ERROR);
        consul::watch_index(consul::watch::CATALOG, 4242);
        consul::services_watched(3);
        consul::connect_leaf_not_after("tagway", 1_900_000_000);
    });

    // Accounting happens when each connection task ends: wait until everything is closed and
    // counted, then read one scrape.
    let mut m = Scrape::fetch(gw.admin).await;
    for _ in 0..500 {
        let open = m.sum("tagway_entrypoint_open_connections", &[]);
        let bytes = m.get(
            "tagway_service_bytes_total",
            &[("service", "app@file"), ("direction", "to_client")],
        );
        let up = m.get(
            "tagway_server_up",
            &[("service", "checked@file"), ("server", &dead.to_string())],
        );
        if open == 0.0 && bytes == (CONNECTIONS * PAYLOAD) as f64 && up == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = Scrape::fetch(gw.admin).await;
    }

    // Entry points.
    let accepted = [
        ("tcp", 4.0),
        ("empty", 1.0),
        ("deny", 1.0),
        ("limited", 2.0),
        ("zero", 1.0),
        ("dial", 1.0),
        ("tls", 1.0),
        ("checked", 0.0),
    ];
    for (ep, n) in accepted {
        let l = [("entrypoint", ep)];
        assert_eq!(m.get("tagway_entrypoint_connections_total", &l), n, "{ep}");
        assert_eq!(m.get("tagway_entrypoint_open_connections", &l), 0.0, "{ep}");
        assert_eq!(
            m.get("tagway_entrypoint_accept_errors_total", &l),
            0.0,
            "{ep}"
        );
        assert_eq!(
            m.get("tagway_entrypoint_tls_handshake_errors_total", &l),
            0.0
        );
    }
    // Routing failures: exactly one per reason, on the right entry point.
    let expected = [
        ("empty", "no_route"),
        ("deny", "ip_allow_list"),
        ("limited", "in_flight_limit"),
        ("zero", "no_healthy_server"),
        ("dial", "dial_failed"),
        ("tls", "peek_timeout"),
    ];
    for ep in EPS {
        for reason in [
            "no_route",
            "ip_allow_list",
            "in_flight_limit",
            "no_healthy_server",
            "dial_failed",
            "peek_timeout",
            "peek_error",
            "proxy_protocol",
        ] {
            let want = if expected.contains(&(*ep, reason)) {
                1.0
            } else {
                0.0
            };
            assert_eq!(
                m.get(
                    "tagway_routing_failures_total",
                    &[("entrypoint", ep), ("reason", reason)]
                ),
                want,
                "{ep} {reason}"
            );
        }
    }
    assert_eq!(m.sum("tagway_routing_failures_total", &[]), 6.0);
    // Router failures (the router is known for these reasons).
    for (r, reason) in [
        ("deny@file", "ip_allow_list"),
        ("limited@file", "in_flight_limit"),
        ("zero@file", "no_healthy_server"),
        ("dial@file", "dial_failed"),
    ] {
        assert_eq!(
            m.get(
                "tagway_router_failures_total",
                &[("router", r), ("reason", reason)]
            ),
            1.0,
            "{r}"
        );
        assert_eq!(m.sum("tagway_router_failures_total", &[("router", r)]), 1.0);
    }
    assert_eq!(m.sum("tagway_router_failures_total", &[]), 4.0);

    // Routers, services, servers: connections and bytes.
    let total = (CONNECTIONS * PAYLOAD) as f64;
    let r = [("router", "app@file")];
    assert_eq!(m.get("tagway_router_connections_total", &r), 4.0);
    assert_eq!(m.get("tagway_router_open_connections", &r), 0.0);
    for dir in ["to_server", "to_client"] {
        assert_eq!(
            m.get(
                "tagway_router_bytes_total",
                &[("router", "app@file"), ("direction", dir)]
            ),
            total
        );
        assert_eq!(
            m.get(
                "tagway_service_bytes_total",
                &[("service", "app@file"), ("direction", dir)]
            ),
            total
        );
        assert_eq!(
            m.get(
                "tagway_service_bytes_total",
                &[("service", "limited@file"), ("direction", dir)]
            ),
            4.0
        );
    }
    // The router refused by its middleware took no connection.
    assert_eq!(
        m.get(
            "tagway_router_connections_total",
            &[("router", "deny@file")]
        ),
        0.0
    );
    let s = [("service", "app@file")];
    assert_eq!(m.get("tagway_service_connections_total", &s), 4.0);
    assert_eq!(m.get("tagway_service_open_connections", &s), 0.0);
    let h = m.histogram("tagway_service_connection_duration_seconds", &s);
    assert_eq!(h.last().unwrap(), &(f64::INFINITY, 4.0), "{h:?}");
    assert_eq!(h.len(), 15, "14 explicit buckets and +Inf: {h:?}");
    assert_eq!(
        m.get(
            "tagway_service_connections_total",
            &[("service", "limited@file")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "tagway_service_connections_total",
            &[("service", "dial@file")]
        ),
        0.0
    );
    // Smooth round-robin 1:1: two connections and half the bytes on each server.
    for e in [e1, e2] {
        let l = [("service", "app@file"), ("server", &*e.to_string())];
        assert_eq!(m.get("tagway_server_connections_total", &l), 2.0, "{e}");
        assert_eq!(m.get("tagway_server_open_connections", &l), 0.0);
        assert_eq!(m.get("tagway_server_up", &l), 1.0);
        let h = m.histogram("tagway_server_dial_duration_seconds", &l);
        assert_eq!(h.last().unwrap(), &(f64::INFINITY, 2.0), "{h:?}");
        assert_eq!(h.len(), 16, "15 explicit buckets and +Inf");
        assert_eq!(m.sum("tagway_server_dial_errors_total", &l), 0.0);
        for dir in ["to_server", "to_client"] {
            let mut l = l.to_vec();
            l.push(("direction", dir));
            assert_eq!(m.get("tagway_server_bytes_total", &l), total / 2.0);
        }
    }
    // The dial failure, with the transport's reason.
    let dead_s = dead.to_string();
    let l = [("service", "dial@file"), ("server", dead_s.as_str())];
    assert_eq!(
        m.get(
            "tagway_server_dial_errors_total",
            &[
                ("service", "dial@file"),
                ("server", &dead_s),
                ("reason", "refused")
            ]
        ),
        1.0
    );
    assert_eq!(m.sum("tagway_server_dial_errors_total", &l), 1.0);
    assert_eq!(m.get("tagway_server_connections_total", &l), 0.0);
    // Health: the checked server is down.
    assert_eq!(
        m.get(
            "tagway_server_up",
            &[("service", "checked@file"), ("server", &dead_s)]
        ),
        0.0
    );

    // Configuration.
    let p = [("provider", "file")];
    assert_eq!(m.get("tagway_config_reloads_total", &p), 1.0);
    assert_eq!(m.get("tagway_config_routers", &p), 7.0);
    assert_eq!(m.get("tagway_config_services", &p), 6.0);
    assert_eq!(m.get("tagway_config_middlewares", &p), 2.0);
    assert_eq!(m.get("tagway_config_servers_transports", &p), 0.0);
    assert_eq!(m.get("tagway_config_errors", &p), 0.0);
    assert_eq!(m.get("tagway_config_applied_total", &[]), 1.0);
    assert!(m.get("tagway_config_last_reload_success_timestamp_seconds", &p) > 1.6e9);
    assert!(m.get("tagway_config_last_applied_timestamp_seconds", &[]) > 1.6e9);
    let h = m.histogram("tagway_config_change_to_applied_seconds", &p);
    assert_eq!(h.last().unwrap().1, 1.0, "{h:?}");
    assert!(m.value("tagway_config_reload_failures_total", &p).is_none());

    // Consul (through the facade).
    assert_eq!(
        m.get(
            "tagway_consul_watch_requests_total",
            &[("endpoint", "health_service"), ("outcome", "changed")]
        ),
        2.0
    );
    assert_eq!(
        m.get(
            "tagway_consul_watch_requests_total",
            &[("endpoint", "catalog_services"), ("outcome", "error")]
        ),
        1.0
    );
    assert_eq!(
        m.get("tagway_consul_watch_index", &[("watch", "catalog")]),
        4242.0
    );
    assert_eq!(m.get("tagway_consul_services_watched", &[]), 3.0);
    assert_eq!(
        m.get(
            "tagway_consul_connect_leaf_not_after_timestamp_seconds",
            &[("service", "tagway")]
        ),
        1_900_000_000.0
    );
    assert_eq!(
        m.get("tagway_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert_eq!(m.get("tagway_accesslog_dropped_total", &[]), 0.0);

    // Exposition hygiene: every family has HELP and TYPE, no summaries, every counter is _total.
    let text = &m.1;
    assert!(!text.contains("quantile="), "no summaries");
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut it = line.split(' ').skip(2);
        let (name, kind) = (it.next().unwrap(), it.next().unwrap());
        assert!(name.starts_with("tagway_"), "{line}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
        match kind {
            "counter" => assert!(name.ends_with("_total"), "{line}"),
            "histogram" => assert!(name.ends_with("_seconds"), "{line}"),
            "gauge" => assert!(!name.ends_with("_total"), "{line}"),
            other => panic!("unexpected type {other}: {line}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_reload_and_removed_resources_disappear() {
    let st = static_with(&["tcp"]);
    let obs = Observability::new(&st).unwrap();
    let e1 = echo_backend().await;
    let mut d = Dynamic::default();
    d.tcp.services.insert("a@file".into(), lb(&[(e1, 1)]));
    d.tcp.services.insert("b@file".into(), lb(&[(e1, 1)]));
    d.tcp
        .routers
        .insert("a@file".into(), router("tcp", "HostSNI(`*`)", "a@file"));
    let mut gw = start_with(st, obs.clone(), None, Some(d.clone())).await;
    wait_until(|| obs.is_ready()).await;
    assert_eq!(exchange(gw.addr("tcp"), b"hello").await, b"hello");

    // A reload that changes the router's rule and adds a service keeps a@file's counters.
    let mut d2 = d.clone();
    d2.tcp.routers.insert(
        "a@file".into(),
        router("tcp", "ClientIP(`127.0.0.0/8`)", "a@file"),
    );
    d2.tcp
        .routers
        .insert("b@file".into(), router("tcp", "HostSNI(`*`)", "b@file"));
    gw.reload_from("file", d2).await;
    assert_eq!(exchange(gw.addr("tcp"), b"world!").await, b"world!");
    let mut m = Scrape::fetch(gw.admin).await;
    for _ in 0..500 {
        if m.get(
            "tagway_service_bytes_total",
            &[("service", "a@file"), ("direction", "to_server")],
        ) == 11.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = Scrape::fetch(gw.admin).await;
    }
    assert_eq!(
        m.get("tagway_router_connections_total", &[("router", "a@file")]),
        2.0
    );
    assert_eq!(
        m.get(
            "tagway_service_bytes_total",
            &[("service", "a@file"), ("direction", "to_client")]
        ),
        11.0
    );
    assert_eq!(
        m.get("tagway_router_connections_total", &[("router", "b@file")]),
        0.0
    );
    assert_eq!(
        m.get("tagway_config_reloads_total", &[("provider", "file")]),
        2.0
    );
    assert_eq!(m.get("tagway_config_applied_total", &[]), 2.0);
    assert_eq!(m.get("tagway_config_routers", &[("provider", "file")]), 2.0);

    // Removing the router removes its series.
    gw.reload_from("file", d).await;
    let m = Scrape::fetch(gw.admin).await;
    assert!(
        m.value("tagway_router_connections_total", &[("router", "b@file")])
            .is_none()
    );
    assert_eq!(
        m.get("tagway_router_connections_total", &[("router", "a@file")]),
        2.0
    );
    gw.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), gw.task).await;
}
