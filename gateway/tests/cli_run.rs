//! `tagway run`: loads, logs one summary line per applied configuration, follows file edits,
//! keeps the previous configuration on a broken edit, reloads on SIGHUP, stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Gateway {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Gateway {
    /// Waits (bounded) for a log line containing `needle`.
    fn expect(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?}; got:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "tagway did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &std::path::Path) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tagway"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Gateway {
        child,
        lines: rx,
        seen: Vec::new(),
    }
}

#[test]
fn run_follows_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let dynamic = dir.path().join("dynamic");
    std::fs::create_dir(&dynamic).unwrap();
    std::fs::write(
        dir.path().join("tagway.yaml"),
        "entryPoints:\n  web:\n    address: 127.0.0.1:0\nlog:\n  format: json\nproviders:\n  file:\n    directory: dynamic\n",
    )
    .unwrap();
    let router = "[tcp.routers.r]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n[tcp.services.s.loadBalancer]\nservers = [{ address = \"127.0.0.1:9\" }]\n";
    std::fs::write(dynamic.join("a.toml"), router).unwrap();
    let mut gw = start(&dir.path().join("tagway.yaml"));
    let first = gw.expect("configuration applied", Duration::from_secs(20));
    // JSON log lines, with the counts.
    let v: serde_json::Value = serde_json::from_str(&first).expect("a JSON log line");
    assert!(
        v["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("1 routers, 1 services"),
        "{first}"
    );

    // An edit becomes a new configuration.
    std::fs::write(
        dynamic.join("b.toml"),
        "[tcp.routers.r2]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n",
    )
    .unwrap();
    gw.expect("2 routers, 1 services", Duration::from_secs(10));

    // A broken edit keeps the previous configuration and says why.
    std::fs::write(dynamic.join("b.toml"), "[tcp.routers.r2\n").unwrap();
    let l = gw.expect(
        "rejected, keeping the previous configuration",
        Duration::from_secs(10),
    );
    assert!(l.contains("b.toml:1:"), "{l}");

    // A broken resource is disabled and logged, the rest applies.
    std::fs::write(
        dynamic.join("b.toml"),
        "[tcp.routers.r3]\nrule = \"HostSNI(`*`)\"\nservice = \"missing\"\n",
    )
    .unwrap();
    let l = gw.expect("does not exist", Duration::from_secs(10));
    assert!(l.contains("router `r3@file`"), "{l}");
    gw.expect("1 routers, 1 services", Duration::from_secs(10));

    // SIGHUP reloads.
    gw.signal("-HUP");
    gw.expect("SIGHUP: reloading", Duration::from_secs(10));
    gw.expect("reloaded: no change", Duration::from_secs(10));

    // SIGTERM stops cleanly.
    gw.signal("-TERM");
    gw.expect("tagway stopped", Duration::from_secs(10));
    let status = gw.wait_exit(Duration::from_secs(10));
    assert!(status.success());
}

#[test]
fn run_refuses_a_broken_static_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tagway.toml");
    std::fs::write(&cfg, "[entryPoints.web]\nadress = \":80\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tagway"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:2:1: entryPoints.web.adress: unknown key `adress`: expected `address`, `proxyProtocol` or `maxConnections`",
            cfg.display()
        )),
        "{err}"
    );
}

/// The connections that end during the shutdown drain are in the access log once the process
/// has exited: the exit waits for the access log's writer thread to write its queue.
#[test]
fn access_log_has_the_connections_that_ended_while_draining() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    // A backend that answers with what it got once the client has finished sending.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in backend.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                let _ = s.write_all(&got);
            });
        }
    });
    let log = dir.path().join("access.log");
    std::fs::write(
        dir.path().join("tagway.yaml"),
        format!(
            "entryPoints:\n  web:\n    address: 127.0.0.1:0\naccessLog:\n  filePath: {}\nshutdown:\n  gracePeriod: 20s\nproviders:\n  file:\n    filename: dynamic.toml\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("dynamic.toml"),
        format!(
            "[tcp.routers.r]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n[tcp.services.s.loadBalancer]\nservers = [{{ address = \"{backend_addr}\" }}]\n"
        ),
    )
    .unwrap();
    let mut gw = start(&dir.path().join("tagway.yaml"));
    // The configuration is applied before the listeners start.
    let listening = gw.expect("listening", Duration::from_secs(20));
    let addr = listening
        .split_whitespace()
        .find_map(|f| f.strip_prefix("address="))
        .unwrap_or_else(|| panic!("no address in {listening:?}"))
        .to_owned();

    const CLIENTS: usize = 64;
    let mut clients: Vec<std::net::TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"ping").unwrap();
            c
        })
        .collect();
    // Every connection reached the backend (it is counted as open) before the stop.
    std::thread::sleep(Duration::from_millis(200));
    gw.signal("-TERM");
    gw.expect("draining connections", Duration::from_secs(10));
    // All of them end at once, during the drain; the gateway exits right after the last one.
    for c in &mut clients {
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for c in &mut clients {
        let mut echo = Vec::new();
        c.read_to_end(&mut echo).unwrap();
        assert_eq!(echo, b"ping");
    }
    drop(clients);
    let status = gw.wait_exit(Duration::from_secs(20));
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), CLIENTS, "{text}");
    assert!(text.lines().all(|l| l.contains("close=closed")), "{text}");
}

