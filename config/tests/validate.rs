//! Merge and validation: references, qualified names, conflicts, values; broken resources
//! disable themselves and what references them, nothing else.

use tagway_config::*;

fn static_with(eps: &[&str]) -> StaticConfig {
    let mut st = StaticConfig::default();
    for e in eps {
        st.entry_points.insert(
            (*e).to_owned(),
            EntryPoint {
                address: "127.0.0.1:0".into(),
                ..Default::default()
            },
        );
    }
    st
}

fn file(text: &str) -> Dynamic {
    load_dynamic_str(text, Format::Toml, "dyn.toml").unwrap()
}

fn errors_of(v: &Validated) -> Vec<String> {
    v.errors.iter().map(ToString::to_string).collect()
}

#[test]
fn dangling_references_disable_only_what_references_them() {
    let d = file(
        r#"
[tcp.routers.good]
rule = "HostSNI(`*`)"
service = "app"
[tcp.routers.bad]
rule = "HostSNI(`*`)"
service = "nope"
[tcp.routers.viaweighted]
rule = "HostSNI(`*`)"
service = "split"
[tcp.routers.mw]
rule = "HostSNI(`*`)"
service = "app"
middlewares = ["missing"]
[tcp.services.app.loadBalancer]
servers = [{ address = "127.0.0.1:9000" }]
[tcp.services.split.weighted]
services = [{ name = "app", weight = 3 }, { name = "ghost", weight = 1 }]
[tcp.services.t.loadBalancer]
serversTransport = "none"
"#,
    );
    let merged = merge(&[("file", &d)]);
    let v = validate(&merged, &static_with(&["web"]));
    let errs = errors_of(&v);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(errs.iter().any(|e| e
        == "dyn.toml:7:1: router `bad@file` (provider file), key `service`: service `nope@file` does not exist (known: app@file, split@file, t@file)"), "{errs:#?}");
    assert!(errs.iter().any(|e| e.starts_with("dyn.toml:18:45:")
        && e.contains("service `split@file` (provider file), key `weighted.services[1].name`: service `ghost@file` does not exist")), "{errs:#?}");
    assert!(
        errs.iter().any(|e| e.contains("router `viaweighted@file`")
            && e.contains("service `split@file` is invalid")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("router `mw@file`")
            && e.contains("key `middlewares[0]`: middleware `missing@file` does not exist")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("service `t@file`")
            && e.contains("serversTransport `none@file` does not exist")),
        "{errs:#?}"
    );
    let c = &v.config.tcp;
    assert_eq!(c.routers.keys().collect::<Vec<_>>(), ["good@file"]);
    assert_eq!(c.services.keys().collect::<Vec<_>>(), ["app@file"]);
}

#[test]
fn qualified_names_across_providers() {
    let f = file(
        "[tcp.services.app.loadBalancer]\nservers = [{ address = \"10.0.0.1:80\" }]\n[tcp.serversTransports.mtls]\ndialTimeout = \"5s\"\n",
    );
    let tags = tags::decode(
        "traefik",
        &[
            "traefik.tcp.routers.r.rule=HostSNI(`*`)",
            "traefik.tcp.routers.r.service=w",
            "traefik.tcp.services.w.weighted.services[0].name=app@file",
            "traefik.tcp.services.w.weighted.services[1].name=local",
            "traefik.tcp.services.local.loadbalancer.server.port=80",
            "traefik.tcp.services.local.loadbalancer.serverstransport=mtls@file",
            "traefik.tcp.services.def.loadbalancer.serverstransport=default@internal",
        ],
    );
    assert!(tags.errors.is_empty(), "{:?}", tags.errors);
    let merged = merge(&[("file", &f), ("consulcatalog", &tags.config)]);
    assert_eq!(
        merged.tcp.routers["r@consulcatalog"].service,
        "w@consulcatalog"
    );
    let w = merged.tcp.services["w@consulcatalog"]
        .weighted
        .as_ref()
        .unwrap();
    assert_eq!(w.services[0].name, "app@file");
    assert_eq!(w.services[1].name, "local@consulcatalog");
    let lb = merged.tcp.services["def@consulcatalog"]
        .load_balancer
        .as_ref()
        .unwrap();
    assert_eq!(lb.servers_transport.as_deref(), Some("default@internal"));
    let v = validate(&merged, &static_with(&["web"]));
    assert!(v.errors.is_empty(), "{:#?}", errors_of(&v));
    assert_eq!(v.config.tcp.services.len(), 4);
    assert_eq!(
        merged
            .meta
            .origin("tcp.routers.r@consulcatalog.rule")
            .and_then(Origin::as_tag),
        Some("traefik.tcp.routers.r.rule=HostSNI(`*`)")
    );
}

