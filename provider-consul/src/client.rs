//! The Consul HTTP client: endpoint settings, TLS, ACL token, consistency modes, blocking queries.
//!
//! Built on reqwest with a rustls configuration that uses the **ring** provider explicitly (handed to
//! reqwest as a preconfigured backend, so reqwest's own provider selection and platform verifier are
//! never used). One client is shared by every watch: connections are pooled and reused; when Consul
//! speaks HTTPS with HTTP/2, all queries share one connection.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{StatusCode, Url};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::de::DeserializeOwned;
use tagway_config::ConsulEndpoint;

use crate::token::TokenSource;

/// Consul's default address when neither the configuration nor `CONSUL_HTTP_ADDR` gives one.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";

/// Why talking to Consul failed. Every variant names the endpoint (or the file) involved; none
/// ever contains the ACL token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// `endpoint.address` / `CONSUL_HTTP_ADDR` is not `host:port` or a URL.
    #[error("invalid Consul address {address:?} (from {origin}): {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// Which setting gave it (`endpoint.address`, `CONSUL_HTTP_ADDR`).
        origin: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Two settings that exclude each other.
    #[error("invalid Consul settings: {message}")]
    InvalidSettings {
        /// What is wrong, naming the keys.
        message: String,
    },
    /// A token that cannot be sent as an HTTP header (the token itself is not shown).
    #[error("the Consul ACL token from {origin} contains characters not allowed in an HTTP header")]
    InvalidToken {
        /// `token`, or the token file's path.
        origin: String,
    },
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        /// What the file is (CA, client certificate, token file…).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TLS material that does not parse or does not fit together.
    #[error("invalid TLS settings for Consul ({what}): {reason}")]
    Tls {
        /// Which setting.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The request could not be sent or the answer not received (refused, reset, DNS…).
    #[error("GET {endpoint}: {source}")]
    Transport {
        /// Method-less URL without the query string.
        endpoint: String,
        /// reqwest's error (its Display never includes headers).
        #[source]
        source: reqwest::Error,
    },
    /// No complete answer within the request timeout.
    #[error("GET {endpoint}: no answer within {timeout:?}")]
    Timeout {
        /// URL without the query string.
        endpoint: String,
        /// The timeout applied.
        timeout: Duration,
    },
    /// Consul answered with an error status.
    #[error("GET {endpoint}: Consul answered {status}: {body}")]
    Status {
        /// URL without the query string.
        endpoint: String,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the answer's body (Consul's error message).
        body: String,
    },
    /// The answer is not the JSON expected.
    #[error("GET {endpoint}: unexpected answer: {source}")]
    Decode {
        /// URL without the query string.
        endpoint: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// Building the HTTP client failed.
    #[error("cannot build the HTTP client for Consul at {endpoint}: {source}")]
    Build {
        /// Consul's base URL.
        endpoint: String,
        /// reqwest's error.
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The HTTP status when Consul answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for Consul answering `404 Not Found` (an endpoint it does not have).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// Read consistency of every query (Consul's `stale`, `consistent`, default otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Consul's default mode: reads from the leader, possibly stale during a leader change.
    #[default]
    Default,
    /// `?stale`: any server answers.
    Stale,
    /// `?consistent`: the leader confirms its leadership first.
    Consistent,
}

/// TLS toward Consul, resolved from the configuration and `CONSUL_*` variables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA bundle (PEM); the webpki roots when unset.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub key: Option<PathBuf>,
    /// Accept any server certificate (handshake signatures are still checked).
    pub insecure_skip_verify: bool,
}

