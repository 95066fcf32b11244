//! The HTTP API (axum on hyper), the accept loop with per-connection abort (for dropped
//! connection faults) and graceful shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::acl::{Acl, AclDenied, Authorizer, Perm};
use super::blocking::{
    BadRequest, Consistency, Params, ReadOptions, any_changed, blocking_query, jitter,
    parse_read_options,
};
use super::error::CatalogError;
use super::fault::{FaultAction, FaultState};
use super::json::{
    AgentHealthJson, AgentServiceJson, CatalogNodeJson, CatalogServiceJson, CheckJson, DecodeError,
    HealthEntryJson, LeafJson, NodeJson, RootsJson, ServiceJson, decode_agent_check,
    decode_catalog_deregister, decode_catalog_register, decode_check_update, decode_service,
    parse_body, to_body,
};
use super::model::CheckStatus;
use super::state::{
    CONSUL_VERSION, CheckPiece, CheckRec, Fragments, Key, NodeEntry, NodeRec,
    State as CatalogState, Store, TtlError,
};
use super::util::{parse_go_bool, uuid_v4};

/// Configuration the handlers need.
pub(crate) struct HttpConfig {
    pub(crate) datacenter: String,
    pub(crate) node_name: String,
    pub(crate) node_id: String,
    pub(crate) server_addr: String,
    pub(crate) leaf_ttl: Duration,
}

/// Everything the handlers share.
pub(crate) struct Shared {
    pub(crate) store: Arc<Store>,
    pub(crate) acl: Acl,
    pub(crate) faults: Arc<FaultState>,
    pub(crate) cfg: HttpConfig,
}

type AppState = Arc<Shared>;

/// Closes the request's connection (inserted into every request by the accept loop).
#[derive(Clone)]
pub(crate) struct ConnAbort(Arc<Notify>);

/// An error answer.
pub(crate) enum ApiError {
    Text(StatusCode, String),
    Acl(AclDenied),
}

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError::Text(StatusCode::BAD_REQUEST, msg.into())
    }

    fn not_found(msg: impl Into<String>) -> Self {
        ApiError::Text(StatusCode::NOT_FOUND, msg.into())
    }

    fn internal(msg: impl Into<String>) -> Self {
        ApiError::Text(StatusCode::INTERNAL_SERVER_ERROR, msg.into())
    }
}

