//! Compiles a merged, validated `Dynamic` into immutable runtime tables.
//!
//! The tables are swapped atomically (arc-swap) by the server: new connections load the current
//! tables; established connections keep the `Arc`s of their route, service and server, so they keep
//! flowing when a reload removes them. Servers that survive a reload unchanged (same service,
//! address, weight, tls) keep their state (health verdict, hold-out, counters).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tagway_config::resources::{Changes, retain_names, same_opt};
use tagway_config::{Dynamic, LoadBalancer, Rule, StaticConfig};
use tagway_transport::IdentitySource;

use crate::balancer::{Balancer, Peer, ServerState, ServiceInfo};
use crate::dial::{Transport, Transports};
use crate::health::{CheckSpec, HealthChecks};
use crate::middleware::{InFlightConn, IpAllowList, Middleware};
use crate::router::{EntryTable, Route, TlsMode};

pub use tagway_transport::DEFAULT_TRANSPORT;

/// A table by resource name: a persistent B-tree, so that a reload copies the few entries it
/// changes and shares the rest with the tables in use (a clone is O(1)), and dropping the
/// previous generation frees only what it did not share. (Not `imbl::HashMap`: its sparse trie
/// nodes cost the gateway 2–4 MiB more RSS at 10,000 services in `consul-bench`.)
pub type Names<V> = imbl::OrdMap<String, V>;

/// A resource that could not be compiled (the rest of the configuration still applies).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{kind} {name}: {message}")]
#[non_exhaustive]
pub struct CompileError {
    /// `router`, `service`, `middleware`, `serversTransport` or `tls`.
    pub kind: &'static str,
    /// The resource name.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

/// The compiled configuration.
#[derive(Debug, Default)]
pub struct Tables {
    /// Routing table per entry point name.
    pub entry_points: HashMap<String, EntryTable>,
    /// TLS termination configurations, per `tls.options` name (routers hold theirs).
    pub tls: crate::tls::TlsConfigs,
    /// Services by name.
    pub services: Names<Arc<Balancer>>,
    /// Routers by name.
    pub routers: Names<Arc<Route>>,
    /// Middlewares by name (the ones that compiled).
    pub middlewares: Names<Arc<Middleware>>,
    /// Per service, its servers' states: shared as a whole by a reused service.
    servers: Names<ServerList>,
    transports: Option<Transports>,
    health: HealthChecks,
    /// The configuration these tables were compiled from (set by [`compile_shared`]): the next
    /// compile reuses the routers and services whose configuration is unchanged.
    source: Option<Arc<Dynamic>>,
    /// What could not be compiled (carried over by an incremental compile).
    errors: Vec<CompileError>,
}

impl Tables {
    /// Servers by (service, address), for metrics and tests.
    pub fn servers(&self) -> impl Iterator<Item = ((&str, &str), &Arc<ServerState>)> {
        self.servers.iter().flat_map(|(service, l)| {
            l.iter()
                .map(move |s| ((service.as_str(), s.address.as_str()), s))
        })
    }

    /// The state of `address` in `service`, if that server is in these tables.
    pub fn server(&self, service: &str, address: &str) -> Option<&Arc<ServerState>> {
        self.servers
            .get(service)?
            .iter()
            .find(|s| s.address == address)
    }

    /// Number of running health-check loops.
    pub fn health_checks(&self) -> usize {
        self.health.len()
    }
}

/// The servers of one service (each address once; the service is the table's key).
type ServerList = Arc<Vec<Arc<ServerState>>>;

struct Ctx<'a> {
    dynamic: &'a Dynamic,
    prev: Option<&'a Tables>,
    transports: Option<Transports>,
    services: HashMap<String, Result<Arc<Balancer>, String>>,
    servers: HashMap<String, ServerList>,
    health: HealthChecks,
    errors: Vec<CompileError>,
}

