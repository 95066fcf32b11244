//! Public registration types: what a test registers through the Rust API (and what the HTTP
//! endpoints decode into).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Health status of a check, as Consul spells it in JSON (`passing`, `warning`, `critical`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckStatus {
    /// `passing`
    Passing,
    /// `warning`
    Warning,
    /// `critical`
    Critical,
}

impl CheckStatus {
    /// The status as Consul writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }

    /// Parses Consul's spelling (`passing`, `warning`, `critical`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "passing" => Some(CheckStatus::Passing),
            "warning" => Some(CheckStatus::Warning),
            "critical" => Some(CheckStatus::Critical),
            _ => None,
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Service weights used by DNS and by tagway's balancer (`Weights.Passing`/`Weights.Warning`).
/// Consul defaults both to 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Weights {
    /// Weight while every check passes.
    pub passing: u32,
    /// Weight while some check is in warning.
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// One entry of a service's `TaggedAddresses` (`{"Address": …, "Port": …}`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAddress {
    /// Address for this tag (`lan`, `wan`, `lan_ipv4`, …).
    pub address: String,
    /// Port for this tag.
    pub port: u16,
}

/// Proxy settings of a `connect-proxy` service: which service it fronts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProxyConfig {
    /// `Proxy.DestinationServiceName`: the service this proxy represents in the mesh.
    pub destination_service_name: String,
    /// `Proxy.DestinationServiceID`: the instance it sits beside, if any.
    pub destination_service_id: String,
    /// `Proxy.LocalServiceAddress`.
    pub local_service_address: String,
    /// `Proxy.LocalServicePort`.
    pub local_service_port: u16,
}

/// What a check does; see the constructors of [`CheckDefinition`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CheckKind {
    /// Goes critical unless refreshed within the TTL.
    Ttl(Duration),
    /// Connects to `address` every `interval`.
    Tcp {
        address: String,
        interval: Duration,
        timeout: Option<Duration>,
    },
    /// Sends `GET url` every `interval`: 2xx passing, 429 warning, anything else critical.
    Http {
        url: String,
        interval: Duration,
        timeout: Option<Duration>,
    },
    /// A record with no runner, as checks registered through `/v1/catalog/register` are, and
    /// check types the dev catalog stores but does not run (gRPC, H2PING, alias, Docker, …);
    /// its status changes only through the API. `type_name` is what `Type` shows.
    Static {
        type_name: String,
        interval: Option<Duration>,
    },
}

/// A health check to register with a service or a node.
///
/// ```
/// use std::time::Duration;
/// use tagway_integration::catalog::{CheckDefinition, CheckStatus};
///
/// let ttl = CheckDefinition::ttl(Duration::from_secs(10)).id("web-alive");
/// let tcp = CheckDefinition::tcp("127.0.0.1:8080", Duration::from_secs(1));
/// let fixed = CheckDefinition::static_status(CheckStatus::Passing);
/// # let _ = (ttl, tcp, fixed);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckDefinition {
    pub(crate) id: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) notes: String,
    pub(crate) status: Option<CheckStatus>,
    pub(crate) output: String,
    pub(crate) kind: CheckKind,
    pub(crate) deregister_critical_service_after: Option<Duration>,
    /// For catalog registrations: the service on the same node this check belongs to.
    pub(crate) service_id: Option<String>,
}

impl CheckDefinition {
    fn with_kind(kind: CheckKind) -> Self {
        CheckDefinition {
            id: None,
            name: None,
            notes: String::new(),
            status: None,
            output: String::new(),
            kind,
            deregister_critical_service_after: None,
            service_id: None,
        }
    }

    /// A TTL check: critical (Consul's initial status) until passed, and critical again with
    /// output `TTL expired` when not refreshed within `ttl`.
    pub fn ttl(ttl: Duration) -> Self {
        Self::with_kind(CheckKind::Ttl(ttl))
    }

    /// A TCP check connecting to `address` (`host:port`) every `interval` (at least 1s, as
    /// Consul enforces). The first attempt runs at once.
    pub fn tcp(address: impl Into<String>, interval: Duration) -> Self {
        Self::with_kind(CheckKind::Tcp {
            address: address.into(),
            interval: interval.max(Duration::from_secs(1)),
            timeout: None,
        })
    }

    /// An HTTP check sending `GET url` (plain `http://` only) every `interval` (at least 1s).
    pub fn http(url: impl Into<String>, interval: Duration) -> Self {
        Self::with_kind(CheckKind::Http {
            url: url.into(),
            interval: interval.max(Duration::from_secs(1)),
            timeout: None,
        })
    }

