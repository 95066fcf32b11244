//! The gateway: binds the entry points of the static configuration, compiles every dynamic
//! configuration it receives into runtime tables (swapped atomically), serves connections, and
//! drains on shutdown.
//!
//! ```no_run
//! # async fn example(static_cfg: tagway_config::StaticConfig,
//! #     rx: tokio::sync::watch::Receiver<std::sync::Arc<tagway_config::Dynamic>>) -> Result<(), tagway::server::GatewayError> {
//! let mut gw = tagway::server::Gateway::new(static_cfg);
//! gw.bind()?; // listeners are bound before run (tests use port 0 and read local_addr)
//! gw.run(rx, tagway::server::shutdown_signal()).await
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tagway_config::{Dynamic, StaticConfig};
use tagway_transport::IdentitySource;
use tokio::sync::watch;

use crate::conn::{EntryPointState, Options};
use crate::entrypoint::{self, BindError};
use crate::metrics::EntryPointCounters;
use crate::observability::Observability;
use crate::proxy_in::ProxyInbound;
use crate::runtime::{self, Tables};

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// An entry point cannot be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// An entry point's `proxyProtocol.trustedIPs` holds an invalid range.
    #[error("entry point {entry_point}: proxyProtocol.trustedIPs: {source}")]
    TrustedIps {
        /// The entry point.
        entry_point: String,
        /// The error.
        source: crate::middleware::RangeError,
    },
}

/// A view of the running gateway: current tables and entry-point counters (for metrics, admin and
/// tests).
#[derive(Clone, Debug)]
pub struct GatewayHandle {
    tables: Arc<ArcSwap<Tables>>,
    entry_points: Arc<HashMap<String, Arc<EntryPointCounters>>>,
    generation: watch::Receiver<u64>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    #[cfg(target_os = "linux")]
    switches: Switches,
}

/// Per entry point served by the event loops when it can be, its switch (filled by `run`).
#[cfg(target_os = "linux")]
type Switches = Arc<std::sync::Mutex<Vec<(String, Arc<crate::evloop::Switch>)>>>;

impl GatewayHandle {
    /// True while the event loops ([`crate::evloop`]) accept the connections of `entry_point`
    /// (false while its tokio accept loops do, and outside Linux).
    pub fn served_by_event_loops(&self, entry_point: &str) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.switches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(n, s)| n == entry_point && s.event_loops())
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = entry_point;
            false
        }
    }

    /// True once shutdown began: no new connections are accepted and the open ones drain
    /// (`/ready` answers 503 from then on).
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The tables in use now.
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    /// Counters of an entry point.
    pub fn entry_point(&self, name: &str) -> Option<&Arc<EntryPointCounters>> {
        self.entry_points.get(name)
    }

    /// Waits until at least `n` configurations have been applied (the first one is 1).
    pub async fn applied(&mut self, n: u64) {
        let _ = self.generation.wait_for(|g| *g >= n).await;
    }
}

/// The TCP gateway.
pub struct Gateway {
    static_cfg: StaticConfig,
    options: Arc<Options>,
    /// Per entry point: one listener per worker thread (the first one for this runtime).
    listeners: Vec<(String, Vec<std::net::TcpListener>)>,
    tables: Arc<ArcSwap<Tables>>,
    counters: Arc<HashMap<String, Arc<EntryPointCounters>>>,
    generation: (watch::Sender<u64>, watch::Receiver<u64>),
    draining: Arc<std::sync::atomic::AtomicBool>,
    obs: Option<Observability>,
    identity: Option<IdentitySource>,
    #[cfg(target_os = "linux")]
    switches: Switches,
}

impl Gateway {
    /// A gateway for `static_cfg` (entry points, default transport, shutdown grace period,
    /// `loadBalancer` hold-out and dial attempts).
    pub fn new(static_cfg: StaticConfig) -> Self {
        let counters = static_cfg
            .entry_points
            .keys()
            .map(|k| (k.clone(), Arc::new(EntryPointCounters::default())))
            .collect();
        let lb = &static_cfg.load_balancer;
        let options = Options {
            hold_out: lb.hold_out.to_std().unwrap_or(Duration::ZERO),
            dial_attempts: (lb.dial_attempts as usize).max(1),
            ..Options::default()
        };
        Gateway {
            static_cfg,
            options: Arc::new(options),
            listeners: Vec::new(),
            tables: Arc::new(ArcSwap::from_pointee(Tables::default())),
            counters: Arc::new(counters),
            generation: watch::channel(0),
            draining: Arc::default(),
            obs: None,
            identity: None,
            #[cfg(target_os = "linux")]
            switches: Arc::default(),
        }
    }

