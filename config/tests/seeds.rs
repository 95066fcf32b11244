//! Seed fidelity: every TCP configuration example of the Traefik documents in `shared/seeds/` is
//! checked in verbatim under `tests/fixtures/seeds/` (one file per example, named after the seed
//! and the section). Valid examples are asserted field by field; the wrong ones must give the
//! exact error `tagway check` prints (file, line, why, how to fix).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tagway_config::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/seeds")
        .join(name)
}

fn load(name: &str) -> Dynamic {
    load_dynamic_file(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The errors `tagway check` prints for one file of the file provider.
fn check(names: &[&str]) -> Vec<String> {
    let mut merged_parts = Vec::new();
    let mut errors = Vec::new();
    for n in names {
        match load_dynamic_file(&fixture(n)) {
            Ok(d) => merged_parts.push(d),
            Err(e) => errors.extend(e.flatten().iter().map(ToString::to_string)),
        }
    }
    let mut one = Dynamic::default();
    for d in merged_parts {
        one.tcp.routers.extend(d.tcp.routers);
        one.tcp.services.extend(d.tcp.services);
        one.tcp.servers_transports.extend(d.tcp.servers_transports);
        one.tcp.middlewares.extend(d.tcp.middlewares);
        one.meta.extend(d.meta);
    }
    let v = validate_without_static(&merge(&[("file", &one)]));
    errors.extend(v.errors.iter().map(ToString::to_string));
    let dir = fixture("");
    errors
        .into_iter()
        .map(|e| e.replace(&dir.display().to_string(), ""))
        .collect()
}

fn assert_seed_transport(d: &Dynamic) {
    let t = &d.tcp.servers_transports["mytransport"];
    assert_eq!(t.dial_timeout, Duration::from_secs(30));
    assert_eq!(t.dial_keep_alive, Duration::from_secs(20));
    assert_eq!(t.termination_delay, Duration::from_millis(200));
    assert_eq!(t.proxy_protocol, None);
    let tls = t.tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("example.com"));
    assert_eq!(
        tls.certificates,
        [
            ClientCertificate::Bundle("/path/to/cert1.pem".into()),
            ClientCertificate::Bundle("/path/to/cert2.pem".into())
        ]
    );
    assert!(tls.insecure_skip_verify);
    assert_eq!(tls.root_cas, [FileOrContent::from("/path/to/rootca.pem")]);
    assert_eq!(
        tls.peer_cert_uri.as_deref(),
        Some("spiffe://example.org/peer")
    );
    let sp = t.spiffe.as_ref().unwrap();
    assert_eq!(
        sp.ids,
        ["spiffe://example.org/id1", "spiffe://example.org/id2"]
    );
    assert_eq!(sp.trust_domain.as_deref(), Some("example.org"));
}

fn transport_errors(file: &str, lines: [(u32, u32); 6]) -> Vec<String> {
    let at = |i: usize| format!("{file}:{}:{}", lines[i].0, lines[i].1);
    vec![
        format!(
            "{}: serversTransport `mytransport@file` (provider file), key `tls.certificates`: `tls.certificates` cannot be used with `spiffe`: a transport with `spiffe` presents the gateway's SPIFFE SVID as its client certificate, so static client certificates cannot also be presented; remove `tls.certificates` (the SVID comes from `providers.spiffe`), or remove `spiffe` to present these certificates with regular TLS verification",
            at(0)
        ),
        format!(
            "{}: serversTransport `mytransport@file` (provider file), key `tls.insecureSkipVerify`: `insecureSkipVerify = true` skips the verification of the server's certificate that `tls.peerCertURI` and `spiffe` rely on, so the server's identity would never be checked; remove `insecureSkipVerify`",
            at(1)
        ),
        format!(
            "{}: serversTransport `mytransport@file` (provider file), key `tls.peerCertURI`: `tls.peerCertURI` cannot be used with `spiffe`: both check the server's URI SAN; with spiffe, list the allowed IDs in `spiffe.ids`",
            at(2)
        ),
        format!(
            "{}: serversTransport `mytransport@file` (provider file), key `tls.certificates`: certificate file `/path/to/cert1.pem` does not exist",
            at(3)
        ),
        format!(
            "{}: serversTransport `mytransport@file` (provider file), key `tls.certificates`: certificate file `/path/to/cert2.pem` does not exist",
            at(4)
        ),
        format!(
            "{}: serversTransport `mytransport@file` (provider file), key `tls.rootCAs`: root CA file `/path/to/rootca.pem` does not exist",
            at(5)
        ),
    ]
}

#[test]
fn serverstransport_yaml() {
    assert_seed_transport(&load("serverstransport-tcp.transport.yaml"));
    assert_eq!(
        check(&["serverstransport-tcp.transport.yaml"]),
        transport_errors(
            "serverstransport-tcp.transport.yaml",
            [(9, 9), (12, 9), (15, 9), (9, 9), (9, 9), (13, 9)]
        )
    );
}

#[test]
fn serverstransport_toml() {
    assert_seed_transport(&load("serverstransport-tcp.transport.toml"));
    assert_eq!(
        check(&["serverstransport-tcp.transport.toml"]),
        transport_errors(
            "serverstransport-tcp.transport.toml",
            [(8, 5), (9, 5), (11, 5), (8, 5), (8, 5), (10, 5)]
        )
    );
}

#[test]
fn serverstransport_attach() {
    for name in [
        "serverstransport-tcp.attach.yaml",
        "serverstransport-tcp.attach.toml",
    ] {
        let d = load(name);
        assert_eq!(d.tcp.services.len(), 1);
        let lb = d.tcp.services["Service01"].load_balancer.as_ref().unwrap();
        assert_eq!(lb.servers_transport.as_deref(), Some("mytransport"));
        assert!(lb.servers.is_empty());
        assert_eq!(lb.health_check, None);
        // Alone, the reference dangles.
        let errs = check(&[name]);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].ends_with("service `Service01@file` (provider file), key `loadBalancer.serversTransport`: serversTransport `mytransport@file` does not exist"),
            "{errs:#?}"
        );
    }
    // With the seed's transport, which is itself invalid, the service is disabled with it.
    let errs = check(&[
        "serverstransport-tcp.transport.yaml",
        "serverstransport-tcp.attach.yaml",
    ]);
    assert_eq!(
        errs.last().unwrap(),
        "serverstransport-tcp.attach.yaml:5:9: service `Service01@file` (provider file), key `loadBalancer.serversTransport`: serversTransport `mytransport@file` is invalid (see its error)"
    );
}

