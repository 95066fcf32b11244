//! `tagway run --config FILE`, and the configuration pipeline the data plane consumes.
//!
//! [`providers`] starts every provider of the static configuration and returns one
//! `watch::Receiver<Arc<Dynamic>>` of merged (`name@provider`) and validated configurations:
//! broken resources (and what references them) are removed and logged, and one summary line is
//! logged per applied configuration.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tagway_config::{
    Dynamic, EntryPoint, LogFormat, MergeCache, ResourceError, StaticConfig, Validated,
    load_static, merge, validate_changes,
};
use tagway_provider_consul::ConsulProvider;
use tagway_transport::{IdentitySource, SourceKind};
use tokio::sync::{mpsc, watch};
use tracing_subscriber::EnvFilter;

use crate::observability::Observability;
use crate::providers::file::{self, FileProviderHandle};

/// Initialises logging from `log.level` and `log.format`; `RUST_LOG`, when set, overrides the
/// level. Text logs are coloured only when stderr is a terminal and `NO_COLOR` is unset or
/// empty (<https://no-color.org>). Calling it twice is harmless.
pub fn init_tracing(st: &StaticConfig) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(normalise_level(&st.log.level)));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!no_color && std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match st.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn normalise_level(level: &str) -> String {
    match level.trim().to_ascii_lowercase().as_str() {
        "warning" => "warn".to_owned(),
        l => l.to_owned(),
    }
}

/// The running providers and their merged, validated output.
#[derive(Debug)]
pub struct Providers {
    /// Merged and validated configurations; the current value is always usable.
    pub config: watch::Receiver<Arc<Dynamic>>,
    file: Option<FileProviderHandle>,
    consul: Option<tagway_provider_consul::Running>,
}

impl Providers {
    /// The Consul provider's state (for `/ready` and the admin API), when it runs.
    pub fn consul(&self) -> Option<&tagway_provider_consul::Running> {
        self.consul.as_ref()
    }
}

impl Providers {
    /// Forces the providers that read files to reload them (SIGHUP).
    pub fn reload(&self) {
        if let Some(f) = &self.file {
            f.reload();
        }
    }
}

/// Merges and validates provider outputs, logging each error and one summary line.
pub fn apply(st: &StaticConfig, parts: &[(&str, &Dynamic)]) -> Validated {
    let t0 = std::time::Instant::now();
    let merged = merge(parts);
    apply_with(merged, t0.elapsed(), st, None)
}

/// Validates `merged` (merged in `merge_time`), checking only what changed since `prev` (the
/// last result) when it can, and logs like [`apply`].
fn apply_with(
    merged: Dynamic,
    merge_time: std::time::Duration,
    st: &StaticConfig,
    prev: Option<(&Dynamic, &[ResourceError])>,
) -> Validated {
    let t1 = std::time::Instant::now();
    let v = validate_changes(merged, st, prev);
    tracing::debug!(
        target: "tagway::timing",
        merge_us = merge_time.as_micros() as u64,
        validate_us = t1.elapsed().as_micros() as u64,
        "merged and validated"
    );
    for e in &v.errors {
        tracing::error!("{e} (the resource is disabled)");
    }
    tracing::info!(
        errors = v.errors.len(),
        "configuration applied: {}",
        tagway_config::summary(&v.config)
    );
    v
}

/// Combines provider channels (`(provider name, its output)`) into one channel of merged,
/// validated configurations, recomputed whenever a provider publishes. Must be called inside a
/// tokio runtime. More providers (the Consul catalog) plug in here. `obs` is told of every
/// provider update, the validation errors and each configuration sent (metrics, `/ready`,
/// `/api/errors`).
pub fn combine(
    st: Arc<StaticConfig>,
    sources: Vec<(String, watch::Receiver<Arc<Dynamic>>)>,
    obs: Option<Observability>,
) -> watch::Receiver<Arc<Dynamic>> {
    let sources = sources
        .into_iter()
        .map(|(name, rx)| Source {
            name,
            rx,
            delivered: true,
        })
        .collect();
    combine_sources(st, sources, obs)
}