#[test]
fn tag_errors_name_the_tag() {
    let tags = tags::decode(
        "traefik",
        &[
            "traefik.tcp.routers.r.rule=HostSNI(`a`",
            "traefik.tcp.routers.r.service=s",
            "traefik.tcp.services.s.loadbalancer.server.weight=-1",
        ],
    );
    let merged = merge(&[("consulcatalog", &tags.config)]);
    let v = validate_without_static(&merged);
    let errs = errors_of(&v);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs.contains(&"tag `traefik.tcp.routers.r.rule=HostSNI(`a``: router `r@consulcatalog` (provider consulcatalog), key `rule`: invalid rule `HostSNI(`a`` at column 12: expected `,` or `)`, found the end of the rule".to_owned()), "{errs:#?}");
    assert!(
        errs.iter().any(|e| e.starts_with(
            "tag `traefik.tcp.services.s.loadbalancer.server.weight=-1`: service `s@consulcatalog`"
        ) && e.contains("weight -1 is negative")),
        "{errs:#?}"
    );
}

#[test]
fn transport_conflicts_say_why() {
    let d = file(
        r#"
[tcp.serversTransports.both.tls]
serverName = "a"
certificates = ["-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----"]
[tcp.serversTransports.both.spiffe]
[tcp.serversTransports.insecure.tls]
insecureSkipVerify = true
peerCertURI = "spiffe://example.org/x"
[tcp.serversTransports.noname.tls]
[tcp.serversTransports.ok.tls]
serverName = "db"
[tcp.serversTransports.pp.proxyProtocol]
version = 3
[tcp.serversTransports.neg]
dialTimeout = "-1s"
terminationDelay = "-1s"
dialKeepAlive = "-1s"
"#,
    );
    let v = validate(&merge(&[("file", &d)]), &static_with(&[]));
    let errs = errors_of(&v);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(errs.iter().any(|e| e.starts_with("dyn.toml:4:1: serversTransport `both@file` (provider file), key `tls.certificates`: `tls.certificates` cannot be used with `spiffe`: a transport with `spiffe` presents the gateway's SPIFFE SVID as its client certificate, so static client certificates cannot also be presented")), "{errs:#?}");
    assert!(
        errs.iter().any(|e| e.contains("`insecure@file`")
            && e.contains("key `tls.insecureSkipVerify`")
            && e.contains("`tls.peerCertURI`")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("`noname@file`") && e.contains("set `tls.serverName`")),
        "{errs:#?}"
    );
    assert!(errs.iter().any(|e| e.contains("`pp@file`") && e.contains("key `proxyProtocol.version`: PROXY protocol version 3 does not exist: use 1 or 2")), "{errs:#?}");
    assert!(
        errs.iter()
            .any(|e| e.contains("`neg@file`") && e.contains("dialTimeout -1s is negative")),
        "{errs:#?}"
    );
    let kept: Vec<&String> = v.config.tcp.servers_transports.keys().collect();
    assert_eq!(kept, ["ok@file"]);
}

