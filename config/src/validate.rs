//! Merging provider outputs (`name@provider`) and validating the result.
//!
//! A broken resource disables itself and what references it, nothing else: the validated
//! configuration keeps every valid resource, and each error names the provider, the resource, the
//! key and where it was written (file:line or tag).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::checks::{check_address, check_transport, missing_file, parse_ip_or_cidr};
use crate::dynamic::{Dynamic, Router, Service, Tcp};
use crate::origin::Origin;
use crate::resources::{Change, Changes, Resources};
use crate::static_config::StaticConfig;

/// The name of the transport built from the static `tcpServersTransport`.
pub const DEFAULT_TRANSPORT: &str = "default@internal";

/// The provider of a qualified name (`db@file` → `file`), if qualified.
pub fn provider_of(name: &str) -> Option<&str> {
    name.rsplit_once('@').map(|(_, p)| p)
}

/// Qualifies `name` with `provider` unless it already names one.
pub fn qualify(name: &str, provider: &str) -> String {
    if name.contains('@') {
        name.to_owned()
    } else {
        format!("{name}@{provider}")
    }
}

/// Whether a provider declares a resource name (of one section).
type Declared<'a> = dyn Fn(&str) -> bool + 'a;

/// Merges the outputs of several providers: every resource name becomes `name@provider`;
/// unqualified references inside a provider's resources are qualified with that provider;
/// qualified ones (`x@file`, `default@internal`) are kept. TLS certificates are concatenated;
/// TLS options other than `default` are qualified like resources.
pub fn merge(parts: &[(&str, &Dynamic)]) -> Dynamic {
    let mut out = merge_rest(parts);
    for (provider, d) in parts {
        merge_tcp_all(provider, d, &mut out.tcp);
    }
    out
}

/// Qualifies every resource of `input` into `out` (`name@provider`): a resource whose references
/// are already qualified is shared, the others are copied with their references qualified.
fn merge_all<T>(
    provider: &str,
    input: &Resources<T>,
    out: &mut Resources<T>,
    qualify: impl Fn(&T) -> Option<T>,
) {
    out.as_map_mut().extend(input.iter().map(|(name, r)| {
        (
            format!("{name}@{provider}"),
            qualify(r).map_or_else(|| r.clone(), Arc::new),
        )
    }));
}

/// Applies to `out` what changed in a provider's resources from `prev` to `next`.
fn merge_changes<T: PartialEq>(
    provider: &str,
    prev: &Resources<T>,
    next: &Resources<T>,
    out: &mut Resources<T>,
    qualify: impl Fn(&T) -> Option<T>,
) {
    crate::resources::diff(prev, next, |name, change| {
        let key = format!("{name}@{provider}");
        match (change, next.get(name)) {
            (Change::Removed, _) | (_, None) => {
                out.remove(&key);
            }
            (_, Some(r)) => {
                out.insert(key, qualify(r).map_or_else(|| r.clone(), Arc::new));
            }
        }
    });
}

/// [`merge`] for a stream of configurations. It keeps the providers' last outputs and the merged
/// result: when the same providers publish again, only the resources that changed (found by
/// walking each provider's old and new resources together, a pointer comparison for each
/// unchanged one) are qualified again; the others stay shared with the previous result.
#[derive(Debug, Default)]
pub struct MergeCache {
    /// The providers' outputs of the last call, and the tcp resources merged from them.
    last: Option<(Vec<Part>, Tcp)>,
}

/// A provider's output, by provider name.
type Part = (String, Arc<Dynamic>);

