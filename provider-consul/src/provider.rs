//! The running provider: which watches exist, how they share Consul, and how their results become
//! one published configuration.
//!
//! * One blocking query per namespace on `/v1/catalog/services` gives the services and the union
//!   of their tags. A service is *relevant* when its tags include `<prefix>.tcp.…` tags, are not
//!   disabled (`<prefix>.enable`, `exposedByDefault`) and match the constraints.
//! * Each relevant service has a watch on `/v1/health/service/<name>` (or
//!   `/v1/health/connect/<name>` for Connect services) with its own index; each answer is
//!   converted at once into that service's [`Fragment`], and only the resource names it touches
//!   are re-merged.
//! * **Direct mode** (at most `max_long_polls` relevant services, default 128): every service
//!   watch is a blocking query held open on Consul; a change is seen within milliseconds.
//! * **Feed mode** (more services than that): holding one open query per service would take one
//!   connection each over HTTP/1.1 (Consul agents allow 200 per client address by default), so
//!   the service watches do not block. Blocking queries on `/v1/health/state/critical` and
//!   `/v1/health/state/warning` (small answers: only failing checks) say which services' health
//!   moved, and the catalog answer says which services' tags moved; those services are fetched at
//!   once. Any other catalog change (an instance added or removed without a tag change) starts a
//!   paced *sweep* that re-fetches every service at `sweep_rate` per second, parsing only those
//!   whose index moved.
//! * **Poll mode** (`watch = false`): everything is re-read every `refreshInterval`.
//!
//! Non-blocking fetches share `fetch_concurrency` permits (so 10,000 services at start-up do not
//! open 10,000 connections) and every connection is pooled. Changes arriving within the
//! coalescing window are published together; before the first full sync nothing partial is
//! published (unless `initial_sync_timeout` passes). Errors never remove anything: the last good
//! fragment of every service stays until Consul answers again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tagway_config::{ConsulCatalog, Dynamic};
use tagway_transport::IdentitySource;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::api::{HealthCheck, ServiceEntry};
use crate::census;
use crate::client::{ClientError, ConsulClient, Settings};
use crate::connect::{self, ConnectEvent, ConnectIdentity};
use crate::constraints::{ConstraintError, Constraints};
use crate::convert::{
    CatalogError, ConnectContext, ConvertSettings, Fragment, Merger, ServiceInput, TagDecoder,
    convert_service, decode_tags,
};
use crate::watch::{Blocking, WatchTiming};

