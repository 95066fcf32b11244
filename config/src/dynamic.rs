//! Dynamic configuration: what providers produce (file provider, Consul catalog tags).
//!
//! Field names follow Traefik's TCP configuration keys (camelCase); the file and tag readers match
//! them case-insensitively, as Traefik does (so the seeds' `rootcas` reads as `rootCAs`).
//! Resource names are kept as written (`Service01` stays `Service01`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::meta::Meta;
use crate::resources::Resources;
use crate::tls::{ClientCertificate, FileOrContent};

/// A whole dynamic configuration: one provider's output, or the merge of all providers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Dynamic {
    /// TCP routers, services, middlewares and servers transports.
    #[serde(skip_serializing_if = "Tcp::is_empty")]
    pub tcp: Tcp,
    /// TLS certificates and options for TLS termination.
    #[serde(skip_serializing_if = "TlsSection::is_empty")]
    pub tls: TlsSection,
    /// Where each key was read (file:line or tag) and the readers' warnings. Not serialized;
    /// ignored by `==`.
    #[serde(skip)]
    pub meta: Meta,
}

/// The `tcp` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Tcp {
    /// `tcp.routers.<name>`.
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub routers: Resources<Router>,
    /// `tcp.services.<name>`.
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub services: Resources<Service>,
    /// `tcp.middlewares.<name>`.
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub middlewares: Resources<Middleware>,
    /// `tcp.serversTransports.<name>`.
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub servers_transports: Resources<ServersTransport>,
}

impl Tcp {
    /// True when no resource of any kind is declared.
    pub fn is_empty(&self) -> bool {
        self.routers.is_empty()
            && self.services.is_empty()
            && self.middlewares.is_empty()
            && self.servers_transports.is_empty()
    }
}

/// `tcp.routers.<name>`: which connections go to which service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Router {
    /// Entry points the router listens on; empty = every entry point.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entry_points: Vec<String>,
    /// The rule (``HostSNI(`*`)``, `HostSNIRegexp`, `ClientIP`, `ALPN`, `&&`, `||`, `!`).
    pub rule: String,
    /// Priority; when unset, the length of the rule (``HostSNI(`*`)`` lowest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// The service connections are sent to (`name` or `name@provider`).
    pub service: String,
    /// Middlewares applied in order (`name` or `name@provider`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub middlewares: Vec<String>,
    /// TLS: present = the router matches TLS connections (passthrough or termination).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub tls: Option<RouterTls>,
}

/// `tcp.routers.<name>.tls`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouterTls {
    /// Forward the encrypted stream untouched instead of terminating TLS.
    pub passthrough: bool,
    /// Name of a `tls.options.<name>` entry used when terminating.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    /// ACME certificate resolver (Traefik); tagway reports it as unsupported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_resolver: Option<String>,
    /// Domains (Traefik, used with a resolver).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<Domain>,
}

/// A domain of a router's TLS section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Domain {
    /// Main domain.
    pub main: String,
    /// Subject alternative names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sans: Vec<String>,
}

/// `tcp.services.<name>`: exactly one of `loadBalancer` or `weighted`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    /// Balances connections over servers.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub load_balancer: Option<LoadBalancer>,
    /// Balances connections over other services by weight.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub weighted: Option<Weighted>,
}

/// `tcp.services.<name>.loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancer {
    /// The servers (instances).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<Server>,
    /// Tags only: `…loadBalancer.server.port` / `.weight` / `.tls`, a template the Consul provider applies
    /// to every instance of the service. Not valid in files.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub server: Option<ServerTemplate>,
    /// The servers transport (`name`, `name@provider`); default `default@internal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub servers_transport: Option<String>,
    /// Active TCP health check.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub health_check: Option<HealthCheck>,
    /// Deprecated (Traefik v2): PROXY protocol toward the servers; prefer the transport's.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Deprecated (Traefik v2): termination delay in **milliseconds** (integer); prefer the transport's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_delay: Option<i64>,
}

