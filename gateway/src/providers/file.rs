//! The file provider: one file (`filename`) or a folder of `.toml`/`.yaml`/`.yml` files
//! (`directory`, read recursively, merged), watched for changes.
//!
//! An edit becomes a new configuration after a short debounce (well within a second); a broken
//! edit keeps the previous configuration and logs why; [`FileProviderHandle::reload`] (SIGHUP)
//! forces a reload. The watcher uses inotify and falls back to polling when inotify is not
//! available.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};

use tagway_config::{ConfigError, Dynamic, FileProvider, Meta, Origin, load_dynamic_file};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

/// The provider name resources of this provider are qualified with (`name@file`).
pub const PROVIDER: &str = "file";

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Longest time events may keep postponing a reload.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(600);
/// Interval of the polling fallback.
pub const POLL_INTERVAL: Duration = Duration::from_millis(400);

/// Loads the provider's file, or every file of its directory merged. A resource defined in two
/// files is an error naming both; every error of every file is reported.
pub fn load(cfg: &FileProvider) -> Result<Dynamic, ConfigError> {
    match (&cfg.filename, &cfg.directory) {
        (Some(f), _) => load_dynamic_file(f),
        (None, Some(dir)) => {
            let files = files_in(dir)?;
            let mut parts = Vec::new();
            let mut errors = Vec::new();
            for f in files {
                match load_dynamic_file(&f) {
                    Ok(d) => parts.push(d),
                    Err(e) => errors.extend(e.flatten()),
                }
            }
            match merge_files(parts) {
                Ok(d) if errors.is_empty() => Ok(d),
                Ok(_) => Err(many(errors)),
                Err(e) => {
                    errors.extend(e.flatten());
                    Err(many(errors))
                }
            }
        }
        (None, None) => Err(ConfigError::Invalid {
            key: "providers.file".to_owned(),
            origin: None,
            message: "set `filename` or `directory`".to_owned(),
        }),
    }
}

fn many(mut errors: Vec<ConfigError>) -> ConfigError {
    if errors.len() == 1 {
        errors.remove(0)
    } else {
        ConfigError::Many { errors }
    }
}

/// The configuration files of `dir`, recursively, sorted; hidden files (editor swap files) and
/// other extensions are skipped.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<(), ConfigError> {
        let io = |source| ConfigError::Io {
            path: dir.to_owned(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if hidden {
                continue;
            }
            let ft = entry.file_type().map_err(io)?;
            if ft.is_dir() && depth < 16 {
                walk(&path, out, depth + 1)?;
            } else if tagway_config::Format::from_path(&path).is_some() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, &mut out, 0)?;
    out.sort();
    Ok(out)
}

/// Merges the files of a directory into one configuration; a name defined in two files is an
/// error naming both places.
pub fn merge_files(parts: Vec<Dynamic>) -> Result<Dynamic, ConfigError> {
    let mut out = Dynamic::default();
    let mut errors = Vec::new();
    let duplicate = |key: String, first: &Meta, part: &Meta| ConfigError::Duplicate {
        first: first
            .origin_exact(&key)
            .cloned()
            .unwrap_or_else(|| Origin::tag("?")),
        second: part
            .origin_exact(&key)
            .cloned()
            .unwrap_or_else(|| Origin::tag("?")),
        key,
    };
    // Adds each of the part's `section` entries to `out`'s; a name already there is an error.
    macro_rules! put {
        ($part:expr, $($field:ident).+, $section:literal) => {
            for (n, v) in $part.$($field).+.clone() {
                if out.$($field).+.contains_key(&n) {
                    errors.push(duplicate(format!("{}.{n}", $section), &out.meta, &$part.meta));
                } else {
                    out.$($field).+.insert(n, v);
                }
            }
        };
    }
    for part in parts {
        put!(part, tcp.routers, "tcp.routers");
        put!(part, tcp.services, "tcp.services");
        put!(part, tcp.middlewares, "tcp.middlewares");
        put!(part, tcp.servers_transports, "tcp.serversTransports");
        put!(part, tls.options, "tls.options");
        put!(part, tls.stores, "tls.stores");
        let offset = out.tls.certificates.len();
        let mut meta = part.meta.clone();
        for i in (0..part.tls.certificates.len()).rev() {
            meta.rename_prefix(
                &format!("tls.certificates[{i}]"),
                &format!("tls.certificates[{}]", offset + i),
            );
        }
        out.tls
            .certificates
            .extend(part.tls.certificates.iter().cloned());
        out.meta.extend(meta);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(many(errors))
    }
}