    /// The gateway's own SPIFFE identity (SVID and trust bundle), presented by transports with a
    /// `spiffe` section: from `providers.spiffe` (Workload API or PEM files) or pushed by the Consul
    /// provider (Connect leaf and roots). Rotations apply to new dials without a recompile.
    pub fn with_identity(mut self, identity: IdentitySource) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Reports every applied configuration to `obs` and gives connections its access log.
    pub fn with_observability(mut self, obs: Observability) -> Self {
        self.obs = Some(obs);
        self
    }

    /// Replaces the data-plane tunables (including those read from `loadBalancer`).
    pub fn with_options(mut self, options: Options) -> Self {
        self.options = Arc::new(options);
        self
    }

    /// Binds every entry point (idempotent). Must run inside a tokio runtime.
    pub fn bind(&mut self) -> Result<(), GatewayError> {
        if !self.listeners.is_empty() {
            return Ok(());
        }
        for (name, ep) in &self.static_cfg.entry_points {
            let l = entrypoint::bind(name, &ep.address, self.options.workers.max(1))?;
            tracing::info!(entry_point = %name, address = %l[0].local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
            self.listeners.push((name.clone(), l));
        }
        Ok(())
    }

    /// The bound address of an entry point (after [`Gateway::bind`]).
    pub fn local_addr(&self, entry_point: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == entry_point)
            .and_then(|(_, l)| l.first()?.local_addr().ok())
    }

