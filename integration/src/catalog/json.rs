//! Consul's JSON: the output shapes (Go field names, `[]`/`{}` never `null`) and decoding of
//! request bodies the way Consul does it (keys matched case-insensitively, snake_case accepted,
//! durations as Go strings or nanosecond numbers).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::connect::{LeafCertificate, RootCertificate};
use super::model::{
    CheckDefinition, CheckKind, CheckStatus, NodeRegistration, ProxyConfig, ServiceAddress,
    ServiceRegistration, Weights,
};
use super::state::{CheckRec, NodeRec, ServiceRec};
use super::util::{duration_from_json, format_go_duration, rfc3339};

/// Serializes a value, pretty-printed (4 spaces and a final newline, as Consul) on `?pretty`.
pub(crate) fn to_body<T: Serialize + ?Sized>(value: &T, pretty: bool) -> bytes::Bytes {
    let result = if pretty {
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        value.serialize(&mut ser).map(|()| {
            buf.push(b'\n');
            buf
        })
    } else {
        serde_json::to_vec(value)
    };
    // Serializing these plain structs and maps cannot fail; an empty object is a safe fallback.
    bytes::Bytes::from(result.unwrap_or_else(|_| b"{}".to_vec()))
}

/// `{}`.
#[derive(Serialize)]
pub(crate) struct Empty {}

fn is_empty_str(s: &str) -> bool {
    s.is_empty()
}

fn is_zero_u16(n: &u16) -> bool {
    *n == 0
}

/// `structs.Node`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NodeJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: &'a BTreeMap<String, String>,
    meta: &'a BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

impl<'a> NodeJson<'a> {
    pub(crate) fn new(n: &'a NodeRec) -> Self {
        NodeJson {
            id: &n.id,
            node: &n.name,
            address: &n.address,
            datacenter: &n.datacenter,
            tagged_addresses: &n.tagged,
            meta: &n.meta,
            create_index: n.create_index,
            modify_index: n.modify_index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct WeightsJson {
    passing: u32,
    warning: u32,
}

impl From<Weights> for WeightsJson {
    fn from(w: Weights) -> Self {
        WeightsJson {
            passing: w.passing,
            warning: w.warning,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ServiceAddressJson<'a> {
    address: &'a str,
    port: u16,
}

fn tagged_json(map: &BTreeMap<String, ServiceAddress>) -> BTreeMap<&str, ServiceAddressJson<'_>> {
    map.iter()
        .map(|(k, v)| {
            (
                k.as_str(),
                ServiceAddressJson {
                    address: &v.address,
                    port: v.port,
                },
            )
        })
        .collect()
}

/// `structs.ConnectProxyConfig` as Consul renders it for any service.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ProxyJson<'a> {
    #[serde(skip_serializing_if = "is_empty_str")]
    destination_service_name: &'a str,
    #[serde(rename = "DestinationServiceID", skip_serializing_if = "is_empty_str")]
    destination_service_id: &'a str,
    #[serde(skip_serializing_if = "is_empty_str")]
    local_service_address: &'a str,
    #[serde(skip_serializing_if = "is_zero_u16")]
    local_service_port: u16,
    mode: &'static str,
    mesh_gateway: Empty,
    expose: Empty,
}

impl<'a> ProxyJson<'a> {
    fn new(p: Option<&'a ProxyConfig>) -> Self {
        ProxyJson {
            destination_service_name: p.map_or("", |p| &p.destination_service_name),
            destination_service_id: p.map_or("", |p| &p.destination_service_id),
            local_service_address: p.map_or("", |p| &p.local_service_address),
            local_service_port: p.map_or(0, |p| p.local_service_port),
            mode: "",
            mesh_gateway: Empty {},
            expose: Empty {},
        }
    }
}

/// `structs.ServiceConnect`: `{}` or `{"Native": true}`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ConnectJson {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    native: bool,
}

/// `structs.NodeService`, the `Service` of a health entry.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ServiceJson<'a> {
    #[serde(skip_serializing_if = "is_empty_str")]
    kind: &'a str,
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    tags: &'a [String],
    address: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<&'a str, ServiceAddressJson<'a>>,
    meta: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "is_zero_u16")]
    port: u16,
    weights: WeightsJson,
    enable_tag_override: bool,
    proxy: ProxyJson<'a>,
    connect: ConnectJson,
    create_index: u64,
    modify_index: u64,
}