impl MergeCache {
    /// Merges `parts` like [`merge`], reusing the previous call's result for what did not change.
    pub fn merge_shared(&mut self, parts: &[(&str, Arc<Dynamic>)]) -> Dynamic {
        let refs: Vec<(&str, &Dynamic)> = parts.iter().map(|(p, d)| (*p, &**d)).collect();
        let mut out = merge_rest(&refs);
        let same_providers = self.last.as_ref().is_some_and(|(prev, _)| {
            prev.len() == parts.len() && prev.iter().zip(parts).all(|((a, _), (b, _))| a == b)
        });
        match self.last.as_mut() {
            Some((prev, tcp)) if same_providers => {
                for ((provider, old), (_, new)) in prev.iter().zip(parts) {
                    if Arc::ptr_eq(old, new) {
                        continue;
                    }
                    let (o, n) = (&old.tcp, &new.tcp);
                    merge_changes(provider, &o.routers, &n.routers, &mut tcp.routers, |r| {
                        qualify_router(r, provider)
                    });
                    merge_changes(provider, &o.services, &n.services, &mut tcp.services, |s| {
                        qualify_service(s, provider)
                    });
                    merge_changes(
                        provider,
                        &o.middlewares,
                        &n.middlewares,
                        &mut tcp.middlewares,
                        |_| None,
                    );
                    merge_changes(
                        provider,
                        &o.servers_transports,
                        &n.servers_transports,
                        &mut tcp.servers_transports,
                        |_| None,
                    );
                }
                *prev = parts
                    .iter()
                    .map(|(p, d)| ((*p).to_owned(), d.clone()))
                    .collect();
            }
            _ => {
                let mut tcp = Tcp::default();
                for (provider, d) in &refs {
                    merge_tcp_all(provider, d, &mut tcp);
                }
                self.last = Some((
                    parts
                        .iter()
                        .map(|(p, d)| ((*p).to_owned(), d.clone()))
                        .collect(),
                    tcp,
                ));
            }
        }
        if let Some((_, tcp)) = &self.last {
            out.tcp = tcp.clone();
        }
        out
    }
}

/// Qualifies all of a provider's tcp resources into `out`.
fn merge_tcp_all(provider: &str, d: &Dynamic, out: &mut Tcp) {
    merge_all(provider, &d.tcp.routers, &mut out.routers, |r| {
        qualify_router(r, provider)
    });
    merge_all(provider, &d.tcp.services, &mut out.services, |s| {
        qualify_service(s, provider)
    });
    merge_all(provider, &d.tcp.middlewares, &mut out.middlewares, |_| None);
    merge_all(
        provider,
        &d.tcp.servers_transports,
        &mut out.servers_transports,
        |_| None,
    );
}

/// Everything of the merge but the tcp resources: TLS and the origins of every key.
fn merge_rest(parts: &[(&str, &Dynamic)]) -> Dynamic {
    let mut out = Dynamic::default();
    for (provider, d) in parts {
        let q = |n: &str| format!("{n}@{provider}");
        let mut meta = d.meta.clone();
        // `tcp.routers.<name>…` → `tcp.routers.<name>@<provider>…` (same for the other tcp
        // sections), for the names the provider declares; the shortest declared name wins.
        let sections: [(&str, &Declared<'_>); 4] = [
            ("tcp.routers.", &|n| d.tcp.routers.contains_key(n)),
            ("tcp.services.", &|n| d.tcp.services.contains_key(n)),
            ("tcp.middlewares.", &|n| d.tcp.middlewares.contains_key(n)),
            ("tcp.serversTransports.", &|n| {
                d.tcp.servers_transports.contains_key(n)
            }),
        ];
        meta.rename_keys(|k| {
            let (sec, rest, declared) = sections
                .iter()
                .find_map(|(sec, has)| k.strip_prefix(sec).map(|r| (sec, r, has)))?;
            rest.match_indices(['.', '['])
                .map(|(i, _)| i)
                .chain(std::iter::once(rest.len()))
                .find(|&i| declared(&rest[..i]))
                .map(|i| format!("{sec}{}@{provider}{}", &rest[..i], &rest[i..]))
        });
        let offset = out.tls.certificates.len();
        for i in 0..d.tls.certificates.len() {
            meta.rename_prefix(
                &format!("tls.certificates[{i}]"),
                &format!("tls.certificates[{}]", offset + i),
            );
        }
        out.tls
            .certificates
            .extend(d.tls.certificates.iter().cloned());
        for (name, o) in &d.tls.options {
            let n = if name == "default" {
                name.clone()
            } else {
                q(name)
            };
            meta.rename_prefix(&format!("tls.options.{name}"), &format!("tls.options.{n}"));
            out.tls.options.insert(n, o.clone());
        }
        for (name, s) in &d.tls.stores {
            out.tls
                .stores
                .entry(name.clone())
                .or_insert_with(|| s.clone());
        }
        out.meta.extend(meta);
    }
    out
}

/// True when `reference` is to be qualified (not empty, no provider yet).
fn unqualified(reference: &str) -> bool {
    !reference.is_empty() && !reference.contains('@')
}

/// `r` with its references qualified with `provider`; `None` when they all are already.
fn qualify_router(r: &Router, provider: &str) -> Option<Router> {
    let options = r
        .tls
        .as_ref()
        .and_then(|t| t.options.as_deref())
        .filter(|o| *o != "default");
    if !unqualified(&r.service)
        && !r.middlewares.iter().any(|m| unqualified(m))
        && !options.is_some_and(unqualified)
    {
        return None;
    }
    let mut r = r.clone();
    if !r.service.is_empty() {
        r.service = qualify(&r.service, provider);
    }
    r.middlewares = r.middlewares.iter().map(|m| qualify(m, provider)).collect();
    if let Some(tls) = &mut r.tls
        && let Some(o) = &mut tls.options
        && o != "default"
    {
        *o = qualify(o, provider);
    }
    Some(r)
}

/// `s` with its references qualified with `provider`; `None` when they all are already.
fn qualify_service(s: &Service, provider: &str) -> Option<Service> {
    let transport = s
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.servers_transport.as_deref());
    let weighted = s
        .weighted
        .as_ref()
        .is_some_and(|w| w.services.iter().any(|ws| unqualified(&ws.name)));
    if !transport.is_some_and(unqualified) && !weighted {
        return None;
    }
    let mut s = s.clone();
    if let Some(lb) = &mut s.load_balancer
        && let Some(t) = &mut lb.servers_transport
    {
        *t = qualify(t, provider);
    }
    if let Some(w) = &mut s.weighted {
        for ws in &mut w.services {
            if !ws.name.is_empty() {
                ws.name = qualify(&ws.name, provider);
            }
        }
    }
    Some(s)
}

