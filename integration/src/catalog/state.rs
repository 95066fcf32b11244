//! The catalog's state and its per-resource indexes.
//!
//! Every write runs under one write lock, takes the next raft-like index and bumps the index of
//! each resource it touched: the services table, the nodes table, the checks table, one service
//! name's health (`Key::Service`), one service name's Connect view (`Key::Connect`) and the CA
//! roots. Each resource index has a `tokio::sync::watch` channel; a blocking query subscribes to
//! the channels of the resources it reads while holding the read lock, so no wake-up is lost and
//! a change to service A never wakes a watcher of service B.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connect::{Ca, LeafCertificate, RootCertificate};
use super::error::CatalogError;
use super::model::{
    CheckDefinition, CheckKind, CheckStatus, NodeRegistration, ProxyConfig, ServiceAddress,
    ServiceRegistration, Weights,
};
use super::util::{random_below, uuid_v4};

/// The Consul version the dev catalog reports and whose API shapes it follows.
pub(crate) const CONSUL_VERSION: &str = "1.20.5";

/// `(node, service ID)`.
pub(crate) type InstKey = (String, String);

/// A resource with its own index and watch channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// The services table: `/v1/catalog/services`.
    Services,
    /// The nodes table: `/v1/catalog/nodes`.
    Nodes,
    /// The checks table: `/v1/health/state/<state>`, `/v1/health/node/<node>`.
    Checks,
    /// One service name: `/v1/health/service/<name>`, `/v1/catalog/service/<name>`.
    Service(String),
    /// One service name's Connect-capable instances: `/v1/health/connect/<name>`.
    Connect(String),
    /// The Connect CA roots.
    CaRoots,
}

/// A node record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeRec {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) datacenter: String,
    pub(crate) tagged: BTreeMap<String, String>,
    pub(crate) meta: BTreeMap<String, String>,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

impl NodeRec {
    fn same(&self, o: &NodeRec) -> bool {
        self.id == o.id
            && self.address == o.address
            && self.tagged == o.tagged
            && self.meta == o.meta
    }
}

/// A service instance record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceRec {
    pub(crate) kind: String,
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) tags: Vec<String>,
    pub(crate) address: String,
    pub(crate) port: u16,
    pub(crate) tagged: BTreeMap<String, ServiceAddress>,
    pub(crate) meta: BTreeMap<String, String>,
    pub(crate) weights: Weights,
    pub(crate) enable_tag_override: bool,
    pub(crate) native: bool,
    pub(crate) proxy: Option<ProxyConfig>,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

impl ServiceRec {
    fn same(&self, o: &ServiceRec) -> bool {
        self.kind == o.kind
            && self.name == o.name
            && self.tags == o.tags
            && self.address == o.address
            && self.port == o.port
            && self.tagged == o.tagged
            && self.meta == o.meta
            && self.weights == o.weights
            && self.enable_tag_override == o.enable_tag_override
            && self.native == o.native
            && self.proxy == o.proxy
    }

    /// The service whose Connect view this instance belongs to, if any.
    pub(crate) fn connect_target(&self) -> Option<&str> {
        if self.native {
            return Some(&self.name);
        }
        if self.kind == "connect-proxy" {
            return self
                .proxy
                .as_ref()
                .map(|p| p.destination_service_name.as_str())
                .filter(|n| !n.is_empty());
        }
        None
    }
}

/// A check record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckRec {
    pub(crate) node: String,
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) status: CheckStatus,
    pub(crate) notes: String,
    pub(crate) output: String,
    pub(crate) service_id: String,
    pub(crate) service_name: String,
    pub(crate) service_tags: Vec<String>,
    pub(crate) kind: CheckKind,
    pub(crate) deregister_after: Option<Duration>,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

impl CheckRec {
    /// `Type` as Consul shows it.
    pub(crate) fn type_name(&self) -> &str {
        match &self.kind {
            CheckKind::Ttl(_) => "ttl",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Static { type_name, .. } => type_name,
        }
    }

    /// `Interval` and `Timeout` (None when not applicable).
    pub(crate) fn interval_timeout(&self) -> (Option<Duration>, Option<Duration>) {
        match &self.kind {
            CheckKind::Tcp {
                interval, timeout, ..
            }
            | CheckKind::Http {
                interval, timeout, ..
            } => (Some(*interval), *timeout),
            CheckKind::Static { interval, .. } => (*interval, None),
            CheckKind::Ttl(_) => (None, None),
        }
    }

    /// Whether this is a maintenance check (which `AggregatedStatus` reports as such).
    pub(crate) fn is_maintenance(&self) -> bool {
        self.type_name() == "maintenance"
    }

    fn same(&self, o: &CheckRec) -> bool {
        self.name == o.name
            && self.status == o.status
            && self.notes == o.notes
            && self.output == o.output
            && self.service_id == o.service_id
            && self.service_name == o.service_name
            && self.service_tags == o.service_tags
            && self.kind == o.kind
            && self.deregister_after == o.deregister_after
    }
}

/// A node with its services and checks.
pub(crate) struct NodeEntry {
    pub(crate) node: Arc<NodeRec>,
    pub(crate) services: BTreeMap<String, Arc<ServiceRec>>,
    pub(crate) checks: BTreeMap<String, Arc<CheckRec>>,
    /// Check IDs per service ID (service-level checks).
    service_checks: HashMap<String, BTreeSet<String>>,
    /// Check IDs of node-level checks.
    node_checks: BTreeSet<String>,
}

impl NodeEntry {
    fn new(node: NodeRec) -> Self {
        NodeEntry {
            node: Arc::new(node),
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            service_checks: HashMap::new(),
            node_checks: BTreeSet::new(),
        }
    }