impl<'a> ServiceJson<'a> {
    pub(crate) fn new(s: &'a ServiceRec) -> Self {
        ServiceJson {
            kind: &s.kind,
            id: &s.id,
            service: &s.name,
            tags: &s.tags,
            address: &s.address,
            tagged_addresses: tagged_json(&s.tagged),
            meta: &s.meta,
            port: s.port,
            weights: s.weights.into(),
            enable_tag_override: s.enable_tag_override,
            proxy: ProxyJson::new(s.proxy.as_ref()),
            connect: ConnectJson { native: s.native },
            create_index: s.create_index,
            modify_index: s.modify_index,
        }
    }
}

/// `api.AgentService`, as `/v1/agent/services` lists services.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct AgentServiceJson<'a> {
    #[serde(skip_serializing_if = "is_empty_str")]
    kind: &'a str,
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    tags: &'a [String],
    meta: &'a BTreeMap<String, String>,
    port: u16,
    address: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<&'a str, ServiceAddressJson<'a>>,
    weights: WeightsJson,
    enable_tag_override: bool,
    datacenter: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<ProxyJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect: Option<ConnectJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_hash: Option<String>,
}

impl<'a> AgentServiceJson<'a> {
    pub(crate) fn new(s: &'a ServiceRec, datacenter: &'a str, with_hash: bool) -> Self {
        AgentServiceJson {
            kind: &s.kind,
            id: &s.id,
            service: &s.name,
            tags: &s.tags,
            meta: &s.meta,
            port: s.port,
            address: &s.address,
            tagged_addresses: tagged_json(&s.tagged),
            weights: s.weights.into(),
            enable_tag_override: s.enable_tag_override,
            datacenter,
            proxy: s.proxy.as_ref().map(|p| ProxyJson::new(Some(p))),
            connect: s.native.then_some(ConnectJson { native: true }),
            content_hash: with_hash.then(|| format!("{:016x}", s.modify_index)),
        }
    }
}

/// `structs.ServiceNode`, an entry of `/v1/catalog/service/<name>`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CatalogServiceJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: &'a BTreeMap<String, String>,
    node_meta: &'a BTreeMap<String, String>,
    service_kind: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    service_address: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    service_tagged_addresses: BTreeMap<&'a str, ServiceAddressJson<'a>>,
    service_weights: WeightsJson,
    service_meta: &'a BTreeMap<String, String>,
    service_port: u16,
    service_socket_path: &'a str,
    service_enable_tag_override: bool,
    service_proxy: ProxyJson<'a>,
    service_connect: ConnectJson,
    create_index: u64,
    modify_index: u64,
}

impl<'a> CatalogServiceJson<'a> {
    pub(crate) fn new(n: &'a NodeRec, s: &'a ServiceRec) -> Self {
        CatalogServiceJson {
            id: &n.id,
            node: &n.name,
            address: &n.address,
            datacenter: &n.datacenter,
            tagged_addresses: &n.tagged,
            node_meta: &n.meta,
            service_kind: &s.kind,
            service_id: &s.id,
            service_name: &s.name,
            service_tags: &s.tags,
            service_address: &s.address,
            service_tagged_addresses: tagged_json(&s.tagged),
            service_weights: s.weights.into(),
            service_meta: &s.meta,
            service_port: s.port,
            service_socket_path: "",
            service_enable_tag_override: s.enable_tag_override,
            service_proxy: ProxyJson::new(s.proxy.as_ref()),
            service_connect: ConnectJson { native: s.native },
            create_index: s.create_index,
            modify_index: s.modify_index,
        }
    }
}

/// `structs.HealthCheckDefinition`: every field omitted when empty.
#[derive(Serialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DefinitionJson {
    #[serde(rename = "HTTP", skip_serializing_if = "String::is_empty")]
    http: String,
    #[serde(rename = "TCP", skip_serializing_if = "String::is_empty")]
    tcp: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    interval: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    timeout: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    deregister_critical_service_after: String,
    #[serde(rename = "TTL", skip_serializing_if = "String::is_empty")]
    ttl: String,
}