impl From<AclDenied> for ApiError {
    fn from(e: AclDenied) -> Self {
        ApiError::Acl(e)
    }
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        ApiError::bad(e.0)
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Malformed(msg) => ApiError::bad(format!("Request decode failed: {msg}")),
            DecodeError::Invalid { status, body } => ApiError::Text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                body,
            ),
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::InvalidRegistration { reason, .. } => ApiError::bad(reason),
            CatalogError::UnknownService { service_id, .. } => ApiError::not_found(format!(
                "Unknown service ID {service_id:?}. Ensure that the service ID is passed, not the service name."
            )),
            CatalogError::UnknownCheck { check_id, .. } => ApiError::not_found(format!(
                "Unknown check ID {check_id:?}. Ensure that the check ID is passed, not the check name."
            )),
            CatalogError::UnknownNode { node } => {
                ApiError::not_found(format!("Unknown node {node:?}"))
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut r = Response::new(Body::from(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Text(status, body) => text(status, body),
            ApiError::Acl(denied) => text(StatusCode::FORBIDDEN, denied.body()),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// What a read answer carries in its headers.
struct ReadMeta {
    index: Option<u64>,
    filtered: bool,
    consistency: Consistency,
    cached: bool,
}

impl Shared {
    fn token<'a>(&self, headers: &'a HeaderMap, params: &'a Params) -> Option<&'a str> {
        if let Some(t) = headers.get("X-Consul-Token").and_then(|v| v.to_str().ok())
            && !t.is_empty()
        {
            return Some(t);
        }
        if let Some(auth) = headers.get("Authorization").and_then(|v| v.to_str().ok()) {
            let auth = auth.trim();
            if auth.len() > 7 && auth[..7].eq_ignore_ascii_case("bearer ") {
                return Some(auth[7..].trim());
            }
        }
        params.get("token").filter(|t| !t.is_empty())
    }

    fn authorize(&self, headers: &HeaderMap, params: &Params) -> Result<Authorizer, ApiError> {
        Ok(self.acl.resolve(self.token(headers, params))?)
    }

    fn check_dc(&self, dc: Option<&str>) -> Result<(), ApiError> {
        match dc.filter(|d| !d.is_empty()) {
            Some(d) if d != self.cfg.datacenter => Err(ApiError::internal("No path to datacenter")),
            _ => Ok(()),
        }
    }

    /// The common start of a read: datacenter, token, filter, consistency, wait, index.
    fn begin_read(
        &self,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<(ReadOptions, Authorizer), ApiError> {
        // Consul parses the query options first; datacenter routing and the token are
        // resolved afterwards.
        let opts = parse_read_options(params)?;
        if params.get("filter").is_some_and(|f| !f.is_empty()) {
            return Err(ApiError::bad(
                "Failed to create boolean expression evaluator: filter expressions (?filter=) are not supported by the tagway dev catalog",
            ));
        }
        self.check_dc(params.get("dc"))?;
        let authz = self.authorize(headers, params)?;
        Ok((opts, authz))
    }

    /// The answer of a blocking read.
    fn blocking_answer(
        &self,
        opts: &ReadOptions,
        index: u64,
        filtered: bool,
        body: Bytes,
    ) -> Response {
        self.read_response(
            ReadMeta {
                index: Some(index),
                filtered,
                consistency: opts.consistency,
                cached: opts.cached,
            },
            body,
        )
    }

    fn read_response(&self, meta: ReadMeta, body: Bytes) -> Response {
        let mut r = Response::new(Body::from(body));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(index) = meta.index {
            set(h, "X-Consul-Index", &index.max(1).to_string());
        }
        self.leader_headers(h);
        set(
            h,
            "X-Consul-Effective-Consistency",
            meta.consistency.header(),
        );
        set(
            h,
            "X-Consul-Default-ACL-Policy",
            if self.acl.enabled() { "deny" } else { "allow" },
        );
        if meta.filtered {
            set(h, "X-Consul-Results-Filtered-By-ACLs", "true");
        }
        if meta.cached {
            set(h, "X-Cache", "MISS");
        }
        r
    }

    fn leader_headers(&self, h: &mut HeaderMap) {
        set(
            h,
            "X-Consul-KnownLeader",
            if self.faults.known_leader() {
                "true"
            } else {
                "false"
            },
        );
        set(h, "X-Consul-LastContact", "0");
    }

    fn simple_json<T: Serialize + ?Sized>(&self, value: &T, params: &Params) -> Response {
        self.json_bytes(to_body(value, params.has("pretty")))
    }

    /// A JSON answer for an endpoint without blocking support.
    fn json_bytes(&self, body: Bytes) -> Response {
        let mut r = Response::new(Body::from(body));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.leader_headers(r.headers_mut());
        r
    }
}

fn parse_node_meta(params: &Params) -> Vec<(String, String)> {
    params
        .all("node-meta")
        .into_iter()
        .map(|kv| match kv.split_once(':') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect()
}

fn node_meta_ok(node: &NodeRec, filters: &[(String, String)]) -> bool {
    filters
        .iter()
        .all(|(k, v)| node.meta.get(k).is_some_and(|x| x == v))
}

fn has_tags(tags: &[String], wanted: &[&str]) -> bool {
    wanted
        .iter()
        .all(|w| tags.iter().any(|t| t.eq_ignore_ascii_case(w)))
}

fn bool_param(params: &Params, key: &str) -> Result<bool, ApiError> {
    match params.get(key) {
        None => Ok(false),
        Some("") => Ok(true),
        Some(v) => {
            parse_go_bool(v).ok_or_else(|| ApiError::bad(format!("Invalid value for ?{key}")))
        }
    }
}

// ---- reads: catalog ---------------------------------------------------------------------

async fn catalog_services(State(sh): State<AppState>, headers: HeaderMap, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require_list_read(Perm::ServiceRead(""))?;
    let node_meta = parse_node_meta(&p);
    let pretty = p.has("pretty");
    let cacheable = authz.sees_everything() && node_meta.is_empty() && !pretty;
    let generation = sh.store.generation();
    let store = sh.store.clone();
    let (index, (body, filtered)) =
        blocking_query(&sh.store, &opts, &[Key::Services], |st, idx| {
            let index = idx[0];
            let mut cache = store
                .services_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if cacheable
                && let Some((i, g, _, body)) = cache.as_ref()
                && *i == index
                && *g == generation
            {
                return (index, (body.clone(), false));
            }
            if cacheable {
                let mut frags = store.fragments.lock().unwrap_or_else(|e| e.into_inner());
                let body = services_body_from_fragments(st, &mut frags);
                *cache = Some((index, generation, false, body.clone()));
                return (index, (body, false));
            }
            let mut filtered = false;
            let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (name, insts) in &st.by_name {
                if !authz.can(Perm::ServiceRead(name)) {
                    filtered = true;
                    continue;
                }
                let mut tags: BTreeSet<&str> = BTreeSet::new();
                let mut any = false;
                for (entry, svc) in st.instances(Some(insts)) {
                    if !node_meta_ok(&entry.node, &node_meta) {
                        continue;
                    }
                    any = true;
                    tags.extend(svc.tags.iter().map(String::as_str));
                }
                if any {
                    out.insert(name, tags.into_iter().collect());
                }
            }
            (index, (to_body(&out, pretty), filtered))
        })
        .await;
    Ok(sh.blocking_answer(&opts, index, filtered, body))
}

/// The body of `/v1/catalog/services` for a reader that sees every service, with no node-meta
/// filter: each service's `"name":["tag",…]` is serialized again only after a write touched
/// the service (see [`Fragments`]). The same bytes as serializing the whole map.
fn services_body_from_fragments(st: &CatalogState, frags: &mut Fragments) -> Bytes {
    if !frags.services_ready {
        // The first answer (or the first after a rewind): every service is to be serialized.
        frags.services.clear();
        frags.dirty = st.by_name.keys().cloned().collect();
        frags.services_ready = true;
    }
    for name in std::mem::take(&mut frags.dirty) {
        let mut tags: BTreeSet<&str> = BTreeSet::new();
        let mut listed = false;
        for (_, svc) in st.instances(st.by_name.get(&name)) {
            listed = true;
            tags.extend(svc.tags.iter().map(String::as_str));
        }
        if !listed {
            frags.services.remove(&name);
            continue;
        }
        let mut json = serde_json::to_vec(&name).unwrap_or_default();
        json.push(b':');
        // Serializing a set of strings into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut json, &tags);
        frags.services.insert(name, json);
    }
    let mut out = Vec::with_capacity(frags.services_len + 2);
    out.push(b'{');
    for json in frags.services.values() {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(json);
    }
    out.push(b'}');
    frags.services_len = out.len();
    Bytes::from(out)
}

/// The body of `/v1/health/state/any` for a reader that sees every check, with no node-meta
/// filter: each check is serialized again only when its record changed (see [`Fragments`]).
/// The same bytes as serializing every check.
fn all_checks_body_from_fragments(st: &CatalogState, frags: &mut Fragments) -> Bytes {
    frags.epoch += 1;
    let epoch = frags.epoch;
    let cache = &mut frags.checks;
    let mut out = Vec::with_capacity(frags.checks_len + 2);
    let mut count = 0usize;
    out.push(b'[');
    for entry in st.nodes.values() {
        for c in entry.checks.values() {
            count += 1;
            let e = cache
                .entry(Arc::as_ptr(c) as usize)
                .or_insert_with(|| CheckPiece {
                    _record: Arc::clone(c),
                    // Serializing these plain structs into a Vec cannot fail.
                    json: serde_json::to_vec(&CheckJson::new(c)).unwrap_or_default(),
                    epoch,
                });
            e.epoch = epoch;
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(&e.json);
        }
    }
    out.push(b']');
    if cache.len() > count {
        cache.retain(|_, e| e.epoch == epoch);
    }
    frags.checks_len = out.len();
    Bytes::from(out)
}

async fn catalog_service(
    State(sh): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    connect: bool,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require_list_read(Perm::ServiceRead(&name))?;
    let tags: Vec<String> = p.all("tag").into_iter().map(str::to_owned).collect();
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let node_meta = parse_node_meta(&p);
    let pretty = p.has("pretty");
    let key = if connect {
        Key::Connect(name.clone())
    } else {
        Key::Service(name.clone())
    };
    let (index, (body, filtered)) = blocking_query(&sh.store, &opts, &[key], |st, idx| {
        let (index, set) = if connect {
            (st.connect_index(&name, idx[0]), st.connect.get(&name))
        } else {
            (st.service_index(&name, idx[0]), st.by_name.get(&name))
        };
        let mut filtered = false;
        let mut out = Vec::new();
        for (entry, svc) in st.instances(set) {
            if !authz.can(Perm::ServiceRead(&svc.name))
                || !authz.can(Perm::NodeRead(&entry.node.name))
            {
                filtered = true;
                continue;
            }
            if !has_tags(&svc.tags, &tag_refs) || !node_meta_ok(&entry.node, &node_meta) {
                continue;
            }
            out.push(CatalogServiceJson::new(&entry.node, svc));
        }
        (index, (to_body(&out, pretty), filtered))
    })
    .await;
    Ok(sh.blocking_answer(&opts, index, filtered, body))
}

async fn catalog_nodes(State(sh): State<AppState>, headers: HeaderMap, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require_list_read(Perm::NodeRead(""))?;
    let node_meta = parse_node_meta(&p);
    let pretty = p.has("pretty");
    let (index, (body, filtered)) = blocking_query(&sh.store, &opts, &[Key::Nodes], |st, idx| {
        let mut filtered = false;
        let mut out = Vec::new();
        for entry in st.nodes.values() {
            if !authz.can(Perm::NodeRead(&entry.node.name)) {
                filtered = true;
                continue;
            }
            if node_meta_ok(&entry.node, &node_meta) {
                out.push(NodeJson::new(&entry.node));
            }
        }
        (idx[0], (to_body(&out, pretty), filtered))
    })
    .await;
    Ok(sh.blocking_answer(&opts, index, filtered, body))
}

async fn catalog_node(
    State(sh): State<AppState>,
    Path(node): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require(Perm::NodeRead(&node))?;
    let pretty = p.has("pretty");
    let (index, body) =
        blocking_query(&sh.store, &opts, &[Key::Nodes, Key::Services], |st, idx| {
            let index = idx[0].max(idx[1]);
            let body = match st.nodes.get(&node) {
                None => to_body(&serde_json::Value::Null, pretty),
                Some(entry) => {
                    let services = entry
                        .services
                        .iter()
                        .filter(|(_, s)| authz.can(Perm::ServiceRead(&s.name)))
                        .map(|(id, s)| (id.as_str(), ServiceJson::new(s)))
                        .collect();
                    to_body(
                        &CatalogNodeJson {
                            node: NodeJson::new(&entry.node),
                            services,
                        },
                        pretty,
                    )
                }
            };
            (index, body)
        })
        .await;
    Ok(sh.blocking_answer(&opts, index, false, body))
}

async fn catalog_datacenters(State(sh): State<AppState>, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    Ok(sh.simple_json(&[sh.cfg.datacenter.as_str()], &p))
}

// ---- reads: health ----------------------------------------------------------------------

fn health_entries<'a>(
    st: &'a CatalogState,
    set: Option<&'a BTreeSet<(String, String)>>,
    authz: &Authorizer,
    passing_only: bool,
    tags: &[&str],
    node_meta: &[(String, String)],
) -> (Vec<HealthEntryJson<'a>>, bool) {
    let mut filtered = false;
    let mut out = Vec::new();
    for (entry, svc) in st.instances(set) {
        if !authz.can(Perm::ServiceRead(&svc.name)) || !authz.can(Perm::NodeRead(&entry.node.name))
        {
            filtered = true;
            continue;
        }
        if !has_tags(&svc.tags, tags) || !node_meta_ok(&entry.node, node_meta) {
            continue;
        }
        let checks = entry.checks_for(&svc.id);
        if passing_only && checks.iter().any(|c| c.status != CheckStatus::Passing) {
            continue;
        }
        out.push(HealthEntryJson {
            node: NodeJson::new(&entry.node),
            service: ServiceJson::new(svc),
            checks: checks.into_iter().map(|c| CheckJson::new(c)).collect(),
        });
    }
    (out, filtered)
}

async fn health_service(
    State(sh): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    connect: bool,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require_list_read(Perm::ServiceRead(&name))?;
    let passing = bool_param(&p, "passing")?;
    let tags: Vec<String> = p.all("tag").into_iter().map(str::to_owned).collect();
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let node_meta = parse_node_meta(&p);
    let pretty = p.has("pretty");
    let key = if connect {
        Key::Connect(name.clone())
    } else {
        Key::Service(name.clone())
    };
    let (index, (body, filtered)) = blocking_query(&sh.store, &opts, &[key], |st, idx| {
        let (index, set) = if connect {
            (st.connect_index(&name, idx[0]), st.connect.get(&name))
        } else {
            (st.service_index(&name, idx[0]), st.by_name.get(&name))
        };
        let (out, filtered) = health_entries(st, set, &authz, passing, &tag_refs, &node_meta);
        (index, (to_body(&out, pretty), filtered))
    })
    .await;
    Ok(sh.blocking_answer(&opts, index, filtered, body))
}

async fn health_checks(
    State(sh): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require_list_read(Perm::ServiceRead(&name))?;
    let pretty = p.has("pretty");
    let (index, (body, filtered)) = blocking_query(
        &sh.store,
        &opts,
        &[Key::Service(name.clone())],
        |st, idx| {
            let mut filtered = false;
            let mut out: Vec<CheckJson<'_>> = Vec::new();
            for (entry, svc) in st.instances(st.by_name.get(&name)) {
                if !authz.can(Perm::ServiceRead(&svc.name)) {
                    filtered = true;
                    continue;
                }
                for c in entry.checks_for(&svc.id) {
                    if c.service_id == svc.id {
                        out.push(CheckJson::new(c));
                    }
                }
            }
            (
                st.service_index(&name, idx[0]),
                (to_body(&out, pretty), filtered),
            )
        },
    )
    .await;
    Ok(sh.blocking_answer(&opts, index, filtered, body))
}

/// The checks of a node that `wanted` selects and the reader may see (`filtered` set when the
/// ACLs hid one of them).
fn visible_checks<'a>(
    entry: &'a NodeEntry,
    authz: &Authorizer,
    filtered: &mut bool,
    wanted: impl Fn(&CheckRec) -> bool,
) -> Vec<&'a CheckRec> {
    let mut out = Vec::new();
    for c in entry.checks.values().filter(|c| wanted(c)) {
        let ok = authz.can(Perm::NodeRead(&entry.node.name))
            && (c.service_name.is_empty() || authz.can(Perm::ServiceRead(&c.service_name)));
        if ok {
            out.push(&**c);
        } else {
            *filtered = true;
        }
    }
    out
}

async fn health_node(
    State(sh): State<AppState>,
    Path(node): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require_list_read(Perm::NodeRead(&node))?;
    let pretty = p.has("pretty");
    let (index, (body, filtered)) = blocking_query(&sh.store, &opts, &[Key::Checks], |st, idx| {
        let mut filtered = false;
        let checks = st
            .nodes
            .get(&node)
            .map(|e| visible_checks(e, &authz, &mut filtered, |_| true))
            .unwrap_or_default();
        let out: Vec<CheckJson<'_>> = checks.into_iter().map(CheckJson::new).collect();
        (idx[0], (to_body(&out, pretty), filtered))
    })
    .await;
    Ok(sh.blocking_answer(&opts, index, filtered, body))
}

async fn health_state(
    State(sh): State<AppState>,
    Path(state): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    let wanted = match state.as_str() {
        "any" => None,
        other => Some(
            CheckStatus::parse(other)
                .ok_or_else(|| ApiError::bad(format!("Invalid check state: {other:?}")))?,
        ),
    };
    authz.require_list_read(Perm::NodeRead(""))?;
    let node_meta = parse_node_meta(&p);
    let pretty = p.has("pretty");
    let cacheable = wanted.is_none() && authz.sees_everything() && node_meta.is_empty() && !pretty;
    let store = sh.store.clone();
    let (index, (body, filtered)) = blocking_query(&sh.store, &opts, &[Key::Checks], |st, idx| {
        if cacheable {
            let mut frags = store.fragments.lock().unwrap_or_else(|e| e.into_inner());
            return (
                idx[0],
                (all_checks_body_from_fragments(st, &mut frags), false),
            );
        }
        let mut filtered = false;
        let mut out: Vec<CheckJson<'_>> = Vec::new();
        for entry in st.nodes.values() {
            if !node_meta_ok(&entry.node, &node_meta) {
                continue;
            }
            let selected = |c: &CheckRec| wanted.is_none_or(|w| w == c.status);
            for c in visible_checks(entry, &authz, &mut filtered, selected) {
                out.push(CheckJson::new(c));
            }
        }
        (idx[0], (to_body(&out, pretty), filtered))
    })
    .await;
    Ok(sh.blocking_answer(&opts, index, filtered, body))
}

// ---- reads: agent -----------------------------------------------------------------------

async fn agent_self(State(sh): State<AppState>, headers: HeaderMap, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    authz.require(Perm::AgentRead)?;
    let c = &sh.cfg;
    let body = serde_json::json!({
        "Config": {
            "Datacenter": c.datacenter,
            "PrimaryDatacenter": c.datacenter,
            "NodeName": c.node_name,
            "NodeID": c.node_id,
            "Revision": "tagway-dev-catalog",
            "Server": true,
            "Version": CONSUL_VERSION,
            "BuildDate": "2024-01-01T00:00:00Z",
        },
        "DebugConfig": {
            "Datacenter": c.datacenter,
            "PrimaryDatacenter": c.datacenter,
            "NodeName": c.node_name,
            "NodeID": c.node_id,
            "ServerMode": true,
            "ConnectEnabled": true,
            "ACLsEnabled": sh.acl.enabled(),
            "DevMode": true,
        },
        "Coord": {"Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "Error": 1.5, "Adjustment": 0.0, "Height": 1e-5},
        "Member": {
            "Name": c.node_name,
            "Addr": c.server_addr.rsplit_once(':').map_or(c.server_addr.as_str(), |(h, _)| h),
            "Port": 8301,
            "Tags": {
                "dc": c.datacenter, "role": "consul", "build": format!("{CONSUL_VERSION}:tagway"),
                "vsn": "2", "vsn_min": "2", "vsn_max": "3", "id": c.node_id, "port": "8300",
                "bootstrap": "1", "expect": "1",
            },
            "Status": 1,
            "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
            "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
        },
        "Stats": {"agent": {"check_monitors": "0", "services": "0"}, "consul": {"server": "true", "leader": "true", "known_datacenters": "1"}},
        "Meta": {"consul-network-segment": "", "consul-version": CONSUL_VERSION},
        "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    });
    Ok(sh.simple_json(&body, &p))
}

async fn agent_services(State(sh): State<AppState>, headers: HeaderMap, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    authz.require_list_read(Perm::ServiceRead(""))?;
    let body = sh.store.with_state(|st| {
        let mut out: BTreeMap<&str, AgentServiceJson<'_>> = BTreeMap::new();
        if let Some(entry) = st.nodes.get(&st.agent_node) {
            for (id, s) in &entry.services {
                if authz.can(Perm::ServiceRead(&s.name)) {
                    out.insert(id, AgentServiceJson::new(s, &st.datacenter, false));
                }
            }
        }
        to_body(&out, p.has("pretty"))
    });
    Ok(sh.json_bytes(body))
}

async fn agent_service(
    State(sh): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    let found = sh.store.with_state(|st| {
        let entry = st.nodes.get(&st.agent_node)?;
        let s = entry.services.get(&id)?;
        Some((
            s.name.clone(),
            format!("{:016x}", s.modify_index),
            to_body(
                &AgentServiceJson::new(s, &st.datacenter, true),
                p.has("pretty"),
            ),
        ))
    });
    let Some((name, hash, body)) = found else {
        return Err(ApiError::not_found(format!("unknown service ID: {id}")));
    };
    authz.require(Perm::ServiceRead(&name))?;
    let mut r = sh.json_bytes(body);
    set(r.headers_mut(), "X-Consul-ContentHash", &hash);
    Ok(r)
}

async fn agent_checks(State(sh): State<AppState>, headers: HeaderMap, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    authz.require_list_read(Perm::NodeRead(""))?;
    let body = sh.store.with_state(|st| {
        let mut filtered = false;
        let out: BTreeMap<&str, CheckJson<'_>> = st
            .nodes
            .get(&st.agent_node)
            .map(|e| visible_checks(e, &authz, &mut filtered, |_| true))
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.id.as_str(), CheckJson::new(c)))
            .collect();
        to_body(&out, p.has("pretty"))
    });
    Ok(sh.json_bytes(body))
}

fn aggregate(checks: &[&std::sync::Arc<CheckRec>]) -> &'static str {
    if checks.iter().any(|c| c.is_maintenance()) {
        "maintenance"
    } else if checks.iter().any(|c| c.status == CheckStatus::Critical) {
        "critical"
    } else if checks.iter().any(|c| c.status == CheckStatus::Warning) {
        "warning"
    } else {
        "passing"
    }
}

fn aggregate_code(status: &str) -> StatusCode {
    match status {
        "passing" => StatusCode::OK,
        "warning" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn agent_health(
    State(sh): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    by_id: bool,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    let text_format = p.get("format") == Some("text");
    let result = sh.store.with_state(|st| {
        let entry = st.nodes.get(&st.agent_node)?;
        let services: Vec<_> = entry
            .services
            .values()
            .filter(|s| if by_id { s.id == key } else { s.name == key })
            .collect();
        if services.is_empty() {
            return None;
        }
        let name = services[0].name.clone();
        let mut worst = StatusCode::OK;
        let mut worst_text = "passing";
        let mut items = Vec::new();
        for s in services {
            let checks: Vec<_> = entry
                .checks_for(&s.id)
                .into_iter()
                .filter(|c| !c.service_id.is_empty() || c.is_maintenance())
                .collect();
            let agg = aggregate(&checks);
            let code = aggregate_code(agg);
            if code.as_u16() > worst.as_u16() {
                worst = code;
                worst_text = agg;
            }
            items.push(AgentHealthJson {
                aggregated_status: agg,
                service: AgentServiceJson::new(s, &st.datacenter, false),
                checks: checks.into_iter().map(|c| CheckJson::new(c)).collect(),
            });
        }
        let body = if by_id {
            to_body(&items[0], p.has("pretty"))
        } else {
            to_body(&items, p.has("pretty"))
        };
        Some((name, worst, worst_text, body))
    });
    let Some((name, code, status_text, body)) = result else {
        let msg = if by_id {
            format!("ServiceId {key} not found")
        } else {
            format!("ServiceName {key} Not Found")
        };
        return Err(ApiError::not_found(msg));
    };
    authz.require(Perm::ServiceRead(&name))?;
    if text_format {
        return Ok(text(code, status_text));
    }
    let mut r = sh.json_bytes(body);
    *r.status_mut() = code;
    Ok(r)
}

// ---- Connect ------------------------------------------------------------------------------

async fn ca_roots(State(sh): State<AppState>, headers: HeaderMap, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, _authz) = sh.begin_read(&headers, &p)?;
    let pretty = p.has("pretty");
    let (index, body) = blocking_query(&sh.store, &opts, &[Key::CaRoots], |st, idx| {
        let roots = st.ca.roots();
        let body = to_body(
            &RootsJson::new(&roots, st.ca.trust_domain(), st.ca.cluster_id()),
            pretty,
        );
        (idx[0], body)
    })
    .await;
    Ok(sh.blocking_answer(&opts, index, false, body))
}

async fn ca_leaf(
    State(sh): State<AppState>,
    Path(service): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (opts, authz) = sh.begin_read(&headers, &p)?;
    authz.require(Perm::ServiceWrite(&service))?;
    let pretty = p.has("pretty");
    let deadline = Instant::now() + opts.wait + jitter(opts.wait);
    let mut abandon = sh.store.abandon_rx();
    let mut finish = false;
    loop {
        // Subscribe before reading: a rotation after this point wakes us.
        let mut rxs = vec![sh.store.subscribe(&Key::CaRoots)];
        let now = Instant::now();
        let ttl = sh.cfg.leaf_ttl;
        let (leaf, renew_at) = sh
            .store
            .write(|st, txn| st.leaf_for(txn, &service, ttl, now))?;
        if finish || opts.min_index == 0 || leaf.modify_index > opts.min_index {
            let body = to_body(&LeafJson::new(&leaf), pretty);
            return Ok(sh.blocking_answer(&opts, leaf.modify_index, false, body));
        }
        tokio::select! {
            () = any_changed(&mut rxs) => {}
            () = sleep_until(renew_at) => {}
            () = sleep_until(deadline) => finish = true,
            _ = abandon.changed() => finish = true,
            () = sh.store.shutdown.cancelled() => finish = true,
        }
    }
}

// ---- status -------------------------------------------------------------------------------

async fn status_leader(State(sh): State<AppState>, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let leader = if sh.faults.known_leader() {
        sh.cfg.server_addr.clone()
    } else {
        String::new()
    };
    Ok(sh.simple_json(&leader, &p))
}

async fn status_peers(State(sh): State<AppState>, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    Ok(sh.simple_json(&[sh.cfg.server_addr.as_str()], &p))
}

// ---- writes -------------------------------------------------------------------------------

fn empty_ok() -> Response {
    Response::new(Body::empty())
}

fn json_true() -> Response {
    let mut r = Response::new(Body::from("true"));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn is_unspecified_address(addr: &str) -> bool {
    addr.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
}

async fn agent_service_register(
    State(sh): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let reg = decode_service(&parse_body(&body)?, true)?;
    if reg.service_name().is_empty() {
        return Err(ApiError::bad("Missing service name"));
    }
    if is_unspecified_address(&reg.address) {
        return Err(ApiError::bad("Invalid service address"));
    }
    let authz = sh.authorize(&headers, &p)?;
    authz.require(Perm::ServiceWrite(reg.service_name()))?;
    let replace = bool_param(&p, "replace-existing-checks")?;
    sh.store.write(|st, txn| -> Result<(), CatalogError> {
        st.agent_register(txn, &reg)?;
        if replace {
            let node = st.agent_node.clone();
            let sid = reg.service_id().to_owned();
            let many = reg.checks.len() > 1;
            let keep: BTreeSet<String> = reg
                .checks
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.id.clone().unwrap_or_else(|| {
                        if many {
                            format!("service:{sid}:{}", i + 1)
                        } else {
                            format!("service:{sid}")
                        }
                    })
                })
                .collect();
            let stale: Vec<String> = st
                .nodes
                .get(&node)
                .map(|e| {
                    e.checks
                        .values()
                        .filter(|c| {
                            c.service_id == sid && !c.is_maintenance() && !keep.contains(&c.id)
                        })
                        .map(|c| c.id.clone())
                        .collect()
                })
                .unwrap_or_default();
            for id in stale {
                st.remove_check(txn, &node, &id)?;
            }
        }
        Ok(())
    })?;
    Ok(empty_ok())
}

/// The name of an agent-node service, for ACL checks; 404 when unknown.
fn agent_service_name(sh: &Shared, id: &str) -> Result<String, ApiError> {
    sh.store
        .with_state(|st| {
            st.nodes
                .get(&st.agent_node)
                .and_then(|e| e.services.get(id))
                .map(|s| s.name.clone())
        })
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
            ))
        })
}

