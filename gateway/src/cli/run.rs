//! `tagway run --config FILE`, and the configuration pipeline the data plane consumes.
//!
//! [`providers`] starts every provider of the static configuration and returns one
//! `watch::Receiver<Arc<Dynamic>>` of merged (`name@provider`) and validated configurations:
//! broken resources (and what references them) are removed and logged, and one summary line is
//! logged per applied configuration.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tagway_config::{Dynamic, LogFormat, StaticConfig, Validated, load_static, merge, validate};
use tokio::sync::{mpsc, watch};
use tracing_subscriber::EnvFilter;

use crate::providers::file::{self, FileProviderHandle};

/// Initialises logging from `log.level` and `log.format`; `RUST_LOG`, when set, overrides the
/// level. Calling it twice is harmless.
pub fn init_tracing(st: &StaticConfig) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(normalise_level(&st.log.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    let v = validate(&merge(parts), st);
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
/// tokio runtime. More providers (the Consul catalog) plug in here.
pub fn combine(
    st: Arc<StaticConfig>,
    sources: Vec<(String, watch::Receiver<Arc<Dynamic>>)>,
) -> watch::Receiver<Arc<Dynamic>> {
    let current = move |sources: &[(String, watch::Receiver<Arc<Dynamic>>)]| {
        let snapshot: Vec<(String, Arc<Dynamic>)> = sources
            .iter()
            .map(|(n, rx)| (n.clone(), rx.borrow().clone()))
            .collect();
        let parts: Vec<(&str, &Dynamic)> = snapshot
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_ref()))
            .collect();
        Arc::new(apply(&st, &parts).config)
    };
    let (tx, rx) = watch::channel(current(&sources));
    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
    for (_, rx) in &sources {
        let mut rx = rx.clone();
        let changed_tx = changed_tx.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
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
            let next = current(&sources);
            if **tx.borrow() != *next {
                tx.send_replace(next);
            }
        }
    });
    rx
}

/// Starts the providers of the static configuration (the file provider here; the Consul catalog
/// provider plugs into [`combine`]). Must be called inside a tokio runtime.
pub fn providers(st: Arc<StaticConfig>) -> Providers {
    let mut sources = Vec::new();
    let mut handle = None;
    if let Some(f) = &st.providers.file {
        let (rx, h) = file::start(f.clone());
        sources.push((file::PROVIDER.to_owned(), rx));
        handle = Some(h);
    }
    Providers {
        config: combine(st, sources),
        file: handle,
    }
}

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
    let rt = match crate::server::build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "tagway starting");
        let st = Arc::new(st);
        let providers = providers(st.clone());
        let mut gateway = crate::server::Gateway::new((*st).clone());
        if let Err(e) = gateway.bind() {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        let (signal_tx, signal_rx) = tokio::sync::oneshot::channel();
        let shutdown = async {
            let _ = signal_tx.send(wait_for_signals(&providers).await);
        };
        if let Err(e) = gateway.run(providers.config.clone(), shutdown).await {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
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
    })
}

#[cfg(unix)]
async fn wait_for_signals(p: &Providers) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration files");
                p.reload();
            }
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_p: &Providers) -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
