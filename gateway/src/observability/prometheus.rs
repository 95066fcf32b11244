//! The Prometheus exporter: `/metrics` text.
//!
//! Two sources make one exposition:
//! - the data plane's atomics (entry points, routers, services, servers), read at scrape time from
//!   the runtime tables in use — the data path never touches a label or a registry;
//! - a `metrics-exporter-prometheus` recorder (built without its HTTP listener) for everything
//!   recorded through the `metrics` facade: configuration reloads, the Consul provider's watches,
//!   the access log. Every histogram has explicit buckets (never a summary).

use std::fmt::{Display, Write};
use std::sync::Arc;

use metrics::{Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use super::counters::{Bounds, ConnectionBuckets, DialBuckets, Failure, HistogramSnapshot};
use super::names::{self, Def, Kind};
use crate::dial::DialErrorReason;
use crate::server::GatewayHandle;

/// Buckets of `tagway_config_change_to_applied_seconds`.
pub const CHANGE_APPLIED_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of any other histogram recorded through the `metrics` facade.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The `metrics` recorder and its handle.
#[derive(Clone, Debug)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A recorder with explicit buckets for every histogram and the help text of every metric.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets(DEFAULT_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::CONFIG_CHANGE_APPLIED.name.to_owned()),
                    CHANGE_APPLIED_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        for d in names::ALL {
            let unit = d.name.ends_with("_seconds").then_some(Unit::Seconds);
            let help = SharedString::const_str(d.help);
            let key = KeyName::from_const_str(d.name);
            match d.kind {
                Kind::Counter => recorder.describe_counter(key, unit, help),
                Kind::Gauge => recorder.describe_gauge(key, unit, help),
                Kind::Histogram => recorder.describe_histogram(key, unit, help),
            }
        }
        let handle = recorder.handle();
        Metrics {
            recorder: Arc::new(recorder),
            handle,
        }
    }

    /// The recorder (register handles on it, or use it with `metrics::with_local_recorder`).
    pub fn recorder(&self) -> &Arc<PrometheusRecorder> {
        &self.recorder
    }

    /// Installs this recorder as the process-wide `metrics` recorder, so that `metrics::counter!`
    /// and friends anywhere in the process (the Consul provider) are exported. False when a
    /// recorder was already installed.
    pub fn install_global(&self) -> bool {
        metrics::set_global_recorder(self.recorder.clone()).is_ok()
    }

    /// A counter handle (registered once; keep it).
    pub fn counter(&self, def: &Def, labels: &[(&'static str, &str)]) -> metrics::Counter {
        self.recorder.register_counter(&key(def, labels), &METADATA)
    }

    /// A gauge handle.
    pub fn gauge(&self, def: &Def, labels: &[(&'static str, &str)]) -> metrics::Gauge {
        self.recorder.register_gauge(&key(def, labels), &METADATA)
    }

    /// A histogram handle.
    pub fn histogram(&self, def: &Def, labels: &[(&'static str, &str)]) -> metrics::Histogram {
        self.recorder
            .register_histogram(&key(def, labels), &METADATA)
    }

    /// The text of everything recorded through the facade.
    pub fn render_registry(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

fn key(def: &Def, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, (*v).to_owned()))
        .collect();
    Key::from_parts(def.name, labels)
}

/// Writes one metric family of the exposition format.
pub struct Writer<'a> {
    out: &'a mut String,
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl<'a> Writer<'a> {
    /// Starts a family: `# HELP` and `# TYPE`.
    pub fn family(out: &'a mut String, def: &Def) -> Self {
        out.push_str("# HELP ");
        out.push_str(def.name);
        out.push(' ');
        escape_help(out, def.help);
        out.push_str("\n# TYPE ");
        out.push_str(def.name);
        out.push(' ');
        out.push_str(def.kind.as_str());
        out.push('\n');
        Writer { out }
    }

    fn labels(&mut self, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().chain(extra.iter()) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label(self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// The samples of one histogram series.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let mut le = String::new();
        for (bound, count) in &h.buckets {
            le.clear();
            let _ = write!(le, "{bound}");
            self.out.push_str(name);
            self.out.push_str("_bucket");
            self.labels(labels, Some(("le", &le)));
            let _ = writeln!(self.out, " {count}");
        }
        self.out.push_str(name);
        self.out.push_str("_bucket");
        self.labels(labels, Some(("le", "+Inf")));
        let _ = writeln!(self.out, " {}", h.count);
        self.out.push_str(name);
        self.out.push_str("_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", h.sum_seconds);
        self.out.push_str(name);
        self.out.push_str("_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", h.count);
    }
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

fn load_i(a: &std::sync::atomic::AtomicI64) -> i64 {
    a.load(std::sync::atomic::Ordering::Relaxed).max(0)
}

/// Renders the data plane's counters (entry points named in `entry_points`, and every router,
/// load-balancer service and server of the tables in use).
pub fn render_data_plane<'e>(
    out: &mut String,
    gw: &GatewayHandle,
    entry_points: impl Iterator<Item = &'e str>,
) {
    let eps: Vec<(&str, _)> = entry_points
        .filter_map(|n| gw.entry_point(n).map(|c| (n, c.clone())))
        .collect();
    let mut w = Writer::family(out, &names::EP_OPEN);
    for (n, c) in &eps {
        w.sample(names::EP_OPEN.name, &[("entrypoint", n)], load_i(&c.open));
    }
    let mut w = Writer::family(w.out, &names::EP_CONNECTIONS);
    for (n, c) in &eps {
        w.sample(
            names::EP_CONNECTIONS.name,
            &[("entrypoint", n)],
            load(&c.accepted),
        );
    }
    let mut w = Writer::family(w.out, &names::EP_ACCEPT_ERRORS);
    for (n, c) in &eps {
        w.sample(
            names::EP_ACCEPT_ERRORS.name,
            &[("entrypoint", n)],
            load(&c.accept_errors),
        );
    }
    let mut w = Writer::family(w.out, &names::EP_TLS_ERRORS);
    for (n, c) in &eps {
        w.sample(
            names::EP_TLS_ERRORS.name,
            &[("entrypoint", n)],
            load(&c.tls_errors),
        );
    }
    let mut w = Writer::family(w.out, &names::ROUTING_FAILURES);
    for (n, c) in &eps {
        for f in Failure::ALL {
            w.sample(
                names::ROUTING_FAILURES.name,
                &[("entrypoint", n), ("reason", f.as_str())],
                c.failures.get(f),
            );
        }
    }

    let tables = gw.tables();
    let mut routers: Vec<_> = tables.routers.iter().collect();
    routers.sort_by(|a, b| a.0.cmp(b.0));
    let mut w = Writer::family(w.out, &names::ROUTER_OPEN);
    for (n, r) in &routers {
        w.sample(
            names::ROUTER_OPEN.name,
            &[("router", n)],
            load_i(&r.counters.open),
        );
    }
    let mut w = Writer::family(w.out, &names::ROUTER_CONNECTIONS);
    for (n, r) in &routers {
        w.sample(
            names::ROUTER_CONNECTIONS.name,
            &[("router", n)],
            load(&r.counters.connections),
        );
    }
    let mut w = Writer::family(w.out, &names::ROUTER_FAILURES);
    for (n, r) in &routers {
        for f in Failure::ROUTER {
            w.sample(
                names::ROUTER_FAILURES.name,
                &[("router", n), ("reason", f.as_str())],
                r.counters.failures.get(f),
            );
        }
    }
    let mut w = Writer::family(w.out, &names::ROUTER_BYTES);
    for (n, r) in &routers {
        let c = &r.counters;
        w.sample(
            names::ROUTER_BYTES.name,
            &[("router", n), ("direction", names::DIRECTIONS[0])],
            load(&c.bytes_in),
        );
        w.sample(
            names::ROUTER_BYTES.name,
            &[("router", n), ("direction", names::DIRECTIONS[1])],
            load(&c.bytes_out),
        );
    }

    // Load-balancer services (connections are counted on the service that served them; a
    // weighted service's traffic shows on its load-balancer children).
    let mut services: Vec<_> = tables
        .services
        .iter()
        .filter(|(_, b)| b.service.transport.is_some())
        .collect();
    services.sort_by(|a, b| a.0.cmp(b.0));
    let mut w = Writer::family(w.out, &names::SERVICE_OPEN);
    for (n, s) in &services {
        w.sample(
            names::SERVICE_OPEN.name,
            &[("service", n)],
            load_i(&s.service.counters.open),
        );
    }
    let mut w = Writer::family(w.out, &names::SERVICE_CONNECTIONS);
    for (n, s) in &services {
        w.sample(
            names::SERVICE_CONNECTIONS.name,
            &[("service", n)],
            load(&s.service.counters.connections),
        );
    }
    let mut w = Writer::family(w.out, &names::SERVICE_BYTES);
    for (n, s) in &services {
        let c = &s.service.counters;
        w.sample(
            names::SERVICE_BYTES.name,
            &[("service", n), ("direction", names::DIRECTIONS[0])],
            load(&c.bytes_in),
        );
        w.sample(
            names::SERVICE_BYTES.name,
            &[("service", n), ("direction", names::DIRECTIONS[1])],
            load(&c.bytes_out),
        );
    }
    let mut w = Writer::family(w.out, &names::SERVICE_DURATION);
    for (n, s) in &services {
        w.histogram(
            names::SERVICE_DURATION.name,
            &[("service", n)],
            &s.service.counters.duration.snapshot(),
        );
    }
    debug_assert!(ConnectionBuckets::MICROS.len() <= super::counters::MAX_BUCKETS);

    let mut servers: Vec<_> = tables.servers().collect();
    servers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut w = Writer::family(w.out, &names::SERVER_OPEN);
    for ((svc, addr), s) in &servers {
        w.sample(
            names::SERVER_OPEN.name,
            &[("service", svc), ("server", addr)],
            load_i(&s.counters.open),
        );
    }
    let mut w = Writer::family(w.out, &names::SERVER_CONNECTIONS);
    for ((svc, addr), s) in &servers {
        w.sample(
            names::SERVER_CONNECTIONS.name,
            &[("service", svc), ("server", addr)],
            load(&s.counters.connections),
        );
    }
    let mut w = Writer::family(w.out, &names::SERVER_UP);
    for ((svc, addr), s) in &servers {
        w.sample(
            names::SERVER_UP.name,
            &[("service", svc), ("server", addr)],
            u8::from(s.is_healthy()),
        );
    }
    let mut w = Writer::family(w.out, &names::SERVER_BYTES);
    for ((svc, addr), s) in &servers {
        for (dir, v) in names::DIRECTIONS
            .iter()
            .zip([&s.counters.bytes_in, &s.counters.bytes_out])
        {
            w.sample(
                names::SERVER_BYTES.name,
                &[("service", svc), ("server", addr), ("direction", dir)],
                load(v),
            );
        }
    }
    let mut w = Writer::family(w.out, &names::SERVER_DIAL_DURATION);
    for ((svc, addr), s) in &servers {
        w.histogram(
            names::SERVER_DIAL_DURATION.name,
            &[("service", svc), ("server", addr)],
            &s.counters.dial_duration.snapshot(),
        );
    }
    debug_assert!(DialBuckets::MICROS.len() <= super::counters::MAX_BUCKETS);
    let mut w = Writer::family(w.out, &names::SERVER_DIAL_ERRORS);
    for ((svc, addr), s) in &servers {
        for r in DialErrorReason::ALL {
            w.sample(
                names::SERVER_DIAL_ERRORS.name,
                &[("service", svc), ("server", addr), ("reason", r.as_str())],
                s.counters.dial_errors(r),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facade_histograms_have_buckets_and_help() {
        let m = Metrics::new();
        m.histogram(&names::CONFIG_CHANGE_APPLIED, &[("provider", "file")])
            .record(0.02);
        m.counter(&names::CONFIG_RELOADS, &[("provider", "file")])
            .increment(2);
        let text = m.render_registry();
        assert!(
            text.contains(
                "tagway_config_change_to_applied_seconds_bucket{provider=\"file\",le=\"0.025\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("quantile"), "{text}");
        assert!(text.contains("tagway_config_reloads_total{provider=\"file\"} 2"));
        assert!(text.contains("# HELP tagway_config_reloads_total Configurations received"));
    }

    #[test]
    fn labels_are_escaped() {
        let mut out = String::new();
        let mut w = Writer::family(&mut out, &names::ROUTER_OPEN);
        w.sample("x", &[("router", "a\"b\\c\nd")], 1);
        assert!(out.ends_with("x{router=\"a\\\"b\\\\c\\nd\"} 1\n"), "{out}");
    }
}