    /// The checks that apply to a service instance: node checks and its own, sorted by ID as
    /// Consul lists them.
    pub(crate) fn checks_for(&self, service_id: &str) -> Vec<&Arc<CheckRec>> {
        let own = self.service_checks.get(service_id);
        let mut ids: Vec<&String> = self.node_checks.iter().collect();
        if let Some(own) = own {
            ids.extend(own.iter());
        }
        ids.sort();
        ids.into_iter()
            .filter_map(|id| self.checks.get(id))
            .collect()
    }

    fn service_keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        for s in self.services.values() {
            keys.push(Key::Service(s.name.clone()));
            if let Some(t) = s.connect_target() {
                keys.push(Key::Connect(t.to_owned()));
            }
        }
        keys
    }

    fn insert_check(&mut self, rec: Arc<CheckRec>) {
        if rec.service_id.is_empty() {
            self.node_checks.insert(rec.id.clone());
        } else {
            self.service_checks
                .entry(rec.service_id.clone())
                .or_default()
                .insert(rec.id.clone());
        }
        self.checks.insert(rec.id.clone(), rec);
    }

    fn remove_check(&mut self, id: &str) -> Option<Arc<CheckRec>> {
        let rec = self.checks.remove(id)?;
        if rec.service_id.is_empty() {
            self.node_checks.remove(id);
        } else if let Some(set) = self.service_checks.get_mut(&rec.service_id) {
            set.remove(id);
            if set.is_empty() {
                self.service_checks.remove(&rec.service_id);
            }
        }
        Some(rec)
    }
}

/// A cached leaf certificate and when it is renewed.
pub(crate) struct LeafEntry {
    pub(crate) leaf: Arc<LeafCertificate>,
    pub(crate) renew_at: Instant,
}

/// Starting a check runner (TCP, HTTP) after a write commits, or stopping one.
pub(crate) enum RunnerOp {
    Start {
        node: String,
        check_id: String,
        kind: CheckKind,
    },
    Stop {
        node: String,
        check_id: String,
    },
}

/// One write: the index it will commit and what it touched.
pub(crate) struct Txn {
    pub(crate) index: u64,
    touched: HashSet<Key>,
    extinct: Vec<String>,
    runners: Vec<RunnerOp>,
    ttl_changed: bool,
    force: bool,
}

impl Txn {
    fn touch(&mut self, key: Key) {
        self.touched.insert(key);
    }

    fn touch_all(&mut self, keys: Vec<Key>) {
        self.touched.extend(keys);
    }

    /// Marks the CA roots as changed.
    pub(crate) fn touch_roots(&mut self) {
        self.touch(Key::CaRoots);
    }

    /// Whether the write changed anything (and so takes a new index).
    pub(crate) fn changed(&self) -> bool {
        self.force || !self.touched.is_empty()
    }
}

/// What a fresh catalog holds.
pub(crate) struct Bootstrap {
    pub(crate) datacenter: String,
    pub(crate) node_name: String,
    pub(crate) node_address: String,
    pub(crate) consul_service: bool,
}

/// All catalog data.
pub(crate) struct State {
    pub(crate) index: u64,
    /// The index at which some service last lost its last instance.
    pub(crate) extinction_index: u64,
    pub(crate) datacenter: String,
    pub(crate) agent_node: String,
    pub(crate) nodes: BTreeMap<String, NodeEntry>,
    pub(crate) by_name: HashMap<String, BTreeSet<InstKey>>,
    pub(crate) connect: HashMap<String, BTreeSet<InstKey>>,
    ttl_queue: BTreeSet<(Instant, String, String)>,
    ttl_deadline: HashMap<(String, String), Instant>,
    pub(crate) ca: Ca,
    pub(crate) leaves: HashMap<String, LeafEntry>,
}

fn default_tagged_for_agent(
    reg: &ServiceRegistration,
    tagged: &mut BTreeMap<String, ServiceAddress>,
) {
    // The agent adds lan/wan tagged addresses of the address family of a literal IP address.
    let Ok(ip) = reg.address.parse::<IpAddr>() else {
        return;
    };
    let (lan, wan) = if ip.is_ipv4() {
        ("lan_ipv4", "wan_ipv4")
    } else {
        ("lan_ipv6", "wan_ipv6")
    };
    for tag in [lan, wan] {
        tagged
            .entry(tag.to_owned())
            .or_insert_with(|| ServiceAddress {
                address: reg.address.clone(),
                port: reg.port,
            });
    }
}

impl State {
    fn new(boot: &Bootstrap) -> Result<Self, CatalogError> {
        let ca = Ca::new(&boot.datacenter, 1)?;
        Ok(State {
            index: 1,
            extinction_index: 1,
            datacenter: boot.datacenter.clone(),
            agent_node: boot.node_name.clone(),
            nodes: BTreeMap::new(),
            by_name: HashMap::new(),
            connect: HashMap::new(),
            ttl_queue: BTreeSet::new(),
            ttl_deadline: HashMap::new(),
            ca,
            leaves: HashMap::new(),
        })
    }

    /// The index of a service's health (the extinction index when it has no instance).
    pub(crate) fn service_index(&self, name: &str, slot_index: u64) -> u64 {
        if self.by_name.get(name).is_some_and(|s| !s.is_empty()) {
            slot_index
        } else {
            self.extinction_index.max(1)
        }
    }

    /// The index of a service's Connect view.
    pub(crate) fn connect_index(&self, name: &str, slot_index: u64) -> u64 {
        if self.connect.get(name).is_some_and(|s| !s.is_empty()) {
            slot_index
        } else {
            self.extinction_index.max(1)
        }
    }