#[test]
fn values_are_checked() {
    let d = file(
        r#"
[tcp.services.neg.loadBalancer]
servers = [{ address = "10.0.0.1:80", weight = -2 }]
[tcp.services.addr.loadBalancer]
servers = [{ address = "private-ip-server-1:8080/" }]
[tcp.services.both.loadBalancer]
[tcp.services.both.weighted]
services = [{ name = "x" }]
[tcp.services.none]
[tcp.services.zero.weighted]
services = [{ name = "ok", weight = 0 }]
[tcp.services.ok.loadBalancer]
servers = [{ address = "10.0.0.1:80", weight = 0 }]
[tcp.services.hc.loadBalancer.healthCheck]
interval = "0s"
[tcp.services.lbpp.loadBalancer.proxyProtocol]
version = 0
[tcp.middlewares.cidr.ipAllowList]
sourceRange = ["10.0.0.0/8", "300.1.1.1"]
[tcp.middlewares.two.ipAllowList]
sourceRange = ["10.0.0.0/8"]
[tcp.middlewares.two.inFlightConn]
amount = 1
[tcp.middlewares.zero.inFlightConn]
amount = 0
[tcp.middlewares.empty]
[tcp.middlewares.fine.ipWhiteList]
sourceRange = ["::1"]
"#,
    );
    let v = validate(&merge(&[("file", &d)]), &static_with(&[]));
    let errs = errors_of(&v);
    let expect = [
        (
            "`neg@file`",
            "key `loadBalancer.servers[0].weight`: weight -2 is negative",
        ),
        (
            "`addr@file`",
            "key `loadBalancer.servers[0].address`: `private-ip-server-1:8080/` has a non-numeric port `8080/`",
        ),
        ("`both@file`", "declares both `loadBalancer` and `weighted`"),
        ("`none@file`", "declares no kind"),
        ("`zero@file`", "every weight is 0"),
        (
            "`hc@file`",
            "key `loadBalancer.healthCheck.interval`: interval must be a positive duration (got 0s)",
        ),
        ("`lbpp@file`", "PROXY protocol version 0 does not exist"),
        (
            "`cidr@file`",
            "key `ipAllowList.sourceRange[1]`: `300.1.1.1` is neither an IP address nor a CIDR",
        ),
        (
            "`two@file`",
            "declares both `ipAllowList` and `inFlightConn`",
        ),
        (
            "`zero@file`",
            "key `inFlightConn.amount`: amount must be greater than 0",
        ),
        ("`empty@file`", "declares no kind"),
    ];
    for (name, needle) in expect {
        assert!(
            errs.iter().any(|e| e.contains(name) && e.contains(needle)),
            "{name} {needle}: {errs:#?}"
        );
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    assert!(v.config.tcp.services.contains_key("ok@file"));
    assert!(v.config.tcp.middlewares.contains_key("fine@file"));
}

#[test]
fn routers_rules_entry_points_and_cycles() {
    let d = file(
        r#"
[tcp.routers.rule]
rule = "HostSNI(`a`) &&"
service = "ok"
[tcp.routers.notls]
rule = "HostSNI(`db.example.com`)"
service = "ok"
[tcp.routers.ep]
entryPoints = ["web", "nope"]
rule = "HostSNI(`*`)"
service = "ok"
[tcp.routers.acme]
rule = "HostSNI(`a`)"
service = "ok"
[tcp.routers.acme.tls]
certResolver = "le"
[tcp.routers.fine]
rule = "HostSNI(`a`)"
service = "ok"
entryPoints = ["web"]
[tcp.routers.fine.tls]
passthrough = true
[tcp.routers.loop]
rule = "HostSNI(`*`)"
service = "a"
[tcp.services.ok.loadBalancer]
servers = [{ address = "10.0.0.1:80" }]
[tcp.services.a.weighted]
services = [{ name = "b" }]
[tcp.services.b.weighted]
services = [{ name = "a" }, { name = "ok" }]
"#,
    );
    let v = validate(&merge(&[("file", &d)]), &static_with(&["web"]));
    let errs = errors_of(&v);
    for (name, needle) in [
        (
            "`rule@file`",
            "key `rule`: invalid rule `HostSNI(`a`) &&` at column 16: expected a matcher",
        ),
        ("`notls@file`", "has no `tls` section"),
        (
            "`ep@file`",
            "key `entryPoints[1]`: entry point `nope` does not exist in the static configuration (known: web)",
        ),
        (
            "`acme@file`",
            "ACME certificate resolvers are not supported",
        ),
        (
            "`a@file`",
            "weighted services form a cycle: a@file → b@file → a@file",
        ),
        (
            "`b@file`",
            "weighted services form a cycle: b@file → a@file → b@file",
        ),
        ("`loop@file`", "service `a@file` is invalid"),
    ] {
        assert!(
            errs.iter().any(|e| e.contains(name) && e.contains(needle)),
            "{name} {needle}: {errs:#?}"
        );
    }
    assert_eq!(
        v.config.tcp.routers.keys().collect::<Vec<_>>(),
        ["fine@file"]
    );
    assert!(errs[0].starts_with("dyn.toml:"), "{errs:#?}");
}

#[test]
fn merge_keeps_default_tls_options_and_concatenates_certificates() {
    let a = file(
        "[[tls.certificates]]\ncertFile = \"-----BEGIN CERTIFICATE-----\"\nkeyFile = \"-----BEGIN PRIVATE KEY-----\"\n[tls.options.default]\nminVersion = \"VersionTLS12\"\n[tls.options.strict]\nminVersion = \"VersionTLS13\"\n",
    );
    let b = file("[[tls.certificates]]\ncertFile = \"/nope.pem\"\nkeyFile = \"/nope.key\"\n");
    let m = merge(&[("file", &a), ("other", &b)]);
    assert_eq!(m.tls.certificates.len(), 2);
    assert!(m.tls.options.contains_key("default"));
    assert!(m.tls.options.contains_key("strict@file"));
    let v = validate(&m, &static_with(&[]));
    let errs = errors_of(&v);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].contains("tls certificate `1`")
            && errs[0].contains("file `/nope.pem` does not exist"),
        "{errs:#?}"
    );
    assert_eq!(v.config.tls.certificates.len(), 1);
}

