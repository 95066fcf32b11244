//! `tagway-sandbox`: tagway end to end with no Consul installed (the README's first command,
//! through `scripts/sandbox`). See `docs/sandbox.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tagway_integration::sandbox::{
    DEFAULT_ADMIN_ADDR, DEFAULT_CATALOG_ADDR, Requested, Sandbox, SandboxOptions,
};

/// Runs tagway against an in-process dev catalog (Consul's HTTP API) with example backends
/// registered by tags, and prints what to try. Ctrl-C stops everything.
#[derive(Debug, Parser)]
#[command(name = "tagway-sandbox", version)]
struct Args {
    /// The dev catalog's listen address [default: 127.0.0.1:8500; a free port when taken].
    /// `127.0.0.1:0` picks a free port.
    #[arg(long, value_name = "HOST:PORT")]
    catalog_addr: Option<SocketAddr>,
    /// The gateway's admin API address [default: 127.0.0.1:8081; a free port when taken].
    #[arg(long, value_name = "HOST:PORT")]
    admin_addr: Option<SocketAddr>,
    /// Put the entry points (and the admin API, unless --admin-addr is given) on free ports
    /// instead of 15432, 15443, 15400, 15500.
    #[arg(long)]
    free_ports: bool,
    /// The tagway binary [default: `tagway` next to this program].
    #[arg(long, value_name = "PATH")]
    tagway: Option<PathBuf>,
    /// Stop by itself after this long (`30s`, `5m`): non-interactive runs and tests.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    exit_after: Option<Duration>,
    /// How long to wait for the gateway to be ready.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// Print one machine-readable line `TAGWAY_SANDBOX_READY {json}` (every address, the
    /// gateway's PID) on stdout once ready.
    #[arg(long)]
    ready_line: bool,
    /// Show the gateway's logs here instead of writing them to tagway.log in the work folder.
    #[arg(long)]
    gateway_logs: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TAGWAY_SANDBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tagway-sandbox: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The sandbox starts on this (the main) thread: the gateway child's death signal is tied to
    // the thread that spawns it.
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tagway-sandbox: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_tagway() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let dir = me.parent().context("this program's path has no folder")?;
    Ok(dir.join(format!("tagway{}", std::env::consts::EXE_SUFFIX)))
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let tagway = match args.tagway {
        Some(p) => p,
        None => default_tagway()?,
    };
    let mut opts = SandboxOptions::new(tagway);
    opts.catalog = match args.catalog_addr {
        Some(a) => Requested::explicit(a),
        None => Requested::default_addr(DEFAULT_CATALOG_ADDR.parse()?),
    };
    opts.admin = match args.admin_addr {
        Some(a) => Requested::explicit(a),
        None => Requested::default_addr(DEFAULT_ADMIN_ADDR.parse()?),
    };
    opts.free_ports = args.free_ports;
    opts.ready_timeout = args.ready_timeout;
    opts.inherit_gateway_logs = args.gateway_logs;

    let stop = shutdown_signal()?;
    tokio::pin!(stop);
    let mut sandbox = tokio::select! {
        s = Sandbox::start(opts) => s?,
        sig = &mut stop => {
            eprintln!("tagway-sandbox: {sig} before the sandbox was ready; stopped");
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("{}", sandbox.walkthrough());
    if args.ready_line {
        println!("{}", sandbox.ready_line());
    }
    let exit_after = async {
        match args.exit_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let failure = tokio::select! {
        sig = &mut stop => {
            eprintln!("tagway-sandbox: {sig}: stopping the gateway, the backends and the dev catalog");
            None
        }
        () = exit_after => {
            eprintln!("tagway-sandbox: --exit-after elapsed: stopping");
            None
        }
        e = sandbox.gateway_exited() => Some(e),
    };
    if let Some(e) = failure {
        eprintln!("tagway-sandbox: error: {e}");
        let _ = sandbox.stop().await;
        return Ok(ExitCode::FAILURE);
    }
    let report = sandbox.stop().await?;
    if report.clean() {
        eprintln!("tagway-sandbox: stopped");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "tagway-sandbox: the gateway did not stop cleanly: {}{}",
            tagway_integration::sandbox::describe(report.gateway.status),
            if report.gateway.killed {
                " (killed after the SIGTERM wait)"
            } else {
                ""
            }
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Resolves with the signal's name on Ctrl-C (SIGINT) or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        })
    }
}
