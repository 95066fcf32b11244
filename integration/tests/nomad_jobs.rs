//! Offline checks of the Nomad job files in `nomad/`, so they cannot rot silently: they parse as HCL,
//! every service has a check, static ports match the entry points of the embedded tagway configuration,
//! the kill timeout exceeds the gateway's grace period, the metrics service checks `/ping` on the admin
//! port, and the example backend's tags decode without errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use hcl::{Block, Body, Expression};

fn nomad_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nomad")
}

fn parse(file: &str) -> Result<Body> {
    let path = nomad_dir().join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    hcl::parse(&text).with_context(|| format!("parsing {}", path.display()))
}

fn blocks<'a>(body: &'a Body, ident: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
    body.blocks().filter(move |b| b.identifier() == ident)
}

fn block<'a>(body: &'a Body, ident: &'a str) -> Result<&'a Block> {
    blocks(body, ident)
        .next()
        .ok_or_else(|| anyhow!("no `{ident}` block"))
}

fn attr<'a>(body: &'a Body, key: &str) -> Option<&'a Expression> {
    body.attributes().find(|a| a.key() == key).map(|a| a.expr())
}

fn attr_str(body: &Body, key: &str) -> Result<String> {
    match attr(body, key) {
        Some(Expression::String(s)) => Ok(s.clone()),
        Some(Expression::TemplateExpr(t)) => Ok(t.to_string()),
        other => bail!("attribute `{key}` is not a string: {other:?}"),
    }
}

fn attr_u64(body: &Body, key: &str) -> Result<u64> {
    match attr(body, key) {
        Some(Expression::Number(n)) => n.as_u64().ok_or_else(|| anyhow!("`{key}` is not a u64")),
        other => bail!("attribute `{key}` is not a number: {other:?}"),
    }
}

/// Renders the few consul-template calls the job files use, with fixed sample values.
fn render_template(data: &str) -> String {
    let re = regex::Regex::new(r#"\{\{\s*env\s+"([^"]+)"\s*\}\}"#).unwrap();
    re.replace_all(data, |c: &regex::Captures<'_>| match &c[1] {
        "attr.unique.network.ip-address" => "10.0.0.7".to_string(),
        "NOMAD_SECRETS_DIR" => "/alloc/secrets".to_string(),
        other => panic!("unexpected env {other} in template"),
    })
    .into_owned()
}

fn port_of(address: &str) -> Result<u16> {
    let (_, port) = address
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("address {address:?} has no port"))?;
    port.parse().with_context(|| format!("port of {address:?}"))
}

struct Gateway {
    group: Body,
    task: Body,
    config: tagway_config::StaticConfig,
}

fn gateway_job(file: &str) -> Result<Gateway> {
    let body = parse(file)?;
    let job = block(&body, "job")?;
    let group = block(job.body(), "group")?;
    let task = blocks(group.body(), "task")
        .find(|t| t.labels().first().map(|l| l.as_str()) == Some("tagway"))
        .ok_or_else(|| anyhow!("no task \"tagway\""))?;
    let template = blocks(task.body(), "template")
        .find(|t| attr_str(t.body(), "destination").ok().as_deref() == Some("local/tagway.toml"))
        .ok_or_else(|| anyhow!("no template rendering local/tagway.toml"))?;
    let rendered = render_template(&attr_str(template.body(), "data")?);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tagway.toml");
    std::fs::write(&path, rendered)?;
    let config = tagway_config::load_static(&path)
        .map_err(|e| anyhow!("{file}: embedded configuration: {e}"))?;
    Ok(Gateway {
        group: group.body().clone(),
        task: task.body().clone(),
        config,
    })
}

fn static_ports(group: &Body) -> Result<BTreeMap<String, u16>> {
    let network = block(group, "network")?;
    let mut ports = BTreeMap::new();
    for p in blocks(network.body(), "port") {
        let label = p.labels()[0].as_str().to_string();
        ports.insert(label, attr_u64(p.body(), "static")? as u16);
    }
    Ok(ports)
}