impl Ctx<'_> {
    fn transport(&self, name: &str) -> Result<Transport, String> {
        let Some(ts) = &self.transports else {
            return Err(format!(
                "servers transport {DEFAULT_TRANSPORT} could not be built"
            ));
        };
        ts.get(Some(name)).cloned().ok_or_else(|| {
            if self.dynamic.tcp.servers_transports.contains_key(name) {
                format!("servers transport {name} could not be built")
            } else {
                format!("servers transport {name} does not exist")
            }
        })
    }

    /// The previous generation's balancer of `name` when it can serve unchanged: a load
    /// balancer without health check (health loops belong to a generation) whose configuration
    /// and servers transport configuration are equal to the ones it was compiled from. Its
    /// servers keep their state.
    fn reusable_service(
        &self,
        name: &str,
        svc: &Arc<tagway_config::Service>,
    ) -> Option<Arc<Balancer>> {
        let prev = self.prev?;
        let src = prev.source.as_deref()?;
        let lb = svc.load_balancer.as_ref()?;
        if svc.weighted.is_some() || lb.health_check.is_some() {
            return None;
        }
        if !same_opt(src.tcp.services.get(name), Some(svc)) {
            return None;
        }
        let tname = lb.servers_transport.as_deref().unwrap_or(DEFAULT_TRANSPORT);
        if !same_opt(
            self.dynamic.tcp.servers_transports.get(tname),
            src.tcp.servers_transports.get(tname),
        ) || self.transport(tname).is_err()
        {
            return None;
        }
        // It compiled from this very configuration: its servers are all in `prev.servers`.
        prev.services.get(name).cloned()
    }

    fn service(&mut self, name: &str, stack: &mut Vec<String>) -> Result<Arc<Balancer>, String> {
        if let Some(s) = self.services.get(name) {
            return s.clone();
        }
        if let Some(svc) = self.dynamic.tcp.services.get(name)
            && let Some(old) = self.reusable_service(name, svc)
            && let Some(prev) = self.prev
        {
            if let Some(list) = prev.servers.get(name) {
                self.servers.insert(name.to_owned(), list.clone());
            }
            self.services.insert(name.to_owned(), Ok(old.clone()));
            return Ok(old);
        }
        if stack.iter().any(|s| s == name) {
            return Err(format!(
                "weighted services form a cycle: {} -> {name}",
                stack.join(" -> ")
            ));
        }
        let Some(svc) = self.dynamic.tcp.services.get(name) else {
            return Err(format!("service {name} does not exist"));
        };
        stack.push(name.to_owned());
        let res = match (&svc.load_balancer, &svc.weighted) {
            (Some(lb), None) => self.load_balancer(name, lb),
            (None, Some(w)) => {
                let mut peers = Vec::new();
                let mut err = None;
                for ws in &w.services {
                    match self.service(&ws.name, stack) {
                        Ok(b) => peers.push((weight(ws.weight()), Peer::Service(b))),
                        Err(e) => {
                            err = Some(format!("weighted service {}: {e}", ws.name));
                            break;
                        }
                    }
                }
                match err {
                    Some(e) => Err(e),
                    None => Ok(Arc::new(Balancer::with_service(
                        peers,
                        Arc::new(ServiceInfo {
                            name: name.to_owned(),
                            ..Default::default()
                        }),
                    ))),
                }
            }
            _ => Err("a service needs exactly one of loadBalancer or weighted".into()),
        };
        stack.pop();
        if let Err(e) = &res {
            self.errors.push(CompileError {
                kind: "service",
                name: name.to_owned(),
                message: e.clone(),
            });
        }
        self.services.insert(name.to_owned(), res.clone());
        res
    }

    fn load_balancer(&mut self, name: &str, lb: &LoadBalancer) -> Result<Arc<Balancer>, String> {
        let tname = lb.servers_transport.as_deref().unwrap_or(DEFAULT_TRANSPORT);
        let mut transport = self.transport(tname)?;
        if let Some(pp) = &lb.proxy_protocol {
            // Traefik v2's per-service PROXY protocol (deprecated) overrides the transport's.
            let v = tagway_transport::ProxyVersion::from_number(pp.version)
                .ok_or_else(|| format!("proxyProtocol.version {} is not 1 or 2", pp.version))?;
            transport = transport.with_proxy_protocol(Some(v));
        }
        let termination_delay = match lb.termination_delay {
            Some(ms) if ms < 0 => None,
            Some(ms) => Some(Duration::from_millis(ms as u64)),
            None => transport.termination_delay(),
        };
        let prev_servers: HashMap<&str, &Arc<ServerState>> = self
            .prev
            .and_then(|p| p.servers.get(name))
            .map(|l| l.iter().map(|s| (s.address.as_str(), s)).collect())
            .unwrap_or_default();
        let mut servers = Vec::new();
        let mut listed: Vec<Arc<ServerState>> = Vec::new();
        let mut seen = HashSet::new();
        for s in &lb.servers {
            if s.address.is_empty() {
                return Err("a server has no address".into());
            }
            let w = weight(s.weight());
            let state = prev_servers
                .get(s.address.as_str())
                .filter(|old| old.weight == w && old.tls == s.tls)
                .map(|old| Arc::clone(old))
                .unwrap_or_else(|| Arc::new(ServerState::new(s.address.clone(), w, s.tls)));
            // The last declaration of an address wins (as a map insert would).
            if !seen.insert(s.address.as_str()) {
                listed.retain(|l| l.address != s.address);
            }
            listed.push(state.clone());
            servers.push(state);
        }
        self.servers.insert(name.to_owned(), Arc::new(listed));
        if let Some(hc) = &lb.health_check {
            self.health.spawn(
                name,
                CheckSpec::from_config(hc),
                transport.clone(),
                &servers,
            );
        }
        let proxy_protocol = transport.proxy_protocol().is_some();
        let info = Arc::new(ServiceInfo {
            name: name.to_owned(),
            transport: Some(transport),
            proxy_protocol,
            termination_delay,
            counters: self
                .prev
                .and_then(|p| p.services.get(name))
                .map(|b| b.service.counters.clone())
                .unwrap_or_default(),
        });
        Ok(Arc::new(Balancer::with_service(
            servers
                .into_iter()
                .map(|s| (s.weight, Peer::Server(s)))
                .collect(),
            info,
        )))
    }
}

