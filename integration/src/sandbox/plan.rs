//! What the sandbox registers and how it configures the gateway: the example services' Consul
//! registrations (Traefik tags) and the static configuration file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::catalog::{CheckDefinition, ServiceRegistration};

use super::backends::{Backend, Backends, SECURE_SERVER_NAME};

/// The tag prefix (Traefik's default, so the tags read as Traefik's documentation writes them).
pub const PREFIX: &str = "traefik";

/// Entry point of the weighted `pg-echo` service.
pub const EP_ECHO: &str = "echo";
/// Entry point of the TLS passthrough service.
pub const EP_TLS: &str = "tls";
/// Entry point of the service behind PROXY protocol.
pub const EP_PROXIED: &str = "proxied";
/// Entry point left without a router: the walkthrough registers `hello` on it.
pub const EP_EXTRA: &str = "extra";

/// Every entry point with its default port on 127.0.0.1, in display order.
pub const ENTRY_POINTS: [(&str, u16); 4] = [
    (EP_ECHO, 15432),
    (EP_TLS, 15443),
    (EP_PROXIED, 15400),
    (EP_EXTRA, 15500),
];

/// Interval of the TCP health checks the dev catalog runs against the backends.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// The gateway's shutdown grace period in the sandbox (short: nothing important is in flight).
pub const GRACE_PERIOD: Duration = Duration::from_secs(2);

/// The tags of one `pg-echo` instance: both versions share the router, the service and its
/// servers transport (declared in tags); only the server weight differs.
pub fn pg_echo_tags(weight: u32) -> Vec<String> {
    vec![
        format!("{PREFIX}.enable=true"),
        format!("{PREFIX}.tcp.routers.pg-echo.entrypoints={EP_ECHO}"),
        format!("{PREFIX}.tcp.routers.pg-echo.rule=HostSNI(`*`)"),
        format!("{PREFIX}.tcp.routers.pg-echo.service=pg-echo"),
        format!("{PREFIX}.tcp.services.pg-echo.loadbalancer.serverstransport=sandbox-fast"),
        format!("{PREFIX}.tcp.services.pg-echo.loadbalancer.server.weight={weight}"),
        format!("{PREFIX}.tcp.serverstransports.sandbox-fast.dialtimeout=2s"),
        format!("{PREFIX}.tcp.serverstransports.sandbox-fast.terminationdelay=200ms"),
    ]
}

/// The tags of `secure`: routed by SNI, TLS passed through to the backend.
pub fn secure_tags() -> Vec<String> {
    vec![
        format!("{PREFIX}.enable=true"),
        format!("{PREFIX}.tcp.routers.secure.entrypoints={EP_TLS}"),
        format!("{PREFIX}.tcp.routers.secure.rule=HostSNI(`{SECURE_SERVER_NAME}`)"),
        format!("{PREFIX}.tcp.routers.secure.tls.passthrough=true"),
    ]
}

/// The tags of `client-addr`: its servers transport sends a PROXY protocol v1 header.
pub fn client_addr_tags() -> Vec<String> {
    vec![
        format!("{PREFIX}.enable=true"),
        format!("{PREFIX}.tcp.routers.client-addr.entrypoints={EP_PROXIED}"),
        format!("{PREFIX}.tcp.routers.client-addr.rule=HostSNI(`*`)"),
        format!("{PREFIX}.tcp.services.client-addr.loadbalancer.serverstransport=with-proxy"),
        format!("{PREFIX}.tcp.serverstransports.with-proxy.proxyprotocol.version=1"),
    ]
}

/// The tags the walkthrough registers `hello` with (through `curl`).
pub fn hello_tags() -> Vec<String> {
    vec![
        format!("{PREFIX}.enable=true"),
        format!("{PREFIX}.tcp.routers.hello.entrypoints={EP_EXTRA}"),
        format!("{PREFIX}.tcp.routers.hello.rule=HostSNI(`*`)"),
    ]
}

fn registration(backend: &Backend, tags: Vec<String>) -> ServiceRegistration {
    ServiceRegistration::new(&backend.service)
        .id(&backend.id)
        .address(backend.addr.ip().to_string())
        .port(backend.addr.port())
        .tags(tags)
        .check(
            CheckDefinition::tcp(backend.addr.to_string(), CHECK_INTERVAL)
                .name(format!("TCP {}", backend.addr)),
        )
}

/// The registrations of the example services (all but `hello`).
pub fn registrations(b: &Backends) -> Vec<ServiceRegistration> {
    vec![
        registration(&b.echo_v1, pg_echo_tags(3)).meta("version", "v1"),
        registration(&b.echo_v2, pg_echo_tags(1)).meta("version", "v2"),
        registration(&b.secure, secure_tags()),
        registration(&b.client_addr, client_addr_tags()),
    ]
}

/// The JSON body of the `hello` registration the walkthrough sends with `curl` (and the e2e test
/// sends over HTTP).
pub fn hello_registration_json(hello: &Backend) -> String {
    serde_json::json!({
        "Name": hello.service,
        "ID": hello.id,
        "Address": hello.addr.ip().to_string(),
        "Port": hello.addr.port(),
        "Tags": hello_tags(),
    })
    .to_string()
}

