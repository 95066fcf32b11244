//! `tagway tags`, run as the built binary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn tags(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tagway"))
        .arg("tags")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn prints_the_configuration_as_json() {
    let out = tags(
        &[
            "traefik.enable=true",
            "traefik.consulcatalog.connect=true",
            "traefik.tcp.routers.db.rule=HostSNI(`db.example.com`)",
            "traefik.tcp.routers.db.tls.passthrough=true",
            "traefik.tcp.routers.db.service=db",
            "traefik.tcp.routers.db.entrypoints=pg",
            "traefik.tcp.services.db.loadbalancer.server.port=5432",
            "traefik.tcp.services.db.loadbalancer.server.weight=10",
            "traefik.tcp.services.db.loadbalancer.serverstransport=mtls@file",
            "traefik.tcp.services.split.weighted.services[0].name=db",
            "traefik.tcp.services.split.weighted.services[1].name=legacy@file",
            "traefik.tcp.services.split.weighted.services[1].weight=0",
            "unrelated-tag",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = serde_json::json!({
        "enable": true,
        "consulCatalog": { "connect": true },
        "tcp": {
            "routers": {
                "db": {
                    "entryPoints": ["pg"],
                    "rule": "HostSNI(`db.example.com`)",
                    "service": "db",
                    "tls": { "passthrough": true }
                }
            },
            "services": {
                "db": { "loadBalancer": {
                    "server": { "port": "5432", "weight": 10 },
                    "serversTransport": "mtls@file"
                } },
                "split": { "weighted": { "services": [
                    { "name": "db" },
                    { "name": "legacy@file", "weight": 0 }
                ] } }
            }
        }
    });
    assert_eq!(v, expected);
}

#[test]
fn reads_tags_from_stdin_with_a_prefix() {
    let out = tags(
        &["--prefix", "tagway"],
        Some(
            "tagway.tcp.routers.r.rule=HostSNI(`*`)\n\ntagway.tcp.routers.r.service=s\ntraefik.tcp.routers.x.rule=ignored\ntagway.tcp.services.s.loadbalancer.server.port=80\n",
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tcp"]["routers"]["r"]["service"], "s");
    assert!(v["tcp"]["routers"].get("x").is_none());
}

#[test]
fn errors_name_the_tag_and_exit_non_zero() {
    let out = tags(
        &[
            "traefik.tcp.routers.r.rule=HostSNI(`a`) ||",
            "traefik.tcp.routers.r.service=s",
            "traefik.tcp.routers.r.tls=true",
            "traefik.tcp.routers.r.colour=blue",
            "traefik.tcp.services.s.loadbalancer.server.port=80",
            "traefik.tcp.middlewares.m.ipallowlist.sourcerange=10.0.0.0/8,nope",
            "traefik.tcp.serverstransports.t.dialtimeout=10 seconds",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    for line in [
        "error: tag `traefik.tcp.routers.r.colour=blue`: tcp.routers.r.colour: unknown key `colour`: expected `entryPoints`, `rule`, `priority`, `service`, `middlewares` or `tls`",
        "error: tag `traefik.tcp.serverstransports.t.dialtimeout=10 seconds`: tcp.serversTransports.t.dialTimeout: invalid duration \"10 seconds\"",
        "error: tag `traefik.tcp.routers.r.rule=HostSNI(`a`) ||`: router `r@consulcatalog` (provider consulcatalog), key `rule`: invalid rule `HostSNI(`a`) ||` at column 16: expected a matcher (HostSNI, HostSNIRegexp, ClientIP, ALPN), `!` or `(`, found the end of the rule",
        "error: tag `traefik.tcp.middlewares.m.ipallowlist.sourcerange=10.0.0.0/8,nope`: middleware `m@consulcatalog` (provider consulcatalog), key `ipAllowList.sourceRange[1]`: `nope` is neither an IP address nor a CIDR range",
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(line)),
            "missing {line}\n{err}"
        );
    }
}

#[test]
fn http_tags_are_warnings() {
    let out = tags(&["traefik.http.routers.r.rule=Host(`a`)"], None);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains(
        "warning: tag `traefik.http.routers.r.rule=Host(`a`)`: traefik.http.routers.r.rule: ignored"
    ));
}