/// One server of a load balancer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Server {
    /// `host:port` of the instance.
    pub address: String,
    /// Weight in the smooth weighted round-robin; default 1; 0 = never picked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// Dial this server with TLS even when the transport has no `tls` section.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

impl Server {
    /// The server's weight, 1 when unset.
    pub fn weight(&self) -> i64 {
        self.weight.unwrap_or(1)
    }
}

/// Tags only: `…loadBalancer.server.*`, applied to every instance by the Consul provider.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerTemplate {
    /// Port that overrides the instance's registered port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Weight that overrides Consul's `Weights`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// Dial instances with TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
}

/// `loadBalancer.healthCheck`: an active TCP check.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthCheck {
    /// Port to check instead of the server's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Bytes to send after connecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// Bytes the response must start with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// Interval between checks of a healthy server; default 30s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Interval between checks of an unhealthy server; default = `interval`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_interval: Option<Duration>,
    /// Timeout of one check (connect + send + expect); default 5s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

impl HealthCheck {
    /// Default interval between checks (30s, as Traefik).
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
    /// Default timeout of one check (5s, as Traefik).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Interval between checks of a healthy server.
    pub fn interval(&self) -> Duration {
        self.interval.unwrap_or(Self::DEFAULT_INTERVAL)
    }

    /// Interval between checks of an unhealthy server.
    pub fn unhealthy_interval(&self) -> Duration {
        self.unhealthy_interval.unwrap_or_else(|| self.interval())
    }

    /// Timeout of one check.
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Self::DEFAULT_TIMEOUT)
    }
}

/// `tcp.services.<name>.weighted`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Weighted {
    /// The services balanced over.
    pub services: Vec<WeightedService>,
}

/// One entry of `weighted.services`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WeightedService {
    /// Service name (`name` or `name@provider`).
    pub name: String,
    /// Weight; default 1; 0 = never picked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

impl WeightedService {
    /// The weight, 1 when unset.
    pub fn weight(&self) -> i64 {
        self.weight.unwrap_or(1)
    }
}

/// PROXY protocol toward backends. An empty section enables version 2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyProtocol {
    /// 1 or 2; default 2.
    pub version: u8,
    /// tagway extension: on TLS connections, send the header inside the TLS stream (after the
    /// handshake) instead of before it; what Consul Connect sidecars expect. Default false (Traefik's
    /// placement: before TLS).
    #[serde(rename = "insideTLS", skip_serializing_if = "std::ops::Not::not")]
    pub inside_tls: bool,
}

impl Default for ProxyProtocol {
    fn default() -> Self {
        ProxyProtocol {
            version: 2,
            inside_tls: false,
        }
    }
}

/// `tcp.serversTransports.<name>` (and the static `tcpServersTransport`, i.e. `default@internal`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServersTransport {
    /// Bounds TCP connect + PROXY header + TLS handshake; 0 = no timeout. Default 30s.
    pub dial_timeout: Duration,
    /// Keep-alive probe interval; 0 = 15s; negative = keep-alive off. Default 15s.
    pub dial_keep_alive: Duration,
    /// Deadline for the other side to close after one side half-closed; negative = none. Default 100ms.
    pub termination_delay: Duration,
    /// PROXY protocol toward the servers; an empty section = version 2.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// TLS toward the servers; an empty section enables TLS.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub tls: Option<TransportTls>,
    /// SPIFFE identity checks; an empty section accepts any SPIFFE ID.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub spiffe: Option<Spiffe>,
}

impl ServersTransport {
    /// Default `dialTimeout`.
    pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default `dialKeepAlive`.
    pub const DEFAULT_DIAL_KEEP_ALIVE: Duration = Duration::from_secs(15);
    /// Default `terminationDelay`.
    pub const DEFAULT_TERMINATION_DELAY: Duration = Duration::from_millis(100);
}