async fn agent_service_deregister(
    State(sh): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    let name = agent_service_name(&sh, &id)?;
    authz.require(Perm::ServiceWrite(&name))?;
    sh.store.write(|st, txn| {
        let node = st.agent_node.clone();
        st.remove_service(txn, &node, &id)
    })?;
    Ok(empty_ok())
}

async fn agent_service_maintenance(
    State(sh): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let Some(raw) = p.get("enable") else {
        return Err(ApiError::bad("Missing value for enable"));
    };
    let enable = parse_go_bool(raw)
        .ok_or_else(|| ApiError::bad(format!("Invalid value for enable: {raw:?}")))?;
    let authz = sh.authorize(&headers, &p)?;
    let name = agent_service_name(&sh, &id)
        .map_err(|_| ApiError::not_found(format!("No service registered with ID {id:?}")))?;
    authz.require(Perm::ServiceWrite(&name))?;
    let reason = p.get("reason").map(str::to_owned);
    sh.store.write(|st, txn| {
        let node = st.agent_node.clone();
        st.set_service_maintenance(txn, &node, &id, enable, reason.as_deref())
    })?;
    Ok(empty_ok())
}

async fn agent_maintenance(State(sh): State<AppState>, headers: HeaderMap, uri: Uri) -> ApiResult {
    let p = Params::parse(uri.query());
    let Some(raw) = p.get("enable") else {
        return Err(ApiError::bad("Missing value for enable"));
    };
    let enable = parse_go_bool(raw)
        .ok_or_else(|| ApiError::bad(format!("Invalid value for enable: {raw:?}")))?;
    let authz = sh.authorize(&headers, &p)?;
    authz.require(Perm::NodeWrite(&sh.cfg.node_name))?;
    let reason = p.get("reason").map(str::to_owned);
    sh.store.write(|st, txn| {
        let node = st.agent_node.clone();
        st.set_node_maintenance(txn, &node, enable, reason.as_deref())
    })?;
    Ok(empty_ok())
}

