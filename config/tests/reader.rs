//! The TOML/YAML readers and the case-insensitive deserializer.

use std::path::Path;

use tagway_config::*;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn err_text(r: Result<Dynamic, ConfigError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn keys_are_case_insensitive_and_names_keep_their_case() {
    for key in ["rootcas", "ROOTCAS", "rootCAs", "RootCas"] {
        let text = format!(
            "[tcp.serversTransports.T1.tls]\nservername = \"a\"\n{key} = [\"/ca.pem\"]\nINSECURESKIPVERIFY = true\n[tcp.services.Service01.LOADBALANCER]\nServersTransport = \"T1\"\n"
        );
        let d = load_dynamic_str(&text, Format::Toml, "t").unwrap();
        let tls = d.tcp.servers_transports["T1"].tls.as_ref().unwrap();
        assert_eq!(tls.root_cas, vec![FileOrContent::from("/ca.pem")], "{key}");
        assert_eq!(tls.server_name.as_deref(), Some("a"));
        assert!(tls.insecure_skip_verify);
        let lb = d.tcp.services["Service01"].load_balancer.as_ref().unwrap();
        assert_eq!(lb.servers_transport.as_deref(), Some("T1"));
    }
}

#[test]
fn unknown_key_names_key_path_and_line() {
    let text = "tcp:\n  serversTransports:\n    mytransport:\n      tls:\n        serverName: a\n        foo: 1\n";
    let e = err_text(load_dynamic_str(text, Format::Yaml, "dyn.yaml"));
    assert!(e.contains("dyn.yaml:6:9"), "{e}");
    assert!(
        e.contains("tcp.serversTransports.mytransport.tls.foo"),
        "{e}"
    );
    assert!(e.contains("unknown key `foo`"), "{e}");
    assert!(e.contains("`serverName`"), "{e}");

    let text = "[tcp.serversTransports.mytransport.tls]\nserverName = \"a\"\nfoo = 1\n";
    let e = err_text(load_dynamic_str(text, Format::Toml, "dyn.toml"));
    assert!(e.contains("dyn.toml:3:1"), "{e}");
    assert!(
        e.contains("tcp.serversTransports.mytransport.tls.foo"),
        "{e}"
    );
}

#[test]
fn every_error_of_a_file_is_reported() {
    let text = "[tcp.routers.a]\nfoo = 1\n[tcp.routers.b]\nbar = 2\n[tcp.serversTransports.t]\ndialTimeout = \"10x\"\n";
    let e = load_dynamic_str(text, Format::Toml, "d.toml").unwrap_err();
    let all: Vec<String> = e.flatten().iter().map(ToString::to_string).collect();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all[0].contains("d.toml:2:1: tcp.routers.a.foo"), "{all:?}");
    assert!(all[1].contains("d.toml:4:1: tcp.routers.b.bar"), "{all:?}");
    assert!(
        all[2].contains("d.toml:6:15: tcp.serversTransports.t.dialTimeout"),
        "{all:?}"
    );
    assert!(all[2].contains("\"10x\""), "{all:?}");
}

#[test]
fn bad_duration_names_the_key() {
    let e = err_text(load_dynamic_str(
        "tcp:\n  serversTransports:\n    t:\n      terminationDelay: soon\n",
        Format::Yaml,
        "x.yaml",
    ));
    assert!(
        e.contains("x.yaml:4:25: tcp.serversTransports.t.terminationDelay"),
        "{e}"
    );
    assert!(e.contains("invalid duration \"soon\""), "{e}");
}

#[test]
fn empty_sections_enable_with_defaults() {
    let yaml = "tcp:\n  serversTransports:\n    a:\n      tls:\n        serverName: x\n      spiffe:\n      proxyProtocol: {}\n    b:\n      dialTimeout: 5\n";
    let d = load_dynamic_str(yaml, Format::Yaml, "y").unwrap();
    let a = &d.tcp.servers_transports["a"];
    assert_eq!(a.spiffe, Some(Spiffe::default()));
    assert_eq!(
        a.proxy_protocol,
        Some(ProxyProtocol {
            version: 2,
            ..Default::default()
        })
    );
    assert_eq!(a.dial_timeout, Duration::from_secs(30));
    assert_eq!(a.termination_delay, Duration::from_millis(100));
    let b = &d.tcp.servers_transports["b"];
    assert_eq!(b.tls, None);
    assert_eq!(b.spiffe, None);
    assert_eq!(b.dial_timeout, Duration::from_secs(5));

    let toml = "[tcp.serversTransports.a.tls]\n[tcp.serversTransports.a.spiffe]\n[tcp.serversTransports.a.proxyProtocol]\n";
    let d = load_dynamic_str(toml, Format::Toml, "t").unwrap();
    let a = &d.tcp.servers_transports["a"];
    assert_eq!(a.tls, Some(TransportTls::default()));
    assert_eq!(a.spiffe, Some(Spiffe::default()));
    assert_eq!(
        a.proxy_protocol,
        Some(ProxyProtocol {
            version: 2,
            ..Default::default()
        })
    );

    let yaml = "tcp:\n  serversTransports:\n    a:\n      tls:\n";
    let d = load_dynamic_str(yaml, Format::Yaml, "y").unwrap();
    assert_eq!(
        d.tcp.servers_transports["a"].tls,
        Some(TransportTls::default())
    );
}