/// How the provider notices changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchMode {
    /// inotify (or the platform's notification API), polling when unavailable.
    Notify,
    /// Polling at this interval.
    Poll(Duration),
    /// No watching: only [`FileProviderHandle::reload`].
    Off,
}

/// Controls a running file provider.
#[derive(Debug)]
pub struct FileProviderHandle {
    reload: Arc<Notify>,
    task: JoinHandle<()>,
    failures: watch::Receiver<Option<Arc<str>>>,
}

impl FileProviderHandle {
    /// Forces a reload (SIGHUP).
    pub fn reload(&self) {
        self.reload.notify_one();
    }

    /// The last load failure (None after a successful load); changes on every failed load.
    pub fn failures(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.failures.clone()
    }
}

impl Drop for FileProviderHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the provider (inside a tokio runtime): loads the files now and publishes every valid
/// change. When the first load fails, the error is logged and an empty configuration is
/// published until the files are fixed.
pub fn start(cfg: FileProvider) -> (watch::Receiver<Arc<Dynamic>>, FileProviderHandle) {
    let mode = if cfg.watch {
        WatchMode::Notify
    } else {
        WatchMode::Off
    };
    start_with(cfg, mode)
}

/// [`start`] with an explicit watch mode.
pub fn start_with(
    cfg: FileProvider,
    mode: WatchMode,
) -> (watch::Receiver<Arc<Dynamic>>, FileProviderHandle) {
    let (fail_tx, fail_rx) = watch::channel(None);
    let initial = match load(&cfg) {
        Ok(d) => {
            log_loaded(&d);
            d
        }
        Err(e) => {
            fail_tx.send_replace(Some(e.to_string().into()));
            tracing::error!(
                provider = PROVIDER,
                "cannot load the configuration files, starting without them:\n{e}"
            );
            Dynamic::default()
        }
    };
    let (tx, rx) = watch::channel(Arc::new(initial));
    let reload = Arc::new(Notify::new());
    let (ev_tx, ev_rx) = mpsc::unbounded_channel::<()>();
    let watcher = make_watcher(&cfg, mode, ev_tx);
    let task = tokio::spawn(run(cfg, tx, reload.clone(), ev_rx, watcher, fail_tx));
    (
        rx,
        FileProviderHandle {
            reload,
            task,
            failures: fail_rx,
        },
    )
}

fn log_loaded(d: &Dynamic) {
    for w in &d.meta.warnings {
        tracing::warn!(provider = PROVIDER, "{w}");
    }
    tracing::info!(
        provider = PROVIDER,
        "configuration files loaded: {}",
        tagway_config::summary(d)
    );
}

fn watched_path(cfg: &FileProvider) -> Option<(PathBuf, RecursiveMode)> {
    match (&cfg.filename, &cfg.directory) {
        // Watch the folder: editors replace files by renaming, which a watch on the file misses.
        (Some(f), _) => Some((
            f.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_owned),
            RecursiveMode::NonRecursive,
        )),
        (None, Some(d)) => Some((d.clone(), RecursiveMode::Recursive)),
        _ => None,
    }
}

/// With `filename`, the one name in the watched folder whose events matter (as Traefik, which
/// compares the event's file name): writes to other files there (logs, other templates of a
/// Nomad task's `local/`) do not reload. `None` (every event counts) for `directory`, and when
/// the file is a symbolic link, which is updated by replacing a sibling (a Kubernetes-style
/// `..data` link) rather than the file itself.
fn watched_name(cfg: &FileProvider) -> Option<std::ffi::OsString> {
    let f = cfg.filename.as_ref()?;
    if std::fs::symlink_metadata(f).is_ok_and(|m| m.file_type().is_symlink()) {
        return None;
    }
    f.file_name().map(ToOwned::to_owned)
}

/// Whether a watcher event may change the configuration: not a mere read (an open, or a close
/// without writing), and about `only` when set. An event naming no path (the watcher lost
/// events and asks for a rescan) always counts.
fn relevant(ev: &notify::Event, only: Option<&std::ffi::OsStr>) -> bool {
    let kind = match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    kind && match only {
        Some(name) if !ev.paths.is_empty() => ev.paths.iter().any(|p| p.file_name() == Some(name)),
        _ => true,
    }
}