/// Everything needed to reach Consul, after applying the `CONSUL_*` environment variables.
pub struct Settings {
    /// `scheme://host:port` of the Consul HTTP API.
    pub base: Url,
    /// Datacenter sent as `?dc=` when set.
    pub datacenter: Option<String>,
    /// The ACL token.
    pub token: TokenSource,
    /// TLS settings (used when the scheme is `https`).
    pub tls: TlsSettings,
    /// Basic authentication `(user, password)`.
    pub http_auth: Option<(String, String)>,
    /// Read consistency.
    pub consistency: Consistency,
    /// `?cached`: answers from the agent's cache.
    pub cached: bool,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("base", &self.base.as_str())
            .field("datacenter", &self.datacenter)
            .field("token", &self.token)
            .field("tls", &self.tls)
            .field("http_auth", &self.http_auth.as_ref().map(|(u, _)| u))
            .field("consistency", &self.consistency)
            .field("cached", &self.cached)
            .finish()
    }
}

impl Settings {
    /// Resolves the endpoint settings. `env` looks up environment variables (`std::env::var` in
    /// the gateway; a map in tests). The configuration wins over the environment:
    ///
    /// * address: `endpoint.address`, else `CONSUL_HTTP_ADDR`, else `127.0.0.1:8500`; either may
    ///   be `host:port` or `http(s)://host:port`;
    /// * scheme: `endpoint.scheme`, else the address's, else `https` when `CONSUL_HTTP_SSL=true`,
    ///   else `http`;
    /// * token: `endpoint.token`, else `endpoint.tokenFile`, else `CONSUL_HTTP_TOKEN_FILE`, else
    ///   `CONSUL_HTTP_TOKEN` (Consul's own client also prefers the file);
    /// * TLS files: `endpoint.tls.*`, else `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`,
    ///   `CONSUL_CLIENT_KEY`; `insecureSkipVerify` also from `CONSUL_HTTP_SSL_VERIFY=false`;
    /// * basic auth: `endpoint.httpAuth`, else `CONSUL_HTTP_AUTH=user:password`.
    pub fn resolve(
        ep: &ConsulEndpoint,
        stale: bool,
        require_consistent: bool,
        cache: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ClientError> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let (address, origin) = match &ep.address {
            Some(a) if !a.trim().is_empty() => (a.trim().to_owned(), "endpoint.address"),
            _ => match env("CONSUL_HTTP_ADDR") {
                Some(a) => (a.trim().to_owned(), "CONSUL_HTTP_ADDR"),
                None => (DEFAULT_ADDRESS.to_owned(), "the default"),
            },
        };
        let env_ssl = env("CONSUL_HTTP_SSL").is_some_and(|v| parse_bool(&v) == Some(true));
        let scheme = ep
            .scheme
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let base = parse_address(&address, origin, scheme, env_ssl)?;

        let token = if let Some(t) = ep.token.as_deref().filter(|t| !t.trim().is_empty()) {
            TokenSource::fixed(t)?
        } else if let Some(p) = &ep.token_file {
            TokenSource::file(p)?
        } else if let Some(p) = env("CONSUL_HTTP_TOKEN_FILE") {
            TokenSource::file(Path::new(&p))?
        } else if let Some(t) = env("CONSUL_HTTP_TOKEN") {
            TokenSource::fixed(&t)?
        } else {
            TokenSource::None
        };

        let cfg_tls = ep.tls.clone().unwrap_or_default();
        let tls = TlsSettings {
            ca: cfg_tls
                .ca
                .or_else(|| env("CONSUL_CACERT").map(PathBuf::from)),
            cert: cfg_tls
                .cert
                .or_else(|| env("CONSUL_CLIENT_CERT").map(PathBuf::from)),
            key: cfg_tls
                .key
                .or_else(|| env("CONSUL_CLIENT_KEY").map(PathBuf::from)),
            insecure_skip_verify: cfg_tls.insecure_skip_verify
                || env("CONSUL_HTTP_SSL_VERIFY").is_some_and(|v| parse_bool(&v) == Some(false)),
        };

        let http_auth = match &ep.http_auth {
            Some(a) => Some((a.username.clone(), a.password.clone())),
            None => env("CONSUL_HTTP_AUTH").map(|v| match v.split_once(':') {
                Some((u, p)) => (u.to_owned(), p.to_owned()),
                None => (v, String::new()),
            }),
        };

        let consistency = match (stale, require_consistent) {
            (true, true) => {
                return Err(ClientError::InvalidSettings {
                    message: "`stale` and `requireConsistent` cannot both be true".into(),
                });
            }
            (true, false) => Consistency::Stale,
            (false, true) => Consistency::Consistent,
            (false, false) => Consistency::Default,
        };
        if cache && consistency == Consistency::Consistent {
            return Err(ClientError::InvalidSettings {
                message: "`cache` cannot be used with `requireConsistent`".into(),
            });
        }
        let datacenter = ep
            .datacenter
            .as_deref()
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned);
        Ok(Settings {
            base,
            datacenter,
            token,
            tls,
            http_auth,
            consistency,
            cached: cache,
        })
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "yes" => Some(true),
        "0" | "f" | "false" | "no" => Some(false),
        _ => None,
    }
}