    /// A check with a fixed status and no runner, like checks registered through
    /// `/v1/catalog/register`. Change it with `DevCatalogHandle::set_check_status`.
    pub fn static_status(status: CheckStatus) -> Self {
        let mut c = Self::with_kind(CheckKind::Static {
            type_name: String::new(),
            interval: None,
        });
        c.status = Some(status);
        c
    }

    pub(crate) fn unexecuted(type_name: impl Into<String>, interval: Option<Duration>) -> Self {
        Self::with_kind(CheckKind::Static {
            type_name: type_name.into(),
            interval,
        })
    }

    /// Sets `CheckID` (default `service:<service id>`, with `:<n>` when a service has several
    /// checks; node checks must be given one).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets `Name` (default `Service '<name>' check`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets `Notes`.
    pub fn notes(mut self, notes: impl Into<String>) -> Self {
        self.notes = notes.into();
        self
    }

    /// Sets the initial status (Consul's default is `critical`).
    pub fn status(mut self, status: CheckStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the initial `Output`.
    pub fn output(mut self, output: impl Into<String>) -> Self {
        self.output = output.into();
        self
    }

    /// Sets the timeout of a TCP or HTTP check (default 10s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        match &mut self.kind {
            CheckKind::Tcp { timeout: t, .. } | CheckKind::Http { timeout: t, .. } => {
                *t = Some(timeout)
            }
            _ => {}
        }
        self
    }

    /// Sets `DeregisterCriticalServiceAfter` (stored and shown; the dev catalog does not reap).
    pub fn deregister_critical_service_after(mut self, after: Duration) -> Self {
        self.deregister_critical_service_after = Some(after);
        self
    }

    /// For node registrations: attaches this check to the service with this ID on the node.
    pub fn service_id(mut self, service_id: impl Into<String>) -> Self {
        self.service_id = Some(service_id.into());
        self
    }
}

/// A service instance to register.
///
/// ```
/// use std::time::Duration;
/// use tagway_integration::catalog::{CheckDefinition, ServiceRegistration};
///
/// let web = ServiceRegistration::new("web")
///     .id("web-1")
///     .address("127.0.0.1")
///     .port(8080)
///     .tags(["traefik.enable=true", "traefik.tcp.routers.web.rule=HostSNI(`*`)"])
///     .meta("version", "1")
///     .weights(10, 1)
///     .check(CheckDefinition::ttl(Duration::from_secs(30)));
/// # let _ = web;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRegistration {
    pub(crate) name: String,
    pub(crate) id: Option<String>,
    pub(crate) kind: String,
    pub(crate) tags: Vec<String>,
    pub(crate) address: String,
    pub(crate) port: u16,
    pub(crate) meta: BTreeMap<String, String>,
    pub(crate) weights: Option<Weights>,
    pub(crate) tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub(crate) enable_tag_override: bool,
    pub(crate) connect_native: bool,
    pub(crate) proxy: Option<ProxyConfig>,
    pub(crate) checks: Vec<CheckDefinition>,
}

impl ServiceRegistration {
    /// A service named `name`; its ID defaults to the name.
    pub fn new(name: impl Into<String>) -> Self {
        ServiceRegistration {
            name: name.into(),
            id: None,
            kind: String::new(),
            tags: Vec::new(),
            address: String::new(),
            port: 0,
            meta: BTreeMap::new(),
            weights: None,
            tagged_addresses: BTreeMap::new(),
            enable_tag_override: false,
            connect_native: false,
            proxy: None,
            checks: Vec::new(),
        }
    }

    /// Sets the service ID (unique per node; default: the name).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The ID this registration will have.
    pub fn service_id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }

    /// The service name.
    pub fn service_name(&self) -> &str {
        &self.name
    }

    /// Sets `Address` (empty: clients fall back to the node's address).
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// Sets `Port`.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Adds one tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds tags.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Adds one `Meta` entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Sets `Weights` (default 1/1).
    pub fn weights(mut self, passing: u32, warning: u32) -> Self {
        self.weights = Some(Weights { passing, warning });
        self
    }

    /// Adds a `TaggedAddresses` entry.
    pub fn tagged_address(
        mut self,
        tag: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        self.tagged_addresses.insert(
            tag.into(),
            ServiceAddress {
                address: address.into(),
                port,
            },
        );
        self
    }

    /// Sets `EnableTagOverride`.
    pub fn enable_tag_override(mut self, on: bool) -> Self {
        self.enable_tag_override = on;
        self
    }

    /// Sets `Connect.Native`: the service speaks Connect mTLS itself and appears in
    /// `/v1/health/connect/<name>`.
    pub fn connect_native(mut self, native: bool) -> Self {
        self.connect_native = native;
        self
    }

    /// Makes this a `connect-proxy` service fronting `proxy.destination_service_name`; it
    /// appears in `/v1/health/connect/<destination>`.
    pub fn connect_proxy(mut self, proxy: ProxyConfig) -> Self {
        self.kind = "connect-proxy".to_owned();
        self.proxy = Some(proxy);
        self
    }

    /// Adds a check to this service.
    pub fn check(mut self, check: CheckDefinition) -> Self {
        self.checks.push(check);
        self
    }
}