fn make_watcher(
    cfg: &FileProvider,
    mode: WatchMode,
    tx: mpsc::UnboundedSender<()>,
) -> Option<Box<dyn Watcher + Send>> {
    let (path, recursive) = watched_path(cfg)?;
    let only = watched_name(cfg);
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && relevant(&ev, only.as_deref())
        {
            let _ = tx.send(());
        }
    };
    let poll = |handler, interval| -> Option<Box<dyn Watcher + Send>> {
        // Modification times are compared in whole seconds: hash the (small) files instead, so
        // two edits within a second are both seen.
        let config = notify::Config::default()
            .with_poll_interval(interval)
            .with_compare_contents(true);
        match notify::PollWatcher::new(handler, config) {
            Ok(mut w) => match w.watch(&path, recursive) {
                Ok(()) => Some(Box::new(w)),
                Err(e) => {
                    tracing::error!(provider = PROVIDER, path = %path.display(), "cannot watch: {e}; changes need a reload (SIGHUP)");
                    None
                }
            },
            Err(e) => {
                tracing::error!(
                    provider = PROVIDER,
                    "cannot poll: {e}; changes need a reload (SIGHUP)"
                );
                None
            }
        }
    };
    match mode {
        WatchMode::Off => None,
        WatchMode::Poll(interval) => poll(handler, interval),
        WatchMode::Notify => {
            let handler2 = handler.clone();
            match notify::recommended_watcher(handler) {
                Ok(mut w) => match w.watch(&path, recursive) {
                    Ok(()) => Some(Box::new(w)),
                    Err(e) => {
                        tracing::warn!(provider = PROVIDER, path = %path.display(), "inotify watch failed ({e}), polling instead");
                        poll(handler2, POLL_INTERVAL)
                    }
                },
                Err(e) => {
                    tracing::warn!(
                        provider = PROVIDER,
                        "inotify unavailable ({e}), polling instead"
                    );
                    poll(handler2, POLL_INTERVAL)
                }
            }
        }
    }
}