fn parse_address(
    address: &str,
    origin: &'static str,
    scheme: Option<&str>,
    env_ssl: bool,
) -> Result<Url, ClientError> {
    let bad = |reason: String| ClientError::InvalidAddress {
        address: address.to_owned(),
        origin,
        reason,
    };
    let (url_scheme, rest) = match address.split_once("://") {
        Some((s, rest)) => (Some(s.to_ascii_lowercase()), rest),
        None => (None, address),
    };
    let scheme = match (scheme, url_scheme.as_deref()) {
        (Some(s), _) => s.to_ascii_lowercase(),
        (None, Some(s)) => s.to_owned(),
        (None, None) if env_ssl => "https".into(),
        (None, None) => "http".into(),
    };
    if scheme != "http" && scheme != "https" {
        return Err(bad(format!(
            "scheme {scheme:?} is not supported (use http or https)"
        )));
    }
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(bad("expected host:port or http(s)://host:port".into()));
    }
    let url = Url::parse(&format!("{scheme}://{host}/")).map_err(|e| bad(e.to_string()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    Ok(url)
}

/// Options of one query.
#[derive(Clone, Debug, Default)]
pub struct QueryOptions<'a> {
    /// `?index=`: block until Consul's index for the answer exceeds this (0 = do not block).
    pub index: u64,
    /// `?wait=`: how long Consul may block (only sent with a non-zero index).
    pub wait: Option<Duration>,
    /// `?ns=`: Enterprise namespace, only sent when set.
    pub namespace: Option<&'a str>,
}

/// What Consul says about an answer besides its body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryMeta {
    /// `X-Consul-Index`, absent on endpoints that do not block (or buggy proxies).
    pub index: Option<u64>,
}

/// The shared Consul client. Cheap to clone.
#[derive(Clone)]
pub struct ConsulClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    settings: Settings,
    basic_auth: Option<HeaderValue>,
    request_timeout: Duration,
}