    /// Instances of a service name, sorted by node then ID.
    pub(crate) fn instances<'a>(
        &'a self,
        keys: Option<&'a BTreeSet<InstKey>>,
    ) -> impl Iterator<Item = (&'a NodeEntry, &'a Arc<ServiceRec>)> + 'a {
        keys.into_iter().flatten().filter_map(move |(node, id)| {
            let entry = self.nodes.get(node)?;
            let svc = entry.services.get(id)?;
            Some((entry, svc))
        })
    }

    // ---- writes -------------------------------------------------------------------------

    /// Creates or updates a node record.
    pub(crate) fn ensure_node(
        &mut self,
        txn: &mut Txn,
        name: &str,
        id: Option<&str>,
        address: &str,
        tagged: BTreeMap<String, String>,
        meta: BTreeMap<String, String>,
    ) -> Result<(), CatalogError> {
        if name.is_empty() {
            return Err(CatalogError::invalid("node", "Must provide node"));
        }
        let datacenter = self.datacenter.clone();
        match self.nodes.get_mut(name) {
            Some(entry) => {
                let rec = NodeRec {
                    id: id.map_or_else(|| entry.node.id.clone(), str::to_owned),
                    name: name.to_owned(),
                    address: address.to_owned(),
                    datacenter,
                    tagged,
                    meta,
                    create_index: entry.node.create_index,
                    modify_index: txn.index,
                };
                if entry.node.same(&rec) {
                    return Ok(());
                }
                entry.node = Arc::new(rec);
                let keys = entry.service_keys();
                txn.touch_all(keys);
                txn.touch(Key::Nodes);
            }
            None => {
                let rec = NodeRec {
                    id: id.map_or_else(uuid_v4, str::to_owned),
                    name: name.to_owned(),
                    address: address.to_owned(),
                    datacenter,
                    tagged,
                    meta,
                    create_index: txn.index,
                    modify_index: txn.index,
                };
                self.nodes.insert(name.to_owned(), NodeEntry::new(rec));
                txn.touch(Key::Nodes);
            }
        }
        Ok(())
    }

    /// Creates or updates a service instance on a node. `agent` adds the agent's default
    /// tagged addresses.
    pub(crate) fn ensure_service(
        &mut self,
        txn: &mut Txn,
        node: &str,
        reg: &ServiceRegistration,
        agent: bool,
    ) -> Result<(), CatalogError> {
        if reg.name.is_empty() {
            return Err(CatalogError::invalid("service", "Missing service name"));
        }
        if let Some(w) = reg.weights
            && w.passing < 1
        {
            return Err(CatalogError::invalid(
                format!("service {:?}", reg.name),
                "Invalid Weights: Passing must be greater than 0",
            ));
        }
        if reg.kind == "connect-proxy"
            && reg
                .proxy
                .as_ref()
                .is_none_or(|p| p.destination_service_name.trim().is_empty())
        {
            return Err(CatalogError::invalid(
                format!("service {:?}", reg.name),
                "Proxy.DestinationServiceName must be non-empty for Connect proxy services",
            ));
        }
        let id = reg.service_id().to_owned();
        let mut tagged = reg.tagged_addresses.clone();
        if agent {
            default_tagged_for_agent(reg, &mut tagged);
        }
        let entry = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| CatalogError::UnknownNode {
                node: node.to_owned(),
            })?;
        let mut rec = ServiceRec {
            kind: reg.kind.clone(),
            id: id.clone(),
            name: reg.name.clone(),
            tags: reg.tags.clone(),
            address: reg.address.clone(),
            port: reg.port,
            tagged,
            meta: reg.meta.clone(),
            weights: reg.weights.unwrap_or_default(),
            enable_tag_override: reg.enable_tag_override,
            native: reg.connect_native,
            proxy: reg.proxy.clone(),
            create_index: txn.index,
            modify_index: txn.index,
        };
        let mut old_name = None;
        let mut old_target = None;
        if let Some(old) = entry.services.get(&id) {
            if old.same(&rec) {
                return Ok(());
            }
            rec.create_index = old.create_index;
            old_name = Some(old.name.clone());
            old_target = old.connect_target().map(str::to_owned);
        }
        let new_target = rec.connect_target().map(str::to_owned);
        // Keep the denormalised service fields of this instance's checks current.
        let check_ids: Vec<String> = entry
            .service_checks
            .get(&id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for cid in check_ids {
            if let Some(c) = entry.checks.get(&cid)
                && (c.service_name != rec.name || c.service_tags != rec.tags)
            {
                let mut c = (**c).clone();
                c.service_name = rec.name.clone();
                c.service_tags = rec.tags.clone();
                c.modify_index = txn.index;
                entry.checks.insert(cid, Arc::new(c));
                txn.touch(Key::Checks);
            }
        }
        let name = rec.name.clone();
        entry.services.insert(id.clone(), Arc::new(rec));
        let inst = (node.to_owned(), id);
        if let Some(old) = old_name.filter(|o| *o != name) {
            self.unlink_name(txn, &old, &inst);
        }
        if old_target != new_target
            && let Some(t) = &old_target
        {
            self.unlink_connect(txn, t, &inst);
        }
        self.by_name
            .entry(name.clone())
            .or_default()
            .insert(inst.clone());
        if let Some(t) = new_target {
            self.connect.entry(t.clone()).or_default().insert(inst);
            txn.touch(Key::Connect(t));
        }
        txn.touch(Key::Services);
        txn.touch(Key::Service(name));
        Ok(())
    }

    fn unlink_name(&mut self, txn: &mut Txn, name: &str, inst: &InstKey) {
        if let Some(set) = self.by_name.get_mut(name) {
            set.remove(inst);
            if set.is_empty() {
                self.by_name.remove(name);
                self.extinction_index = txn.index;
                txn.extinct.push(name.to_owned());
            }
        }
        txn.touch(Key::Service(name.to_owned()));
    }

    fn unlink_connect(&mut self, txn: &mut Txn, target: &str, inst: &InstKey) {
        if let Some(set) = self.connect.get_mut(target) {
            set.remove(inst);
            if set.is_empty() {
                self.connect.remove(target);
                self.extinction_index = txn.index;
            }
        }
        txn.touch(Key::Connect(target.to_owned()));
    }

    /// Keys to bump when something about a check (or a service's checks) changes.
    fn check_keys(entry: &NodeEntry, service_id: &str) -> Vec<Key> {
        if service_id.is_empty() {
            return entry.service_keys();
        }
        let mut keys = Vec::new();
        if let Some(s) = entry.services.get(service_id) {
            keys.push(Key::Service(s.name.clone()));
            if let Some(t) = s.connect_target() {
                keys.push(Key::Connect(t.to_owned()));
            }
        }
        keys
    }

    /// Creates or updates a check. `default_id`/`default_name` apply when the definition has
    /// none; with no initial status the previous status (or `critical`) is kept.
    pub(crate) fn ensure_check(
        &mut self,
        txn: &mut Txn,
        node: &str,
        def: &CheckDefinition,
        service_id: Option<&str>,
        default_id: &str,
        default_name: &str,
    ) -> Result<String, CatalogError> {
        let now = Instant::now();
        let entry = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| CatalogError::UnknownNode {
                node: node.to_owned(),
            })?;
        let id = def.id.clone().unwrap_or_else(|| default_id.to_owned());
        if id.is_empty() {
            return Err(CatalogError::invalid("check", "Must provide check ID"));
        }
        let service_id = service_id.or(def.service_id.as_deref()).unwrap_or("");
        let (service_name, service_tags) = if service_id.is_empty() {
            (String::new(), Vec::new())
        } else {
            let svc = entry.services.get(service_id).ok_or_else(|| {
                CatalogError::invalid(
                    format!("check {id:?}"),
                    format!("ServiceID {service_id:?} does not exist"),
                )
            })?;
            (svc.name.clone(), svc.tags.clone())
        };
        let existing = entry.checks.get(&id).cloned();
        let status = def
            .status
            .or_else(|| existing.as_ref().map(|e| e.status))
            .unwrap_or(CheckStatus::Critical);
        let output = if def.status.is_none() && def.output.is_empty() {
            existing
                .as_ref()
                .map(|e| e.output.clone())
                .unwrap_or_default()
        } else {
            def.output.clone()
        };
        let rec = CheckRec {
            node: node.to_owned(),
            id: id.clone(),
            name: def.name.clone().unwrap_or_else(|| default_name.to_owned()),
            status,
            notes: def.notes.clone(),
            output,
            service_id: service_id.to_owned(),
            service_name,
            service_tags,
            kind: def.kind.clone(),
            deregister_after: def.deregister_critical_service_after,
            create_index: existing.as_ref().map_or(txn.index, |e| e.create_index),
            modify_index: txn.index,
        };
        let key = (node.to_owned(), id.clone());
        // Runners: restart on a new definition, stop when the new kind has none.
        let kind_changed = existing.as_ref().is_none_or(|e| e.kind != rec.kind);
        if kind_changed {
            match &rec.kind {
                CheckKind::Tcp { .. } | CheckKind::Http { .. } => {
                    txn.runners.push(RunnerOp::Start {
                        node: node.to_owned(),
                        check_id: id.clone(),
                        kind: rec.kind.clone(),
                    })
                }
                _ => {
                    if existing.is_some() {
                        txn.runners.push(RunnerOp::Stop {
                            node: node.to_owned(),
                            check_id: id.clone(),
                        });
                    }
                }
            }
        }
        let mut changed = true;
        if let Some(e) = &existing {
            if e.same(&rec) {
                changed = false;
            } else if e.service_id != rec.service_id {
                let old_keys = Self::check_keys(entry, &e.service_id);
                txn.touch_all(old_keys);
                entry.remove_check(&id);
            }
        }
        if changed {
            let keys = Self::check_keys(entry, &rec.service_id);
            txn.touch_all(keys);
            txn.touch(Key::Checks);
            entry.insert_check(Arc::new(rec.clone()));
        }
        match rec.kind {
            CheckKind::Ttl(ttl) => self.arm_ttl(txn, key, now + ttl),
            _ => self.disarm_ttl(txn, &key),
        }
        Ok(id)
    }

    fn arm_ttl(&mut self, txn: &mut Txn, key: (String, String), deadline: Instant) {
        if let Some(old) = self.ttl_deadline.insert(key.clone(), deadline) {
            self.ttl_queue.remove(&(old, key.0.clone(), key.1.clone()));
        }
        self.ttl_queue.insert((deadline, key.0, key.1));
        txn.ttl_changed = true;
    }

    fn disarm_ttl(&mut self, txn: &mut Txn, key: &(String, String)) {
        if let Some(old) = self.ttl_deadline.remove(key) {
            self.ttl_queue.remove(&(old, key.0.clone(), key.1.clone()));
            txn.ttl_changed = true;
        }
    }

    /// The earliest TTL deadline.
    pub(crate) fn next_ttl_deadline(&self) -> Option<Instant> {
        self.ttl_queue.first().map(|(d, _, _)| *d)
    }

    /// Marks every TTL check whose deadline passed as critical (`TTL expired`).
    pub(crate) fn expire_ttls(&mut self, txn: &mut Txn, now: Instant) {
        while let Some((deadline, node, id)) = self.ttl_queue.first().cloned() {
            if deadline > now {
                break;
            }
            self.ttl_queue.remove(&(deadline, node.clone(), id.clone()));
            self.ttl_deadline.remove(&(node.clone(), id.clone()));
            let _ = self.set_check_status(
                txn,
                &node,
                &id,
                CheckStatus::Critical,
                "TTL expired".to_owned(),
            );
        }
    }

    /// Sets a check's status and output (no new index when both are unchanged).
    pub(crate) fn set_check_status(
        &mut self,
        txn: &mut Txn,
        node: &str,
        check_id: &str,
        status: CheckStatus,
        output: String,
    ) -> Result<(), CatalogError> {
        let entry = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| CatalogError::UnknownCheck {
                node: node.to_owned(),
                check_id: check_id.to_owned(),
            })?;
        let check = entry
            .checks
            .get(check_id)
            .ok_or_else(|| CatalogError::UnknownCheck {
                node: node.to_owned(),
                check_id: check_id.to_owned(),
            })?;
        if check.status == status && check.output == output {
            return Ok(());
        }
        let mut c = (**check).clone();
        c.status = status;
        c.output = output;
        c.modify_index = txn.index;
        let keys = Self::check_keys(entry, &c.service_id);
        entry.checks.insert(check_id.to_owned(), Arc::new(c));
        txn.touch_all(keys);
        txn.touch(Key::Checks);
        Ok(())
    }

    /// A TTL update (`/v1/agent/check/pass|warn|fail|update`): re-arms the TTL, then sets the
    /// status. Errors when the check has no TTL.
    pub(crate) fn update_ttl(
        &mut self,
        txn: &mut Txn,
        node: &str,
        check_id: &str,
        status: CheckStatus,
        output: String,
    ) -> Result<(), TtlError> {
        let kind = self
            .nodes
            .get(node)
            .and_then(|e| e.checks.get(check_id))
            .map(|c| c.kind.clone())
            .ok_or(TtlError::Unknown)?;
        let CheckKind::Ttl(ttl) = kind else {
            return Err(TtlError::NotTtl);
        };
        self.arm_ttl(
            txn,
            (node.to_owned(), check_id.to_owned()),
            Instant::now() + ttl,
        );
        self.set_check_status(txn, node, check_id, status, output)
            .map_err(|_| TtlError::Unknown)
    }

    /// Removes a check.
    pub(crate) fn remove_check(
        &mut self,
        txn: &mut Txn,
        node: &str,
        check_id: &str,
    ) -> Result<(), CatalogError> {
        let unknown = || CatalogError::UnknownCheck {
            node: node.to_owned(),
            check_id: check_id.to_owned(),
        };
        let entry = self.nodes.get_mut(node).ok_or_else(unknown)?;
        let rec = entry.remove_check(check_id).ok_or_else(unknown)?;
        let keys = Self::check_keys(entry, &rec.service_id);
        txn.touch_all(keys);
        txn.touch(Key::Checks);
        let key = (node.to_owned(), check_id.to_owned());
        self.disarm_ttl(txn, &key);
        txn.runners.push(RunnerOp::Stop {
            node: key.0,
            check_id: key.1,
        });
        Ok(())
    }

    /// Removes a service instance and its checks.
    pub(crate) fn remove_service(
        &mut self,
        txn: &mut Txn,
        node: &str,
        service_id: &str,
    ) -> Result<(), CatalogError> {
        let unknown = || CatalogError::UnknownService {
            node: node.to_owned(),
            service_id: service_id.to_owned(),
        };
        let entry = self.nodes.get_mut(node).ok_or_else(unknown)?;
        let svc = entry
            .services
            .get(service_id)
            .cloned()
            .ok_or_else(unknown)?;
        let check_ids: Vec<String> = entry
            .service_checks
            .get(service_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for cid in &check_ids {
            entry.remove_check(cid);
        }
        entry.services.remove(service_id);
        for cid in check_ids {
            let key = (node.to_owned(), cid);
            self.disarm_ttl(txn, &key);
            txn.runners.push(RunnerOp::Stop {
                node: key.0,
                check_id: key.1,
            });
            txn.touch(Key::Checks);
        }
        let inst = (node.to_owned(), service_id.to_owned());
        self.unlink_name(txn, &svc.name, &inst);
        if let Some(t) = svc.connect_target() {
            self.unlink_connect(txn, t, &inst);
        }
        txn.touch(Key::Services);
        Ok(())
    }

    /// Removes a node with everything on it.
    pub(crate) fn remove_node(&mut self, txn: &mut Txn, node: &str) -> Result<(), CatalogError> {
        let ids: Vec<String> = self
            .nodes
            .get(node)
            .ok_or_else(|| CatalogError::UnknownNode {
                node: node.to_owned(),
            })?
            .services
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.remove_service(txn, node, &id)?;
        }
        let check_ids: Vec<String> = self
            .nodes
            .get(node)
            .map(|e| e.checks.keys().cloned().collect())
            .unwrap_or_default();
        for id in check_ids {
            self.remove_check(txn, node, &id)?;
        }
        self.nodes.remove(node);
        txn.touch(Key::Nodes);
        Ok(())
    }

    /// Adds or removes `_service_maintenance:<id>`.
    pub(crate) fn set_service_maintenance(
        &mut self,
        txn: &mut Txn,
        node: &str,
        service_id: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<(), CatalogError> {
        let exists = self
            .nodes
            .get(node)
            .is_some_and(|e| e.services.contains_key(service_id));
        if !exists {
            return Err(CatalogError::UnknownService {
                node: node.to_owned(),
                service_id: service_id.to_owned(),
            });
        }
        let check_id = format!("_service_maintenance:{service_id}");
        let present = self
            .nodes
            .get(node)
            .is_some_and(|e| e.checks.contains_key(&check_id));
        if enable && !present {
            let notes = reason.filter(|r| !r.is_empty()).unwrap_or(
                "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.",
            );
            let def = CheckDefinition::unexecuted("maintenance", None)
                .status(CheckStatus::Critical)
                .notes(notes);
            self.ensure_check(
                txn,
                node,
                &def,
                Some(service_id),
                &check_id,
                "Service Maintenance Mode",
            )?;
        } else if !enable && present {
            self.remove_check(txn, node, &check_id)?;
        }
        Ok(())
    }

    /// Adds or removes `_node_maintenance`.
    pub(crate) fn set_node_maintenance(
        &mut self,
        txn: &mut Txn,
        node: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<(), CatalogError> {
        let check_id = "_node_maintenance";
        let entry = self
            .nodes
            .get(node)
            .ok_or_else(|| CatalogError::UnknownNode {
                node: node.to_owned(),
            })?;
        let present = entry.checks.contains_key(check_id);
        if enable && !present {
            let notes = reason.filter(|r| !r.is_empty()).unwrap_or(
                "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.",
            );
            let def = CheckDefinition::unexecuted("maintenance", None)
                .status(CheckStatus::Critical)
                .notes(notes);
            self.ensure_check(txn, node, &def, None, check_id, "Node Maintenance Mode")?;
        } else if !enable && present {
            self.remove_check(txn, node, check_id)?;
        }
        Ok(())
    }

    /// Registers a service on the agent's node with its checks, as
    /// `PUT /v1/agent/service/register` does.
    pub(crate) fn agent_register(
        &mut self,
        txn: &mut Txn,
        reg: &ServiceRegistration,
    ) -> Result<(), CatalogError> {
        let node = self.agent_node.clone();
        self.ensure_service(txn, &node, reg, true)?;
        self.register_service_checks(txn, &node, reg)
    }

    fn register_service_checks(
        &mut self,
        txn: &mut Txn,
        node: &str,
        reg: &ServiceRegistration,
    ) -> Result<(), CatalogError> {
        let id = reg.service_id().to_owned();
        let many = reg.checks.len() > 1;
        for (i, c) in reg.checks.iter().enumerate() {
            let default_id = if many {
                format!("service:{id}:{}", i + 1)
            } else {
                format!("service:{id}")
            };
            let default_name = format!("Service '{}' check", reg.name);
            self.ensure_check(txn, node, c, Some(&id), &default_id, &default_name)?;
        }
        Ok(())
    }

    /// Registers a node with its services and checks, as `PUT /v1/catalog/register` does.
    pub(crate) fn catalog_register(
        &mut self,
        txn: &mut Txn,
        reg: &NodeRegistration,
        skip_node_update: bool,
    ) -> Result<(), CatalogError> {
        if !(skip_node_update && self.nodes.contains_key(&reg.node)) {
            self.ensure_node(
                txn,
                &reg.node,
                reg.id.as_deref(),
                &reg.address,
                reg.tagged_addresses.clone(),
                reg.meta.clone(),
            )?;
        }
        for svc in &reg.services {
            self.ensure_service(txn, &reg.node, svc, false)?;
            self.register_service_checks(txn, &reg.node, svc)?;
        }
        for c in &reg.checks {
            let Some(id) = c.id.clone() else {
                return Err(CatalogError::invalid(
                    format!("node {:?}", reg.node),
                    "Must provide check ID",
                ));
            };
            self.ensure_check(txn, &reg.node, c, None, &id, &id)?;
        }
        Ok(())
    }

    /// The leaf for a service, issuing a new one when there is none, the active root changed,
    /// or the renewal time passed.
    pub(crate) fn leaf_for(
        &mut self,
        txn: &mut Txn,
        service: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<(Arc<LeafCertificate>, Instant), CatalogError> {
        let active = self.ca.active().id.clone();
        if let Some(e) = self.leaves.get(service)
            && e.leaf.root_id == active
            && now < e.renew_at
        {
            return Ok((e.leaf.clone(), e.renew_at));
        }
        let leaf = Arc::new(self.ca.sign_leaf(service, ttl, txn.index)?);
        txn.force = true;
        // Consul renews between 60% and 90% of the lifetime.
        let ttl_nanos = ttl.as_nanos().min(u128::from(u64::MAX)) as u64;
        let renew = ttl_nanos / 10 * 6 + random_below(ttl_nanos / 10 * 3);
        let renew_at = now + Duration::from_nanos(renew.max(1));
        self.leaves.insert(
            service.to_owned(),
            LeafEntry {
                leaf: leaf.clone(),
                renew_at,
            },
        );
        Ok((leaf, renew_at))
    }

    /// Rotates the CA.
    pub(crate) fn rotate_ca(&mut self, txn: &mut Txn) -> Result<RootCertificate, CatalogError> {
        let root = self.ca.rotate(txn.index)?;
        txn.touch(Key::CaRoots);
        Ok(root)
    }

    fn rewind(&mut self, to: u64) {
        self.index = to;
        self.extinction_index = self.extinction_index.min(to);
        for entry in self.nodes.values_mut() {
            let mut n = (*entry.node).clone();
            n.create_index = n.create_index.min(to);
            n.modify_index = n.modify_index.min(to);
            entry.node = Arc::new(n);
            for s in entry.services.values_mut() {
                let mut r = (**s).clone();
                r.create_index = r.create_index.min(to);
                r.modify_index = r.modify_index.min(to);
                *s = Arc::new(r);
            }
            for c in entry.checks.values_mut() {
                let mut r = (**c).clone();
                r.create_index = r.create_index.min(to);
                r.modify_index = r.modify_index.min(to);
                *c = Arc::new(r);
            }
        }
        for e in self.leaves.values_mut() {
            let mut l = (*e.leaf).clone();
            l.create_index = l.create_index.min(to);
            l.modify_index = l.modify_index.min(to);
            e.leaf = Arc::new(l);
        }
        self.ca.clamp_indexes(to);
    }
}

/// Why a TTL update failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TtlError {
    Unknown,
    NotTtl,
}

struct Slot {
    index: u64,
    tx: watch::Sender<u64>,
}

impl Slot {
    fn new(index: u64) -> Self {
        Slot {
            index,
            tx: watch::channel(index).0,
        }
    }
}

/// The catalog body cached for `/v1/catalog/services` (index, rewind generation, body).
pub(crate) type ServicesCache = Option<(u64, u64, bool, Bytes)>;

/// Serialized pieces of the two largest answers (`/v1/catalog/services` and
/// `/v1/health/state/any`, ~1 MB and ~10 MB at 10,000 services × 3 instances), kept while what
/// they were made from is unchanged: a service's piece until a write touches the service (every
/// write to an instance touches its service's key, which is what wakes `/v1/health/service`), a
/// check's piece while its record is the same. Check records are immutable `Arc`s replaced on
/// every write, so pointer equality means "unchanged"; holding the `Arc` keeps its address from
/// being reused. Only answers for readers that see everything, without filters, use them.
#[derive(Default)]
pub(crate) struct Fragments {
    /// Per service name, in name order: `"name":["tag",…]`. Complete only when `services_ready`.
    pub(crate) services: BTreeMap<String, Vec<u8>>,
    /// `services` holds every service name, and `dirty` the names written since.
    pub(crate) services_ready: bool,
    /// Service names whose instances were written since `services` was brought up to date.
    pub(crate) dirty: HashSet<String>,
    /// Per check record, by address: the record and its JSON object.
    pub(crate) checks: HashMap<usize, CheckPiece>,
    /// Counts the answers built: a piece not used by the latest one is dropped.
    pub(crate) epoch: u64,
    /// The length of the last answer of each kind (the next one reserves as much).
    pub(crate) services_len: usize,
    pub(crate) checks_len: usize,
}

/// The JSON of one check, and the record it was made from.
pub(crate) struct CheckPiece {
    /// Held so that the record's address, the piece's key, is not reused while the piece lives.
    pub(crate) _record: Arc<CheckRec>,
    pub(crate) json: Vec<u8>,
    /// The answer that last used it.
    pub(crate) epoch: u64,
}

/// The shared state with its locks, watch channels and background machinery.
pub(crate) struct Store {
    state: RwLock<State>,
    slots: Mutex<HashMap<Key, Slot>>,
    abandon: watch::Sender<u64>,
    pub(crate) shutdown: CancellationToken,
    ttl_wake: Notify,
    runners: Mutex<HashMap<(String, String), tokio::task::AbortHandle>>,
    runtime: tokio::runtime::Handle,
    pub(crate) services_cache: Mutex<ServicesCache>,
    pub(crate) fragments: Mutex<Fragments>,
    weak: Weak<Store>,
}

impl Store {
    /// A store holding the agent node (with `serfHealth`), optionally the `consul` service,
    /// and a fresh CA.
    pub(crate) fn new(boot: &Bootstrap) -> Result<Arc<Self>, CatalogError> {
        let state = State::new(boot)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            CatalogError::invalid(
                "dev catalog",
                format!("must start inside a tokio runtime: {e}"),
            )
        })?;
        let store = Arc::new_cyclic(|weak| Store {
            state: RwLock::new(state),
            slots: Mutex::new(HashMap::new()),
            abandon: watch::channel(0).0,
            shutdown: CancellationToken::new(),
            ttl_wake: Notify::new(),
            runners: Mutex::new(HashMap::new()),
            runtime,
            services_cache: Mutex::new(None),
            fragments: Mutex::new(Fragments::default()),
            weak: weak.clone(),
        });
        {
            let mut slots = store.lock_slots();
            for k in [Key::Services, Key::Nodes, Key::Checks, Key::CaRoots] {
                slots.insert(k, Slot::new(1));
            }
        }
        let node = boot.node_name.clone();
        let addr = boot.node_address.clone();
        store.write(|st, txn| -> Result<(), CatalogError> {
            let mut tagged = BTreeMap::new();
            let family = if addr.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) {
                "ipv6"
            } else {
                "ipv4"
            };
            for t in ["lan", "wan"] {
                tagged.insert(t.to_owned(), addr.clone());
                tagged.insert(format!("{t}_{family}"), addr.clone());
            }
            let mut meta = BTreeMap::new();
            meta.insert("consul-network-segment".to_owned(), String::new());
            meta.insert("consul-version".to_owned(), CONSUL_VERSION.to_owned());
            st.ensure_node(txn, &node, None, &addr, tagged, meta)?;
            let serf = CheckDefinition::static_status(CheckStatus::Passing)
                .output("Agent alive and reachable");
            st.ensure_check(txn, &node, &serf, None, "serfHealth", "Serf Health Status")?;
            if boot.consul_service {
                let mut consul = ServiceRegistration::new("consul").port(8300);
                for (k, v) in [
                    ("non_voter", "false"),
                    ("raft_version", "3"),
                    ("read_replica", "false"),
                    ("serf_protocol_current", "2"),
                    ("serf_protocol_max", "5"),
                    ("serf_protocol_min", "1"),
                    ("version", CONSUL_VERSION),
                ] {
                    consul = consul.meta(k, v);
                }
                st.ensure_service(txn, &node, &consul, false)?;
            }
            Ok(())
        })?;
        Ok(store)
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arc(&self) -> Option<Arc<Store>> {
        self.weak.upgrade()
    }

    /// Runs a write. When it changed something the new index is committed and the touched
    /// resources' watchers are woken.
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut State, &mut Txn) -> R) -> R {
        let (result, runners, ttl_changed) = {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            let mut txn = Txn {
                index: st.index + 1,
                touched: HashSet::new(),
                extinct: Vec::new(),
                runners: Vec::new(),
                ttl_changed: false,
                force: false,
            };
            let result = f(&mut st, &mut txn);
            if txn.changed() {
                st.index = txn.index;
                {
                    let mut frags = self.fragments.lock().unwrap_or_else(|e| e.into_inner());
                    if frags.services_ready {
                        for key in &txn.touched {
                            if let Key::Service(name) = key {
                                frags.dirty.insert(name.clone());
                            }
                        }
                    }
                }
                let mut slots = self.lock_slots();
                for key in txn.touched.drain() {
                    let slot = slots.entry(key).or_insert_with(|| Slot::new(txn.index));
                    slot.index = txn.index;
                    slot.tx.send_replace(txn.index);
                }
                for name in txn.extinct.drain(..) {
                    let key = Key::Service(name.clone());
                    if !st.by_name.contains_key(&name)
                        && slots.get(&key).is_some_and(|s| s.tx.receiver_count() == 0)
                    {
                        slots.remove(&key);
                    }
                }
            }
            (result, std::mem::take(&mut txn.runners), txn.ttl_changed)
        };
        self.apply_runners(runners);
        if ttl_changed {
            self.ttl_wake.notify_one();
        }
        result
    }

    /// Reads under the read lock with the current indexes of `keys`, subscribing to their
    /// watch channels at the same instant.
    pub(crate) fn read<R>(
        &self,
        keys: &[Key],
        f: impl FnOnce(&State, &[u64]) -> R,
    ) -> (R, Vec<watch::Receiver<u64>>) {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut idxs = Vec::with_capacity(keys.len());
        let mut rxs = Vec::with_capacity(keys.len());
        {
            let mut slots = self.lock_slots();
            for k in keys {
                let slot = slots.entry(k.clone()).or_insert_with(|| Slot::new(0));
                idxs.push(slot.index);
                rxs.push(slot.tx.subscribe());
            }
        }
        (f(&st, &idxs), rxs)
    }

    /// Subscribes to a resource's channel (a change after this call wakes the receiver).
    pub(crate) fn subscribe(&self, key: &Key) -> watch::Receiver<u64> {
        let mut slots = self.lock_slots();
        slots
            .entry(key.clone())
            .or_insert_with(|| Slot::new(0))
            .tx
            .subscribe()
    }

    /// Drops the channels of services that have no instance and no watcher any more.
    pub(crate) fn release(&self, keys: &[Key]) {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut slots = self.lock_slots();
        for k in keys {
            let gone = match k {
                Key::Service(n) => !st.by_name.contains_key(n),
                Key::Connect(n) => !st.connect.contains_key(n),
                _ => false,
            };
            if gone && slots.get(k).is_some_and(|s| s.tx.receiver_count() == 0) {
                slots.remove(k);
            }
        }
    }

    /// A receiver woken when the index is rewound (as after a snapshot restore): every
    /// blocking query then returns at once.
    pub(crate) fn abandon_rx(&self) -> watch::Receiver<u64> {
        self.abandon.subscribe()
    }

    /// The current rewind generation.
    pub(crate) fn generation(&self) -> u64 {
        *self.abandon.borrow()
    }

    /// The current global index.
    pub(crate) fn index(&self) -> u64 {
        self.state.read().unwrap_or_else(|e| e.into_inner()).index
    }

    /// Runs a read-only closure over the state.
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Moves every index back to at most `to` and wakes every blocking query, as a snapshot
    /// restore does.
    pub(crate) fn rewind(&self, to: u64) {
        let to = to.max(1);
        {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            st.rewind(to);
            let mut slots = self.lock_slots();
            for slot in slots.values_mut() {
                slot.index = slot.index.min(to);
            }
        }
        *self
            .services_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        *self.fragments.lock().unwrap_or_else(|e| e.into_inner()) = Fragments::default();
        self.abandon.send_modify(|g| *g += 1);
    }

    fn apply_runners(&self, ops: Vec<RunnerOp>) {
        if ops.is_empty() {
            return;
        }
        let mut runners = self.runners.lock().unwrap_or_else(|e| e.into_inner());
        for op in ops {
            match op {
                RunnerOp::Stop { node, check_id } => {
                    if let Some(h) = runners.remove(&(node, check_id)) {
                        h.abort();
                    }
                }
                RunnerOp::Start {
                    node,
                    check_id,
                    kind,
                } => {
                    let key = (node.clone(), check_id.clone());
                    if let Some(h) = runners.remove(&key) {
                        h.abort();
                    }
                    if self.shutdown.is_cancelled() {
                        continue;
                    }
                    let weak = self.weak.clone();
                    let shutdown = self.shutdown.clone();
                    let handle = self.runtime.spawn(async move {
                        tokio::select! {
                            () = super::checks::run_check(weak, node, check_id, kind) => {}
                            () = shutdown.cancelled() => {}
                        }
                    });
                    runners.insert(key, handle.abort_handle());
                }
            }
        }
    }

    /// Starts the TTL reaper.
    pub(crate) fn start_background(&self) {
        let Some(store) = self.arc() else {
            return;
        };
        let shutdown = self.shutdown.clone();
        self.runtime.spawn(async move {
            tokio::select! {
                () = super::checks::ttl_reaper(store) => {}
                () = shutdown.cancelled() => {}
            }
        });
    }

    /// Waits until woken by a TTL change.
    pub(crate) async fn ttl_changed(&self) {
        self.ttl_wake.notified().await;
    }

    /// Stops every runner and background task.
    pub(crate) fn stop(&self) {
        self.shutdown.cancel();
        let mut runners = self.runners.lock().unwrap_or_else(|e| e.into_inner());
        for (_, h) in runners.drain() {
            h.abort();
        }
    }
}
