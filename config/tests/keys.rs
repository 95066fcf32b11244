//! Every key of the static and dynamic configuration, and every default.

use tagway_config::*;

fn static_from(text: &str, ext: &str) -> (StaticConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    // A file the configurations below name.
    std::fs::write(dir.path().join("ca.pem"), "").unwrap();
    let p = dir.path().join(format!("tagway.{ext}"));
    std::fs::write(&p, text).unwrap();
    (load_static(&p).unwrap_or_else(|e| panic!("{e}")), dir)
}

#[test]
fn static_defaults() {
    let (st, _d) = static_from("", "toml");
    assert_eq!(st, StaticConfig::default());
    assert!(st.entry_points.is_empty());
    assert_eq!(st.tcp_servers_transport, ServersTransport::default());
    assert_eq!(
        st.tcp_servers_transport.dial_timeout,
        Duration::from_secs(30)
    );
    assert_eq!(
        st.tcp_servers_transport.dial_keep_alive,
        Duration::from_secs(15)
    );
    assert_eq!(
        st.tcp_servers_transport.termination_delay,
        Duration::from_millis(100)
    );
    assert_eq!(st.providers, Providers::default());
    assert_eq!(st.admin, None);
    assert_eq!(st.log.level, "info");
    assert_eq!(st.log.format, LogFormat::Text);
    assert_eq!(st.access_log, None);
    assert_eq!(st.shutdown.grace_period, Duration::from_secs(10));
    assert_eq!(st.load_balancer.hold_out, Duration::from_secs(5));
    assert_eq!(st.load_balancer.dial_attempts, 3);

    // Empty provider sections enable them with their defaults.
    let (st, _d) = static_from(
        "providers:\n  consulCatalog:\n  file:\n    filename: d.toml\n",
        "yaml",
    );
    let c = st.providers.consul_catalog.unwrap();
    assert_eq!(c, ConsulCatalog::default());
    assert_eq!(c.prefix, "traefik");
    assert!(c.exposed_by_default);
    assert_eq!(c.refresh_interval, Duration::from_secs(15));
    assert!(c.watch);
    assert!(!c.stale && !c.require_consistent && !c.cache);
    assert_eq!(c.strict_checks, ["passing", "warning"]);
    assert!(!c.connect_aware && !c.connect_by_default);
    assert_eq!(c.service_name, "tagway");
    assert!(c.namespaces.is_empty());
    assert_eq!(c.endpoint, ConsulEndpoint::default());
    assert!(st.providers.file.unwrap().watch);
}