/// The permission to update an agent-node check; 404 when unknown.
fn check_perm_target(sh: &Shared, id: &str) -> Result<String, ApiError> {
    sh.store
        .with_state(|st| {
            st.nodes
                .get(&st.agent_node)
                .and_then(|e| e.checks.get(id))
                .map(|c| c.service_name.clone())
        })
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            ))
        })
}

fn require_check_write(sh: &Shared, authz: &Authorizer, id: &str) -> Result<(), ApiError> {
    let service = check_perm_target(sh, id)?;
    if service.is_empty() {
        authz.require(Perm::NodeWrite(&sh.cfg.node_name))?;
    } else {
        authz.require(Perm::ServiceWrite(&service))?;
    }
    Ok(())
}

fn ttl_update(sh: &Shared, id: &str, status: CheckStatus, output: String) -> Result<(), ApiError> {
    sh.store
        .write(|st, txn| {
            let node = st.agent_node.clone();
            st.update_ttl(txn, &node, id, status, output)
        })
        .map_err(|e| match e {
            TtlError::Unknown => ApiError::not_found(format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            )),
            TtlError::NotTtl => {
                ApiError::internal(format!("CheckID {id:?} does not have associated TTL"))
            }
        })
}

async fn agent_check_status(
    State(sh): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    status: CheckStatus,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    require_check_write(&sh, &authz, &id)?;
    let note = p.get("note").unwrap_or("").to_owned();
    ttl_update(&sh, &id, status, note)?;
    Ok(empty_ok())
}