fn dur(d: Option<Duration>) -> String {
    d.map(format_go_duration).unwrap_or_default()
}

/// `structs.HealthCheck`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CheckJson<'a> {
    node: &'a str,
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'a str,
    status: &'static str,
    notes: &'a str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    #[serde(rename = "Type")]
    check_type: &'a str,
    interval: String,
    timeout: String,
    exposed_port: u16,
    definition: DefinitionJson,
    create_index: u64,
    modify_index: u64,
}

impl<'a> CheckJson<'a> {
    pub(crate) fn new(c: &'a CheckRec) -> Self {
        let (interval, timeout) = c.interval_timeout();
        let mut definition = DefinitionJson {
            deregister_critical_service_after: dur(c.deregister_after),
            ..DefinitionJson::default()
        };
        match &c.kind {
            CheckKind::Ttl(ttl) => definition.ttl = format_go_duration(*ttl),
            CheckKind::Tcp { address, .. } => {
                definition.tcp = address.clone();
                definition.interval = dur(interval);
                definition.timeout = dur(timeout);
            }
            CheckKind::Http { url, .. } => {
                definition.http = url.clone();
                definition.interval = dur(interval);
                definition.timeout = dur(timeout);
            }
            CheckKind::Static { .. } => definition.interval = dur(interval),
        }
        CheckJson {
            node: &c.node,
            check_id: &c.id,
            name: &c.name,
            status: c.status.as_str(),
            notes: &c.notes,
            output: &c.output,
            service_id: &c.service_id,
            service_name: &c.service_name,
            service_tags: &c.service_tags,
            check_type: c.type_name(),
            interval: dur(interval),
            timeout: dur(timeout),
            exposed_port: 0,
            definition,
            create_index: c.create_index,
            modify_index: c.modify_index,
        }
    }
}

/// `structs.CheckServiceNode`: `{Node, Service, Checks}`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HealthEntryJson<'a> {
    pub(crate) node: NodeJson<'a>,
    pub(crate) service: ServiceJson<'a>,
    pub(crate) checks: Vec<CheckJson<'a>>,
}

/// `/v1/agent/health/service/...` entries.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct AgentHealthJson<'a> {
    pub(crate) aggregated_status: &'static str,
    pub(crate) service: AgentServiceJson<'a>,
    pub(crate) checks: Vec<CheckJson<'a>>,
}

/// `/v1/catalog/node/<node>`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CatalogNodeJson<'a> {
    pub(crate) node: NodeJson<'a>,
    pub(crate) services: BTreeMap<&'a str, ServiceJson<'a>>,
}

/// One root of `/v1/agent/connect/ca/roots`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RootJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    serial_number: u64,
    #[serde(rename = "SigningKeyID")]
    signing_key_id: &'a str,
    external_trust_domain: &'a str,
    not_before: String,
    not_after: String,
    root_cert: &'a str,
    intermediate_certs: Vec<String>,
    active: bool,
    private_key_type: &'static str,
    private_key_bits: u32,
    rotated_out_at: String,
    create_index: u64,
    modify_index: u64,
}

/// `/v1/agent/connect/ca/roots`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RootsJson<'a> {
    #[serde(rename = "ActiveRootID")]
    active_root_id: &'a str,
    trust_domain: &'a str,
    roots: Vec<RootJson<'a>>,
}

/// Go's zero `time.Time`, which Consul prints for a root that was never rotated out.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