    /// A handle on the running state.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            tables: self.tables.clone(),
            entry_points: self.counters.clone(),
            generation: self.generation.1.clone(),
            draining: self.draining.clone(),
            #[cfg(target_os = "linux")]
            switches: self.switches.clone(),
        }
    }

    /// Serves until `shutdown` resolves: applies every configuration `config_rx` carries (the
    /// current one at once), then on shutdown stops accepting, waits for open connections up to
    /// `shutdown.gracePeriod` and closes the rest.
    pub async fn run(
        mut self,
        mut config_rx: watch::Receiver<Arc<Dynamic>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), GatewayError> {
        self.bind()?;
        let static_cfg = Arc::new(self.static_cfg.clone());
        // First configuration, then a task applying every change.
        let first = config_rx.borrow_and_update().clone();
        apply(
            &static_cfg,
            &self.tables,
            &first,
            self.obs.as_ref(),
            self.identity.as_ref(),
        );
        drop(first);
        release_freed_memory();
        let gen_tx = self.generation.0.clone();
        gen_tx.send_modify(|g| *g += 1);
        let grace = static_cfg
            .shutdown
            .grace_period
            .to_std()
            .unwrap_or(Duration::ZERO);
        let (stop_tx, stop_rx) = watch::channel(false);
        let workers = self.options.workers.max(1);
        // One set of accept loops per worker thread; this runtime serves the first.
        let mut per_worker: Vec<Vec<LoopSpec>> = (1..workers).map(|_| Vec::new()).collect();
        let mut loops = Vec::new();
        // Per event-loop thread, the entry points it serves; per entry point, its switch.
        #[cfg(target_os = "linux")]
        let mut loop_specs: Vec<Vec<crate::evloop::EntrySpec>> =
            (0..workers).map(|_| Vec::new()).collect();
        #[cfg(target_os = "linux")]
        let mut switches: Vec<(String, Arc<crate::evloop::Switch>)> = Vec::new();
        for (name, listener) in std::mem::take(&mut self.listeners) {
            let ep_cfg = &static_cfg.entry_points[&name];
            let proxy_in = match &ep_cfg.proxy_protocol {
                Some(p) => Some(ProxyInbound::new(&p.trusted_ips, p.insecure).map_err(
                    |source| GatewayError::TrustedIps {
                        entry_point: name.clone(),
                        source,
                    },
                )?),
                None => None,
            };
            let counters = self.counters[&name].clone();
            let state = Arc::new(EntryPointState {
                name: name.as_str().into(),
                proxy_in,
                counters,
                access_log: self.obs.as_ref().and_then(Observability::access_log),
            });
            let limit = entrypoint::connection_limit(ep_cfg.max_connections);
            // Per worker, what its accept loop shares with the event loops (Linux, an entry
            // point without inbound PROXY protocol and `maxConnections`).
            let mut shared: Vec<Option<entrypoint::Shared>> =
                listener.iter().map(|_| None).collect();
            #[cfg(target_os = "linux")]
            if self.options.event_loop && state.proxy_in.is_none() && limit.is_none() {
                let switch = crate::evloop::Switch::new();
                switch.set(crate::evloop::can_serve(&self.tables.load(), &name));
                for (i, l) in listener.iter().enumerate() {
                    let dup = match l.try_clone() {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::warn!(entry_point = %name, error = %e,
                                "cannot share the listener with an event loop");
                            continue;
                        }
                    };
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    shared[i] = Some(entrypoint::Shared {
                        paused: switch.tokio_paused(),
                        handoff: rx,
                    });
                    loop_specs[i].push(crate::evloop::EntrySpec {
                        listener: dup,
                        state: state.clone(),
                        switch: switch.clone(),
                        handoff: tx,
                    });
                }
                switches.push((name.clone(), switch));
            }
            let mut shared = shared.into_iter();
            let mut listeners = listener.into_iter();
            let Some(listener) = listeners.next() else {
                continue;
            };
            let first_shared = shared.next().flatten();
            for (w, (l, sh)) in per_worker.iter_mut().zip(listeners.zip(shared)) {
                w.push(LoopSpec {
                    listener: l,
                    state: state.clone(),
                    limit: limit.clone(),
                    shared: sh,
                });
            }
            loops.push(tokio::spawn(serve_loop(
                LoopSpec {
                    listener,
                    state,
                    limit,
                    shared: first_shared,
                },
                self.tables.clone(),
                self.options.clone(),
                stop_rx.clone(),
                grace,
            )));
        }
        #[cfg(target_os = "linux")]
        let (switches, wakers, loop_threads) = {
            let mut wakers = Vec::new();
            let mut threads = Vec::new();
            for (i, entries) in loop_specs.into_iter().enumerate() {
                if entries.is_empty() {
                    continue;
                }
                match crate::evloop::spawn(
                    i,
                    entries,
                    self.tables.clone(),
                    self.options.clone(),
                    grace,
                ) {
                    Ok((w, t)) => {
                        wakers.push(w);
                        threads.push(t);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start an event loop"),
                }
            }
            *self.switches.lock().unwrap_or_else(|e| e.into_inner()) = switches.clone();
            (Arc::new(switches), Arc::new(wakers), threads)
        };
        let reload = {
            let static_cfg = static_cfg.clone();
            let tables = self.tables.clone();
            let obs = self.obs.clone();
            let identity = self.identity.clone();
            #[cfg(target_os = "linux")]
            let (switches, wakers) = (switches.clone(), wakers.clone());
            tokio::spawn(async move {
                // Freed generations go back to the OS a moment after a change, at most once per
                // TRIM_DELAY, off the path of the change itself.
                let mut trim_at: Option<tokio::time::Instant> = None;
                loop {
                    tokio::select! {
                        changed = config_rx.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            let cfg = config_rx.borrow_and_update().clone();
                            apply(&static_cfg, &tables, &cfg, obs.as_ref(), identity.as_ref());
                            #[cfg(target_os = "linux")]
                            flip(&tables.load(), &switches, &wakers);
                            gen_tx.send_modify(|g| *g += 1);
                            trim_at.get_or_insert_with(|| tokio::time::Instant::now() + TRIM_DELAY);
                        }
                        () = async { tokio::time::sleep_until(trim_at.unwrap_or_else(tokio::time::Instant::now)).await }, if trim_at.is_some() => {
                            trim_at = None;
                            release_freed_memory();
                        }
                    }
                }
            })
        };

        let mut worker_done = Vec::new();
        for (i, specs) in per_worker.into_iter().enumerate() {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let tables = self.tables.clone();
            let opts = self.options.clone();
            let stop = stop_rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tagway-worker-{}", i + 1))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a worker runtime");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let handles: Vec<_> = specs
                            .into_iter()
                            .map(|spec| {
                                tokio::spawn(serve_loop(
                                    spec,
                                    tables.clone(),
                                    opts.clone(),
                                    stop.clone(),
                                    grace,
                                ))
                            })
                            .collect();
                        for h in handles {
                            let _ = h.await;
                        }
                    });
                    let _ = done_tx.send(());
                });
            match spawned {
                Ok(_) => worker_done.push(done_rx),
                Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
            }
        }
        shutdown.await;
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("shutting down: no new connections");
        let _ = stop_tx.send(true);
        #[cfg(target_os = "linux")]
        for w in wakers.iter() {
            w.stop();
        }
        for l in loops {
            let _ = l.await;
        }
        #[cfg(target_os = "linux")]
        let _ = tokio::task::spawn_blocking(move || {
            for t in loop_threads {
                let _ = t.join();
            }
        })
        .await;
        for d in worker_done {
            let _ = d.await;
        }
        reload.abort();
        Ok(())
    }
}