async fn agent_check_update(
    State(sh): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let (status, output) = decode_check_update(&parse_body(&body)?)?;
    let authz = sh.authorize(&headers, &p)?;
    require_check_write(&sh, &authz, &id)?;
    ttl_update(&sh, &id, status, output)?;
    Ok(empty_ok())
}

async fn agent_check_register(
    State(sh): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let value = parse_body(&body)?;
    let def = decode_agent_check(&value)?;
    let Some(name) = def.name.clone() else {
        return Err(ApiError::bad("Missing check name"));
    };
    let authz = sh.authorize(&headers, &p)?;
    let service_id = def.service_id.clone();
    match &service_id {
        Some(sid) => {
            let svc = agent_service_name(&sh, sid)
                .map_err(|_| ApiError::not_found(format!("ServiceID {sid:?} does not exist")))?;
            authz.require(Perm::ServiceWrite(&svc))?;
        }
        None => authz.require(Perm::NodeWrite(&sh.cfg.node_name))?,
    }
    let id = def.id.clone().unwrap_or_else(|| name.clone());
    sh.store.write(|st, txn| {
        let node = st.agent_node.clone();
        st.ensure_check(txn, &node, &def, service_id.as_deref(), &id, &name)
    })?;
    Ok(empty_ok())
}

async fn agent_check_deregister(
    State(sh): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let authz = sh.authorize(&headers, &p)?;
    require_check_write(&sh, &authz, &id)?;
    sh.store.write(|st, txn| {
        let node = st.agent_node.clone();
        st.remove_check(txn, &node, &id)
    })?;
    Ok(empty_ok())
}