fn weight(w: i64) -> u32 {
    w.clamp(0, i64::from(u32::MAX)) as u32
}

/// Like [`compile`], and the tables remember `dynamic`: the next compile given these tables as
/// `prev` reuses (shares) every router and service whose configuration is unchanged instead of
/// building it again.
pub fn compile_shared(
    dynamic: &Arc<Dynamic>,
    static_cfg: &StaticConfig,
    prev: Option<&Tables>,
    identity: Option<&IdentitySource>,
) -> (Tables, Vec<CompileError>) {
    if let Some(p) = prev
        && let Some(tables) = compile_changes(dynamic, static_cfg, p)
    {
        let errors = tables.errors.clone();
        return (tables, errors);
    }
    let (mut tables, errors) = compile(dynamic, static_cfg, prev, identity);
    tables.source = Some(dynamic.clone());
    tables.errors = errors.clone();
    (tables, errors)
}

/// Compiles only what changed since `prev` was compiled: the routers and services whose
/// configuration differs, the routers whose service changed and the weighted services over a
/// changed service; everything else is taken from `prev` as is. `None` when a change reaches
/// further (TLS, middlewares, servers transports) or `prev` runs health checks (their loops
/// belong to one generation): then everything is compiled again.
fn compile_changes(
    dynamic: &Arc<Dynamic>,
    static_cfg: &StaticConfig,
    prev: &Tables,
) -> Option<Tables> {
    let src = prev.source.as_deref()?;
    if !prev.health.is_empty() || prev.transports.is_none() || !Changes::confined(src, dynamic) {
        return None;
    }
    let Changes { routers, services } = Changes::between(src, dynamic);
    let mut cx = Ctx {
        dynamic,
        prev: Some(prev),
        transports: prev.transports.clone(),
        services: HashMap::new(),
        servers: HashMap::new(),
        health: HealthChecks::default(),
        errors: Vec::new(),
    };
    let middlewares: HashMap<&str, Result<Arc<Middleware>, String>> = dynamic
        .tcp
        .middlewares
        .keys()
        .map(|n| {
            let m = prev.middlewares.get(n).cloned().ok_or_else(|| {
                prev.errors
                    .iter()
                    .find(|e| e.kind == "middleware" && e.name == *n)
                    .map_or_else(
                        || format!("middleware {n} could not be built"),
                        |e| e.message.clone(),
                    )
            });
            (n.as_str(), m)
        })
        .collect();
    let mut new_routers = prev.routers.clone();
    for n in &routers {
        new_routers.remove(*n);
    }
    let mut errors: Vec<CompileError> = prev
        .errors
        .iter()
        .filter(|e| match e.kind {
            "router" => !routers.contains(e.name.as_str()),
            "service" => !services.contains(e.name.as_str()),
            _ => true,
        })
        .cloned()
        .collect();
    for n in &routers {
        let Some((name, r)) = dynamic.tcp.routers.get_key_value(*n) else {
            continue;
        };
        match compile_router(&mut cx, &middlewares, &prev.tls, name, r) {
            Ok(route) => {
                cx.errors.extend(unknown_entry_points(name, r, static_cfg));
                new_routers.insert(name.clone(), route);
            }
            Err(message) => cx.errors.push(CompileError {
                kind: "router",
                name: name.clone(),
                message,
            }),
        }
    }
    errors.append(&mut cx.errors);

    // Services and server lists: the previous ones, without the changed services, plus what
    // the changed routers compiled; then only what a router still reaches.
    let mut new_services = prev.services.clone();
    let mut new_servers = prev.servers.clone();
    for n in &services {
        new_services.remove(*n);
        new_servers.remove(*n);
    }
    for (n, s) in cx.services {
        if let Ok(b) = s {
            new_services.insert(n, b);
        }
    }
    new_servers.extend(cx.servers);
    // Same layout: every touched router has the configuration it had (it was recompiled because
    // its service changed) and compiled both times, and no weighted service was touched. Then
    // the entry tables keep their order and index, and every service stays reached.
    let same_layout = routers.iter().all(|n| {
        same_opt(src.tcp.routers.get(*n), dynamic.tcp.routers.get(*n))
            && prev.routers.contains_key(*n)
            && new_routers.contains_key(*n)
    }) && services.iter().all(|n| {
        let weighted = |d: &Dynamic| d.tcp.services.get(*n).is_some_and(|s| s.weighted.is_some());
        !weighted(src) && !weighted(dynamic)
    });
    let entry_tables = if same_layout {
        let with: HashMap<&str, Arc<Route>> = routers
            .iter()
            .filter_map(|n| new_routers.get(*n).map(|r| (*n, r.clone())))
            .collect();
        prev.entry_points
            .iter()
            .map(|(k, t)| (k.clone(), t.replaced(&with)))
            .collect()
    } else {
        let mut reached: HashSet<&str> = HashSet::with_capacity(new_services.len());
        let mut per_ep: BTreeMap<&String, Vec<Arc<Route>>> = static_cfg
            .entry_points
            .keys()
            .map(|k| (k, Vec::new()))
            .collect();
        for (n, r) in &dynamic.tcp.routers {
            let Some(route) = new_routers.get(n) else {
                continue;
            };
            reached.insert(r.service.as_str());
            add_to_entry_points(&mut per_ep, r, route);
        }
        // Weighted services reach their children.
        let mut stack: Vec<&str> = dynamic
            .tcp
            .services
            .iter()
            .filter(|(n, s)| s.weighted.is_some() && reached.contains(n.as_str()))
            .map(|(n, _)| n.as_str())
            .collect();
        while let Some(n) = stack.pop() {
            if let Some(w) = dynamic
                .tcp
                .services
                .get(n)
                .and_then(|s| s.weighted.as_ref())
            {
                for ws in &w.services {
                    if reached.insert(ws.name.as_str()) {
                        stack.push(ws.name.as_str());
                    }
                }
            }
        }
        retain_names(&mut new_services, |n, _| reached.contains(n));
        retain_names(&mut new_servers, |n, _| reached.contains(n));
        per_ep
            .into_iter()
            .map(|(k, v)| (k.clone(), EntryTable::new(v)))
            .collect()
    };
    Some(Tables {
        entry_points: entry_tables,
        tls: prev.tls.clone(),
        services: new_services,
        routers: new_routers,
        middlewares: prev.middlewares.clone(),
        servers: new_servers,
        transports: cx.transports,
        health: cx.health,
        source: Some(dynamic.clone()),
        errors,
    })
}

