//! Endpoint JSON and blocking-rule tests, driving the router directly (no socket) on tokio's
//! paused clock so waits of minutes take no real time. Socket-level behaviour is covered by
//! `integration/tests/catalog_*.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt;

use super::*;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn index(&self) -> u64 {
        self.header("X-Consul-Index")
            .expect("X-Consul-Index present")
            .parse()
            .expect("numeric index")
    }
}

async fn send(
    router: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("X-Consul-Token", t);
    }
    let body = body.map_or_else(Body::empty, |v| Body::from(v.to_string()));
    let resp = router
        .clone()
        .oneshot(req.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(router: &Router, uri: &str) -> Answer {
    send(router, "GET", uri, None, None).await
}

async fn put(router: &Router, uri: &str, body: Value) -> Answer {
    send(router, "PUT", uri, Some(body), None).await
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("object expected: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn app() -> (Router, DevCatalogHandle) {
    DevCatalog::builder().build_for_test()
}

fn web(id: &str, port: u16) -> ServiceRegistration {
    ServiceRegistration::new("web")
        .id(id)
        .address("127.0.0.1")
        .port(port)
        .tags(["v1", "traefik.enable=true"])
        .check(CheckDefinition::ttl(Duration::from_secs(30)).id(format!("{id}-ttl")))
}

const NODE_KEYS: &[&str] = &[
    "ID",
    "Node",
    "Address",
    "Datacenter",
    "TaggedAddresses",
    "Meta",
    "CreateIndex",
    "ModifyIndex",
];

const CHECK_KEYS: &[&str] = &[
    "Node",
    "CheckID",
    "Name",
    "Status",
    "Notes",
    "Output",
    "ServiceID",
    "ServiceName",
    "ServiceTags",
    "Type",
    "Interval",
    "Timeout",
    "ExposedPort",
    "Definition",
    "CreateIndex",
    "ModifyIndex",
];

// ---- JSON shapes -----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn catalog_services_lists_names_with_unique_tags() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    h.register(web("web-2", 8081).tag("canary"))
        .expect("register");
    let a = get(&r, "/v1/catalog/services").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("Content-Type"), Some("application/json"));
    assert_eq!(
        a.json(),
        json!({"consul": [], "web": ["canary", "traefik.enable=true", "v1"]})
    );
    assert_eq!(a.index(), h.catalog_index());
    assert_eq!(a.header("X-Consul-KnownLeader"), Some("true"));
    assert_eq!(a.header("X-Consul-LastContact"), Some("0"));
    assert_eq!(a.header("X-Consul-Effective-Consistency"), Some("leader"));
}