impl fmt::Debug for ConsulClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulClient")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl ConsulClient {
    /// Time allowed for a query that does not block (and margin added above a blocking query's
    /// `wait + wait/16`).
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// Builds the client. `max_idle` bounds the connections kept open for reuse.
    pub fn new(settings: Settings, max_idle: usize) -> Result<ConsulClient, ClientError> {
        let tls = tls_config(&settings.tls, settings.base.scheme() == "https")?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(max_idle)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("tagway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Build {
                endpoint: settings.base.to_string(),
                source,
            })?;
        let basic_auth = settings.http_auth.as_ref().map(|(u, p)| {
            let mut v = HeaderValue::from_str(&format!("Basic {}", base64(&format!("{u}:{p}"))))
                .expect("base64 is a valid header value");
            v.set_sensitive(true);
            v
        });
        Ok(ConsulClient {
            inner: Arc::new(Inner {
                http,
                settings,
                basic_auth,
                request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            }),
        })
    }

    /// The resolved settings.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Consul's base URL (`http://127.0.0.1:8500/`), for logs.
    pub fn base(&self) -> &Url {
        &self.inner.settings.base
    }

    /// The URL of an API path given as segments (each percent-encoded), e.g.
    /// `["v1", "health", "service", name]`.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.settings.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs have a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// The timeout of a request with this `wait`: above Consul's `wait + wait/16` jitter.
    pub fn timeout_for(&self, opts: &QueryOptions<'_>) -> Duration {
        match opts.wait {
            Some(w) if opts.index > 0 => w + w / 16 + self.inner.request_timeout,
            _ => self.inner.request_timeout,
        }
    }

    /// `GET` an API path and return the raw body with the query metadata.
    pub async fn get_bytes(
        &self,
        segments: &[&str],
        opts: &QueryOptions<'_>,
    ) -> Result<(reqwest::Response, QueryMeta), ClientError> {
        let s = &self.inner.settings;
        let mut url = self.url(segments);
        let endpoint = url.to_string();
        {
            let mut q = url.query_pairs_mut();
            if let Some(dc) = &s.datacenter {
                q.append_pair("dc", dc);
            }
            if let Some(ns) = opts.namespace {
                q.append_pair("ns", ns);
            }
            match s.consistency {
                Consistency::Default => {}
                Consistency::Stale => {
                    q.append_key_only("stale");
                }
                Consistency::Consistent => {
                    q.append_key_only("consistent");
                }
            }
            if s.cached {
                q.append_key_only("cached");
            }
            if opts.index > 0 {
                q.append_pair("index", &opts.index.to_string());
                if let Some(w) = opts.wait {
                    q.append_pair("wait", &format!("{}ms", w.as_millis().max(1)));
                }
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let mut req = self.inner.http.get(url);
        if let Some(t) = s.token.current()? {
            req = req.header("X-Consul-Token", t);
        }
        if let Some(a) = &self.inner.basic_auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let timeout = self.timeout_for(opts);
        let group = watch_group(segments);
        let result = self.send(req, timeout, endpoint).await;
        let outcome = match &result {
            Err(_) => "error",
            Ok((_, meta)) if opts.index > 0 && meta.index == Some(opts.index) => "unchanged",
            Ok(_) => "changed",
        };
        metrics::counter!(
            "tagway_consul_watch_requests_total",
            "endpoint" => group,
            "outcome" => outcome
        )
        .increment(1);
        if let Ok((_, QueryMeta { index: Some(i) })) = &result {
            metrics::gauge!("tagway_consul_watch_index", "watch" => group).set(*i as f64);
        }
        result
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
        endpoint: String,
    ) -> Result<(reqwest::Response, QueryMeta), ClientError> {
        let s = &self.inner.settings;
        let resp = req.timeout(timeout).send().await.map_err(|source| {
            if source.is_timeout() {
                ClientError::Timeout {
                    endpoint: endpoint.clone(),
                    timeout,
                }
            } else {
                ClientError::Transport {
                    endpoint: endpoint.clone(),
                    source: source.without_url(),
                }
            }
        })?;
        let status = resp.status();
        if !status.is_success() {
            if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
                s.token.invalidate();
            }
            let body = resp.text().await.unwrap_or_default();
            let body: String = body.trim().chars().take(300).collect();
            return Err(ClientError::Status {
                endpoint,
                status,
                body,
            });
        }
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        Ok((resp, QueryMeta { index }))
    }

    /// `GET` an API path and decode its JSON body.
    pub async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        opts: &QueryOptions<'_>,
    ) -> Result<(T, QueryMeta), ClientError> {
        let (resp, meta) = self.get_bytes(segments, opts).await?;
        let endpoint = || self.url(segments).to_string();
        let timeout = self.timeout_for(opts);
        let body = resp.bytes().await.map_err(|source| {
            if source.is_timeout() {
                ClientError::Timeout {
                    endpoint: endpoint(),
                    timeout,
                }
            } else {
                ClientError::Transport {
                    endpoint: endpoint(),
                    source: source.without_url(),
                }
            }
        })?;
        let value = serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
            endpoint: endpoint(),
            source,
        })?;
        Ok((value, meta))
    }
}

