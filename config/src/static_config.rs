//! Static configuration: what `tagway run --config FILE` reads once at start.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::dynamic::ServersTransport;

/// The whole static configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StaticConfig {
    /// `entryPoints.<name>`: the listeners.
    pub entry_points: BTreeMap<String, EntryPoint>,
    /// The `default@internal` servers transport, used by services that name none.
    pub tcp_servers_transport: ServersTransport,
    /// Configuration providers.
    pub providers: Providers,
    /// The admin listener (metrics, API, ping); disabled when absent.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub admin: Option<Admin>,
    /// Logging.
    pub log: Log,
    /// Access log (one line per TCP connection); off when absent.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub access_log: Option<AccessLog>,
    /// Graceful shutdown.
    pub shutdown: Shutdown,
    /// How every TCP load balancer treats a server whose dial failed (tagway's own section;
    /// Traefik has no passive health check for TCP).
    pub load_balancer: LoadBalancing,
}

/// `entryPoints.<name>`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EntryPoint {
    /// `127.0.0.1:5432`, `[::1]:5432` or `:5432` (every address).
    pub address: String,
    /// Inbound PROXY protocol, accepted only from trusted addresses.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub proxy_protocol: Option<InboundProxyProtocol>,
    /// Maximum simultaneous connections on this entry point; unlimited when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
}

/// `entryPoints.<name>.proxyProtocol`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InboundProxyProtocol {
    /// CIDRs or IPs allowed to send a PROXY header.
    #[serde(rename = "trustedIPs", alias = "trustedIps")]
    pub trusted_ips: Vec<String>,
    /// Trust every address (Traefik's `insecure`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// `providers`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Providers {
    /// The file provider.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub file: Option<FileProvider>,
    /// The Consul catalog provider.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub consul_catalog: Option<ConsulCatalog>,
    /// Where the gateway's own SPIFFE identity (SVID and bundle) comes from.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub spiffe: Option<SpiffeSource>,
}

/// `providers.file`: exactly one of `filename` or `directory`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FileProvider {
    /// One file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<PathBuf>,
    /// A folder whose `.toml`, `.yaml` and `.yml` files are merged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
    /// Watch for changes (default true).
    pub watch: bool,
}

impl Default for FileProvider {
    fn default() -> Self {
        FileProvider {
            filename: None,
            directory: None,
            watch: true,
        }
    }
}

/// `providers.consulCatalog`, with Traefik's options and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsulCatalog {
    /// How to reach Consul.
    pub endpoint: ConsulEndpoint,
    /// Tag prefix; default `traefik`, so Traefik's tags work verbatim.
    pub prefix: String,
    /// Expose services without `<prefix>.enable=true`; default true.
    pub exposed_by_default: bool,
    /// Traefik's HTTP default rule; kept for compatibility, unused for TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_rule: Option<String>,
    /// Constraint expression over tags (``Tag(`a=b`)``, ``TagRegex(`re`)``, `&&`, `||`, `!`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constraints: Option<String>,
    /// Poll interval when `watch` is false; default 15s.
    pub refresh_interval: Duration,
    /// Use blocking queries (default **true** in tagway; Traefik defaults to polling).
    pub watch: bool,
    /// Allow stale reads from any server.
    pub stale: bool,
    /// Require consistent reads.
    pub require_consistent: bool,
    /// Use the agent's cache.
    pub cache: bool,
    /// Check statuses that count as healthy; default `["passing", "warning"]`.
    pub strict_checks: Vec<String>,
    /// Enable Consul Connect support.
    pub connect_aware: bool,
    /// Treat every service as Connect-enabled unless tagged otherwise.
    pub connect_by_default: bool,
    /// The gateway's own service name in Consul (its Connect identity); default `tagway`.
    pub service_name: String,
    /// Consul Enterprise namespaces to watch; empty = none sent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

impl Default for ConsulCatalog {
    fn default() -> Self {
        ConsulCatalog {
            endpoint: ConsulEndpoint::default(),
            prefix: "traefik".into(),
            exposed_by_default: true,
            default_rule: None,
            constraints: None,
            refresh_interval: Duration::from_secs(15),
            watch: true,
            stale: false,
            require_consistent: false,
            cache: false,
            strict_checks: vec!["passing".into(), "warning".into()],
            connect_aware: false,
            connect_by_default: false,
            service_name: "tagway".into(),
            namespaces: Vec::new(),
        }
    }
}

/// `providers.consulCatalog.endpoint`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsulEndpoint {
    /// `host:port` or URL; default `CONSUL_HTTP_ADDR`, else `127.0.0.1:8500`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `http` or `https`; default from the address, else `http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Datacenter; default the agent's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// ACL token; default `CONSUL_HTTP_TOKEN` / `CONSUL_HTTP_TOKEN_FILE`. Never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the ACL token, re-read when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// TLS toward Consul.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub tls: Option<ConsulTls>,
    /// HTTP basic authentication.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub http_auth: Option<HttpAuth>,
    /// `wait` of blocking queries; default Consul's (5m).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_wait_time: Option<Duration>,
}

impl std::fmt::Debug for ConsulEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulEndpoint")
            .field("address", &self.address)
            .field("scheme", &self.scheme)
            .field("datacenter", &self.datacenter)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("tls", &self.tls)
            .field("http_auth", &self.http_auth)
            .field("endpoint_wait_time", &self.endpoint_wait_time)
            .finish()
    }
}

/// TLS toward Consul.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsulTls {
    /// CA file; default `CONSUL_CACERT`, else the webpki roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client certificate; default `CONSUL_CLIENT_CERT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Client key; default `CONSUL_CLIENT_KEY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Skip verification of Consul's certificate.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// HTTP basic authentication toward Consul.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpAuth {
    /// User name.
    pub username: String,
    /// Password; never logged.
    pub password: String,
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `providers.spiffe`: the gateway's SVID and trust bundle.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SpiffeSource {
    /// SPIFFE Workload API socket (`unix:///run/spire/agent.sock`); default `SPIFFE_ENDPOINT_SOCKET`.
    #[serde(rename = "workloadAPIAddr", skip_serializing_if = "Option::is_none")]
    pub workload_api_addr: Option<String>,
    /// PEM certificate chain file (SVID), re-read when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    /// PEM private key file of the SVID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// PEM trust bundle file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
}

/// `admin`: metrics, API and ping on their own listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Admin {
    /// Listen address, e.g. `127.0.0.1:8080`.
    pub address: String,
}

/// `log`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Log {
    /// `error`, `warn`, `info`, `debug`, `trace`; default `info` (`RUST_LOG` overrides).
    pub level: String,
    /// `text` or `json`; default `text`.
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `accessLog`: one line per TCP connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AccessLog {
    /// File to append to; stdout when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_path: Option<PathBuf>,
    /// `text` or `json`; default `text`.
    pub format: LogFormat,
}

/// `shutdown`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Shutdown {
    /// How long open connections may drain after SIGTERM; default 10s.
    pub grace_period: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace_period: Duration::from_secs(10),
        }
    }
}

/// `loadBalancer`: the dial retries and the passive hold-out of every TCP load balancer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancing {
    /// How long a server whose dial failed is left out of the rotation; `0s` never holds one
    /// out. Default 5s.
    pub hold_out: Duration,
    /// Dial attempts per connection, each on a different server when there is one. Default 3.
    pub dial_attempts: u32,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        LoadBalancing {
            hold_out: Duration::from_secs(5),
            dial_attempts: 3,
        }
    }
}
