//! `tagway check` and `tagway --version`, run as the built binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tagway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tagway"))
        .args(args)
        .env_remove("TAGWAY_CONFIG")
        .output()
        .expect("run tagway")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn version() {
    let out = tagway(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("tagway {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_example_is_valid() {
    let cfg = repo().join("examples/tagway.toml");
    let out = tagway(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.trim_end().ends_with(": ok: 1 entry points, 1 routers, 3 services, 1 middlewares, 1 serversTransports (+ default@internal), 0 TLS certificates"),
        "{stdout}"
    );
}

#[test]
fn config_from_the_environment() {
    let cfg = repo().join("examples/tagway.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_tagway"))
        .arg("check")
        .env("TAGWAY_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn static_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tagway.yaml");
    std::fs::write(
        &cfg,
        "entryPoints:\n  db:\n    address: \"127.0.0.1:5432x\"\nlog:\n  level: loud\nshutdown:\n  gracePeriod: soon\n",
    )
    .unwrap();
    let out = tagway(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let c = cfg.display();
    assert!(
        err.contains(&format!(
            "error: {c}:7:16: shutdown.gracePeriod: invalid duration \"soon\""
        )),
        "{err}"
    );
    // After the unreadable key is reported, the rest is still checked.
    let out = {
        std::fs::write(
            &cfg,
            "entryPoints:\n  db:\n    address: \"127.0.0.1:5432x\"\nlog:\n  level: loud\n",
        )
        .unwrap();
        tagway(&["check", "--config", cfg.to_str().unwrap()])
    };
    let err = text(&out.stderr);
    assert!(err.contains(&format!("error: {c}:3:5: entryPoints.db.address: `127.0.0.1:5432x` has a non-numeric port `5432x`")), "{err}");
    assert!(
        err.contains(&format!(
            "error: {c}:5:3: log.level: unknown log level `loud`"
        )),
        "{err}"
    );
    assert!(err.trim_end().ends_with("2 error(s)"), "{err}");
}

#[test]
fn dynamic_errors_name_file_line_resource_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let dynamic = dir.path().join("dynamic");
    std::fs::create_dir(&dynamic).unwrap();
    std::fs::write(
        dir.path().join("tagway.toml"),
        "[entryPoints.web]\naddress = \":0\"\n[providers.file]\ndirectory = \"dynamic\"\n",
    )
    .unwrap();
    std::fs::write(
        dynamic.join("a.toml"),
        "[tcp.routers.r]\nentryPoints = [\"web\", \"nope\"]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n[tcp.services.s.loadBalancer]\nservers = [{ address = \"10.0.0.1:80\" }]\n[tcp.routers.ok]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n",
    )
    .unwrap();
    std::fs::write(
        dynamic.join("b.yaml"),
        "http:\n  routers: {}\ntcp:\n  middlewares:\n    m:\n      ipAllowList:\n        sourceRange: [\"10.0.0.0/33\"]\n",
    )
    .unwrap();
    let cfg = dir.path().join("tagway.toml");
    let out = tagway(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let a = dynamic.join("a.toml");
    let b = dynamic.join("b.yaml");
    assert!(
        err.contains(&format!(
            "warning: {}:1:1: http: ignored: tagway is a TCP gateway",
            b.display()
        )),
        "{err}"
    );
    assert!(err.contains(&format!("error: {}:2:23: router `r@file` (provider file), key `entryPoints[1]`: entry point `nope` does not exist in the static configuration (known: web)", a.display())), "{err}");
    assert!(err.contains(&format!("error: {}:7:23: middleware `m@file` (provider file), key `ipAllowList.sourceRange[0]`: `10.0.0.0/33` is neither an IP address nor a CIDR range", b.display())), "{err}");
    assert!(err.trim_end().ends_with("2 error(s)"), "{err}");

    // A router defined in two files.
    std::fs::write(
        dynamic.join("c.toml"),
        "[tcp.routers.ok]\nservice = \"s\"\n",
    )
    .unwrap();
    let err = text(&tagway(&["check", "--config", cfg.to_str().unwrap()]).stderr);
    assert!(
        err.contains(&format!(
            "error: {}:1:14: tcp.routers.ok is already defined at {}:7:14: define it in one file only",
            dynamic.join("c.toml").display(),
            a.display()
        )),
        "{err}"
    );
}

#[test]
fn the_seeds_wrong_examples_are_explained() {
    let seeds = repo().join("config/tests/fixtures/seeds");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tagway.toml");
    let check = |file: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[entryPoints.web]\naddress = \":0\"\n[providers.file]\nfilename = \"{}\"\n",
                seeds.join(file).display()
            ),
        )
        .unwrap();
        let out = tagway(&["check", "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        text(&out.stderr)
    };
    let f = seeds.join("services-reference.termination-delay.toml");
    let err = check("services-reference.termination-delay.toml");
    assert!(err.contains(&format!("error: {}:4:31: invalid TOML: duplicate key; `[[tcp.services.my-service.loadBalancer]]` declares a list of tables, but `tcp.services.my-service.loadBalancer` is a single table (declared with `[tcp.services.my-service.loadBalancer]` on line 3)", f.display())), "{err}");

    let f = seeds.join("services-reference.weighted.toml");
    let err = check("services-reference.weighted.toml");
    assert!(err.contains(&format!("error: {}:14:9: service `appv1@file` (provider file), key `loadBalancer.servers[0].address`: `private-ip-server-1:8080/` has a non-numeric port `8080/`: write host:port, e.g. `10.0.0.1:8080` or `db.example.com:5432` (no scheme, no path)", f.display())), "{err}");

    let f = seeds.join("serverstransport-tcp.transport.yaml");
    let err = check("serverstransport-tcp.transport.yaml");
    assert!(err.contains(&format!("error: {}:9:9: serversTransport `mytransport@file` (provider file), key `tls.certificates`: `tls.certificates` cannot be used with `spiffe`: a transport with `spiffe` presents the gateway's SPIFFE SVID as its client certificate", f.display())), "{err}");
}

#[test]
fn missing_config_file() {
    let out = tagway(&["check", "--config", "/nonexistent/tagway.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("error: cannot read /nonexistent/tagway.toml"));
}