impl<'a> RootsJson<'a> {
    pub(crate) fn new(
        roots: &'a [RootCertificate],
        trust_domain: &'a str,
        cluster_id: &'a str,
    ) -> Self {
        let active = roots
            .iter()
            .find(|r| r.active)
            .map_or("", |r| r.id.as_str());
        RootsJson {
            active_root_id: active,
            trust_domain,
            roots: roots
                .iter()
                .map(|r| RootJson {
                    id: &r.id,
                    name: &r.name,
                    serial_number: r.serial_number,
                    signing_key_id: &r.signing_key_id,
                    external_trust_domain: cluster_id,
                    not_before: rfc3339(r.not_before),
                    not_after: rfc3339(r.not_after),
                    root_cert: &r.pem,
                    intermediate_certs: Vec::new(),
                    active: r.active,
                    private_key_type: "ec",
                    private_key_bits: 256,
                    rotated_out_at: r
                        .rotated_out_at
                        .map_or_else(|| GO_ZERO_TIME.to_owned(), rfc3339),
                    create_index: r.create_index,
                    modify_index: r.modify_index,
                })
                .collect(),
        }
    }
}

/// `/v1/agent/connect/ca/leaf/<service>`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct LeafJson<'a> {
    serial_number: &'a str,
    #[serde(rename = "CertPEM")]
    cert_pem: &'a str,
    #[serde(rename = "PrivateKeyPEM")]
    private_key_pem: &'a str,
    service: &'a str,
    #[serde(rename = "ServiceURI")]
    service_uri: &'a str,
    valid_after: String,
    valid_before: String,
    create_index: u64,
    modify_index: u64,
}

impl<'a> LeafJson<'a> {
    pub(crate) fn new(l: &'a LeafCertificate) -> Self {
        LeafJson {
            serial_number: &l.serial_number,
            cert_pem: &l.cert_pem,
            private_key_pem: &l.private_key_pem,
            service: &l.service,
            service_uri: &l.service_uri,
            valid_after: rfc3339(l.valid_after),
            valid_before: rfc3339(l.valid_before),
            create_index: l.create_index,
            modify_index: l.modify_index,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding request bodies
// ---------------------------------------------------------------------------------------------

/// Why a request body was refused; becomes `400 Request decode failed: …` unless it carries
/// its own status and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// `400 Request decode failed: <msg>`.
    Malformed(String),
    /// A validation answer with its own status and body, as Consul words it.
    Invalid { status: u16, body: String },
}

impl DecodeError {
    fn malformed(msg: impl Into<String>) -> Self {
        DecodeError::Malformed(msg.into())
    }

    fn bad_request(body: impl Into<String>) -> Self {
        DecodeError::Invalid {
            status: 400,
            body: body.into(),
        }
    }
}

/// Consul's message for a check with no usable type.
pub(crate) const INVALID_CHECK_MESSAGE: &str =
    "Must provide TTL or Script/DockerContainerID/HTTP/TCP and Interval";

fn norm(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A JSON object whose keys are looked up as Consul's decoder does (case-insensitively, with
/// snake_case accepted).
pub(crate) struct Obj<'a>(&'a Map<String, Value>);

impl<'a> Obj<'a> {
    pub(crate) fn from_value(v: &'a Value, what: &str) -> Result<Self, DecodeError> {
        match v {
            Value::Object(m) => Ok(Obj(m)),
            _ => Err(DecodeError::malformed(format!(
                "json: cannot unmarshal {} into Go value of type {what}",
                type_name(v)
            ))),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        let want = norm(key);
        self.0
            .iter()
            .find(|(k, _)| norm(k) == want)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    pub(crate) fn string(&self, key: &str) -> Result<String, DecodeError> {
        match self.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(mismatch(key, v, "string")),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, DecodeError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(mismatch(key, v, "bool")),
        }
    }

    fn port(&self, key: &str) -> Result<u16, DecodeError> {
        match self.get(key) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| mismatch(key, &Value::Number(n.clone()), "int")),
            Some(v) => Err(mismatch(key, v, "int")),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<i64>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| mismatch(key, &Value::Number(n.clone()), "int")),
            Some(v) => Err(mismatch(key, v, "int")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, DecodeError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(mismatch(key, other, "string")),
                })
                .collect(),
            Some(v) => Err(mismatch(key, v, "[]string")),
        }
    }

    fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>, DecodeError> {
        match self.get(key) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(mismatch(key, other, "string")),
                })
                .collect(),
            Some(v) => Err(mismatch(key, v, "map[string]string")),
        }
    }

    fn duration(&self, key: &str) -> Result<Option<Duration>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match duration_from_json(v) {
                Some(d) => Ok(Some(d)),
                None => Err(DecodeError::malformed(format!(
                    "time: invalid duration {v} in field {key}"
                ))),
            },
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn mismatch(key: &str, v: &Value, go_type: &str) -> DecodeError {
    DecodeError::malformed(format!(
        "json: cannot unmarshal {} into Go struct field .{key} of type {go_type}",
        type_name(v)
    ))
}

