//! The dev catalog: an in-process server speaking Consul's HTTP API (catalog, health, agent,
//! Connect CA, status) faithfully enough that unmodified Consul clients work against it, with
//! blocking queries, ACLs, a Connect CA, fault injection and bulk registration for tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tagway_integration::catalog::CatalogError> {
//! use std::time::Duration;
//! use tagway_integration::catalog::{CheckDefinition, CheckStatus, DevCatalog, ServiceRegistration};
//!
//! let catalog = DevCatalog::builder()
//!     .datacenter("dc1")
//!     .management_token("root-token")
//!     .leaf_ttl(Duration::from_secs(3600))
//!     .start("127.0.0.1:0")
//!     .await?;
//! // Point a Consul client at catalog.http_url() (CONSUL_HTTP_ADDR = catalog.addr()).
//! let index = catalog.register(
//!     ServiceRegistration::new("web")
//!         .id("web-1")
//!         .address("127.0.0.1")
//!         .port(8080)
//!         .tag("traefik.enable=true")
//!         .check(CheckDefinition::ttl(Duration::from_secs(30)).id("web-1-ttl")),
//! )?;
//! catalog.set_check_status("web-1-ttl", CheckStatus::Passing, "ok")?;
//! assert!(catalog.service_index("web") > index);
//! catalog.faults().fail_next(2); // the next two requests answer 500
//! catalog.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! See `docs/dev-catalog.md` for what of Consul's API is covered.

mod acl;
mod blocking;
mod checks;
mod connect;
mod error;
mod fault;
mod http;
mod json;
mod model;
mod state;
mod util;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use acl::{AnonymousReads, TokenPolicy};
pub use connect::{LeafCertificate, RootCertificate};
pub use error::CatalogError;
pub use fault::{FaultAction, FaultRule, Faults, NO_LEADER_ERROR};
#[cfg(test)]
mod tests;

pub use model::{
    CheckDefinition, CheckStatus, FleetSpec, NodeRegistration, ProxyConfig, ServiceAddress,
    ServiceRegistration, TagFn, Weights,
};

use acl::Acl;
use fault::FaultState;
use http::{HttpConfig, Shared};
use state::{Bootstrap, CONSUL_VERSION, Key, Store};

/// Default lifetime of Connect leaf certificates (Consul's default: 72h).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(72 * 3600);

/// Entry point: `DevCatalog::builder()…start(addr)`.
#[derive(Debug, Clone, Copy)]
pub struct DevCatalog;

impl DevCatalog {
    /// A builder with Consul's defaults: datacenter `dc1`, no ACLs, 72h leaves, the `consul`
    /// service registered as a real server has it.
    pub fn builder() -> DevCatalogBuilder {
        DevCatalogBuilder::default()
    }

    /// The Consul version whose API the dev catalog follows (reported by `/v1/agent/self`).
    pub fn consul_version() -> &'static str {
        CONSUL_VERSION
    }
}

/// Configures and starts a dev catalog.
#[derive(Debug, Clone)]
pub struct DevCatalogBuilder {
    datacenter: String,
    node_name: String,
    node_address: Option<String>,
    management_token: Option<String>,
    tokens: Vec<(String, TokenPolicy)>,
    anonymous: AnonymousReads,
    leaf_ttl: Duration,
    consul_service: bool,
}

impl Default for DevCatalogBuilder {
    fn default() -> Self {
        DevCatalogBuilder {
            datacenter: "dc1".to_owned(),
            node_name: "dev-catalog".to_owned(),
            node_address: None,
            management_token: None,
            tokens: Vec::new(),
            anonymous: AnonymousReads::Deny,
            leaf_ttl: DEFAULT_LEAF_TTL,
            consul_service: true,
        }
    }
}