async fn catalog_register(
    State(sh): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let req = decode_catalog_register(&parse_body(&body)?)?;
    sh.check_dc(Some(&req.datacenter))?;
    sh.check_dc(p.get("dc"))?;
    let authz = sh.authorize(&headers, &p)?;
    authz.require(Perm::NodeWrite(&req.node.node))?;
    for s in &req.node.services {
        authz.require(Perm::ServiceWrite(s.service_name()))?;
    }
    sh.store
        .write(|st, txn| st.catalog_register(txn, &req.node, req.skip_node_update))?;
    Ok(json_true())
}

async fn catalog_deregister(
    State(sh): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let p = Params::parse(uri.query());
    let req = decode_catalog_deregister(&parse_body(&body)?)?;
    sh.check_dc(Some(&req.datacenter))?;
    let authz = sh.authorize(&headers, &p)?;
    if req.service_id.is_empty() {
        authz.require(Perm::NodeWrite(&req.node))?;
    } else {
        let name = sh.store.with_state(|st| {
            st.nodes
                .get(&req.node)
                .and_then(|e| e.services.get(&req.service_id))
                .map(|s| s.name.clone())
        });
        if let Some(name) = name {
            authz.require(Perm::ServiceWrite(&name))?;
        }
    }
    // Deregistering something that is not there is a no-op answering true, as in Consul.
    sh.store.write(|st, txn| {
        let r = if !req.service_id.is_empty() {
            st.remove_service(txn, &req.node, &req.service_id)
        } else if !req.check_id.is_empty() {
            st.remove_check(txn, &req.node, &req.check_id)
        } else {
            st.remove_node(txn, &req.node)
        };
        let _ = r;
    });
    Ok(json_true())
}