/// Compiles `dynamic` for the entry points of `static_cfg`. `prev` (the tables in use) lets
/// unchanged servers keep their state. Needs a tokio runtime (health checks are spawned).
pub fn compile(
    dynamic: &Dynamic,
    static_cfg: &StaticConfig,
    prev: Option<&Tables>,
    identity: Option<&IdentitySource>,
) -> (Tables, Vec<CompileError>) {
    let mut errors = Vec::new();
    let default = match Transport::new(
        DEFAULT_TRANSPORT,
        &static_cfg.tcp_servers_transport,
        identity.cloned(),
    ) {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(CompileError {
                kind: "serversTransport",
                name: DEFAULT_TRANSPORT.into(),
                message: e.to_string(),
            });
            None
        }
    };
    let transports = default.map(|d| {
        let (ts, errs) = Transports::build(
            d,
            &dynamic.tcp.servers_transports,
            identity,
            prev.and_then(|p| p.transports.as_ref()),
        );
        for e in errs {
            errors.push(CompileError {
                kind: "serversTransport",
                name: e.transport().to_owned(),
                message: e.to_string(),
            });
        }
        ts
    });
    let mut cx = Ctx {
        dynamic,
        prev,
        transports,
        services: HashMap::new(),
        servers: HashMap::new(),
        health: HealthChecks::default(),
        errors,
    };
    let mut middlewares: HashMap<&str, Result<Arc<Middleware>, String>> = HashMap::new();
    for (name, m) in &dynamic.tcp.middlewares {
        // Unchanged: the same object (an inFlightConn keeps counting the same connections).
        let same = prev.and_then(|p| {
            let src = p.source.as_deref()?;
            (src.tcp.middlewares.get(name) == Some(m)).then_some(())?;
            p.middlewares.get(name).cloned()
        });
        if let Some(old) = same {
            middlewares.insert(name, Ok(old));
            continue;
        }
        let res = match (&m.ip_allow_list, &m.in_flight_conn) {
            (Some(l), None) => IpAllowList::new(&l.source_range)
                .map(|l| Arc::new(Middleware::IpAllowList(l)))
                .map_err(|e| e.to_string()),
            (None, Some(f)) if f.amount > 0 => {
                // The counts survive a reload: connections opened before it still count.
                let amount = f.amount as u64;
                let limiter = match prev.and_then(|p| p.middlewares.get(name)).map(|m| &**m) {
                    Some(Middleware::InFlightConn(old)) => InFlightConn::carry_over(amount, old),
                    _ => InFlightConn::new(amount),
                };
                Ok(Arc::new(Middleware::InFlightConn(limiter)))
            }
            (None, Some(f)) => Err(format!(
                "inFlightConn.amount must be positive, got {}",
                f.amount
            )),
            _ => Err("a middleware needs exactly one of ipAllowList or inFlightConn".into()),
        };
        if let Err(e) = &res {
            cx.errors.push(CompileError {
                kind: "middleware",
                name: name.clone(),
                message: e.clone(),
            });
        }
        middlewares.insert(name, res);
    }

    let (tls, tls_errors) = crate::tls::server_configs(&dynamic.tls);
    for e in tls_errors {
        let (kind, name) = match &e {
            crate::tls::CertError::Options { options, .. } => ("tls options", options.clone()),
            _ => ("tls", "certificates".to_owned()),
        };
        cx.errors.push(CompileError {
            kind,
            name,
            message: e.to_string(),
        });
    }

    let mut per_ep: BTreeMap<String, Vec<Arc<Route>>> = static_cfg
        .entry_points
        .keys()
        .map(|k| (k.clone(), Vec::new()))
        .collect();
    let mut routers = Names::new();
    for (name, r) in &dynamic.tcp.routers {
        let res = compile_router(&mut cx, &middlewares, &tls, name, r);
        let route = match res {
            Ok(route) => route,
            Err(message) => {
                cx.errors.push(CompileError {
                    kind: "router",
                    name: name.clone(),
                    message,
                });
                continue;
            }
        };
        add_to_entry_points(&mut per_ep, r, &route);
        cx.errors.extend(unknown_entry_points(name, r, static_cfg));
        routers.insert(name.clone(), route);
    }
    let services = cx
        .services
        .iter()
        .filter_map(|(k, v)| v.as_ref().ok().map(|b| (k.clone(), b.clone())))
        .collect();
    let middlewares = middlewares
        .into_iter()
        .filter_map(|(k, v)| v.ok().map(|m| (k.to_owned(), m)))
        .collect();
    let tables = Tables {
        middlewares,
        entry_points: per_ep
            .into_iter()
            .map(|(k, v)| (k, EntryTable::new(v)))
            .collect(),
        tls,
        services,
        routers,
        servers: cx.servers.into_iter().collect(),
        transports: cx.transports,
        health: cx.health,
        source: None,
        errors: Vec::new(),
    };
    (tables, cx.errors)
}