#[test]
fn every_static_key() {
    let toml = r#"
[entryPoints.db]
address = "127.0.0.1:5432"
maxConnections = 100
[entryPoints.db.proxyProtocol]
trustedIPs = ["10.0.0.0/8", "127.0.0.1"]
insecure = true
[entryPoints.v6]
address = "[::1]:5432"

[tcpServersTransport]
dialTimeout = 5
dialKeepAlive = "-1s"
terminationDelay = "-1s"
[tcpServersTransport.proxyProtocol]
version = 1
[tcpServersTransport.tls]
serverName = "backend"
rootCAs = ["ca.pem"]

[providers.file]
filename = "dynamic.toml"
watch = false

[providers.consulCatalog]
prefix = "tagway"
exposedByDefault = false
defaultRule = "Host(`x`)"
constraints = "Tag(`env=prod`)"
refreshInterval = "30s"
watch = false
stale = true
requireConsistent = true
cache = true
strictChecks = ["passing"]
connectAware = true
connectByDefault = true
serviceName = "edge"
namespaces = ["a", "b"]
[providers.consulCatalog.endpoint]
address = "127.0.0.1:8500"
scheme = "https"
datacenter = "dc2"
token = "secret"
tokenFile = "token"
endpointWaitTime = "1m"
[providers.consulCatalog.endpoint.tls]
ca = "consul-ca.pem"
cert = "consul.pem"
key = "consul.key"
insecureSkipVerify = true
[providers.consulCatalog.endpoint.httpAuth]
username = "u"
password = "p"

[providers.spiffe]
workloadAPIAddr = "unix:///run/spire/agent.sock"

[admin]
address = "127.0.0.1:8080"

[log]
level = "DEBUG"
format = "JSON"

[accessLog]
filePath = "access.log"
format = "json"

[shutdown]
gracePeriod = "1m"

[loadBalancer]
holdOut = "250ms"
dialAttempts = 1
"#;
    let (st, dir) = static_from(toml, "toml");
    let base = dir.path().to_path_buf();
    let db = &st.entry_points["db"];
    assert_eq!(db.address, "127.0.0.1:5432");
    assert_eq!(db.max_connections, Some(100));
    let pp = db.proxy_protocol.as_ref().unwrap();
    assert_eq!(pp.trusted_ips, ["10.0.0.0/8", "127.0.0.1"]);
    assert!(pp.insecure);
    assert_eq!(st.entry_points["v6"].address, "[::1]:5432");
    let t = &st.tcp_servers_transport;
    assert_eq!(t.dial_timeout, Duration::from_secs(5));
    assert_eq!(t.dial_keep_alive, Duration::from_secs(-1));
    assert_eq!(t.termination_delay, Duration::from_secs(-1));
    assert_eq!(
        t.proxy_protocol,
        Some(ProxyProtocol {
            version: 1,
            ..Default::default()
        })
    );
    let tls = t.tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("backend"));
    assert_eq!(tls.root_cas, [FileOrContent::from(base.join("ca.pem"))]);
    let f = st.providers.file.as_ref().unwrap();
    assert_eq!(f.filename, Some(base.join("dynamic.toml")));
    assert!(!f.watch);
    let c = st.providers.consul_catalog.as_ref().unwrap();
    assert_eq!(c.prefix, "tagway");
    assert!(!c.exposed_by_default);
    assert_eq!(c.default_rule.as_deref(), Some("Host(`x`)"));
    assert_eq!(c.constraints.as_deref(), Some("Tag(`env=prod`)"));
    assert_eq!(c.refresh_interval, Duration::from_secs(30));
    assert!(!c.watch && c.stale && c.require_consistent && c.cache);
    assert_eq!(c.strict_checks, ["passing"]);
    assert!(c.connect_aware && c.connect_by_default);
    assert_eq!(c.service_name, "edge");
    assert_eq!(c.namespaces, ["a", "b"]);
    let e = &c.endpoint;
    assert_eq!(e.address.as_deref(), Some("127.0.0.1:8500"));
    assert_eq!(e.scheme.as_deref(), Some("https"));
    assert_eq!(e.datacenter.as_deref(), Some("dc2"));
    assert_eq!(e.token.as_deref(), Some("secret"));
    assert_eq!(e.token_file, Some(base.join("token")));
    assert_eq!(e.endpoint_wait_time, Some(Duration::from_secs(60)));
    let etls = e.tls.as_ref().unwrap();
    assert_eq!(etls.ca, Some(base.join("consul-ca.pem")));
    assert_eq!(etls.cert, Some(base.join("consul.pem")));
    assert_eq!(etls.key, Some(base.join("consul.key")));
    assert!(etls.insecure_skip_verify);
    let auth = e.http_auth.as_ref().unwrap();
    assert_eq!((auth.username.as_str(), auth.password.as_str()), ("u", "p"));
    assert!(
        !format!("{e:?}").contains("secret"),
        "the token is never printed"
    );
    assert_eq!(
        st.providers
            .spiffe
            .as_ref()
            .unwrap()
            .workload_api_addr
            .as_deref(),
        Some("unix:///run/spire/agent.sock")
    );
    assert_eq!(st.admin.as_ref().unwrap().address, "127.0.0.1:8080");
    assert_eq!(st.log.level, "DEBUG");
    assert_eq!(st.log.format, LogFormat::Json);
    let al = st.access_log.as_ref().unwrap();
    assert_eq!(al.file_path, Some(base.join("access.log")));
    assert_eq!(al.format, LogFormat::Json);
    assert_eq!(st.shutdown.grace_period, Duration::from_secs(60));
    assert_eq!(st.load_balancer.hold_out, Duration::from_millis(250));
    assert_eq!(st.load_balancer.dial_attempts, 1);
}

#[test]
fn static_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.yaml");
    for (text, needle) in [
        (
            "log:\n  format: xml\n",
            "s.yaml:2:11: log.format: unknown value `xml`: expected `text` or `json`",
        ),
        (
            "providers:\n  file:\n    filename: a\n    directory: b\n",
            "providers.file: set either `filename` or `directory`, not both",
        ),
        (
            "providers:\n  file: {}\n",
            "providers.file: set `filename` (one file) or `directory`",
        ),
        (
            "providers:\n  spiffe:\n    workloadAPIAddr: x\n    certificate: c\n",
            "set either `workloadAPIAddr` or the `certificate`/`key`/`bundle` files",
        ),
        (
            "providers:\n  consulCatalog:\n    strictChecks: [ok]\n",
            "providers.consulCatalog.strictChecks[0]: unknown check status `ok`",
        ),
        (
            "entryPoints:\n  a:\n    address: \":80\"\n    proxyProtocol:\n      trustedIPs: [\"10.0.0.0/99\"]\n",
            "entryPoints.a.proxyProtocol.trustedIPs[0]: `10.0.0.0/99` is neither",
        ),
        (
            "admin:\n  address: localhost\n",
            "admin.address: `localhost` has no port",
        ),
        (
            "tcpServersTransport:\n  tls: {}\n",
            "tcpServersTransport.tls: TLS is enabled but nothing says which identity",
        ),
        (
            "entryPoints:\n  a:\n    address: \":80\"\n    maxConnections: -1\n",
            "entryPoints.a.maxConnections: invalid value: integer `-1`, expected u64",
        ),
        (
            "loadBalancer:\n  holdOut: -1s\n",
            "loadBalancer.holdOut: holdOut must not be negative (0s never holds a server out)",
        ),
        (
            "loadBalancer:\n  dialAttempts: 0\n",
            "loadBalancer.dialAttempts: dialAttempts must be at least 1",
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let e = load_static(&p).unwrap_err().to_string();
        assert!(e.contains(needle), "{text}: {e}");
        assert!(e.starts_with(&p.display().to_string()), "{e}");
    }
}