impl DevCatalogBuilder {
    /// Sets the datacenter (default `dc1`); requests for another `dc` answer
    /// `500 No path to datacenter`.
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = dc.into();
        self
    }

    /// Sets the agent's node name (default `dev-catalog`): where agent registrations go.
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = name.into();
        self
    }

    /// Sets the agent node's address (default: the listen IP, or 127.0.0.1 when that is
    /// unspecified).
    pub fn node_address(mut self, address: impl Into<String>) -> Self {
        self.node_address = Some(address.into());
        self
    }

    /// Turns ACLs on with this management token (`X-Consul-Token`, `Authorization: Bearer`
    /// or `?token=`).
    pub fn management_token(mut self, token: impl Into<String>) -> Self {
        self.management_token = Some(token.into());
        self
    }

    /// Adds a limited token (only meaningful with a management token).
    pub fn acl_token(mut self, secret: impl Into<String>, policy: TokenPolicy) -> Self {
        self.tokens.push((secret.into(), policy));
        self
    }

    /// How reads without a token are answered when ACLs are on (default: 403).
    pub fn anonymous_reads(mut self, mode: AnonymousReads) -> Self {
        self.anonymous = mode;
        self
    }

    /// Sets the lifetime of Connect leaf certificates (default 72h). Leaves are renewed
    /// between 60% and 90% of it, which wakes blocking leaf queries.
    pub fn leaf_ttl(mut self, ttl: Duration) -> Self {
        self.leaf_ttl = ttl;
        self
    }

    /// Does not register the `consul` service (which a real Consul server always lists in
    /// `/v1/catalog/services`).
    pub fn without_consul_service(mut self) -> Self {
        self.consul_service = false;
        self
    }

    /// Binds `addr` (`127.0.0.1:0` for a free port) and starts serving.
    pub async fn start(self, addr: impl AsRef<str>) -> Result<DevCatalogHandle, CatalogError> {
        let text = addr.as_ref();
        let sock: SocketAddr = text.parse().map_err(|_| CatalogError::InvalidAddress {
            addr: text.to_owned(),
        })?;
        let listener = TcpListener::bind(sock)
            .await
            .map_err(|e| CatalogError::bind(sock, e))?;
        self.start_on(listener).await
    }

    /// Starts serving on an already bound listener.
    pub async fn start_on(self, listener: TcpListener) -> Result<DevCatalogHandle, CatalogError> {
        let addr = listener
            .local_addr()
            .map_err(|source| CatalogError::ListenerAddress { source })?;
        let shared = self.build_shared(addr)?;
        let shutdown = shared.store.shutdown.clone();
        let tracker = TaskTracker::new();
        let router = http::router(shared.clone());
        tracker.spawn(http::serve(
            listener,
            router,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!(%addr, "dev catalog listening");
        let faults = Faults {
            state: shared.faults.clone(),
            store: shared.store.clone(),
        };
        Ok(DevCatalogHandle {
            shared,
            addr,
            shutdown,
            tracker,
            faults,
        })
    }

    /// Builds the state and HTTP configuration for a server reachable at `addr`.
    fn build_shared(self, addr: SocketAddr) -> Result<Arc<Shared>, CatalogError> {
        let node_address = self.node_address.clone().unwrap_or_else(|| {
            if addr.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                addr.ip().to_string()
            }
        });
        let store = Store::new(&Bootstrap {
            datacenter: self.datacenter.clone(),
            node_name: self.node_name.clone(),
            node_address: node_address.clone(),
            consul_service: self.consul_service,
        })?;
        store.start_background();
        let node_id = store.with_state(|st| {
            st.nodes
                .get(&st.agent_node)
                .map(|e| e.node.id.clone())
                .unwrap_or_else(http::new_node_id)
        });
        Ok(Arc::new(Shared {
            store,
            acl: Acl::new(self.management_token, self.tokens, self.anonymous),
            faults: Arc::new(FaultState::default()),
            cfg: HttpConfig {
                datacenter: self.datacenter,
                node_name: self.node_name,
                node_id,
                server_addr: http::server_addr(SocketAddr::new(
                    node_address.parse().unwrap_or(addr.ip()),
                    addr.port(),
                )),
                leaf_ttl: self.leaf_ttl,
            },
        }))
    }

    /// For in-crate tests: the router and a handle-like view without a socket.
    #[cfg(test)]
    pub(crate) fn build_for_test(self) -> (axum::Router, DevCatalogHandle) {
        let addr: SocketAddr = "127.0.0.1:8500".parse().expect("literal address");
        let shared = self.build_shared(addr).expect("dev catalog state");
        let router = http::router(shared.clone());
        let faults = Faults {
            state: shared.faults.clone(),
            store: shared.store.clone(),
        };
        let shutdown = shared.store.shutdown.clone();
        (
            router,
            DevCatalogHandle {
                shared,
                addr,
                shutdown,
                tracker: TaskTracker::new(),
                faults,
            },
        )
    }
}

/// A running dev catalog. Dropping it stops serving (use [`DevCatalogHandle::shutdown`] to
/// also wait for connections to close).
///
/// Mutations return the index at which they took effect (unchanged when they changed
/// nothing, as Consul does for idempotent writes).
pub struct DevCatalogHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    faults: Faults,
}

impl std::fmt::Debug for DevCatalogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCatalogHandle")
            .field("addr", &self.addr)
            .field("datacenter", &self.shared.cfg.datacenter)
            .finish()
    }
}