/// One provider's output channel, for [`combine_sources`].
#[derive(Debug)]
pub struct Source {
    /// Provider name (`file`, `consulcatalog`): resources become `name@provider`.
    pub name: String,
    /// The provider's own (unmerged) configurations.
    pub rx: watch::Receiver<Arc<Dynamic>>,
    /// True when the channel's current value is already a delivery (the file provider loads before
    /// it returns); false when it is a placeholder and the first change is the first delivery (the
    /// Consul provider before its first sync), which is what `/ready` waits for.
    pub delivered: bool,
}

/// [`combine`] with sources whose first value may be a placeholder.
pub fn combine_sources(
    st: Arc<StaticConfig>,
    sources: Vec<Source>,
    obs: Option<Observability>,
) -> watch::Receiver<Arc<Dynamic>> {
    if let Some(o) = &obs {
        for src in sources.iter().filter(|s| s.delivered) {
            o.provider_updated(&src.name, &src.rx.borrow());
        }
    }
    let sources: Vec<(String, watch::Receiver<Arc<Dynamic>>)> =
        sources.into_iter().map(|s| (s.name, s.rx)).collect();
    let obs_current = obs.clone();
    let mut cache = MergeCache::default();
    let mut last: Option<(Arc<Dynamic>, Vec<ResourceError>)> = None;
    let mut current = move |sources: &[(String, watch::Receiver<Arc<Dynamic>>)]| {
        // Taken before reading the outputs: what this merge is sure to include.
        let mark = obs_current.as_ref().map(Observability::mark);
        let snapshot: Vec<(String, Arc<Dynamic>)> = sources
            .iter()
            .map(|(n, rx)| (n.clone(), rx.borrow().clone()))
            .collect();
        let parts: Vec<(&str, Arc<Dynamic>)> = snapshot
            .iter()
            .map(|(n, d)| (n.as_str(), d.clone()))
            .collect();
        let t0 = std::time::Instant::now();
        let merged = cache.merge_shared(&parts);
        let prev = last.as_ref().map(|(d, e)| (&**d, e.as_slice()));
        let v = apply_with(merged, t0.elapsed(), &st, prev);
        if let Some(o) = &obs_current {
            o.validated(&v.errors);
        }
        let config = Arc::new(v.config);
        last = Some((config.clone(), v.errors));
        (config, mark)
    };
    let (first, mark) = current(&sources);
    if let (Some(o), Some(mark)) = (&obs, mark) {
        o.publish_marked(&first, mark);
    }
    let (tx, rx) = watch::channel(first);
    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
    for (name, rx) in &sources {
        let mut rx = rx.clone();
        let changed_tx = changed_tx.clone();
        let (name, obs) = (name.clone(), obs.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if let Some(o) = &obs {
                    o.provider_updated(&name, &rx.borrow());
                }
                // A full channel already holds a pending recomputation.
                let _ = changed_tx.try_send(());
            }
        });
    }
    drop(changed_tx);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                c = changed_rx.recv() => if c.is_none() { return },
                () = tx.closed() => return,
            }
            let (next, mark) = current(&sources);
            if **tx.borrow() != *next {
                if let (Some(o), Some(mark)) = (&obs, mark) {
                    o.publish_marked(&next, mark);
                }
                tx.send_replace(next);
            } else if let (Some(o), Some(mark)) = (&obs, mark) {
                // Same configuration: the one in use now also holds this update.
                let in_use = tx.borrow().clone();
                o.publish_marked(&in_use, mark);
            }
        }
    });
    rx
}