#[test]
fn strings_read_as_bools_and_integers_like_traefik() {
    let yaml = "tcp:\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - address: \"a:1\"\n            weight: \"3\"\n            tls: \"true\"\n        terminationDelay: \"200\"\n";
    let d = load_dynamic_str(yaml, Format::Yaml, "y").unwrap();
    let lb = d.tcp.services["s"].load_balancer.as_ref().unwrap();
    assert_eq!(lb.servers[0].weight, Some(3));
    assert!(lb.servers[0].tls);
    assert_eq!(lb.termination_delay, Some(200));
    let e = err_text(load_dynamic_str(
        "tcp:\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - address: a:1\n            tls: yes\n",
        Format::Yaml,
        "y",
    ));
    assert!(
        e.contains("tcp.services.s.loadBalancer.servers[0].tls"),
        "{e}"
    );
    assert!(e.contains("expected true or false, found `yes`"), "{e}");
}

#[test]
fn http_and_udp_sections_are_ignored_with_a_warning() {
    let toml = "[http.routers.r]\nrule = \"Host(`a`)\"\n[udp.services.u.loadBalancer]\n[tcp.routers.r]\nservice = \"s\"\n";
    let d = load_dynamic_str(toml, Format::Toml, "t.toml").unwrap();
    assert_eq!(d.tcp.routers["r"].service, "s");
    let w: Vec<String> = d.meta.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].starts_with("t.toml:1:2: http: ignored"), "{w:?}");
    assert!(w[1].contains("udp: ignored"), "{w:?}");
}

#[test]
fn origins_are_recorded_per_key() {
    let yaml = "tcp:\n  routers:\n    r:\n      service: s\n      rule: HostSNI(`*`)\n";
    let d = load_dynamic_str(yaml, Format::Yaml, "o.yaml").unwrap();
    assert_eq!(
        d.meta.origin("tcp.routers.r.rule").unwrap().to_string(),
        "o.yaml:5:7"
    );
    assert_eq!(
        d.meta.origin("tcp.routers.r.service").unwrap().to_string(),
        "o.yaml:4:7"
    );
    assert_eq!(
        d.meta
            .origin("tcp.routers.r.middlewares")
            .unwrap()
            .to_string(),
        "o.yaml:3:5"
    );
}

#[test]
fn relative_paths_resolve_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("conf");
    std::fs::create_dir(&sub).unwrap();
    let p = write(
        &sub,
        "d.toml",
        "[tcp.serversTransports.t.tls]\nserverName = \"a\"\ncertificates = [\"c.pem\", { certFile = \"/abs/c.pem\", keyFile = \"k.pem\" }]\nrootCAs = [\"ca.pem\", \"-----BEGIN CERTIFICATE-----\\nx\\n-----END CERTIFICATE-----\"]\n[[tls.certificates]]\ncertFile = \"srv.pem\"\nkeyFile = \"srv.key\"\n",
    );
    let d = load_dynamic_file(&p).unwrap();
    let tls = d.tcp.servers_transports["t"].tls.as_ref().unwrap();
    assert_eq!(
        tls.certificates[0],
        ClientCertificate::Bundle(sub.join("c.pem").into())
    );
    assert_eq!(
        tls.certificates[1],
        ClientCertificate::Pair {
            cert_file: "/abs/c.pem".into(),
            key_file: sub.join("k.pem").into()
        }
    );
    assert_eq!(tls.root_cas[0], sub.join("ca.pem").into());
    assert!(tls.root_cas[1].is_inline());
    assert_eq!(d.tls.certificates[0].cert_file, sub.join("srv.pem").into());
    assert_eq!(d.tls.certificates[0].key_file, sub.join("srv.key").into());

    let st = write(
        &sub,
        "tagway.yaml",
        "providers:\n  file:\n    directory: dynamic\n  spiffe:\n    certificate: svid.pem\n    key: svid.key\n    bundle: bundle.pem\n",
    );
    let st = load_static(&st).unwrap();
    let f = st.providers.file.unwrap();
    assert_eq!(f.directory, Some(sub.join("dynamic")));
    assert!(f.watch);
    assert_eq!(
        st.providers.spiffe.unwrap().bundle,
        Some(sub.join("bundle.pem"))
    );
}