/// Parses a body as JSON (an empty body is `{}`, as Consul's decoder treats it for writes).
pub(crate) fn parse_body(body: &[u8]) -> Result<Value, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| DecodeError::malformed(e.to_string()))
}

/// Decodes a check definition of an agent registration (`CheckType`), validated as the agent
/// does.
pub(crate) fn decode_agent_check(v: &Value) -> Result<CheckDefinition, DecodeError> {
    let o = Obj::from_value(v, "structs.CheckType")?;
    let status = o.string("Status")?;
    let status = if status.is_empty() {
        None
    } else {
        Some(CheckStatus::parse(&status).ok_or_else(|| {
            DecodeError::bad_request("Status for checks must 'passing', 'warning', 'critical'")
        })?)
    };
    let interval = o.duration("Interval")?;
    let timeout = o.duration("Timeout")?;
    let ttl = o.duration("TTL")?;
    let tcp = o.string("TCP")?;
    let http = o.string("HTTP")?;
    let script = !o.strings("Args")?.is_empty()
        || !o.strings("ScriptArgs")?.is_empty()
        || !o.string("Script")?.is_empty();
    let has_interval = interval.is_some_and(|d| !d.is_zero());
    let mut def = if let Some(ttl) = ttl.filter(|d| !d.is_zero()) {
        CheckDefinition::ttl(ttl)
    } else if !tcp.is_empty() && has_interval {
        let d = CheckDefinition::tcp(tcp, interval.unwrap_or_default());
        match timeout {
            Some(t) => d.timeout(t),
            None => d,
        }
    } else if !http.is_empty() && has_interval {
        let d = CheckDefinition::http(http, interval.unwrap_or_default());
        match timeout {
            Some(t) => d.timeout(t),
            None => d,
        }
    } else if script && has_interval {
        return Err(DecodeError::Invalid {
            status: 500,
            body: "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or 'enable_local_script_checks' to true".to_owned(),
        });
    } else if !o.string("GRPC")?.is_empty() && has_interval {
        CheckDefinition::unexecuted("grpc", interval)
    } else if !o.string("H2PING")?.is_empty() && has_interval {
        CheckDefinition::unexecuted("h2ping", interval)
    } else if !o.string("DockerContainerID")?.is_empty() && has_interval {
        CheckDefinition::unexecuted("docker", interval)
    } else if !o.string("AliasService")?.is_empty() || !o.string("AliasNode")?.is_empty() {
        CheckDefinition::unexecuted("alias", None)
    } else {
        return Err(DecodeError::bad_request(INVALID_CHECK_MESSAGE));
    };
    let id = {
        let id = o.string("CheckID")?;
        if id.is_empty() { o.string("ID")? } else { id }
    };
    if !id.is_empty() {
        def = def.id(id);
    }
    let name = o.string("Name")?;
    if !name.is_empty() {
        def = def.name(name);
    }
    def.notes = o.string("Notes")?;
    def.status = status;
    def.output = o.string("Output")?;
    def.deregister_critical_service_after = o.duration("DeregisterCriticalServiceAfter")?;
    let service_id = o.string("ServiceID")?;
    if !service_id.is_empty() {
        def.service_id = Some(service_id);
    }
    Ok(def)
}

fn decode_weights(o: &Obj<'_>) -> Result<Option<Weights>, DecodeError> {
    let Some(v) = o.get("Weights") else {
        return Ok(None);
    };
    let w = Obj::from_value(v, "structs.Weights")?;
    let passing = w.u32("Passing")?.unwrap_or(0);
    let warning = w.u32("Warning")?.unwrap_or(0);
    if passing < 1 {
        return Err(DecodeError::bad_request(
            "Invalid Weights: Passing must be greater than 0",
        ));
    }
    if warning < 0 {
        return Err(DecodeError::bad_request(
            "Invalid Weights: Warning must be greater or equal than 0",
        ));
    }
    if passing > 65535 || warning > 65535 {
        return Err(DecodeError::bad_request(
            "Invalid Weights: DNS Weight must be between 0 and 65535",
        ));
    }
    Ok(Some(Weights {
        passing: passing as u32,
        warning: warning as u32,
    }))
}