fn assert_seed_tags(tags: &[String]) {
    let d = tags::decode("traefik", tags);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.enable, None);
    let lb = d.config.tcp.services["Service01"]
        .load_balancer
        .as_ref()
        .unwrap();
    assert_eq!(lb.servers_transport.as_deref(), Some("mytransport"));
    let v = validate_without_static(&merge(&[("consulcatalog", &d.config)]));
    assert_eq!(
        v.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "tag `traefik.tcp.services.Service01.loadBalancer.serversTransport=mytransport`: service `Service01@consulcatalog` (provider consulcatalog), key `loadBalancer.serversTransport`: serversTransport `mytransport@consulcatalog` does not exist"
        ]
    );
}

#[test]
fn serverstransport_tags_and_labels() {
    // The Tags example is JSON with a `// ...` placeholder line.
    let text = std::fs::read_to_string(fixture("serverstransport-tcp.tags.json")).unwrap();
    let json: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    #[derive(serde::Deserialize)]
    struct Svc {
        #[serde(rename = "Tags")]
        tags: Vec<String>,
    }
    let svc: Svc = serde_json::from_str(&json).unwrap();
    assert_seed_tags(&svc.tags);

    #[derive(serde::Deserialize)]
    struct Labels {
        labels: Vec<String>,
    }
    let text = std::fs::read_to_string(fixture("serverstransport-tcp.labels.yaml")).unwrap();
    let l: Labels = from_str(&text, Format::Yaml, "labels.yaml").unwrap();
    assert_seed_tags(&l.labels);
}

