//! `tagway check --config FILE`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use tagway_config::{Dynamic, StaticConfig, load_static, merge, validate};

use crate::providers::file;

/// What `check` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Each error, one per line.
    pub errors: Vec<String>,
    /// Each warning.
    pub warnings: Vec<String>,
    /// The summary (counts of what is valid).
    pub summary: String,
}

/// Checks the static configuration at `path` and the file provider's files.
pub fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let st = match load_static(path) {
        Ok(st) => st,
        Err(e) => {
            report
                .errors
                .extend(e.flatten().iter().map(ToString::to_string));
            return report;
        }
    };
    let dynamic = match &st.providers.file {
        Some(f) => match file::load(f) {
            Ok(d) => d,
            Err(e) => {
                report
                    .errors
                    .extend(e.flatten().iter().map(ToString::to_string));
                Dynamic::default()
            }
        },
        None => Dynamic::default(),
    };
    report
        .warnings
        .extend(dynamic.meta.warnings.iter().map(ToString::to_string));
    let validated = validate(&merge(&[(file::PROVIDER, &dynamic)]), &st);
    report
        .errors
        .extend(validated.errors.iter().map(ToString::to_string));
    report.summary = summary(&st, &validated.config);
    report
}

fn summary(st: &StaticConfig, d: &Dynamic) -> String {
    let mut s = format!(
        "{} entry points, {} routers, {} services, {} middlewares, {} serversTransports (+ default@internal), {} TLS certificates",
        st.entry_points.len(),
        d.tcp.routers.len(),
        d.tcp.services.len(),
        d.tcp.middlewares.len(),
        d.tcp.servers_transports.len(),
        d.tls.certificates.len(),
    );
    if st.providers.consul_catalog.is_some() {
        s.push_str("; the Consul catalog is not contacted by check (try `tagway tags`)");
    }
    s
}

/// The `check` command.
pub fn main(path: &Path) -> ExitCode {
    let report = check(path);
    let mut err = std::io::stderr().lock();
    for w in &report.warnings {
        let _ = writeln!(err, "warning: {w}");
    }
    if report.errors.is_empty() {
        println!("{}: ok: {}", path.display(), report.summary);
        ExitCode::SUCCESS
    } else {
        for e in &report.errors {
            let _ = writeln!(err, "error: {e}");
        }
        let _ = writeln!(err, "{}: {} error(s)", path.display(), report.errors.len());
        ExitCode::FAILURE
    }
}