// ---- plumbing -----------------------------------------------------------------------------

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

async fn method_not_allowed(method: Method) -> Response {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed"),
    )
}

/// Counts requests and applies injected faults.
async fn fault_layer(State(sh): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    tracing::debug!(%method, %path, query = req.uri().query().unwrap_or(""), "dev catalog request");
    let (latency, action) = sh.faults.on_request(&method, &path);
    if !latency.is_zero() {
        sleep(latency).await;
    }
    match action {
        None => next.run(req).await,
        Some(FaultAction::Delay(d)) => {
            sleep(d).await;
            next.run(req).await
        }
        Some(FaultAction::Error { status, body }) => text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        ),
        Some(FaultAction::DropConnection { after, mid_body }) => {
            let Some(abort) = req.extensions().get::<ConnAbort>().cloned() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connection drop injected, but this request has no connection to drop",
                );
            };
            if mid_body {
                let response = next.run(req).await;
                let (parts, body) = response.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let half = bytes.slice(..bytes.len() / 2);
                let stream = futures_util::stream::once(
                    async move { Ok::<Bytes, Infallible>(half) },
                )
                .chain(futures_util::stream::once(async move {
                    sleep(after).await;
                    abort.0.notify_one();
                    std::future::pending::<Result<Bytes, Infallible>>().await
                }));
                let mut r = Response::from_parts(parts, Body::from_stream(stream));
                r.headers_mut().remove(axum::http::header::CONTENT_LENGTH);
                r
            } else {
                sleep(after).await;
                abort.0.notify_one();
                std::future::pending::<Response>().await
            }
        }
    }
}