fn decode_tagged_service_addresses(
    o: &Obj<'_>,
) -> Result<BTreeMap<String, ServiceAddress>, DecodeError> {
    let Some(v) = o.get("TaggedAddresses") else {
        return Ok(BTreeMap::new());
    };
    let Value::Object(m) = v else {
        return Err(mismatch(
            "TaggedAddresses",
            v,
            "map[string]structs.ServiceAddress",
        ));
    };
    let mut out = BTreeMap::new();
    for (k, v) in m {
        let a = Obj::from_value(v, "structs.ServiceAddress")?;
        out.insert(
            k.clone(),
            ServiceAddress {
                address: a.string("Address")?,
                port: a.port("Port")?,
            },
        );
    }
    Ok(out)
}

fn decode_proxy(v: &Value) -> Result<ProxyConfig, DecodeError> {
    let p = Obj::from_value(v, "structs.ConnectProxyConfig")?;
    Ok(ProxyConfig {
        destination_service_name: p.string("DestinationServiceName")?,
        destination_service_id: p.string("DestinationServiceID")?,
        local_service_address: p.string("LocalServiceAddress")?,
        local_service_port: p.port("LocalServicePort")?,
    })
}

/// Decodes a service definition (`PUT /v1/agent/service/register`, or the `Service` of a
/// catalog registration when `agent` is false).
pub(crate) fn decode_service(v: &Value, agent: bool) -> Result<ServiceRegistration, DecodeError> {
    let o = Obj::from_value(v, "structs.ServiceDefinition")?;
    let name = {
        let n = o.string("Name")?;
        if n.is_empty() && !agent {
            o.string("Service")?
        } else {
            n
        }
    };
    let mut reg = ServiceRegistration::new(name);
    let id = o.string("ID")?;
    if !id.is_empty() {
        reg.id = Some(id);
    }
    reg.kind = o.string("Kind")?;
    reg.tags = o.strings("Tags")?;
    reg.address = o.string("Address")?;
    reg.port = o.port("Port")?;
    reg.meta = o.string_map("Meta")?;
    reg.weights = decode_weights(&o)?;
    reg.tagged_addresses = decode_tagged_service_addresses(&o)?;
    reg.enable_tag_override = o.bool("EnableTagOverride")?;
    if let Some(p) = o.get("Proxy") {
        let proxy = decode_proxy(p)?;
        if reg.kind == "connect-proxy" {
            reg.proxy = Some(proxy);
        }
    }
    if reg.kind == "connect-proxy" && reg.proxy.is_none() {
        reg.proxy = Some(ProxyConfig::default());
    }
    if let Some(c) = o.get("Connect") {
        let c = Obj::from_value(c, "structs.ServiceConnect")?;
        reg.connect_native = c.bool("Native")?;
        if c.get("SidecarService").is_some() {
            return Err(DecodeError::bad_request(
                "Connect.SidecarService is not supported by the tagway dev catalog: register the proxy as its own service with Kind \"connect-proxy\"",
            ));
        }
    }
    if agent {
        if let Some(c) = o.get("Check")
            && c.as_object().is_some_and(|m| !m.is_empty())
        {
            reg.checks.push(decode_agent_check(c)?);
        }
        if let Some(cs) = o.get("Checks") {
            let Value::Array(items) = cs else {
                return Err(mismatch("Checks", cs, "structs.CheckTypes"));
            };
            for c in items {
                reg.checks.push(decode_agent_check(c)?);
            }
        }
    }
    Ok(reg)
}