#[test]
fn tls_options_name_the_offending_key() {
    let d = file(
        r#"
[tls.options.old]
minVersion = "VersionTLS10"
[tls.options.ciphers]
cipherSuites = ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_RSA_WITH_AES_128_CBC_SHA"]
curvePreferences = ["X25519", "CurveP521"]
[tls.options.inverted]
minVersion = "VersionTLS13"
maxVersion = "VersionTLS12"
[tls.options.noca.clientAuth]
clientAuthType = "RequireAndVerifyClientCert"
[tls.options.good]
minVersion = "VersionTLS12"
cipherSuites = ["TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305", "TLS_AES_128_GCM_SHA256"]
curvePreferences = ["CurveP256", "X25519"]
alpnProtocols = ["h2"]
sniStrict = true
[tcp.routers.r]
rule = "HostSNI(`a.example`)"
service = "app"
tls = { options = "ciphers" }
[tcp.routers.ok]
rule = "HostSNI(`b.example`)"
service = "app"
tls = { options = "good" }
[tcp.services.app.loadBalancer]
servers = [{ address = "127.0.0.1:9000" }]
"#,
    );
    let merged = merge(&[("file", &d)]);
    let v = validate(&merged, &static_with(&["web"]));
    let errs = errors_of(&v);
    let has = |needle: &str| errs.iter().any(|e| e.contains(needle));
    assert!(
        has(
            "tls options `old@file` (provider file), key `minVersion`: unsupported TLS version `VersionTLS10` (TLS 1.0 and 1.1 are not available in rustls)"
        ),
        "{errs:#?}"
    );
    assert!(
        has("key `cipherSuites[1]`: unknown or unsupported `TLS_RSA_WITH_AES_128_CBC_SHA`"),
        "{errs:#?}"
    );
    assert!(
        has("key `curvePreferences[1]`: unknown or unsupported `CurveP521`"),
        "{errs:#?}"
    );
    assert!(
        has("key `maxVersion`: maxVersion VersionTLS12 is below minVersion VersionTLS13"),
        "{errs:#?}"
    );
    assert!(
        has(
            "key `clientAuth.caFiles`: clientAuthType RequireAndVerifyClientCert needs clientAuth.caFiles"
        ),
        "{errs:#?}"
    );
    // The router using broken options is disabled; the one using good options is kept.
    assert!(has("router `r@file`"), "{errs:#?}");
    assert!(v.config.tcp.routers.contains_key("ok@file"));
    assert!(!v.config.tcp.routers.contains_key("r@file"));
    assert!(v.config.tls.options.contains_key("good@file"));
    assert_eq!(errs.len(), 6, "{errs:#?}");
}

#[test]
fn broken_default_tls_options_disable_terminating_routers() {
    let d = file(
        r#"
[tls.options.default]
minVersion = "VersionTLS11"
[tcp.routers.term]
rule = "HostSNI(`a.example`)"
service = "app"
tls = {}
[tcp.routers.pass]
rule = "HostSNI(`b.example`)"
service = "app"
tls = { passthrough = true }
[tcp.services.app.loadBalancer]
servers = [{ address = "127.0.0.1:9000" }]
"#,
    );
    let v = validate(&merge(&[("file", &d)]), &static_with(&["web"]));
    let errs = errors_of(&v);
    assert!(
        errs.iter()
            .any(|e| e.contains("router `term@file`")
                && e.contains("tls options `default` are invalid")),
        "{errs:#?}"
    );
    assert!(!v.config.tcp.routers.contains_key("term@file"));
    assert!(v.config.tcp.routers.contains_key("pass@file"));
}