/// Adds `route` to the tables of the entry points `r` names (every one when it names none).
fn add_to_entry_points<K: Ord + std::borrow::Borrow<String>>(
    per_ep: &mut BTreeMap<K, Vec<Arc<Route>>>,
    r: &tagway_config::Router,
    route: &Arc<Route>,
) {
    if r.entry_points.is_empty() {
        for v in per_ep.values_mut() {
            v.push(route.clone());
        }
    } else {
        for ep in &r.entry_points {
            if let Some(v) = per_ep.get_mut(ep) {
                v.push(route.clone());
            }
        }
    }
}

/// The error of a router naming entry points the static configuration does not have.
fn unknown_entry_points(
    name: &str,
    r: &tagway_config::Router,
    static_cfg: &StaticConfig,
) -> Option<CompileError> {
    let mut unknown: Vec<&str> = r
        .entry_points
        .iter()
        .filter(|ep| !static_cfg.entry_points.contains_key(*ep))
        .map(String::as_str)
        .collect();
    if unknown.is_empty() {
        return None;
    }
    unknown.sort_unstable();
    unknown.dedup();
    Some(CompileError {
        kind: "router",
        name: name.to_owned(),
        message: format!(
            "entry point(s) {} not in the static configuration (adding entry points needs a restart)",
            unknown.join(", ")
        ),
    })
}

fn compile_router(
    cx: &mut Ctx<'_>,
    middlewares: &HashMap<&str, Result<Arc<Middleware>, String>>,
    tls_configs: &crate::tls::TlsConfigs,
    name: &str,
    r: &Arc<tagway_config::Router>,
) -> Result<Arc<Route>, String> {
    if let Some(old) = reusable_router(cx, middlewares, tls_configs, name, r) {
        return Ok(old);
    }
    let rule = tagway_config::rule::parse(&r.rule).map_err(|e| e.to_string())?;
    let tls = match &r.tls {
        None => TlsMode::None,
        Some(t) if t.passthrough => TlsMode::Passthrough,
        Some(_) => TlsMode::Terminate,
    };
    if tls == TlsMode::None && rule.needs_tls() {
        return Err(format!(
            "rule {:?} matches on the TLS ClientHello (HostSNI with a name, HostSNIRegexp, ALPN): the router needs a tls section, or use HostSNI(`*`)",
            r.rule
        ));
    }
    let tls_config = match (&r.tls, tls) {
        (Some(t), TlsMode::Terminate) => Some(
            tls_configs
                .get(t.options.as_deref())
                .map_err(|e| format!("tls.options: {e}"))?,
        ),
        _ => None,
    };
    let mut chain = Vec::new();
    for m in &r.middlewares {
        match middlewares.get(m.as_str()) {
            Some(Ok(m)) => chain.push(m.clone()),
            Some(Err(e)) => return Err(format!("middleware {m}: {e}")),
            None => return Err(format!("middleware {m} does not exist")),
        }
    }
    let service = cx.service(&r.service, &mut Vec::new())?;
    Ok(Arc::new(Route {
        name: name.to_owned(),
        priority: r
            .priority
            .unwrap_or_else(|| Rule::default_priority(&r.rule)),
        rule,
        tls,
        tls_config,
        middlewares: chain,
        service,
        counters: cx
            .prev
            .and_then(|p| p.routers.get(name))
            .map(|r| r.counters.clone())
            .unwrap_or_default(),
    }))
}