impl DevCatalogHandle {
    fn store(&self) -> &Store {
        &self.shared.store
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&mut state::State, &mut state::Txn) -> Result<R, CatalogError>,
    ) -> Result<u64, CatalogError> {
        self.store().write(|st, txn| f(st, txn).map(|_| ()))?;
        Ok(self.store().index())
    }

    /// The bound address (what `CONSUL_HTTP_ADDR` should be).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The datacenter.
    pub fn datacenter(&self) -> &str {
        &self.shared.cfg.datacenter
    }

    /// The agent's node name (where [`DevCatalogHandle::register`] puts services).
    pub fn node_name(&self) -> &str {
        &self.shared.cfg.node_name
    }

    /// The fault controls.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The current global (raft) index.
    pub fn index(&self) -> u64 {
        self.store().index()
    }

    /// The `X-Consul-Index` that `/v1/catalog/services` answers now.
    pub fn catalog_index(&self) -> u64 {
        let (i, _rx) = self.store().read(&[Key::Services], |_, idx| idx[0]);
        i.max(1)
    }

    /// The `X-Consul-Index` that `/v1/health/service/<name>` answers now.
    pub fn service_index(&self, name: &str) -> u64 {
        let key = [Key::Service(name.to_owned())];
        let (i, rx) = self
            .store()
            .read(&key, |st, idx| st.service_index(name, idx[0]));
        drop(rx);
        self.store().release(&key);
        i.max(1)
    }

    /// The status of a check on the agent's node.
    pub fn check_status(&self, check_id: &str) -> Option<CheckStatus> {
        self.check_status_on_node(self.node_name(), check_id)
    }

    /// The status of a check on a node.
    pub fn check_status_on_node(&self, node: &str, check_id: &str) -> Option<CheckStatus> {
        self.store().with_state(|st| {
            st.nodes
                .get(node)
                .and_then(|e| e.checks.get(check_id))
                .map(|c| c.status)
        })
    }

    /// The service IDs of the instances of `name`, as `(node, service ID)`, sorted.
    pub fn instances(&self, name: &str) -> Vec<(String, String)> {
        self.store().with_state(|st| {
            st.by_name
                .get(name)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default()
        })
    }

    /// Registers a service (with its checks) on the agent's node, as
    /// `PUT /v1/agent/service/register` does.
    pub fn register(&self, service: ServiceRegistration) -> Result<u64, CatalogError> {
        self.write(|st, txn| st.agent_register(txn, &service))
    }

    /// Registers a node with its services and checks, as `PUT /v1/catalog/register` does.
    pub fn register_node(&self, node: NodeRegistration) -> Result<u64, CatalogError> {
        self.write(|st, txn| st.catalog_register(txn, &node, false))
    }

    /// Registers many nodes in one write (one index for all), e.g. thousands of services for a
    /// benchmark.
    pub fn register_many(
        &self,
        nodes: impl IntoIterator<Item = NodeRegistration>,
    ) -> Result<u64, CatalogError> {
        let nodes: Vec<NodeRegistration> = nodes.into_iter().collect();
        self.write(|st, txn| {
            for n in &nodes {
                st.catalog_register(txn, n, false)?;
            }
            Ok(())
        })
    }

    /// Registers a synthetic fleet (see [`FleetSpec`]) in one write.
    pub fn register_fleet(&self, spec: &FleetSpec) -> Result<u64, CatalogError> {
        let mut nodes = Vec::with_capacity(spec.instances_per_service);
        for n in 0..spec.instances_per_service {
            let address = format!("127.0.0.{}", (n % 254) + 1);
            let mut node = NodeRegistration::new(spec.node_name(n), address.clone());
            node.services.reserve(spec.services);
            for s in 0..spec.services {
                let name = spec.service_name(s);
                let id = format!("{name}-{n}");
                let tags = spec.tags.as_ref().map(|f| f(&name, n)).unwrap_or_default();
                let port = spec.base_port.wrapping_add((s % 40_000) as u16);
                node.services.push(
                    ServiceRegistration::new(name)
                        .id(id)
                        .address(address.clone())
                        .port(port)
                        .tags(tags)
                        .check(CheckDefinition::static_status(CheckStatus::Passing)),
                );
            }
            nodes.push(node);
        }
        self.register_many(nodes)
    }

    /// Deregisters a service (and its checks) from the agent's node.
    pub fn deregister(&self, service_id: &str) -> Result<u64, CatalogError> {
        let node = self.node_name().to_owned();
        self.deregister_on_node(&node, service_id)
    }

    /// Deregisters a service from a node.
    pub fn deregister_on_node(&self, node: &str, service_id: &str) -> Result<u64, CatalogError> {
        self.write(|st, txn| st.remove_service(txn, node, service_id))
    }

    /// Removes a node with all its services and checks.
    pub fn deregister_node(&self, node: &str) -> Result<u64, CatalogError> {
        self.write(|st, txn| st.remove_node(txn, node))
    }

    /// Sets the status and output of a check on the agent's node (any kind of check; a TTL
    /// check keeps its deadline).
    pub fn set_check_status(
        &self,
        check_id: &str,
        status: CheckStatus,
        output: impl Into<String>,
    ) -> Result<u64, CatalogError> {
        let node = self.node_name().to_owned();
        self.set_check_status_on_node(&node, check_id, status, output)
    }

    /// Sets the status and output of a check on a node.
    pub fn set_check_status_on_node(
        &self,
        node: &str,
        check_id: &str,
        status: CheckStatus,
        output: impl Into<String>,
    ) -> Result<u64, CatalogError> {
        let output = output.into();
        self.write(|st, txn| st.set_check_status(txn, node, check_id, status, output))
    }

    /// Puts a service of the agent's node in or out of maintenance (the
    /// `_service_maintenance:<id>` critical check).
    pub fn set_service_maintenance(
        &self,
        service_id: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<u64, CatalogError> {
        let node = self.node_name().to_owned();
        self.write(|st, txn| st.set_service_maintenance(txn, &node, service_id, enable, reason))
    }

    /// Puts a node in or out of maintenance (the `_node_maintenance` critical check).
    pub fn set_node_maintenance(
        &self,
        node: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<u64, CatalogError> {
        self.write(|st, txn| st.set_node_maintenance(txn, node, enable, reason))
    }

    /// The Connect trust domain, `<cluster uuid>.consul`.
    pub fn trust_domain(&self) -> String {
        self.store()
            .with_state(|st| st.ca.trust_domain().to_owned())
    }

    /// The SPIFFE ID of a service: `spiffe://<trust domain>/ns/default/dc/<dc>/svc/<name>`.
    pub fn spiffe_id(&self, service: &str) -> String {
        self.store().with_state(|st| st.ca.service_uri(service))
    }

    /// Every listed CA root (the active one last).
    pub fn ca_roots(&self) -> Vec<RootCertificate> {
        self.store().with_state(|st| st.ca.roots())
    }

    /// The active CA root.
    pub fn active_root(&self) -> RootCertificate {
        self.store().with_state(|st| st.ca.active().clone())
    }

    /// Rotates the CA: a new active root; the previous one stays listed as inactive. Wakes
    /// blocking roots and leaf queries; leaves are re-issued by the new root.
    pub fn rotate_ca(&self) -> Result<RootCertificate, CatalogError> {
        self.store().write(|st, txn| st.rotate_ca(txn))
    }

    /// Drops inactive roots (as Consul does once leaves of the old root expired).
    pub fn prune_inactive_roots(&self) -> u64 {
        self.store().write(|st, txn| {
            if st.ca.prune_inactive() {
                txn.touch_roots();
            }
        });
        self.index()
    }

    /// Issues a leaf certificate for any service, signed by the active root, valid for the
    /// configured leaf lifetime, e.g. for a test backend presenting a Connect identity. It
    /// does not change what the leaf endpoint serves.
    pub fn issue_leaf(&self, service: &str) -> Result<LeafCertificate, CatalogError> {
        self.issue_leaf_with_ttl(service, self.shared.cfg.leaf_ttl)
    }

    /// Like [`DevCatalogHandle::issue_leaf`] with an explicit lifetime.
    pub fn issue_leaf_with_ttl(
        &self,
        service: &str,
        ttl: Duration,
    ) -> Result<LeafCertificate, CatalogError> {
        self.store()
            .with_state(|st| st.ca.sign_leaf(service, ttl, st.index))
    }

    /// Adds (or replaces) an ACL token.
    pub fn set_acl_token(&self, secret: impl Into<String>, policy: TokenPolicy) {
        self.shared.acl.set_token(secret.into(), policy);
    }

    /// Removes an ACL token; requests using it then get `403 ACL not found`.
    pub fn remove_acl_token(&self, secret: &str) -> bool {
        self.shared.acl.remove_token(secret)
    }

    /// Stops accepting connections, ends blocking queries (they answer with their current
    /// state), stops check runners and waits (at most a few seconds) for connections to close.
    pub async fn shutdown(self) {
        self.close().await;
    }

    /// Like [`DevCatalogHandle::shutdown`] through a shared reference (for a handle kept in an
    /// `Arc`); the handle answers nothing afterwards.
    pub async fn close(&self) {
        self.shared.store.stop();
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}

impl Drop for DevCatalogHandle {
    fn drop(&mut self) {
        self.shared.store.stop();
        self.shutdown.cancel();
    }
}
