//! Observability: Prometheus metrics, configuration status and readiness, the access log, and
//! logging set-up.
//!
//! [`Observability`] is the shared state the admin API ([`crate::admin`]) reads. Three parties
//! feed it:
//! - the configuration pipeline (`tagway run`): [`Observability::expect_provider`] once per
//!   enabled provider, then [`Observability::provider_updated`] /
//!   [`Observability::provider_failed`] for every provider reload, [`Observability::validated`]
//!   with the errors of each merge, and [`Observability::publish`] right before sending a merged
//!   configuration to the data plane;
//! - the data plane ([`crate::server::Gateway::with_observability`]): it calls
//!   [`Observability::applied`] after swapping in each configuration, and hands every connection
//!   the access-log sender;
//! - the Consul provider, through the `metrics` facade (see [`consul`]).
//!
//! ```no_run
//! # async fn example(st: tagway_config::StaticConfig,
//! #     rx: tokio::sync::watch::Receiver<std::sync::Arc<tagway_config::Dynamic>>)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tagway::observability::Observability;
//!
//! let obs = Observability::new(&st)?;
//! obs.metrics().install_global(); // the Consul provider's metrics::counter! calls land here
//! obs.expect_provider("file");
//! let mut gw = tagway::server::Gateway::new(st.clone()).with_observability(obs.clone());
//! gw.bind()?;
//! if let Some(admin) = &st.admin {
//!     let listener = tagway::admin::bind(&admin.address).await?;
//!     let state = tagway::admin::AdminState::new(obs.clone(), gw.handle(), Arc::new(st.clone()));
//!     tokio::spawn(tagway::admin::serve(listener, state, std::future::pending()));
//! }
//! gw.run(rx, tagway::server::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

pub mod accesslog;
pub mod certs;
pub mod consul;
pub mod counters;
pub mod diff;
pub mod logging;
pub mod names;
pub mod prometheus;
pub mod tally;
pub mod time;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Instant, SystemTime};

use tagway_config::{Dynamic, ResourceError, ServersTransport, StaticConfig};

pub use accesslog::{AccessLog, AccessLogError, AccessLogSender};
pub use certs::CertInfo;
pub use prometheus::Metrics;

use crate::runtime::CompileError;
use crate::server::GatewayHandle;

/// Why observability cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObservabilityError {
    /// The access log cannot be opened.
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
}

/// What is known about one provider.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderStatus {
    /// The provider name (`file`, `consulcatalog`).
    pub name: String,
    /// True when the provider is enabled in the static configuration (readiness waits for it).
    pub expected: bool,
    /// Configurations received.
    pub reloads: u64,
    /// Failed reloads.
    pub failures: u64,
    /// When the last configuration was received.
    pub last_success: Option<SystemTime>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Routers in its last configuration.
    pub routers: usize,
    /// Services in its last configuration.
    pub services: usize,
    /// Middlewares in its last configuration.
    pub middlewares: usize,
    /// Servers transports in its last configuration.
    pub servers_transports: usize,
}

/// One configuration error now in force.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorEntry {
    /// The provider concerned (empty when unknown).
    pub provider: String,
    /// `provider`, `router`, `service`, `middleware`, `serversTransport`, `tls certificate`, …
    pub kind: String,
    /// The resource (`name@provider`), or the provider name for a provider failure.
    pub name: String,
    /// The key concerned, relative to the resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Where it was written: `file:line:column`, or the Consul tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// What is wrong.
    pub message: String,
    /// `validation` (merge and checks), `runtime` (the data plane could not build it), or
    /// `provider` (the provider's last reload failed).
    pub stage: &'static str,
}

/// What a merge includes: whether every expected provider had delivered, and the provider
/// changes not yet published. Taken by [`Observability::mark`] before reading the providers.
#[derive(Debug)]
pub struct MergeMark {
    complete: bool,
    changes: Vec<(String, Instant)>,
}

#[derive(Debug)]
struct Published {
    cfg: Weak<Dynamic>,
    complete: bool,
    changes: Vec<(String, Instant)>,
}

/// Most configurations remembered between publish and apply.
const MAX_PUBLISHED: usize = 256;