fn check_gateway(file: &str) -> Result<()> {
    let gw = gateway_job(file)?;
    let ports = static_ports(&gw.group)?;

    // Every entry point listens on a static port of the group, and every static port but admin is one.
    let mut entry_ports = Vec::new();
    for (name, ep) in &gw.config.entry_points {
        let port = port_of(&ep.address)?;
        assert!(
            ports.values().any(|p| *p == port),
            "{file}: entry point {name} ({}) has no static port in network",
            ep.address
        );
        entry_ports.push(port);
    }
    assert!(!entry_ports.is_empty(), "{file}: no entry points");
    let admin = gw
        .config
        .admin
        .as_ref()
        .ok_or_else(|| anyhow!("{file}: no admin address"))?;
    let admin_port = port_of(&admin.address)?;
    assert_eq!(ports.get("admin"), Some(&admin_port), "{file}: admin port");
    for (label, port) in &ports {
        assert!(
            *port == admin_port || entry_ports.contains(port),
            "{file}: static port {label}={port} is neither an entry point nor admin"
        );
    }

    // Every service has a check; the metrics service checks /ping on the admin port.
    let services: Vec<&Block> = blocks(&gw.group, "service").collect();
    assert!(
        services.len() >= 2,
        "{file}: expected gateway and metrics services"
    );
    for s in &services {
        let name = attr_str(s.body(), "name")?;
        let check = block(s.body(), "check").with_context(|| format!("{file}: service {name}"))?;
        let port_label = attr_str(check.body(), "port")?;
        assert!(
            ports.contains_key(&port_label),
            "{file}: service {name} checks unknown port"
        );
        if name == "tagway-metrics" {
            assert_eq!(attr_str(check.body(), "type")?, "http");
            assert_eq!(attr_str(check.body(), "path")?, "/ping");
            assert_eq!(ports[&port_label], admin_port, "{file}: metrics check port");
        } else {
            assert_eq!(attr_str(check.body(), "type")?, "tcp");
            assert!(entry_ports.contains(&ports[&port_label]));
        }
    }

    // Signals and timeouts: SIGTERM drains, and Nomad waits longer than the drain before SIGKILL.
    assert_eq!(attr_str(&gw.task, "kill_signal")?, "SIGTERM");
    let kill: humantime::Duration = attr_str(&gw.task, "kill_timeout")?.parse()?;
    let grace = gw
        .config
        .shutdown
        .grace_period
        .to_std()
        .ok_or_else(|| anyhow!("negative grace period"))?;
    assert!(
        *kill > grace,
        "{file}: kill_timeout {kill} must exceed shutdown.gracePeriod {grace:?}"
    );
    assert!(
        attr(&gw.task, "shutdown_delay").is_some(),
        "{file}: shutdown_delay"
    );

    // The Consul token comes from workload identity through a token file.
    let identity = block(&gw.task, "identity")?;
    assert_eq!(attr_str(identity.body(), "name")?, "consul_default");
    let env = block(&gw.task, "env")?;
    assert!(attr_str(env.body(), "CONSUL_HTTP_TOKEN_FILE")?.contains("consul_token"));
    Ok(())
}

#[test]
fn system_job_is_consistent() -> Result<()> {
    check_gateway("tagway.nomad.hcl")?;
    let body = parse("tagway.nomad.hcl")?;
    assert_eq!(attr_str(block(&body, "job")?.body(), "type")?, "system");
    Ok(())
}

#[test]
fn service_job_is_consistent_and_renders_connect_certificates() -> Result<()> {
    check_gateway("tagway-service.nomad.hcl")?;
    let gw = gateway_job("tagway-service.nomad.hcl")?;
    assert!(
        attr(&gw.group, "count").is_some(),
        "service job has a count"
    );
    // Certificates rendered by template are reloaded by signal, and tagway reads those files.
    let spiffe = gw
        .config
        .providers
        .spiffe
        .as_ref()
        .expect("providers.spiffe");
    let mut rendered = Vec::new();
    for t in blocks(&gw.task, "template") {
        let dest = attr_str(t.body(), "destination")?;
        if dest.starts_with("secrets/connect/") {
            assert_eq!(attr_str(t.body(), "change_mode")?, "signal", "{dest}");
            assert_eq!(attr_str(t.body(), "change_signal")?, "SIGHUP", "{dest}");
            rendered.push(dest.replace("secrets/", "/alloc/secrets/"));
        }
    }
    for file in [&spiffe.certificate, &spiffe.key, &spiffe.bundle] {
        let file = file
            .as_ref()
            .expect("spiffe file set")
            .to_string_lossy()
            .into_owned();
        assert!(
            rendered.contains(&file),
            "{file} is not rendered by a template"
        );
    }
    Ok(())
}

#[test]
fn example_backend_tags_decode() -> Result<()> {
    let body = parse("example-backend.nomad.hcl")?;
    let job = block(&body, "job")?;
    let group = block(job.body(), "group")?;
    let service = block(group.body(), "service")?;
    assert!(
        block(service.body(), "check").is_ok(),
        "backend service has a check"
    );
    let tags: Vec<String> = match attr(service.body(), "tags") {
        Some(Expression::Array(items)) => items
            .iter()
            .map(|e| match e {
                Expression::String(s) => Ok(s.clone()),
                other => Err(anyhow!("tag is not a string: {other:?}")),
            })
            .collect::<Result<_>>()?,
        other => bail!("tags is not an array: {other:?}"),
    };
    let decoded = tagway_config::tags::decode("traefik", &tags);
    assert!(
        decoded.errors.is_empty(),
        "tag errors: {:?}",
        decoded.errors
    );
    assert_eq!(decoded.enable, Some(true));
    let router = &decoded.config.tcp.routers["pg"];
    assert_eq!(router.rule, "HostSNI(`*`)");
    assert_eq!(router.entry_points, vec!["postgres".to_string()]);
    let lb = decoded.config.tcp.services["pg"]
        .load_balancer
        .as_ref()
        .expect("loadBalancer");
    assert_eq!(lb.servers_transport.as_deref(), Some("pgtransport"));
    assert_eq!(lb.server.as_ref().and_then(|s| s.weight), Some(3));
    let transport = &decoded.config.tcp.servers_transports["pgtransport"];
    assert_eq!(transport.dial_timeout, "2s".parse()?);
    assert_eq!(transport.termination_delay, "200ms".parse()?);
    // The job's entry point exists in the gateway job's configuration.
    let gw = gateway_job("tagway.nomad.hcl")?;
    assert!(gw.config.entry_points.contains_key("postgres"));
    Ok(())
}
