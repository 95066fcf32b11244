//! Conformance: py-consul, a third-party Consul client from PyPI, works unchanged against the
//! dev catalog (registration with tags and a TTL check, blocking `health.service` and
//! `catalog.services`, deregistration, ACLs, Connect CA).
//!
//! Needs the virtualenv that `scripts/setup-test-deps` creates in `.venv`; without it this
//! test fails and says so.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tagway_integration::catalog::DevCatalog;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

fn venv_python() -> PathBuf {
    let root = repo_root();
    let python = root.join(".venv").join("bin").join("python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test-deps to create the Python virtualenv with py-consul",
        python.display()
    );
    let import = Command::new(&python)
        .args(["-c", "import consul"])
        .output()
        .expect("running the venv's python");
    assert!(
        import.status.success(),
        "py-consul is not importable from {}: run scripts/setup-test-deps ({})",
        python.display(),
        String::from_utf8_lossy(&import.stderr)
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_works_unchanged_against_the_dev_catalog() {
    let python = venv_python();
    let script = repo_root()
        .join("integration")
        .join("tests")
        .join("py")
        .join("py_consul_conformance.py");
    let catalog = DevCatalog::builder()
        .datacenter("dc1")
        .management_token("py-root-token")
        .start("127.0.0.1:0")
        .await
        .expect("dev catalog starts");
    let addr = catalog.addr().to_string();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(python)
            .arg(script)
            .env("DEV_CATALOG_ADDR", addr)
            .env("DEV_CATALOG_TOKEN", "py-root-token")
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("CONSUL_HTTP_TOKEN")
            .env_remove("CONSUL_HTTP_SSL")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the py-consul script");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if child.try_wait().expect("polling the script").is_some() {
                break;
            }
            if Instant::now() > deadline {
                // Only the child this test started is killed, by its handle.
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("script output")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "py-consul conformance failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    assert!(stdout.contains("py-consul conformance: OK"), "{stdout}");
    catalog.shutdown().await;
}
