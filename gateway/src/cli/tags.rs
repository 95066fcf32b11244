//! `tagway tags [--prefix P] [TAG…]`: what a service's tags produce.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use serde::Serialize;
use tagway_config::tags::{ConsulTags, decode};
use tagway_config::{
    DEFAULT_TRANSPORT, Dynamic, InFlightConn, LoadBalancer, Middleware, Service, merge,
    provider_of, validate_without_static,
};

/// The provider tags come from.
pub const PROVIDER: &str = "consulcatalog";

/// The JSON printed for valid tags.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// `<prefix>.enable`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable: Option<bool>,
    /// `<prefix>.consulcatalog.*`, when given.
    #[serde(skip_serializing_if = "is_default")]
    pub consul_catalog: ConsulTags,
    /// The dynamic configuration (names as the tags wrote them).
    #[serde(flatten)]
    pub config: Dynamic,
}

fn is_default(c: &ConsulTags) -> bool {
    *c == ConsulTags::default()
}

/// Decodes and validates `tags`; the JSON output, or the errors.
pub fn evaluate(prefix: &str, tags: &[String]) -> (Output, Vec<String>, Vec<String>) {
    let decoded = decode(prefix, tags);
    let mut errors: Vec<String> = decoded.errors.iter().map(ToString::to_string).collect();
    let warnings = decoded.warnings.iter().map(ToString::to_string).collect();
    // References to other providers (`x@file`) can't be checked here: stand-ins make them valid.
    let mut merged = merge(&[(PROVIDER, &decoded.config)]);
    let refs: Vec<(u8, String)> = merged
        .tcp
        .routers
        .values()
        .flat_map(|r| {
            std::iter::once((0, r.service.clone()))
                .chain(r.middlewares.iter().map(|m| (1, m.clone())))
        })
        .chain(merged.tcp.services.values().flat_map(|s| {
            s.weighted
                .iter()
                .flat_map(|w| w.services.iter().map(|x| (0, x.name.clone())))
                .chain(
                    s.load_balancer
                        .iter()
                        .filter_map(|lb| lb.servers_transport.clone().map(|t| (2, t))),
                )
                .collect::<Vec<_>>()
        }))
        .collect();
    for (kind, name) in refs {
        if name.is_empty() || provider_of(&name) == Some(PROVIDER) || name == DEFAULT_TRANSPORT {
            continue;
        }
        match kind {
            0 => {
                merged.tcp.services.entry(name).or_insert_with(|| {
                    Service {
                        load_balancer: Some(LoadBalancer::default()),
                        ..Default::default()
                    }
                    .into()
                });
            }
            1 => {
                merged.tcp.middlewares.entry(name).or_insert_with(|| {
                    Middleware {
                        in_flight_conn: Some(InFlightConn { amount: 1 }),
                        ..Default::default()
                    }
                    .into()
                });
            }
            _ => {
                merged.tcp.servers_transports.entry(name).or_default();
            }
        }
    }
    let v = validate_without_static(&merged);
    errors.extend(v.errors.iter().map(ToString::to_string));
    (
        Output {
            enable: decoded.enable,
            consul_catalog: decoded.consul,
            config: decoded.config,
        },
        errors,
        warnings,
    )
}

/// The `tags` command.
pub fn main(prefix: &str, mut tags: Vec<String>) -> ExitCode {
    if tags.is_empty() {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if !l.trim().is_empty() => tags.push(l.trim().to_owned()),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("error: cannot read stdin: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let (out, errors, warnings) = evaluate(prefix, &tags);
    let mut err = std::io::stderr().lock();
    for w in &warnings {
        let _ = writeln!(err, "warning: {w}");
    }
    if errors.is_empty() {
        match serde_json::to_string_pretty(&out) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                ExitCode::FAILURE
            }
        }
    } else {
        for e in &errors {
            let _ = writeln!(err, "error: {e}");
        }
        ExitCode::FAILURE
    }
}
