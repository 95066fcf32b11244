//! The parts of Consul's HTTP API answers the provider reads.
//!
//! Every field has a default so that older or newer Consul versions (and the dev catalog) that omit
//! a field still decode; unknown fields are ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `GET /v1/catalog/services`: service name → the union of its instances' tags.
pub type CatalogServices = BTreeMap<String, Vec<String>>;

/// One entry of `GET /v1/health/service/<name>` (or `/v1/health/connect/<name>`): an instance with
/// its node and every check that applies to it (node checks included).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceEntry {
    /// The node the instance runs on.
    pub node: Node,
    /// The instance.
    pub service: AgentService,
    /// Service and node checks.
    pub checks: Vec<HealthCheck>,
}

/// A Consul node.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Node {
    /// Node ID (a UUID).
    #[serde(rename = "ID")]
    pub id: String,
    /// Node name.
    pub node: String,
    /// Node address, used when the instance has none.
    pub address: String,
    /// The node's datacenter.
    pub datacenter: String,
}

/// A registered instance.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentService {
    /// Instance ID, unique on its node.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Tags (`null` in some Consul answers).
    #[serde(deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    /// Instance address; empty = the node's.
    pub address: String,
    /// Instance port.
    pub port: u16,
    /// Weights applied in passing and warning state.
    pub weights: Option<Weights>,
    /// Enterprise namespace; empty on Consul CE.
    pub namespace: String,
    /// `""` for a plain service, `connect-proxy` for a sidecar, etc.
    pub kind: String,
    /// Sidecar proxy settings (for `connect-proxy` instances).
    pub proxy: Option<Proxy>,
}

/// `Service.Proxy` of a sidecar.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Proxy {
    /// The service the sidecar fronts.
    pub destination_service_name: String,
}

/// `Service.Weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Weights {
    /// Weight while every check passes; Consul's default 1.
    pub passing: i64,
    /// Weight while a check warns; Consul's default 1.
    pub warning: i64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// A health check (of a service instance, or of a whole node when `service_id` is empty).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheck {
    /// The node the check runs on.
    pub node: String,
    /// Check ID; `_node_maintenance` and `_service_maintenance:<id>` mark maintenance.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// `passing`, `warning`, `critical` (or `maintenance` in some tools).
    pub status: String,
    /// The instance the check belongs to; empty for a node check.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// The service the check belongs to; empty for a node check.
    pub service_name: String,
}

/// Aggregated health of an instance, worst first (Consul's `AggregatedStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Every check passes (or there is none).
    Passing,
    /// At least one check warns.
    Warning,
    /// At least one check is critical.
    Critical,
    /// The node or the instance is in maintenance mode.
    Maintenance,
}

impl Health {
    /// The status as Consul writes it (`passing`, `warning`, `critical`, `maintenance`).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
            Health::Maintenance => "maintenance",
        }
    }

    /// Aggregates an instance's checks as Consul does: maintenance beats critical beats warning
    /// beats passing; an unknown status counts as critical.
    pub fn aggregate<'a>(checks: impl IntoIterator<Item = &'a HealthCheck>) -> Health {
        let mut worst = Health::Passing;
        for c in checks {
            let h = if c.check_id == "_node_maintenance"
                || c.check_id.starts_with("_service_maintenance:")
            {
                Health::Maintenance
            } else {
                match c.status.as_str() {
                    "passing" => Health::Passing,
                    "warning" => Health::Warning,
                    "maintenance" => Health::Maintenance,
                    _ => Health::Critical,
                }
            };
            worst = worst.max(h);
        }
        worst
    }
}

/// `GET /v1/agent/connect/ca/roots`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CaRoots {
    /// ID of the root signing new leaves.
    #[serde(rename = "ActiveRootID")]
    pub active_root_id: String,
    /// The cluster's SPIFFE trust domain (`<uuid>.consul`).
    pub trust_domain: String,
    /// Every root still trusted (old ones stay during a rotation).
    #[serde(deserialize_with = "null_as_default")]
    pub roots: Vec<CaRoot>,
}

