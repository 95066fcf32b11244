//! Metrics of the Consul catalog provider.
//!
//! `tagway-provider-consul` cannot depend on this crate (dependencies flow config → transport →
//! provider-consul → gateway), so it records with the plain `metrics` macros under the names and
//! label values below; the recorder `tagway run` installs globally
//! ([`crate::observability::Metrics::install_global`]) exports them on `/metrics`. The functions
//! here are the reference calls (copy them, or call them from gateway-side code):
//!
//! ```
//! // in provider-consul, after each blocking query of a watch:
//! metrics::counter!("tagway_consul_watch_requests_total",
//!     "endpoint" => "health_service", "outcome" => "changed").increment(1);
//! metrics::gauge!("tagway_consul_watch_index", "watch" => "health").set(4242.0);
//! // number of services whose health is watched:
//! metrics::gauge!("tagway_consul_services_watched").set(12.0);
//! // the Connect leaf certificate in use (notAfter, Unix seconds):
//! metrics::gauge!("tagway_consul_connect_leaf_not_after_timestamp_seconds",
//!     "service" => "tagway").set(1_900_000_000.0);
//! ```
//!
//! Label values must be fixed words or configuration names (the watch group, the gateway's own
//! Connect service name), never a value read from a client. The time from a change to its use by
//! the data plane is measured by the gateway
//! ([`crate::observability::Observability::provider_updated`] →
//! `tagway_config_change_to_applied_seconds{provider="consulcatalog"}`).

use super::names;

/// `tagway_consul_watch_requests_total{endpoint, outcome}`.
pub const WATCH_REQUESTS: &str = names::CONSUL_WATCH_REQUESTS.name;
/// `tagway_consul_watch_index{watch}`.
pub const WATCH_INDEX: &str = names::CONSUL_WATCH_INDEX.name;
/// `tagway_consul_services_watched`.
pub const SERVICES_WATCHED: &str = names::CONSUL_SERVICES_WATCHED.name;
/// `tagway_consul_connect_leaf_not_after_timestamp_seconds{service}`.
pub const CONNECT_LEAF_NOT_AFTER: &str = names::CONSUL_LEAF_NOT_AFTER.name;

/// Values of the `endpoint` label.
pub mod endpoint {
    /// `/v1/catalog/services`.
    pub const CATALOG_SERVICES: &str = "catalog_services";
    /// `/v1/health/service/<name>` (or `/v1/health/connect/<name>`).
    pub const HEALTH_SERVICE: &str = "health_service";
    /// `/v1/agent/connect/ca/leaf/<service>`.
    pub const CONNECT_LEAF: &str = "connect_leaf";
    /// `/v1/agent/connect/ca/roots`.
    pub const CONNECT_ROOTS: &str = "connect_roots";
    /// `/v1/agent/self`.
    pub const AGENT_SELF: &str = "agent_self";
}

/// Values of the `outcome` label.
pub mod outcome {
    /// The answer carried a new index (new data).
    pub const CHANGED: &str = "changed";
    /// The blocking query timed out with the same index.
    pub const UNCHANGED: &str = "unchanged";
    /// The request failed (transport error, non-2xx status, undecodable body).
    pub const ERROR: &str = "error";
}

/// Values of the `watch` label of [`WATCH_INDEX`].
pub mod watch {
    /// The catalog services list.
    pub const CATALOG: &str = "catalog";
    /// The health of the watched services (the highest index among them).
    pub const HEALTH: &str = "health";
    /// The Connect leaf certificate and roots.
    pub const CONNECT: &str = "connect";
}

/// Counts one request of a watch.
pub fn watch_request(endpoint: &'static str, outcome: &'static str) {
    metrics::counter!(WATCH_REQUESTS, "endpoint" => endpoint, "outcome" => outcome).increment(1);
}

/// Sets the index a watch group blocks on.
pub fn watch_index(watch: &'static str, index: u64) {
    metrics::gauge!(WATCH_INDEX, "watch" => watch).set(index as f64);
}

/// Sets the number of services whose health is watched.
pub fn services_watched(n: usize) {
    metrics::gauge!(SERVICES_WATCHED).set(n as f64);
}

/// Sets the `notAfter` (Unix seconds) of the Connect leaf certificate of `service`.
pub fn connect_leaf_not_after(service: &str, not_after_unix: i64) {
    metrics::gauge!(CONNECT_LEAF_NOT_AFTER, "service" => service.to_owned())
        .set(not_after_unix as f64);
}