/// Starts the providers of the static configuration: the file provider and the Consul catalog
/// provider. `identity` is the gateway's SPIFFE identity; when it is a manual source and Consul
/// Connect is on, the Consul provider pushes the Connect leaf and roots into it. Must be called
/// inside a tokio runtime.
pub fn providers(
    st: Arc<StaticConfig>,
    obs: Option<Observability>,
    identity: Option<IdentitySource>,
) -> Result<Providers, tagway_provider_consul::ProviderError> {
    let mut sources = Vec::new();
    let mut consul = None;
    if let Some(cc) = &st.providers.consul_catalog {
        let mut provider = ConsulProvider::new(cc)?;
        if cc.connect_aware {
            match &identity {
                Some(id) if id.kind() == SourceKind::Manual => {
                    provider = provider.with_identity_source(id.clone());
                }
                Some(_) => tracing::warn!(
                    "providers.spiffe supplies the gateway's identity: Consul Connect services are \
                     dialled with it, not with a leaf certificate from the Consul agent"
                ),
                None => {}
            }
        }
        if let Some(o) = &obs {
            o.expect_provider(tagway_provider_consul::PROVIDER_NAME);
        }
        let running = provider.start(std::future::pending())?;
        sources.push(Source {
            name: tagway_provider_consul::PROVIDER_NAME.to_owned(),
            rx: consul_deliveries(&running, obs.clone()),
            delivered: false,
        });
        consul = Some(running);
    }
    let mut handle = None;
    let mut file_failures = None;
    if let Some(f) = &st.providers.file {
        if let Some(o) = &obs {
            o.expect_provider(file::PROVIDER);
        }
        let (rx, h) = file::start(f.clone());
        file_failures = Some(h.failures());
        sources.push(Source {
            name: file::PROVIDER.to_owned(),
            rx,
            delivered: true,
        });
        handle = Some(h);
    }
    let config = combine_sources(st, sources, obs.clone());
    if let (Some(o), Some(mut failures)) = (obs, file_failures) {
        // Failed loads of the files count as failed reloads and show in /api/errors until a
        // load succeeds.
        if let Some(e) = failures.borrow_and_update().clone() {
            o.provider_failed(file::PROVIDER, &e);
        }
        tokio::spawn(async move {
            while failures.changed().await.is_ok() {
                match failures.borrow_and_update().clone() {
                    Some(e) => o.provider_failed(file::PROVIDER, &e),
                    None => o.provider_recovered(file::PROVIDER),
                }
            }
        });
    }
    Ok(Providers {
        config,
        file: handle,
        consul,
    })
}