#[tokio::test(start_paused = true)]
async fn health_service_entries_have_consul_shape() {
    let (r, h) = app();
    h.register(web("web-1", 8080).meta("version", "1").weights(10, 2))
        .expect("register");
    let a = get(&r, "/v1/health/service/web").await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    let entries = v.as_array().expect("array");
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(keys(e), set(&["Node", "Service", "Checks"]));
    assert_eq!(keys(&e["Node"]), set(NODE_KEYS));
    assert_eq!(e["Node"]["Node"], "dev-catalog");
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    assert_eq!(e["Node"]["Address"], "127.0.0.1");
    assert_eq!(e["Node"]["TaggedAddresses"]["lan_ipv4"], "127.0.0.1");
    assert_eq!(e["Node"]["Meta"]["consul-network-segment"], "");
    let s = &e["Service"];
    assert_eq!(
        keys(s),
        set(&[
            "ID",
            "Service",
            "Tags",
            "Address",
            "TaggedAddresses",
            "Meta",
            "Port",
            "Weights",
            "EnableTagOverride",
            "Proxy",
            "Connect",
            "CreateIndex",
            "ModifyIndex"
        ])
    );
    assert_eq!(s["ID"], "web-1");
    assert_eq!(s["Service"], "web");
    assert_eq!(s["Tags"], json!(["v1", "traefik.enable=true"]));
    assert_eq!(s["Port"], 8080);
    assert_eq!(s["Meta"], json!({"version": "1"}));
    assert_eq!(s["Weights"], json!({"Passing": 10, "Warning": 2}));
    assert_eq!(
        s["TaggedAddresses"],
        json!({"lan_ipv4": {"Address": "127.0.0.1", "Port": 8080},
               "wan_ipv4": {"Address": "127.0.0.1", "Port": 8080}})
    );
    assert_eq!(
        s["Proxy"],
        json!({"Mode": "", "MeshGateway": {}, "Expose": {}})
    );
    assert_eq!(s["Connect"], json!({}));
    let checks = e["Checks"].as_array().expect("checks");
    let ids: Vec<&str> = checks
        .iter()
        .map(|c| c["CheckID"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec!["serfHealth", "web-1-ttl"]);
    for c in checks {
        assert_eq!(keys(c), set(CHECK_KEYS));
    }
    assert_eq!(checks[0]["Status"], "passing");
    assert_eq!(checks[0]["Output"], "Agent alive and reachable");
    assert_eq!(checks[0]["ServiceTags"], json!([]));
    let ttl = &checks[1];
    assert_eq!(ttl["Status"], "critical", "TTL checks start critical");
    assert_eq!(ttl["Type"], "ttl");
    assert_eq!(ttl["Name"], "Service 'web' check");
    assert_eq!(ttl["ServiceID"], "web-1");
    assert_eq!(ttl["ServiceName"], "web");
    assert_eq!(ttl["ServiceTags"], json!(["v1", "traefik.enable=true"]));
    assert_eq!(ttl["Definition"], json!({"TTL": "30s"}));
}

#[tokio::test(start_paused = true)]
async fn defaults_are_empty_collections_never_null() {
    let (r, h) = app();
    h.register(ServiceRegistration::new("bare"))
        .expect("register");
    let v = get(&r, "/v1/health/service/bare").await.json();
    let s = &v[0]["Service"];
    assert_eq!(s["Tags"], json!([]));
    assert_eq!(s["Meta"], json!({}));
    assert_eq!(s["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(s["Address"], "");
    assert!(
        s.get("Port").is_none(),
        "Port is omitted when 0, as Consul does"
    );
    assert!(s.get("TaggedAddresses").is_none());
    for path in [
        "/v1/health/service/nope",
        "/v1/health/connect/nope",
        "/v1/catalog/service/nope",
        "/v1/health/checks/nope",
        "/v1/health/node/nope",
    ] {
        let a = get(&r, path).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert_eq!(a.text(), "[]", "{path}");
        assert!(a.index() >= 1, "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn catalog_service_entries_are_service_nodes() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    let v = get(&r, "/v1/catalog/service/web").await.json();
    let e = &v[0];
    assert_eq!(
        keys(e),
        set(&[
            "ID",
            "Node",
            "Address",
            "Datacenter",
            "TaggedAddresses",
            "NodeMeta",
            "ServiceKind",
            "ServiceID",
            "ServiceName",
            "ServiceTags",
            "ServiceAddress",
            "ServiceTaggedAddresses",
            "ServiceWeights",
            "ServiceMeta",
            "ServicePort",
            "ServiceSocketPath",
            "ServiceEnableTagOverride",
            "ServiceProxy",
            "ServiceConnect",
            "CreateIndex",
            "ModifyIndex"
        ])
    );
    assert_eq!(e["ServiceID"], "web-1");
    assert_eq!(e["ServicePort"], 8080);
    assert_eq!(e["ServiceWeights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(e["Node"], "dev-catalog");
    assert_eq!(e["ServiceKind"], "");
}

#[tokio::test(start_paused = true)]
async fn passing_and_repeated_tag_filters() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    h.register(web("web-2", 8081).tag("canary"))
        .expect("register");
    h.set_check_status("web-2-ttl", CheckStatus::Passing, "ok")
        .expect("pass");
    let all = get(&r, "/v1/health/service/web").await.json();
    assert_eq!(
        all.as_array().map(Vec::len),
        Some(2),
        "no filter: critical included"
    );
    let passing = get(&r, "/v1/health/service/web?passing").await.json();
    assert_eq!(passing.as_array().map(Vec::len), Some(1));
    assert_eq!(passing[0]["Service"]["ID"], "web-2");
    let p1 = get(&r, "/v1/health/service/web?passing=1").await.json();
    assert_eq!(p1, passing);
    let p0 = get(&r, "/v1/health/service/web?passing=false").await.json();
    assert_eq!(p0, all);
    let bad = get(&r, "/v1/health/service/web?passing=maybe").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let tagged = get(&r, "/v1/health/service/web?tag=v1&tag=canary")
        .await
        .json();
    assert_eq!(tagged.as_array().map(Vec::len), Some(1));
    assert_eq!(tagged[0]["Service"]["ID"], "web-2");
    let none = get(&r, "/v1/health/service/web?tag=v1&tag=nope")
        .await
        .json();
    assert_eq!(none, json!([]));
    let cat = get(&r, "/v1/catalog/service/web?tag=CANARY").await.json();
    assert_eq!(
        cat.as_array().map(Vec::len),
        Some(1),
        "tag match ignores case"
    );
    // Warning is not passing either.
    h.set_check_status("web-2-ttl", CheckStatus::Warning, "slow")
        .expect("warn");
    assert_eq!(
        get(&r, "/v1/health/service/web?passing").await.json(),
        json!([])
    );
}

#[tokio::test(start_paused = true)]
async fn other_datacenters_have_no_path() {
    let (r, _h) = app();
    let a = get(&r, "/v1/health/service/web?dc=dc2").await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.text(), "No path to datacenter");
    assert_eq!(
        get(&r, "/v1/health/service/web?dc=dc1").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&r, "/v1/catalog/datacenters").await.json(),
        json!(["dc1"])
    );
}

#[tokio::test(start_paused = true)]
async fn nodes_checks_and_state_endpoints() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    h.register_node(
        NodeRegistration::new("db-node", "127.0.0.5")
            .meta("rack", "r1")
            .check(CheckDefinition::static_status(CheckStatus::Warning).id("disk"))
            .service(ServiceRegistration::new("db").port(5432)),
    )
    .expect("node");
    let nodes = get(&r, "/v1/catalog/nodes").await.json();
    let names: Vec<&str> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["Node"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["db-node", "dev-catalog"]);
    assert_eq!(keys(&nodes[0]), set(NODE_KEYS));
    let rack = get(&r, "/v1/catalog/nodes?node-meta=rack:r1").await.json();
    assert_eq!(rack.as_array().map(Vec::len), Some(1));

    let node = get(&r, "/v1/catalog/node/db-node").await.json();
    assert_eq!(keys(&node), set(&["Node", "Services"]));
    assert_eq!(node["Services"]["db"]["Port"], 5432);
    assert_eq!(get(&r, "/v1/catalog/node/missing").await.text(), "null");

    let warning = get(&r, "/v1/health/state/warning").await.json();
    assert_eq!(warning.as_array().map(Vec::len), Some(1));
    assert_eq!(warning[0]["CheckID"], "disk");
    assert_eq!(warning[0]["Node"], "db-node");
    let any = get(&r, "/v1/health/state/any").await.json();
    assert_eq!(any.as_array().map(Vec::len), Some(3));
    let bad = get(&r, "/v1/health/state/bogus").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let db = get(&r, "/v1/health/service/db").await.json();
    let ids: Vec<&str> = db[0]["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["CheckID"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids,
        vec!["disk"],
        "node checks apply to the node's services"
    );

    let checks = get(&r, "/v1/health/checks/web").await.json();
    assert_eq!(checks.as_array().map(Vec::len), Some(1));
    assert_eq!(checks[0]["CheckID"], "web-1-ttl");
    let node_checks = get(&r, "/v1/health/node/dev-catalog").await.json();
    assert_eq!(node_checks.as_array().map(Vec::len), Some(2));
}

#[tokio::test(start_paused = true)]
async fn agent_endpoints() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    let services = get(&r, "/v1/agent/services").await.json();
    assert_eq!(keys(&services), set(&["consul", "web-1"]));
    let s = &services["web-1"];
    assert_eq!(s["Datacenter"], "dc1");
    assert_eq!(s["Weights"], json!({"Passing": 1, "Warning": 1}));
    let one = get(&r, "/v1/agent/service/web-1").await;
    assert_eq!(one.status, StatusCode::OK);
    assert!(one.json()["ContentHash"].is_string());
    assert!(one.header("X-Consul-ContentHash").is_some());
    let missing = get(&r, "/v1/agent/service/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let checks = get(&r, "/v1/agent/checks").await.json();
    assert_eq!(keys(&checks), set(&["serfHealth", "web-1-ttl"]));
    let me = get(&r, "/v1/agent/self").await.json();
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    assert_eq!(me["Config"]["NodeName"], "dev-catalog");
    assert_eq!(me["Member"]["Name"], "dev-catalog");
    assert_eq!(
        get(&r, "/v1/status/leader").await.json(),
        json!("127.0.0.1:8300")
    );
    assert_eq!(
        get(&r, "/v1/status/peers").await.json(),
        json!(["127.0.0.1:8300"])
    );

    let health = get(&r, "/v1/agent/health/service/name/web").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json()[0]["AggregatedStatus"], "critical");
    h.set_check_status("web-1-ttl", CheckStatus::Warning, "")
        .expect("warn");
    let health = get(&r, "/v1/agent/health/service/id/web-1?format=text").await;
    assert_eq!(health.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(health.text(), "warning");
    h.set_service_maintenance("web-1", true, None)
        .expect("maint");
    let health = get(&r, "/v1/agent/health/service/id/web-1").await;
    assert_eq!(health.json()["AggregatedStatus"], "maintenance");
    assert_eq!(
        get(&r, "/v1/agent/health/service/name/nope").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(start_paused = true)]
async fn pretty_output_and_unknown_routes() {
    let (r, _h) = app();
    let a = get(&r, "/v1/catalog/datacenters?pretty").await;
    assert_eq!(a.text(), "[\n    \"dc1\"\n]\n");
    let a = get(&r, "/v1/nope").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = send(&r, "GET", "/v1/agent/service/register", None, None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.text(), "method GET not allowed");
    let a = send(&r, "DELETE", "/v1/catalog/services", None, None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.text(), "method DELETE not allowed");
}

// ---- writes --------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn agent_register_accepts_any_key_case_and_snake_case() {
    let (r, h) = app();
    let a = put(
        &r,
        "/v1/agent/service/register",
        json!({"name": "api", "id": "api-1", "port": 9000, "address": "127.0.0.2",
               "tags": ["x"], "meta": {"k": "v"}, "weights": {"passing": 3, "warning": 1},
               "enable_tag_override": true, "connect": {"native": true},
               "checks": [{"ttl": "15s", "CheckID": "api-ttl", "status": "passing"},
                          {"tcp": "127.0.0.1:1", "interval": "10s"}]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(a.body.is_empty());
    assert_eq!(h.check_status("api-ttl"), Some(CheckStatus::Passing));
    let v = get(&r, "/v1/health/service/api").await.json();
    let s = &v[0]["Service"];
    assert_eq!(s["Weights"], json!({"Passing": 3, "Warning": 1}));
    assert_eq!(s["EnableTagOverride"], true);
    assert_eq!(s["Connect"], json!({"Native": true}));
    let ids: Vec<&str> = v[0]["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["CheckID"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec!["api-ttl", "serfHealth", "service:api-1:2"]);
    let connect = get(&r, "/v1/health/connect/api").await.json();
    assert_eq!(connect.as_array().map(Vec::len), Some(1));
}

#[tokio::test(start_paused = true)]
async fn agent_register_validation_answers() {
    let (r, _h) = app();
    let cases = [
        (json!({"Port": 1}), 400, "Missing service name"),
        (
            json!({"Name": "x", "Check": {"Interval": "10s"}}),
            400,
            "Must provide TTL or Script/DockerContainerID/HTTP/TCP and Interval",
        ),
        (
            json!({"Name": "x", "Weights": {"Passing": 0, "Warning": 0}}),
            400,
            "Invalid Weights: Passing must be greater than 0",
        ),
        (
            json!({"Name": "x", "Address": "0.0.0.0"}),
            400,
            "Invalid service address",
        ),
        (
            json!({"Name": "x", "Check": {"Args": ["true"], "Interval": "10s"}}),
            500,
            "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or 'enable_local_script_checks' to true",
        ),
    ];
    for (body, status, text) in cases {
        let a = put(&r, "/v1/agent/service/register", body.clone()).await;
        assert_eq!(a.status.as_u16(), status, "{body}");
        assert_eq!(a.text(), text, "{body}");
    }
    let a = send(&r, "PUT", "/v1/agent/service/register", None, None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = put(
        &r,
        "/v1/agent/service/register",
        json!({"Name": "x", "Port": "80"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        a.text().starts_with("Request decode failed: "),
        "{}",
        a.text()
    );
}

#[tokio::test(start_paused = true)]
async fn ttl_updates_maintenance_and_deregistration() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    for (verb, status) in [
        ("pass", "passing"),
        ("warn", "warning"),
        ("fail", "critical"),
    ] {
        let a = send(
            &r,
            "PUT",
            &format!("/v1/agent/check/{verb}/web-1-ttl?note=n-{verb}"),
            None,
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        let c = &get(&r, "/v1/agent/checks").await.json()["web-1-ttl"];
        assert_eq!(c["Status"], status);
        assert_eq!(c["Output"], format!("n-{verb}"));
    }
    let a = put(
        &r,
        "/v1/agent/check/update/web-1-ttl",
        json!({"Status": "passing", "Output": "fine"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.check_status("web-1-ttl"), Some(CheckStatus::Passing));
    let a = put(
        &r,
        "/v1/agent/check/update/web-1-ttl",
        json!({"Status": "meh"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.text(), "Invalid check status: 'meh'");
    let a = send(&r, "PUT", "/v1/agent/check/pass/nope", None, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        a.text(),
        "Unknown check ID \"nope\". Ensure that the check ID is passed, not the check name."
    );
    let a = send(&r, "PUT", "/v1/agent/check/pass/serfHealth", None, None).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        a.text(),
        "CheckID \"serfHealth\" does not have associated TTL"
    );

    // Maintenance.
    let a = send(&r, "PUT", "/v1/agent/service/maintenance/web-1", None, None).await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::BAD_REQUEST, "Missing value for enable")
    );
    let a = send(
        &r,
        "PUT",
        "/v1/agent/service/maintenance/web-1?enable=yes",
        None,
        None,
    )
    .await;
    assert_eq!(a.text(), "Invalid value for enable: \"yes\"");
    let a = send(
        &r,
        "PUT",
        "/v1/agent/service/maintenance/nope?enable=true",
        None,
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (
            StatusCode::NOT_FOUND,
            "No service registered with ID \"nope\""
        )
    );
    let a = send(
        &r,
        "PUT",
        "/v1/agent/service/maintenance/web-1?enable=True&reason=deploy",
        None,
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let v = get(&r, "/v1/health/service/web").await.json();
    let maint = v[0]["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["CheckID"] == "_service_maintenance:web-1")
        .cloned()
        .expect("maintenance check");
    assert_eq!(maint["Status"], "critical");
    assert_eq!(maint["Notes"], "deploy");
    assert_eq!(maint["Name"], "Service Maintenance Mode");
    assert_eq!(maint["Type"], "maintenance");
    assert_eq!(
        get(&r, "/v1/health/service/web?passing").await.json(),
        json!([])
    );
    send(
        &r,
        "PUT",
        "/v1/agent/service/maintenance/web-1?enable=false",
        None,
        None,
    )
    .await;
    assert_eq!(
        get(&r, "/v1/health/service/web?passing")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let a = send(&r, "PUT", "/v1/agent/maintenance?enable=true", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        get(&r, "/v1/health/service/web?passing").await.json(),
        json!([])
    );
    send(&r, "PUT", "/v1/agent/maintenance?enable=false", None, None).await;

    // Deregistration.
    let a = send(&r, "PUT", "/v1/agent/service/deregister/nope", None, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = send(&r, "PUT", "/v1/agent/service/deregister/web-1", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(get(&r, "/v1/health/service/web").await.json(), json!([]));
    assert!(
        get(&r, "/v1/agent/checks")
            .await
            .json()
            .get("web-1-ttl")
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn agent_check_register_and_deregister() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    let a = put(
        &r,
        "/v1/agent/check/register",
        json!({"Name": "extra", "ServiceID": "web-1", "TTL": "5s"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(h.check_status("extra"), Some(CheckStatus::Critical));
    let a = put(&r, "/v1/agent/check/register", json!({"TTL": "5s"})).await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::BAD_REQUEST, "Missing check name")
    );
    let a = put(
        &r,
        "/v1/agent/check/register",
        json!({"Name": "x", "ServiceID": "nope", "TTL": "5s"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = send(&r, "PUT", "/v1/agent/check/deregister/extra", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.check_status("extra"), None);
}

#[tokio::test(start_paused = true)]
async fn catalog_register_and_deregister_nodes() {
    let (r, h) = app();
    let a = put(
        &r,
        "/v1/catalog/register",
        json!({"Node": "ext-1", "Address": "10.0.0.1", "NodeMeta": {"zone": "a"},
               "TaggedAddresses": {"wan": "198.51.100.1"},
               "Service": {"Service": "redis", "ID": "redis-1", "Port": 6379, "Tags": ["primary"]},
               "Checks": [{"CheckID": "node-ok", "Name": "node", "Status": "passing"},
                          {"CheckID": "redis-ok", "ServiceID": "redis-1", "Status": "passing",
                           "Definition": {"TCP": "10.0.0.1:6379", "Interval": "5s"}}]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), "true");
    put(
        &r,
        "/v1/catalog/register",
        json!({"Node": "ext-2", "Address": "10.0.0.2",
               "Service": {"Service": "redis", "ID": "redis-1", "Port": 6379},
               "Check": {"CheckID": "node-ok", "Status": "critical"}}),
    )
    .await;
    let v = get(&r, "/v1/health/service/redis").await.json();
    let entries = v.as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["Node"]["Node"], "ext-1");
    assert_eq!(entries[0]["Node"]["Address"], "10.0.0.1");
    assert_eq!(entries[0]["Node"]["TaggedAddresses"]["wan"], "198.51.100.1");
    assert_eq!(entries[0]["Checks"][1]["Type"], "tcp");
    assert_eq!(entries[0]["Checks"][1]["Interval"], "5s");
    assert_eq!(entries[1]["Node"]["Address"], "10.0.0.2");
    let passing = get(&r, "/v1/health/service/redis?passing").await.json();
    assert_eq!(
        passing.as_array().map(Vec::len),
        Some(1),
        "ext-2's node check is critical"
    );
    let zone = get(&r, "/v1/health/service/redis?node-meta=zone:a")
        .await
        .json();
    assert_eq!(zone.as_array().map(Vec::len), Some(1));

    let a = put(&r, "/v1/catalog/register", json!({"Address": "1.2.3.4"})).await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::BAD_REQUEST, "Must provide node")
    );
    let a = put(
        &r,
        "/v1/catalog/register",
        json!({"Node": "x", "Address": "1.2.3.4", "Datacenter": "dc9"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);

    let a = put(
        &r,
        "/v1/catalog/deregister",
        json!({"Node": "ext-1", "ServiceID": "redis-1"}),
    )
    .await;
    assert_eq!(a.text(), "true");
    assert_eq!(
        h.instances("redis"),
        vec![("ext-2".to_owned(), "redis-1".to_owned())]
    );
    put(
        &r,
        "/v1/catalog/deregister",
        json!({"Node": "ext-2", "CheckID": "node-ok"}),
    )
    .await;
    assert_eq!(
        get(&r, "/v1/health/service/redis?passing")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    put(&r, "/v1/catalog/deregister", json!({"Node": "ext-2"})).await;
    assert_eq!(get(&r, "/v1/health/service/redis").await.json(), json!([]));
    let a = put(&r, "/v1/catalog/deregister", json!({"Node": "never-there"})).await;
    assert_eq!(a.text(), "true");
}

// ---- blocking queries ----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn index_absent_or_zero_never_blocks() {
    let (r, _h) = app();
    let start = Instant::now();
    get(&r, "/v1/health/service/web?wait=1m").await;
    get(&r, "/v1/health/service/web?index=0&wait=1m").await;
    get(&r, "/v1/catalog/services?index=0").await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn blocking_query_wakes_on_change_with_a_higher_index() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    let first = get(&r, "/v1/health/service/web").await;
    let index = first.index();
    let r2 = r.clone();
    let waiter = tokio::spawn(async move {
        get(
            &r2,
            &format!("/v1/health/service/web?index={index}&wait=2m"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!waiter.is_finished(), "blocks while nothing changes");
    let changed_at = h
        .set_check_status("web-1-ttl", CheckStatus::Passing, "")
        .expect("pass");
    let a = waiter.await.expect("join");
    assert_eq!(a.index(), changed_at);
    assert!(a.index() > index);
    assert_eq!(a.json()[0]["Checks"][1]["Status"], "passing");
}

#[tokio::test(start_paused = true)]
async fn a_change_to_one_service_does_not_wake_another() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    h.register(ServiceRegistration::new("db").port(5432))
        .expect("register");
    let db = get(&r, "/v1/health/service/db").await;
    let db_index = db.index();
    let start = Instant::now();
    let r2 = r.clone();
    let waiter = tokio::spawn(async move {
        get(
            &r2,
            &format!("/v1/health/service/db?index={db_index}&wait=30s"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.set_check_status("web-1-ttl", CheckStatus::Passing, "")
        .expect("pass");
    h.register(web("web-2", 8081)).expect("register");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished(), "db's watcher is not woken by web");
    assert_eq!(h.service_index("db"), db_index);
    assert!(h.service_index("web") > db_index);
    let a = waiter.await.expect("join");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_secs(30), "{waited:?}");
    assert_eq!(a.index(), db_index, "timed out: same index");
    assert_eq!(a.body, db.body, "timed out: same body");
}

#[tokio::test(start_paused = true)]
async fn default_wait_is_five_minutes_plus_jitter() {
    let (r, _h) = app();
    let index = get(&r, "/v1/catalog/services").await.index();
    let start = Instant::now();
    let a = get(&r, &format!("/v1/catalog/services?index={index}")).await;
    let waited = start.elapsed();
    let wait = Duration::from_secs(300);
    assert!(waited >= wait && waited < wait + wait / 16, "{waited:?}");
    assert_eq!(a.index(), index);
}

#[tokio::test(start_paused = true)]
async fn wait_is_capped_at_ten_minutes() {
    let (r, _h) = app();
    let index = get(&r, "/v1/catalog/services").await.index();
    let start = Instant::now();
    get(&r, &format!("/v1/catalog/services?index={index}&wait=1h")).await;
    let waited = start.elapsed();
    let cap = Duration::from_secs(600);
    assert!(waited >= cap && waited < cap + cap / 16, "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn jitter_is_random_and_below_a_sixteenth() {
    let (r, _h) = app();
    let index = get(&r, "/v1/catalog/services").await.index();
    let mut waits = BTreeSet::new();
    for _ in 0..8 {
        let start = Instant::now();
        get(&r, &format!("/v1/catalog/services?index={index}&wait=16s")).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(16) && waited < Duration::from_secs(17),
            "{waited:?}"
        );
        waits.insert(waited);
    }
    assert!(waits.len() > 1, "the extra wait varies: {waits:?}");
}

#[tokio::test(start_paused = true)]
async fn an_older_index_answers_at_once() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    let current = get(&r, "/v1/health/service/web").await.index();
    let start = Instant::now();
    let a = get(&r, &format!("/v1/health/service/web?index={}", current - 1)).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(a.index(), current);
}

#[tokio::test(start_paused = true)]
async fn malformed_blocking_parameters_are_400() {
    let (r, _h) = app();
    let cases = [
        ("/v1/health/service/web?index=abc", "Invalid index"),
        (
            "/v1/health/service/web?index=1&wait=10",
            "Invalid wait time",
        ),
        ("/v1/catalog/services?wait=forever", "Invalid wait time"),
        (
            "/v1/catalog/services?stale&consistent",
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ),
        ("/v1/agent/connect/ca/roots?index=-5", "Invalid index"),
    ];
    for (uri, text) in cases {
        let a = get(&r, uri).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(a.text(), text, "{uri}");
    }
    let a = get(&r, "/v1/catalog/services?stale").await;
    assert_eq!(a.header("X-Consul-Effective-Consistency"), Some("stale"));
    let a = get(&r, "/v1/catalog/services?consistent").await;
    assert_eq!(
        a.header("X-Consul-Effective-Consistency"),
        Some("consistent")
    );
}

#[tokio::test(start_paused = true)]
async fn health_changes_do_not_move_the_catalog_index() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    let catalog = get(&r, "/v1/catalog/services").await.index();
    let health = get(&r, "/v1/health/service/web").await.index();
    h.set_check_status("web-1-ttl", CheckStatus::Passing, "")
        .expect("pass");
    assert_eq!(get(&r, "/v1/catalog/services").await.index(), catalog);
    assert!(get(&r, "/v1/health/service/web").await.index() > health);
    // Idempotent writes take no index.
    let before = h.index();
    h.register(web("web-1", 8080)).expect("same again");
    h.set_check_status("web-1-ttl", CheckStatus::Passing, "")
        .expect("same status");
    assert_eq!(h.index(), before);
    // A tag change does.
    h.register(web("web-1", 8080).tag("new")).expect("retag");
    assert!(get(&r, "/v1/catalog/services").await.index() > catalog);
}

#[tokio::test(start_paused = true)]
async fn catalog_services_watch_wakes_on_register_and_deregister() {
    let (r, h) = app();
    let index = get(&r, "/v1/catalog/services").await.index();
    let r2 = r.clone();
    let waiter =
        tokio::spawn(async move { get(&r2, &format!("/v1/catalog/services?index={index}")).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.register(web("web-1", 8080)).expect("register");
    let a = waiter.await.expect("join");
    assert!(a.index() > index);
    assert!(a.json().get("web").is_some());
    let index = a.index();
    let r2 = r.clone();
    let waiter =
        tokio::spawn(async move { get(&r2, &format!("/v1/catalog/services?index={index}")).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.deregister("web-1").expect("deregister");
    let a = waiter.await.expect("join");
    assert!(a.index() > index);
    assert!(a.json().get("web").is_none());
}

#[tokio::test(start_paused = true)]
async fn deregistration_wakes_health_watchers_and_index_stays_above_zero() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    let index = get(&r, "/v1/health/service/web").await.index();
    let r2 = r.clone();
    let waiter =
        tokio::spawn(
            async move { get(&r2, &format!("/v1/health/service/web?index={index}")).await },
        );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at = h.deregister("web-1").expect("deregister");
    let a = waiter.await.expect("join");
    assert_eq!(a.json(), json!([]));
    assert_eq!(
        a.index(),
        at,
        "an extinct service answers the extinction index"
    );
}

#[tokio::test(start_paused = true)]
async fn rewinding_the_index_wakes_everyone_with_a_lower_index() {
    let (r, h) = app();
    for i in 0..5 {
        h.register(web(&format!("web-{i}"), 8080 + i))
            .expect("register");
    }
    let index = get(&r, "/v1/health/service/web").await.index();
    assert!(index > 3);
    let r2 = r.clone();
    let waiter =
        tokio::spawn(
            async move { get(&r2, &format!("/v1/health/service/web?index={index}")).await },
        );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    h.faults().rewind_index(2);
    let a = waiter.await.expect("join");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "restore wakes blocked queries at once"
    );
    assert_eq!(a.index(), 2, "the index went backwards");
    // A client that keeps its old, higher index now waits for its whole wait.
    let start = Instant::now();
    let a = get(
        &r,
        &format!("/v1/health/service/web?index={index}&wait=20s"),
    )
    .await;
    assert!(start.elapsed() >= Duration::from_secs(20));
    assert_eq!(a.index(), 2);
    // Later writes count up from the rewound index.
    let next = h.register(web("web-9", 9999)).expect("register");
    assert_eq!(next, 3);
    h.faults().rewind_index(0);
    assert_eq!(
        get(&r, "/v1/health/service/web").await.index(),
        1,
        "never 0"
    );
}

#[tokio::test(start_paused = true)]
async fn ttl_checks_expire_to_critical() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    h.set_check_status("web-1-ttl", CheckStatus::Passing, "")
        .expect("pass");
    // Refresh over HTTP (re-arms the 30s TTL).
    tokio::time::sleep(Duration::from_secs(20)).await;
    send(&r, "PUT", "/v1/agent/check/pass/web-1-ttl", None, None).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(h.check_status("web-1-ttl"), Some(CheckStatus::Passing));
    let index = get(&r, "/v1/health/service/web").await.index();
    let a = get(&r, &format!("/v1/health/service/web?index={index}")).await;
    assert_eq!(h.check_status("web-1-ttl"), Some(CheckStatus::Critical));
    assert_eq!(a.json()[0]["Checks"][1]["Output"], "TTL expired");
}

// ---- ACLs ------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn acls_answer_403_as_consul() {
    let (r, h) = DevCatalog::builder()
        .management_token("root")
        .acl_token("reader", TokenPolicy::read_only())
        .build_for_test();
    h.register(web("web-1", 8080)).expect("register");
    let a = send(&r, "GET", "/v1/catalog/services", None, Some("wrong")).await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::FORBIDDEN, "ACL not found")
    );
    // Query options are checked before the token, as in Consul.
    let a = send(
        &r,
        "GET",
        "/v1/catalog/services?index=abc",
        None,
        Some("wrong"),
    )
    .await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::BAD_REQUEST, "Invalid index")
    );
    let a = get(&r, "/v1/health/service/web").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.text().starts_with("Permission denied"), "{}", a.text());
    let a = send(&r, "GET", "/v1/health/service/web", None, Some("root")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("X-Consul-Default-ACL-Policy"), Some("deny"));
    let a = send(&r, "GET", "/v1/health/service/web", None, Some("reader")).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = send(
        &r,
        "GET",
        "/v1/agent/connect/ca/leaf/web",
        None,
        Some("reader"),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(
        a.text()
            .contains("lacks permission 'service:write' on \"web\""),
        "{}",
        a.text()
    );
    let a = send(
        &r,
        "PUT",
        "/v1/agent/service/register",
        Some(json!({"Name": "x"})),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = send(
        &r,
        "PUT",
        "/v1/agent/service/register",
        Some(json!({"Name": "x"})),
        Some("root"),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    // Bearer and ?token= work too.
    let req = Request::builder()
        .uri("/v1/catalog/services")
        .header("Authorization", "Bearer root")
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        r.clone().oneshot(req).await.expect("ok").status(),
        StatusCode::OK
    );
    assert_eq!(
        get(&r, "/v1/catalog/services?token=root").await.status,
        StatusCode::OK
    );
    // Roots and status need no token.
    assert_eq!(
        get(&r, "/v1/agent/connect/ca/roots").await.status,
        StatusCode::OK
    );
    assert_eq!(get(&r, "/v1/status/leader").await.status, StatusCode::OK);
    h.remove_acl_token("reader");
    let a = send(&r, "GET", "/v1/health/service/web", None, Some("reader")).await;
    assert_eq!(a.text(), "ACL not found");
}

#[tokio::test(start_paused = true)]
async fn filter_mode_filters_anonymous_list_reads() {
    let (r, h) = DevCatalog::builder()
        .management_token("root")
        .anonymous_reads(AnonymousReads::Filter)
        .acl_token(
            "web-only",
            TokenPolicy::none().service_read("web").node_read(),
        )
        .build_for_test();
    h.register(web("web-1", 8080)).expect("register");
    let a = get(&r, "/v1/health/service/web").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json(), json!([]));
    assert_eq!(a.header("X-Consul-Results-Filtered-By-ACLs"), Some("true"));
    let a = send(&r, "GET", "/v1/catalog/services", None, Some("web-only")).await;
    assert_eq!(keys(&a.json()), set(&["web"]));
    assert_eq!(a.header("X-Consul-Results-Filtered-By-ACLs"), Some("true"));
}

// ---- Connect ---------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn roots_and_leaf_shapes() {
    let (r, h) = app();
    let a = get(&r, "/v1/agent/connect/ca/roots").await;
    let v = a.json();
    assert_eq!(keys(&v), set(&["ActiveRootID", "TrustDomain", "Roots"]));
    assert_eq!(v["TrustDomain"], h.trust_domain());
    let root = &v["Roots"][0];
    assert_eq!(
        keys(root),
        set(&[
            "ID",
            "Name",
            "SerialNumber",
            "SigningKeyID",
            "ExternalTrustDomain",
            "NotBefore",
            "NotAfter",
            "RootCert",
            "IntermediateCerts",
            "Active",
            "PrivateKeyType",
            "PrivateKeyBits",
            "RotatedOutAt",
            "CreateIndex",
            "ModifyIndex"
        ])
    );
    assert_eq!(root["ID"], v["ActiveRootID"]);
    assert_eq!(root["Active"], true);
    assert_eq!(root["IntermediateCerts"], json!([]));
    assert!(
        root["RootCert"]
            .as_str()
            .expect("pem")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert_eq!(a.index(), root["ModifyIndex"].as_u64().expect("index"));
    assert_eq!(get(&r, "/v1/connect/ca/roots").await.json(), v);

    let a = get(&r, "/v1/agent/connect/ca/leaf/web").await;
    let leaf = a.json();
    assert_eq!(
        keys(&leaf),
        set(&[
            "SerialNumber",
            "CertPEM",
            "PrivateKeyPEM",
            "Service",
            "ServiceURI",
            "ValidAfter",
            "ValidBefore",
            "CreateIndex",
            "ModifyIndex"
        ])
    );
    assert_eq!(leaf["Service"], "web");
    assert_eq!(
        leaf["ServiceURI"],
        format!("spiffe://{}/ns/default/dc/dc1/svc/web", h.trust_domain())
    );
    assert_eq!(a.index(), leaf["ModifyIndex"].as_u64().expect("index"));
    // Cached: the same leaf again.
    assert_eq!(get(&r, "/v1/agent/connect/ca/leaf/web").await.json(), leaf);
}

#[tokio::test(start_paused = true)]
async fn roots_and_leaf_block_and_wake_on_rotation() {
    let (r, h) = app();
    let roots = get(&r, "/v1/agent/connect/ca/roots").await;
    let leaf = get(&r, "/v1/agent/connect/ca/leaf/web").await;
    let (ri, li) = (roots.index(), leaf.index());
    let r2 = r.clone();
    let roots_waiter =
        tokio::spawn(
            async move { get(&r2, &format!("/v1/agent/connect/ca/roots?index={ri}")).await },
        );
    let r3 = r.clone();
    let leaf_waiter = tokio::spawn(async move {
        get(&r3, &format!("/v1/agent/connect/ca/leaf/web?index={li}")).await
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!roots_waiter.is_finished() && !leaf_waiter.is_finished());
    let new_root = h.rotate_ca().expect("rotate");
    let roots2 = roots_waiter.await.expect("join").json();
    assert_eq!(roots2["ActiveRootID"], new_root.id);
    assert_eq!(roots2["Roots"].as_array().map(Vec::len), Some(2));
    assert_eq!(roots2["Roots"][0]["Active"], false);
    assert_ne!(roots2["Roots"][0]["RotatedOutAt"], "0001-01-01T00:00:00Z");
    let leaf2 = leaf_waiter.await.expect("join");
    assert!(leaf2.index() > li);
    assert_ne!(leaf2.json()["SerialNumber"], leaf.json()["SerialNumber"]);
}

#[tokio::test(start_paused = true)]
async fn leaf_is_renewed_before_it_expires() {
    let (r, _h) = DevCatalog::builder()
        .leaf_ttl(Duration::from_secs(100))
        .build_for_test();
    let leaf = get(&r, "/v1/agent/connect/ca/leaf/web").await;
    let start = Instant::now();
    let renewed = get(
        &r,
        &format!(
            "/v1/agent/connect/ca/leaf/web?index={}&wait=10m",
            leaf.index()
        ),
    )
    .await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(60) && waited <= Duration::from_secs(90),
        "renewed between 60% and 90% of the lifetime: {waited:?}"
    );
    assert!(renewed.index() > leaf.index());
    assert_ne!(renewed.json()["SerialNumber"], leaf.json()["SerialNumber"]);
}

// ---- faults --------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn injected_errors_latency_and_lost_leader() {
    let (r, h) = app();
    h.faults().fail_next(2);
    for _ in 0..2 {
        let a = get(&r, "/v1/catalog/services").await;
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(a.text(), NO_LEADER_ERROR);
    }
    assert_eq!(get(&r, "/v1/catalog/services").await.status, StatusCode::OK);
    h.faults().add(
        FaultRule::error(503, "busy")
            .path_prefix("/v1/health/")
            .times(1),
    );
    assert_eq!(get(&r, "/v1/catalog/services").await.status, StatusCode::OK);
    assert_eq!(get(&r, "/v1/health/service/x").await.status.as_u16(), 503);
    assert_eq!(get(&r, "/v1/health/service/x").await.status, StatusCode::OK);

    h.faults().set_latency(Duration::from_millis(250));
    let start = Instant::now();
    get(&r, "/v1/catalog/services").await;
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    h.faults().hang_next(1, Duration::from_secs(7));
    let start = Instant::now();
    assert_eq!(get(&r, "/v1/catalog/services").await.status, StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_millis(7250));
    h.faults().clear();

    h.faults().set_known_leader(false);
    let a = get(&r, "/v1/catalog/services").await;
    assert_eq!(a.header("X-Consul-KnownLeader"), Some("false"));
    assert_eq!(get(&r, "/v1/status/leader").await.json(), json!(""));
    h.faults().clear();
    assert_eq!(
        get(&r, "/v1/status/leader").await.json(),
        json!("127.0.0.1:8300")
    );
    assert_eq!(h.faults().requests(), 11);
    assert_eq!(h.faults().requests_to("/v1/health/"), 2);
}

#[tokio::test(start_paused = true)]
async fn fleet_registration_is_one_index() {
    let (r, h) = DevCatalog::builder()
        .without_consul_service()
        .build_for_test();
    let before = h.index();
    let spec = FleetSpec::new(50, 3).tags(|name, i| vec![format!("{name}-tag"), format!("i{i}")]);
    let at = h.register_fleet(&spec).expect("fleet");
    assert_eq!(at, before + 1);
    let services = get(&r, "/v1/catalog/services").await.json();
    assert_eq!(services.as_object().map(|m| m.len()), Some(50));
    assert_eq!(
        services["svc-00007"],
        json!(["i0", "i1", "i2", "svc-00007-tag"])
    );
    let v = get(&r, "/v1/health/service/svc-00007?passing").await.json();
    let nodes: Vec<&str> = v
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["Node"]["Node"].as_str().expect("node"))
        .collect();
    assert_eq!(nodes, vec!["svc-node-0", "svc-node-1", "svc-node-2"]);
}

#[tokio::test(start_paused = true)]
async fn connect_views_list_native_services_and_proxies() {
    let (r, h) = app();
    h.register(web("web-1", 8080)).expect("register");
    h.register(
        ServiceRegistration::new("api")
            .id("api-1")
            .port(9000)
            .connect_native(true),
    )
    .expect("native");
    let index = get(&r, "/v1/health/connect/web").await.index();
    assert_eq!(get(&r, "/v1/health/connect/web").await.json(), json!([]));
    let r2 = r.clone();
    let waiter =
        tokio::spawn(
            async move { get(&r2, &format!("/v1/health/connect/web?index={index}")).await },
        );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    h.register(
        ServiceRegistration::new("web-sidecar-proxy")
            .id("web-1-sidecar-proxy")
            .port(21000)
            .connect_proxy(ProxyConfig {
                destination_service_name: "web".to_owned(),
                destination_service_id: "web-1".to_owned(),
                local_service_address: "127.0.0.1".to_owned(),
                local_service_port: 8080,
            }),
    )
    .expect("proxy");
    let a = waiter.await.expect("join");
    assert!(a.index() > index);
    let v = a.json();
    assert_eq!(v.as_array().map(Vec::len), Some(1));
    let s = &v[0]["Service"];
    assert_eq!(s["Kind"], "connect-proxy");
    assert_eq!(s["Service"], "web-sidecar-proxy");
    assert_eq!(
        s["Proxy"],
        json!({"DestinationServiceName": "web", "DestinationServiceID": "web-1",
               "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
               "Mode": "", "MeshGateway": {}, "Expose": {}})
    );
    let api = get(&r, "/v1/health/connect/api").await.json();
    assert_eq!(api[0]["Service"]["Connect"], json!({"Native": true}));
    let plain = get(&r, "/v1/health/service/web").await.json();
    assert_eq!(
        plain.as_array().map(Vec::len),
        Some(1),
        "proxies are their own service"
    );
    let cat = get(&r, "/v1/catalog/connect/web").await.json();
    assert_eq!(cat[0]["ServiceKind"], "connect-proxy");
    let bad = put(
        &r,
        "/v1/agent/service/register",
        json!({"Name": "p", "Kind": "connect-proxy", "Port": 1}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.text(),
        "Proxy.DestinationServiceName must be non-empty for Connect proxy services"
    );
}

/// The two large answers are built from cached per-service and per-check pieces; after every
/// kind of write they must equal the answers built from scratch (here: the `?pretty` variants,
/// which never use the pieces).
#[tokio::test]
async fn cached_catalog_and_check_answers_follow_every_write() {
    let (r, h) = app();
    async fn agree(r: &Router, step: &str) {
        for path in ["/v1/catalog/services", "/v1/health/state/any"] {
            let cached = get(r, path).await;
            let fresh = get(r, &format!("{path}?pretty")).await;
            assert_eq!(cached.status, StatusCode::OK, "{step}: {path}");
            assert_eq!(cached.json(), fresh.json(), "{step}: {path}");
            // Asked again without a change: the same bytes.
            assert_eq!(get(r, path).await.body, cached.body, "{step}: {path} again");
        }
    }
    let db = |id: &str, tags: &[&str]| {
        ServiceRegistration::new("db")
            .id(id)
            .port(5432)
            .tags(tags.iter().copied())
            .check(CheckDefinition::ttl(Duration::from_secs(30)).id(format!("{id}-ttl")))
    };
    h.register(web("web-1", 8080)).expect("register");
    h.register(web("web-2", 8081)).expect("register");
    h.register_node(
        NodeRegistration::new("db-node", "127.0.0.5")
            .service(db("db-1", &["primary", "x\"quoted\""]))
            .check(CheckDefinition::ttl(Duration::from_secs(30)).id("node-ttl")),
    )
    .expect("register node");
    agree(&r, "start").await;
    h.set_check_status("web-1-ttl", CheckStatus::Passing, "ok")
        .expect("pass");
    agree(&r, "check passing").await;
    h.register(web("web-2", 8081).tags(["v2"])).expect("retag");
    agree(&r, "one instance re-tagged").await;
    h.register_node(
        NodeRegistration::new("db-node", "127.0.0.5").service(db("db-2", &["replica"])),
    )
    .expect("second db");
    agree(&r, "instance added").await;
    h.deregister_on_node("db-node", "db-1").expect("deregister");
    agree(&r, "instance removed").await;
    h.register_node(
        NodeRegistration::new("db-node", "127.0.0.6").service(
            ServiceRegistration::new("cache")
                .id("db-2")
                .port(6379)
                .tags(["renamed"]),
        ),
    )
    .expect("rename");
    agree(&r, "instance renamed to another service").await;
    h.deregister("web-1").expect("deregister");
    h.deregister("web-2").expect("deregister");
    agree(&r, "service gone").await;
    h.deregister_node("db-node").expect("deregister node");
    agree(&r, "node gone").await;
}