#[test]
fn every_dynamic_key() {
    let yaml = r#"
tcp:
  routers:
    r:
      entryPoints: [a, b]
      rule: HostSNI(`x.example.com`)
      priority: 42
      service: s
      middlewares: [m]
      tls:
        passthrough: false
        options: strict
        domains:
          - main: example.com
            sans: [a.example.com]
  services:
    s:
      loadBalancer:
        servers:
          - address: 10.0.0.1:80
            weight: 2
            tls: true
        serversTransport: t
        healthCheck:
          port: 8081
          send: PING
          expect: PONG
          interval: 10s
          unhealthyInterval: 1s
          timeout: 2s
        proxyProtocol:
          version: 1
        terminationDelay: -1
    w:
      weighted:
        services:
          - name: s
            weight: 0
          - name: s
  middlewares:
    m:
      ipWhiteList:
        sourceRange: [10.0.0.0/8]
    l:
      inFlightConn:
        amount: 5
  serversTransports:
    t:
      dialTimeout: 0
      dialKeepAlive: 0
      terminationDelay: 1h30m
      proxyProtocol: {}
      tls:
        serverName: db
        certificates:
          - certFile: c.pem
            keyFile: k.pem
        insecureSkipVerify: false
        rootCAs: [ca.pem]
        peerCertURI: spiffe://td/db
      spiffe:
        ids: [spiffe://td/db]
        trustDomain: td
tls:
  certificates:
    - certFile: srv.pem
      keyFile: srv.key
      stores: [default]
  options:
    strict:
      minVersion: VersionTLS13
      maxVersion: VersionTLS13
      alpnProtocols: [h2]
      sniStrict: true
      clientAuth:
        caFiles: [clients.pem]
        clientAuthType: RequireAndVerifyClientCert
  stores:
    default:
      defaultCertificate:
        certFile: d.pem
        keyFile: d.key
"#;
    let d = load_dynamic_str(yaml, Format::Yaml, "all.yaml").unwrap();
    let r = &d.tcp.routers["r"];
    assert_eq!(r.entry_points, ["a", "b"]);
    assert_eq!(r.priority, Some(42));
    assert_eq!(r.middlewares, ["m"]);
    let rt = r.tls.as_ref().unwrap();
    assert!(!rt.passthrough);
    assert_eq!(rt.options.as_deref(), Some("strict"));
    assert_eq!(
        rt.domains,
        [Domain {
            main: "example.com".into(),
            sans: vec!["a.example.com".into()]
        }]
    );
    let lb = d.tcp.services["s"].load_balancer.as_ref().unwrap();
    assert_eq!(
        lb.servers,
        [Server {
            address: "10.0.0.1:80".into(),
            weight: Some(2),
            tls: true
        }]
    );
    assert_eq!(lb.servers_transport.as_deref(), Some("t"));
    let hc = lb.health_check.as_ref().unwrap();
    assert_eq!(hc.port, Some(8081));
    assert_eq!(hc.send.as_deref(), Some("PING"));
    assert_eq!(hc.expect.as_deref(), Some("PONG"));
    assert_eq!(hc.interval(), Duration::from_secs(10));
    assert_eq!(hc.unhealthy_interval(), Duration::from_secs(1));
    assert_eq!(hc.timeout(), Duration::from_secs(2));
    assert_eq!(
        lb.proxy_protocol,
        Some(ProxyProtocol {
            version: 1,
            ..Default::default()
        })
    );
    assert_eq!(lb.termination_delay, Some(-1));
    let w = d.tcp.services["w"].weighted.as_ref().unwrap();
    assert_eq!(w.services[0].weight(), 0);
    assert_eq!(w.services[1].weight(), 1);
    assert_eq!(
        d.tcp.middlewares["m"]
            .ip_allow_list
            .as_ref()
            .unwrap()
            .source_range,
        ["10.0.0.0/8"]
    );
    assert_eq!(
        d.tcp.middlewares["l"]
            .in_flight_conn
            .as_ref()
            .unwrap()
            .amount,
        5
    );
    let t = &d.tcp.servers_transports["t"];
    assert_eq!(t.dial_timeout, Duration::ZERO);
    assert_eq!(t.dial_keep_alive, Duration::ZERO);
    assert_eq!(t.termination_delay, Duration::from_secs(5400));
    assert_eq!(
        t.proxy_protocol,
        Some(ProxyProtocol {
            version: 2,
            ..Default::default()
        })
    );
    let tls = t.tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("db"));
    assert_eq!(
        tls.certificates,
        [ClientCertificate::Pair {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into()
        }]
    );
    assert!(!tls.insecure_skip_verify);
    assert_eq!(tls.root_cas, [FileOrContent::from("ca.pem")]);
    assert_eq!(tls.peer_cert_uri.as_deref(), Some("spiffe://td/db"));
    let sp = t.spiffe.as_ref().unwrap();
    assert_eq!(sp.ids, ["spiffe://td/db"]);
    assert_eq!(sp.trust_domain.as_deref(), Some("td"));
    let c = &d.tls.certificates[0];
    assert_eq!(
        (c.cert_file.0.as_str(), c.key_file.0.as_str()),
        ("srv.pem", "srv.key")
    );
    assert_eq!(c.stores, ["default"]);
    let o = &d.tls.options["strict"];
    assert_eq!(o.min_version.as_deref(), Some("VersionTLS13"));
    assert_eq!(o.max_version.as_deref(), Some("VersionTLS13"));
    assert_eq!(o.alpn_protocols, ["h2"]);
    assert!(o.sni_strict);
    let ca = o.client_auth.as_ref().unwrap();
    assert_eq!(ca.ca_files, [FileOrContent::from("clients.pem")]);
    assert_eq!(
        ca.client_auth_type.as_deref(),
        Some("RequireAndVerifyClientCert")
    );
    let dc = d.tls.stores["default"]
        .default_certificate
        .as_ref()
        .unwrap();
    assert_eq!(dc.cert_file.0, "d.pem");

    // Serialization round-trips through JSON (what `tagway tags` prints).
    let json = serde_json::to_string(&d).unwrap();
    let back: Dynamic = serde_json::from_str(&json).unwrap();
    assert_eq!(back, d);
}