/// The previous generation's route of `name` when its configuration is unchanged and everything
/// it references (service, middlewares, TLS configuration) compiled to the same objects.
fn reusable_router(
    cx: &mut Ctx<'_>,
    middlewares: &HashMap<&str, Result<Arc<Middleware>, String>>,
    tls_configs: &crate::tls::TlsConfigs,
    name: &str,
    r: &Arc<tagway_config::Router>,
) -> Option<Arc<Route>> {
    let prev = cx.prev?;
    let src = prev.source.as_deref()?;
    if !same_opt(src.tcp.routers.get(name), Some(r)) {
        return None;
    }
    let old = prev.routers.get(name)?;
    let tls_config = match (&r.tls, old.tls) {
        (Some(t), TlsMode::Terminate) => Some(tls_configs.get(t.options.as_deref()).ok()?),
        _ => None,
    };
    let same_tls = match (&tls_config, &old.tls_config) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    };
    if !same_tls || r.middlewares.len() != old.middlewares.len() {
        return None;
    }
    for (m, o) in r.middlewares.iter().zip(&old.middlewares) {
        match middlewares.get(m.as_str()) {
            Some(Ok(m)) if Arc::ptr_eq(m, o) => {}
            _ => return None,
        }
    }
    let service = cx.service(&r.service, &mut Vec::new()).ok()?;
    Arc::ptr_eq(&service, &old.service).then(|| old.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tagway_config::{EntryPoint, Router, Server, Service, Weighted, WeightedService};

    fn st() -> StaticConfig {
        let mut s = StaticConfig::default();
        s.entry_points.insert(
            "tcp".into(),
            EntryPoint {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            },
        );
        s
    }

    fn router(rule: &str, svc: &str) -> Router {
        Router {
            rule: rule.into(),
            service: svc.into(),
            ..Default::default()
        }
    }

    fn lb(addrs: &[&str]) -> Service {
        Service {
            load_balancer: Some(LoadBalancer {
                servers: addrs
                    .iter()
                    .map(|a| Server {
                        address: (*a).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            weighted: None,
        }
    }

    #[tokio::test]
    async fn compiles_and_reports_broken_resources() {
        let mut d = Dynamic::default();
        d.tcp.services.insert("a@file".into(), lb(&["127.0.0.1:1"]));
        d.tcp.services.insert(
            "w@file".into(),
            Service {
                load_balancer: None,
                weighted: Some(Weighted {
                    services: vec![
                        WeightedService {
                            name: "a@file".into(),
                            weight: Some(2),
                        },
                        WeightedService {
                            name: "w@file".into(),
                            weight: Some(1),
                        },
                    ],
                }),
            },
        );
        d.tcp
            .routers
            .insert("ok@file".into(), router("HostSNI(`*`)", "a@file"));
        d.tcp
            .routers
            .insert("cycle@file".into(), router("HostSNI(`*`)", "w@file"));
        d.tcp.routers.insert(
            "needs-tls@file".into(),
            router("HostSNI(`a.example`)", "a@file"),
        );
        d.tcp
            .routers
            .insert("missing@file".into(), router("HostSNI(`*`)", "nope@file"));
        let mut bad_ep = router("HostSNI(`*`)", "a@file");
        bad_ep.entry_points = vec!["other".into()];
        d.tcp.routers.insert("bad-ep@file".into(), bad_ep);
        let (t, errs) = compile(&d, &st(), None, None);
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(msgs.iter().any(|m| m.contains("cycle")), "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.starts_with("router needs-tls@file")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("nope@file does not exist")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("entry point(s) other")),
            "{msgs:?}"
        );
        assert!(t.routers.contains_key("ok@file"));
        assert!(!t.routers.contains_key("cycle@file"));
        assert!(!t.entry_points["tcp"].needs_peek());
        // Server state survives a reload.
        let s1 = t.servers().next().unwrap().1.clone();
        s1.set_healthy(false);
        let (t2, _) = compile(&d, &st(), Some(&t), None);
        let s2 = t2.servers().next().unwrap().1.clone();
        assert!(Arc::ptr_eq(&s1, &s2));
    }

    /// What a compile produced, comparable between an incremental and a full compile.
    fn summary(t: &Tables, errs: &[CompileError]) -> Vec<String> {
        let mut out = Vec::new();
        let mut sorted = |mut v: Vec<String>, what: &str| {
            v.sort();
            out.push(format!("{what}: {}", v.join(" ")));
        };
        sorted(t.routers.keys().cloned().collect(), "routers");
        sorted(t.services.keys().cloned().collect(), "services");
        sorted(
            t.servers().map(|((s, a), _)| format!("{s}={a}")).collect(),
            "servers",
        );
        sorted(errs.iter().map(ToString::to_string).collect(), "errors");
        let mut eps: Vec<_> = t.entry_points.iter().collect();
        eps.sort_by(|a, b| a.0.cmp(b.0));
        for (ep, table) in eps {
            let order: Vec<&str> = table.routes().map(|r| &*r.name).collect();
            out.push(format!("{ep}: {}", order.join(" ")));
        }
        out
    }

    #[tokio::test]
    async fn compiling_only_the_changes_agrees_with_compiling_everything() {
        let mut st = st();
        st.entry_points.insert(
            "other".into(),
            EntryPoint {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            },
        );
        fn weighted(children: &[&str]) -> Service {
            Service {
                load_balancer: None,
                weighted: Some(Weighted {
                    services: children
                        .iter()
                        .map(|c| WeightedService {
                            name: (*c).into(),
                            weight: Some(1),
                        })
                        .collect(),
                }),
            }
        }
        let mut d = Dynamic::default();
        for i in 0..6 {
            d.tcp
                .services
                .insert(format!("s{i}@c"), lb(&[&format!("127.0.0.1:{}", 100 + i)]));
            d.tcp.routers.insert(
                format!("r{i}@c"),
                router(&format!("ClientIP(`127.0.0.{i}`)"), &format!("s{i}@c")),
            );
        }
        d.tcp
            .services
            .insert("w@c".into(), weighted(&["s0@c", "s1@c"]));
        d.tcp
            .routers
            .insert("rw@c".into(), router("HostSNI(`*`)", "w@c"));
        d.tcp
            .routers
            .insert("dangling@c".into(), router("HostSNI(`*`)", "nope@c"));
        let mut only_other = router("ClientIP(`10.0.0.1`)", "s2@c");
        only_other.entry_points = vec!["other".into(), "gone".into()];
        d.tcp.routers.insert("other@c".into(), only_other);

        type Step = Box<dyn Fn(&mut Dynamic)>;
        let steps: Vec<(&str, Step)> = vec![
            (
                "a server moves",
                Box::new(|d| {
                    d.tcp
                        .services
                        .insert("s3@c".into(), lb(&["127.0.0.1:203", "127.0.0.1:204"]));
                }),
            ),
            (
                "a weighted child changes",
                Box::new(|d| {
                    d.tcp.services.insert("s1@c".into(), lb(&["127.0.0.1:201"]));
                }),
            ),
            (
                "a service goes",
                Box::new(|d| {
                    d.tcp.services.remove("s4@c");
                }),
            ),
            (
                "the missing service appears",
                Box::new(|d| {
                    d.tcp
                        .services
                        .insert("nope@c".into(), lb(&["127.0.0.1:300"]));
                }),
            ),
            (
                "a rule changes, a router goes, one comes",
                Box::new(|d| {
                    d.tcp
                        .routers
                        .insert("r5@c".into(), router("HostSNI(`five`)", "s5@c"));
                    d.tcp.routers.remove("r0@c");
                    d.tcp
                        .routers
                        .insert("new@c".into(), router("ClientIP(`127.0.0.9`)", "s4@c"));
                }),
            ),
            (
                "a broken rule",
                Box::new(|d| {
                    d.tcp
                        .routers
                        .insert("r1@c".into(), router("HostSNI(", "s1@c"));
                }),
            ),
            (
                "the weighted service drops a child",
                Box::new(|d| {
                    d.tcp.services.insert("w@c".into(), weighted(&["s1@c"]));
                }),
            ),
            ("nothing changes", Box::new(|_| {})),
        ];
        let first = Arc::new(d.clone());
        let (mut prev, errs) = compile_shared(&first, &st, None, None);
        assert_eq!(
            summary(&prev, &errs),
            summary(
                &compile(&first, &st, None, None).0,
                &compile(&first, &st, None, None).1
            )
        );
        for (what, step) in steps {
            step(&mut d);
            let cfg = Arc::new(d.clone());
            assert!(
                compile_changes(&cfg, &st, &prev).is_some(),
                "{what}: only the changes are compiled"
            );
            let (inc, inc_errs) = compile_shared(&cfg, &st, Some(&prev), None);
            let (full, full_errs) = compile(&cfg, &st, None, None);
            assert_eq!(
                summary(&inc, &inc_errs),
                summary(&full, &full_errs),
                "after: {what}"
            );
            prev = inc;
        }
    }

    #[tokio::test]
    async fn unchanged_resources_are_shared_across_compiles() {
        use tagway_config::{InFlightConn as InFlightCfg, Middleware as MwCfg};
        let mut d = Dynamic::default();
        d.tcp.services.insert("a@c".into(), lb(&["127.0.0.1:1"]));
        d.tcp
            .services
            .insert("b@c".into(), lb(&["127.0.0.1:2", "127.0.0.1:3"]));
        d.tcp.middlewares.insert(
            "limit@c".into(),
            MwCfg {
                in_flight_conn: Some(InFlightCfg { amount: 3 }),
                ..Default::default()
            },
        );
        for (r, svc) in [("ra@c", "a@c"), ("rb@c", "b@c")] {
            d.tcp.routers.insert(
                r.into(),
                Router {
                    rule: "HostSNI(`*`)".into(),
                    service: svc.into(),
                    middlewares: vec!["limit@c".into()],
                    ..Default::default()
                },
            );
        }
        let d1 = Arc::new(d.clone());
        let (t1, errs) = compile_shared(&d1, &st(), None, None);
        assert!(errs.is_empty(), "{errs:?}");

        // Only b changes (a server goes).
        d.tcp.services.insert("b@c".into(), lb(&["127.0.0.1:2"]));
        let d2 = Arc::new(d.clone());
        let (t2, errs) = compile_shared(&d2, &st(), Some(&t1), None);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(Arc::ptr_eq(&t1.services["a@c"], &t2.services["a@c"]));
        assert!(Arc::ptr_eq(&t1.routers["ra@c"], &t2.routers["ra@c"]));
        assert!(Arc::ptr_eq(
            &t1.middlewares["limit@c"],
            &t2.middlewares["limit@c"]
        ));
        assert!(!Arc::ptr_eq(&t1.services["b@c"], &t2.services["b@c"]));
        assert!(!Arc::ptr_eq(&t1.routers["rb@c"], &t2.routers["rb@c"]));
        // The changed service keeps its counters and its surviving server's state; the removed
        // server is gone, the reused service's servers are still listed.
        assert!(Arc::ptr_eq(
            &t1.services["b@c"].service.counters,
            &t2.services["b@c"].service.counters
        ));
        assert!(Arc::ptr_eq(
            &t1.routers["rb@c"].counters,
            &t2.routers["rb@c"].counters
        ));
        let servers = |t: &Tables| {
            let mut v: Vec<(String, String)> = t
                .servers()
                .map(|((s, a), _)| (s.to_owned(), a.to_owned()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            servers(&t2),
            vec![
                ("a@c".to_owned(), "127.0.0.1:1".to_owned()),
                ("b@c".to_owned(), "127.0.0.1:2".to_owned()),
            ]
        );
        let key = ("b@c".to_owned(), "127.0.0.1:2".to_owned());
        assert!(Arc::ptr_eq(
            t1.server(&key.0, &key.1).unwrap(),
            t2.server(&key.0, &key.1).unwrap()
        ));
        // Both routers are in the entry point's table.
        assert_eq!(t2.entry_points["tcp"].routes().count(), 2);

        // A changed middleware is rebuilt, and the routers using it with it.
        d.tcp.middlewares.insert(
            "limit@c".into(),
            MwCfg {
                in_flight_conn: Some(InFlightCfg { amount: 4 }),
                ..Default::default()
            },
        );
        let d3 = Arc::new(d.clone());
        let (t3, errs) = compile_shared(&d3, &st(), Some(&t2), None);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(!Arc::ptr_eq(
            &t2.middlewares["limit@c"],
            &t3.middlewares["limit@c"]
        ));
        assert!(!Arc::ptr_eq(&t2.routers["ra@c"], &t3.routers["ra@c"]));
        assert!(Arc::ptr_eq(&t2.services["a@c"], &t3.services["a@c"]));

        // Tables compiled by plain `compile` do not remember their source: the compile after
        // them shares nothing.
        let (t4, _) = compile(&d3, &st(), Some(&t3), None);
        assert!(Arc::ptr_eq(&t3.services["a@c"], &t4.services["a@c"]));
        let (t5, _) = compile(&d3, &st(), Some(&t4), None);
        assert!(!Arc::ptr_eq(&t4.services["a@c"], &t5.services["a@c"]));
    }

    #[tokio::test]
    async fn services_with_health_checks_are_rebuilt() {
        let mut svc = lb(&["127.0.0.1:1"]);
        if let Some(lb) = &mut svc.load_balancer {
            lb.health_check = Some(Default::default());
        }
        let mut d = Dynamic::default();
        d.tcp.services.insert("h@c".into(), svc);
        d.tcp.routers.insert(
            "r@c".into(),
            Router {
                rule: "HostSNI(`*`)".into(),
                service: "h@c".into(),
                ..Default::default()
            },
        );
        let d = Arc::new(d);
        let (t1, _) = compile_shared(&d, &st(), None, None);
        let (t2, _) = compile_shared(&d, &st(), Some(&t1), None);
        assert_eq!(t2.health_checks(), 1);
        assert!(!Arc::ptr_eq(&t1.services["h@c"], &t2.services["h@c"]));
        let key = ("h@c".to_owned(), "127.0.0.1:1".to_owned());
        assert!(Arc::ptr_eq(
            t1.server(&key.0, &key.1).unwrap(),
            t2.server(&key.0, &key.1).unwrap()
        ));
    }
}