/// Decodes a check of a catalog registration (`structs.HealthCheck`): stored, never run.
fn decode_catalog_check(v: &Value) -> Result<(Option<String>, CheckDefinition), DecodeError> {
    let o = Obj::from_value(v, "structs.HealthCheck")?;
    let status = o.string("Status")?;
    let status = if status.is_empty() {
        CheckStatus::Critical
    } else {
        CheckStatus::parse(&status)
            .ok_or_else(|| DecodeError::bad_request(format!("Invalid check status: '{status}'")))?
    };
    let mut type_name = o.string("Type")?;
    let mut interval = None;
    if let Some(d) = o.get("Definition") {
        let d = Obj::from_value(d, "structs.HealthCheckDefinition")?;
        interval = d.duration("Interval")?;
        if type_name.is_empty() {
            if !d.string("TCP")?.is_empty() {
                type_name = "tcp".to_owned();
            } else if !d.string("HTTP")?.is_empty() {
                type_name = "http".to_owned();
            }
        }
    }
    let mut def = CheckDefinition::unexecuted(type_name, interval).status(status);
    let id = o.string("CheckID")?;
    if !id.is_empty() {
        def = def.id(id);
    }
    let name = o.string("Name")?;
    if !name.is_empty() {
        def = def.name(name);
    }
    def.notes = o.string("Notes")?;
    def.output = o.string("Output")?;
    let service_id = o.string("ServiceID")?;
    if !service_id.is_empty() {
        def.service_id = Some(service_id);
    }
    let node = o.string("Node")?;
    Ok(((!node.is_empty()).then_some(node), def))
}

/// A decoded `PUT /v1/catalog/register`.
pub(crate) struct CatalogRegister {
    pub(crate) datacenter: String,
    pub(crate) node: NodeRegistration,
    pub(crate) skip_node_update: bool,
}

/// Decodes `PUT /v1/catalog/register`.
pub(crate) fn decode_catalog_register(v: &Value) -> Result<CatalogRegister, DecodeError> {
    let o = Obj::from_value(v, "structs.RegisterRequest")?;
    let node_name = o.string("Node")?;
    if node_name.is_empty() {
        return Err(DecodeError::bad_request("Must provide node"));
    }
    let skip_node_update = o.bool("SkipNodeUpdate")?;
    let address = o.string("Address")?;
    if address.is_empty() && !skip_node_update {
        return Err(DecodeError::bad_request(
            "Must provide address if SkipNodeUpdate is not set",
        ));
    }
    let mut node = NodeRegistration::new(node_name.clone(), address);
    let id = o.string("ID")?;
    if !id.is_empty() {
        node.id = Some(id);
    }
    node.tagged_addresses = o.string_map("TaggedAddresses")?;
    node.meta = o.string_map("NodeMeta")?;
    if let Some(s) = o.get("Service") {
        let svc = decode_service(s, false)?;
        if svc.name.is_empty() {
            return Err(DecodeError::bad_request("Must provide service name"));
        }
        node.services.push(svc);
    }
    let mut raw_checks = Vec::new();
    if let Some(c) = o.get("Check") {
        raw_checks.push(c);
    }
    if let Some(cs) = o.get("Checks") {
        let Value::Array(items) = cs else {
            return Err(mismatch("Checks", cs, "structs.HealthChecks"));
        };
        raw_checks.extend(items.iter());
    }
    for c in raw_checks {
        let (check_node, def) = decode_catalog_check(c)?;
        if check_node.is_some_and(|n| n != node_name) {
            return Err(DecodeError::bad_request(
                "Check node must match request node",
            ));
        }
        if def.id.is_none() {
            return Err(DecodeError::bad_request("Must provide check ID"));
        }
        node.checks.push(def);
    }
    Ok(CatalogRegister {
        datacenter: o.string("Datacenter")?,
        node,
        skip_node_update,
    })
}

/// A decoded `PUT /v1/catalog/deregister`.
pub(crate) struct CatalogDeregister {
    pub(crate) datacenter: String,
    pub(crate) node: String,
    pub(crate) service_id: String,
    pub(crate) check_id: String,
}