/// Tuning of the provider beyond `providers.consulCatalog` (defaults suit most clusters).
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderOptions {
    /// Services up to which every service has its own blocking query (Direct mode); above it the
    /// provider switches to Feed mode. Keep it below Consul's `limits.http_max_conns_per_client`
    /// (200 by default) when Consul speaks HTTP/1.1.
    pub max_long_polls: usize,
    /// Non-blocking queries (start-up, sweeps, fetches after a feed event) in flight at once.
    pub fetch_concurrency: usize,
    /// Services re-fetched per second by a Feed-mode sweep.
    pub sweep_rate: u32,
    /// Blocking-query timing.
    pub timing: WatchTiming,
    /// Publish what is known after this long even if some services have not answered yet.
    pub initial_sync_timeout: Duration,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        ProviderOptions {
            max_long_polls: 128,
            fetch_concurrency: 16,
            sweep_rate: 500,
            timing: WatchTiming::default(),
            initial_sync_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the provider cannot start with this configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The endpoint settings (address, TLS files, token file…).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `constraints` does not parse.
    #[error(transparent)]
    Constraints(#[from] ConstraintError),
    /// Another setting is invalid.
    #[error("invalid providers.consulCatalog.{key}: {message}")]
    Setting {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// How the service watches currently run (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// One blocking query per service.
    #[default]
    Direct,
    /// Health and catalog feeds, fetches on change, paced sweeps.
    Feed,
    /// `watch = false`: everything re-read every `refreshInterval`.
    Poll,
}

/// The provider's state, for `/ready` and the admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The catalog and every relevant service have been read at least once. Stays true
    /// afterwards. The configuration channel ([`Running::config`]) already carries the synced
    /// configuration when this turns true. (Connect services also need the identity: see
    /// `connect_pending`.)
    pub synced: bool,
    /// The last catalog query succeeded.
    pub reachable: bool,
    /// The last Consul error, if any since the last success.
    pub last_error: Option<String>,
    /// Relevant services watched.
    pub services: usize,
    /// Current mode.
    pub mode: Mode,
    /// Connect is enabled and the identity (leaf + roots) has arrived.
    pub connect_ready: bool,
    /// Connect services held back until the identity arrives.
    pub connect_pending: usize,
}

/// The Consul catalog provider.
pub struct ConsulProvider {
    cfg: ConsulCatalog,
    identity: Option<IdentitySource>,
    settings: Settings,
    convert: ConvertSettings,
    options: ProviderOptions,
    decoder: Arc<TagDecoder>,
}

impl fmt::Debug for ConsulProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulProvider")
            .field("settings", &self.settings)
            .field("convert", &self.convert)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ConsulProvider {
    /// Reads `providers.consulCatalog` and the `CONSUL_*` environment variables.
    pub fn new(cfg: &ConsulCatalog) -> Result<ConsulProvider, ProviderError> {
        Self::with_env(cfg, &|k| std::env::var(k).ok())
    }

    /// Like [`new`](Self::new) with another source of environment variables (tests).
    pub fn with_env(
        cfg: &ConsulCatalog,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConsulProvider, ProviderError> {
        let settings = Settings::resolve(
            &cfg.endpoint,
            cfg.stale,
            cfg.require_consistent,
            cfg.cache,
            env,
        )?;
        let prefix = cfg.prefix.trim().trim_end_matches('.').to_owned();
        if prefix.is_empty() {
            return Err(ProviderError::Setting {
                key: "prefix",
                message: "must not be empty".into(),
            });
        }
        let strict_checks = ConvertSettings::strict_checks(&cfg.strict_checks).map_err(|m| {
            ProviderError::Setting {
                key: "strictChecks",
                message: m,
            }
        })?;
        if cfg.connect_aware && cfg.service_name.trim().is_empty() {
            return Err(ProviderError::Setting {
                key: "serviceName",
                message: "must be set when connectAware is true".into(),
            });
        }
        if !cfg.watch && cfg.refresh_interval.to_std().is_none_or(|d| d.is_zero()) {
            return Err(ProviderError::Setting {
                key: "refreshInterval",
                message: "must be positive when watch is false".into(),
            });
        }
        let constraints = Constraints::parse(cfg.constraints.as_deref().unwrap_or(""))?;
        let mut options = ProviderOptions::default();
        if let Some(w) = cfg.endpoint.endpoint_wait_time.and_then(|d| d.to_std())
            && !w.is_zero()
        {
            options.timing.wait = w;
        }
        Ok(ConsulProvider {
            cfg: cfg.clone(),
            identity: None,
            settings,
            convert: ConvertSettings {
                prefix,
                exposed_by_default: cfg.exposed_by_default,
                constraints,
                strict_checks,
                connect_aware: cfg.connect_aware,
                connect_by_default: cfg.connect_by_default,
            },
            options,
            decoder: Arc::new(decode_tags),
        })
    }

    /// Replaces the tuning options (the `wait` from `endpointWaitTime` is kept unless the new
    /// options change it from the default).
    pub fn with_options(mut self, mut options: ProviderOptions) -> ConsulProvider {
        if options.timing.wait == WatchTiming::default().wait {
            options.timing.wait = self.options.timing.wait;
        }
        self.options = options;
        self
    }

    /// The transport crate's identity source the Connect leaf and roots are pushed to (create it
    /// with [`IdentitySource::manual`] and give it to the Connect transports). Every rotation is
    /// pushed; connections already open keep their identity.
    pub fn with_identity_source(mut self, source: IdentitySource) -> ConsulProvider {
        self.identity = Some(source);
        self
    }

    /// The options in force.
    pub fn options(&self) -> &ProviderOptions {
        &self.options
    }

    /// Starts the watches on the current tokio runtime. They run until `shutdown` completes.
    pub fn start<F>(self, shutdown: F) -> Result<Running, ProviderError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let o = &self.options;
        let client = ConsulClient::new(self.settings, o.max_long_polls + o.fetch_concurrency + 8)?;
        let (config_tx, config_rx) = watch::channel(Arc::new(Dynamic::default()));
        let (errors_tx, errors_rx) = watch::channel(Arc::new(Vec::new()));
        let (status_tx, status_rx) = watch::channel(Status::default());
        let (connect_tx, connect_rx) = watch::channel(None);
        let initial_mode = if self.cfg.watch {
            Mode::Direct
        } else {
            Mode::Poll
        };
        let (mode_tx, mode_rx) = watch::channel(initial_mode);
        let (events_tx, events_rx) = mpsc::channel(1024);
        let namespaces: Vec<Option<String>> = if self.cfg.namespaces.is_empty() {
            vec![None]
        } else {
            self.cfg
                .namespaces
                .iter()
                .map(|n| Some(n.clone()))
                .collect()
        };
        let timing = Arc::new(self.options.timing.clone());
        let aggregate_timing = Arc::new(WatchTiming {
            burst: timing.burst.max(10),
            interval: timing.interval.min(Duration::from_millis(20)),
            ..(*timing).clone()
        });
        let shared = Arc::new(Shared {
            datacenter: client.settings().datacenter.clone(),
            client,
            timing,
            aggregate_timing,
            convert: self.convert,
            decoder: self.decoder,
            long_permits: Semaphore::new(self.options.max_long_polls.max(1)),
            fetch_permits: Semaphore::new(self.options.fetch_concurrency.max(1)),
            mode: mode_rx,
            connect: connect_rx.clone(),
            namespaced: !self.cfg.namespaces.is_empty(),
            events: events_tx,
            watch_tasks: Arc::new(AtomicUsize::new(0)),
        });
        let watch_tasks = shared.watch_tasks.clone();
        tracing::info!(consul = %shared.client.base(), prefix = %shared.convert.prefix, watch = self.cfg.watch, "Consul catalog provider starting");
        let coordinator = Coordinator {
            shared: shared.clone(),
            options: self.options,
            refresh: self.cfg.refresh_interval.to_std(),
            poll: !self.cfg.watch,
            namespaces,
            connect_service: self
                .cfg
                .connect_aware
                .then(|| self.cfg.service_name.trim().to_owned()),
            identity_source: self.identity,
            config_tx,
            errors_tx,
            status_tx,
            connect_tx,
            mode_tx,
            watched: HashMap::new(),
            generation: 0,
            merger: Merger::new(),
            catalog_seen: HashSet::new(),
            pending: HashSet::new(),
            waiting_identity: HashSet::new(),
            census_tx: HashMap::new(),
            census_sweep: HashSet::new(),
            nodes: HashMap::new(),
            node_services: HashMap::new(),
            feeds: HashMap::new(),
            failing: HashMap::new(),
            published_errors: BTreeSet::new(),
            dirty_since: None,
            last_publish: None,
            synced: false,
            status: Status {
                mode: initial_mode,
                ..Status::default()
            },
            tasks: Vec::new(),
            sweep_tx: None,
        };
        let task = tokio::spawn(coordinator.run(events_rx, shutdown));
        Ok(Running {
            config: config_rx,
            errors: errors_rx,
            status: status_rx,
            connect: connect_rx,
            watch_tasks,
            task,
        })
    }
}

/// Handle on a started provider.
#[derive(Debug)]
pub struct Running {
    config: watch::Receiver<Arc<Dynamic>>,
    errors: watch::Receiver<Arc<Vec<CatalogError>>>,
    status: watch::Receiver<Status>,
    connect: watch::Receiver<Option<Arc<ConnectIdentity>>>,
    watch_tasks: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Running {
    /// The provider's configuration (unqualified names; the gateway merges it as
    /// `consulcatalog`). Starts empty; the first full sync is published at once.
    pub fn config(&self) -> watch::Receiver<Arc<Dynamic>> {
        self.config.clone()
    }

    /// The current problems (tag errors, unusable instances, conflicting definitions).
    pub fn errors(&self) -> watch::Receiver<Arc<Vec<CatalogError>>> {
        self.errors.clone()
    }

    /// The provider's status (for `/ready`: `synced`).
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The gateway's Connect identity (leaf + roots), `None` until both arrived or when Connect
    /// is off. Hand it to the transport crate's identity source for transports named
    /// `connect-*` of this provider.
    pub fn connect_identity(&self) -> watch::Receiver<Option<Arc<ConnectIdentity>>> {
        self.connect.clone()
    }

    /// Service watches running a task now. A watch runs one only while it has work: reading
    /// a service after a change, or long-polling it (Direct mode, at most `maxLongPolls`); in
    /// Feed mode an idle watch holds no task.
    pub fn watch_tasks(&self) -> usize {
        self.watch_tasks.load(Ordering::Relaxed)
    }

    /// Waits until the provider stopped (after its shutdown future completed).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// A Consul service: its namespace (when namespaces are configured) and name. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key(Arc<KeyInner>);

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct KeyInner {
    ns: Option<String>,
    name: String,
}

impl Key {
    fn new(ns: Option<String>, name: String) -> Key {
        Key(Arc::new(KeyInner { ns, name }))
    }
}

impl std::ops::Deref for Key {
    type Target = KeyInner;

    fn deref(&self) -> &KeyInner {
        &self.0
    }
}

/// A stable digest (within this process) of a list, to compare without keeping it.
fn digest<T: std::hash::Hash>(v: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(v)
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ns {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

struct Shared {
    client: ConsulClient,
    timing: Arc<WatchTiming>,
    /// Timing of the watches that aggregate every service (catalog, feeds, census): their rate
    /// limit only stops spinning, bursts of changes coalesce in their answers anyway.
    aggregate_timing: Arc<WatchTiming>,
    convert: ConvertSettings,
    decoder: Arc<TagDecoder>,
    long_permits: Semaphore,
    fetch_permits: Semaphore,
    mode: watch::Receiver<Mode>,
    connect: watch::Receiver<Option<Arc<ConnectIdentity>>>,
    datacenter: Option<String>,
    namespaced: bool,
    events: mpsc::Sender<Event>,
    /// Service watch tasks running ([`Running::watch_tasks`]).
    watch_tasks: Arc<AtomicUsize>,
}

/// Counts a running service watch task for as long as it lives.
struct TaskCount(Arc<AtomicUsize>);

impl TaskCount {
    fn new(n: &Arc<AtomicUsize>) -> TaskCount {
        n.fetch_add(1, Ordering::Relaxed);
        TaskCount(n.clone())
    }
}

impl Drop for TaskCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum What {
    Catalog(Option<String>),
    Service(Key),
    Feed(Option<String>, &'static str),
    Connect(String),
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            What::Catalog(None) => f.write_str("catalog"),
            What::Catalog(Some(ns)) => write!(f, "catalog of namespace {ns:?}"),
            What::Service(k) => write!(f, "service {:?}", k.to_string()),
            What::Feed(_, state) => write!(f, "{state} checks feed"),
            What::Connect(w) => f.write_str(w),
        }
    }
}

enum Event {
    Catalog {
        ns: Option<String>,
        /// `None`: unchanged (poll mode tick).
        delta: Option<CatalogDelta>,
    },
    Fragment {
        key: Key,
        generation: u64,
        /// `None`: a Connect service waiting for the Connect identity.
        fragment: Option<Fragment>,
        nodes: Vec<String>,
        /// Digest of the instances with at least one service check, `(node, service id)` sorted.
        checked: u64,
    },
    Census {
        ns: Option<String>,
        /// Service name → digest of its instances with a service check, `(node, service id)`
        /// sorted.
        by_service: HashMap<String, u64>,
    },
    CensusFailed {
        ns: Option<String>,
        error: String,
    },
    Feed {
        ns: Option<String>,
        state: &'static str,
        checks: Vec<HealthCheck>,
        first: bool,
    },
    Failed {
        what: What,
        error: String,
    },
    Recovered {
        what: What,
    },
}

/// What the coordinator knows of a watched service (its generation and whether it is a Connect
/// service are its watch's).
struct Watched {
    /// Digest of the union of its tags in the catalog.
    tags: u64,
    /// Digest of its instances with a service check, `(node, service id)` sorted.
    checked: u64,
    /// When its part of the configuration last changed.
    changed: Option<Instant>,
    watch: Arc<ServiceWatch>,
}

/// One Consul service's watch, which runs as a task only while it has work.
///
/// In Feed mode 10,000 watches sit idle between changes; an idle watch is this (a few hundred
/// bytes), not a parked task holding a request's state machine. A kick starts a task when none
/// runs, or tells the running one to read again. The task ends when it has nothing left to do
/// (Feed mode, the answer sent, no kick since); a long poll (Direct mode) or a Connect watch
/// (which re-converts when the identity changes) keeps running.
struct ServiceWatch {
    sh: Arc<Shared>,
    key: Key,
    generation: u64,
    connect: bool,
    /// Wakes a running task that waits for a kick (a Connect watch idle in Feed mode).
    notify: Notify,
    state: std::sync::Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    /// A task runs (`task` is its handle).
    running: bool,
    /// Kicked while running: read again before ending.
    kicked: bool,
    /// Removed: kicks start nothing.
    stopped: bool,
    task: Option<AbortHandle>,
    /// The watch's index, rate limit and back-off, kept between tasks.
    blocking: Option<Blocking>,
}

impl ServiceWatch {
    fn state(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a task, or has the running one read again.
    fn kick(self: &Arc<Self>) {
        let mut st = self.state();
        if st.stopped {
            return;
        }
        if st.running {
            st.kicked = true;
            drop(st);
            if self.connect {
                self.notify.notify_one();
            }
        } else {
            st.running = true;
            st.kicked = false;
            // Under the lock: the task cannot reach its end before its handle is stored.
            st.task = Some(tokio::spawn(service_task(self.clone())).abort_handle());
        }
    }

    /// Stops the watch and its task.
    fn stop(&self) {
        let mut st = self.state();
        st.stopped = true;
        if let Some(t) = st.task.take() {
            t.abort();
        }
    }

    /// Called by the task when it has nothing to do: `None` to end (the watch keeps `blocking`
    /// for the next task), or `blocking` back when a kick came in the meantime (read again).
    fn finish(&self, blocking: Blocking) -> Option<Blocking> {
        let mut st = self.state();
        if st.kicked && !st.stopped {
            st.kicked = false;
            return Some(blocking);
        }
        st.running = false;
        st.task = None;
        st.blocking = Some(blocking);
        None
    }

    /// Clears a kick that has been seen (by a task that waited for it).
    fn kick_seen(&self) {
        self.state().kicked = false;
    }
}

/// A check of a health feed: (node, service name, check ID, status).
type FeedCheck = (String, String, String, String);

struct SweepRequest {
    kicks: Vec<Arc<ServiceWatch>>,
    paced: bool,
}

struct Coordinator {
    shared: Arc<Shared>,
    options: ProviderOptions,
    refresh: Option<Duration>,
    poll: bool,
    namespaces: Vec<Option<String>>,
    connect_service: Option<String>,
    identity_source: Option<IdentitySource>,
    config_tx: watch::Sender<Arc<Dynamic>>,
    errors_tx: watch::Sender<Arc<Vec<CatalogError>>>,
    status_tx: watch::Sender<Status>,
    connect_tx: watch::Sender<Option<Arc<ConnectIdentity>>>,
    mode_tx: watch::Sender<Mode>,
    watched: HashMap<Key, Watched>,
    generation: u64,
    merger: Merger,
    catalog_seen: HashSet<Option<String>>,
    pending: HashSet<Key>,
    waiting_identity: HashSet<Key>,
    census_tx: HashMap<Option<String>, watch::Sender<u64>>,
    census_sweep: HashSet<Option<String>>,
    nodes: HashMap<Key, Vec<String>>,
    node_services: HashMap<(Option<String>, String), HashSet<Key>>,
    feeds: HashMap<(Option<String>, &'static str), BTreeSet<FeedCheck>>,
    failing: HashMap<What, String>,
    published_errors: BTreeSet<CatalogError>,
    dirty_since: Option<Instant>,
    last_publish: Option<Instant>,
    synced: bool,
    status: Status,
    tasks: Vec<AbortHandle>,
    sweep_tx: Option<watch::Sender<Option<Arc<SweepRequest>>>>,
}

impl Coordinator {
    async fn run<F: Future<Output = ()>>(mut self, mut events: mpsc::Receiver<Event>, shutdown: F) {
        let started = Instant::now();
        self.spawn_fixed_tasks();
        let mut connect_rx = self.shared.connect.clone();
        tokio::pin!(shutdown);
        loop {
            let publish_at = self.publish_deadline(started);
            tokio::select! {
                _ = &mut shutdown => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                Ok(()) = connect_rx.changed() => {
                    let id = connect_rx.borrow_and_update().clone();
                    self.status.connect_ready = id.is_some();
                    if let (Some(src), Some(id)) = (&self.identity_source, id) {
                        let roots = id.roots_pem.join("\n");
                        if let Err(e) = src.update_pem(
                            id.cert_chain_pem.as_bytes(),
                            id.key_pem.as_bytes(),
                            roots.as_bytes(),
                        ) {
                            tracing::error!(error = %e, "Consul Connect identity refused by the transport, keeping the previous one");
                        }
                    }
                    self.check_synced();
                    self.push_status();
                }
                _ = sleep_until_opt(publish_at) => self.publish(),
            }
        }
        for w in self.watched.values() {
            w.watch.stop();
        }
        for t in &self.tasks {
            t.abort();
        }
        tracing::info!("Consul catalog provider stopped");
    }

    fn spawn_fixed_tasks(&mut self) {
        let poll_every = if self.poll { self.refresh } else { None };
        for ns in self.namespaces.clone() {
            let sh = self.shared.clone();
            self.tasks
                .push(tokio::spawn(catalog_task(sh, ns.clone(), poll_every)).abort_handle());
            if !self.poll {
                for state in ["critical", "warning"] {
                    let sh = self.shared.clone();
                    self.tasks
                        .push(tokio::spawn(feed_task(sh, ns.clone(), state)).abort_handle());
                }
                let (tx, rx) = watch::channel(0u64);
                let sh = self.shared.clone();
                self.tasks
                    .push(tokio::spawn(census_task(sh, ns.clone(), rx)).abort_handle());
                self.census_tx.insert(ns.clone(), tx);
            }
        }
        let (sweep_tx, sweep_rx) = watch::channel(None);
        self.tasks
            .push(tokio::spawn(sweeper(sweep_rx, self.options.sweep_rate)).abort_handle());
        self.sweep_tx = Some(sweep_tx);
        if let Some(service) = self.connect_service.clone() {
            let sh = self.shared.clone();
            let tx = self.connect_tx.clone();
            let events = self.shared.events.clone();
            self.tasks.push(
                tokio::spawn(connect::run(
                    sh.client.clone(),
                    sh.timing.clone(),
                    service,
                    tx,
                    move |ev| {
                        let ev = match ev {
                            ConnectEvent::Failed { what, error } => Event::Failed {
                                what: What::Connect(what),
                                error,
                            },
                            ConnectEvent::Recovered { what } => Event::Recovered {
                                what: What::Connect(what),
                            },
                        };
                        let _ = events.try_send(ev);
                    },
                ))
                .abort_handle(),
            );
        }
    }

    /// When to publish: an isolated change at once, the changes that follow within the coalescing
    /// window together at its end (at most one publication per window); before the first sync,
    /// at the sync (or after `initial_sync_timeout`).
    fn publish_deadline(&self, started: Instant) -> Option<Instant> {
        let since = self.dirty_since?;
        if self.synced {
            Some(match self.last_publish {
                Some(last) => since.max(last + self.options.timing.coalesce),
                None => since,
            })
        } else {
            Some(
                (since + self.options.timing.coalesce)
                    .max(started + self.options.initial_sync_timeout),
            )
        }
    }

    fn handle(&mut self, ev: Event) {
        let t0 = Instant::now();
        let kind = match &ev {
            Event::Catalog { .. } => "catalog",
            Event::Fragment { .. } => "fragment",
            Event::Census { .. } => "census",
            Event::CensusFailed { .. } => "census failed",
            Event::Feed { .. } => "feed",
            Event::Failed { .. } => "failed",
            Event::Recovered { .. } => "recovered",
        };
        self.dispatch(ev);
        tracing::debug!(
            target: "tagway::timing",
            event = kind,
            handle_us = t0.elapsed().as_micros() as u64,
            "provider event"
        );
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Catalog { ns, delta } => self.on_catalog(ns, delta),
            Event::Fragment {
                key,
                generation,
                fragment,
                nodes,
                checked,
            } => self.on_fragment(key, generation, fragment, nodes, checked),
            Event::Census { ns, by_service } => self.on_census(ns, by_service),
            Event::CensusFailed { ns, error } => {
                tracing::debug!(%error, "instance census failed, sweeping instead");
                if self.census_sweep.remove(&ns) {
                    self.sweep(true);
                }
            }
            Event::Feed {
                ns,
                state,
                checks,
                first,
            } => self.on_feed(ns, state, checks, first),
            Event::Failed { what, error } => self.on_failed(what, error),
            Event::Recovered { what } => self.on_recovered(what),
        }
    }

    fn on_catalog(&mut self, ns: Option<String>, delta: Option<CatalogDelta>) {
        self.on_recovered(What::Catalog(ns.clone()));
        self.status.reachable = true;
        let first_answer = self.catalog_seen.insert(ns.clone());
        let Some(delta) = delta else {
            // Poll mode, catalog unchanged: re-read every service.
            self.sweep(false);
            return;
        };
        // Only the names whose tags differ from the last answer can change what is watched
        // (every name on the first answer): at 10,000 services most answers differ in one.
        let mut desired: BTreeMap<Key, (bool, u64)> = BTreeMap::new();
        let mut touched = Vec::with_capacity(delta.entries.len());
        for (name, entry) in delta.entries {
            let key = Key::new(ns.clone(), name);
            if let CatalogEntry::Relevant { connect, tags } = entry {
                desired.insert(key.clone(), (connect, tags));
            }
            touched.push(key);
        }
        let gone: Vec<Key> = if delta.full {
            self.watched
                .keys()
                .filter(|k| k.ns == ns && !desired.contains_key(*k))
                .cloned()
                .collect()
        } else {
            touched
                .into_iter()
                .filter(|k| self.watched.contains_key(k) && !desired.contains_key(k))
                .collect()
        };
        for k in gone {
            self.remove(&k);
        }
        let mut attributed = Vec::new();
        for (key, (connect, tags)) in desired {
            match self.watched.get_mut(&key) {
                Some(w) if w.watch.connect == connect => {
                    if w.tags != tags {
                        w.tags = tags;
                        attributed.push(w.watch.clone());
                    }
                }
                Some(_) => {
                    self.remove(&key);
                    self.spawn_service(key, connect, tags);
                }
                None => self.spawn_service(key, connect, tags),
            }
        }
        let none_attributed = attributed.is_empty();
        for w in attributed {
            w.kick();
        }
        self.update_mode();
        match self.status.mode {
            Mode::Poll => self.sweep(false),
            Mode::Feed if !first_answer => {
                // Which services gained or lost an instance: one census of every check.
                if none_attributed {
                    self.census_sweep.insert(ns.clone());
                }
                if let Some(tx) = self.census_tx.get(&ns) {
                    tx.send_modify(|n| *n += 1);
                } else if none_attributed {
                    self.sweep(true);
                }
            }
            _ => {}
        }
        self.check_synced();
        self.push_status();
    }

    fn spawn_service(&mut self, key: Key, connect: bool, tags: u64) {
        self.generation += 1;
        let watch = Arc::new(ServiceWatch {
            sh: self.shared.clone(),
            key: key.clone(),
            generation: self.generation,
            connect,
            notify: Notify::new(),
            state: Default::default(),
        });
        watch.kick();
        tracing::debug!(service = %key, connect, "watching Consul service");
        self.pending.insert(key.clone());
        self.watched.insert(
            key,
            Watched {
                tags,
                checked: census::instances_digest([]),
                changed: None,
                watch,
            },
        );
    }

    fn remove(&mut self, key: &Key) {
        if let Some(w) = self.watched.remove(key) {
            w.watch.stop();
            tracing::debug!(service = %key, "Consul service no longer relevant");
        }
        self.pending.remove(key);
        if self.waiting_identity.remove(key) {
            self.status.connect_pending = self.waiting_identity.len();
        }
        self.failing.remove(&What::Service(key.clone()));
        self.set_nodes(key, Vec::new());
        if self.merger.set(&key.to_string(), None) {
            self.mark_dirty();
        }
    }

    fn set_nodes(&mut self, key: &Key, nodes: Vec<String>) {
        if let Some(old) = self.nodes.remove(key) {
            for n in old {
                let nk = (key.ns.clone(), n);
                if let Some(set) = self.node_services.get_mut(&nk) {
                    set.remove(key);
                    if set.is_empty() {
                        self.node_services.remove(&nk);
                    }
                }
            }
        }
        if !nodes.is_empty() {
            for n in &nodes {
                self.node_services
                    .entry((key.ns.clone(), n.clone()))
                    .or_default()
                    .insert(key.clone());
            }
            self.nodes.insert(key.clone(), nodes);
        }
    }

    fn update_mode(&mut self) {
        let w = self.watched.len();
        let p = self.options.max_long_polls;
        let cur = self.status.mode;
        let next = match cur {
            Mode::Poll => Mode::Poll,
            _ if w > p => Mode::Feed,
            Mode::Feed if w > p * 9 / 10 => Mode::Feed,
            _ => Mode::Direct,
        };
        self.status.services = w;
        if next != cur {
            tracing::info!(services = w, max_long_polls = p, mode = ?next, "Consul watch mode changed");
            self.status.mode = next;
            self.mode_tx.send_replace(next);
            // Watches idle in Feed mode run no task: each starts one to long-poll (running
            // ones see the change themselves).
            if next == Mode::Direct {
                for w in self.watched.values() {
                    w.watch.kick();
                }
            }
            if next == Mode::Feed && self.watched.len() > self.pending.len() {
                // Changes between the end of the long polls and the first feed answers (at
                // start-up no service has long-polled yet: nothing to catch up).
                self.sweep(true);
            }
        }
    }

    fn sweep(&mut self, paced: bool) {
        if let Some(tx) = &self.sweep_tx {
            // Services that changed last first: during a rolling deploy the next instance
            // added or removed is most likely one of theirs.
            let mut order: Vec<&Watched> = self.watched.values().collect();
            order.sort_by_key(|w| std::cmp::Reverse(w.changed));
            let kicks = order.into_iter().map(|w| w.watch.clone()).collect();
            tx.send_replace(Some(Arc::new(SweepRequest { kicks, paced })));
        }
    }

    fn on_fragment(
        &mut self,
        key: Key,
        generation: u64,
        fragment: Option<Fragment>,
        nodes: Vec<String>,
        checked: u64,
    ) {
        if self.watched.get(&key).map(|w| w.watch.generation) != Some(generation) {
            return;
        }
        self.on_recovered(What::Service(key.clone()));
        self.set_nodes(&key, nodes);
        if let Some(w) = self.watched.get_mut(&key) {
            w.checked = checked;
        }
        let waiting = fragment.is_none();
        let t0 = Instant::now();
        let changed = self.merger.set(&key.to_string(), fragment);
        tracing::debug!(
            target: "tagway::timing",
            service = %key,
            merge_us = t0.elapsed().as_micros() as u64,
            "fragment merged"
        );
        if changed {
            self.mark_dirty();
            if let Some(w) = self.watched.get_mut(&key) {
                w.changed = Some(Instant::now());
            }
        }
        let changed = if waiting {
            self.waiting_identity.insert(key.clone())
        } else {
            self.waiting_identity.remove(&key)
        };
        if changed {
            self.status.connect_pending = self.waiting_identity.len();
            self.push_status();
        }
        if self.pending.remove(&key) {
            self.check_synced();
        }
    }

    fn on_feed(
        &mut self,
        ns: Option<String>,
        state: &'static str,
        checks: Vec<HealthCheck>,
        first: bool,
    ) {
        self.on_recovered(What::Feed(ns.clone(), state));
        let now: BTreeSet<FeedCheck> = checks
            .into_iter()
            .map(|c| (c.node, c.service_name, c.check_id, c.status))
            .collect();
        let prev = self.feeds.insert((ns.clone(), state), now.clone());
        let changed: Vec<&FeedCheck> = match (&prev, first) {
            (Some(prev), false) => now.symmetric_difference(prev).collect(),
            _ => now.iter().collect(),
        };
        let mut kicks: HashSet<Key> = HashSet::new();
        for (node, service, _, _) in changed {
            if service.is_empty() {
                if let Some(keys) = self.node_services.get(&(ns.clone(), node.clone())) {
                    kicks.extend(keys.iter().cloned());
                }
            } else {
                let key = Key::new(ns.clone(), service.clone());
                if self.watched.contains_key(&key) {
                    kicks.insert(key);
                }
            }
        }
        for k in kicks {
            if let Some(w) = self.watched.get(&k) {
                w.watch.kick();
            }
        }
    }

    fn on_census(&mut self, ns: Option<String>, by_service: HashMap<String, u64>) {
        let empty = census::instances_digest([]);
        let mut kicked = 0usize;
        for (key, w) in &self.watched {
            if key.ns != ns {
                continue;
            }
            let now = by_service.get(&key.name).copied().unwrap_or(empty);
            if now != w.checked {
                w.watch.kick();
                kicked += 1;
            }
        }
        tracing::debug!(kicked, "instance census");
        if self.census_sweep.remove(&ns) && kicked == 0 {
            // An instance without checks, or an address or port change: only a sweep tells.
            self.sweep(true);
        }
    }

    fn on_failed(&mut self, what: What, error: String) {
        let catalog_down = self.failing.keys().any(|w| matches!(w, What::Catalog(_)));
        let first = !self.failing.contains_key(&what);
        if first {
            match &what {
                What::Catalog(_) => {
                    tracing::warn!(%what, %error, "Consul unreachable: keeping the last configuration, retrying");
                }
                What::Service(_) if catalog_down => {
                    tracing::debug!(%what, %error, "Consul query failed");
                }
                _ => tracing::warn!(%what, %error, "Consul query failed, retrying"),
            }
        }
        if let What::Catalog(_) = what {
            self.status.reachable = false;
        }
        self.status.last_error = Some(format!("{what}: {error}"));
        self.failing.insert(what, error);
        self.push_status();
    }

    fn on_recovered(&mut self, what: What) {
        if self.failing.remove(&what).is_some() {
            tracing::info!(%what, "Consul answers again");
            if self.failing.is_empty() {
                self.status.last_error = None;
            }
            self.push_status();
        }
    }

    fn check_synced(&mut self) {
        if self.synced {
            return;
        }
        let catalog = self
            .namespaces
            .iter()
            .all(|n| self.catalog_seen.contains(n));
        if catalog && self.pending.is_empty() {
            self.synced = true;
            self.status.synced = true;
            tracing::info!(services = self.watched.len(), "Consul catalog synced");
            // Publish the synced configuration now (even if nothing changed: an empty catalog
            // is a valid state), and only then say `synced`: a consumer that sees the status
            // and reads the configuration must get this one, not the placeholder.
            self.publish();
            self.push_status();
        }
    }

    fn mark_dirty(&mut self) {
        if self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
    }

    fn publish(&mut self) {
        self.dirty_since = None;
        self.last_publish = Some(Instant::now());
        // Only called when a fragment changed the merge (or at the first sync): no deep
        // comparison of the previous configuration (20 ms at 10,000 services).
        self.config_tx.send_replace(self.merger.snapshot());
        let errors = self.merger.errors();
        let now: BTreeSet<CatalogError> = errors.iter().cloned().collect();
        for e in now.difference(&self.published_errors) {
            tracing::warn!(
                service = %e.service,
                instance = e.instance.as_deref().unwrap_or(""),
                tag = e.tag.as_deref().unwrap_or(""),
                resource = e.resource.as_deref().unwrap_or(""),
                "{}", e.message
            );
        }
        for e in self.published_errors.difference(&now) {
            tracing::info!(service = %e.service, instance = e.instance.as_deref().unwrap_or(""), resource = e.resource.as_deref().unwrap_or(""), "resolved: {}", e.message);
        }
        if now != self.published_errors {
            self.published_errors = now;
            self.errors_tx.send_replace(Arc::new(errors));
        }
    }

    fn push_status(&self) {
        self.status_tx.send_if_modified(|cur| {
            if *cur == self.status {
                return false;
            }
            *cur = self.status.clone();
            true
        });
    }
}

/// What a catalog answer changed since the last one, computed where it is decoded: the answer
/// (10,000 services and their tags, ~1 MB) is read with its strings borrowed, and only a digest
/// of each service's tags is kept between answers.
struct CatalogDelta {
    /// Every service of the catalog is listed (the first answer of the watch).
    full: bool,
    /// The services that are new, gone or tagged differently, in name order.
    entries: Vec<(String, CatalogEntry)>,
}

/// How a service of a catalog answer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CatalogEntry {
    /// Listed, with tags that make it watched.
    Relevant {
        /// Watched through `/v1/health/connect`.
        connect: bool,
        /// The digest of its tags.
        tags: u64,
    },
    /// Listed, not watched (no TCP tags, disabled, or outside the constraints).
    Ignored,
    /// No longer listed.
    Gone,
}

/// A string of a catalog answer, borrowed from it unless JSON escapes force a copy. It hashes
/// as a `String` does (a newtype hashes as its one field), so a digest of borrowed tags equals
/// one of owned tags.
#[derive(serde::Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Text<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The catalog digests of one watch: per service name, the digest of its tags.
type CatalogDigests = BTreeMap<String, u64>;

/// Decodes an answer of `/v1/catalog/services` against the digests of the last one (`None`
/// before the first and after a broken answer), updates them, and says what changed. The answer
/// is read entry by entry:
/// only the tags of one service are held at a time, and only the services that changed are
/// copied out of it.
fn catalog_delta(
    body: &[u8],
    conv: &ConvertSettings,
    last: &mut Option<CatalogDigests>,
) -> Result<CatalogDelta, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let full = last.is_none();
    // Taken: after a broken answer the next one is read as a first one (every service listed),
    // which re-checks everything the broken one may have half-read.
    let mut delta = DeltaSeed {
        conv,
        full,
        prev: last.take().unwrap_or_default(),
        next: CatalogDigests::new(),
        entries: BTreeMap::new(),
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    (&mut delta).deserialize(&mut de)?;
    de.end()?;
    let DeltaSeed {
        prev,
        next,
        mut entries,
        ..
    } = delta;
    // What the answer no longer lists.
    entries.extend(prev.into_keys().map(|gone| (gone, CatalogEntry::Gone)));
    *last = Some(next);
    Ok(CatalogDelta {
        full,
        entries: entries.into_iter().collect(),
    })
}

/// The state of [`catalog_delta`] while the answer is read.
struct DeltaSeed<'c> {
    conv: &'c ConvertSettings,
    full: bool,
    /// The last answer's digests not yet met in this one.
    prev: CatalogDigests,
    next: CatalogDigests,
    entries: BTreeMap<String, CatalogEntry>,
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut DeltaSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut DeltaSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of service names to their tags")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<Text<'de>>()? {
            let tags: Vec<Text<'de>> = map.next_value()?;
            let d = digest(&tags);
            let (name, same) = match self.prev.remove_entry(name.as_ref()) {
                Some((owned, before)) => (owned, before == d),
                None => (name.0.into_owned(), false),
            };
            if self.full || !same {
                let entry = if relevant(self.conv, &tags) {
                    CatalogEntry::Relevant {
                        connect: service_connect(self.conv, &tags),
                        tags: d,
                    }
                } else {
                    CatalogEntry::Ignored
                };
                self.entries.insert(name.clone(), entry);
            }
            self.next.insert(name, d);
        }
        Ok(())
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Traefik's catalog-level filter plus tagway's: only services with TCP tags matter.
fn relevant<S: AsRef<str>>(conv: &ConvertSettings, tags: &[S]) -> bool {
    let p = &conv.prefix;
    let tcp = format!("{p}.tcp.");
    let has_tcp = tags.iter().map(AsRef::as_ref).any(|t: &str| {
        t.len() > tcp.len() && t.as_bytes()[..tcp.len()].eq_ignore_ascii_case(tcp.as_bytes())
    });
    if !has_tcp {
        return false;
    }
    let enable_true = format!("{p}.enable=true");
    let enable_false = format!("{p}.enable=false");
    if !conv.exposed_by_default
        && !tags
            .iter()
            .any(|t| t.as_ref().eq_ignore_ascii_case(&enable_true))
    {
        return false;
    }
    if tags
        .iter()
        .any(|t| t.as_ref().eq_ignore_ascii_case(&enable_false))
    {
        return false;
    }
    conv.constraints.matches(tags)
}

/// Whether a service is watched through `/v1/health/connect` (Traefik's rule).
fn service_connect<S: AsRef<str>>(conv: &ConvertSettings, tags: &[S]) -> bool {
    if !conv.connect_aware {
        return false;
    }
    let key = format!("{}.consulcatalog.connect", conv.prefix);
    let mut tagged = None;
    for t in tags {
        if let Some((k, v)) = t.as_ref().split_once('=')
            && k.trim().eq_ignore_ascii_case(&key)
        {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => tagged = Some(true),
                "false" => tagged = tagged.or(Some(false)),
                _ => {}
            }
        }
    }
    tagged.unwrap_or(conv.connect_by_default)
}

async fn catalog_task(sh: Arc<Shared>, ns: Option<String>, poll: Option<Duration>) {
    let mut b = Blocking::new(sh.aggregate_timing.clone());
    let segs = ["v1", "catalog", "services"];
    // The tag digests of the last answer, updated by the decoder (off the runtime thread).
    let last: Arc<std::sync::Mutex<Option<CatalogDigests>>> = Arc::default();
    loop {
        b.pace().await;
        let decode = {
            let (sh, last) = (sh.clone(), last.clone());
            move |body: &[u8]| {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                catalog_delta(body, &sh.convert, &mut last)
            }
        };
        let r = b
            .query_with(&sh.client, &segs, ns.as_deref(), poll.is_none(), decode)
            .await;
        let ev = match r {
            Ok(Some(delta)) => Event::Catalog {
                ns: ns.clone(),
                delta: Some(delta),
            },
            Ok(None) if poll.is_some() => Event::Catalog {
                ns: ns.clone(),
                delta: None,
            },
            Ok(None) => Event::Recovered {
                what: What::Catalog(ns.clone()),
            },
            Err(e) => Event::Failed {
                what: What::Catalog(ns.clone()),
                error: e.to_string(),
            },
        };
        if sh.events.send(ev).await.is_err() {
            return;
        }
        if let Some(every) = poll {
            tokio::time::sleep(every).await;
        }
    }
}

async fn feed_task(sh: Arc<Shared>, ns: Option<String>, state: &'static str) {
    let mut mode = sh.mode.clone();
    let segs = ["v1", "health", "state", state];
    loop {
        if mode.wait_for(|m| *m == Mode::Feed).await.is_err() {
            return;
        }
        tracing::debug!(state, "health feed started");
        let mut b = Blocking::new(sh.aggregate_timing.clone());
        let mut first = true;
        loop {
            let r = tokio::select! {
                r = async {
                    b.pace().await;
                    b.query::<Vec<HealthCheck>>(&sh.client, &segs, ns.as_deref(), true).await
                } => r,
                _ = mode.wait_for(|m| *m != Mode::Feed) => break,
            };
            let ev = match r {
                Ok(Some(checks)) => {
                    let ev = Event::Feed {
                        ns: ns.clone(),
                        state,
                        checks,
                        first,
                    };
                    first = false;
                    ev
                }
                Ok(None) => continue,
                Err(e) => Event::Failed {
                    what: What::Feed(ns.clone(), state),
                    error: e.to_string(),
                },
            };
            if sh.events.send(ev).await.is_err() {
                return;
            }
        }
    }
}

async fn census_task(sh: Arc<Shared>, ns: Option<String>, mut trigger: watch::Receiver<u64>) {
    let mut b = Blocking::new(sh.aggregate_timing.clone());
    let segs = ["v1", "health", "state", "any"];
    loop {
        if trigger.changed().await.is_err() {
            return;
        }
        trigger.borrow_and_update();
        b.pace().await;
        let r = {
            let _permit = sh.fetch_permits.acquire().await;
            b.query_stream(
                &sh.client,
                &segs,
                ns.as_deref(),
                false,
                census::Census::new(),
            )
            .await
        };
        let ev = match r {
            Ok(by_service) => {
                b.reset();
                Event::Census {
                    ns: ns.clone(),
                    by_service: by_service.unwrap_or_default(),
                }
            }
            Err(e) => Event::CensusFailed {
                ns: ns.clone(),
                error: e.to_string(),
            },
        };
        if sh.events.send(ev).await.is_err() {
            return;
        }
    }
}

async fn sweeper(mut rx: watch::Receiver<Option<Arc<SweepRequest>>>, rate: u32) {
    let gap = Duration::from_secs(1) / rate.max(1);
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let Some(req) = rx.borrow_and_update().clone() else {
            continue;
        };
        let mut next = Instant::now();
        for k in &req.kicks {
            if req.paced {
                tokio::time::sleep_until(next).await;
                next += gap;
            }
            k.kick();
        }
    }
}

/// How a long poll of a service watch ended.
enum LongPoll {
    Answer(Result<Option<Vec<ServiceEntry>>, ClientError>),
    /// The mode changed (`false`: the provider is gone).
    Mode(bool),
    /// The Connect identity changed (`false`: the provider is gone).
    Identity(bool),
}

/// A change of the Connect identity, for a Connect watch; never otherwise (without allocating:
/// the boxed future is zero-sized).
fn identity_changed(
    rx: &mut watch::Receiver<Option<Arc<ConnectIdentity>>>,
    connect: bool,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), watch::error::RecvError>> + Send + '_>> {
    if connect {
        Box::pin(rx.changed())
    } else {
        Box::pin(std::future::pending())
    }
}

async fn service_task(w: Arc<ServiceWatch>) {
    let (sh, key, generation, connect) = (&w.sh, &w.key, w.generation, w.connect);
    let _counted = TaskCount::new(&sh.watch_tasks);
    let endpoint = if connect { "connect" } else { "service" };
    let segs = ["v1", "health", endpoint, key.name.as_str()];
    let ns = key.ns.as_deref();
    // The index, rate limit and back-off of the watch's previous task, if any.
    let kept = w.state().blocking.take();
    let mut b = kept.unwrap_or_else(|| Blocking::new(sh.timing.clone()));
    let mut mode = sh.mode.clone();
    let mut identity = sh.connect.clone();
    // Kept only for Connect services (re-converted when the identity changes).
    let mut entries: Option<Vec<ServiceEntry>> = None;
    // A task started by a kick reads at once; one that read and has nothing left ends.
    let mut fetched = false;
    let mut failing = false;
    loop {
        let direct = *mode.borrow_and_update() == Mode::Direct;
        let long_poll = direct && fetched && b.index() > 0;
        if fetched && !direct && !failing {
            if !connect {
                // Feed mode: end, unless kicked meanwhile (then read again).
                match w.finish(b) {
                    Some(again) => b = again,
                    None => return,
                }
            } else {
                // A Connect watch also waits for the identity (a boxed future).
                tokio::select! {
                    _ = w.notify.notified() => w.kick_seen(),
                    r = identity_changed(&mut identity, connect) => {
                        if r.is_err() { return; }
                        if !Box::pin(send_fragment(sh, key, generation, connect, entries.as_deref().unwrap_or(&[]), &identity)).await {
                            return;
                        }
                        continue;
                    }
                }
                if *mode.borrow() == Mode::Direct {
                    continue;
                }
            }
        }
        // The request futures are boxed: a long-polling task (Direct mode) holds its small state.
        let r = if long_poll {
            let waited = Box::pin(async {
                tokio::select! {
                    r = async {
                        b.pace().await;
                        let _permit = sh.long_permits.acquire().await;
                        b.query::<Vec<ServiceEntry>>(&sh.client, &segs, ns, true).await
                    } => LongPoll::Answer(r),
                    r = mode.changed() => LongPoll::Mode(r.is_ok()),
                    r = identity.changed(), if connect => LongPoll::Identity(r.is_ok()),
                }
            })
            .await;
            match waited {
                LongPoll::Answer(r) => r,
                LongPoll::Mode(open) => {
                    if !open {
                        return;
                    }
                    continue;
                }
                LongPoll::Identity(open) => {
                    if !open
                        || !Box::pin(send_fragment(
                            sh,
                            key,
                            generation,
                            connect,
                            entries.as_deref().unwrap_or(&[]),
                            &identity,
                        ))
                        .await
                    {
                        return;
                    }
                    continue;
                }
            }
        } else {
            Box::pin(async {
                b.pace().await;
                let _permit = sh.fetch_permits.acquire().await;
                b.query::<Vec<ServiceEntry>>(&sh.client, &segs, ns, false)
                    .await
            })
            .await
        };
        match r {
            Ok(Some(new)) => {
                fetched = true;
                failing = false;
                if !Box::pin(send_fragment(sh, key, generation, connect, &new, &identity)).await {
                    return;
                }
                if connect {
                    entries = Some(new);
                }
            }
            Ok(None) => {
                fetched = true;
                if failing {
                    failing = false;
                    let _ = Box::pin(sh.events.send(Event::Recovered {
                        what: What::Service(key.clone()),
                    }))
                    .await;
                }
            }
            Err(e) => {
                failing = true;
                if Box::pin(sh.events.send(Event::Failed {
                    what: What::Service(key.clone()),
                    error: e.to_string(),
                }))
                .await
                .is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn send_fragment(
    sh: &Shared,
    key: &Key,
    generation: u64,
    connect: bool,
    entries: &[ServiceEntry],
    identity: &watch::Receiver<Option<Arc<ConnectIdentity>>>,
) -> bool {
    let mut nodes: Vec<String> = entries.iter().map(|e| e.node.node.clone()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let checked = census::instances_digest(
        entries
            .iter()
            .filter(|e| e.checks.iter().any(|c| !c.service_id.is_empty()))
            .map(|e| (e.node.node.as_str(), e.service.id.as_str())),
    );
    let id = if connect {
        identity.borrow().clone()
    } else {
        None
    };
    let fragment = if connect && id.is_none() {
        None
    } else {
        let ctx = id.as_deref().map(|id| ConnectContext {
            trust_domain: &id.trust_domain,
            datacenter: sh.datacenter.as_deref().or(id.datacenter()),
        });
        Some(convert_service(
            ServiceInput {
                name: &key.name,
                namespace: if sh.namespaced {
                    key.ns.as_deref()
                } else {
                    None
                },
                entries,
                connect: ctx,
            },
            &sh.convert,
            &*sh.decoder,
        ))
    };
    sh.events
        .send(Event::Fragment {
            key: key.clone(),
            generation,
            fragment,
            nodes,
            checked,
        })
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use tagway_config::ConsulEndpoint;

    use super::*;
    use crate::test_consul::{FakeConsul, Instance};

    const R: &str = "traefik.tcp.routers.web.rule=HostSNI(`*`)";

    fn options() -> ProviderOptions {
        ProviderOptions {
            timing: WatchTiming {
                wait: Duration::from_secs(2),
                retry_min: Duration::from_millis(50),
                retry_max: Duration::from_millis(400),
                burst: 5,
                interval: Duration::from_millis(20),
                coalesce: Duration::from_millis(20),
            },
            ..ProviderOptions::default()
        }
    }

    fn cfg(consul: &FakeConsul) -> ConsulCatalog {
        ConsulCatalog {
            endpoint: ConsulEndpoint {
                address: Some(consul.addr()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn start(
        cfg: &ConsulCatalog,
        opts: ProviderOptions,
    ) -> (Running, tokio::sync::oneshot::Sender<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = ConsulProvider::with_env(cfg, &|_| None)
            .unwrap()
            .with_options(opts)
            .start(async move {
                let _ = rx.await;
            })
            .unwrap();
        (running, tx)
    }

    async fn until(
        rx: &mut watch::Receiver<Arc<Dynamic>>,
        what: &str,
        f: impl FnMut(&Arc<Dynamic>) -> bool,
    ) -> Arc<Dynamic> {
        let r = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
            .await
            .map(|r| r.map(|d| d.clone()));
        match r {
            Ok(Ok(d)) => d,
            _ => panic!("timed out waiting for: {what}; last: {:?}", rx.borrow().tcp),
        }
    }

    fn servers(d: &Dynamic, svc: &str) -> Vec<String> {
        let mut v: Vec<String> = d
            .tcp
            .services
            .get(svc)
            .and_then(|s| s.load_balancer.as_ref())
            .map(|lb| lb.servers.iter().map(|s| s.address.clone()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn a_catalog_delta_lists_the_new_the_gone_and_the_retagged() {
        let conv = ConvertSettings {
            prefix: "traefik".into(),
            exposed_by_default: true,
            constraints: Constraints::parse("").unwrap(),
            strict_checks: BTreeSet::new(),
            connect_aware: true,
            connect_by_default: false,
        };
        let relevant = |tags: &[&str]| CatalogEntry::Relevant {
            connect: tags.contains(&"traefik.consulcatalog.connect=true"),
            tags: digest(&tags.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>()),
        };
        let names = |d: &CatalogDelta| d.entries.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let mut last = None;
        let first = br#"{"a":[],"b":["traefik.tcp.routers.b.rule=x"],"c":["traefik.tcp.routers.c.rule=x"],"e":["z"]}"#;
        let d = catalog_delta(first, &conv, &mut last).unwrap();
        assert!(d.full);
        assert_eq!(names(&d), ["a", "b", "c", "e"], "every service at first");
        assert_eq!(d.entries[0].1, CatalogEntry::Ignored);
        assert_eq!(d.entries[1].1, relevant(&["traefik.tcp.routers.b.rule=x"]));
        // b retagged (escapes decoded), c gone, d new, a and e unchanged.
        let next = br#"{"a":[],"b":["traefik.tcp.routers.b.rule=x","traefik.consulcatalog.connect=true","q\"uoted"],"d":[],"e":["z"]}"#;
        let d = catalog_delta(next, &conv, &mut last).unwrap();
        assert!(!d.full);
        assert_eq!(
            d.entries,
            [
                (
                    "b".to_owned(),
                    relevant(&[
                        "traefik.tcp.routers.b.rule=x",
                        "traefik.consulcatalog.connect=true",
                        "q\"uoted"
                    ])
                ),
                ("c".to_owned(), CatalogEntry::Gone),
                ("d".to_owned(), CatalogEntry::Ignored),
            ]
        );
        assert!(
            catalog_delta(next, &conv, &mut last)
                .unwrap()
                .entries
                .is_empty()
        );
        // Names after the last listed one are gone too.
        let d = catalog_delta(br#"{"a":[]}"#, &conv, &mut last).unwrap();
        assert_eq!(names(&d), ["b", "d", "e"]);
        assert!(d.entries.iter().all(|(_, e)| *e == CatalogEntry::Gone));
        assert!(catalog_delta(b"{\"a\":", &conv, &mut last).is_err());
        // After a broken answer the next one lists every service again.
        let d = catalog_delta(br#"{"a":[]}"#, &conv, &mut last).unwrap();
        assert!(d.full);
        assert_eq!(names(&d), ["a"]);
        // Unsorted answers and repeated names are read as a map is.
        let d = catalog_delta(br#"{"z":["1"],"a":[],"m":[],"z":["2"]}"#, &conv, &mut last).unwrap();
        assert_eq!(names(&d), ["m", "z"]);
    }

    #[test]
    fn census_digests_match_the_digest_of_a_fetched_service() {
        let body = br#"[
            {"Node":"n1","CheckID":"serfHealth","ServiceID":"","ServiceName":""},
            {"Node":"n2","CheckID":"c2","ServiceID":"web-2","ServiceName":"web","Output":"ok"},
            {"Node":"n1","CheckID":"c1","ServiceID":"web-1","ServiceName":"web"},
            {"Node":"n1","CheckID":"c1b","ServiceID":"web-1","ServiceName":"web"},
            {"Node":"n\u0031","CheckID":"d","ServiceID":"db\"1","ServiceName":"db"}
        ]"#;
        let mut c = census::Census::new();
        for piece in body.chunks(10) {
            c.feed(piece).unwrap();
        }
        let d = c.finish().unwrap();
        assert_eq!(d.len(), 2, "{d:?}");
        // As `service_task` computes it from the instances of a fetched service.
        assert_eq!(
            d["web"],
            census::instances_digest([("n1", "web-1"), ("n2", "web-2")])
        );
        assert_eq!(
            d["db"],
            census::instances_digest([("n1", "db\"1")]),
            "escaped strings are decoded"
        );
        let mut c = census::Census::new();
        c.feed(b"null").unwrap();
        assert!(c.finish().unwrap().is_empty());
    }

    #[tokio::test]
    async fn direct_mode_follows_registration_health_maintenance_and_deregistration() {
        let consul = FakeConsul::start().await;
        consul.register("web", Instance::new("w1", 8001, &[R]));
        consul.register("web", Instance::new("w2", 8002, &[R]));
        consul.register("other", Instance::new("o1", 9000, &["no-tcp-tags"]));
        let (running, _stop) = start(&cfg(&consul), options());
        let mut rx = running.config();
        let d = until(&mut rx, "two servers", |d| servers(d, "web").len() == 2).await;
        assert_eq!(d.tcp.routers["web"].service, "web@consulcatalog");
        assert!(
            !d.tcp.services.contains_key("other"),
            "services without TCP tags are not watched"
        );
        let status = running.status().borrow().clone();
        assert!(status.synced && status.reachable, "{status:?}");
        assert_eq!(status.mode, Mode::Direct);
        assert_eq!(status.services, 1);
        assert_eq!(consul.requests("/v1/health/service/other"), 0);

        consul.set_status("web", "w1", "critical");
        until(&mut rx, "w1 removed", |d| {
            servers(d, "web") == ["127.0.0.1:8002"]
        })
        .await;
        consul.set_status("web", "w1", "warning");
        until(&mut rx, "w1 back while warning", |d| {
            servers(d, "web").len() == 2
        })
        .await;
        consul.set_maintenance("web", "w2", true);
        until(&mut rx, "w2 in maintenance", |d| {
            servers(d, "web") == ["127.0.0.1:8001"]
        })
        .await;
        consul.set_maintenance("web", "w2", false);
        until(&mut rx, "w2 out of maintenance", |d| {
            servers(d, "web").len() == 2
        })
        .await;
        consul.deregister("web", "w1");
        until(&mut rx, "w1 deregistered", |d| {
            servers(d, "web") == ["127.0.0.1:8002"]
        })
        .await;
        consul.deregister("web", "w2");
        until(&mut rx, "service gone", |d| d.tcp.is_empty()).await;
    }

    #[tokio::test]
    async fn consul_down_keeps_the_last_configuration_and_recovers() {
        let consul = FakeConsul::start().await;
        consul.register("web", Instance::new("w1", 8001, &[R]));
        let (running, _stop) = start(&cfg(&consul), options());
        let mut rx = running.config();
        until(&mut rx, "first sync", |d| servers(d, "web").len() == 1).await;
        let mut status = running.status();
        consul.set_fail(Some(500));
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| !s.reachable))
            .await
            .expect("catalog failure noticed")
            .unwrap();
        assert!(
            status
                .borrow()
                .last_error
                .as_deref()
                .unwrap()
                .contains("500")
        );
        assert_eq!(servers(&rx.borrow(), "web"), ["127.0.0.1:8001"], "kept");
        consul.register("web", Instance::new("w2", 8002, &[R]));
        consul.set_fail(None);
        until(&mut rx, "recovered with the new instance", |d| {
            servers(d, "web").len() == 2
        })
        .await;
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.reachable))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.borrow().last_error, None);
    }

    #[tokio::test]
    async fn consul_down_at_start_then_up() {
        let consul = FakeConsul::start().await;
        consul.set_fail(Some(503));
        consul.register("web", Instance::new("w1", 8001, &[R]));
        let (running, _stop) = start(&cfg(&consul), options());
        let mut rx = running.config();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.borrow().tcp.is_empty());
        assert!(!running.status().borrow().synced);
        consul.set_fail(None);
        until(&mut rx, "routes appear", |d| servers(d, "web").len() == 1).await;
        assert!(running.status().borrow().synced);
    }

    #[tokio::test]
    async fn index_going_backwards_is_followed() {
        let consul = FakeConsul::start().await;
        consul.register("web", Instance::new("w1", 8001, &[R]));
        let (running, _stop) = start(&cfg(&consul), options());
        let mut rx = running.config();
        until(&mut rx, "first sync", |d| servers(d, "web").len() == 1).await;
        // A Consul snapshot restore: every index drops.
        consul.set_index_offset(-5);
        consul.register("web", Instance::new("w2", 8002, &[R]));
        until(&mut rx, "change after the reset", |d| {
            servers(d, "web").len() == 2
        })
        .await;
        consul.set_status("web", "w2", "critical");
        until(&mut rx, "and the next one", |d| {
            servers(d, "web").len() == 1
        })
        .await;
    }

    #[tokio::test]
    async fn broken_tags_on_one_service_leave_the_others_working() {
        let consul = FakeConsul::start().await;
        consul.register(
            "good",
            Instance::new(
                "g1",
                8001,
                &["traefik.tcp.routers.good.rule=HostSNI(`good`)"],
            ),
        );
        consul.register(
            "bad",
            Instance::new(
                "b1",
                8002,
                &[
                    "traefik.tcp.routers.bad.rule=HostSNI(`bad`)",
                    "traefik.tcp.routers.bad.priority=high",
                ],
            ),
        );
        consul.register(
            "split",
            Instance::new("s1", 8003, &["traefik.tcp.routers.s.rule=HostSNI(`a`)"]),
        );
        consul.register(
            "split",
            Instance::new("s2", 8004, &["traefik.tcp.routers.s.rule=HostSNI(`b`)"]),
        );
        let (running, _stop) = start(&cfg(&consul), options());
        let mut rx = running.config();
        let d = until(&mut rx, "synced", |d| {
            d.tcp.routers.contains_key("good") && d.tcp.routers.contains_key("bad")
        })
        .await;
        assert!(
            !d.tcp.routers.contains_key("s"),
            "disagreeing instances: router skipped"
        );
        assert_eq!(servers(&d, "split").len(), 2, "their service is kept");
        let mut errs = running.errors();
        let errs = tokio::time::timeout(Duration::from_secs(5), errs.wait_for(|e| e.len() == 2))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(errs[0].service, "bad");
        assert_eq!(
            errs[0].tag.as_deref(),
            Some("traefik.tcp.routers.bad.priority=high")
        );
        assert_eq!(errs[1].resource.as_deref(), Some("tcp.routers.s"));
    }

    /// Waits (at most 10 s) until no service watch runs a task.
    async fn no_watch_task_left(running: &Running) {
        for _ in 0..1000 {
            if running.watch_tasks() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} watch tasks still running", running.watch_tasks());
    }

    #[tokio::test]
    async fn feed_mode_bounds_connections_and_still_follows_changes() {
        let consul = FakeConsul::start().await;
        for i in 0..40 {
            consul.register(
                &format!("svc{i}"),
                Instance::new(
                    &format!("i{i}"),
                    10000 + i,
                    &[&format!("traefik.tcp.routers.r{i}.rule=HostSNI(`s{i}`)")],
                ),
            );
        }
        let opts = ProviderOptions {
            max_long_polls: 8,
            fetch_concurrency: 4,
            // A sweep would take 20 s: what is seen faster was attributed.
            sweep_rate: 2,
            ..options()
        };
        let (running, _stop) = start(&cfg(&consul), opts);
        let mut rx = running.config();
        until(&mut rx, "all 40", |d| d.tcp.routers.len() == 40).await;
        let status = running.status().borrow().clone();
        assert_eq!(status.mode, Mode::Feed, "{status:?}");
        // Idle watches hold no task: every change below starts one.
        no_watch_task_left(&running).await;
        // catalog + 2 feeds block; at most 4 fetches besides.
        assert!(
            consul.stub.max_in_flight() <= 3 + 4,
            "in flight: {}",
            consul.stub.max_in_flight()
        );
        assert!(
            consul.stub.connections() <= 3 + 4 + 2,
            "connections: {}",
            consul.stub.connections()
        );

        // Health flip: attributed by the critical feed.
        consul.set_status("svc7", "i7", "critical");
        until(&mut rx, "svc7 down", |d| servers(d, "svc7").is_empty()).await;
        consul.set_status("svc7", "i7", "passing");
        until(&mut rx, "svc7 up", |d| servers(d, "svc7").len() == 1).await;
        // Tag change: attributed by the catalog answer.
        consul.register(
            "svc3",
            Instance::new(
                "i3",
                10003,
                &["traefik.tcp.routers.r3.rule=HostSNI(`changed`)"],
            ),
        );
        until(&mut rx, "svc3 rule", |d| {
            d.tcp
                .routers
                .get("r3")
                .is_some_and(|r| r.rule.contains("changed"))
        })
        .await;
        // New instance with the same tags: found by the census of checks.
        consul.register(
            "svc5",
            Instance::new("i5b", 20005, &["traefik.tcp.routers.r5.rule=HostSNI(`s5`)"]),
        );
        until(&mut rx, "svc5 second instance", |d| {
            servers(d, "svc5").len() == 2
        })
        .await;
        // Deregistration of a passing instance: also the census.
        consul.deregister("svc5", "i5");
        until(&mut rx, "svc5 one instance", |d| {
            servers(d, "svc5") == ["127.0.0.1:20005"]
        })
        .await;
        no_watch_task_left(&running).await;
        assert!(
            consul.stub.max_in_flight() <= 3 + 4,
            "in flight: {}",
            consul.stub.max_in_flight()
        );
    }

    #[tokio::test]
    async fn feed_mode_sweeps_for_changes_no_check_reveals() {
        let consul = FakeConsul::start().await;
        for i in 0..20 {
            consul.register(
                &format!("svc{i}"),
                Instance::new(
                    &format!("i{i}"),
                    10000 + i,
                    &[&format!("traefik.tcp.routers.r{i}.rule=HostSNI(`s{i}`)")],
                ),
            );
        }
        let opts = ProviderOptions {
            max_long_polls: 4,
            sweep_rate: 200,
            ..options()
        };
        let (running, _stop) = start(&cfg(&consul), opts);
        let mut rx = running.config();
        until(&mut rx, "all 20", |d| d.tcp.routers.len() == 20).await;
        assert_eq!(running.status().borrow().mode, Mode::Feed);
        let mut inst = Instance::new("i9b", 20009, &["traefik.tcp.routers.r9.rule=HostSNI(`s9`)"]);
        inst.no_check = true;
        consul.register("svc9", inst);
        until(&mut rx, "check-less instance", |d| {
            servers(d, "svc9").len() == 2
        })
        .await;
        // A port change of an existing instance changes no check either.
        consul.register(
            "svc4",
            Instance::new("i4", 30004, &["traefik.tcp.routers.r4.rule=HostSNI(`s4`)"]),
        );
        until(&mut rx, "port change", |d| {
            servers(d, "svc4") == ["127.0.0.1:30004"]
        })
        .await;
    }

    #[tokio::test]
    async fn mode_switches_back_to_direct_when_services_go_away() {
        let consul = FakeConsul::start().await;
        for i in 0..6 {
            let tag = format!("traefik.tcp.routers.r{i}.rule=HostSNI(`s{i}`)");
            consul.register(&format!("svc{i}"), Instance::new("i", 10000 + i, &[&tag]));
        }
        let opts = ProviderOptions {
            max_long_polls: 4,
            ..options()
        };
        let (running, _stop) = start(&cfg(&consul), opts);
        let mut status = running.status();
        tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| s.mode == Mode::Feed && s.synced),
        )
        .await
        .unwrap()
        .unwrap();
        for i in 0..3 {
            consul.deregister(&format!("svc{i}"), "i");
        }
        tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| s.mode == Mode::Direct),
        )
        .await
        .unwrap()
        .unwrap();
        let mut rx = running.config();
        consul.set_status("svc4", "i", "critical");
        until(&mut rx, "direct again", |d| {
            servers(d, "svc4").is_empty() && servers(d, "svc5").len() == 1
        })
        .await;
    }

    #[tokio::test]
    async fn poll_mode_rereads_every_refresh_interval() {
        let consul = FakeConsul::start().await;
        consul.register("web", Instance::new("w1", 8001, &[R]));
        let mut c = cfg(&consul);
        c.watch = false;
        c.refresh_interval = tagway_config::Duration::from_millis(100);
        let (running, _stop) = start(&c, options());
        let mut rx = running.config();
        until(&mut rx, "first", |d| servers(d, "web").len() == 1).await;
        assert_eq!(running.status().borrow().mode, Mode::Poll);
        consul.set_status("web", "w1", "critical");
        until(&mut rx, "polled", |d| servers(d, "web").is_empty()).await;
        assert_eq!(
            consul
                .stub
                .requests()
                .iter()
                .filter(|r| r.index() > 0)
                .count(),
            0,
            "no blocking query in poll mode"
        );
    }

    #[tokio::test]
    async fn an_isolated_change_is_published_at_once_and_bursts_together() {
        let consul = FakeConsul::start().await;
        consul.register("web", Instance::new("w0", 8000, &[R]));
        let mut opts = options();
        opts.timing.coalesce = Duration::from_millis(400);
        let (running, _stop) = start(&cfg(&consul), opts);
        let mut rx = running.config();
        until(&mut rx, "first", |d| servers(d, "web").len() == 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        rx.borrow_and_update();
        // Isolated: not delayed by the window.
        let t0 = std::time::Instant::now();
        consul.register("web", Instance::new("w1", 8001, &[R]));
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(servers(&rx.borrow_and_update(), "web").len(), 2);
        // A burst right after: one more publication carries it all, at the end of the window.
        for i in 2..7 {
            consul.register("web", Instance::new(&format!("w{i}"), 8000 + i, &[R]));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t0.elapsed()
        );
        let n = servers(&rx.borrow_and_update(), "web").len();
        assert!(n >= 5, "one publication carried (most of) the burst: {n}");
    }

    /// A consumer that sees `synced` and reads the configuration right away (as the gateway's
    /// `/ready` does) gets the synced configuration, never the empty placeholder. The observer
    /// spins on another thread so it looks in the gap between the two channels, if there is one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn synced_status_is_never_ahead_of_the_configuration() {
        const ROUNDS: usize = 20;
        let consul = FakeConsul::start().await;
        consul.register("web", Instance::new("w1", 8001, &[R]));
        consul.register(
            "db",
            Instance::new("d1", 8002, &["traefik.tcp.routers.db.rule=HostSNI(`*`)"]),
        );
        for round in 0..ROUNDS {
            let (running, stop) = start(&cfg(&consul), options());
            let status = running.status();
            let config = running.config();
            let seen = tokio::task::spawn_blocking(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    if status.borrow().synced {
                        return Some(config.borrow().clone());
                    }
                    if std::time::Instant::now() > deadline {
                        return None;
                    }
                    std::hint::spin_loop();
                }
            })
            .await
            .unwrap();
            let seen = seen.unwrap_or_else(|| panic!("round {round}: never synced"));
            assert_eq!(
                servers(&seen, "web"),
                ["127.0.0.1:8001"],
                "round {round}: status said synced while the configuration was {:?}",
                seen.tcp
            );
            assert_eq!(servers(&seen, "db"), ["127.0.0.1:8002"], "round {round}");
            stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(5), running.stopped())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn shutdown_stops_every_watch() {
        let consul = FakeConsul::start().await;
        consul.register("web", Instance::new("w1", 8001, &[R]));
        let (running, stop) = start(&cfg(&consul), options());
        let mut rx = running.config();
        until(&mut rx, "first", |d| servers(d, "web").len() == 1).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), running.stopped())
            .await
            .unwrap();
        let before = consul.stub.requests().len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            consul.stub.requests().len(),
            before,
            "no request after shutdown"
        );
    }

    #[tokio::test]
    async fn connect_services_wait_for_the_identity_and_get_a_spiffe_transport() {
        use crate::test_pki::Ca;
        let consul = FakeConsul::start().await;
        consul.register(
            "db",
            Instance::new(
                "db1",
                21000,
                &[
                    "traefik.tcp.routers.db.rule=HostSNI(`*`)",
                    "traefik.consulcatalog.connect=true",
                ],
            ),
        );
        consul.register(
            "plain",
            Instance::new("p1", 8001, &["traefik.tcp.routers.p.rule=HostSNI(`p`)"]),
        );
        let mut c = cfg(&consul);
        c.connect_aware = true;
        let source = IdentitySource::manual();
        let mut rotations = source.subscribe();
        let (tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = ConsulProvider::with_env(&c, &|_| None)
            .unwrap()
            .with_options(options())
            .with_identity_source(source.clone())
            .start(async move {
                let _ = stop_rx.await;
            })
            .unwrap();
        let _stop = tx;
        let mut rx = running.config();
        until(&mut rx, "plain service", |d| servers(d, "plain").len() == 1).await;
        assert!(
            !rx.borrow().tcp.services.contains_key("db"),
            "held until the identity"
        );
        let st = running.status().borrow().clone();
        assert!(
            st.synced && !st.connect_ready && st.connect_pending == 1,
            "{st:?}"
        );
        assert!(consul.requests("/v1/health/connect/db") >= 1);
        assert_eq!(consul.requests("/v1/health/service/db"), 0);

        let ca = Ca::new("connect");
        consul.set_roots(
            serde_json::json!({"TrustDomain": "abcd.consul", "Roots": [{"ID": "1", "RootCert": ca.pem(), "Active": true}]})
                .to_string(),
        );
        let leaf = ca.leaf(&[], &["spiffe://abcd.consul/ns/default/dc/dc1/svc/tagway"]);
        consul.set_leaf(
            serde_json::json!({"CertPEM": leaf.cert_pem, "PrivateKeyPEM": leaf.key_pem,
                "ServiceURI": "spiffe://abcd.consul/ns/default/dc/dc1/svc/tagway", "SerialNumber": "1"})
            .to_string(),
        );
        let d = until(&mut rx, "connect service", |d| servers(d, "db").len() == 1).await;
        let lb = d.tcp.services["db"].load_balancer.as_ref().unwrap();
        assert_eq!(
            lb.servers_transport.as_deref(),
            Some("connect-db@consulcatalog")
        );
        assert!(lb.servers[0].tls);
        assert_eq!(
            d.tcp.servers_transports["connect-db"]
                .spiffe
                .as_ref()
                .unwrap()
                .ids,
            ["spiffe://abcd.consul/ns/default/dc/dc1/svc/db"]
        );
        let id = running.connect_identity().borrow().clone().unwrap();
        assert_eq!(id.trust_domain, "abcd.consul");
        tokio::time::timeout(Duration::from_secs(5), rotations.wait_for(|n| *n > 0))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            source.current().unwrap().spiffe_id(),
            Some("spiffe://abcd.consul/ns/default/dc/dc1/svc/tagway"),
            "pushed to the transport's identity source"
        );
        let mut status = running.status();
        tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| s.connect_ready && s.connect_pending == 0),
        )
        .await
        .unwrap()
        .unwrap();
    }

    #[test]
    fn configuration_errors_name_the_key() {
        let c = ConsulCatalog {
            strict_checks: vec!["passing".into(), "ok".into()],
            ..Default::default()
        };
        let e = ConsulProvider::with_env(&c, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("strictChecks") && e.contains("ok"), "{e}");
        let c = ConsulCatalog {
            constraints: Some("Tag(`x`) &&".into()),
            ..Default::default()
        };
        let e = ConsulProvider::with_env(&c, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("constraints"), "{e}");
        let c = ConsulCatalog {
            prefix: " ".into(),
            ..Default::default()
        };
        let e = ConsulProvider::with_env(&c, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefix"), "{e}");
    }

    #[test]
    fn relevance_and_connect_follow_traefik() {
        let conv =
            |exposed: bool, constraints: &str, aware: bool, by_default: bool| ConvertSettings {
                prefix: "traefik".into(),
                exposed_by_default: exposed,
                constraints: Constraints::parse(constraints).unwrap(),
                strict_checks: BTreeSet::new(),
                connect_aware: aware,
                connect_by_default: by_default,
            };
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = conv(true, "", false, false);
        assert!(relevant(&c, &t(&[R])));
        assert!(relevant(&c, &t(&["Traefik.TCP.routers.x.rule=y"])));
        assert!(!relevant(&c, &t(&["traefik.http.routers.x.rule=y"])));
        assert!(!relevant(&c, &t(&[R, "traefik.enable=false"])));
        let c = conv(false, "", false, false);
        assert!(!relevant(&c, &t(&[R])));
        assert!(relevant(&c, &t(&[R, "traefik.enable=true"])));
        let c = conv(true, "Tag(`env=prod`)", false, false);
        assert!(!relevant(&c, &t(&[R])));
        assert!(relevant(&c, &t(&[R, "env=prod"])));
        assert!(!service_connect(&conv(true, "", false, true), &t(&[])));
        assert!(service_connect(&conv(true, "", true, true), &t(&[])));
        assert!(!service_connect(
            &conv(true, "", true, true),
            &t(&["traefik.consulcatalog.connect=false"])
        ));
        assert!(service_connect(
            &conv(true, "", true, false),
            &t(&["traefik.consulcatalog.connect=true"])
        ));
    }
}