#[derive(Debug, Default)]
struct State {
    expected: BTreeSet<String>,
    providers: BTreeMap<String, ProviderStatus>,
    published: VecDeque<Published>,
    pending_changes: BTreeMap<String, Instant>,
    validation_errors: Vec<ResourceError>,
    compile_errors: Vec<ErrorEntry>,
    applied: Option<Arc<Dynamic>>,
    applied_at: Option<SystemTime>,
    applied_count: u64,
    certificates: Vec<CertInfo>,
}

#[derive(Debug)]
struct Inner {
    metrics: Metrics,
    started: SystemTime,
    access_log: Option<AccessLog>,
    default_transport: ServersTransport,
    ready: AtomicBool,
    state: Mutex<State>,
}

/// Shared observability state (cheap to clone).
#[derive(Clone, Debug)]
pub struct Observability {
    inner: Arc<Inner>,
}

fn provider_of(name: &str) -> &str {
    name.rsplit_once('@').map(|(_, p)| p).unwrap_or("")
}

impl Observability {
    /// Observability for `st`: a fresh metrics recorder (not installed globally: see
    /// [`Metrics::install_global`]) and the access log when `accessLog` is set (its writer thread
    /// starts now).
    pub fn new(st: &StaticConfig) -> Result<Self, ObservabilityError> {
        let access_log = match &st.access_log {
            Some(cfg) => Some(AccessLog::start(cfg)?),
            None => None,
        };
        Ok(Self::with_access_log(st, access_log))
    }