/// A node with its own address, node-level checks and services, as `/v1/catalog/register`
/// takes it (several requests folded into one).
///
/// ```
/// use tagway_integration::catalog::{CheckDefinition, CheckStatus, NodeRegistration, ServiceRegistration};
///
/// let node = NodeRegistration::new("node-2", "127.0.0.2")
///     .meta("rack", "r1")
///     .check(CheckDefinition::static_status(CheckStatus::Passing).id("node-alive"))
///     .service(ServiceRegistration::new("db").port(5432));
/// # let _ = node;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRegistration {
    pub(crate) node: String,
    pub(crate) address: String,
    pub(crate) id: Option<String>,
    pub(crate) tagged_addresses: BTreeMap<String, String>,
    pub(crate) meta: BTreeMap<String, String>,
    pub(crate) services: Vec<ServiceRegistration>,
    pub(crate) checks: Vec<CheckDefinition>,
}

impl NodeRegistration {
    /// A node named `node` at `address`.
    pub fn new(node: impl Into<String>, address: impl Into<String>) -> Self {
        NodeRegistration {
            node: node.into(),
            address: address.into(),
            id: None,
            tagged_addresses: BTreeMap::new(),
            meta: BTreeMap::new(),
            services: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Sets the node `ID` (a UUID; generated when absent).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds a node `TaggedAddresses` entry (`lan`, `wan`, …).
    pub fn tagged_address(mut self, tag: impl Into<String>, address: impl Into<String>) -> Self {
        self.tagged_addresses.insert(tag.into(), address.into());
        self
    }

    /// Adds a node `Meta` entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Adds a service on this node (its checks become checks of that service).
    pub fn service(mut self, service: ServiceRegistration) -> Self {
        self.services.push(service);
        self
    }

    /// Adds a node-level check (or a service check, with [`CheckDefinition::service_id`]).
    pub fn check(mut self, check: CheckDefinition) -> Self {
        self.checks.push(check);
        self
    }
}

/// Function producing the tags of synthetic instance `instance` of service `name`.
pub type TagFn = Arc<dyn Fn(&str, usize) -> Vec<String> + Send + Sync>;

/// A synthetic fleet for scale tests and benchmarks: `services` services named
/// `<prefix>-00000`…, each with `instances_per_service` instances spread over as many nodes
/// (`<prefix>-node-0`… at `127.0.0.<n+1>`), every instance with one passing static check.
///
/// ```
/// use tagway_integration::catalog::FleetSpec;
///
/// let fleet = FleetSpec::new(10_000, 3)
///     .tags(|name, _instance| vec![format!("traefik.tcp.routers.{name}.rule=HostSNI(`{name}.test`)")]);
/// assert_eq!(fleet.service_name(42), "svc-00042");
/// ```
#[derive(Clone)]
pub struct FleetSpec {
    pub(crate) services: usize,
    pub(crate) instances_per_service: usize,
    pub(crate) prefix: String,
    pub(crate) base_port: u16,
    pub(crate) tags: Option<TagFn>,
}

impl fmt::Debug for FleetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetSpec")
            .field("services", &self.services)
            .field("instances_per_service", &self.instances_per_service)
            .field("prefix", &self.prefix)
            .field("base_port", &self.base_port)
            .field("tags", &self.tags.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl FleetSpec {
    /// `services` services × `instances_per_service` instances, prefix `svc`, ports from 20000.
    pub fn new(services: usize, instances_per_service: usize) -> Self {
        FleetSpec {
            services,
            instances_per_service,
            prefix: "svc".to_owned(),
            base_port: 20_000,
            tags: None,
        }
    }

    /// Sets the name prefix (default `svc`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the first port; service `i` listens on `base_port + i % 40000` on every node.
    pub fn base_port(mut self, port: u16) -> Self {
        self.base_port = port;
        self
    }

    /// Sets the tags of every instance.
    pub fn tags(mut self, f: impl Fn(&str, usize) -> Vec<String> + Send + Sync + 'static) -> Self {
        self.tags = Some(Arc::new(f));
        self
    }

    /// The name of service number `i`.
    pub fn service_name(&self, i: usize) -> String {
        format!("{}-{i:05}", self.prefix)
    }

    /// The node name of instance number `n`.
    pub fn node_name(&self, n: usize) -> String {
        format!("{}-node-{n}", self.prefix)
    }

    /// Total number of instances.
    pub fn instance_count(&self) -> usize {
        self.services * self.instances_per_service
    }
}