#[test]
fn serverstransport_crd_spec() {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Crd {
        api_version: String,
        kind: String,
        metadata: BTreeMap<String, String>,
        spec: ServersTransport,
    }
    let text =
        std::fs::read_to_string(fixture("serverstransport-tcp-crd.serverstransporttcp.yaml"))
            .unwrap();
    let crd: Crd = from_str(&text, Format::Yaml, "crd.yaml").unwrap();
    assert_eq!(crd.api_version, "traefik.io/v1alpha1");
    assert_eq!(crd.kind, "ServersTransportTCP");
    assert_eq!(crd.metadata["name"], "mytransport");
    assert_eq!(crd.metadata["namespace"], "default");
    let t = crd.spec;
    assert_eq!(t.dial_timeout, ServersTransport::DEFAULT_DIAL_TIMEOUT);
    assert_eq!(t.dial_keep_alive, ServersTransport::DEFAULT_DIAL_KEEP_ALIVE);
    assert_eq!(
        t.termination_delay,
        ServersTransport::DEFAULT_TERMINATION_DELAY
    );
    let tls = t.tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("example.org"));
    assert!(tls.insecure_skip_verify);
    assert!(tls.certificates.is_empty() && tls.root_cas.is_empty() && tls.peer_cert_uri.is_none());
    assert_eq!(t.spiffe, None);
}

fn addresses(d: &Dynamic, svc: &str) -> Vec<String> {
    d.tcp.services[svc]
        .load_balancer
        .as_ref()
        .unwrap()
        .servers
        .iter()
        .map(|s| s.address.clone())
        .collect()
}

#[test]
fn placeholder_addresses_are_rejected_with_the_fix() {
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(u32, u32)]);
    let cases: [Case<'_>; 6] = [
        (
            "services-reference.two-servers.yaml",
            &[
                "<private-ip-server-1>:<private-port-server-1>",
                "<private-ip-server-2>:<private-port-server-2>",
            ],
            &[(6, 11), (7, 11)],
        ),
        (
            "services-reference.two-servers.toml",
            &[
                "<private-ip-server-1>:<private-port-server-1>",
                "<private-ip-server-2>:<private-port-server-2>",
            ],
            &[(5, 8), (7, 8)],
        ),
        (
            "services-reference.lb-two-servers.yaml",
            &["xx.xx.xx.xx:xx", "xx.xx.xx.xx:xx"],
            &[(7, 11), (8, 11)],
        ),
        (
            "services-reference.lb-two-servers.toml",
            &["xx.xx.xx.xx:xx", "xx.xx.xx.xx:xx"],
            &[(5, 7), (7, 8)],
        ),
        (
            "services-reference.one-server.yaml",
            &["xx.xx.xx.xx:xx"],
            &[(7, 13)],
        ),
        (
            "services-reference.one-server.toml",
            &["xx.xx.xx.xx:xx"],
            &[(5, 7)],
        ),
    ];
    for (name, addrs, lines) in cases {
        let d = load(name);
        assert_eq!(addresses(&d, "my-service"), addrs.to_vec(), "{name}");
        let lb = d.tcp.services["my-service"].load_balancer.as_ref().unwrap();
        assert!(lb.servers.iter().all(|s| s.weight.is_none() && !s.tls));
        let expected: Vec<String> = addrs
            .iter()
            .zip(lines)
            .enumerate()
            .map(|(i, (a, (l, c)))| {
                let port = a.rsplit_once(':').unwrap().1;
                format!("{name}:{l}:{c}: service `my-service@file` (provider file), key `loadBalancer.servers[{i}].address`: `{a}` has a non-numeric port `{port}`: write host:port, e.g. `10.0.0.1:8080` or `db.example.com:5432` (no scheme, no path)")
            })
            .collect();
        assert_eq!(check(&[name]), expected, "{name}");
    }
}

#[test]
fn proxy_protocol_v1() {
    for name in [
        "services-reference.proxy-protocol.yaml",
        "services-reference.proxy-protocol.toml",
    ] {
        let d = load(name);
        let lb = d.tcp.services["my-service"].load_balancer.as_ref().unwrap();
        assert_eq!(
            lb.proxy_protocol,
            Some(ProxyProtocol {
                version: 1,
                ..Default::default()
            })
        );
        assert!(lb.servers.is_empty());
        assert_eq!(lb.termination_delay, None);
        assert!(check(&[name]).is_empty(), "{name}");
    }
}

#[test]
fn termination_delay() {
    let d = load("services-reference.termination-delay.yaml");
    let lb = d.tcp.services["my-service"].load_balancer.as_ref().unwrap();
    assert_eq!(lb.termination_delay, Some(200));
    assert!(check(&["services-reference.termination-delay.yaml"]).is_empty());
    // The TOML tab declares the load balancer as a table, then as an array of tables.
    assert_eq!(
        check(&["services-reference.termination-delay.toml"]),
        [
            "services-reference.termination-delay.toml:4:31: invalid TOML: duplicate key; `[[tcp.services.my-service.loadBalancer]]` declares a list of tables, but `tcp.services.my-service.loadBalancer` is a single table (declared with `[tcp.services.my-service.loadBalancer]` on line 3); `loadBalancer` is not a list: remove the `[[tcp.services.my-service.loadBalancer]]` line and put its keys under `[tcp.services.my-service.loadBalancer]`"
        ]
    );
}

