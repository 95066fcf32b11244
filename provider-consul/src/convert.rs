//! Consul instances and their tags → TCP configuration, as Traefik's consulcatalog provider
//! defines it.
//!
//! Every healthy, enabled instance is one *item*: its tags decode to routers, services,
//! middlewares and servers transports (names unqualified; the gateway qualifies them
//! `@consulcatalog` when it merges providers). Per item:
//!
//! * the item is kept only when `<prefix>.enable` (default `exposedByDefault`) is true, the
//!   constraints match its tags, Connect is allowed for it, and its aggregated health (service and
//!   node checks; maintenance is its own status) is one of `strictChecks`;
//! * it is TCP only when its tags declare TCP routers or services; with routers but no service, a
//!   service named after the normalised Consul service name is created (for a canary, the name
//!   plus a hash of its tags, so canaries get their own service);
//! * each load balancer of the item gets one server: `Service.Address` (else `Node.Address`) and
//!   the port of the tag `…loadBalancer.server.port` (else `Service.Port`); its weight is the tag
//!   `…loadBalancer.server.weight`, else Consul's `Weights.Passing` (`Weights.Warning` while the
//!   instance warns);
//! * a router without a service gets the item's only service (with several, it is an error).
//!
//! Items are then merged as Traefik's `provider.Merge` does: a service defined by several items
//! collects their servers when the rest of its definition is identical; any resource defined
//! differently by two items is reported and dropped, the rest is kept. [`Merger`] does this
//! incrementally: a change to one Consul service recomputes only the resource names it touches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use tagway_config::{
    Dynamic, LoadBalancer, Middleware, Resources, Router, Server, ServersTransport, Service,
    Spiffe, TransportTls,
};

use crate::api::{Health, ServiceEntry};
use crate::constraints::Constraints;

/// What the tag decoder made of one instance's tags.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceTags {
    /// Routers, services, middlewares and servers transports declared by the tags.
    pub config: Dynamic,
    /// `<prefix>.enable`, when given.
    pub enable: Option<bool>,
    /// `<prefix>.consulcatalog.connect`, when given.
    pub connect: Option<bool>,
    /// `<prefix>.consulcatalog.canary`.
    pub canary: bool,
    /// Tags that could not be decoded: `(tag, key, message)`.
    pub errors: Vec<(String, Option<String>, String)>,
}

/// Decodes an instance's tags (the provider uses [`decode_tags`]).
pub type TagDecoder = dyn Fn(&str, &[String]) -> InstanceTags + Send + Sync;

/// Decodes tags with the configuration crate's tag decoder (`tagway_config::tags::decode`).
pub fn decode_tags(prefix: &str, tags: &[String]) -> InstanceTags {
    let d = tagway_config::tags::decode(prefix, tags);
    for w in &d.warnings {
        tracing::debug!(key = %w.key, message = %w.message, "tag ignored");
    }
    InstanceTags {
        config: d.config,
        enable: d.enable,
        connect: d.consul.connect,
        canary: d.consul.canary.unwrap_or(false),
        errors: d
            .errors
            .into_iter()
            .map(|e| (e.tag, e.key, e.message))
            .collect(),
    }
}

/// One problem found while turning the catalog into configuration: a tag that does not decode, an
/// instance that cannot be used, or a resource defined differently by two instances.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct CatalogError {
    /// The Consul service.
    pub service: String,
    /// The instance (`node/id`), when the problem is one instance's.
    pub instance: Option<String>,
    /// The tag at fault, when one is.
    pub tag: Option<String>,
    /// The resource concerned (`tcp.services.web`), when one is.
    pub resource: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Consul service {:?}", self.service)?;
        if let Some(i) = &self.instance {
            write!(f, ", instance {i:?}")?;
        }
        if let Some(r) = &self.resource {
            write!(f, ", {r}")?;
        }
        if let Some(t) = &self.tag {
            write!(f, ", tag {t:?}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for CatalogError {}

/// The provider settings conversion needs.
#[derive(Clone, Debug)]
pub struct ConvertSettings {
    /// Tag prefix (`traefik`).
    pub prefix: String,
    /// Expose services without `<prefix>.enable=true`.
    pub exposed_by_default: bool,
    /// The constraint expression.
    pub constraints: Constraints,
    /// Health statuses that count as healthy.
    pub strict_checks: BTreeSet<Health>,
    /// Consul Connect support enabled.
    pub connect_aware: bool,
    /// Every service is a Connect service unless tagged otherwise.
    pub connect_by_default: bool,
}

impl ConvertSettings {
    /// Reads `strictChecks` (`passing`, `warning`, `critical`, `maintenance`); unknown statuses
    /// are an error naming them.
    pub fn strict_checks(list: &[String]) -> Result<BTreeSet<Health>, String> {
        list.iter()
            .map(|s| match s.trim().to_ascii_lowercase().as_str() {
                "passing" => Ok(Health::Passing),
                "warning" => Ok(Health::Warning),
                "critical" => Ok(Health::Critical),
                "maintenance" => Ok(Health::Maintenance),
                other => Err(format!(
                    "invalid providers.consulCatalog.strictChecks entry {other:?}: expected passing, warning, critical or maintenance"
                )),
            })
            .collect()
    }
}

/// Traefik's `provider.Normalize`: runs of characters other than letters and digits become one
/// `-`, leading and trailing ones are dropped (`my_svc.v2` → `my-svc-v2`).
pub fn normalize(name: &str) -> String {
    name.split(|c: char| !c.is_alphanumeric())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// FNV-1 64-bit (Go's `hash/fnv.New64`), used for canary service names as Traefik does.
fn fnv1_64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        h ^= u64::from(*b);
    }
    h
}

/// The service name Traefik gives an item without declared services.
pub fn default_service_name(consul_name: &str, tags: &[String], canary: bool) -> String {
    if !canary {
        return normalize(consul_name);
    }
    let mut sorted: Vec<&str> = tags.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    normalize(&format!(
        "{consul_name}-{}",
        fnv1_64(sorted.concat().as_bytes())
    ))
}

/// The provider that unqualified references to resources no Consul service defines go to.
pub const FILE_PROVIDER: &str = "file";

/// The prefix of transports the provider adds for Consul Connect services.
pub const CONNECT_TRANSPORT_PREFIX: &str = "connect-";

/// Name of the servers transport of a Connect service.
pub fn connect_transport_name(namespace: Option<&str>, consul_name: &str) -> String {
    match namespace {
        Some(ns) => format!(
            "{CONNECT_TRANSPORT_PREFIX}{}",
            normalize(&format!("{ns}-{consul_name}"))
        ),
        None => format!("{CONNECT_TRANSPORT_PREFIX}{}", normalize(consul_name)),
    }
}

/// `spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<service>`: the identity a Connect backend must
/// present.
pub fn connect_spiffe_id(trust_domain: &str, namespace: &str, dc: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/dc/{dc}/svc/{service}")
}

/// A Consul service's part of the configuration: one [`Item`] per usable instance.
///
/// Kept for every watched service (10,000s of them), so stored compactly: sorted vectors rather
/// than maps (a `BTreeMap` allocates room for 11 entries even for one).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fragment {
    /// The items, keyed by instance (`node/id`), sorted by instance.
    pub items: Vec<(Arc<str>, Arc<Item>)>,
    /// Tag errors and unusable instances.
    pub errors: Vec<CatalogError>,
}

impl Fragment {
    /// The item of an instance (`node/id`).
    pub fn item(&self, instance: &str) -> Option<&Item> {
        self.items
            .binary_search_by(|(k, _)| (**k).cmp(instance))
            .ok()
            .map(|i| &*self.items[i].1)
    }
}

