//! Every admin API endpoint's JSON, readiness across two providers, and that no token, password
//! or private key ever appears in an answer.

mod obs_support;

use std::net::SocketAddr;
use std::time::Duration;

use obs_support::*;
use serde_json::{Value, json};
use tagway::observability::Observability;
use tagway_config::{
    CertificateEntry, ClientCertificate, ConsulCatalog, Dynamic, FileOrContent, HttpAuth,
    InFlightConn, IpAllowList, Middleware, Origin, ResourceError, ResourceKind, RouterTls,
    ServersTransport, TransportTls, Weighted, WeightedService,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "tok-8c1d2f0e-consul-acl-secret";
const PASSWORD: &str = "pw-basic-auth-hunter2";

struct Pki {
    cert: String,
    key: String,
    not_after: i64,
}

fn pki(name: &str, year: i32) -> Pki {
    let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.not_after = rcgen::date_time_ymd(year, 6, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    let not_after = p.not_after.unix_timestamp();
    Pki {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
    }
}

fn file_part(e1: SocketAddr, e2: SocketAddr, server: &Pki, client: &Pki) -> Dynamic {
    let mut d = Dynamic::default();
    d.tls.certificates.push(CertificateEntry {
        cert_file: FileOrContent(server.cert.clone()),
        key_file: FileOrContent(server.key.clone()),
        ..Default::default()
    });
    d.tcp.servers_transports.insert(
        "mtls@file".into(),
        ServersTransport {
            tls: Some(TransportTls {
                server_name: Some("db.internal".into()),
                certificates: vec![ClientCertificate::Pair {
                    cert_file: FileOrContent(client.cert.clone()),
                    key_file: FileOrContent(client.key.clone()),
                }],
                root_cas: vec![FileOrContent(server.cert.clone())],
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    d.tcp
        .services
        .insert("app@file".into(), lb(&[(e1, 3), (e2, 1)]));
    d.tcp.services.insert(
        "split@file".into(),
        tagway_config::Service {
            load_balancer: None,
            weighted: Some(Weighted {
                services: vec![
                    WeightedService {
                        name: "app@file".into(),
                        weight: Some(1),
                    },
                    WeightedService {
                        name: "web@consulcatalog".into(),
                        weight: Some(1),
                    },
                ],
            }),
        },
    );
    d.tcp.middlewares.insert(
        "allow@file".into(),
        Middleware {
            ip_allow_list: Some(IpAllowList {
                source_range: vec!["127.0.0.1/32".into()],
            }),
            in_flight_conn: None,
        },
    );
    d.tcp.middlewares.insert(
        "limit@file".into(),
        Middleware {
            ip_allow_list: None,
            in_flight_conn: Some(InFlightConn { amount: 10 }),
        },
    );
    let mut app = router("tcp", "HostSNI(`*`)", "app@file");
    app.middlewares = vec!["allow@file".into(), "limit@file".into()];
    d.tcp.routers.insert("app@file".into(), app);
    let mut split = router("tls", "HostSNI(`split.example`)", "split@file");
    split.tls = Some(RouterTls {
        passthrough: true,
        ..Default::default()
    });
    d.tcp.routers.insert("split@file".into(), split);
    // Not validated here: the data plane refuses it (a SNI rule without a tls section).
    d.tcp.routers.insert(
        "bad@file".into(),
        router("tls", "HostSNI(`bad.example`)", "app@file"),
    );
    d
}

fn consul_part(e1: SocketAddr) -> Dynamic {
    let mut d = Dynamic::default();
    d.tcp
        .services
        .insert("web@consulcatalog".into(), lb(&[(e1, 1)]));
    let mut web = router("tls", "HostSNI(`web.example`)", "web@consulcatalog");
    web.tls = Some(RouterTls::default());
    d.tcp.routers.insert("web@consulcatalog".into(), web);
    d
}

fn merged(a: &Dynamic, b: &Dynamic) -> Dynamic {
    let mut d = a.clone();
    d.tcp.routers.extend(b.tcp.routers.clone());
    d.tcp.services.extend(b.tcp.services.clone());
    d
}

async fn publish(gw: &Running, d: Dynamic) {
    let before = gw.obs.applied_count();
    let d = std::sync::Arc::new(d);
    gw.obs.publish(&d);
    gw.config.send_replace(d);
    wait_until(|| gw.obs.applied_count() > before).await;
}

fn by_name<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint() {
    let mut st = static_with(&["tcp", "tls"]);
    let mut consul = ConsulCatalog::default();
    consul.endpoint.token = Some(TOKEN.into());
    consul.endpoint.http_auth = Some(HttpAuth {
        username: "gw".into(),
        password: PASSWORD.into(),
    });
    st.providers.consul_catalog = Some(consul);
    let obs = Observability::new(&st).unwrap();
    obs.expect_provider("file");
    obs.expect_provider("consulcatalog");
    let gw = start_with(st, obs.clone(), None, None).await;
    let admin = gw.admin;
    wait_until(|| obs.applied_count() == 1).await;

    // /ping, and /ready before any provider delivered.
    let (status, _, body) = get(admin, "/ping").await;
    assert_eq!((status, body.as_str()), (200, "OK"));
    let (status, _, body) = get(admin, "/ready").await;
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["waitingFor"], json!(["consulcatalog", "file"]));

    // The file provider delivers: still waiting for Consul.
    let e1 = echo_backend().await;
    let e2 = echo_backend().await;
    let server_pki = pki("term.example", 2031);
    let client_pki = pki("gateway.client", 2030);
    let file = file_part(e1, e2, &server_pki, &client_pki);
    obs.provider_updated("file", &file);
    obs.validated(&[]);
    publish(&gw, file.clone()).await;
    let (status, _, body) = get(admin, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""waitingFor":["consulcatalog"]"#), "{body}");

    // Consul fails once, then delivers (with one tag that does not validate).
    obs.provider_failed(
        "consulcatalog",
        &"GET http://127.0.0.1:8500/v1/catalog/services: connection refused",
    );
    let errors = get_json(admin, "/api/errors").await;
    assert_eq!(errors[0]["stage"], "provider");
    assert_eq!(errors[0]["provider"], "consulcatalog");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
    let consul = consul_part(e1);
    obs.provider_updated("consulcatalog", &consul);
    obs.validated(&[ResourceError {
        provider: "consulcatalog".into(),
        kind: ResourceKind::Router,
        name: "broken@consulcatalog".into(),
        key: Some("rule".into()),
        origin: Some(Origin::tag("traefik.tcp.routers.broken.rule=HostSNI(`x`")),
        message: "unbalanced parenthesis".into(),
    }]);
    publish(&gw, merged(&file, &consul)).await;
    let (status, _, body) = get(admin, "/ready").await;
    assert_eq!((status, body.as_str()), (200, r#"{"ready":true}"#));

    // One connection held open through app@file (smooth WRR 3:1 picks e1 first).
    let mut held = TcpStream::connect(gw.addr("tcp")).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();

    // /api/version
    let v = get_json(admin, "/api/version").await;
    assert_eq!(v["Version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["Codename"], "tagway");
    assert!(v["startDate"].as_str().unwrap().ends_with('Z'));

    // /api/tcp/routers
    let routers = get_json(admin, "/api/tcp/routers").await;
    let names: Vec<&str> = routers
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "app@file",
            "bad@file",
            "broken@consulcatalog",
            "split@file",
            "web@consulcatalog"
        ]
    );
    let app = by_name(&routers, "app@file");
    assert_eq!(
        app,
        &json!({
            "entryPoints": ["tcp"],
            "rule": "HostSNI(`*`)",
            "priority": tagway_config::Rule::default_priority("HostSNI(`*`)"),
            "service": "app@file",
            "middlewares": ["allow@file", "limit@file"],
            "using": ["tcp"],
            "name": "app@file",
            "provider": "file",
            "status": "enabled",
        })
    );
    assert_eq!(get_json(admin, "/api/tcp/routers/app@file").await, *app);
    let web = get_json(admin, "/api/tcp/routers/web@consulcatalog").await;
    assert_eq!(web["tls"], json!({ "passthrough": false }));
    assert_eq!(web["provider"], "consulcatalog");
    assert_eq!(web["using"], json!(["tls"]));
    let bad = by_name(&routers, "bad@file");
    assert_eq!(bad["status"], "disabled");
    assert!(
        bad["error"][0].as_str().unwrap().contains("tls section"),
        "{bad}"
    );
    let broken = get_json(admin, "/api/tcp/routers/broken@consulcatalog").await;
    assert_eq!(
        broken,
        json!({
            "name": "broken@consulcatalog",
            "provider": "consulcatalog",
            "status": "disabled",
            "error": ["rule: unbalanced parenthesis"],
        })
    );
    let (status, ctype, body) = get(admin, "/api/tcp/routers/nope@file").await;
    assert_eq!(status, 404);
    assert!(ctype.starts_with("application/json"));
    assert_eq!(body, r#"{"message":"router nope@file not found"}"#);

    // /api/tcp/services: every server's address, weight, health and open connections.
    let services = get_json(admin, "/api/tcp/services").await;
    assert_eq!(services.as_array().unwrap().len(), 3);
    let app = get_json(admin, "/api/tcp/services/app@file").await;
    assert_eq!(app, *by_name(&services, "app@file"));
    assert_eq!(app["type"], "loadbalancer");
    assert_eq!(app["status"], "enabled");
    assert_eq!(app["usedBy"], json!(["app@file", "bad@file", "split@file"]));
    assert_eq!(app["loadBalancer"]["serversTransport"], "default@internal");
    assert_eq!(
        app["loadBalancer"]["servers"],
        json!([
            {"address": e1.to_string(), "weight": 3, "health": "UP", "available": true, "openConnections": 1},
            {"address": e2.to_string(), "weight": 1, "health": "UP", "available": true, "openConnections": 0},
        ])
    );
    assert_eq!(
        app["serverStatus"],
        json!({ e1.to_string(): "UP", e2.to_string(): "UP" })
    );
    let split = by_name(&services, "split@file");
    assert_eq!(split["type"], "weighted");
    assert_eq!(
        split["weighted"]["services"],
        json!([{"name": "app@file", "weight": 1}, {"name": "web@consulcatalog", "weight": 1}])
    );
    assert_eq!(split["usedBy"], json!(["split@file"]));
    assert_eq!(get(admin, "/api/tcp/services/nope@file").await.0, 404);

    // /api/tcp/middlewares
    let mws = get_json(admin, "/api/tcp/middlewares").await;
    assert_eq!(
        *by_name(&mws, "allow@file"),
        json!({
            "ipAllowList": {"sourceRange": ["127.0.0.1/32"]},
            "type": "ipallowlist",
            "usedBy": ["app@file"],
            "name": "allow@file",
            "provider": "file",
            "status": "enabled",
        })
    );
    let limit = get_json(admin, "/api/tcp/middlewares/limit@file").await;
    assert_eq!(limit["inFlightConn"], json!({"amount": 10}));
    assert_eq!(limit["type"], "inflightconn");

    // /api/tcp/serverstransports: inline certificates and keys are redacted.
    let ts = get_json(admin, "/api/tcp/serverstransports").await;
    assert_eq!(ts[0]["name"], "default@internal");
    assert_eq!(ts[0]["provider"], "internal");
    assert_eq!(ts[0]["dialTimeout"], "30s");
    let mtls = get_json(admin, "/api/tcp/serverstransports/mtls@file").await;
    assert_eq!(mtls, ts[1]);
    assert_eq!(
        mtls["tls"],
        json!({
            "serverName": "db.internal",
            "certificates": [{"certFile": "<redacted>", "keyFile": "<redacted>"}],
            "rootCAs": ["<redacted>"],
        })
    );
    assert_eq!(mtls["status"], "enabled");

    // /api/errors: validation and runtime errors in force (the provider failure is cleared).
    let errors = get_json(admin, "/api/errors").await;
    assert_eq!(errors.as_array().unwrap().len(), 2, "{errors:#}");
    assert_eq!(
        errors[0],
        json!({
            "provider": "consulcatalog",
            "kind": "router",
            "name": "broken@consulcatalog",
            "key": "rule",
            "origin": Origin::tag("traefik.tcp.routers.broken.rule=HostSNI(`x`").to_string(),
            "message": "unbalanced parenthesis",
            "stage": "validation",
        })
    );
    assert_eq!(errors[1]["name"], "bad@file");
    assert_eq!(errors[1]["stage"], "runtime");
    assert_eq!(errors[1]["provider"], "file");

    // /api/overview
    let o = get_json(admin, "/api/overview").await;
    assert_eq!(
        o["tcp"],
        json!({
            "routers": {"total": 5, "warnings": 0, "errors": 2},
            "services": {"total": 3, "warnings": 0, "errors": 0},
            "middlewares": {"total": 2, "warnings": 0, "errors": 0},
            "serversTransports": {"total": 2, "warnings": 0, "errors": 0},
        })
    );
    assert_eq!(o["providers"], json!(["consulcatalog", "file"]));
    assert_eq!(o["entryPoints"], json!(["tcp", "tls"]));
    assert_eq!(o["errors"], 2);
    assert_eq!(o["ready"], true);
    assert_eq!(o["configuration"]["applied"], 3);
    let consul_status = &o["providerStatus"][0];
    assert_eq!(consul_status["name"], "consulcatalog");
    assert_eq!(consul_status["reloads"], 1);
    assert_eq!(consul_status["failures"], 1);
    assert_eq!(consul_status["lastError"], Value::Null);
    assert_eq!(consul_status["routers"], 1);

    // /metrics: certificates in use, the provider failure, errors in force.
    let m = Scrape::fetch(admin).await;
    assert_eq!(
        m.get(
            "tagway_tls_certificate_not_after_timestamp_seconds",
            &[
                ("kind", "server"),
                ("cn", "term.example"),
                ("sans", "term.example")
            ]
        ),
        server_pki.not_after as f64
    );
    assert_eq!(
        m.get(
            "tagway_tls_certificate_not_after_timestamp_seconds",
            &[
                ("kind", "client"),
                ("resource", "mtls@file"),
                ("cn", "gateway.client")
            ]
        ),
        client_pki.not_after as f64
    );
    assert_eq!(
        m.get(
            "tagway_config_reload_failures_total",
            &[("provider", "consulcatalog")]
        ),
        1.0
    );
    assert_eq!(
        m.get("tagway_config_errors", &[("provider", "consulcatalog")]),
        1.0
    );
    assert_eq!(m.get("tagway_config_errors", &[("provider", "file")]), 1.0);
    assert_eq!(
        m.get(
            "tagway_server_open_connections",
            &[("service", "app@file"), ("server", &e1.to_string())]
        ),
        1.0
    );

    // Unknown paths answer JSON 404s.
    let (status, _, body) = get(admin, "/api/nope").await;
    assert_eq!(
        (status, body.as_str()),
        (404, r#"{"message":"404 page not found"}"#)
    );

    // No answer ever holds a secret.
    let key_line = |pem: &str| {
        pem.lines()
            .nth(1)
            .expect("a base64 line of the key")
            .to_owned()
    };
    let secrets = [
        TOKEN.to_owned(),
        PASSWORD.to_owned(),
        "PRIVATE KEY".to_owned(),
        "-----BEGIN".to_owned(),
        key_line(&server_pki.key),
        key_line(&client_pki.key),
    ];
    for path in [
        "/ping",
        "/ready",
        "/api/version",
        "/api/overview",
        "/api/rawdata",
        "/api/tcp/routers",
        "/api/tcp/routers/web@consulcatalog",
        "/api/tcp/services",
        "/api/tcp/services/app@file",
        "/api/tcp/middlewares",
        "/api/tcp/serverstransports",
        "/api/tcp/serverstransports/mtls@file",
        "/api/errors",
        "/metrics",
    ] {
        let (status, _, body) = get(admin, path).await;
        assert_eq!(status, 200, "{path}");
        for s in &secrets {
            assert!(!body.contains(s.as_str()), "{path} leaks {s:?}:\n{body}");
        }
    }

    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), held.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn redaction_at_any_depth() {
    let mut v = json!({
        "token": "abc",
        "nested": [{"Password": "x", "keyFile": "-----BEGIN PRIVATE KEY-----\nMII...", "path": "/etc/key.pem"}],
        "clientSecret": null,
        "ok": "value",
    });
    tagway::admin::redact(&mut v);
    assert_eq!(
        v,
        json!({
            "token": "<redacted>",
            "nested": [{"Password": "<redacted>", "keyFile": "<redacted>", "path": "/etc/key.pem"}],
            "clientSecret": null,
            "ok": "value",
        })
    );
}

#[tokio::test]
async fn admin_listener_only_when_configured() {
    let st = std::sync::Arc::new(static_with(&["tcp"]));
    let obs = Observability::new(&st).unwrap();
    let gw = tagway::server::Gateway::new((*st).clone());
    let none = tagway::admin::spawn_if_configured(
        st.clone(),
        obs.clone(),
        gw.handle(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert!(none.is_none());

    let mut with = (*st).clone();
    with.admin = Some(tagway_config::Admin {
        address: "127.0.0.1:0".into(),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, task) = tagway::admin::spawn_if_configured(
        std::sync::Arc::new(with),
        obs,
        gw.handle(),
        async move {
            let _ = stop_rx.await;
        },
    )
    .await
    .unwrap()
    .expect("admin listener");
    assert_eq!(get(addr, "/ping").await.0, 200);
    // Nothing applied yet: not ready.
    assert_eq!(get(addr, "/ready").await.0, 503);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let e = tagway::admin::bind("127.0.0.1:http").await.unwrap_err();
    assert!(e.to_string().starts_with("admin.address"), "{e}");
}
