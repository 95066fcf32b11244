//! What the sandbox prints once the gateway is ready: where everything is and what to try.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::SandboxInfo;
use super::backends::Backends;
use super::plan::{EP_ECHO, EP_EXTRA, EP_PROXIED, EP_TLS};

/// `bash -c 'exec 3<>/dev/tcp/HOST/PORT; head -n1 <&3'`: reads the greeting with nothing but bash.
fn first_line(addr: SocketAddr) -> String {
    format!(
        "bash -c 'exec 3<>/dev/tcp/{}/{}; head -n1 <&3'",
        addr.ip(),
        addr.port()
    )
}

/// Renders the walkthrough.
pub(super) fn render(info: &SandboxInfo, b: &Backends, notes: &[String]) -> String {
    let ep = |name: &str| info.entry_points[name];
    let catalog = format!("http://{}", info.catalog);
    let admin = format!("http://{}", info.admin);
    let echo = ep(EP_ECHO);
    let tls = ep(EP_TLS);
    let proxied = ep(EP_PROXIED);
    let extra = ep(EP_EXTRA);
    let mut s = String::new();
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "tagway sandbox is up: the gateway (pid {}) routes TCP to services registered in a dev catalog that speaks Consul's HTTP API.",
        info.gateway_pid
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  dev catalog (Consul API)  {catalog}   export CONSUL_HTTP_ADDR={}",
        info.catalog
    );
    let _ = writeln!(s, "  gateway admin API         {admin}");
    let _ = writeln!(
        s,
        "  gateway config            {}",
        info.config_file.display()
    );
    if let Some(log) = &info.gateway_log {
        let _ = writeln!(s, "  gateway log               {}", log.display());
    }
    let _ = writeln!(
        s,
        "  access log                {}",
        info.access_log.display()
    );
    let _ = writeln!(s);
    let rows = [
        ("service", "entry point".to_owned(), "instances".to_owned()),
        (
            "pg-echo",
            format!("{EP_ECHO} {echo}"),
            format!(
                "v1 {} (weight 3), v2 {} (weight 1)",
                b.echo_v1.addr, b.echo_v2.addr
            ),
        ),
        (
            "secure",
            format!("{EP_TLS} {tls}"),
            format!(
                "{} (TLS passthrough, SNI {})",
                b.secure.addr, info.secure_server_name
            ),
        ),
        (
            "client-addr",
            format!("{EP_PROXIED} {proxied}"),
            format!("{} (PROXY protocol v1 to the backend)", b.client_addr.addr),
        ),
        (
            "hello",
            format!("{EP_EXTRA} {extra}"),
            format!("{} (running, NOT registered yet)", b.hello.addr),
        ),
    ];
    for (service, entry, instances) in rows {
        let _ = writeln!(s, "  {service:<12} {entry:<26} {instances}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Their tags:  curl -s {catalog}/v1/catalog/services");
    let _ = writeln!(s);

    let _ = writeln!(
        s,
        "1. Weighted split. pg-echo v1 and v2 share one router; their weights (tags) are 3:1, so of\n   every 4 connections 3 go to v1. Each connection greets with the version that answered:"
    );
    let _ = writeln!(
        s,
        "     for i in 1 2 3 4 5 6 7 8; do {}; done",
        first_line(echo)
    );
    let _ = writeln!(
        s,
        "   Or talk to it (lines come back prefixed with the version):  nc {} {}",
        echo.ip(),
        echo.port()
    );
    let _ = writeln!(
        s,
        "   Take v2 out of rotation and back (Consul maintenance mode):\n     curl -X PUT '{catalog}/v1/agent/service/maintenance/pg-echo-v2?enable=true&reason=sandbox'\n     curl -X PUT '{catalog}/v1/agent/service/maintenance/pg-echo-v2?enable=false'"
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "2. TLS passthrough. The router matches the SNI of the ClientHello and forwards the encrypted\n   stream; the backend terminates TLS with a certificate for {} from the sandbox's CA:",
        info.secure_server_name
    );
    let _ = writeln!(
        s,
        "     openssl s_client -connect {tls} -servername {} -CAfile {} -quiet",
        info.secure_server_name,
        info.secure_ca_file.display()
    );
    let _ = writeln!(
        s,
        "     socat - OPENSSL:{tls},snihost={},commonname={},cafile={}",
        info.secure_server_name,
        info.secure_server_name,
        info.secure_ca_file.display()
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "3. PROXY protocol. client-addr's servers transport (declared in its tags) sends a PROXY v1\n   header, so the backend learns your address even though the gateway connects to it:"
    );
    let _ = writeln!(s, "     {}", first_line(proxied));
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "4. A new service goes live. Nothing routes {EP_EXTRA} yet ({extra} closes at once):"
    );
    let _ = writeln!(s, "     {}", first_line(extra));
    let _ = writeln!(
        s,
        "   Register hello with tags, as Nomad or a Consul agent would:"
    );
    let _ = writeln!(
        s,
        "     curl -X PUT {catalog}/v1/agent/service/register -d '{}'",
        info.hello_registration
    );
    let _ = writeln!(s, "   and connect again (it is routed within a second):");
    let _ = writeln!(s, "     {}", first_line(extra));
    let _ = writeln!(
        s,
        "   Deregister it:  curl -X PUT {catalog}/v1/agent/service/deregister/hello-1"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "5. Watch the gateway:");
    let _ = writeln!(
        s,
        "     curl -s {admin}/api/tcp/services     # servers, weights, health"
    );
    let _ = writeln!(s, "     curl -s {admin}/api/tcp/routers");
    let _ = writeln!(s, "     curl -s {admin}/metrics | grep '^tagway_'");
    let _ = writeln!(s, "     tail -f {}", info.access_log.display());
    if !notes.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "Notes:");
        for n in notes {
            let _ = writeln!(s, "  - {n}");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Ctrl-C stops the gateway, the backends and the dev catalog."
    );
    s
}
