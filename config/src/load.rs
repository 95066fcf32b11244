//! Loading static and dynamic configuration files (TOML or YAML).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::checks::{check_address, check_transport, parse_ip_or_cidr};
use crate::de::{Ctx, DeError, from_node};
use crate::dynamic::{Dynamic, ServersTransport};
use crate::error::{ConfigError, Warning};
use crate::node::{Node, Value};
use crate::origin::{Origin, Source};
use crate::static_config::StaticConfig;

/// A configuration file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// TOML (`.toml`).
    Toml,
    /// YAML (`.yaml`, `.yml`).
    Yaml,
}

impl Format {
    /// The format a file's extension names (`.toml`, `.yaml`, `.yml`, any case).
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

/// Parses text into a node tree.
pub(crate) fn parse(text: &str, format: Format, source: &Source) -> Result<Node, ConfigError> {
    match format {
        Format::Toml => crate::toml_reader::read(text, source),
        Format::Yaml => crate::yaml_reader::read(text, source),
    }
}

fn read_file(path: &Path) -> Result<(String, Format, Source), ConfigError> {
    let format = Format::from_path(path).ok_or_else(|| ConfigError::UnknownFormat {
        path: path.to_owned(),
    })?;
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok((text, format, Source::File(Arc::from(path))))
}

/// Origins recorded per key path.
type Origins = BTreeMap<String, Origin>;

/// Removes every node written at `origin`; true when something was removed.
fn remove_at(node: &mut Node, origin: &Origin) -> bool {
    let mut removed = false;
    match &mut node.value {
        Value::Map(entries) => {
            let before = entries.len();
            entries.retain(|e| &e.key_origin != origin && &e.value.origin != origin);
            removed |= entries.len() != before;
            for e in entries.iter_mut() {
                removed |= remove_at(&mut e.value, origin);
            }
        }
        Value::Seq(items) => {
            let before = items.len();
            items.retain(|n| &n.origin != origin);
            removed |= items.len() != before;
            for n in items.iter_mut() {
                removed |= remove_at(n, origin);
            }
        }
        _ => {}
    }
    removed
}

/// Deserializes `T` from `root`, collecting every error: after an error, the offending node is
/// removed and deserialization is retried (bounded), so one mistake doesn't hide the next.
pub(crate) fn deserialize_collecting<T: for<'de> Deserialize<'de>>(
    root: &mut Node,
) -> (Option<(T, Origins)>, Vec<DeError>) {
    let mut errors = Vec::new();
    for _ in 0..256 {
        let ctx = Ctx::default();
        match from_node::<T>(root, "", &ctx) {
            Ok(v) => return (Some((v, ctx.into_origins())), errors),
            Err(e) => {
                let progressed = e.origin.as_ref().is_some_and(|o| remove_at(root, o));
                errors.push(e);
                if !progressed {
                    return (None, errors);
                }
            }
        }
    }
    (None, errors)
}

fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Loads the static configuration (TOML or YAML, by extension). Keys are case-insensitive,
/// relative paths are resolved against the file's folder, errors name the file and line.
pub fn load_static(path: &Path) -> Result<StaticConfig, ConfigError> {
    let (text, format, source) = read_file(path)?;
    let mut root = parse(&text, format, &source)?;
    if matches!(root.value, Value::Null) {
        root.value = Value::Map(Vec::new());
    }
    let (value, errors) = deserialize_collecting::<StaticConfig>(&mut root);
    let mut errors: Vec<ConfigError> = errors.into_iter().map(ConfigError::from).collect();
    if let Some((mut st, origins)) = value {
        st.resolve_paths(&base_dir(path));
        errors.extend(check_static(&st, &origins));
        if errors.is_empty() {
            return Ok(st);
        }
    }
    Err(
        ConfigError::from_list(errors).unwrap_or_else(|| ConfigError::Invalid {
            key: String::new(),
            origin: None,
            message: "invalid configuration".to_owned(),
        }),
    )
}

/// Loads one dynamic configuration file (TOML or YAML, by extension). Relative certificate paths
/// are resolved against the file's folder. Top-level `http` and `udp` sections are ignored with a
/// warning (in [`crate::Meta::warnings`]): tagway is TCP-only.
pub fn load_dynamic_file(path: &Path) -> Result<Dynamic, ConfigError> {
    let (text, format, source) = read_file(path)?;
    let root = parse(&text, format, &source)?;
    dynamic_from_node(root, Some(&base_dir(path)), false)
}

/// Loads a dynamic configuration from text; `origin` names the text in errors (`name:line:col`).
/// Relative paths are left as written.
pub fn load_dynamic_str(text: &str, format: Format, origin: &str) -> Result<Dynamic, ConfigError> {
    let source = Source::Text(Arc::from(origin));
    let root = parse(text, format, &source)?;
    dynamic_from_node(root, None, false)
}

/// Reads any serde type from TOML or YAML text with the same rules as the configuration files
/// (case-insensitive keys, unknown keys rejected, Traefik's scalar conversions); `origin` names
/// the text in errors.
pub fn from_str<T: serde::de::DeserializeOwned>(
    text: &str,
    format: Format,
    origin: &str,
) -> Result<T, ConfigError> {
    let source = Source::Text(Arc::from(origin));
    let mut root = parse(text, format, &source)?;
    let (value, errors) = deserialize_collecting::<T>(&mut root);
    match value {
        Some((v, _)) if errors.is_empty() => Ok(v),
        _ => Err(
            ConfigError::from_list(errors.into_iter().map(ConfigError::from).collect())
                .unwrap_or_else(|| ConfigError::Invalid {
                    key: String::new(),
                    origin: None,
                    message: "invalid value".to_owned(),
                }),
        ),
    }
}

/// Node tree → dynamic configuration. `from_tags` allows tag-only keys (`loadBalancer.server`).
pub(crate) fn dynamic_from_node(
    mut root: Node,
    base: Option<&Path>,
    from_tags: bool,
) -> Result<Dynamic, ConfigError> {
    let mut warnings = Vec::new();
    match &mut root.value {
        Value::Null => root.value = Value::Map(Vec::new()),
        Value::Map(entries) => {
            entries.retain(|e| {
                let k = e.key.trim().to_ascii_lowercase();
                if k == "http" || k == "udp" {
                    warnings.push(Warning {
                        origin: Some(e.key_origin.clone()),
                        key: e.key.clone(),
                        message: format!(
                            "ignored: tagway is a TCP gateway and has no {} routers, services or middlewares",
                            k.to_ascii_uppercase()
                        ),
                    });
                    false
                } else {
                    true
                }
            });
        }
        _ => {
            return Err(ConfigError::Invalid {
                key: String::new(),
                origin: Some(root.origin.clone()),
                message: format!(
                    "expected a table with `tcp` and `tls` sections, found {}",
                    root.type_name()
                ),
            });
        }
    }
    let (value, errors) = deserialize_collecting::<Dynamic>(&mut root);
    let mut errors: Vec<ConfigError> = errors.into_iter().map(ConfigError::from).collect();
    let Some((mut d, origins)) = value else {
        return Err(
            ConfigError::from_list(errors).unwrap_or_else(|| ConfigError::Invalid {
                key: String::new(),
                origin: Some(root.origin.clone()),
                message: "invalid configuration".to_owned(),
            }),
        );
    };
    d.meta.set_origins(origins);
    d.meta.warnings = warnings;
    if !from_tags {
        for (name, svc) in &d.tcp.services {
            if let Some(lb) = &svc.load_balancer
                && lb.server.is_some()
            {
                let key = format!("tcp.services.{name}.loadBalancer.server");
                errors.push(ConfigError::Invalid {
                    origin: d.meta.origin(&key).cloned(),
                    key,
                    message: "`server` is only valid in tags (a template applied to each Consul instance); in files, list the servers under `servers` with their `address`".to_owned(),
                });
            }
        }
    }
    if let Some(e) = ConfigError::from_list(errors) {
        return Err(e);
    }
    if let Some(base) = base {
        d.resolve_paths(base);
    }
    Ok(d)
}

impl Dynamic {
    /// Makes relative certificate and CA paths absolute against `dir` (inline PEM untouched).
    pub fn resolve_paths(&mut self, dir: &Path) {
        self.tcp
            .servers_transports
            .for_each_mut(|_, t| t.resolve_paths(dir));
        for c in &mut self.tls.certificates {
            c.cert_file.resolve_against(dir);
            c.key_file.resolve_against(dir);
        }
        for s in self.tls.stores.values_mut() {
            if let Some(c) = &mut s.default_certificate {
                c.cert_file.resolve_against(dir);
                c.key_file.resolve_against(dir);
            }
        }
        for o in self.tls.options.values_mut() {
            if let Some(ca) = &mut o.client_auth {
                for f in &mut ca.ca_files {
                    f.resolve_against(dir);
                }
            }
        }
    }
}

impl ServersTransport {
    /// Makes relative certificate and CA paths absolute against `dir`.
    pub fn resolve_paths(&mut self, dir: &Path) {
        if let Some(tls) = &mut self.tls {
            for c in &mut tls.certificates {
                c.resolve_against(dir);
            }
            for f in &mut tls.root_cas {
                f.resolve_against(dir);
            }
        }
    }
}

fn resolve(p: &mut Option<PathBuf>, dir: &Path) {
    if let Some(path) = p
        && path.is_relative()
    {
        *path = dir.join(&*path);
    }
}

impl StaticConfig {
    /// Makes relative paths (provider file/directory, SPIFFE files, Consul TLS files, transport
    /// certificates, access log) absolute against `dir`.
    pub fn resolve_paths(&mut self, dir: &Path) {
        self.tcp_servers_transport.resolve_paths(dir);
        if let Some(f) = &mut self.providers.file {
            resolve(&mut f.filename, dir);
            resolve(&mut f.directory, dir);
        }
        if let Some(s) = &mut self.providers.spiffe {
            resolve(&mut s.certificate, dir);
            resolve(&mut s.key, dir);
            resolve(&mut s.bundle, dir);
        }
        if let Some(c) = &mut self.providers.consul_catalog {
            resolve(&mut c.endpoint.token_file, dir);
            if let Some(t) = &mut c.endpoint.tls {
                resolve(&mut t.ca, dir);
                resolve(&mut t.cert, dir);
                resolve(&mut t.key, dir);
            }
        }
        if let Some(a) = &mut self.access_log {
            resolve(&mut a.file_path, dir);
        }
    }
}

/// Checks the values of a static configuration.
fn check_static(st: &StaticConfig, origins: &BTreeMap<String, Origin>) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut err = |key: String, message: String| {
        let mut p = key.as_str();
        let origin = loop {
            if let Some(o) = origins.get(p) {
                break Some(o.clone());
            }
            match crate::meta::parent_path(p) {
                Some(parent) => p = parent,
                None => break None,
            }
        };
        errors.push(ConfigError::Invalid {
            key,
            origin,
            message,
        });
    };
    for (name, ep) in &st.entry_points {
        if let Err(m) = check_address(&ep.address, true) {
            err(format!("entryPoints.{name}.address"), m);
        }
        if let Some(pp) = &ep.proxy_protocol {
            for (i, ip) in pp.trusted_ips.iter().enumerate() {
                if let Err(m) = parse_ip_or_cidr(ip) {
                    err(
                        format!("entryPoints.{name}.proxyProtocol.trustedIPs[{i}]"),
                        m,
                    );
                }
            }
        }
        if ep.max_connections == Some(0) {
            err(
                format!("entryPoints.{name}.maxConnections"),
                "maxConnections = 0 would refuse every connection: remove it for no limit"
                    .to_owned(),
            );
        }
    }
    for p in check_transport(&st.tcp_servers_transport) {
        err(format!("tcpServersTransport.{}", p.key), p.message);
    }
    if let Some(f) = &st.providers.file {
        match (&f.filename, &f.directory) {
            (Some(_), Some(_)) => err(
                "providers.file".to_owned(),
                "set either `filename` or `directory`, not both".to_owned(),
            ),
            (None, None) => err(
                "providers.file".to_owned(),
                "set `filename` (one file) or `directory` (a folder of .toml/.yaml files)"
                    .to_owned(),
            ),
            _ => {}
        }
    }
    if let Some(s) = &st.providers.spiffe {
        let files = s.certificate.is_some() || s.key.is_some() || s.bundle.is_some();
        if s.workload_api_addr.is_some() && files {
            err(
                "providers.spiffe".to_owned(),
                "set either `workloadAPIAddr` or the `certificate`/`key`/`bundle` files, not both"
                    .to_owned(),
            );
        } else if files && (s.certificate.is_none() || s.key.is_none() || s.bundle.is_none()) {
            err(
                "providers.spiffe".to_owned(),
                "file-based SPIFFE identity needs `certificate`, `key` and `bundle`".to_owned(),
            );
        }
    }
    if let Some(c) = &st.providers.consul_catalog {
        if let Some(scheme) = &c.endpoint.scheme
            && scheme != "http"
            && scheme != "https"
        {
            err(
                "providers.consulCatalog.endpoint.scheme".to_owned(),
                format!("unknown scheme `{scheme}`: use http or https"),
            );
        }
        for (i, s) in c.strict_checks.iter().enumerate() {
            if !matches!(
                s.as_str(),
                "passing" | "warning" | "critical" | "maintenance"
            ) {
                err(
                    format!("providers.consulCatalog.strictChecks[{i}]"),
                    format!(
                        "unknown check status `{s}`: use passing, warning, critical or maintenance"
                    ),
                );
            }
        }
        if c.prefix.trim().is_empty() || c.prefix.contains('=') {
            err(
                "providers.consulCatalog.prefix".to_owned(),
                format!("`{}` is not a tag prefix (e.g. `traefik`)", c.prefix),
            );
        }
        if c.refresh_interval.is_negative() || c.refresh_interval.is_zero() {
            err(
                "providers.consulCatalog.refreshInterval".to_owned(),
                "refreshInterval must be positive".to_owned(),
            );
        }
    }
    if let Some(a) = &st.admin
        && let Err(m) = check_address(&a.address, true)
    {
        err("admin.address".to_owned(), m);
    }
    let level = st.log.level.trim().to_ascii_lowercase();
    if !matches!(
        level.as_str(),
        "error" | "warn" | "warning" | "info" | "debug" | "trace" | "off"
    ) {
        err(
            "log.level".to_owned(),
            format!(
                "unknown log level `{}`: use error, warn, info, debug or trace",
                st.log.level
            ),
        );
    }
    if st.shutdown.grace_period.is_negative() {
        err(
            "shutdown.gracePeriod".to_owned(),
            "gracePeriod must not be negative".to_owned(),
        );
    }
    if st.load_balancer.hold_out.is_negative() {
        err(
            "loadBalancer.holdOut".to_owned(),
            "holdOut must not be negative (0s never holds a server out)".to_owned(),
        );
    }
    if st.load_balancer.dial_attempts == 0 {
        err(
            "loadBalancer.dialAttempts".to_owned(),
            "dialAttempts must be at least 1".to_owned(),
        );
    }
    errors
}