#[test]
fn toml_array_of_tables_mistake_gets_a_hint() {
    let toml = "[tcp.services]\n  [tcp.services.my-service.loadBalancer]\n    [[tcp.services.my-service.loadBalancer]]\n      terminationDelay = 200\n";
    let e = err_text(load_dynamic_str(toml, Format::Toml, "s.toml"));
    assert!(e.starts_with("s.toml:3:"), "{e}");
    assert!(e.contains("invalid TOML"), "{e}");
    assert!(
        e.contains("declared with `[tcp.services.my-service.loadBalancer]` on line 2"),
        "{e}"
    );
    assert!(
        e.contains("remove the `[[tcp.services.my-service.loadBalancer]]` line"),
        "{e}"
    );
}

#[test]
fn yaml_syntax_errors_have_a_line() {
    let e = err_text(load_dynamic_str(
        "tcp:\n  routers: [a\n",
        Format::Yaml,
        "b.yaml",
    ));
    assert!(e.starts_with("b.yaml:"), "{e}");
    assert!(e.contains("invalid YAML"), "{e}");
}

#[test]
fn yaml_anchors_and_aliases() {
    let yaml = "tcp:\n  serversTransports:\n    a: &t\n      dialTimeout: 5s\n    b: *t\n";
    let d = load_dynamic_str(yaml, Format::Yaml, "y").unwrap();
    assert_eq!(
        d.tcp.servers_transports["b"].dial_timeout,
        Duration::from_secs(5)
    );
}

#[test]
fn yaml_merge_keys_like_go_yaml() {
    // Explicit keys win over merged ones; among merged mappings the first one wins.
    let yaml = "\
tcp:
  serversTransports:
    base: &base
      dialTimeout: 5s
      dialKeepAlive: 7s
      terminationDelay: 1s
    more: &more
      dialTimeout: 9s
      terminationDelay: 2s
    a:
      <<: *base
      dialKeepAlive: 3s
    b:
      <<: [*more, *base]
";
    let d = load_dynamic_str(yaml, Format::Yaml, "y").unwrap();
    let a = &d.tcp.servers_transports["a"];
    assert_eq!(a.dial_timeout, Duration::from_secs(5));
    assert_eq!(a.dial_keep_alive, Duration::from_secs(3));
    assert_eq!(a.termination_delay, Duration::from_secs(1));
    let b = &d.tcp.servers_transports["b"];
    assert_eq!(b.dial_timeout, Duration::from_secs(9));
    assert_eq!(b.dial_keep_alive, Duration::from_secs(7));
    assert_eq!(b.termination_delay, Duration::from_secs(2));

    let e = err_text(load_dynamic_str(
        "tcp:\n  serversTransports:\n    a:\n      <<: 5s\n",
        Format::Yaml,
        "m.yaml",
    ));
    assert!(e.contains("m.yaml:4") && e.contains("merge key"), "{e}");
}

#[test]
fn server_template_is_rejected_in_files() {
    let e = err_text(load_dynamic_str(
        "[tcp.services.s.loadBalancer.server]\nport = \"80\"\n",
        Format::Toml,
        "f.toml",
    ));
    assert!(e.contains("tcp.services.s.loadBalancer.server"), "{e}");
    assert!(e.contains("only valid in tags"), "{e}");
}

#[test]
fn unknown_extension_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "a.json", "{}");
    assert!(matches!(
        load_dynamic_file(&p),
        Err(ConfigError::UnknownFormat { .. })
    ));
    let e = load_dynamic_file(&dir.path().join("none.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }));
    assert!(e.to_string().contains("none.toml"));
}

#[test]
fn yaml_tree_matches_serde_norway() {
    // Cross-check our event reader against serde_norway on a file with every scalar style.
    let yaml = "a: 1\nb: \"2\"\nc: [x, 'y', true, ~, 1.5]\nd:\n  e: |\n    line\n  f: >-\n    folded\n    text\n";
    let expected: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
    let d: serde_json::Value = serde_json::to_value(&expected).unwrap();
    assert_eq!(d["d"]["e"], "line\n");
    assert_eq!(d["d"]["f"], "folded text");
    // Our reader must yield the same strings where a string is asked for.
    let text = "tcp:\n  routers:\n    r:\n      rule: |\n        HostSNI(`a`)\n      service: >-\n        folded\n        text\n";
    let ours = load_dynamic_str(text, Format::Yaml, "y").unwrap();
    let theirs: serde_norway::Value = serde_norway::from_str(text).unwrap();
    assert_eq!(
        ours.tcp.routers["r"].rule,
        theirs["tcp"]["routers"]["r"]["rule"].as_str().unwrap()
    );
    assert_eq!(
        ours.tcp.routers["r"].service,
        theirs["tcp"]["routers"]["r"]["service"].as_str().unwrap()
    );
}