    /// Like [`Observability::new`] with an access log already started (tests write to memory).
    pub fn with_access_log(st: &StaticConfig, access_log: Option<AccessLog>) -> Self {
        Observability {
            inner: Arc::new(Inner {
                metrics: Metrics::new(),
                started: SystemTime::now(),
                access_log,
                default_transport: st.tcp_servers_transport.clone(),
                ready: AtomicBool::new(false),
                state: Mutex::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The metrics recorder.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// When this process started observing.
    pub fn started(&self) -> SystemTime {
        self.inner.started
    }

    /// The sender connections give their access-log records to (None: access log off).
    pub fn access_log(&self) -> Option<AccessLogSender> {
        self.inner.access_log.as_ref().map(AccessLog::sender)
    }

    /// Waits (up to `timeout`) until the access log has written every line queued so far; true
    /// when it has, or when there is no access log. See [`AccessLog::flush`].
    pub fn flush_access_log(&self, timeout: std::time::Duration) -> bool {
        self.inner
            .access_log
            .as_ref()
            .is_none_or(|l| l.flush(timeout))
    }

    /// Access-log lines written so far (0 when off).
    pub fn access_log_lines(&self) -> u64 {
        self.inner
            .access_log
            .as_ref()
            .map_or(0, AccessLog::lines_written)
    }

    /// Declares an enabled provider: `/ready` answers 200 only once a configuration holding its
    /// first delivery is applied.
    pub fn expect_provider(&self, provider: &str) {
        let mut st = self.state();
        st.expected.insert(provider.to_owned());
        let p = st.providers.entry(provider.to_owned()).or_default();
        p.name = provider.to_owned();
        p.expected = true;
        drop(st);
        self.inner.ready.store(false, Ordering::Relaxed);
    }

    /// A provider delivered a configuration (`cfg` is its own, unmerged output).
    pub fn provider_updated(&self, provider: &str, cfg: &Dynamic) {
        let now = SystemTime::now();
        let m = &self.inner.metrics;
        let l = [("provider", provider)];
        m.counter(&names::CONFIG_RELOADS, &l).increment(1);
        m.gauge(&names::CONFIG_LAST_SUCCESS, &l)
            .set(time::unix_seconds(now));
        m.gauge(&names::CONFIG_ROUTERS, &l)
            .set(cfg.tcp.routers.len() as f64);
        m.gauge(&names::CONFIG_SERVICES, &l)
            .set(cfg.tcp.services.len() as f64);
        m.gauge(&names::CONFIG_MIDDLEWARES, &l)
            .set(cfg.tcp.middlewares.len() as f64);
        m.gauge(&names::CONFIG_TRANSPORTS, &l)
            .set(cfg.tcp.servers_transports.len() as f64);
        let mut st = self.state();
        let p = st.providers.entry(provider.to_owned()).or_default();
        p.name = provider.to_owned();
        p.reloads += 1;
        p.last_success = Some(now);
        p.last_error = None;
        p.routers = cfg.tcp.routers.len();
        p.services = cfg.tcp.services.len();
        p.middlewares = cfg.tcp.middlewares.len();
        p.servers_transports = cfg.tcp.servers_transports.len();
        st.pending_changes
            .entry(provider.to_owned())
            .or_insert_with(Instant::now);
    }

    /// A provider reload failed (the provider keeps its last good configuration).
    pub fn provider_failed(&self, provider: &str, error: &dyn std::fmt::Display) {
        self.inner
            .metrics
            .counter(&names::CONFIG_RELOAD_FAILURES, &[("provider", provider)])
            .increment(1);
        let mut st = self.state();
        let p = st.providers.entry(provider.to_owned()).or_default();
        p.name = provider.to_owned();
        p.failures += 1;
        p.last_error = Some(error.to_string());
        drop(st);
        self.update_error_gauges();
    }

    /// A provider load succeeded without changing its configuration: its last failure is no
    /// longer in force.
    pub fn provider_recovered(&self, provider: &str) {
        if let Some(p) = self.state().providers.get_mut(provider) {
            p.last_error = None;
        }
        self.update_error_gauges();
    }

    /// The errors of the latest merge and validation (they replace the previous ones).
    pub fn validated(&self, errors: &[ResourceError]) {
        self.state().validation_errors = errors.to_vec();
        self.update_error_gauges();
    }

    /// What the next merge includes, taken right before reading the providers' outputs (see
    /// [`Observability::publish_marked`]).
    pub fn mark(&self) -> MergeMark {
        let mut st = self.state();
        let complete = st
            .expected
            .iter()
            .all(|p| st.providers.get(p).is_some_and(|s| s.reloads > 0));
        let changes = std::mem::take(&mut st.pending_changes)
            .into_iter()
            .collect();
        MergeMark { complete, changes }
    }

    /// [`Observability::publish_marked`] with a mark taken now: right when the providers'
    /// outputs are read and merged in the same step.
    pub fn publish(&self, cfg: &Arc<Dynamic>) {
        self.publish_marked(cfg, self.mark());
    }

    /// Call right before sending `cfg` (merged and validated) to the data plane, with the mark
    /// taken before the providers' outputs were read: readiness and the change-to-applied latency
    /// follow it.
    ///
    /// Publishing the configuration already in use again (a provider update that changed nothing
    /// after merging) counts its changes as applied now, and marks readiness when it completes
    /// the set of expected providers.
    pub fn publish_marked(&self, cfg: &Arc<Dynamic>, mark: MergeMark) {
        let MergeMark { complete, changes } = mark;
        let mut st = self.state();
        if let Some(p) = st
            .published
            .iter_mut()
            .find(|p| std::ptr::eq(p.cfg.as_ptr(), Arc::as_ptr(cfg)))
        {
            p.complete |= complete;
            p.changes.extend(changes);
            return;
        }
        if st.applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, cfg)) {
            drop(st);
            for (provider, at) in changes {
                self.inner
                    .metrics
                    .histogram(&names::CONFIG_CHANGE_APPLIED, &[("provider", &provider)])
                    .record(at.elapsed().as_secs_f64());
            }
            if complete && !self.inner.ready.swap(true, Ordering::Relaxed) {
                tracing::info!("ready: the first configuration of every provider is applied");
            }
            return;
        }
        st.published.push_back(Published {
            cfg: Arc::downgrade(cfg),
            complete,
            changes,
        });
        while st.published.len() > MAX_PUBLISHED {
            // Never applied (superseded): its changes ride with the next one.
            if let Some(old) = st.published.pop_front()
                && let Some(next) = st.published.front_mut()
            {
                next.complete |= old.complete;
                next.changes.extend(old.changes);
            }
        }
    }

    /// The data plane swapped in `cfg` (`errors`: resources it could not build). Logs one summary
    /// line of what changed.
    pub fn applied(&self, cfg: &Arc<Dynamic>, errors: &[CompileError]) {
        let now = SystemTime::now();
        let certificates = certs::in_use(cfg, &self.inner.default_transport);
        let mut st = self.state();
        let pos = st
            .published
            .iter()
            .position(|p| std::ptr::eq(p.cfg.as_ptr(), Arc::as_ptr(cfg)));
        let mut ready = false;
        let mut changes = Vec::new();
        match pos {
            Some(i) => {
                for p in st.published.drain(..=i) {
                    ready |= p.complete;
                    changes.extend(p.changes);
                }
            }
            None => {
                // Not published through `publish` (library use): ready once every expected
                // provider has delivered.
                ready = st
                    .expected
                    .iter()
                    .all(|p| st.providers.get(p).is_some_and(|s| s.reloads > 0));
            }
        }
        let diff = diff::ConfigDiff::between(st.applied.as_deref(), cfg);
        st.applied = Some(cfg.clone());
        st.applied_at = Some(now);
        st.applied_count += 1;
        st.certificates = certificates;
        st.compile_errors = errors
            .iter()
            .map(|e| ErrorEntry {
                provider: provider_of(&e.name).to_owned(),
                kind: e.kind.to_owned(),
                name: e.name.clone(),
                key: None,
                origin: None,
                message: e.message.clone(),
                stage: "runtime",
            })
            .collect();
        let count = st.applied_count;
        drop(st);
        let m = &self.inner.metrics;
        for (provider, at) in changes {
            m.histogram(&names::CONFIG_CHANGE_APPLIED, &[("provider", &provider)])
                .record(at.elapsed().as_secs_f64());
        }
        m.counter(&names::CONFIG_APPLIED, &[]).increment(1);
        m.gauge(&names::CONFIG_LAST_APPLIED, &[])
            .set(time::unix_seconds(now));
        self.update_error_gauges();
        if ready && !self.inner.ready.swap(true, Ordering::Relaxed) {
            tracing::info!("ready: the first configuration of every provider is applied");
        }
        tracing::info!(
            generation = count,
            routers = cfg.tcp.routers.len(),
            services = cfg.tcp.services.len(),
            errors = errors.len(),
            "configuration in use: {diff}"
        );
    }

    fn update_error_gauges(&self) {
        let st = self.state();
        let mut per: BTreeMap<&str, u64> = st.providers.keys().map(|k| (k.as_str(), 0)).collect();
        for e in &st.validation_errors {
            *per.entry(e.provider.as_str()).or_default() += 1;
        }
        for e in &st.compile_errors {
            *per.entry(e.provider.as_str()).or_default() += 1;
        }
        for p in st.providers.values() {
            if p.last_error.is_some() {
                *per.entry(p.name.as_str()).or_default() += 1;
            }
        }
        for (p, n) in per {
            if p.is_empty() {
                continue;
            }
            self.inner
                .metrics
                .gauge(&names::CONFIG_ERRORS, &[("provider", p)])
                .set(n as f64);
        }
    }

    /// True once a configuration holding the first delivery of every expected provider is
    /// applied (with no expected provider: once any configuration is applied).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// Expected providers that have not delivered a configuration yet.
    pub fn waiting_for(&self) -> Vec<String> {
        let st = self.state();
        st.expected
            .iter()
            .filter(|p| st.providers.get(*p).is_none_or(|s| s.reloads == 0))
            .cloned()
            .collect()
    }

    /// Every provider seen or expected.
    pub fn providers(&self) -> Vec<ProviderStatus> {
        self.state().providers.values().cloned().collect()
    }

    /// The configuration the data plane uses now, and when it was swapped in.
    pub fn applied_config(&self) -> Option<(Arc<Dynamic>, SystemTime)> {
        let st = self.state();
        Some((st.applied.clone()?, st.applied_at?))
    }

    /// Configurations applied so far.
    pub fn applied_count(&self) -> u64 {
        self.state().applied_count
    }

    /// Certificates in use.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.state().certificates.clone()
    }

    /// Every configuration error now in force: provider failures, validation errors, and
    /// resources the data plane could not build.
    pub fn errors(&self) -> Vec<ErrorEntry> {
        let st = self.state();
        let mut out: Vec<ErrorEntry> = st
            .providers
            .values()
            .filter_map(|p| {
                p.last_error.as_ref().map(|m| ErrorEntry {
                    provider: p.name.clone(),
                    kind: "provider".into(),
                    name: p.name.clone(),
                    key: None,
                    origin: None,
                    message: m.clone(),
                    stage: "provider",
                })
            })
            .collect();
        out.extend(st.validation_errors.iter().map(|e| ErrorEntry {
            provider: e.provider.clone(),
            kind: e.kind.as_str().to_owned(),
            name: e.name.clone(),
            key: e.key.clone(),
            origin: e.origin.as_ref().map(|o| o.to_string()),
            message: e.message.clone(),
            stage: "validation",
        }));
        out.extend(st.compile_errors.iter().cloned());
        out
    }

    /// The `/metrics` text: the data plane's counters (from `gw`, for `entry_points`), the
    /// certificates in use, and everything recorded through the `metrics` facade.
    pub fn render_metrics<'e>(
        &self,
        gw: &GatewayHandle,
        entry_points: impl Iterator<Item = &'e str>,
    ) -> String {
        use prometheus::Writer;
        let mut out = String::with_capacity(16 * 1024);
        let mut w = Writer::family(&mut out, &names::INFO);
        w.sample(
            names::INFO.name,
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        let mut w = Writer::family(&mut out, &names::START_TIME);
        w.sample(
            names::START_TIME.name,
            &[],
            time::unix_seconds(self.inner.started),
        );
        prometheus::render_data_plane(&mut out, gw, entry_points);
        let certs = self.certificates();
        let mut w = Writer::family(&mut out, &names::TLS_NOT_AFTER);
        for c in &certs {
            w.sample(
                names::TLS_NOT_AFTER.name,
                &[
                    ("kind", c.kind.as_str()),
                    ("resource", &c.resource),
                    ("cn", &c.cn),
                    ("sans", &c.sans),
                    ("serial", &c.serial),
                ],
                c.not_after,
            );
        }
        let mut w = Writer::family(&mut out, &names::ACCESSLOG_DROPPED);
        w.sample(
            names::ACCESSLOG_DROPPED.name,
            &[],
            self.inner.access_log.as_ref().map_or(0, AccessLog::dropped),
        );
        out.push_str(&self.inner.metrics.render_registry());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(providers: &[&str]) -> Observability {
        let o = Observability::with_access_log(&StaticConfig::default(), None);
        for p in providers {
            o.expect_provider(p);
        }
        o
    }

    fn cfg() -> Arc<Dynamic> {
        Arc::new(Dynamic::default())
    }

    #[test]
    fn ready_once_every_provider_is_in_an_applied_configuration() {
        let o = obs(&["file", "consulcatalog"]);
        o.provider_updated("file", &Dynamic::default());
        let c1 = cfg();
        o.publish(&c1);
        o.applied(&c1, &[]);
        assert!(!o.is_ready());
        assert_eq!(o.waiting_for(), ["consulcatalog"]);
        // Consul delivers; two configurations are published, the data plane only sees the last.
        o.provider_updated("consulcatalog", &Dynamic::default());
        let c2 = cfg();
        o.publish(&c2);
        let c3 = cfg();
        o.publish(&c3);
        assert!(!o.is_ready(), "published is not applied");
        o.applied(&c3, &[]);
        assert!(o.is_ready());
        assert!(o.waiting_for().is_empty());
        assert_eq!(o.applied_count(), 2);
    }

    #[test]
    fn an_update_that_changes_nothing_completes_readiness() {
        let o = obs(&["file", "consulcatalog"]);
        o.provider_updated("file", &Dynamic::default());
        let c1 = cfg();
        o.publish(&c1);
        o.applied(&c1, &[]);
        o.provider_updated("consulcatalog", &Dynamic::default());
        // The merge is unchanged: the pipeline publishes the configuration in use again.
        o.publish(&c1);
        assert!(o.is_ready());
        let text = o.metrics().render_registry();
        assert!(
            text.contains(
                "tagway_config_change_to_applied_seconds_count{provider=\"consulcatalog\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn without_expected_providers_the_first_apply_is_ready() {
        let o = obs(&[]);
        assert!(!o.is_ready());
        o.applied(&cfg(), &[]);
        assert!(o.is_ready());
    }

    #[test]
    fn errors_in_force() {
        let o = obs(&["file"]);
        o.provider_failed("file", &"dynamic.toml:3:1: expected a table");
        let e = o.errors();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].stage, "provider");
        assert!(e[0].message.contains("dynamic.toml:3:1"));
        // A successful reload clears the provider's failure.
        o.provider_updated("file", &Dynamic::default());
        assert!(o.errors().is_empty());
        let p = &o.providers()[0];
        assert_eq!((p.reloads, p.failures), (1, 1));
    }
}