/// Decodes `PUT /v1/catalog/deregister`.
pub(crate) fn decode_catalog_deregister(v: &Value) -> Result<CatalogDeregister, DecodeError> {
    let o = Obj::from_value(v, "structs.DeregisterRequest")?;
    let node = o.string("Node")?;
    if node.is_empty() {
        return Err(DecodeError::bad_request("Must provide node"));
    }
    Ok(CatalogDeregister {
        datacenter: o.string("Datacenter")?,
        node,
        service_id: o.string("ServiceID")?,
        check_id: o.string("CheckID")?,
    })
}

/// Decodes the body of `PUT /v1/agent/check/update/<id>`.
pub(crate) fn decode_check_update(v: &Value) -> Result<(CheckStatus, String), DecodeError> {
    let o = Obj::from_value(v, "agent.checkUpdate")?;
    let status = o.string("Status")?;
    let status = CheckStatus::parse(&status)
        .ok_or_else(|| DecodeError::bad_request(format!("Invalid check status: '{status}'")))?;
    Ok((status, o.string("Output")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_match_case_insensitively_and_snake_case() {
        let v = json!({"name": "web", "id": "web-1", "tags": ["a"], "port": 80,
            "tagged_addresses": {"lan": {"address": "10.0.0.1", "port": 80}},
            "enable_tag_override": true, "meta": {"k": "v"},
            "checks": [{"ttl": "10s"}]});
        let reg = decode_service(&v, true).expect("decodes");
        assert_eq!(reg.name, "web");
        assert_eq!(reg.service_id(), "web-1");
        assert_eq!(reg.tags, vec!["a"]);
        assert_eq!(reg.port, 80);
        assert!(reg.enable_tag_override);
        assert_eq!(reg.tagged_addresses["lan"].address, "10.0.0.1");
        assert_eq!(reg.checks[0].kind, CheckKind::Ttl(Duration::from_secs(10)));
    }

    #[test]
    fn invalid_checks_answer_like_consul() {
        let v = json!({"Name": "web", "Check": {"Interval": "10s"}});
        assert_eq!(
            decode_service(&v, true).err(),
            Some(DecodeError::Invalid {
                status: 400,
                body: INVALID_CHECK_MESSAGE.to_owned()
            })
        );
        let v = json!({"Name": "web", "Check": {"TTL": "10s", "Status": "bogus"}});
        assert!(matches!(
            decode_service(&v, true),
            Err(DecodeError::Invalid { status: 400, .. })
        ));
        let v = json!({"Name": "web", "Weights": {"Passing": 0, "Warning": 1}});
        assert_eq!(
            decode_service(&v, true).err(),
            Some(DecodeError::Invalid {
                status: 400,
                body: "Invalid Weights: Passing must be greater than 0".to_owned()
            })
        );
        let v = json!({"Name": "web", "Port": "eighty"});
        assert!(matches!(
            decode_service(&v, true),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn durations_may_be_numbers_of_nanoseconds() {
        let v = json!({"TCP": "127.0.0.1:1", "Interval": 2_000_000_000u64});
        let c = decode_agent_check(&v).expect("decodes");
        assert!(
            matches!(c.kind, CheckKind::Tcp { interval, .. } if interval == Duration::from_secs(2))
        );
    }

    #[test]
    fn catalog_register_needs_node_and_address() {
        assert_eq!(
            decode_catalog_register(&json!({"Address": "1.2.3.4"})).err(),
            Some(DecodeError::Invalid {
                status: 400,
                body: "Must provide node".to_owned()
            })
        );
        assert!(decode_catalog_register(&json!({"Node": "n"})).is_err());
        let r = decode_catalog_register(&json!({"Node": "n", "Address": "1.2.3.4",
            "Service": {"Service": "db", "Port": 5432},
            "Checks": [{"CheckID": "db-ok", "ServiceID": "db", "Status": "passing"}]}))
        .expect("decodes");
        assert_eq!(r.node.services[0].name, "db");
        assert_eq!(r.node.checks[0].status, Some(CheckStatus::Passing));
    }

    #[test]
    fn pretty_bodies_are_indented_with_a_newline() {
        let b = to_body(&json!({"a": 1}), true);
        assert_eq!(&b[..], b"{\n    \"a\": 1\n}\n");
        assert_eq!(&to_body(&json!({"a": 1}), false)[..], b"{\"a\":1}");
    }
}