/// The kind of a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ResourceKind {
    /// `tcp.routers`.
    Router,
    /// `tcp.services`.
    Service,
    /// `tcp.middlewares`.
    Middleware,
    /// `tcp.serversTransports`.
    ServersTransport,
    /// `tls.certificates`.
    TlsCertificate,
    /// `tls.options`.
    TlsOptions,
}

impl ResourceKind {
    /// `router`, `service`, `middleware`, `serversTransport`, `tls certificate`, `tls options`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Router => "router",
            ResourceKind::Service => "service",
            ResourceKind::Middleware => "middleware",
            ResourceKind::ServersTransport => "serversTransport",
            ResourceKind::TlsCertificate => "tls certificate",
            ResourceKind::TlsOptions => "tls options",
        }
    }

    fn section(self) -> &'static str {
        match self {
            ResourceKind::Router => "tcp.routers",
            ResourceKind::Service => "tcp.services",
            ResourceKind::Middleware => "tcp.middlewares",
            ResourceKind::ServersTransport => "tcp.serversTransports",
            ResourceKind::TlsCertificate => "tls.certificates",
            ResourceKind::TlsOptions => "tls.options",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem with one resource; the resource (and what references it) is disabled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ResourceError {
    /// The provider that declared the resource (`file`, `consulcatalog`).
    pub provider: String,
    /// The kind of resource.
    pub kind: ResourceKind,
    /// Its qualified name (`db@file`), or the index of a TLS certificate.
    pub name: String,
    /// The key concerned, relative to the resource (`tls.certificates`, `service`).
    pub key: Option<String>,
    /// Where the key (or the resource) was written.
    pub origin: Option<Origin>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        write!(
            f,
            "{} `{}` (provider {})",
            self.kind, self.name, self.provider
        )?;
        if let Some(k) = &self.key {
            write!(f, ", key `{k}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A validated configuration and the errors found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Validated {
    /// The configuration without the broken resources and those referencing them.
    pub config: Dynamic,
    /// One entry per problem.
    pub errors: Vec<ResourceError>,
}

struct V<'a> {
    d: &'a Dynamic,
    errors: Vec<ResourceError>,
    broken: BTreeSet<(ResourceKind, String)>,
}

impl V<'_> {
    fn error(&mut self, kind: ResourceKind, name: &str, key: Option<&str>, message: String) {
        let path = match key {
            Some(k) => format!("{}.{name}.{k}", kind.section()),
            None => format!("{}.{name}", kind.section()),
        };
        let path = if kind == ResourceKind::TlsCertificate {
            match key {
                Some(k) => format!("tls.certificates[{name}].{k}"),
                None => format!("tls.certificates[{name}]"),
            }
        } else {
            path
        };
        self.errors.push(ResourceError {
            provider: provider_of(name)
                .map(str::to_owned)
                .or_else(|| {
                    self.d
                        .meta
                        .origin(&path)
                        .and_then(|o| o.as_tag().map(|_| "consulcatalog".to_owned()))
                })
                .unwrap_or_default(),
            kind,
            name: name.to_owned(),
            key: key.map(str::to_owned),
            origin: self.d.meta.origin(&path).cloned(),
            message,
        });
        self.broken.insert((kind, name.to_owned()));
    }

    fn is_broken(&self, kind: ResourceKind, name: &str) -> bool {
        !self.broken.is_empty() && self.broken.contains(&(kind, name.to_owned()))
    }
}

/// Validates a merged configuration against the static configuration (entry points).
pub fn validate(merged: &Dynamic, st: &StaticConfig) -> Validated {
    validate_owned(merged.clone(), st)
}

/// Like [`validate`], taking the merged configuration by value: the broken resources are removed
/// from it in place instead of from a copy (what a gateway applying a large catalog wants).
pub fn validate_owned(merged: Dynamic, st: &StaticConfig) -> Validated {
    validate_impl(merged, Some(st))
}

/// Validates a merged configuration without a static configuration: everything but the
/// existence of entry points (`tagway tags` uses it).
pub fn validate_without_static(merged: &Dynamic) -> Validated {
    validate_impl(merged.clone(), None)
}

/// [`validate_owned`] for the next configuration of a stream: `prev` is the previous result
/// (validated configuration and errors) for the same static configuration. When the previous
/// configuration had no error and the change is confined to routers and services, only the
/// routers and services it touches are checked (see [`Changes`]); otherwise everything is.
pub fn validate_changes(
    merged: Dynamic,
    st: &StaticConfig,
    prev: Option<(&Dynamic, &[ResourceError])>,
) -> Validated {
    match prev {
        Some((p, errors)) if errors.is_empty() && Changes::confined(p, &merged) => {
            let (errors, broken) = {
                let scope = Changes::between(p, &merged);
                check_all(&merged, Some(st), Some(&scope))
            };
            remove_broken(merged, errors, &broken)
        }
        _ => validate_impl(merged, Some(st)),
    }
}

fn validate_impl(config: Dynamic, st: Option<&StaticConfig>) -> Validated {
    let (errors, broken) = check_all(&config, st, None);
    remove_broken(config, errors, &broken)
}

/// `config` without the `broken` resources.
fn remove_broken(
    mut config: Dynamic,
    errors: Vec<ResourceError>,
    broken: &BTreeSet<(ResourceKind, String)>,
) -> Validated {
    if broken.is_empty() {
        return Validated { config, errors };
    }
    let is_broken = |kind: ResourceKind, name: &str| broken.contains(&(kind, name.to_owned()));
    config
        .tcp
        .routers
        .retain(|n, _| !is_broken(ResourceKind::Router, n));
    config
        .tcp
        .services
        .retain(|n, _| !is_broken(ResourceKind::Service, n));
    config
        .tcp
        .middlewares
        .retain(|n, _| !is_broken(ResourceKind::Middleware, n));
    config
        .tcp
        .servers_transports
        .retain(|n, _| !is_broken(ResourceKind::ServersTransport, n));
    config
        .tls
        .options
        .retain(|n, _| !is_broken(ResourceKind::TlsOptions, n));
    let mut i = 0;
    config.tls.certificates.retain(|_| {
        let keep = !is_broken(ResourceKind::TlsCertificate, &i.to_string());
        i += 1;
        keep
    });
    Validated { config, errors }
}

/// The resources of `map` (with `names`, only those, in name order).
fn in_scope<'a, T>(
    map: &'a Resources<T>,
    names: Option<&std::collections::HashSet<&str>>,
) -> Vec<(&'a String, &'a Arc<T>)> {
    match names {
        None => map.iter().collect(),
        Some(names) => {
            let mut v: Vec<_> = names.iter().filter_map(|n| map.get_key_value(*n)).collect();
            v.sort_unstable_by(|a, b| a.0.cmp(b.0));
            v
        }
    }
}