/// One accept loop to run: a listener and its entry point.
struct LoopSpec {
    listener: std::net::TcpListener,
    state: Arc<EntryPointState>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    shared: Option<entrypoint::Shared>,
}

/// Hands each entry point to the event loops or to tokio as `tables` allow, and wakes the event
/// loops when one changed.
#[cfg(target_os = "linux")]
fn flip(
    tables: &Tables,
    switches: &[(String, Arc<crate::evloop::Switch>)],
    wakers: &[Arc<crate::evloop::Waker>],
) {
    let mut changed = false;
    for (name, switch) in switches {
        let to_loops = crate::evloop::can_serve(tables, name);
        if switch.set(to_loops) {
            tracing::debug!(entry_point = %name, event_loops = to_loops, "entry point switched");
            changed = true;
        }
    }
    if changed {
        for w in wakers {
            w.wake();
        }
    }
}

async fn serve_loop(
    spec: LoopSpec,
    tables: Arc<ArcSwap<Tables>>,
    opts: Arc<Options>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let state = spec.state;
    // The connections' tasks run on this loop's runtime.
    let current_thread = entrypoint::on_current_thread_runtime();
    entrypoint::accept_loop(
        state.name.clone(),
        spec.listener,
        spec.limit,
        state.counters.clone(),
        stop,
        grace,
        spec.shared,
        move |stream, peer| {
            crate::conn::serve(
                stream,
                peer,
                state.clone(),
                tables.load_full(),
                opts.clone(),
                current_thread,
            )
        },
    )
    .await;
}

/// Compiles `cfg` and swaps it in, logging what could not be compiled.
fn apply(
    static_cfg: &StaticConfig,
    tables: &ArcSwap<Tables>,
    cfg: &Arc<Dynamic>,
    obs: Option<&Observability>,
    identity: Option<&IdentitySource>,
) {
    let t0 = std::time::Instant::now();
    let prev = tables.load_full();
    let (new, errors) = runtime::compile_shared(cfg, static_cfg, Some(&prev), identity);
    let compiled = t0.elapsed();
    for e in &errors {
        tracing::error!(error = %e, "configuration resource skipped");
    }
    tracing::debug!(
        routers = new.routers.len(),
        services = new.services.len(),
        health_checks = new.health_checks(),
        "runtime tables swapped"
    );
    tables.store(Arc::new(new));
    if let Some(o) = obs {
        o.applied(cfg, &errors);
    }
    tracing::debug!(
        target: "tagway::timing",
        compile_us = compiled.as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "applied"
    );
    // The previous generation (often the last holder of the configuration it was compiled from)
    // is freed on the blocking pool: at 10,000 services that is a few ms the control thread, busy
    // with the next change, does not spend.
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(prev))),
        Err(_) => drop(prev),
    }
}

/// How long after a configuration change the freed memory is handed back to the OS.
const TRIM_DELAY: Duration = Duration::from_millis(500);

/// Hands the memory freed by the previous generation back to the OS: glibc keeps freed heap
/// memory in its arenas otherwise, and each reload would leave the resident size higher.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Large allocations (an answer of every check of a 10,000-service catalog is ~10 MB) are
/// mapped and unmapped on their own instead of coming from the heap: glibc otherwise raises its
/// mmap threshold after freeing the first one, later ones land in the heap, and the resident
/// size stays at the high-water mark of the largest answer. Called once at start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; M_MMAP_THRESHOLD takes a size in bytes.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// The runtime to call [`Gateway::run`] on: a single-thread (current-thread) runtime. The gateway
/// itself starts `Options::workers - 1` more threads (default `TOKIO_WORKER_THREADS`, else one per
/// CPU), each with its own single-thread runtime accepting from a listening socket it shares
/// with up to three other workers: no work-stealing and no cross-thread wakeups in the data path
/// (nginx's worker model).
pub fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => tracing::info!("SIGTERM received"),
                    _ = i.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