#[test]
fn merge_qualifies_origins_of_declared_names_only() {
    use tagway_config::{Router, Service};
    let mut d = Dynamic::default();
    for n in ["a", "ab"] {
        d.tcp.routers.insert(n.into(), Router::default());
    }
    d.tcp.services.insert("a".into(), Service::default());
    d.meta.insert("tcp.routers.a.rule", Origin::tag("ra"));
    d.meta.insert("tcp.routers.ab.rule", Origin::tag("rab"));
    d.meta
        .insert("tcp.routers.ab.middlewares[0]", Origin::tag("m"));
    d.meta.insert("tcp.services.a", Origin::tag("sa"));
    d.meta.insert("tcp.services.gone.x", Origin::tag("g"));
    let merged = merge(&[("p", &d)]);
    let tag = |k: &str| merged.meta.origin_exact(k).and_then(Origin::as_tag);
    assert_eq!(tag("tcp.routers.a@p.rule"), Some("ra"));
    assert_eq!(tag("tcp.routers.ab@p.rule"), Some("rab"));
    assert_eq!(tag("tcp.routers.ab@p.middlewares[0]"), Some("m"));
    assert_eq!(tag("tcp.services.a@p"), Some("sa"));
    // Not a declared service: left as read.
    assert_eq!(tag("tcp.services.gone.x"), Some("g"));
}