impl Default for ServersTransport {
    fn default() -> Self {
        ServersTransport {
            dial_timeout: Self::DEFAULT_DIAL_TIMEOUT,
            dial_keep_alive: Self::DEFAULT_DIAL_KEEP_ALIVE,
            termination_delay: Self::DEFAULT_TERMINATION_DELAY,
            proxy_protocol: None,
            tls: None,
            spiffe: None,
        }
    }
}

/// `serversTransport.tls`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TransportTls {
    /// SNI sent and name verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Client certificates for mTLS (file paths or PEM data; a string holds chain and key, or
    /// `{certFile, keyFile}`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<ClientCertificate>,
    /// Skip verification of the server's chain and name (logged as a warning).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// Root CAs (file paths or PEM data); default the webpki roots. Also spelt `rootcas`.
    #[serde(
        rename = "rootCAs",
        alias = "rootcas",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub root_cas: Vec<FileOrContent>,
    /// Verify the chain without a host-name check and require this URI SAN.
    #[serde(rename = "peerCertURI", skip_serializing_if = "Option::is_none")]
    pub peer_cert_uri: Option<String>,
}

/// `serversTransport.spiffe`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Spiffe {
    /// Allowed SPIFFE IDs (exact); take precedence over `trustDomain`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// Allowed trust domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

/// `tcp.middlewares.<name>`: exactly one kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Middleware {
    /// Allow only clients from these ranges (also read from Traefik's older `ipWhiteList`).
    #[serde(
        alias = "ipWhiteList",
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub ip_allow_list: Option<IpAllowList>,
    /// Limit simultaneous connections per client IP.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub in_flight_conn: Option<InFlightConn>,
}

/// `middlewares.<name>.ipAllowList`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IpAllowList {
    /// CIDRs or bare IPs.
    pub source_range: Vec<String>,
}

/// `middlewares.<name>.inFlightConn`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InFlightConn {
    /// Maximum simultaneous connections per client IP.
    pub amount: i64,
}

/// The dynamic `tls` section (TLS termination).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsSection {
    /// Certificates served when terminating TLS; SNI selects one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateEntry>,
    /// `tls.options.<name>`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, TlsOptions>,
    /// `tls.stores.<name>` (only `default` is used).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub stores: BTreeMap<String, TlsStore>,
}

impl TlsSection {
    /// True when nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty() && self.options.is_empty() && self.stores.is_empty()
    }
}

/// One `tls.certificates` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertificateEntry {
    /// Certificate chain (path or PEM data).
    pub cert_file: FileOrContent,
    /// Private key (path or PEM data).
    pub key_file: FileOrContent,
    /// Stores the certificate belongs to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stores: Vec<String>,
}

/// `tls.options.<name>`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsOptions {
    /// `VersionTLS12` or `VersionTLS13`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    /// `VersionTLS12` or `VersionTLS13`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_version: Option<String>,
    /// Cipher suites allowed, by their Go (Traefik) names, e.g.
    /// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`; see [`crate::tls::CIPHER_SUITES`]. TLS 1.3
    /// suites stay all enabled unless the list names one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
    /// Key exchange groups in order of preference (`X25519`, `CurveP256`, `CurveP384`); see
    /// [`crate::tls::CURVES`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub curve_preferences: Vec<String>,
    /// ALPN protocols offered.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn_protocols: Vec<String>,
    /// Refuse connections without a matching certificate's SNI.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sni_strict: bool,
    /// Client certificate authentication.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::de::section"
    )]
    pub client_auth: Option<ClientAuth>,
}

/// `tls.options.<name>.clientAuth`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientAuth {
    /// CA certificates client certificates must chain to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ca_files: Vec<FileOrContent>,
    /// `NoClientCert`, `RequestClientCert`, `RequireAnyClientCert`, `VerifyClientCertIfGiven`,
    /// `RequireAndVerifyClientCert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_auth_type: Option<String>,
}

/// `tls.stores.<name>`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsStore {
    /// Served when no certificate matches the SNI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_certificate: Option<CertificateEntry>,
}