/// The errors of `d` and the resources they break; with a `scope`, only of the routers and
/// services it names (the rest is known to be valid).
fn check_all(
    d: &Dynamic,
    st: Option<&StaticConfig>,
    scope: Option<&Changes<'_>>,
) -> (Vec<ResourceError>, BTreeSet<(ResourceKind, String)>) {
    use ResourceKind::*;
    let mut v = V {
        d,
        errors: Vec::new(),
        broken: BTreeSet::new(),
    };
    let services = in_scope(&d.tcp.services, scope.map(|c| &c.services));
    let routers = in_scope(&d.tcp.routers, scope.map(|c| &c.routers));
    let whole = scope.is_none();

    // Names.
    let names: Vec<(ResourceKind, &String)> = routers
        .iter()
        .map(|(n, _)| (Router, *n))
        .chain(services.iter().map(|(n, _)| (Service, *n)))
        .chain(
            d.tcp
                .middlewares
                .keys()
                .filter(|_| whole)
                .map(|n| (Middleware, n)),
        )
        .chain(
            d.tcp
                .servers_transports
                .keys()
                .filter(|_| whole)
                .map(|n| (ServersTransport, n)),
        )
        .collect();
    for (kind, name) in names {
        let base = name.rsplit_once('@').map_or(name.as_str(), |(b, _)| b);
        if base.is_empty() || base.contains('@') || base.contains('.') {
            v.error(
                kind,
                name,
                None,
                format!(
                    "invalid name `{base}`: names must not be empty nor contain `@` or `.` (`@` qualifies references: `name@provider`)"
                ),
            );
        }
    }

    // Servers transports.
    for (name, t) in d.tcp.servers_transports.iter().filter(|_| whole) {
        for p in check_transport(t) {
            v.error(ServersTransport, name, Some(p.key), p.message);
        }
    }

    // Middlewares.
    for (name, m) in d.tcp.middlewares.iter().filter(|_| whole) {
        match (&m.ip_allow_list, &m.in_flight_conn) {
            (None, None) => v.error(
                Middleware,
                name,
                None,
                "the middleware declares no kind: give exactly one of `ipAllowList` or `inFlightConn`".to_owned(),
            ),
            (Some(_), Some(_)) => v.error(
                Middleware,
                name,
                None,
                "the middleware declares both `ipAllowList` and `inFlightConn`: declare one middleware per kind and list both in the router's `middlewares`".to_owned(),
            ),
            _ => {}
        }
        if let Some(a) = &m.ip_allow_list {
            if a.source_range.is_empty() {
                v.error(
                    Middleware,
                    name,
                    Some("ipAllowList.sourceRange"),
                    "`sourceRange` is empty: no client would be allowed; list CIDRs or IPs"
                        .to_owned(),
                );
            }
            for (i, r) in a.source_range.iter().enumerate() {
                if let Err(msg) = parse_ip_or_cidr(r) {
                    v.error(
                        Middleware,
                        name,
                        Some(&format!("ipAllowList.sourceRange[{i}]")),
                        msg,
                    );
                }
            }
        }
        if let Some(c) = &m.in_flight_conn
            && c.amount <= 0
        {
            v.error(
                Middleware,
                name,
                Some("inFlightConn.amount"),
                format!(
                    "amount must be greater than 0 (got {}): it is the number of simultaneous connections allowed per client IP",
                    c.amount
                ),
            );
        }
    }

    // Services: own values.
    for &(name, s) in &services {
        check_service(&mut v, name, s);
    }

    // Services: references, in dependency order (fixpoint), with cycles.
    for &(name, s) in &services {
        if s.weighted.is_some()
            && let Some(cycle) = find_cycle(d, name)
        {
            v.error(
                Service,
                name,
                Some("weighted.services"),
                format!("weighted services form a cycle: {}", cycle.join(" → ")),
            );
        }
    }
    loop {
        let mut changed = false;
        for &(name, s) in &services {
            if v.is_broken(Service, name) {
                continue;
            }
            if let Some(lb) = &s.load_balancer
                && let Some(t) = &lb.servers_transport
                && t != DEFAULT_TRANSPORT
            {
                let msg = if !d.tcp.servers_transports.contains_key(t) {
                    Some(format!(
                        "serversTransport `{t}` does not exist{}",
                        known(d.tcp.servers_transports.keys())
                    ))
                } else if v.is_broken(ServersTransport, t) {
                    Some(format!("serversTransport `{t}` is invalid (see its error)"))
                } else {
                    None
                };
                if let Some(m) = msg {
                    v.error(Service, name, Some("loadBalancer.serversTransport"), m);
                    changed = true;
                    continue;
                }
            }
            if let Some(w) = &s.weighted {
                for (i, ws) in w.services.iter().enumerate() {
                    let msg = if !d.tcp.services.contains_key(&ws.name) {
                        Some(format!(
                            "service `{}` does not exist{}",
                            ws.name,
                            known(d.tcp.services.keys())
                        ))
                    } else if v.is_broken(Service, &ws.name) {
                        Some(format!("service `{}` is invalid (see its error)", ws.name))
                    } else {
                        None
                    };
                    if let Some(m) = msg {
                        v.error(
                            Service,
                            name,
                            Some(&format!("weighted.services[{i}].name")),
                            m,
                        );
                        changed = true;
                        break;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }

    // Routers.
    for &(name, r) in &routers {
        check_router(&mut v, name, r, st);
    }

    // TLS.
    for (i, c) in d.tls.certificates.iter().enumerate().filter(|_| whole) {
        let n = i.to_string();
        for (key, f) in [("certFile", &c.cert_file), ("keyFile", &c.key_file)] {
            if f.0.trim().is_empty() {
                v.error(TlsCertificate, &n, Some(key), format!("`{key}` is empty"));
            } else if let Some(m) = missing_file(f) {
                v.error(
                    TlsCertificate,
                    &n,
                    Some(key),
                    format!("file `{m}` does not exist"),
                );
            }
        }
    }
    for (name, o) in d.tls.options.iter().filter(|_| whole) {
        for (key, val) in [
            ("minVersion", &o.min_version),
            ("maxVersion", &o.max_version),
        ] {
            if let Some(ver) = val
                && !matches!(ver.as_str(), "VersionTLS12" | "VersionTLS13")
            {
                v.error(
                    TlsOptions,
                    name,
                    Some(key),
                    format!("unsupported TLS version `{ver}` (TLS 1.0 and 1.1 are not available in rustls): use VersionTLS12 or VersionTLS13"),
                );
            }
        }
        if let (Some(min), Some(max)) = (&o.min_version, &o.max_version)
            && min == "VersionTLS13"
            && max == "VersionTLS12"
        {
            v.error(
                TlsOptions,
                name,
                Some("maxVersion"),
                "maxVersion VersionTLS12 is below minVersion VersionTLS13".to_owned(),
            );
        }
        for (key, list, known) in [
            ("cipherSuites", &o.cipher_suites, crate::tls::CIPHER_SUITES),
            ("curvePreferences", &o.curve_preferences, crate::tls::CURVES),
        ] {
            for (i, n) in list.iter().enumerate() {
                if !known.contains(&n.as_str()) {
                    v.error(
                        TlsOptions,
                        name,
                        Some(&format!("{key}[{i}]")),
                        format!(
                            "unknown or unsupported `{n}` (TLS 1.0/1.1-era and non-AEAD suites are not available): use {}",
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(ca) = &o.client_auth {
            if ca.ca_files.is_empty()
                && let Some(t) = &ca.client_auth_type
                && matches!(
                    t.as_str(),
                    "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert"
                )
            {
                v.error(
                    TlsOptions,
                    name,
                    Some("clientAuth.caFiles"),
                    format!("clientAuthType {t} needs clientAuth.caFiles"),
                );
            }
            if let Some(t) = &ca.client_auth_type
                && !matches!(
                    t.as_str(),
                    "NoClientCert"
                        | "RequestClientCert"
                        | "RequireAnyClientCert"
                        | "VerifyClientCertIfGiven"
                        | "RequireAndVerifyClientCert"
                )
            {
                v.error(
                    TlsOptions,
                    name,
                    Some("clientAuth.clientAuthType"),
                    format!("unknown clientAuthType `{t}`: use NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"),
                );
            }
            for (i, f) in ca.ca_files.iter().enumerate() {
                if let Some(m) = missing_file(f) {
                    v.error(
                        TlsOptions,
                        name,
                        Some(&format!("clientAuth.caFiles[{i}]")),
                        format!("file `{m}` does not exist"),
                    );
                }
            }
        }
    }

    // Routers referencing broken TLS options.
    for &(name, r) in &routers {
        if v.is_broken(Router, name) {
            continue;
        }
        // A terminating router without `options` uses `default`: broken default options
        // must not fall back to weaker settings silently.
        if let Some(tls) = &r.tls
            && !tls.passthrough
            && let Some(o) = tls.options.as_deref().or(Some("default"))
            && v.is_broken(TlsOptions, o)
        {
            v.error(
                Router,
                name,
                Some("tls.options"),
                format!("tls options `{o}` are invalid (see their error)"),
            );
        }
    }

    (v.errors, v.broken)
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        String::new()
    } else if names.len() <= 10 {
        format!(" (known: {})", names.join(", "))
    } else {
        format!(" ({} known, e.g. {})", names.len(), names[..10].join(", "))
    }
}

fn check_service(v: &mut V<'_>, name: &str, s: &Service) {
    use ResourceKind::Service as S;
    match (&s.load_balancer, &s.weighted) {
        (None, None) => {
            v.error(
                S,
                name,
                None,
                "the service declares no kind: give exactly one of `loadBalancer` or `weighted`"
                    .to_owned(),
            );
            return;
        }
        (Some(_), Some(_)) => {
            v.error(
                S,
                name,
                None,
                "the service declares both `loadBalancer` and `weighted`: a service is one or the other; declare two services".to_owned(),
            );
            return;
        }
        _ => {}
    }
    if let Some(lb) = &s.load_balancer {
        for (i, srv) in lb.servers.iter().enumerate() {
            if let Err(m) = check_address(&srv.address, false) {
                v.error(
                    S,
                    name,
                    Some(&format!("loadBalancer.servers[{i}].address")),
                    m,
                );
            }
            if let Some(w) = srv.weight
                && w < 0
            {
                v.error(
                    S,
                    name,
                    Some(&format!("loadBalancer.servers[{i}].weight")),
                    format!("weight {w} is negative: use 0 (never picked) or more"),
                );
            }
        }
        if let Some(t) = &lb.server {
            let from_tag =
                v.d.meta
                    .origin(&format!("tcp.services.{name}.loadBalancer.server"))
                    .is_some_and(|o| o.as_tag().is_some());
            if !from_tag {
                v.error(
                    S,
                    name,
                    Some("loadBalancer.server"),
                    "`server` is only valid in tags (a template applied to each Consul instance); list servers under `servers`".to_owned(),
                );
            }
            if let Some(p) = &t.port
                && !matches!(p.trim().parse::<u32>(), Ok(1..=65535))
            {
                v.error(
                    S,
                    name,
                    Some("loadBalancer.server.port"),
                    format!("`{p}` is not a port number (1-65535)"),
                );
            }
            if let Some(w) = t.weight
                && w < 0
            {
                v.error(
                    S,
                    name,
                    Some("loadBalancer.server.weight"),
                    format!("weight {w} is negative: use 0 (never picked) or more"),
                );
            }
        }
        if let Some(pp) = &lb.proxy_protocol
            && pp.version != 1
            && pp.version != 2
        {
            v.error(
                S,
                name,
                Some("loadBalancer.proxyProtocol.version"),
                format!(
                    "PROXY protocol version {} does not exist: use 1 or 2",
                    pp.version
                ),
            );
        }
        if let Some(hc) = &lb.health_check {
            if hc.port == Some(0) {
                v.error(
                    S,
                    name,
                    Some("loadBalancer.healthCheck.port"),
                    "port 0 is not a port: use 1-65535, or remove it to check the server's port"
                        .to_owned(),
                );
            }
            for (key, val) in [
                ("interval", hc.interval),
                ("unhealthyInterval", hc.unhealthy_interval),
                ("timeout", hc.timeout),
            ] {
                if let Some(d) = val
                    && (d.is_negative() || d.is_zero())
                {
                    v.error(
                        S,
                        name,
                        Some(&format!("loadBalancer.healthCheck.{key}")),
                        format!("{key} must be a positive duration (got {d})"),
                    );
                }
            }
        }
    }
    if let Some(w) = &s.weighted {
        if w.services.is_empty() {
            v.error(
                S,
                name,
                Some("weighted.services"),
                "`weighted.services` is empty: list the services to balance over".to_owned(),
            );
        }
        for (i, ws) in w.services.iter().enumerate() {
            if ws.name.trim().is_empty() {
                v.error(
                    S,
                    name,
                    Some(&format!("weighted.services[{i}].name")),
                    "the service name is empty".to_owned(),
                );
            }
            if let Some(wt) = ws.weight
                && wt < 0
            {
                v.error(
                    S,
                    name,
                    Some(&format!("weighted.services[{i}].weight")),
                    format!("weight {wt} is negative: use 0 (never picked) or more"),
                );
            }
        }
        if !w.services.is_empty() && w.services.iter().all(|s| s.weight() == 0) {
            v.error(
                S,
                name,
                Some("weighted.services"),
                "every weight is 0: no service would ever be picked".to_owned(),
            );
        }
    }
}

/// A cycle of weighted services starting at `start`, if any.
fn find_cycle(d: &Dynamic, start: &str) -> Option<Vec<String>> {
    fn dfs(
        d: &Dynamic,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let Some(w) = d.tcp.services.get(at).and_then(|s| s.weighted.as_ref()) else {
            return false;
        };
        for ws in &w.services {
            if ws.name == start {
                path.push(ws.name.clone());
                return true;
            }
            if seen.insert(ws.name.clone()) {
                path.push(ws.name.clone());
                if dfs(d, &ws.name, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    let mut seen = BTreeSet::new();
    dfs(d, start, start, &mut path, &mut seen).then_some(path)
}

fn check_router(v: &mut V<'_>, name: &str, r: &Router, st: Option<&StaticConfig>) {
    use ResourceKind::Router as R;
    let d = v.d;
    if r.rule.trim().is_empty() {
        v.error(R, name, Some("rule"), "the rule is empty: write e.g. HostSNI(`*`) (every connection) or HostSNI(`db.example.com`)".to_owned());
    } else {
        match crate::rule::parse(&r.rule) {
            Err(e) => v.error(R, name, Some("rule"), e.to_string()),
            Ok(rule) => {
                if rule.needs_tls() && r.tls.is_none() {
                    v.error(
                        R,
                        name,
                        Some("rule"),
                        "the rule matches on the TLS ClientHello (HostSNI with a name, HostSNIRegexp or ALPN) but the router has no `tls` section: add `tls.passthrough = true` to forward TLS as is, or `tls` to terminate it, or match every connection with HostSNI(`*`)".to_owned(),
                    );
                }
            }
        }
    }
    if r.service.trim().is_empty() {
        v.error(
            R,
            name,
            Some("service"),
            "no `service`: name the service connections go to".to_owned(),
        );
    } else if !d.tcp.services.contains_key(&r.service) {
        v.error(
            R,
            name,
            Some("service"),
            format!(
                "service `{}` does not exist{}",
                r.service,
                known(d.tcp.services.keys())
            ),
        );
    } else if v.is_broken(ResourceKind::Service, &r.service) {
        v.error(
            R,
            name,
            Some("service"),
            format!("service `{}` is invalid (see its error)", r.service),
        );
    }
    for (i, m) in r.middlewares.iter().enumerate() {
        let key = format!("middlewares[{i}]");
        if !d.tcp.middlewares.contains_key(m) {
            v.error(
                R,
                name,
                Some(&key),
                format!(
                    "middleware `{m}` does not exist{}",
                    known(d.tcp.middlewares.keys())
                ),
            );
        } else if v.is_broken(ResourceKind::Middleware, m) {
            v.error(
                R,
                name,
                Some(&key),
                format!("middleware `{m}` is invalid (see its error)"),
            );
        }
    }
    if let Some(st) = st {
        for (i, ep) in r.entry_points.iter().enumerate() {
            if !st.entry_points.contains_key(ep) {
                let eps: Vec<&String> = st.entry_points.keys().collect();
                v.error(
                    R,
                    name,
                    Some(&format!("entryPoints[{i}]")),
                    format!(
                        "entry point `{ep}` does not exist in the static configuration{}",
                        known(eps.into_iter())
                    ),
                );
            }
        }
        if st.entry_points.is_empty() {
            v.error(R, name, Some("entryPoints"), "the static configuration declares no entry points: add `entryPoints.<name>.address`".to_owned());
        }
    }
    if let Some(tls) = &r.tls {
        if tls.cert_resolver.is_some() {
            v.error(
                R,
                name,
                Some("tls.certResolver"),
                "ACME certificate resolvers are not supported: give certificates in `tls.certificates`, or use `tls.passthrough`".to_owned(),
            );
        }
        if let Some(o) = &tls.options
            && o != "default"
            && !d.tls.options.contains_key(o)
        {
            v.error(
                R,
                name,
                Some("tls.options"),
                format!(
                    "tls options `{o}` do not exist{}",
                    known(d.tls.options.keys())
                ),
            );
        }
    }
}

/// Counts of a configuration's resources, for summaries.
pub fn summary(d: &Dynamic) -> String {
    format!(
        "{} routers, {} services, {} middlewares, {} serversTransports, {} TLS certificates",
        d.tcp.routers.len(),
        d.tcp.services.len(),
        d.tcp.middlewares.len(),
        d.tcp.servers_transports.len(),
        d.tls.certificates.len()
    )
}

/// Errors grouped by resource, for reports.
pub fn by_resource(
    errors: &[ResourceError],
) -> BTreeMap<(ResourceKind, &str), Vec<&ResourceError>> {
    let mut m: BTreeMap<(ResourceKind, &str), Vec<&ResourceError>> = BTreeMap::new();
    for e in errors {
        m.entry((e.kind, e.name.as_str())).or_default().push(e);
    }
    m
}