/// Resources of one kind, sorted by name.
pub type Named<T> = Vec<(String, T)>;

fn find<'a, T>(v: &'a Named<T>, name: &str) -> Option<&'a T> {
    v.binary_search_by(|(k, _)| k.as_str().cmp(name))
        .ok()
        .map(|i| &v[i].1)
}

/// One instance's resources, ready to merge (each list sorted by name).
///
/// Instances of a service are usually tagged alike: their lists are shared (one allocation per
/// distinct definition in a fragment) and only the server differs from one item to the next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Item {
    /// Routers.
    pub routers: Arc<Named<Router>>,
    /// Services, their load balancers **without servers**.
    pub services: Arc<Named<Service>>,
    /// This instance's server for each of `services` (same order; `None` for a weighted
    /// service).
    pub servers: Vec<Option<Server>>,
    /// Middlewares.
    pub middlewares: Arc<Named<Middleware>>,
    /// Servers transports (those declared in tags, and the Connect one).
    pub transports: Arc<Named<ServersTransport>>,
}

impl Item {
    /// A router by name.
    pub fn router(&self, name: &str) -> Option<&Router> {
        find(&self.routers, name)
    }

    /// A service by name (without servers) and this instance's server for it.
    pub fn service(&self, name: &str) -> Option<(&Service, Option<&Server>)> {
        let i = self
            .services
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()?;
        Some((
            &self.services[i].1,
            self.servers.get(i).and_then(Option::as_ref),
        ))
    }

    /// A middleware by name.
    pub fn middleware(&self, name: &str) -> Option<&Middleware> {
        find(&self.middlewares, name)
    }

    /// A servers transport by name.
    pub fn transport(&self, name: &str) -> Option<&ServersTransport> {
        find(&self.transports, name)
    }
}

/// Shares equal lists between the items of a fragment.
#[derive(Default)]
struct Interner {
    routers: Vec<Arc<Named<Router>>>,
    services: Vec<Arc<Named<Service>>>,
    middlewares: Vec<Arc<Named<Middleware>>>,
    transports: Vec<Arc<Named<ServersTransport>>>,
}

fn intern<T: PartialEq>(pool: &mut Vec<Arc<Named<T>>>, v: Named<T>) -> Arc<Named<T>> {
    if let Some(a) = pool.iter().find(|a| ***a == v) {
        return a.clone();
    }
    let a = Arc::new(v);
    pool.push(a.clone());
    a
}

/// [`Item`] while it is being built.
#[derive(Default)]
struct ItemBuild {
    routers: BTreeMap<String, Router>,
    services: BTreeMap<String, Service>,
    middlewares: BTreeMap<String, Middleware>,
    transports: BTreeMap<String, ServersTransport>,
}

impl ItemBuild {
    fn finish(self, pool: &mut Interner) -> Item {
        let mut servers = Vec::with_capacity(self.services.len());
        let services: Named<Service> = self
            .services
            .into_iter()
            .map(|(name, mut svc)| {
                servers.push(
                    svc.load_balancer
                        .as_mut()
                        .and_then(|lb| std::mem::take(&mut lb.servers).into_iter().next()),
                );
                (name, svc)
            })
            .collect();
        Item {
            routers: intern(&mut pool.routers, self.routers.into_iter().collect()),
            services: intern(&mut pool.services, services),
            servers,
            middlewares: intern(
                &mut pool.middlewares,
                self.middlewares.into_iter().collect(),
            ),
            transports: intern(&mut pool.transports, self.transports.into_iter().collect()),
        }
    }
}

/// What the provider knows of a Connect service when converting it.
#[derive(Clone, Copy, Debug)]
pub struct ConnectContext<'a> {
    /// The cluster's trust domain (from the CA roots).
    pub trust_domain: &'a str,
    /// The datacenter used when an instance's node does not say (the configured one, else the
    /// gateway leaf's).
    pub datacenter: Option<&'a str>,
}

/// One Consul service to convert.
#[derive(Clone, Copy, Debug)]
pub struct ServiceInput<'a> {
    /// The Consul service name.
    pub name: &'a str,
    /// The Enterprise namespace when namespaces are configured.
    pub namespace: Option<&'a str>,
    /// Its instances as `/v1/health/service` (or `/v1/health/connect`) returned them.
    pub entries: &'a [ServiceEntry],
    /// `Some` when the service is reached through Connect.
    pub connect: Option<ConnectContext<'a>>,
}

/// Converts one Consul service's instances.
pub fn convert_service(
    input: ServiceInput<'_>,
    settings: &ConvertSettings,
    decode: &TagDecoder,
) -> Fragment {
    let mut frag = Fragment::default();
    // Instances of a service usually share their tags: decode each distinct set once.
    let mut decoded: HashMap<&[String], Arc<InstanceTags>> = HashMap::new();
    let mut pool = Interner::default();
    for entry in input.entries {
        let instance = format!("{}/{}", entry.node.node, entry.service.id);
        let err = |tag: Option<String>, resource: Option<String>, message: String| CatalogError {
            service: input.name.to_owned(),
            instance: Some(instance.clone()),
            tag,
            resource,
            message,
        };
        let tags = decoded
            .entry(entry.service.tags.as_slice())
            .or_insert_with(|| Arc::new(decode(&settings.prefix, &entry.service.tags)))
            .clone();
        for (tag, key, message) in &tags.errors {
            frag.errors
                .push(err(Some(tag.clone()), key.clone(), message.clone()));
        }
        if !tags.enable.unwrap_or(settings.exposed_by_default) {
            tracing::debug!(service = input.name, instance, "instance not enabled");
            continue;
        }
        let item_connect = tags.connect.unwrap_or(settings.connect_by_default);
        if item_connect && !settings.connect_aware {
            tracing::debug!(
                service = input.name,
                instance,
                "Connect instance skipped: connectAware is off"
            );
            continue;
        }
        if !settings.constraints.matches(&entry.service.tags) {
            tracing::debug!(
                service = input.name,
                instance,
                constraints = settings.constraints.as_str(),
                "instance pruned by constraints"
            );
            continue;
        }
        let health = Health::aggregate(&entry.checks);
        if !settings.strict_checks.contains(&health) {
            tracing::debug!(
                service = input.name,
                instance,
                status = health.as_str(),
                "instance not healthy"
            );
            continue;
        }
        match build_item(input, entry, &tags, health) {
            Ok(item) => {
                frag.items.push((
                    Arc::from(instance.as_str()),
                    Arc::new(item.0.finish(&mut pool)),
                ));
                for (resource, message) in item.1 {
                    frag.errors.push(err(None, Some(resource), message));
                }
            }
            Err((resource, message)) => frag.errors.push(err(None, resource, message)),
        }
    }
    frag.items.sort_by(|a, b| a.0.cmp(&b.0));
    frag.items.dedup_by(|a, b| a.0 == b.0);
    frag
}

/// A copy of `r` to change.
fn owned<T: Clone>(r: &Resources<T>) -> BTreeMap<String, T> {
    r.iter().map(|(k, v)| (k.clone(), T::clone(v))).collect()
}

type ItemResult = Result<(ItemBuild, Vec<(String, String)>), (Option<String>, String)>;

