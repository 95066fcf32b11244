//! The admin listener (`admin.address`; off when unset): health, readiness, the JSON API and
//! Prometheus metrics, on its own socket so that the data plane's entry points never serve them.
//!
//! | path | answer |
//! |---|---|
//! | `GET /ping` | `200 OK` while the process runs |
//! | `GET /ready` | `200` once the first configuration of every enabled provider is applied, else `503` with the providers still awaited; `503` again once shutdown began (draining) |
//! | `GET /api/version` | version, codename, start date |
//! | `GET /api/overview` | counts per resource kind, providers and their reload status, errors |
//! | `GET /api/tcp/routers`, `/api/tcp/routers/{name}` | routers |
//! | `GET /api/tcp/services`, `/api/tcp/services/{name}` | services, with every server's address, weight, health and open connections |
//! | `GET /api/tcp/middlewares`, `/api/tcp/middlewares/{name}` | middlewares |
//! | `GET /api/tcp/serverstransports`, `/api/tcp/serverstransports/{name}` | servers transports, secrets redacted |
//! | `GET /api/errors` | every configuration error in force |
//! | `GET /metrics` | Prometheus text exposition |

pub mod api;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tagway_config::StaticConfig;
use tokio::net::TcpListener;

use crate::observability::{Observability, time};
use crate::server::GatewayHandle;

pub use api::{REDACTED, redact};

/// The admin listener cannot be bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// `admin.address` cannot be read.
    #[error("admin.address {address:?}: {message}")]
    Address {
        /// The address as written.
        address: String,
        /// What is wrong.
        message: String,
    },
    /// The listener cannot be bound.
    #[error("admin.address {address}: cannot listen: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The error.
        source: io::Error,
    },
}

/// Binds `admin.address` (`host:port`, `[v6]:port`, or `:port` for every address).
pub async fn bind(address: &str) -> Result<TcpListener, AdminError> {
    let candidates =
        crate::entrypoint::parse_address("admin", address).map_err(|e| AdminError::Address {
            address: address.to_owned(),
            message: e.to_string(),
        })?;
    let mut last = None;
    for a in candidates {
        match TcpListener::bind(a).await {
            Ok(l) => return Ok(l),
            Err(source) => last = Some(AdminError::Bind { address: a, source }),
        }
    }
    Err(last.unwrap_or_else(|| AdminError::Address {
        address: address.to_owned(),
        message: "no address".into(),
    }))
}

/// What the admin handlers read.
#[derive(Clone, Debug)]
pub struct AdminState {
    obs: Observability,
    gateway: GatewayHandle,
    static_cfg: Arc<StaticConfig>,
}

impl AdminState {
    /// State over the observability hub, the running gateway and its static configuration.
    pub fn new(obs: Observability, gateway: GatewayHandle, static_cfg: Arc<StaticConfig>) -> Self {
        AdminState {
            obs,
            gateway,
            static_cfg,
        }
    }

    fn snapshot(&self) -> api::Snapshot {
        api::Snapshot::take(&self.obs, self.gateway.tables(), &self.static_cfg)
    }
}

type S = State<Arc<AdminState>>;

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/ready", get(ready))
        .route("/api/version", get(version))
        .route("/api/overview", get(overview))
        .route("/api/rawdata", get(rawdata))
        .route("/api/tcp/routers", get(routers))
        .route("/api/tcp/routers/{name}", get(router_one))
        .route("/api/tcp/services", get(services))
        .route("/api/tcp/services/{name}", get(service_one))
        .route("/api/tcp/middlewares", get(middlewares))
        .route("/api/tcp/middlewares/{name}", get(middleware_one))
        .route("/api/tcp/serverstransports", get(transports))
        .route("/api/tcp/serverstransports/{name}", get(transport_one))
        .route("/api/errors", get(errors))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(Arc::new(state))
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(address = %a, "admin API listening");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `admin.address` when the static configuration sets it and serves the admin API there in
/// a task until `shutdown` resolves. Returns the bound address and the task (None when `admin` is
/// unset). Must be called inside a tokio runtime.
pub async fn spawn_if_configured(
    static_cfg: Arc<StaticConfig>,
    obs: Observability,
    gateway: GatewayHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Option<(SocketAddr, tokio::task::JoinHandle<io::Result<()>>)>, AdminError> {
    let Some(admin) = &static_cfg.admin else {
        return Ok(None);
    };
    if admin.address.trim().is_empty() {
        return Ok(None);
    }
    let listener = bind(&admin.address).await?;
    let addr = listener
        .local_addr()
        .map_err(|source| AdminError::Address {
            address: admin.address.clone(),
            message: source.to_string(),
        })?;
    let state = AdminState::new(obs, gateway, static_cfg.clone());
    Ok(Some((addr, tokio::spawn(serve(listener, state, shutdown)))))
}

fn json_response(status: StatusCode, mut v: Value) -> Response {
    redact(&mut v);
    let body = serde_json::to_string(&v).unwrap_or_else(|_| "{}".into());
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

fn ok(v: Value) -> Response {
    json_response(StatusCode::OK, v)
}

fn missing(kind: &str, name: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({ "message": format!("{kind} {name} not found") }),
    )
}

async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({ "message": "404 page not found" }),
    )
}