/// The Consul provider's configurations, from its first complete sync on (before it, the channel
/// holds an empty placeholder); its reachability is reported to `obs` (failed reloads,
/// `/api/errors`).
fn consul_deliveries(
    running: &tagway_provider_consul::Running,
    obs: Option<Observability>,
) -> watch::Receiver<Arc<Dynamic>> {
    let (tx, rx) = watch::channel(Arc::new(Dynamic::default()));
    let mut config = running.config();
    let mut status = running.status();
    let mut connect = running.connect_identity();
    tokio::spawn(async move {
        loop {
            if let Some(id) = connect.borrow_and_update().clone() {
                let kind = crate::observability::certs::CertKind::Client;
                if let Some(info) = crate::observability::certs::describe_pem(
                    id.cert_chain_pem.as_bytes(),
                    kind,
                    &id.service,
                ) {
                    crate::observability::consul::connect_leaf_not_after(
                        &id.service,
                        info.not_after,
                    );
                }
            }
            if connect.changed().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let name = tagway_provider_consul::PROVIDER_NAME;
        let mut failing = false;
        let mut synced = false;
        loop {
            let st = status.borrow_and_update().clone();
            crate::observability::consul::services_watched(st.services);
            if let Some(o) = &obs {
                match (&st.last_error, failing) {
                    (Some(e), false) => {
                        o.provider_failed(name, e);
                        failing = true;
                    }
                    (None, true) => {
                        o.provider_recovered(name);
                        failing = false;
                    }
                    _ => {}
                }
            }
            if st.synced && !synced {
                synced = true;
                tx.send_replace(config.borrow_and_update().clone());
            }
            tokio::select! {
                r = status.changed() => if r.is_err() { return },
                r = config.changed(), if synced => {
                    if r.is_err() {
                        return;
                    }
                    tx.send_replace(config.borrow_and_update().clone());
                }
                () = tx.closed() => return,
            }
        }
    });
    rx
}

/// How long the exit waits for the access log to write its queued lines.
const ACCESS_LOG_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The `run` command: load, validate, start the providers, log each applied configuration;
/// SIGHUP reloads the files; SIGTERM or Ctrl-C stops.
pub fn main(path: &Path) -> ExitCode {
    let st = match load_static(path) {
        Ok(st) => st,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_tracing(&st);
    // A single-thread runtime: the data plane adds its own worker threads (one per CPU, or
    // TOKIO_WORKER_THREADS), each with its own runtime and listeners.
    crate::server::tune_allocator();
    let rt = match crate::server::build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        // Before anything else: a SIGHUP or SIGTERM that comes while tagway starts is kept for
        // the signal loop instead of ending the process (SIGHUP's default action).
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot handle signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "tagway starting");
        let st = Arc::new(st);
        let obs = match Observability::new(&st) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        // The Consul provider's `metrics::…!` calls land in /metrics.
        obs.metrics().install_global();
        // The gateway's own SPIFFE identity, for transports with a `spiffe` section: from
        // providers.spiffe, else pushed by the Consul provider (Connect leaf and roots).
        let identity = if let Some(spiffe) = &st.providers.spiffe {
            match IdentitySource::from_config(spiffe).await {
                Ok(identity) => Some(identity),
                Err(e) => {
                    tracing::error!("providers.spiffe: {e}");
                    return ExitCode::FAILURE;
                }
            }
        } else if st
            .providers
            .consul_catalog
            .as_ref()
            .is_some_and(|c| c.connect_aware)
        {
            Some(IdentitySource::manual())
        } else {
            None
        };
        let providers = match providers(st.clone(), Some(obs.clone()), identity.clone()) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("providers.consulCatalog: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut gateway = crate::server::Gateway::new((*st).clone()).with_observability(obs.clone());
        if let Some(identity) = identity {
            gateway = gateway.with_identity(identity);
        }
        if let Err(e) = gateway.bind() {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        let obs_at_exit = obs.clone();
        if let Err(e) = crate::admin::spawn_if_configured(
            st.clone(),
            obs,
            gateway.handle(),
            std::future::pending(),
        )
        .await
        {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        let (signal_tx, signal_rx) = tokio::sync::oneshot::channel();
        let shutdown = async {
            let _ = signal_tx.send(signals.wait(&providers, path, &st).await);
        };
        if let Err(e) = gateway.run(providers.config.clone(), shutdown).await {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        // Every connection has ended: write out the access-log lines still queued before the
        // process exit cuts the writer thread off.
        let flushed = tokio::task::spawn_blocking(move || {
            obs_at_exit.flush_access_log(ACCESS_LOG_FLUSH_TIMEOUT)
        })
        .await
        .unwrap_or(false);
        if !flushed {
            tracing::warn!(timeout = ?ACCESS_LOG_FLUSH_TIMEOUT, "access log: lines still queued at exit were not all written");
        }
        match signal_rx.await.unwrap_or(Ok(())) {
            Ok(()) => {
                tracing::info!("tagway stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("signal handling failed: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // Connections are drained and logs written: exit now. Dropping the runtime would wait for
    // its blocking threads, and one may be stuck (a file provider read of a FIFO or a slow
    // mount, a getaddrinfo waiting on an unreachable resolver); the process exit ends them.
    rt.shutdown_background();
    code
}

/// The signals `tagway run` handles: SIGHUP reloads, SIGTERM and SIGINT stop.
#[cfg(unix)]
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    /// Installs the handlers; a signal that comes before [`Signals::wait`] is kept for it.
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Reloads at each SIGHUP (and names the static changes that need a restart); returns at
    /// SIGTERM or SIGINT.
    async fn wait(
        mut self,
        p: &Providers,
        static_path: &Path,
        running: &StaticConfig,
    ) -> std::io::Result<()> {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration files");
                    p.reload();
                    report_static_changes(static_path, running);
                }
                _ = self.term.recv() => return Ok(()),
                _ = self.int.recv() => return Ok(()),
            }
        }
    }
}

/// Ctrl-C stops; there is no reload signal.
#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn wait(
        self,
        _p: &Providers,
        _static_path: &Path,
        _running: &StaticConfig,
    ) -> std::io::Result<()> {
        tokio::signal::ctrl_c().await
    }
}

/// Reads the static file again (at SIGHUP) and logs, as warnings, every change that only a
/// restart applies: entry points added, removed or changed (listeners are bound once, at
/// start), and any other static section. The running configuration is not touched.
fn report_static_changes(path: &Path, running: &StaticConfig) {
    let file = path.display();
    match load_static(path) {
        Err(e) => tracing::warn!(
            "static configuration {file} no longer loads, the running one stays: {e}"
        ),
        Ok(new) => {
            for change in static_changes(running, &new) {
                tracing::warn!("static configuration {file}: {change}: restart tagway to apply it");
            }
        }
    }
}

/// What differs between the running static configuration and `new`, one line per entry point
/// and per other section, in a stable order. Both structures are taken apart field by field, so
/// that a section or an entry point key added to the configuration cannot be left out here.
fn static_changes(running: &StaticConfig, new: &StaticConfig) -> Vec<String> {
    let StaticConfig {
        entry_points,
        tcp_servers_transport,
        providers,
        admin,
        log,
        access_log,
        shutdown,
        load_balancer,
    } = running;
    let mut out = Vec::new();
    for (name, ep) in entry_points {
        let Some(n) = new.entry_points.get(name) else {
            out.push(format!(
                "entry point `{name}` ({}) removed, its listener stays open",
                ep.address
            ));
            continue;
        };
        let EntryPoint {
            address,
            proxy_protocol,
            max_connections,
        } = ep;
        let mut keys = Vec::new();
        if &n.address != address {
            keys.push(format!("address `{}`, was `{address}`", n.address));
        }
        if &n.proxy_protocol != proxy_protocol {
            keys.push("proxyProtocol".to_owned());
        }
        if &n.max_connections != max_connections {
            keys.push("maxConnections".to_owned());
        }
        if !keys.is_empty() {
            out.push(format!("entry point `{name}` changed: {}", keys.join(", ")));
        }
    }
    for (name, ep) in &new.entry_points {
        if !entry_points.contains_key(name) {
            out.push(format!(
                "entry point `{name}` ({}) added, no listener is opened for it",
                ep.address
            ));
        }
    }
    let sections = [
        (
            "tcpServersTransport",
            tcp_servers_transport != &new.tcp_servers_transport,
        ),
        ("providers", providers != &new.providers),
        ("admin", admin != &new.admin),
        ("log", log != &new.log),
        ("accessLog", access_log != &new.access_log),
        ("shutdown", shutdown != &new.shutdown),
        ("loadBalancer", load_balancer != &new.load_balancer),
    ];
    for (section, changed) in sections {
        if changed {
            out.push(format!("section `{section}` changed"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> StaticConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tagway.toml");
        std::fs::write(&path, toml).unwrap();
        load_static(&path).unwrap()
    }

    #[test]
    fn static_changes_name_each_entry_point_and_section() {
        let running = parse(
            "[entryPoints.pg]\naddress = \"127.0.0.1:5432\"\n\
             [entryPoints.redis]\naddress = \"127.0.0.1:6379\"\n",
        );
        assert!(static_changes(&running, &running.clone()).is_empty());
        let new = parse(
            "[entryPoints.pg]\naddress = \"127.0.0.1:5433\"\n\
             [entryPoints.mysql]\naddress = \"127.0.0.1:3306\"\n\
             [shutdown]\ngracePeriod = \"3s\"\n",
        );
        assert_eq!(
            static_changes(&running, &new),
            [
                "entry point `pg` changed: address `127.0.0.1:5433`, was `127.0.0.1:5432`",
                "entry point `redis` (127.0.0.1:6379) removed, its listener stays open",
                "entry point `mysql` (127.0.0.1:3306) added, no listener is opened for it",
                "section `shutdown` changed",
            ]
        );
    }

    #[test]
    fn a_changed_max_connections_is_a_changed_entry_point() {
        let running = parse("[entryPoints.pg]\naddress = \"127.0.0.1:5432\"\n");
        let new = parse("[entryPoints.pg]\naddress = \"127.0.0.1:5432\"\nmaxConnections = 10\n");
        assert_eq!(
            static_changes(&running, &new),
            ["entry point `pg` changed: maxConnections"]
        );
    }
}