#[test]
fn dynamic_defaults() {
    let d = load_dynamic_str("", Format::Toml, "e").unwrap();
    assert_eq!(d, Dynamic::default());
    let d = load_dynamic_str("[tcp.routers.r]\n[tcp.services.s.loadBalancer]\nservers = [{ address = \"a:1\" }]\n[tcp.services.h.loadBalancer.healthCheck]\n", Format::Toml, "e").unwrap();
    let r = &d.tcp.routers["r"];
    assert_eq!(**r, Router::default());
    assert_eq!(r.priority, None);
    assert_eq!(r.tls, None);
    let s = &d.tcp.services["s"].load_balancer.as_ref().unwrap().servers[0];
    assert_eq!(s.weight(), 1);
    assert!(!s.tls);
    let hc = d.tcp.services["h"]
        .load_balancer
        .as_ref()
        .unwrap()
        .health_check
        .as_ref()
        .unwrap();
    assert_eq!(hc.interval(), Duration::from_secs(30));
    assert_eq!(hc.unhealthy_interval(), Duration::from_secs(30));
    assert_eq!(hc.timeout(), Duration::from_secs(5));
    assert_eq!(hc.port, None);
}

#[test]
fn proxy_protocol_inside_tls_extension() {
    let d = load_dynamic_str(
        "[tcp.serversTransports.connect.proxyProtocol]\nversion = 1\ninsidetls = true\n",
        Format::Toml,
        "inline.toml",
    )
    .unwrap();
    let pp = d.tcp.servers_transports["connect"]
        .proxy_protocol
        .as_ref()
        .unwrap();
    assert_eq!((pp.version, pp.inside_tls), (1, true));
    let tags = tags::decode(
        "traefik",
        &["traefik.tcp.serversTransports.c.proxyProtocol.insideTLS=true"],
    );
    assert!(tags.errors.is_empty(), "{:?}", tags.errors);
    let pp = tags.config.tcp.servers_transports["c"]
        .proxy_protocol
        .as_ref()
        .unwrap();
    assert_eq!((pp.version, pp.inside_tls), (2, true));
}