/// The API router.
pub(crate) fn router(sh: AppState) -> Router {
    /// The extractors of a handler keyed by a path tail.
    type Keyed = (State<AppState>, Path<String>, HeaderMap, Uri);
    Router::new()
        .route("/v1/catalog/services", get(catalog_services))
        .route(
            "/v1/catalog/service/{*name}",
            get(|(s, p, h, u): Keyed| catalog_service(s, p, h, u, false)),
        )
        .route(
            "/v1/catalog/connect/{*name}",
            get(|(s, p, h, u): Keyed| catalog_service(s, p, h, u, true)),
        )
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/catalog/node/{*node}", get(catalog_node))
        .route("/v1/catalog/datacenters", get(catalog_datacenters))
        .route("/v1/catalog/register", put(catalog_register))
        .route("/v1/catalog/deregister", put(catalog_deregister))
        .route(
            "/v1/health/service/{*name}",
            get(|(s, p, h, u): Keyed| health_service(s, p, h, u, false)),
        )
        .route(
            "/v1/health/connect/{*name}",
            get(|(s, p, h, u): Keyed| health_service(s, p, h, u, true)),
        )
        .route("/v1/health/checks/{*name}", get(health_checks))
        .route("/v1/health/node/{*node}", get(health_node))
        .route("/v1/health/state/{*state}", get(health_state))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/checks", get(agent_checks))
        .route("/v1/agent/maintenance", put(agent_maintenance))
        .route("/v1/agent/service/register", put(agent_service_register))
        .route(
            "/v1/agent/service/deregister/{*id}",
            put(agent_service_deregister),
        )
        .route(
            "/v1/agent/service/maintenance/{*id}",
            put(agent_service_maintenance),
        )
        .route("/v1/agent/service/{*id}", get(agent_service))
        .route(
            "/v1/agent/health/service/name/{*name}",
            get(|(s, p, h, u): Keyed| agent_health(s, p, h, u, false)),
        )
        .route(
            "/v1/agent/health/service/id/{*id}",
            get(|(s, p, h, u): Keyed| agent_health(s, p, h, u, true)),
        )
        .route("/v1/agent/check/register", put(agent_check_register))
        .route(
            "/v1/agent/check/deregister/{*id}",
            put(agent_check_deregister),
        )
        .route(
            "/v1/agent/check/pass/{*id}",
            put(|(s, p, h, u): Keyed| agent_check_status(s, p, h, u, CheckStatus::Passing)),
        )
        .route(
            "/v1/agent/check/warn/{*id}",
            put(|(s, p, h, u): Keyed| agent_check_status(s, p, h, u, CheckStatus::Warning)),
        )
        .route(
            "/v1/agent/check/fail/{*id}",
            put(|(s, p, h, u): Keyed| agent_check_status(s, p, h, u, CheckStatus::Critical)),
        )
        .route("/v1/agent/check/update/{*id}", put(agent_check_update))
        .route("/v1/agent/connect/ca/roots", get(ca_roots))
        .route("/v1/connect/ca/roots", get(ca_roots))
        .route("/v1/agent/connect/ca/leaf/{*service}", get(ca_leaf))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/status/peers", get(status_peers))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(sh.clone(), fault_layer))
        .with_state(sh)
}

/// Serves one connection until it ends, is aborted by a fault, or shutdown asks it to finish.
async fn serve_conn(stream: TcpStream, router: Router, shutdown: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let abort = Arc::new(Notify::new());
    let conn_abort = ConnAbort(abort.clone());
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(conn_abort.clone());
            router.clone().oneshot(req.map(Body::new))
        });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = abort.notified() => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(2), conn.as_mut()) => {}
                () = abort.notified() => {}
            }
        }
    }
}

/// Accepts connections until shutdown; accept errors (EMFILE…) are logged and retried.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tracker.spawn(serve_conn(stream, router.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dev catalog: accept failed; retrying");
                    sleep(Duration::from_millis(20)).await;
                }
            },
            () = shutdown.cancelled() => break,
        }
    }
}

/// A fresh node ID.
pub(crate) fn new_node_id() -> String {
    uuid_v4()
}

/// The address Consul would give as its server RPC address.
pub(crate) fn server_addr(http: SocketAddr) -> String {
    SocketAddr::new(http.ip(), 8300).to_string()
}