/// Listeners are bound once: an entry point added to or removed from the static file is not
/// applied by SIGHUP, and the log says a restart is needed. The running listener keeps serving.
#[test]
fn sighup_names_static_changes_that_need_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let static_file = dir.path().join("tagway.toml");
    let dynamic = dir.path().join("dynamic.toml");
    std::fs::write(
        &dynamic,
        format!(
            "[tcp.routers.r]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n\
             [[tcp.services.s.loadBalancer.servers]]\naddress = \"{backend_addr}\"\n"
        ),
    )
    .unwrap();
    let providers = format!("[providers.file]\nfilename = \"{}\"\n", dynamic.display());
    std::fs::write(
        &static_file,
        format!("[entryPoints.web]\naddress = \"127.0.0.1:{port}\"\n{providers}"),
    )
    .unwrap();
    let mut gw = start(&static_file);
    gw.expect("configuration applied", Duration::from_secs(20));

    // `web` removed, `other` added, the grace period changed.
    std::fs::write(
        &static_file,
        format!(
            "[entryPoints.other]\naddress = \"127.0.0.1:0\"\n{providers}\
             [shutdown]\ngracePeriod = \"1s\"\n"
        ),
    )
    .unwrap();
    gw.signal("-HUP");
    let removed = gw.expect("entry point `web`", Duration::from_secs(10));
    assert!(
        removed.contains("removed, its listener stays open")
            && removed.contains("restart tagway to apply it")
            && removed.contains("tagway.toml"),
        "{removed}"
    );
    let added = gw.expect("entry point `other`", Duration::from_secs(10));
    assert!(
        added.contains("added, no listener is opened for it"),
        "{added}"
    );
    gw.expect("section `shutdown` changed", Duration::from_secs(10));

    // The running listener still proxies.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut s, _) = backend.accept().unwrap();
    use std::io::{Read, Write};
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // A static file that no longer loads is reported; the running configuration stays.
    std::fs::write(&static_file, "[entryPoints.web\n").unwrap();
    gw.signal("-HUP");
    let broken = gw.expect("no longer loads", Duration::from_secs(10));
    assert!(broken.contains("the running one stays"), "{broken}");
    drop(c);
    drop(s);

    gw.signal("-TERM");
    gw.expect("tagway stopped", Duration::from_secs(10));
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
}

/// A SIGHUP that comes while tagway starts (as soon as it logs its first line, before any
/// configuration is applied) reloads instead of ending the process; a SIGTERM then stops it.
#[test]
fn a_sighup_while_starting_is_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let static_file = dir.path().join("tagway.toml");
    let dynamic = dir.path().join("dynamic.toml");
    std::fs::write(
        &dynamic,
        "[tcp.routers.r]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n\
         [[tcp.services.s.loadBalancer.servers]]\naddress = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    std::fs::write(
        &static_file,
        format!(
            "[entryPoints.web]\naddress = \"127.0.0.1:0\"\n[providers.file]\nfilename = \"{}\"\n",
            dynamic.display()
        ),
    )
    .unwrap();
    let mut gw = start(&static_file);
    gw.expect("tagway starting", Duration::from_secs(20));
    gw.signal("-HUP");
    gw.expect("SIGHUP: reloading", Duration::from_secs(10));
    assert!(
        gw.seen.iter().any(|l| l.contains("configuration applied")),
        "{:?}",
        gw.seen
    );
    assert!(gw.child.try_wait().unwrap().is_none(), "tagway ended");
    gw.signal("-TERM");
    gw.expect("tagway stopped", Duration::from_secs(10));
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
}