async fn run(
    cfg: FileProvider,
    tx: watch::Sender<Arc<Dynamic>>,
    reload: Arc<Notify>,
    mut events: mpsc::UnboundedReceiver<()>,
    // Kept alive for as long as the task runs.
    _watcher: Option<Box<dyn Watcher + Send>>,
    failures: watch::Sender<Option<Arc<str>>>,
) {
    let mut events_open = true;
    loop {
        let forced = tokio::select! {
            ev = events.recv(), if events_open => {
                if ev.is_none() {
                    events_open = false;
                    continue;
                }
                // Debounce: wait for a quiet period, bounded.
                let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
                loop {
                    let quiet = tokio::time::Instant::now() + DEBOUNCE;
                    match tokio::time::timeout_at(quiet.min(deadline), events.recv()).await {
                        Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
                        _ => break,
                    }
                }
                false
            }
            () = reload.notified() => true,
            () = tx.closed() => return,
        };
        let c = cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&c)).await;
        match loaded {
            Ok(Ok(d)) => {
                failures.send_if_modified(|f| f.take().is_some());
                if **tx.borrow() != d {
                    log_loaded(&d);
                    tx.send_replace(Arc::new(d));
                } else if forced {
                    tracing::info!(provider = PROVIDER, "reloaded: no change");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(
                    provider = PROVIDER,
                    "configuration files rejected, keeping the previous configuration:\n{e}"
                );
                failures.send_replace(Some(e.to_string().into()));
            }
            Err(e) => tracing::error!(provider = PROVIDER, "reload task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn dir_provider(dir: &Path) -> FileProvider {
        FileProvider {
            filename: None,
            directory: Some(dir.to_owned()),
            watch: true,
        }
    }

    const ROUTER: &str = "[tcp.routers.r]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n";

    fn service(addr: &str) -> String {
        format!("[tcp.services.s.loadBalancer]\nservers = [{{ address = \"{addr}\" }}]\n")
    }

    /// Waits (bounded) until the channel holds a configuration satisfying `pred`.
    async fn wait_for(
        rx: &mut watch::Receiver<Arc<Dynamic>>,
        within: Duration,
        pred: impl Fn(&Dynamic) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if pred(&rx.borrow_and_update()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    fn address(d: &Dynamic) -> Option<String> {
        Some(
            d.tcp
                .services
                .get("s")?
                .load_balancer
                .as_ref()?
                .servers
                .first()?
                .address
                .clone(),
        )
    }

    #[test]
    fn directory_files_merge_and_duplicates_name_both_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), ROUTER).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/b.yaml"),
            "tcp:\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - address: 10.0.0.1:80\n",
        )
        .unwrap();
        std::fs::write(dir.path().join(".a.toml.swp"), "garbage").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage").unwrap();
        let d = load(&dir_provider(dir.path())).unwrap();
        assert_eq!(d.tcp.routers.len(), 1);
        assert_eq!(address(&d).as_deref(), Some("10.0.0.1:80"));

        std::fs::write(
            dir.path().join("c.toml"),
            "\n\n[tcp.routers.r]\nservice = \"x\"\n",
        )
        .unwrap();
        let e = load(&dir_provider(dir.path())).unwrap_err().to_string();
        let a = dir.path().join("a.toml");
        let c = dir.path().join("c.toml");
        assert_eq!(
            e,
            format!(
                "{}:3:14: tcp.routers.r is already defined at {}:1:14: define it in one file only",
                c.display(),
                a.display()
            )
        );
    }

    #[test]
    fn every_broken_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "[tcp.routers.r]\nfoo = 1\n").unwrap();
        std::fs::write(dir.path().join("b.yaml"), "tcp: [\n").unwrap();
        let e = load(&dir_provider(dir.path())).unwrap_err();
        let all: Vec<String> = e.flatten().iter().map(ToString::to_string).collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(
            all[0].contains("a.toml:2:1: tcp.routers.r.foo: unknown key `foo`"),
            "{all:?}"
        );
        assert!(
            all[1].contains("b.yaml:") && all[1].contains("invalid YAML"),
            "{all:?}"
        );
    }

    async fn edits_become_configurations(mode: WatchMode) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.toml"), ROUTER).unwrap();
        std::fs::write(dir.path().join("s.toml"), service("10.0.0.1:80")).unwrap();
        let (mut rx, handle) = start_with(dir_provider(dir.path()), mode);
        assert_eq!(
            address(&rx.borrow_and_update()).as_deref(),
            Some("10.0.0.1:80")
        );

        // An edit becomes a new configuration within a second.
        let t0 = Instant::now();
        std::fs::write(dir.path().join("s.toml"), service("10.0.0.2:80")).unwrap();
        assert!(
            wait_for(&mut rx, Duration::from_secs(5), |d| address(d).as_deref()
                == Some("10.0.0.2:80"))
            .await,
            "the edit was not picked up"
        );
        // Nominally the debounce (150 ms) plus a load; not asserted as a timing (shared CI cores).
        eprintln!("edit applied after {:?}", t0.elapsed());

        // A broken edit keeps the previous configuration.
        std::fs::write(dir.path().join("s.toml"), "[tcp.services.s.loadBalancer\n").unwrap();
        tokio::time::sleep(MAX_DEBOUNCE + Duration::from_millis(400)).await;
        assert_eq!(address(&rx.borrow()).as_deref(), Some("10.0.0.2:80"));

        // A new file is picked up.
        std::fs::write(dir.path().join("s.toml"), service("10.0.0.3:80")).unwrap();
        std::fs::write(
            dir.path().join("m.toml"),
            "[tcp.middlewares.m.inFlightConn]\namount = 2\n",
        )
        .unwrap();
        assert!(
            wait_for(&mut rx, Duration::from_secs(5), |d| d
                .tcp
                .middlewares
                .contains_key("m")
                && address(d).as_deref() == Some("10.0.0.3:80"))
            .await
        );
        drop(handle);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inotify_edits_become_configurations() {
        edits_become_configurations(WatchMode::Notify).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polling_edits_become_configurations() {
        edits_become_configurations(WatchMode::Poll(Duration::from_millis(100))).await;
    }

    #[test]
    fn relevant_events_name_the_file() {
        use notify::event::{CreateKind, ModifyKind, RenameMode};
        let ev = |kind, paths: &[&str]| notify::Event {
            kind,
            paths: paths.iter().map(PathBuf::from).collect(),
            attrs: Default::default(),
        };
        let name = Some(std::ffi::OsStr::new("dyn.toml"));
        let write = EventKind::Modify(ModifyKind::Any);
        assert!(relevant(&ev(write, &["/etc/gw/dyn.toml"]), name));
        assert!(!relevant(&ev(write, &["/etc/gw/access.log"]), name));
        assert!(relevant(&ev(write, &["/etc/gw/access.log"]), None));
        // An editor or a Nomad template writes a temporary file and renames it over the file.
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(relevant(
            &ev(rename, &["/etc/gw/.dyn.toml.tmp", "/etc/gw/dyn.toml"]),
            name
        ));
        assert!(!relevant(
            &ev(
                EventKind::Create(CreateKind::File),
                &["/etc/gw/.dyn.toml.tmp"]
            ),
            name
        ));
        // Reads do not count; a close after writing does.
        let read = EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any));
        assert!(!relevant(&ev(read, &["/etc/gw/dyn.toml"]), name));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(relevant(&ev(closed, &["/etc/gw/dyn.toml"]), name));
        // Lost events (a rescan, no path) always count.
        assert!(relevant(&ev(EventKind::Other, &[]), name));
    }

    #[test]
    fn a_symlinked_file_is_watched_through_its_whole_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("real.toml"), ROUTER).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real.toml"), dir.path().join("dyn.toml"))
            .unwrap();
        let cfg = |name: &str| FileProvider {
            filename: Some(dir.path().join(name)),
            directory: None,
            watch: true,
        };
        assert_eq!(watched_name(&cfg("dyn.toml")), None);
        assert_eq!(
            watched_name(&cfg("real.toml")).as_deref(),
            Some(std::ffi::OsStr::new("real.toml"))
        );
        assert_eq!(watched_name(&dir_provider(dir.path())), None);
    }

    /// Writes to other files of the folder do not reload the file; replacing the file does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_files_own_events_reload_it() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let file = dir.path().join("dyn.toml");
        std::fs::write(&file, format!("{ROUTER}{}", service("10.0.0.1:80"))).unwrap();
        // A second name for the same file, in another folder: writing through it changes the
        // content without an event in the watched folder, so a reload shows as the new address.
        let link = elsewhere.path().join("dyn.toml");
        std::fs::hard_link(&file, &link).unwrap();
        let cfg = FileProvider {
            filename: Some(file.clone()),
            directory: None,
            watch: true,
        };
        let (mut rx, handle) = start_with(cfg, WatchMode::Notify);
        assert_eq!(
            address(&rx.borrow_and_update()).as_deref(),
            Some("10.0.0.1:80")
        );
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&link)
                .unwrap();
            f.write_all(format!("{ROUTER}{}", service("10.0.0.2:80")).as_bytes())
                .unwrap();
        }
        for i in 0..20 {
            std::fs::write(dir.path().join("access.log"), format!("line {i}\n")).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(MAX_DEBOUNCE + Duration::from_millis(400)).await;
        assert_eq!(
            address(&rx.borrow_and_update()).as_deref(),
            Some("10.0.0.1:80"),
            "a write to another file of the folder reloaded the configuration"
        );
        // Replaced by a rename, as editors and Nomad templates do.
        let tmp = dir.path().join(".dyn.toml.tmp");
        std::fs::write(&tmp, format!("{ROUTER}{}", service("10.0.0.3:80"))).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(
            wait_for(&mut rx, Duration::from_secs(5), |d| address(d).as_deref()
                == Some("10.0.0.3:80"))
            .await,
            "replacing the file was not picked up"
        );
        drop(handle);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_without_watching() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("one.yaml");
        std::fs::write(&file, "tcp:\n  routers:\n    r:\n      service: a\n").unwrap();
        let cfg = FileProvider {
            filename: Some(file.clone()),
            directory: None,
            watch: false,
        };
        let (mut rx, handle) = start(cfg);
        assert_eq!(rx.borrow_and_update().tcp.routers["r"].service, "a");
        std::fs::write(&file, "tcp:\n  routers:\n    r:\n      service: b\n").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rx.borrow().tcp.routers["r"].service, "a", "not watched");
        handle.reload();
        assert!(
            wait_for(&mut rx, Duration::from_secs(5), |d| d.tcp.routers["r"]
                .service
                == "b")
            .await
        );
    }

    #[tokio::test]
    async fn a_broken_first_load_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "[tcp.routers.r]\nfoo = 1\n").unwrap();
        let (rx, _h) = start_with(dir_provider(dir.path()), WatchMode::Off);
        assert_eq!(**rx.borrow(), Dynamic::default());
    }
}