/// The fixed `endpoint` / `watch` label value of an API path (never a service name).
fn watch_group(segments: &[&str]) -> &'static str {
    let segments = match segments {
        ["v1", rest @ ..] => rest,
        all => all,
    };
    match segments {
        ["catalog", "services", ..] => "catalog_services",
        ["health", "service", ..] => "health_service",
        ["health", "connect", ..] => "health_connect",
        ["health", "state", ..] => "health_state",
        ["catalog", "service", ..] => "catalog_service",
        ["agent", "connect", "ca", "leaf", ..] => "connect_leaf",
        ["agent", "connect", "ca", "roots", ..] => "connect_roots",
        ["agent", "self", ..] => "agent_self",
        _ => "other",
    }
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The rustls configuration toward Consul, always with the ring provider.
fn tls_config(tls: &TlsSettings, https: bool) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls {
            what: "protocol versions".into(),
            reason: e.to_string(),
        })?;
    let builder = if tls.insecure_skip_verify {
        if https {
            tracing::warn!(
                "TLS verification of Consul's certificate is disabled (insecureSkipVerify)"
            );
        }
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca {
            Some(ca) if https => {
                let pem = std::fs::read(ca).map_err(|source| ClientError::ReadFile {
                    what: "Consul CA file",
                    path: ca.clone(),
                    source,
                })?;
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ClientError::Tls {
                        what: format!("CA file {}", ca.display()),
                        reason: e.to_string(),
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ClientError::Tls {
                        what: format!("CA file {}", ca.display()),
                        reason: "no usable certificate".into(),
                    });
                }
            }
            _ => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) if https => {
            let pem = std::fs::read(cert).map_err(|source| ClientError::ReadFile {
                what: "Consul client certificate",
                path: cert.clone(),
                source,
            })?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Tls {
                    what: format!("client certificate {}", cert.display()),
                    reason: e.to_string(),
                })?;
            if chain.is_empty() {
                return Err(ClientError::Tls {
                    what: format!("client certificate {}", cert.display()),
                    reason: "no certificate in the file".into(),
                });
            }
            let key_pem = std::fs::read(key).map_err(|source| ClientError::ReadFile {
                what: "Consul client key",
                path: key.clone(),
                source,
            })?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ClientError::Tls {
                    what: format!("client key {}", key.display()),
                    reason: e.to_string(),
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ClientError::Tls {
                    what: format!("client certificate {} and key", cert.display()),
                    reason: e.to_string(),
                })?
        }
        (Some(_), None) | (None, Some(_)) if https => {
            return Err(ClientError::Tls {
                what: "client certificate".into(),
                reason: "`cert` (CONSUL_CLIENT_CERT) and `key` (CONSUL_CLIENT_KEY) go together"
                    .into(),
            });
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// `insecureSkipVerify`: any certificate and name, but the handshake signatures are still checked
/// (so the connection is at least bound to the key of the certificate shown).
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tagway_config::{ConsulTls, HttpAuth};

    use super::*;
    use crate::test_stub::{Reply, Stub};

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn resolve(ep: &ConsulEndpoint, vars: &[(&str, &str)]) -> Result<Settings, ClientError> {
        Settings::resolve(ep, false, false, false, &env(vars))
    }

    #[test]
    fn address_forms_and_precedence() {
        let ep = ConsulEndpoint::default();
        assert_eq!(
            resolve(&ep, &[]).unwrap().base.as_str(),
            "http://127.0.0.1:8500/"
        );
        assert_eq!(
            resolve(&ep, &[("CONSUL_HTTP_ADDR", "https://consul.service:8501")])
                .unwrap()
                .base
                .as_str(),
            "https://consul.service:8501/"
        );
        assert_eq!(
            resolve(
                &ep,
                &[
                    ("CONSUL_HTTP_ADDR", "10.1.1.1:8501"),
                    ("CONSUL_HTTP_SSL", "true")
                ]
            )
            .unwrap()
            .base
            .as_str(),
            "https://10.1.1.1:8501/"
        );
        let ep = ConsulEndpoint {
            address: Some("http://[::1]:8500/".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(&ep, &[("CONSUL_HTTP_ADDR", "other:1")])
                .unwrap()
                .base
                .as_str(),
            "http://[::1]:8500/"
        );
        let ep = ConsulEndpoint {
            address: Some("consul:8500".into()),
            scheme: Some("https".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(&ep, &[]).unwrap().base.as_str(),
            "https://consul:8500/"
        );
    }

    #[test]
    fn bad_addresses_name_the_setting() {
        let ep = ConsulEndpoint {
            address: Some("ftp://x:1".into()),
            ..Default::default()
        };
        let e = resolve(&ep, &[]).unwrap_err().to_string();
        assert!(e.contains("endpoint.address") && e.contains("ftp"), "{e}");
        let e = resolve(
            &ConsulEndpoint::default(),
            &[("CONSUL_HTTP_ADDR", "http://host:1/some/path")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("CONSUL_HTTP_ADDR"), "{e}");
    }

    #[test]
    fn exclusive_consistency_modes_are_refused() {
        let e = Settings::resolve(&ConsulEndpoint::default(), true, true, false, &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stale") && e.contains("requireConsistent"),
            "{e}"
        );
    }

    #[test]
    fn tls_and_auth_come_from_the_environment_when_not_configured() {
        let s = resolve(
            &ConsulEndpoint::default(),
            &[
                ("CONSUL_CACERT", "/ca.pem"),
                ("CONSUL_CLIENT_CERT", "/c.pem"),
                ("CONSUL_CLIENT_KEY", "/k.pem"),
                ("CONSUL_HTTP_SSL_VERIFY", "false"),
                ("CONSUL_HTTP_AUTH", "user:pa:ss"),
            ],
        )
        .unwrap();
        assert_eq!(s.tls.ca.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(s.tls.cert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(s.tls.key.as_deref(), Some(Path::new("/k.pem")));
        assert!(s.tls.insecure_skip_verify);
        assert_eq!(s.http_auth, Some(("user".into(), "pa:ss".into())));
        assert!(!format!("{s:?}").contains("pa:ss"));

        let ep = ConsulEndpoint {
            tls: Some(ConsulTls {
                ca: Some("/mine.pem".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = resolve(&ep, &[("CONSUL_CACERT", "/ca.pem")]).unwrap();
        assert_eq!(s.tls.ca.as_deref(), Some(Path::new("/mine.pem")));
    }

    #[test]
    fn token_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "from-file").unwrap();
        let f = file.to_str().unwrap();
        let tok = |ep: &ConsulEndpoint, vars: &[(&str, &str)]| {
            resolve(ep, vars)
                .unwrap()
                .token
                .current()
                .unwrap()
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let none = ConsulEndpoint::default();
        assert_eq!(tok(&none, &[]), None);
        assert_eq!(
            tok(&none, &[("CONSUL_HTTP_TOKEN", "env")]).as_deref(),
            Some("env")
        );
        assert_eq!(
            tok(
                &none,
                &[("CONSUL_HTTP_TOKEN", "env"), ("CONSUL_HTTP_TOKEN_FILE", f)]
            )
            .as_deref(),
            Some("from-file")
        );
        let cfg = ConsulEndpoint {
            token: Some("cfg".into()),
            ..Default::default()
        };
        assert_eq!(
            tok(&cfg, &[("CONSUL_HTTP_TOKEN_FILE", f)]).as_deref(),
            Some("cfg")
        );
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(""), "");
        assert_eq!(base64("f"), "Zg==");
        assert_eq!(base64("fo"), "Zm8=");
        assert_eq!(base64("foo"), "Zm9v");
        assert_eq!(base64("user:pass"), "dXNlcjpwYXNz");
    }

    #[tokio::test]
    async fn sends_query_parameters_token_and_auth() {
        let stub = Stub::start(|_| {
            Reply::json(200, r#"{"web":["a"]}"#).with_header("X-Consul-Index", "42")
        })
        .await;
        let ep = ConsulEndpoint {
            address: Some(stub.addr().to_string()),
            datacenter: Some("dc2".into()),
            token: Some("secret-token".into()),
            http_auth: Some(HttpAuth {
                username: "u".into(),
                password: "p".into(),
            }),
            ..Default::default()
        };
        let s = Settings::resolve(&ep, true, false, true, &env(&[])).unwrap();
        let c = ConsulClient::new(s, 4).unwrap();
        let (v, meta): (crate::api::CatalogServices, _) = c
            .get(
                &["v1", "catalog", "services"],
                &QueryOptions {
                    index: 7,
                    wait: Some(Duration::from_secs(2)),
                    namespace: Some("team-a"),
                },
            )
            .await
            .unwrap();
        assert_eq!(v["web"], vec!["a".to_string()]);
        assert_eq!(meta.index, Some(42));
        let req = stub.requests().pop().unwrap();
        assert_eq!(req.path, "/v1/catalog/services");
        for p in [
            "dc=dc2",
            "ns=team-a",
            "stale",
            "cached",
            "index=7",
            "wait=2000ms",
        ] {
            assert!(req.query.split('&').any(|q| q == p), "{p} in {}", req.query);
        }
        assert_eq!(req.header("x-consul-token"), Some("secret-token"));
        assert_eq!(req.header("authorization"), Some("Basic dTpw"));
    }

    #[tokio::test]
    async fn no_namespace_or_index_parameters_unless_set() {
        let stub = Stub::start(|_| Reply::json(200, "[]")).await;
        let ep = ConsulEndpoint {
            address: Some(format!("http://{}", stub.addr())),
            ..Default::default()
        };
        let c = ConsulClient::new(resolve(&ep, &[]).unwrap(), 4).unwrap();
        let (v, meta): (Vec<crate::api::ServiceEntry>, _) = c
            .get(
                &["v1", "health", "service", "a b/c"],
                &QueryOptions::default(),
            )
            .await
            .unwrap();
        assert!(v.is_empty());
        assert_eq!(meta.index, None);
        let req = stub.requests().pop().unwrap();
        assert_eq!(req.path, "/v1/health/service/a%20b%2Fc");
        assert_eq!(req.query, "");
        assert_eq!(req.header("x-consul-token"), None);
    }

    #[tokio::test]
    async fn errors_name_endpoint_and_status_and_403_rereads_the_token_file() {
        let stub = Stub::start(|_| Reply::json(403, "ACL not found")).await;
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("tok");
        std::fs::write(&tf, "old").unwrap();
        let ep = ConsulEndpoint {
            address: Some(stub.addr().to_string()),
            token_file: Some(tf.clone()),
            ..Default::default()
        };
        let c = ConsulClient::new(resolve(&ep, &[]).unwrap(), 4).unwrap();
        let err = c
            .get::<crate::api::CatalogServices>(
                &["v1", "catalog", "services"],
                &QueryOptions::default(),
            )
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/v1/catalog/services"), "{msg}");
        assert!(
            msg.contains("403") && msg.contains("ACL not found"),
            "{msg}"
        );
        assert!(!msg.contains("old"), "token leaked: {msg}");
        assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
        // The 403 made the token source look at the file again right away.
        std::fs::write(&tf, "new-token").unwrap();
        let _ = c
            .get::<crate::api::CatalogServices>(
                &["v1", "catalog", "services"],
                &QueryOptions::default(),
            )
            .await;
        let reqs = stub.requests();
        assert_eq!(
            reqs.last().unwrap().header("x-consul-token"),
            Some("new-token")
        );
    }

    #[tokio::test]
    async fn connection_refused_names_the_endpoint() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let ep = ConsulEndpoint {
            address: Some(addr.to_string()),
            ..Default::default()
        };
        let c = ConsulClient::new(resolve(&ep, &[]).unwrap(), 4).unwrap();
        let err = c
            .get::<crate::api::CatalogServices>(
                &["v1", "catalog", "services"],
                &QueryOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}

#[cfg(test)]
mod tls_tests {
    use std::sync::Arc;

    use rustls::server::WebPkiClientVerifier;
    use tagway_config::ConsulTls;

    use super::*;
    use crate::test_pki::Ca;
    use crate::test_stub::{Reply, Stub};

    fn server_config(ca: &Ca, require_client: Option<&Ca>) -> rustls::ServerConfig {
        let leaf = ca.leaf(&["localhost", "127.0.0.1"], &[]);
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let b = match require_client {
            Some(cca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(cca.issuer.der().clone()).unwrap();
                b.with_client_cert_verifier(
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap(),
                )
            }
            None => b.with_no_client_auth(),
        };
        let mut cfg = b.with_single_cert(chain, key).unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg
    }

    async fn fetch(ep: ConsulEndpoint) -> Result<crate::api::CatalogServices, ClientError> {
        let s = Settings::resolve(&ep, false, false, false, &|_| None)?;
        let c = ConsulClient::new(s, 2)?;
        c.get(&["v1", "catalog", "services"], &QueryOptions::default())
            .await
            .map(|(v, _)| v)
    }

    #[tokio::test]
    async fn https_with_ca_file_and_client_certificate() {
        let server_ca = Ca::new("consul server CA");
        let client_ca = Ca::new("consul client CA");
        let stub = Stub::start_tls(
            |_| Reply::json(200, r#"{"db":[]}"#),
            server_config(&server_ca, Some(&client_ca)),
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, server_ca.pem()).unwrap();
        let client = client_ca.leaf(&["tagway"], &[]);
        let cert_path = dir.path().join("client.pem");
        let key_path = dir.path().join("client-key.pem");
        std::fs::write(&cert_path, &client.cert_pem).unwrap();
        std::fs::write(&key_path, &client.key_pem).unwrap();
        let address = Some(format!("https://localhost:{}", stub.addr().port()));

        let ok = fetch(ConsulEndpoint {
            address: address.clone(),
            tls: Some(ConsulTls {
                ca: Some(ca_path.clone()),
                cert: Some(cert_path.clone()),
                key: Some(key_path.clone()),
                insecure_skip_verify: false,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(ok.contains_key("db"));

        // Without the client certificate the server refuses the handshake.
        let err = fetch(ConsulEndpoint {
            address: address.clone(),
            tls: Some(ConsulTls {
                ca: Some(ca_path.clone()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("localhost"), "{err}");

        // With the webpki roots only, Consul's private CA is not trusted.
        let err = fetch(ConsulEndpoint {
            address: address.clone(),
            tls: Some(ConsulTls {
                cert: Some(cert_path.clone()),
                key: Some(key_path.clone()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");

        // insecureSkipVerify accepts the unknown CA.
        let ok = fetch(ConsulEndpoint {
            address,
            tls: Some(ConsulTls {
                cert: Some(cert_path),
                key: Some(key_path),
                insecure_skip_verify: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(ok.contains_key("db"));
    }

    #[test]
    fn tls_file_errors_name_the_file() {
        let ep = ConsulEndpoint {
            address: Some("https://localhost:1".into()),
            tls: Some(ConsulTls {
                ca: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Settings::resolve(&ep, false, false, false, &|_| None).unwrap();
        let e = ConsulClient::new(s, 1).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem") && e.contains("CA"), "{e}");

        let ep = ConsulEndpoint {
            address: Some("https://localhost:1".into()),
            tls: Some(ConsulTls {
                cert: Some("/c.pem".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Settings::resolve(&ep, false, false, false, &|_| None).unwrap();
        let e = ConsulClient::new(s, 1).unwrap_err().to_string();
        assert!(e.contains("CONSUL_CLIENT_KEY"), "{e}");
    }
}