fn build_item(
    input: ServiceInput<'_>,
    entry: &ServiceEntry,
    tags: &InstanceTags,
    health: Health,
) -> ItemResult {
    let tcp = &tags.config.tcp;
    let mut item = ItemBuild {
        routers: owned(&tcp.routers),
        services: owned(&tcp.services),
        middlewares: owned(&tcp.middlewares),
        transports: owned(&tcp.servers_transports),
    };
    let mut warnings = Vec::new();
    let is_tcp = !item.routers.is_empty() || !item.services.is_empty();
    if !is_tcp {
        return Ok((item, warnings));
    }
    if item.services.is_empty() {
        item.services.insert(
            default_service_name(input.name, &entry.service.tags, tags.canary),
            Service {
                load_balancer: Some(LoadBalancer::default()),
                weighted: None,
            },
        );
    }

    let address = if entry.service.address.is_empty() {
        &entry.node.address
    } else {
        &entry.service.address
    };
    if address.is_empty() {
        return Err((
            None,
            "address is missing (no Service.Address nor Node.Address)".into(),
        ));
    }
    let weights = entry.service.weights.unwrap_or_default();
    let consul_weight = if health == Health::Warning {
        weights.warning
    } else {
        weights.passing
    };

    let connect_transport = input
        .connect
        .map(|_| connect_transport_name(input.namespace, input.name));
    for (name, svc) in item.services.iter_mut() {
        let resource = format!("tcp.services.{name}");
        if svc.weighted.is_some() {
            continue;
        }
        let lb = svc.load_balancer.get_or_insert_with(LoadBalancer::default);
        let template = lb.server.take().unwrap_or_default();
        if !lb.servers.is_empty() {
            warnings.push((
                resource.clone(),
                "loadBalancer.servers in tags are ignored: servers come from Consul (use loadBalancer.server.port / .weight)".into(),
            ));
        }
        let port = match template.port.as_deref().map(str::trim) {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                (
                    Some(format!("{resource}.loadBalancer.server.port")),
                    format!("invalid port {p:?}"),
                )
            })?,
            None if entry.service.port != 0 => entry.service.port,
            None => return Err((Some(resource), "port is missing".into())),
        };
        let weight = template.weight.unwrap_or(consul_weight);
        let mut server = Server {
            address: join_host_port(address, port),
            weight: (weight != 1).then_some(weight),
            tls: template.tls.unwrap_or(false),
        };
        if let Some(t) = &connect_transport {
            lb.servers_transport = Some(t.clone());
            server.tls = true;
        }
        lb.servers = vec![server];
    }

    if let (Some(name), Some(ctx)) = (&connect_transport, input.connect) {
        // PROXY protocol asked on a Connect service's load balancer goes to its transport, with
        // the header inside the mTLS stream (what a Connect sidecar reads after terminating TLS).
        let proxy_protocol = item
            .services
            .values_mut()
            .filter_map(|s| s.load_balancer.as_mut())
            .find_map(|lb| lb.proxy_protocol.take())
            .map(|mut p| {
                p.inside_tls = true;
                p
            });
        let ns = if entry.service.namespace.is_empty() {
            "default"
        } else {
            &entry.service.namespace
        };
        let dc = if entry.node.datacenter.is_empty() {
            ctx.datacenter.unwrap_or_default()
        } else {
            &entry.node.datacenter
        };
        if dc.is_empty() {
            return Err((
                None,
                "the instance's datacenter is unknown (set providers.consulCatalog.endpoint.datacenter)".into(),
            ));
        }
        item.transports.insert(
            name.clone(),
            ServersTransport {
                proxy_protocol,
                tls: Some(TransportTls::default()),
                spiffe: Some(Spiffe {
                    ids: vec![connect_spiffe_id(ctx.trust_domain, ns, dc, input.name)],
                    trust_domain: None,
                }),
                ..ServersTransport::default()
            },
        );
    }

    // A router without a service gets the item's only service.
    let only_service = (item.services.len() == 1)
        .then(|| item.services.keys().next().cloned())
        .flatten();
    let mut orphans = Vec::new();
    for (name, router) in item.routers.iter_mut() {
        if router.service.trim().is_empty() {
            match &only_service {
                Some(s) => router.service = s.clone(),
                None => orphans.push(name.clone()),
            }
        }
    }
    for name in orphans {
        item.routers.remove(&name);
        warnings.push((
            format!("tcp.routers.{name}"),
            format!(
                "the router names no service and the tags declare several ({}): set tcp.routers.{name}.service",
                item.services.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    Ok((item, warnings))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Router,
    Service,
    Middleware,
    Transport,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Router,
        Kind::Service,
        Kind::Middleware,
        Kind::Transport,
    ];

    fn section(self) -> &'static str {
        match self {
            Kind::Router => "tcp.routers",
            Kind::Service => "tcp.services",
            Kind::Middleware => "tcp.middlewares",
            Kind::Transport => "tcp.serversTransports",
        }
    }

    fn names(self, item: &Item) -> Vec<&String> {
        match self {
            Kind::Router => item.routers.iter().map(|(k, _)| k).collect(),
            Kind::Service => item.services.iter().map(|(k, _)| k).collect(),
            Kind::Middleware => item.middlewares.iter().map(|(k, _)| k).collect(),
            Kind::Transport => item.transports.iter().map(|(k, _)| k).collect(),
        }
    }
}

/// The owner of an item: (Consul service key, instance).
type Owner = (Arc<str>, Arc<str>);

/// Keeps every Consul service's fragment and the merged configuration, recomputing only the
/// resource names a change touches.
#[derive(Debug, Default)]
pub struct Merger {
    fragments: HashMap<Arc<str>, Fragment>,
    /// Who defines each resource name, sorted (usually one to a few owners).
    owners: HashMap<(Kind, String), Vec<Owner>>,
    /// Shared with the last published snapshot; cloned on the first change after a publication
    /// (so only one copy is kept at rest).
    merged: Arc<Dynamic>,
    conflicts: BTreeMap<(Kind, String), CatalogError>,
    /// Who references what in `merged`: `(kind, name)` → the routers and services whose
    /// reference to it carries no provider, this provider's or the file provider's. Kept as the
    /// merged routers and services change, so that a name appearing or disappearing finds its
    /// referrers without a walk over every router and service.
    /// (Usually one referrer each: a sorted `Vec`, not a set with its node per name.)
    referrers: HashMap<(Kind, String), Vec<(Kind, String)>>,
}

impl Merger {
    /// An empty merger.
    pub fn new() -> Merger {
        Merger::default()
    }

    /// Replaces (or with `None` removes) the fragment of the Consul service `key`. Returns true
    /// when the merged configuration or the errors changed.
    pub fn set(&mut self, key: &str, fragment: Option<Fragment>) -> bool {
        let key: Arc<str> = match self.fragments.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        let old = match fragment {
            Some(f) => {
                if self.fragments.get(&key) == Some(&f) {
                    return false;
                }
                self.fragments.insert(key.clone(), f)
            }
            None => self.fragments.remove(&key),
        };
        let mut touched: BTreeSet<(Kind, String)> = BTreeSet::new();
        if let Some(old) = &old {
            for (inst, item) in &old.items {
                let owner = (key.clone(), inst.clone());
                for kind in Kind::ALL {
                    for name in kind.names(item) {
                        let k = (kind, name.clone());
                        if let Some(list) = self.owners.get_mut(&k) {
                            if let Ok(i) = list.binary_search(&owner) {
                                list.remove(i);
                            }
                            if list.is_empty() {
                                self.owners.remove(&k);
                            }
                        }
                        touched.insert(k);
                    }
                }
            }
        }
        if let Some(new) = self.fragments.get(&key) {
            for (inst, item) in &new.items {
                let owner = (key.clone(), inst.clone());
                for kind in Kind::ALL {
                    for name in kind.names(item) {
                        let k = (kind, name.clone());
                        let list = self.owners.entry(k.clone()).or_default();
                        if let Err(i) = list.binary_search(&owner) {
                            list.insert(i, owner.clone());
                        }
                        touched.insert(k);
                    }
                }
            }
        }
        let mut appeared_or_gone = Vec::new();
        for (kind, name) in touched {
            let had = self.defines(kind, &name);
            self.recompute(kind, &name);
            if had != self.defines(kind, &name) && kind != Kind::Router {
                appeared_or_gone.push((kind, name));
            }
        }
        // References to a name that appeared or disappeared resolve differently now.
        for (kind, name) in appeared_or_gone {
            for (k, n) in self.referencing(kind, &name) {
                self.recompute(k, &n);
            }
        }
        true
    }

    fn defines(&self, kind: Kind, name: &str) -> bool {
        let tcp = &self.merged.tcp;
        match kind {
            Kind::Router => tcp.routers.contains_key(name),
            Kind::Service => tcp.services.contains_key(name),
            Kind::Middleware => tcp.middlewares.contains_key(name),
            Kind::Transport => tcp.servers_transports.contains_key(name),
        }
    }

    /// Routers and services of the merged configuration that reference `name` of `kind` without
    /// a provider (as written, or as resolved to the file provider's).
    fn referencing(&self, kind: Kind, name: &str) -> Vec<(Kind, String)> {
        self.referrers
            .get(&(kind, name.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// What the merged router or service `(kind, name)` references, by unqualified name (the
    /// references to other providers than this one and the file provider are not tracked).
    fn references(&self, kind: Kind, name: &str) -> Vec<(Kind, String)> {
        let base = |r: &str| -> Option<String> {
            let b = match r.split_once('@') {
                None => r,
                Some((b, p)) if p == FILE_PROVIDER || p == crate::PROVIDER_NAME => b,
                Some(_) => return None,
            };
            (!b.is_empty()).then(|| b.to_owned())
        };
        let tcp = &self.merged.tcp;
        let mut out = Vec::new();
        match kind {
            Kind::Router => {
                if let Some(r) = tcp.routers.get(name) {
                    out.extend(base(&r.service).map(|n| (Kind::Service, n)));
                    out.extend(
                        r.middlewares
                            .iter()
                            .filter_map(|m| base(m).map(|n| (Kind::Middleware, n))),
                    );
                }
            }
            Kind::Service => {
                if let Some(s) = tcp.services.get(name) {
                    if let Some(t) = s
                        .load_balancer
                        .as_ref()
                        .and_then(|lb| lb.servers_transport.as_deref())
                    {
                        out.extend(base(t).map(|n| (Kind::Transport, n)));
                    }
                    if let Some(w) = &s.weighted {
                        out.extend(
                            w.services
                                .iter()
                                .filter_map(|x| base(&x.name).map(|n| (Kind::Service, n))),
                        );
                    }
                }
            }
            Kind::Middleware | Kind::Transport => {}
        }
        out
    }

    /// Qualifies an unqualified reference: with this provider's name when a Consul service
    /// defines the resource, else with the file provider's (the seeds'
    /// ``…loadBalancer.serversTransport=mytransport`` with `mytransport` in a file works as
    /// written). Published resources are thereby already qualified, and merging them with the
    /// other providers' shares them instead of copying them.
    fn resolve(&self, kind: Kind, reference: &mut String) {
        if reference.is_empty() || reference.contains('@') {
            return;
        }
        let provider = if self.owners.contains_key(&(kind, reference.clone())) {
            crate::PROVIDER_NAME
        } else {
            FILE_PROVIDER
        };
        reference.push('@');
        reference.push_str(provider);
    }

    fn resolve_router(&self, r: &mut Router) {
        self.resolve(Kind::Service, &mut r.service);
        for m in &mut r.middlewares {
            self.resolve(Kind::Middleware, m);
        }
    }

    fn resolve_service(&self, s: &mut Service) {
        if let Some(t) = s
            .load_balancer
            .as_mut()
            .and_then(|lb| lb.servers_transport.as_mut())
        {
            self.resolve(Kind::Transport, t);
        }
        if let Some(w) = &mut s.weighted {
            for x in &mut w.services {
                self.resolve(Kind::Service, &mut x.name);
            }
        }
    }

    /// The Consul services (keys) that have a fragment.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.fragments.keys().map(|k| &**k)
    }

    /// The merged configuration.
    pub fn merged(&self) -> &Dynamic {
        &self.merged
    }

    /// The merged configuration, to publish (no copy: the next change copies it once).
    pub fn snapshot(&self) -> Arc<Dynamic> {
        self.merged.clone()
    }

    /// Every current problem: tag errors, unusable instances, conflicting definitions.
    pub fn errors(&self) -> Vec<CatalogError> {
        let mut out: Vec<CatalogError> = self
            .fragments
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .chain(self.conflicts.values().cloned())
            .collect();
        out.sort();
        out
    }

    fn item(&self, owner: &Owner) -> Option<&Item> {
        self.fragments.get(&owner.0).and_then(|f| f.item(&owner.1))
    }

    /// Recomputes the merged `(kind, name)` from its owners, and keeps [`Merger::referrers`] up
    /// to date with what it references now.
    fn recompute(&mut self, kind: Kind, name: &str) {
        let before = self.references(kind, name);
        self.recompute_resource(kind, name);
        let after = self.references(kind, name);
        if before == after {
            return;
        }
        let me = (kind, name.to_owned());
        for target in before {
            if let Some(list) = self.referrers.get_mut(&target) {
                if let Ok(i) = list.binary_search(&me) {
                    list.remove(i);
                }
                if list.is_empty() {
                    self.referrers.remove(&target);
                }
            }
        }
        for target in after {
            let list = self.referrers.entry(target).or_default();
            if let Err(i) = list.binary_search(&me) {
                list.insert(i, me.clone());
            }
        }
    }

    fn recompute_resource(&mut self, kind: Kind, name: &str) {
        let key = (kind, name.to_owned());
        self.conflicts.remove(&key);
        let owners: Vec<Owner> = self.owners.get(&key).cloned().unwrap_or_default();
        if owners.is_empty() {
            let tcp = &mut Arc::make_mut(&mut self.merged).tcp;
            match kind {
                Kind::Router => tcp.routers.remove(name).map(drop),
                Kind::Service => tcp.services.remove(name).map(drop),
                Kind::Middleware => tcp.middlewares.remove(name).map(drop),
                Kind::Transport => tcp.servers_transports.remove(name).map(drop),
            };
            return;
        }
        let mut conflict: Option<(Owner, Owner)> = None;
        macro_rules! fold_equal {
            ($field:ident, $map:ident, $fix:expr) => {{
                let first = self.item(&owners[0]).and_then(|i| i.$field(name)).cloned();
                for o in &owners[1..] {
                    if self.item(o).and_then(|i| i.$field(name)) != first.as_ref() {
                        conflict = Some((owners[0].clone(), o.clone()));
                        break;
                    }
                }
                let first = first.map(|mut v| {
                    $fix(&*self, &mut v);
                    v
                });
                let tcp = &mut Arc::make_mut(&mut self.merged).tcp;
                put(&mut tcp.$map, name, first.filter(|_| conflict.is_none()));
            }};
        }
        match kind {
            Kind::Router => fold_equal!(router, routers, Merger::resolve_router),
            Kind::Middleware => {
                fold_equal!(middleware, middlewares, |_: &Merger, _: &mut Middleware| {})
            }
            Kind::Transport => {
                fold_equal!(
                    transport,
                    servers_transports,
                    |_: &Merger, _: &mut ServersTransport| {}
                )
            }
            Kind::Service => {
                let mut acc: Option<Service> = None;
                let mut template: Option<&Service> = None;
                let mut seen = BTreeSet::new();
                for o in &owners {
                    let Some((s, server)) = self.item(o).and_then(|i| i.service(name)) else {
                        continue;
                    };
                    match template {
                        None => {
                            template = Some(s);
                            acc = Some(s.clone());
                        }
                        Some(t) if !std::ptr::eq(t, s) && t != s => {
                            conflict = Some((owners[0].clone(), o.clone()));
                            break;
                        }
                        Some(_) => {}
                    }
                    if let (Some(a), Some(server)) = (&mut acc, server)
                        && let Some(lb) = &mut a.load_balancer
                        && seen.insert(server.address.as_str())
                    {
                        lb.servers.push(server.clone());
                    }
                }
                let acc = acc.map(|mut v| {
                    self.resolve_service(&mut v);
                    v
                });
                let tcp = &mut Arc::make_mut(&mut self.merged).tcp;
                put(&mut tcp.services, name, acc.filter(|_| conflict.is_none()));
            }
        }
        if let Some((a, b)) = conflict {
            let services: BTreeSet<&str> = owners.iter().map(|o| &*o.0).collect();
            let service = services.into_iter().collect::<Vec<_>>().join(", ");
            self.conflicts.insert(
                key,
                CatalogError {
                    service,
                    instance: Some(b.1.to_string()),
                    tag: None,
                    resource: Some(format!("{}.{name}", kind.section())),
                    message: format!(
                        "defined differently by instances {:?} and {:?}: the resource is skipped until their tags agree",
                        &*a.1, &*b.1
                    ),
                },
            );
        }
    }
}

/// Sets (or with `None` removes) `name` in `map`, keeping the resource in place when it is
/// unchanged: what the previous publication holds stays shared with the next one.
fn put<T: PartialEq>(map: &mut Resources<T>, name: &str, value: Option<T>) {
    match value {
        Some(v) if map.get(name).is_some_and(|cur| **cur == v) => {}
        Some(v) => {
            map.insert(name.to_owned(), v);
        }
        None => {
            map.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use tagway_config::{ServerTemplate, Weighted, WeightedService};

    use super::*;
    use crate::api::{AgentService, HealthCheck, Node, Weights};

    /// A decoder for these tests: `r=<router>:<rule>[:<service>]`, `s=<service>`,
    /// `port=<p>`, `weight=<w>`, `enable=<b>`, `connect=<b>`, `canary`, `transport=<name>`,
    /// `bad=<msg>` — the real decoder is tested in the config crate and end to end.
    fn decoder() -> Box<TagDecoder> {
        Box::new(|_prefix: &str, tags: &[String]| {
            let mut out = InstanceTags::default();
            let mut template = ServerTemplate::default();
            let mut lb_services = Vec::new();
            let mut transport = None;
            for t in tags {
                let (k, v) = t.split_once('=').unwrap_or((t.as_str(), ""));
                match k {
                    "r" => {
                        let mut p = v.split(':');
                        let name = p.next().unwrap().to_owned();
                        let rule = p.next().unwrap_or("HostSNI(`*`)").to_owned();
                        let service = p.next().unwrap_or("").to_owned();
                        out.config.tcp.routers.insert(
                            name,
                            Router {
                                rule,
                                service,
                                ..Default::default()
                            },
                        );
                    }
                    "s" => lb_services.push(v.to_owned()),
                    "port" => template.port = Some(v.to_owned()),
                    "weight" => template.weight = Some(v.parse().unwrap()),
                    "enable" => out.enable = Some(v == "true"),
                    "connect" => out.connect = Some(v == "true"),
                    "canary" => out.canary = true,
                    "transport" => transport = Some(v.to_owned()),
                    "weighted" => {
                        out.config.tcp.services.insert(
                            "split".into(),
                            Service {
                                load_balancer: None,
                                weighted: Some(Weighted {
                                    services: vec![WeightedService {
                                        name: v.into(),
                                        weight: Some(2),
                                    }],
                                }),
                            },
                        );
                    }
                    "bad" => out.errors.push((t.clone(), None, v.to_owned())),
                    _ => {}
                }
            }
            let has_template = template != ServerTemplate::default();
            if lb_services.is_empty() && (has_template || transport.is_some()) {
                lb_services.push("svc".into());
            }
            for s in lb_services {
                out.config.tcp.services.insert(
                    s,
                    Service {
                        load_balancer: Some(LoadBalancer {
                            server: has_template.then(|| template.clone()),
                            servers_transport: transport.clone(),
                            ..Default::default()
                        }),
                        weighted: None,
                    },
                );
            }
            out
        })
    }

    fn settings() -> ConvertSettings {
        ConvertSettings {
            prefix: "traefik".into(),
            exposed_by_default: true,
            constraints: Constraints::none(),
            strict_checks: [Health::Passing, Health::Warning].into(),
            connect_aware: false,
            connect_by_default: false,
        }
    }

    fn entry(id: &str, addr: &str, port: u16, tags: &[&str], status: &str) -> ServiceEntry {
        ServiceEntry {
            node: Node {
                node: "node1".into(),
                address: "10.0.0.1".into(),
                datacenter: "dc1".into(),
                ..Default::default()
            },
            service: AgentService {
                id: id.into(),
                service: "My_Web.app".into(),
                tags: tags.iter().map(|s| s.to_string()).collect(),
                address: addr.into(),
                port,
                ..Default::default()
            },
            checks: vec![HealthCheck {
                check_id: format!("service:{id}"),
                status: status.into(),
                service_id: id.into(),
                ..Default::default()
            }],
        }
    }

    fn convert(entries: &[ServiceEntry], s: &ConvertSettings) -> Fragment {
        convert_service(
            ServiceInput {
                name: "My_Web.app",
                namespace: None,
                entries,
                connect: None,
            },
            s,
            &*decoder(),
        )
    }

    #[test]
    fn a_change_keeps_every_untouched_resource_shared_with_the_last_snapshot() {
        let s = settings();
        let mut m = Merger::new();
        m.set(
            "a",
            Some(convert(
                &[entry("a1", "10.1.0.1", 1, &["r=ra", "s=sa"], "passing")],
                &s,
            )),
        );
        m.set(
            "b",
            Some(convert(
                &[entry("b1", "10.1.0.2", 1, &["r=rb", "s=sb"], "passing")],
                &s,
            )),
        );
        let before = m.snapshot();
        m.set(
            "b",
            Some(convert(
                &[entry("b1", "10.1.0.2", 2, &["r=rb", "s=sb"], "passing")],
                &s,
            )),
        );
        let after = m.snapshot();
        let (b, a) = (&before.tcp, &after.tcp);
        assert!(Arc::ptr_eq(&b.routers["ra"], &a.routers["ra"]));
        assert!(Arc::ptr_eq(&b.services["sa"], &a.services["sa"]));
        assert!(
            Arc::ptr_eq(&b.routers["rb"], &a.routers["rb"]),
            "recomputed but equal: kept"
        );
        assert!(!Arc::ptr_eq(&b.services["sb"], &a.services["sb"]));
        assert_eq!(
            a.services["sb"].load_balancer.as_ref().unwrap().servers[0].address,
            "10.1.0.2:2"
        );
    }

    fn merged(frag: Fragment) -> (Dynamic, Vec<CatalogError>) {
        let mut m = Merger::new();
        m.set("web", Some(frag));
        (m.merged().clone(), m.errors())
    }

    #[test]
    fn normalize_matches_traefik() {
        assert_eq!(normalize("My_Web.app"), "My-Web-app");
        assert_eq!(normalize("--a..b--"), "a-b");
        assert_eq!(normalize("héllo wörld"), "héllo-wörld");
        assert_eq!(normalize("simple"), "simple");
    }

    #[test]
    fn fnv1_matches_go() {
        // Go: fnv.New64().Write([]byte("hello")) → 0x7b495389bdbdd4c7
        assert_eq!(fnv1_64(b"hello"), 0x7b49_5389_bdbd_d4c7);
        assert_eq!(fnv1_64(b""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn router_without_service_gets_the_default_service_with_all_instances() {
        let entries = [
            entry("a", "10.1.0.1", 5432, &["r=db:HostSNI(`*`)"], "passing"),
            entry("b", "", 5433, &["r=db:HostSNI(`*`)"], "passing"),
        ];
        let (d, errors) = merged(convert(&entries, &settings()));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(d.tcp.routers["db"].service, "My-Web-app@consulcatalog");
        let lb = d.tcp.services["My-Web-app"].load_balancer.as_ref().unwrap();
        let addrs: Vec<&str> = lb.servers.iter().map(|s| s.address.as_str()).collect();
        assert_eq!(
            addrs,
            ["10.1.0.1:5432", "10.0.0.1:5433"],
            "Service.Address else Node.Address"
        );
        assert!(lb.server.is_none(), "the template never reaches the output");
    }

    #[test]
    fn port_and_weight_from_tags_else_consul() {
        let mut a = entry(
            "a",
            "10.1.0.1",
            5432,
            &["r=db", "port=6000", "weight=5"],
            "passing",
        );
        a.service.weights = Some(Weights {
            passing: 9,
            warning: 2,
        });
        let mut b = entry("b", "10.1.0.2", 5432, &["r=db", "port=6000"], "passing");
        b.service.weights = Some(Weights {
            passing: 9,
            warning: 2,
        });
        let mut c = entry("c", "10.1.0.3", 5432, &["r=db", "port=6000"], "warning");
        c.service.weights = Some(Weights {
            passing: 9,
            warning: 2,
        });
        let (d, errors) = merged(convert(&[a, b, c], &settings()));
        assert!(errors.is_empty(), "{errors:?}");
        let lb = d.tcp.services["svc"].load_balancer.as_ref().unwrap();
        let got: Vec<(&str, i64)> = lb
            .servers
            .iter()
            .map(|s| (s.address.as_str(), s.weight()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.1.0.1:6000", 5),
                ("10.1.0.2:6000", 9),
                ("10.1.0.3:6000", 2)
            ]
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let (d, _) = merged(convert(
            &[entry("a", "fd00::1", 80, &["r=x"], "passing")],
            &settings(),
        ));
        assert_eq!(
            d.tcp.services["My-Web-app"]
                .load_balancer
                .as_ref()
                .unwrap()
                .servers[0]
                .address,
            "[fd00::1]:80"
        );
    }

    #[test]
    fn health_filtering_by_strict_checks_and_maintenance() {
        let mut maint = entry("m", "10.1.0.4", 1, &["r=db"], "passing");
        maint.checks.push(HealthCheck {
            check_id: "_node_maintenance".into(),
            status: "critical".into(),
            ..Default::default()
        });
        let entries = [
            entry("p", "10.1.0.1", 1, &["r=db"], "passing"),
            entry("w", "10.1.0.2", 1, &["r=db"], "warning"),
            entry("c", "10.1.0.3", 1, &["r=db"], "critical"),
            maint,
        ];
        let addrs = |s: &ConvertSettings| {
            let (d, _) = merged(convert(&entries, s));
            d.tcp.services["My-Web-app"]
                .load_balancer
                .as_ref()
                .unwrap()
                .servers
                .iter()
                .map(|s| s.address.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(addrs(&settings()), ["10.1.0.1:1", "10.1.0.2:1"]);
        let mut strict = settings();
        strict.strict_checks = [Health::Passing].into();
        assert_eq!(addrs(&strict), ["10.1.0.1:1"]);
        let mut lax = settings();
        lax.strict_checks = [Health::Passing, Health::Warning, Health::Critical].into();
        assert_eq!(
            addrs(&lax),
            ["10.1.0.1:1", "10.1.0.2:1", "10.1.0.3:1"],
            "maintenance stays out unless listed"
        );
    }

    #[test]
    fn enable_exposed_by_default_and_constraints() {
        let entries = [
            entry("a", "10.1.0.1", 1, &["r=db", "env=prod"], "passing"),
            entry("b", "10.1.0.2", 1, &["r=db", "enable=false"], "passing"),
            entry("c", "10.1.0.3", 1, &["r=db", "enable=true"], "passing"),
        ];
        let addrs = |s: &ConvertSettings| {
            let (d, _) = merged(convert(&entries, s));
            d.tcp
                .services
                .get("My-Web-app")
                .map(|s| {
                    s.load_balancer
                        .as_ref()
                        .unwrap()
                        .servers
                        .iter()
                        .map(|s| s.address.clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        assert_eq!(addrs(&settings()), ["10.1.0.1:1", "10.1.0.3:1"]);
        let mut s = settings();
        s.exposed_by_default = false;
        assert_eq!(addrs(&s), ["10.1.0.3:1"]);
        let mut s = settings();
        s.constraints = Constraints::parse("Tag(`env=prod`)").unwrap();
        assert_eq!(addrs(&s), ["10.1.0.1:1"]);
    }

    #[test]
    fn canaries_get_their_own_service() {
        let entries = [
            entry("a", "10.1.0.1", 1, &["r=db"], "passing"),
            entry("b", "10.1.0.2", 1, &["canary", "r2=x"], "passing"),
        ];
        let frag = convert(&entries, &settings());
        let canary_item = frag.item("node1/b").unwrap();
        assert!(canary_item.services.is_empty(), "no tcp tags on b: not TCP");
        let entries = [
            entry("a", "10.1.0.1", 1, &["r=db"], "passing"),
            entry(
                "b",
                "10.1.0.2",
                1,
                &["canary", "r=canary:HostSNI(`c`)"],
                "passing",
            ),
        ];
        let (d, errors) = merged(convert(&entries, &settings()));
        assert!(errors.is_empty(), "{errors:?}");
        let canary_name = default_service_name(
            "My_Web.app",
            &["canary".into(), "r=canary:HostSNI(`c`)".into()],
            true,
        );
        assert!(canary_name.starts_with("My-Web-app-"), "{canary_name}");
        assert_eq!(
            d.tcp.routers["canary"].service,
            format!("{canary_name}@consulcatalog")
        );
        assert_eq!(d.tcp.routers["db"].service, "My-Web-app@consulcatalog");
        assert_eq!(
            d.tcp.services[&canary_name]
                .load_balancer
                .as_ref()
                .unwrap()
                .servers[0]
                .address,
            "10.1.0.2:1"
        );
    }

    #[test]
    fn disagreeing_instances_skip_only_that_resource() {
        let entries = [
            entry(
                "a",
                "10.1.0.1",
                1,
                &["r=db:HostSNI(`a`)", "r=other:HostSNI(`o`)"],
                "passing",
            ),
            entry(
                "b",
                "10.1.0.2",
                1,
                &["r=db:HostSNI(`b`)", "r=other:HostSNI(`o`)"],
                "passing",
            ),
        ];
        let (d, errors) = merged(convert(&entries, &settings()));
        assert!(!d.tcp.routers.contains_key("db"));
        assert_eq!(d.tcp.routers["other"].rule, "HostSNI(`o`)");
        assert_eq!(
            d.tcp.services["My-Web-app"]
                .load_balancer
                .as_ref()
                .unwrap()
                .servers
                .len(),
            2
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(e.resource.as_deref(), Some("tcp.routers.db"));
        assert_eq!(e.service, "web");
        let text = e.to_string();
        assert!(
            text.contains("node1/a") && text.contains("node1/b"),
            "{text}"
        );
    }

    #[test]
    fn differing_load_balancer_settings_are_a_conflict_but_servers_and_weights_are_not() {
        let entries = [
            entry(
                "a",
                "10.1.0.1",
                1,
                &["s=x", "r=r", "transport=t1"],
                "passing",
            ),
            entry(
                "b",
                "10.1.0.2",
                1,
                &["s=x", "r=r", "transport=t2"],
                "passing",
            ),
        ];
        let (d, errors) = merged(convert(&entries, &settings()));
        assert!(!d.tcp.services.contains_key("x"));
        assert_eq!(errors[0].resource.as_deref(), Some("tcp.services.x"));
    }

    #[test]
    fn a_router_with_several_services_to_choose_from_is_reported() {
        let (d, errors) = merged(convert(
            &[entry("a", "10.1.0.1", 1, &["s=x", "s=y", "r=r"], "passing")],
            &settings(),
        ));
        assert!(d.tcp.routers.is_empty());
        assert_eq!(d.tcp.services.len(), 2);
        assert_eq!(errors[0].resource.as_deref(), Some("tcp.routers.r"));
        assert!(errors[0].message.contains("x, y"), "{}", errors[0]);
    }

    #[test]
    fn tag_errors_are_reported_and_other_tags_kept() {
        let (d, errors) = merged(convert(
            &[entry(
                "a",
                "10.1.0.1",
                1,
                &["r=db", "bad=unknown key"],
                "passing",
            )],
            &settings(),
        ));
        assert!(d.tcp.routers.contains_key("db"));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].tag.as_deref(), Some("bad=unknown key"));
        assert_eq!(errors[0].instance.as_deref(), Some("node1/a"));
    }

    #[test]
    fn unusable_instances_are_reported() {
        let mut e = entry("a", "", 0, &["r=db"], "passing");
        e.node.address.clear();
        let (_, errors) = merged(convert(&[e], &settings()));
        assert!(
            errors[0].message.contains("address is missing"),
            "{errors:?}"
        );
        let (_, errors) = merged(convert(
            &[entry("a", "10.0.0.9", 0, &["r=db"], "passing")],
            &settings(),
        ));
        assert!(errors[0].message.contains("port is missing"), "{errors:?}");
        let (_, errors) = merged(convert(
            &[entry(
                "a",
                "10.0.0.9",
                1,
                &["r=db", "port=99999"],
                "passing",
            )],
            &settings(),
        ));
        assert!(errors[0].message.contains("invalid port"), "{errors:?}");
    }

    #[test]
    fn references_to_resources_no_consul_service_defines_go_to_the_file_provider() {
        let (d, errors) = merged(convert(
            &[entry(
                "a",
                "10.1.0.1",
                1,
                &["r=db", "transport=mytransport"],
                "passing",
            )],
            &settings(),
        ));
        assert!(errors.is_empty(), "{errors:?}");
        let lb = d.tcp.services["svc"].load_balancer.as_ref().unwrap();
        assert_eq!(lb.servers_transport.as_deref(), Some("mytransport@file"));
        assert_eq!(
            d.tcp.routers["db"].service, "svc@consulcatalog",
            "defined here: this provider's"
        );

        // Once a Consul service defines the transport, the reference is its.
        let mut m = Merger::new();
        m.set(
            "web",
            Some(convert(
                &[entry(
                    "a",
                    "10.1.0.1",
                    1,
                    &["r=db", "transport=mytransport"],
                    "passing",
                )],
                &settings(),
            )),
        );
        let mut other = convert(&[entry("b", "10.1.0.2", 1, &[], "passing")], &settings());
        other.items[0].1 = Arc::new(Item {
            transports: Arc::new(vec![("mytransport".into(), ServersTransport::default())]),
            ..Default::default()
        });
        m.set("other", Some(other));
        let lb = m.merged().tcp.services["svc"]
            .load_balancer
            .clone()
            .unwrap();
        assert_eq!(
            lb.servers_transport.as_deref(),
            Some("mytransport@consulcatalog")
        );
        m.set("other", None);
        let lb = m.merged().tcp.services["svc"]
            .load_balancer
            .clone()
            .unwrap();
        assert_eq!(lb.servers_transport.as_deref(), Some("mytransport@file"));
    }

    #[test]
    fn references_follow_a_service_that_appears_and_disappears_elsewhere() {
        let front = || {
            convert(
                &[entry(
                    "f",
                    "10.1.0.1",
                    1,
                    &["r=fr:HostSNI(`*`):back", "weighted=back"],
                    "passing",
                )],
                &settings(),
            )
        };
        let back = || {
            convert(
                &[entry("b", "10.1.0.2", 1, &["s=back"], "passing")],
                &settings(),
            )
        };
        let refs = |m: &Merger| {
            let tcp = &m.merged().tcp;
            let weighted = tcp.services["split"].weighted.clone().unwrap();
            (
                tcp.routers["fr"].service.clone(),
                weighted.services[0].name.clone(),
            )
        };
        let mut m = Merger::new();
        m.set("front", Some(front()));
        let file = ("back@file".to_owned(), "back@file".to_owned());
        assert_eq!(refs(&m), file, "no Consul service defines it yet");
        m.set("back", Some(back()));
        let own = (
            "back@consulcatalog".to_owned(),
            "back@consulcatalog".to_owned(),
        );
        assert_eq!(refs(&m), own, "the router and the weighted service follow");
        let mut fresh = Merger::new();
        fresh.set("back", Some(back()));
        fresh.set("front", Some(front()));
        assert_eq!(
            m.merged(),
            fresh.merged(),
            "the order of arrival does not matter"
        );
        m.set("back", None);
        assert_eq!(refs(&m), file, "gone again: back to the file provider's");
        m.set("back", Some(back()));
        m.set("front", None);
        m.set("front", Some(front()));
        assert_eq!(refs(&m), own);
        assert_eq!(m.merged(), fresh.merged());
    }

    #[test]
    fn weighted_services_get_no_servers() {
        let (d, errors) = merged(convert(
            &[entry(
                "a",
                "10.1.0.1",
                1,
                &["weighted=blue", "r=r:HostSNI(`*`):split"],
                "passing",
            )],
            &settings(),
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(d.tcp.services["split"].load_balancer.is_none());
    }

    #[test]
    fn connect_services_get_a_spiffe_transport_and_tls_servers() {
        let mut s = settings();
        s.connect_aware = true;
        let mut e = entry("a", "10.1.0.1", 21000, &["r=db", "connect=true"], "passing");
        e.service.namespace = "team".into();
        let frag = convert_service(
            ServiceInput {
                name: "db",
                namespace: None,
                entries: &[e],
                connect: Some(ConnectContext {
                    trust_domain: "11111111-2222.consul",
                    datacenter: None,
                }),
            },
            &s,
            &*decoder(),
        );
        let (d, errors) = merged(frag);
        assert!(errors.is_empty(), "{errors:?}");
        let lb = d.tcp.services["db"].load_balancer.as_ref().unwrap();
        assert_eq!(
            lb.servers_transport.as_deref(),
            Some("connect-db@consulcatalog")
        );
        assert!(lb.servers[0].tls);
        let t = &d.tcp.servers_transports["connect-db"];
        assert_eq!(
            t.spiffe.as_ref().unwrap().ids,
            ["spiffe://11111111-2222.consul/ns/team/dc/dc1/svc/db"]
        );
        assert!(t.tls.is_some());

        // Without connectAware a Connect instance is skipped.
        let frag = convert(
            &[entry(
                "a",
                "10.1.0.1",
                1,
                &["r=db", "connect=true"],
                "passing",
            )],
            &settings(),
        );
        assert!(frag.items.is_empty());
    }

    #[test]
    fn merger_updates_incrementally_and_removes() {
        let mut m = Merger::new();
        let one = |addr: &str, rule: &str| Fragment {
            items: vec![(
                Arc::from("n/a"),
                Arc::new(Item {
                    routers: Arc::new(vec![(
                        "shared".to_string(),
                        Router {
                            rule: rule.into(),
                            service: "s".into(),
                            ..Default::default()
                        },
                    )]),
                    services: Arc::new(vec![(
                        "s".to_string(),
                        Service {
                            load_balancer: Some(LoadBalancer::default()),
                            weighted: None,
                        },
                    )]),
                    servers: vec![Some(Server {
                        address: addr.into(),
                        ..Default::default()
                    })],
                    ..Default::default()
                }),
            )],
            errors: vec![],
        };
        assert!(m.set("a", Some(one("10.0.0.1:1", "HostSNI(`x`)"))));
        assert!(
            !m.set("a", Some(one("10.0.0.1:1", "HostSNI(`x`)"))),
            "no change"
        );
        assert!(m.set("b", Some(one("10.0.0.2:1", "HostSNI(`x`)"))));
        // Two Consul services defining the same service merge their servers.
        assert_eq!(
            m.merged().tcp.services["s"]
                .load_balancer
                .as_ref()
                .unwrap()
                .servers
                .len(),
            2
        );
        // ... and the same router identically: kept.
        assert!(m.errors().is_empty());
        m.set("b", Some(one("10.0.0.2:1", "HostSNI(`y`)")));
        assert!(!m.merged().tcp.routers.contains_key("shared"));
        assert_eq!(m.errors()[0].service, "a, b");
        m.set("b", None);
        assert_eq!(m.merged().tcp.routers["shared"].rule, "HostSNI(`x`)");
        assert!(m.errors().is_empty());
        m.set("a", None);
        assert!(m.merged().tcp.is_empty());
    }
}

#[cfg(test)]
mod real_decoder_tests {
    use super::*;
    use crate::api::{AgentService, HealthCheck, Node, Weights};

    fn entry(id: &str, addr: &str, port: u16, tags: &[&str]) -> ServiceEntry {
        ServiceEntry {
            node: Node {
                node: "n1".into(),
                address: "10.0.0.1".into(),
                datacenter: "dc1".into(),
                ..Default::default()
            },
            service: AgentService {
                id: id.into(),
                service: "pg".into(),
                tags: tags.iter().map(|s| s.to_string()).collect(),
                address: addr.into(),
                port,
                weights: Some(Weights {
                    passing: 4,
                    warning: 1,
                }),
                ..Default::default()
            },
            checks: vec![HealthCheck {
                status: "passing".into(),
                ..Default::default()
            }],
        }
    }

    fn settings() -> ConvertSettings {
        ConvertSettings {
            prefix: "traefik".into(),
            exposed_by_default: true,
            constraints: Constraints::none(),
            strict_checks: [Health::Passing, Health::Warning].into(),
            connect_aware: false,
            connect_by_default: false,
        }
    }

    fn run(entries: &[ServiceEntry]) -> (Dynamic, Vec<CatalogError>) {
        let frag = convert_service(
            ServiceInput {
                name: "pg",
                namespace: None,
                entries,
                connect: None,
            },
            &settings(),
            &decode_tags,
        );
        let mut m = Merger::new();
        m.set("pg", Some(frag));
        (m.merged().clone(), m.errors())
    }

    #[test]
    fn seeds_tags_and_template_keys() {
        let tags = [
            "traefik.tcp.routers.pg.rule=HostSNI(`*`)",
            "traefik.tcp.routers.pg.entrypoints=postgres",
            "traefik.tcp.services.Service01.loadBalancer.serversTransport=mytransport",
            "traefik.tcp.services.Service01.loadbalancer.server.port=6432",
            "unrelated-tag",
        ];
        let (d, errors) = run(&[
            entry("a", "10.1.0.1", 5432, &tags),
            entry("b", "", 5432, &tags),
        ]);
        assert!(errors.is_empty(), "{errors:?}");
        let r = &d.tcp.routers["pg"];
        assert_eq!(r.service, "Service01@consulcatalog");
        assert_eq!(r.entry_points, ["postgres"]);
        let lb = d.tcp.services["Service01"].load_balancer.as_ref().unwrap();
        assert_eq!(
            lb.servers_transport.as_deref(),
            Some("mytransport@file"),
            "no Consul service defines it: the file provider's"
        );
        let servers: Vec<(&str, i64)> = lb
            .servers
            .iter()
            .map(|s| (s.address.as_str(), s.weight()))
            .collect();
        assert_eq!(servers, [("10.1.0.1:6432", 4), ("10.0.0.1:6432", 4)]);
    }

    #[test]
    fn transports_declared_in_tags_and_bad_tags() {
        let tags = [
            "traefik.tcp.routers.pg.rule=HostSNI(`db.example`)",
            "traefik.tcp.routers.pg.tls.passthrough=true",
            "traefik.tcp.serversTransports.tt.dialTimeout=3s",
            "traefik.tcp.serversTransports.tt.proxyProtocol.version=1",
            "traefik.tcp.services.pg.loadbalancer.serversTransport=tt",
            "traefik.tcp.routers.pg.priority=notanumber",
        ];
        let (d, errors) = run(&[entry("a", "10.1.0.1", 5432, &tags)]);
        let t = &d.tcp.servers_transports["tt"];
        assert_eq!(t.dial_timeout, tagway_config::Duration::from_secs(3));
        assert_eq!(t.proxy_protocol.as_ref().unwrap().version, 1);
        assert!(d.tcp.routers["pg"].tls.as_ref().unwrap().passthrough);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].tag.as_deref(),
            Some("traefik.tcp.routers.pg.priority=notanumber")
        );
        assert_eq!(errors[0].instance.as_deref(), Some("n1/a"));
    }
}

#[cfg(test)]
mod connect_proxy_tests {
    use super::*;
    use crate::api::{AgentService, Node};

    #[test]
    fn proxy_protocol_of_a_connect_service_goes_inside_the_mtls_stream() {
        let entry = ServiceEntry {
            node: Node {
                node: "n1".into(),
                address: "10.0.0.1".into(),
                datacenter: "dc7".into(),
                ..Default::default()
            },
            service: AgentService {
                id: "db-sidecar".into(),
                service: "db-sidecar-proxy".into(),
                tags: vec![
                    "traefik.tcp.routers.db.rule=HostSNI(`*`)".into(),
                    "traefik.tcp.services.db.loadbalancer.proxyProtocol.version=1".into(),
                    "traefik.consulcatalog.connect=true".into(),
                ],
                port: 21000,
                ..Default::default()
            },
            checks: vec![],
        };
        let settings = ConvertSettings {
            prefix: "traefik".into(),
            exposed_by_default: true,
            constraints: Constraints::none(),
            strict_checks: [Health::Passing].into(),
            connect_aware: true,
            connect_by_default: false,
        };
        let frag = convert_service(
            ServiceInput {
                name: "db",
                namespace: None,
                entries: &[entry],
                connect: Some(ConnectContext {
                    trust_domain: "td.consul",
                    datacenter: None,
                }),
            },
            &settings,
            &decode_tags,
        );
        assert!(frag.errors.is_empty(), "{:?}", frag.errors);
        let item = frag.item("n1/db-sidecar").unwrap();
        let (svc, server) = item.service("db").unwrap();
        let lb = svc.load_balancer.as_ref().unwrap();
        assert!(lb.proxy_protocol.is_none(), "moved to the transport");
        assert_eq!(server.unwrap().address, "10.0.0.1:21000");
        let t = item.transport("connect-db").unwrap();
        let pp = t.proxy_protocol.as_ref().unwrap();
        assert_eq!((pp.version, pp.inside_tls), (1, true));
        assert_eq!(
            t.spiffe.as_ref().unwrap().ids,
            ["spiffe://td.consul/ns/default/dc/dc7/svc/db"]
        );
    }
}