#[test]
fn merge_cache_shares_what_a_provider_did_not_change() {
    use std::sync::Arc;
    let f = file(
        "[tcp.routers.r]\nrule = \"HostSNI(`*`)\"\nservice = \"s\"\n\
         [[tcp.services.s.loadBalancer.servers]]\naddress = \"127.0.0.1:1\"\n",
    );
    // The Consul provider publishes its references already qualified.
    let mut c = Dynamic::default();
    c.tcp.routers.insert(
        "db".into(),
        Router {
            rule: "HostSNI(`db`)".into(),
            service: "db@consulcatalog".into(),
            ..Default::default()
        },
    );
    c.tcp.services.insert(
        "db".into(),
        Service {
            load_balancer: Some(LoadBalancer {
                servers: vec![Server {
                    address: "127.0.0.1:2".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            weighted: None,
        },
    );
    let mut cache = MergeCache::default();
    let (f, c) = (Arc::new(f), Arc::new(c));
    let first = cache.merge_shared(&[("file", f.clone()), ("consulcatalog", c.clone())]);
    assert_eq!(first, merge(&[("file", &f), ("consulcatalog", &c)]));
    assert_eq!(first.tcp.routers["r@file"].service, "s@file");
    assert!(
        Arc::ptr_eq(&first.tcp.routers["db@consulcatalog"], &c.tcp.routers["db"]),
        "a resource with qualified references is the provider's own"
    );

    // The Consul provider changes one service; the file provider publishes the same output.
    let mut c2 = (*c).clone();
    c2.tcp
        .services
        .get_mut("db")
        .unwrap()
        .load_balancer
        .as_mut()
        .unwrap()
        .servers[0]
        .address = "127.0.0.1:3".into();
    let c2 = Arc::new(c2);
    let second = cache.merge_shared(&[("file", f.clone()), ("consulcatalog", c2.clone())]);
    assert!(Arc::ptr_eq(
        &first.tcp.routers["r@file"],
        &second.tcp.routers["r@file"]
    ));
    assert!(Arc::ptr_eq(
        &first.tcp.services["s@file"],
        &second.tcp.services["s@file"]
    ));
    assert!(Arc::ptr_eq(
        &first.tcp.routers["db@consulcatalog"],
        &second.tcp.routers["db@consulcatalog"]
    ));
    assert!(!Arc::ptr_eq(
        &first.tcp.services["db@consulcatalog"],
        &second.tcp.services["db@consulcatalog"]
    ));
    assert_eq!(second, merge(&[("file", &f), ("consulcatalog", &c2)]));

    // A resource the provider drops goes; one it adds comes.
    let mut c3 = (*c2).clone();
    c3.tcp.routers.remove("db");
    c3.tcp.routers.insert(
        "db2".into(),
        Router {
            rule: "HostSNI(`db2`)".into(),
            service: "db".into(),
            ..Default::default()
        },
    );
    let c3 = Arc::new(c3);
    let after = cache.merge_shared(&[("file", f.clone()), ("consulcatalog", c3.clone())]);
    assert_eq!(after, merge(&[("file", &f), ("consulcatalog", &c3)]));
    assert_eq!(
        after.tcp.routers["db2@consulcatalog"].service,
        "db@consulcatalog"
    );

    // A provider that is gone takes its resources with it.
    let third = cache.merge_shared(&[("file", f.clone())]);
    assert!(!third.tcp.routers.contains_key("db@consulcatalog"));
    assert_eq!(third, merge(&[("file", &f)]));
}

#[test]
fn checking_only_the_changes_agrees_with_checking_everything() {
    let st = static_with(&["tcp"]);
    let lb = |addr: &str| Service {
        load_balancer: Some(LoadBalancer {
            servers: vec![Server {
                address: addr.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        weighted: None,
    };
    let router = |rule: &str, svc: &str| Router {
        rule: rule.into(),
        service: svc.into(),
        ..Default::default()
    };
    let mut d = Dynamic::default();
    for i in 0..5 {
        d.tcp
            .services
            .insert(format!("s{i}@c"), lb(&format!("127.0.0.1:{}", 100 + i)));
        d.tcp.routers.insert(
            format!("r{i}@c"),
            router(&format!("ClientIP(`127.0.0.{i}`)"), &format!("s{i}@c")),
        );
    }
    d.tcp.services.insert(
        "w@c".into(),
        Service {
            load_balancer: None,
            weighted: Some(Weighted {
                services: vec![WeightedService {
                    name: "s0@c".into(),
                    weight: None,
                }],
            }),
        },
    );
    d.tcp
        .routers
        .insert("rw@c".into(), router("HostSNI(`*`)", "w@c"));
    type Step = Box<dyn Fn(&mut Dynamic)>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "a server moves",
            Box::new(move |d| {
                d.tcp.services.insert("s1@c".into(), lb("127.0.0.1:201"));
            }),
        ),
        (
            "a weighted child breaks",
            Box::new(move |d| {
                d.tcp.services.insert("s0@c".into(), lb("no-port"));
            }),
        ),
        (
            "it is fixed",
            Box::new(move |d| {
                d.tcp.services.insert("s0@c".into(), lb("127.0.0.1:300"));
            }),
        ),
        (
            "a service goes",
            Box::new(|d| {
                d.tcp.services.remove("s2@c");
            }),
        ),
        (
            "it comes back",
            Box::new(move |d| {
                d.tcp.services.insert("s2@c".into(), lb("127.0.0.1:102"));
            }),
        ),
        (
            "a rule breaks, a router comes",
            Box::new(move |d| {
                d.tcp
                    .routers
                    .insert("r3@c".into(), router("HostSNI(", "s3@c"));
                d.tcp
                    .routers
                    .insert("r9@c".into(), router("HostSNI(`*`)", "s4@c"));
            }),
        ),
        ("nothing changes", Box::new(|_| {})),
        (
            "the rule is fixed",
            Box::new(move |d| {
                d.tcp
                    .routers
                    .insert("r3@c".into(), router("HostSNI(`*`)", "s3@c"));
            }),
        ),
        (
            "a router names an unknown entry point",
            Box::new(move |d| {
                let mut r = router("HostSNI(`*`)", "s4@c");
                r.entry_points = vec!["nope".into()];
                d.tcp.routers.insert("r4@c".into(), r);
            }),
        ),
    ];
    let mut prev = validate_changes(d.clone(), &st, None);
    assert_eq!(prev, validate(&d, &st));
    for (what, step) in steps {
        step(&mut d);
        let next = validate_changes(d.clone(), &st, Some((&prev.config, &prev.errors)));
        let full = validate(&d, &st);
        assert_eq!(errors_of(&next), errors_of(&full), "after: {what}");
        assert_eq!(next.config, full.config, "after: {what}");
        prev = next;
    }
}
