//! The JSON documents of the admin API, modelled on Traefik's API (`/api/tcp/routers` …): each
//! resource carries its configuration, `name`, `provider`, `status` (`enabled` or `disabled`),
//! `error` (messages, when disabled) and `using`/`usedBy`.
//!
//! Resources come from the configuration the data plane uses now; resources that validation or
//! the data plane rejected are listed as `disabled` with their errors. Inline PEM data, and any
//! value of a key naming a token, password or secret, are replaced with `"<redacted>"`
//! ([`redact`]) before anything is returned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tagway_config::{Dynamic, ServersTransport, StaticConfig};

use crate::balancer::ServerState;
use crate::observability::{ErrorEntry, Observability};
use crate::runtime::{DEFAULT_TRANSPORT, Tables};

/// What replaces secrets.
pub const REDACTED: &str = "<redacted>";

fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["token", "password", "secret", "privatekey"]
        .iter()
        .any(|s| k.contains(s))
}

/// Replaces inline PEM data (certificates and keys) and the values of keys naming a token,
/// password or secret with `"<redacted>"`, at any depth.
pub fn redact(v: &mut Value) {
    match v {
        Value::String(s) if s.contains("-----BEGIN") || s.contains("PRIVATE KEY") => {
            *s = REDACTED.to_owned();
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                if is_secret_key(k) && !v.is_null() {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        _ => {}
    }
}

fn provider_of(name: &str) -> &str {
    name.rsplit_once('@').map(|(_, p)| p).unwrap_or("")
}

fn to_object<T: serde::Serialize>(v: &T) -> Map<String, Value> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Everything a request needs, read once.
pub struct Snapshot {
    /// The configuration in use (empty before the first).
    pub config: Arc<Dynamic>,
    /// The runtime tables in use.
    pub tables: Arc<Tables>,
    /// Errors in force.
    pub errors: Vec<ErrorEntry>,
    /// Entry point names of the static configuration.
    pub entry_points: Vec<String>,
    /// The static `tcpServersTransport` (`default@internal`).
    pub default_transport: ServersTransport,
}

impl Snapshot {
    /// Reads the current state.
    pub fn take(obs: &Observability, tables: Arc<Tables>, st: &StaticConfig) -> Self {
        Snapshot {
            config: obs
                .applied_config()
                .map(|(c, _)| c)
                .unwrap_or_else(|| Arc::new(Dynamic::default())),
            tables,
            errors: obs.errors(),
            entry_points: st.entry_points.keys().cloned().collect(),
            default_transport: st.tcp_servers_transport.clone(),
        }
    }

    fn errors_of(&self, kinds: &[&str], name: &str) -> Vec<String> {
        self.errors
            .iter()
            .filter(|e| kinds.contains(&e.kind.as_str()) && e.name == name)
            .map(|e| match &e.key {
                Some(k) => format!("{k}: {}", e.message),
                None => e.message.clone(),
            })
            .collect()
    }

    fn rejected(&self, kinds: &[&str]) -> BTreeSet<String> {
        self.errors
            .iter()
            .filter(|e| kinds.contains(&e.kind.as_str()))
            .map(|e| e.name.clone())
            .collect()
    }

    fn finish(
        &self,
        mut m: Map<String, Value>,
        name: &str,
        enabled: bool,
        kinds: &[&str],
    ) -> Value {
        let errors = self.errors_of(kinds, name);
        m.insert("name".into(), name.into());
        m.insert("provider".into(), provider_of(name).into());
        m.insert(
            "status".into(),
            if enabled { "enabled" } else { "disabled" }.into(),
        );
        if !errors.is_empty() {
            m.insert("error".into(), errors.into());
        }
        let mut v = Value::Object(m);
        redact(&mut v);
        v
    }

    /// One router, or None.
    pub fn router(&self, name: &str) -> Option<Value> {
        const KINDS: &[&str] = &["router"];
        let Some(r) = self.config.tcp.routers.get(name) else {
            return self
                .rejected(KINDS)
                .contains(name)
                .then(|| self.finish(Map::new(), name, false, KINDS));
        };
        let mut m = to_object(r);
        let eps = if r.entry_points.is_empty() {
            self.entry_points.clone()
        } else {
            r.entry_points.clone()
        };
        m.insert("entryPoints".into(), json!(eps));
        let route = self.tables.routers.get(name);
        if let Some(route) = route {
            m.insert("priority".into(), json!(route.priority));
            let using: Vec<&String> = self
                .tables
                .entry_points
                .iter()
                .filter(|(_, t)| t.routes().any(|x| Arc::ptr_eq(x, route)))
                .map(|(n, _)| n)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            m.insert("using".into(), json!(using));
        }
        Some(self.finish(m, name, route.is_some(), KINDS))
    }

    /// Every router, sorted by name.
    pub fn routers(&self) -> Vec<Value> {
        let mut names: BTreeSet<String> = self.config.tcp.routers.keys().cloned().collect();
        names.extend(self.rejected(&["router"]));
        names.iter().filter_map(|n| self.router(n)).collect()
    }

    fn used_by(&self, service: &str) -> Vec<String> {
        let mut out: BTreeSet<String> = self
            .config
            .tcp
            .routers
            .iter()
            .filter(|(_, r)| r.service == service)
            .map(|(n, _)| n.clone())
            .collect();
        for (n, s) in &self.config.tcp.services {
            if let Some(w) = &s.weighted
                && w.services.iter().any(|x| x.name == service)
            {
                out.insert(n.clone());
            }
        }
        out.into_iter().collect()
    }

    fn servers_of(&self) -> HashMap<(&str, &str), &Arc<ServerState>> {
        self.tables.servers().collect()
    }

    fn service_with(
        &self,
        name: &str,
        servers: &HashMap<(&str, &str), &Arc<ServerState>>,
    ) -> Option<Value> {
        const KINDS: &[&str] = &["service"];
        let Some(s) = self.config.tcp.services.get(name) else {
            return self
                .rejected(KINDS)
                .contains(name)
                .then(|| self.finish(Map::new(), name, false, KINDS));
        };
        let mut m = to_object(s);
        if let Some(lb) = &s.load_balancer {
            let mut status = Map::new();
            let list: Vec<Value> = lb
                .servers
                .iter()
                .map(|srv| {
                    let mut o = to_object(srv);
                    match servers.get(&(name, srv.address.as_str())) {
                        Some(st) => {
                            let health = if st.is_healthy() { "UP" } else { "DOWN" };
                            status.insert(srv.address.clone(), health.into());
                            o.insert("weight".into(), json!(st.weight));
                            o.insert("health".into(), health.into());
                            o.insert("available".into(), json!(st.is_available()));
                            o.insert(
                                "openConnections".into(),
                                json!(
                                    st.counters
                                        .open
                                        .load(std::sync::atomic::Ordering::Relaxed)
                                        .max(0)
                                ),
                            );
                        }
                        None => {
                            o.insert("weight".into(), json!(srv.weight()));
                        }
                    }
                    Value::Object(o)
                })
                .collect();
            if let Some(Value::Object(lbm)) = m.get_mut("loadBalancer") {
                lbm.insert("servers".into(), Value::Array(list));
                lbm.entry("serversTransport")
                    .or_insert_with(|| DEFAULT_TRANSPORT.into());
            }
            m.insert("serverStatus".into(), Value::Object(status));
            m.insert("type".into(), "loadbalancer".into());
        } else {
            m.insert("type".into(), "weighted".into());
        }
        m.insert("usedBy".into(), json!(self.used_by(name)));
        let enabled = self.tables.services.contains_key(name);
        Some(self.finish(m, name, enabled, KINDS))
    }

    /// One service, or None.
    pub fn service(&self, name: &str) -> Option<Value> {
        self.service_with(name, &self.servers_of())
    }

    /// Every service, sorted by name.
    pub fn services(&self) -> Vec<Value> {
        let servers = self.servers_of();
        let mut names: BTreeSet<String> = self.config.tcp.services.keys().cloned().collect();
        names.extend(self.rejected(&["service"]));
        names
            .iter()
            .filter_map(|n| self.service_with(n, &servers))
            .collect()
    }

    /// Every middleware, sorted by name.
    pub fn middlewares(&self) -> Vec<Value> {
        const KINDS: &[&str] = &["middleware"];
        let mut out = Vec::new();
        let mut names: BTreeSet<String> = self.config.tcp.middlewares.keys().cloned().collect();
        names.extend(self.rejected(KINDS));
        for name in &names {
            let Some(mw) = self.config.tcp.middlewares.get(name) else {
                out.push(self.finish(Map::new(), name, false, KINDS));
                continue;
            };
            let mut m = to_object(mw);
            let kind = if mw.ip_allow_list.is_some() {
                "ipallowlist"
            } else {
                "inflightconn"
            };
            m.insert("type".into(), kind.into());
            let used: Vec<&String> = self
                .config
                .tcp
                .routers
                .iter()
                .filter(|(_, r)| r.middlewares.iter().any(|x| x == name))
                .map(|(n, _)| n)
                .collect();
            m.insert("usedBy".into(), json!(used));
            let enabled = self.errors_of(KINDS, name).is_empty();
            out.push(self.finish(m, name, enabled, KINDS));
        }
        out
    }

    /// Every servers transport (`default@internal` first), secrets redacted.
    pub fn servers_transports(&self) -> Vec<Value> {
        const KINDS: &[&str] = &["serversTransport"];
        let mut all: BTreeMap<String, Option<&ServersTransport>> = self
            .config
            .tcp
            .servers_transports
            .iter()
            .map(|(k, v)| (k.clone(), Some(&**v)))
            .collect();
        for n in self.rejected(KINDS) {
            all.entry(n).or_insert(None);
        }
        let mut out = Vec::with_capacity(all.len() + 1);
        let mut push = |name: &str, t: Option<&ServersTransport>| {
            let m = t.map(to_object).unwrap_or_default();
            let enabled = t.is_some() && self.errors_of(KINDS, name).is_empty();
            out.push(self.finish(m, name, enabled, KINDS));
        };
        push(DEFAULT_TRANSPORT, Some(&self.default_transport));
        for (name, t) in &all {
            if name != DEFAULT_TRANSPORT {
                push(name, *t);
            }
        }
        out
    }

    fn counts(&self, total: usize, disabled: usize) -> Value {
        json!({ "total": total, "warnings": 0, "errors": disabled })
    }

    /// The `tcp` section of `/api/overview`.
    pub fn overview_tcp(&self) -> Value {
        let routers = self.routers();
        let services = self.services();
        let middlewares = self.middlewares();
        let transports = self.servers_transports();
        let disabled = |v: &[Value]| v.iter().filter(|x| x["status"] == "disabled").count();
        json!({
            "routers": self.counts(routers.len(), disabled(&routers)),
            "services": self.counts(services.len(), disabled(&services)),
            "middlewares": self.counts(middlewares.len(), disabled(&middlewares)),
            "serversTransports": self.counts(transports.len(), disabled(&transports)),
        })
    }
}