/// One Connect CA root.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CaRoot {
    /// Root ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// PEM certificate.
    pub root_cert: String,
    /// PEM intermediates signed by this root.
    #[serde(deserialize_with = "null_as_default")]
    pub intermediate_certs: Vec<String>,
    /// True for the root signing new leaves.
    pub active: bool,
}

/// `GET /v1/agent/connect/ca/leaf/<service>`.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct LeafCert {
    /// Serial number (hex).
    pub serial_number: String,
    /// PEM certificate (and possibly intermediates).
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    /// PEM private key.
    #[serde(rename = "PrivateKeyPEM")]
    pub private_key_pem: String,
    /// The service the leaf identifies.
    pub service: String,
    /// The leaf's SPIFFE ID.
    #[serde(rename = "ServiceURI")]
    pub service_uri: String,
    /// Not valid before (RFC 3339).
    pub valid_after: String,
    /// Not valid after (RFC 3339).
    pub valid_before: String,
}

impl std::fmt::Debug for LeafCert {
    /// The private key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCert")
            .field("serial_number", &self.serial_number)
            .field("service", &self.service)
            .field("service_uri", &self.service_uri)
            .field("valid_after", &self.valid_after)
            .field("valid_before", &self.valid_before)
            .finish_non_exhaustive()
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_health_entry_as_consul_writes_it() {
        let json = r#"[{
            "Node": {"ID": "n-1", "Node": "node1", "Address": "10.0.0.1", "Datacenter": "dc1",
                     "TaggedAddresses": {"lan": "10.0.0.1"}, "Meta": {}},
            "Service": {"ID": "web-1", "Service": "web", "Tags": null, "Address": "",
                        "Port": 8080, "Weights": {"Passing": 3, "Warning": 1}, "Kind": ""},
            "Checks": [
              {"Node": "node1", "CheckID": "serfHealth", "Status": "passing", "ServiceID": "", "ServiceName": ""},
              {"Node": "node1", "CheckID": "_service_maintenance:web-1", "Status": "critical",
               "ServiceID": "web-1", "ServiceName": "web"}
            ]}]"#;
        let entries: Vec<ServiceEntry> = serde_json::from_str(json).unwrap();
        let e = &entries[0];
        assert_eq!(e.node.address, "10.0.0.1");
        assert!(e.service.tags.is_empty());
        assert_eq!(e.service.port, 8080);
        assert_eq!(
            e.service.weights,
            Some(Weights {
                passing: 3,
                warning: 1
            })
        );
        assert_eq!(Health::aggregate(&e.checks), Health::Maintenance);
    }

    #[test]
    fn aggregation_orders_statuses_like_consul() {
        let c = |id: &str, s: &str| HealthCheck {
            check_id: id.into(),
            status: s.into(),
            ..Default::default()
        };
        assert_eq!(Health::aggregate(&[]), Health::Passing);
        assert_eq!(
            Health::aggregate(&[c("a", "passing"), c("b", "warning")]),
            Health::Warning
        );
        assert_eq!(
            Health::aggregate(&[c("a", "critical"), c("b", "warning")]),
            Health::Critical
        );
        assert_eq!(
            Health::aggregate(&[c("a", "bogus")]),
            Health::Critical,
            "unknown statuses must not count as healthy"
        );
        assert_eq!(
            Health::aggregate(&[c("_node_maintenance", "critical"), c("b", "passing")]),
            Health::Maintenance
        );
    }

    #[test]
    fn leaf_debug_hides_the_key() {
        let leaf = LeafCert {
            private_key_pem: "-----BEGIN PRIVATE KEY-----secret".into(),
            ..Default::default()
        };
        assert!(!format!("{leaf:?}").contains("secret"));
    }
}