/// Inputs of the static configuration.
#[derive(Clone, Debug)]
pub struct StaticInputs {
    /// Entry point name → listen address.
    pub entry_points: BTreeMap<String, SocketAddr>,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The dev catalog.
    pub catalog: SocketAddr,
}

/// The gateway's static configuration (TOML).
pub fn static_config(inputs: &StaticInputs) -> String {
    let mut s = String::new();
    s.push_str(
        "# Written by tagway-sandbox; deleted when the sandbox stops.\n\
         # The gateway reads its routes from the dev catalog (Consul's HTTP API) through the\n\
         # Consul catalog provider: every example service is registered there with tags.\n\n",
    );
    for (name, addr) in &inputs.entry_points {
        let _ = writeln!(s, "[entryPoints.{name}]\naddress = \"{addr}\"\n");
    }
    let _ = writeln!(
        s,
        "[admin]\naddress = \"{}\"\n\n\
         [log]\nlevel = \"info\"\n\n\
         # One line per connection.\n\
         [accessLog]\nfilePath = \"access.log\"\n\n\
         [shutdown]\ngracePeriod = \"{}\"\n\n\
         [providers.consulCatalog]\nprefix = \"{PREFIX}\"\nexposedByDefault = false\n\n\
         [providers.consulCatalog.endpoint]\naddress = \"{}\"",
        inputs.admin,
        humantime::format_duration(GRACE_PERIOD),
        inputs.catalog,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_decodes(tags: &[String]) -> tagway_config::Dynamic {
        let d = tagway_config::tags::decode(PREFIX, tags);
        assert!(d.errors.is_empty(), "{tags:?}: {:?}", d.errors);
        assert_eq!(d.enable, Some(true));
        d.config
    }

    #[test]
    fn every_example_tag_set_decodes_without_errors() {
        for tags in [
            pg_echo_tags(3),
            pg_echo_tags(1),
            secure_tags(),
            client_addr_tags(),
            hello_tags(),
        ] {
            assert_decodes(&tags);
        }
    }

    #[test]
    fn pg_echo_versions_differ_only_by_weight() {
        let v1 = pg_echo_tags(3);
        let v2 = pg_echo_tags(1);
        let differing: Vec<_> = v1.iter().zip(&v2).filter(|(a, b)| a != b).collect();
        assert_eq!(differing.len(), 1, "{differing:?}");
        assert!(differing[0].0.ends_with("server.weight=3"));
        let json = serde_json::to_value(assert_decodes(&v1)).expect("serializes");
        let text = json.to_string();
        assert!(text.contains("sandbox-fast"), "{text}");
        assert!(text.contains("HostSNI(`*`)"), "{text}");
    }

    #[test]
    fn secure_router_passes_tls_through_by_sni() {
        let json = serde_json::to_value(assert_decodes(&secure_tags())).expect("serializes");
        let router = &json["tcp"]["routers"]["secure"];
        assert_eq!(router["rule"], "HostSNI(`secure.sandbox.test`)");
        assert_eq!(router["tls"]["passthrough"], true);
    }

    #[test]
    fn static_config_loads_with_the_consul_provider_pointing_at_the_catalog() {
        let dir = tempfile::tempdir().expect("temp dir");
        let entry_points = ENTRY_POINTS
            .iter()
            .map(|(n, p)| ((*n).to_owned(), SocketAddr::from(([127, 0, 0, 1], *p))))
            .collect();
        let text = static_config(&StaticInputs {
            entry_points,
            admin: "127.0.0.1:8081".parse().expect("literal"),
            catalog: "127.0.0.1:18500".parse().expect("literal"),
        });
        let path = dir.path().join("tagway.toml");
        std::fs::write(&path, &text).expect("write");
        let st = tagway_config::load_static(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(st.entry_points.len(), 4);
        assert_eq!(st.entry_points["echo"].address, "127.0.0.1:15432");
        assert_eq!(
            st.admin.as_ref().map(|a| a.address.as_str()),
            Some("127.0.0.1:8081")
        );
        let consul = st.providers.consul_catalog.expect("consul provider");
        assert_eq!(consul.endpoint.address.as_deref(), Some("127.0.0.1:18500"));
        assert!(!consul.exposed_by_default);
        assert_eq!(st.shutdown.grace_period.to_std(), Some(GRACE_PERIOD));
    }

    #[test]
    fn hello_registration_is_agent_register_json() {
        let backend = Backend {
            service: "hello".into(),
            id: "hello-1".into(),
            addr: "127.0.0.1:4242".parse().expect("literal"),
            kind: super::super::backends::BackendKind::Hello,
        };
        let v: serde_json::Value =
            serde_json::from_str(&hello_registration_json(&backend)).expect("json");
        assert_eq!(v["Name"], "hello");
        assert_eq!(v["Port"], 4242);
        assert_eq!(v["Tags"].as_array().map(Vec::len), Some(3));
    }
}