async fn ping() -> &'static str {
    "OK"
}

async fn ready(State(s): S) -> Response {
    if s.gateway.is_draining() {
        // Shutting down: load balancers should stop sending new clients here.
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ready": false, "draining": true }),
        )
    } else if s.obs.is_ready() {
        ok(json!({ "ready": true }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "ready": false,
                "waitingFor": s.obs.waiting_for(),
                "applied": s.obs.applied_count(),
            }),
        )
    }
}

async fn version(State(s): S) -> Response {
    ok(json!({
        "Version": env!("CARGO_PKG_VERSION"),
        "Codename": "tagway",
        "startDate": time::rfc3339_millis(s.obs.started()),
    }))
}

async fn overview(State(s): S) -> Response {
    let snap = s.snapshot();
    let providers: Vec<Value> = s
        .obs
        .providers()
        .into_iter()
        .map(|p| {
            json!({
                "name": p.name,
                "enabled": p.expected,
                "reloads": p.reloads,
                "failures": p.failures,
                "lastReload": p.last_success.map(time::rfc3339_millis),
                "lastError": p.last_error,
                "routers": p.routers,
                "services": p.services,
                "middlewares": p.middlewares,
                "serversTransports": p.servers_transports,
            })
        })
        .collect();
    let names: Vec<&Value> = providers.iter().map(|p| &p["name"]).collect();
    let applied = s.obs.applied_config().map(|(_, t)| time::rfc3339_millis(t));
    ok(json!({
        "tcp": snap.overview_tcp(),
        "entryPoints": snap.entry_points,
        "providers": names,
        "providerStatus": providers,
        "errors": snap.errors.len(),
        "ready": s.obs.is_ready(),
        "configuration": {
            "applied": s.obs.applied_count(),
            "lastApplied": applied,
        },
        "features": {
            "accessLog": s.obs.access_log().is_some(),
            "metrics": "prometheus",
        },
    }))
}

async fn rawdata(State(s): S) -> Response {
    let snap = s.snapshot();
    let by_name = |v: Vec<Value>| -> Value {
        Value::Object(
            v.into_iter()
                .map(|x| (x["name"].as_str().unwrap_or_default().to_owned(), x))
                .collect(),
        )
    };
    ok(json!({
        "tcpRouters": by_name(snap.routers()),
        "tcpServices": by_name(snap.services()),
        "tcpMiddlewares": by_name(snap.middlewares()),
        "tcpServersTransports": by_name(snap.servers_transports()),
    }))
}

async fn routers(State(s): S) -> Response {
    ok(Value::Array(s.snapshot().routers()))
}

async fn router_one(State(s): S, Path(name): Path<String>) -> Response {
    match s.snapshot().router(&name) {
        Some(v) => ok(v),
        None => missing("router", &name),
    }
}

async fn services(State(s): S) -> Response {
    ok(Value::Array(s.snapshot().services()))
}

async fn service_one(State(s): S, Path(name): Path<String>) -> Response {
    match s.snapshot().service(&name) {
        Some(v) => ok(v),
        None => missing("service", &name),
    }
}

async fn middlewares(State(s): S) -> Response {
    ok(Value::Array(s.snapshot().middlewares()))
}

async fn middleware_one(State(s): S, Path(name): Path<String>) -> Response {
    match s
        .snapshot()
        .middlewares()
        .into_iter()
        .find(|m| m["name"] == name.as_str())
    {
        Some(v) => ok(v),
        None => missing("middleware", &name),
    }
}

async fn transports(State(s): S) -> Response {
    ok(Value::Array(s.snapshot().servers_transports()))
}

async fn transport_one(State(s): S, Path(name): Path<String>) -> Response {
    match s
        .snapshot()
        .servers_transports()
        .into_iter()
        .find(|m| m["name"] == name.as_str())
    {
        Some(v) => ok(v),
        None => missing("serversTransport", &name),
    }
}

async fn errors(State(s): S) -> Response {
    ok(json!(s.obs.errors()))
}

async fn metrics(State(s): S) -> Response {
    let text = s.obs.render_metrics(
        &s.gateway,
        s.static_cfg.entry_points.keys().map(String::as_str),
    );
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