#[test]
fn weighted() {
    let d = load("services-reference.weighted.yaml");
    let w = d.tcp.services["app"].weighted.as_ref().unwrap();
    assert_eq!(
        w.services,
        [
            WeightedService {
                name: "appv1".into(),
                weight: Some(3)
            },
            WeightedService {
                name: "appv2".into(),
                weight: Some(1)
            }
        ]
    );
    assert_eq!(addresses(&d, "appv1"), ["xxx.xxx.xxx.xxx:8080"]);
    assert_eq!(addresses(&d, "appv2"), ["xxx.xxx.xxx.xxx:8080"]);
    assert!(check(&["services-reference.weighted.yaml"]).is_empty());

    let d = load("services-reference.weighted.toml");
    let w = d.tcp.services["app"].weighted.as_ref().unwrap();
    assert_eq!(w.services[0].name, "appv1");
    assert_eq!(w.services[0].weight(), 3);
    assert_eq!(w.services[1].name, "appv2");
    assert_eq!(w.services[1].weight(), 1);
    assert_eq!(addresses(&d, "appv1"), ["private-ip-server-1:8080/"]);
    assert_eq!(addresses(&d, "appv2"), ["private-ip-server-2:8080/"]);
    let n = "services-reference.weighted.toml";
    assert_eq!(
        check(&[n]),
        [
            format!(
                "{n}:14:9: service `appv1@file` (provider file), key `loadBalancer.servers[0].address`: `private-ip-server-1:8080/` has a non-numeric port `8080/`: write host:port, e.g. `10.0.0.1:8080` or `db.example.com:5432` (no scheme, no path)"
            ),
            format!(
                "{n}:19:9: service `appv2@file` (provider file), key `loadBalancer.servers[0].address`: `private-ip-server-2:8080/` has a non-numeric port `8080/`: write host:port, e.g. `10.0.0.1:8080` or `db.example.com:5432` (no scheme, no path)"
            ),
            format!(
                "{n}:5:7: service `app@file` (provider file), key `weighted.services[0].name`: service `appv1@file` is invalid (see its error)"
            ),
        ]
    );
}

#[test]
fn tcp_guide_static_entry_points() {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ConfigMap {
        api_version: String,
        kind: String,
        metadata: BTreeMap<String, String>,
        data: BTreeMap<String, String>,
    }
    let text =
        std::fs::read_to_string(fixture("tcp-services-guide.entrypoints-configmap.yaml")).unwrap();
    let cm: ConfigMap = from_str(&text, Format::Yaml, "configmap.yaml").unwrap();
    assert_eq!(
        (cm.api_version.as_str(), cm.kind.as_str()),
        ("v1", "ConfigMap")
    );
    assert_eq!(cm.metadata["name"], "traefik-config");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("traefik.yaml");
    std::fs::write(&path, &cm.data["traefik.yaml"]).unwrap();
    let e = load_static(&path).unwrap_err().to_string();
    assert_eq!(
        e.replace(&path.display().to_string(), "traefik.yaml"),
        "traefik.yaml:21:3: providers.kubernetesCRD: unknown key `kubernetesCRD`: expected `file`, `consulCatalog` or `spiffe`"
    );
    // Without the Kubernetes provider, every entry point reads as written.
    std::fs::write(
        &path,
        cm.data["traefik.yaml"].replace("  kubernetesCRD: {}", "  file:\n    directory: dynamic"),
    )
    .unwrap();
    let st = load_static(&path).unwrap();
    let eps: Vec<(&str, &str)> = st
        .entry_points
        .iter()
        .map(|(k, v)| (k.as_str(), v.address.as_str()))
        .collect();
    assert_eq!(
        eps,
        [
            ("mysql", ":3306"),
            ("postgres", ":5432"),
            ("redis", ":6379"),
            ("tcp-generic", ":9000"),
            ("web", ":80"),
            ("websecure", ":443")
        ]
    );
    assert!(
        st.entry_points
            .values()
            .all(|e| e.proxy_protocol.is_none() && e.max_connections.is_none())
    );
}
