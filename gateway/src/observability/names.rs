//! Every metric tagway exports: name, type, labels and meaning (`docs/metrics.md` lists the same;
//! a test keeps the two in step).
//!
//! Label values come only from configuration (entry point, router, service and servers-transport
//! names, server addresses, provider names) or from fixed sets (`reason`, `direction`, `outcome`),
//! never from client input, so the number of series stays bounded.

/// The type of a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic counter (`_total`).
    Counter,
    /// Value that goes up and down.
    Gauge,
    /// Histogram with explicit buckets (never a summary).
    Histogram,
}

impl Kind {
    /// The `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family.
#[derive(Clone, Copy, Debug)]
pub struct Def {
    /// The name.
    pub name: &'static str,
    /// The type.
    pub kind: Kind,
    /// The label names.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

macro_rules! defs {
    ($( $(#[$doc:meta])* $id:ident = $name:literal, $kind:ident, [$($l:literal),*], $help:literal; )*) => {
        $( $(#[$doc])* pub const $id: Def = Def {
            name: $name, kind: Kind::$kind, labels: &[$($l),*], help: $help,
        }; )*
        /// Every metric, in documentation order.
        pub const ALL: &[Def] = &[$($id),*];
    };
}

defs! {
    /// Build information (value 1).
    INFO = "tagway_info", Gauge, ["version"], "tagway build information (value 1)";
    /// Process start time.
    START_TIME = "tagway_start_time_seconds", Gauge, [], "When the process started, seconds since the Unix epoch";

    /// Entry point open connections.
    EP_OPEN = "tagway_entrypoint_open_connections", Gauge, ["entrypoint"], "Connections open now on the entry point";
    /// Entry point accepted connections.
    EP_CONNECTIONS = "tagway_entrypoint_connections_total", Counter, ["entrypoint"], "Connections accepted by the entry point";
    /// Entry point accept errors.
    EP_ACCEPT_ERRORS = "tagway_entrypoint_accept_errors_total", Counter, ["entrypoint"], "Failed accept() calls (out of file descriptors, …)";
    /// Entry point TLS handshake failures (termination).
    EP_TLS_ERRORS = "tagway_entrypoint_tls_handshake_errors_total", Counter, ["entrypoint"], "TLS handshakes (termination) that failed";
    /// Routing failures by reason.
    ROUTING_FAILURES = "tagway_routing_failures_total", Counter, ["entrypoint", "reason"], "Connections that went nowhere, by reason (no_route, ip_allow_list, in_flight_limit, no_healthy_server, dial_failed, peek_timeout, peek_error, proxy_protocol)";

    /// Router open connections.
    ROUTER_OPEN = "tagway_router_open_connections", Gauge, ["router"], "Connections open now through the router";
    /// Router connections.
    ROUTER_CONNECTIONS = "tagway_router_connections_total", Counter, ["router"], "Connections the router took (after its middlewares)";
    /// Router failures by reason.
    ROUTER_FAILURES = "tagway_router_failures_total", Counter, ["router", "reason"], "Connections the router matched that went nowhere, by reason (ip_allow_list, in_flight_limit, no_healthy_server, dial_failed)";
    /// Router bytes.
    ROUTER_BYTES = "tagway_router_bytes_total", Counter, ["router", "direction"], "Bytes proxied through the router (direction: to_server, to_client), counted while connections are open";

    /// Service open connections.
    SERVICE_OPEN = "tagway_service_open_connections", Gauge, ["service"], "Connections open now to the service's servers";
    /// Service connections.
    SERVICE_CONNECTIONS = "tagway_service_connections_total", Counter, ["service"], "Connections proxied to the service's servers";
    /// Service bytes.
    SERVICE_BYTES = "tagway_service_bytes_total", Counter, ["service", "direction"], "Bytes proxied (direction: to_server = received from clients, to_client = sent to clients), counted while connections are open";
    /// Service connection durations.
    SERVICE_DURATION = "tagway_service_connection_duration_seconds", Histogram, ["service"], "Duration of proxied connections, accept to close";

    /// Server open connections.
    SERVER_OPEN = "tagway_server_open_connections", Gauge, ["service", "server"], "Connections open now to the server";
    /// Server connections.
    SERVER_CONNECTIONS = "tagway_server_connections_total", Counter, ["service", "server"], "Connections proxied to the server";
    /// Server health.
    SERVER_UP = "tagway_server_up", Gauge, ["service", "server"], "1 when the server passes its health check (or has none), 0 when it fails it";
    /// Server bytes.
    SERVER_BYTES = "tagway_server_bytes_total", Counter, ["service", "server", "direction"], "Bytes proxied to and from the server (direction: to_server, to_client)";
    /// Server dial durations.
    SERVER_DIAL_DURATION = "tagway_server_dial_duration_seconds", Histogram, ["service", "server"], "Duration of successful dials (TCP connect, PROXY header, TLS handshake)";
    /// Server dial errors by reason.
    SERVER_DIAL_ERRORS = "tagway_server_dial_errors_total", Counter, ["service", "server", "reason"], "Failed dials, by the transport's reason (timeout, refused, unreachable, resolve, tls_handshake, untrusted_certificate, san_mismatch, spiffe_id_mismatch, proxy_header, no_identity, other)";

    /// Provider reloads.
    CONFIG_RELOADS = "tagway_config_reloads_total", Counter, ["provider"], "Configurations received from the provider";
    /// Provider reload failures.
    CONFIG_RELOAD_FAILURES = "tagway_config_reload_failures_total", Counter, ["provider"], "Provider reloads that failed (the last good configuration stays in use)";
    /// Last successful reload per provider.
    CONFIG_LAST_SUCCESS = "tagway_config_last_reload_success_timestamp_seconds", Gauge, ["provider"], "When the provider last delivered a configuration, seconds since the Unix epoch";
    /// Routers per provider.
    CONFIG_ROUTERS = "tagway_config_routers", Gauge, ["provider"], "Routers in the provider's last configuration";
    /// Services per provider.
    CONFIG_SERVICES = "tagway_config_services", Gauge, ["provider"], "Services in the provider's last configuration";
    /// Servers transports per provider.
    CONFIG_TRANSPORTS = "tagway_config_servers_transports", Gauge, ["provider"], "Servers transports in the provider's last configuration";
    /// Middlewares per provider.
    CONFIG_MIDDLEWARES = "tagway_config_middlewares", Gauge, ["provider"], "Middlewares in the provider's last configuration";
    /// Configuration errors in force per provider.
    CONFIG_ERRORS = "tagway_config_errors", Gauge, ["provider"], "Configuration errors now in force (resources disabled), by provider";
    /// Applied configurations.
    CONFIG_APPLIED = "tagway_config_applied_total", Counter, [], "Merged configurations compiled and swapped in by the data plane";
    /// Last applied configuration time.
    CONFIG_LAST_APPLIED = "tagway_config_last_applied_timestamp_seconds", Gauge, [], "When the data plane last swapped in a configuration, seconds since the Unix epoch";
    /// Change-to-applied latency.
    CONFIG_CHANGE_APPLIED = "tagway_config_change_to_applied_seconds", Histogram, ["provider"], "Time from a provider delivering a changed configuration to the data plane using it (for Consul, delivery follows the blocking query that saw the change by the coalescing window)";

    /// Consul watch requests.
    CONSUL_WATCH_REQUESTS = "tagway_consul_watch_requests_total", Counter, ["endpoint", "outcome"], "Consul HTTP requests of the watches (endpoint: catalog_services, catalog_service, health_service, health_connect, health_state, connect_leaf, connect_roots, agent_self, other; outcome: changed, unchanged, error)";
    /// Consul watch index.
    CONSUL_WATCH_INDEX = "tagway_consul_watch_index", Gauge, ["watch"], "The last X-Consul-Index seen per watch group (same values as the endpoint label of tagway_consul_watch_requests_total)";
    /// Consul services watched.
    CONSUL_SERVICES_WATCHED = "tagway_consul_services_watched", Gauge, [], "Consul services whose health is being watched";
    /// Connect leaf expiry.
    CONSUL_LEAF_NOT_AFTER = "tagway_consul_connect_leaf_not_after_timestamp_seconds", Gauge, ["service"], "notAfter of the Consul Connect leaf certificate in use, seconds since the Unix epoch";

    /// Certificate expiry.
    TLS_NOT_AFTER = "tagway_tls_certificate_not_after_timestamp_seconds", Gauge, ["kind", "resource", "cn", "sans", "serial"], "notAfter of each certificate in use (kind: server = TLS termination, client = servers transport mTLS), seconds since the Unix epoch";

    /// Access-log lines dropped.
    ACCESSLOG_DROPPED = "tagway_accesslog_dropped_total", Counter, [], "Access-log lines dropped because the writer fell behind";
}

/// The `direction` label values of the byte counters.
pub const DIRECTIONS: [&str; 2] = ["to_server", "to_client"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_list_every_metric_with_its_type_and_labels() {
        let doc = include_str!("../../../docs/metrics.md");
        for d in ALL {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", d.name)))
                .unwrap_or_else(|| panic!("docs/metrics.md does not list {}", d.name));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            assert_eq!(cells[2], d.kind.as_str(), "{row}");
            let labels: Vec<String> = d.labels.iter().map(|l| format!("`{l}`")).collect();
            let want = if labels.is_empty() {
                "—".to_owned()
            } else {
                labels.join(", ")
            };
            assert_eq!(cells[3], want, "{row}");
        }
    }

    #[test]
    fn names_follow_conventions() {
        for d in ALL {
            assert!(d.name.starts_with("tagway_"), "{}", d.name);
            match d.kind {
                Kind::Counter => assert!(d.name.ends_with("_total"), "{}", d.name),
                Kind::Histogram => assert!(d.name.ends_with("_seconds"), "{}", d.name),
                Kind::Gauge => assert!(!d.name.ends_with("_total"), "{}", d.name),
            }
        }
    }
}
