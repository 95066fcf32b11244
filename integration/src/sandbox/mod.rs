//! The sandbox: tagway end to end on one machine with no Consul installed.
//!
//! [`Sandbox::start`] starts the [dev catalog](crate::catalog) in-process, starts example TCP
//! backends in-process (two weighted versions of `pg-echo`, a TLS passthrough target, a backend
//! behind PROXY protocol, and `hello`, which is left for the user to register), registers them
//! with Traefik tags, writes a static configuration pointing the Consul catalog provider at the
//! dev catalog, runs the real `tagway run --config …` binary and waits until it is ready.
//! [`Sandbox::walkthrough`] says what to try; [`Sandbox::stop`] stops everything it started.
//!
//! The `tagway-sandbox` binary (`scripts/sandbox`) is the command-line face of this module; see
//! `docs/sandbox.md`.

mod backends;
mod gateway;
mod plan;
mod ports;
mod walkthrough;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::catalog::{CatalogError, DevCatalog, DevCatalogHandle};

pub use backends::{Backend, BackendKind, Backends, SECURE_SERVER_NAME, SecureCertificates};
pub use gateway::{GatewayLogs, GatewayProcess, GatewayStop, Readiness, describe, http_get};
pub use plan::{
    ENTRY_POINTS, EP_ECHO, EP_EXTRA, EP_PROXIED, EP_TLS, PREFIX, StaticInputs, client_addr_tags,
    hello_registration_json, hello_tags, pg_echo_tags, registrations, secure_tags, static_config,
};
pub use ports::Requested;

/// The dev catalog's default address (Consul's).
pub const DEFAULT_CATALOG_ADDR: &str = "127.0.0.1:8500";
/// The admin API's default address.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:8081";
/// The prefix of the machine-readable line printed once the sandbox is ready
/// (`TAGWAY_SANDBOX_READY {json}`).
pub const READY_LINE_PREFIX: &str = "TAGWAY_SANDBOX_READY ";

/// The routers the example services' tags declare, as the gateway names them.
pub const EXAMPLE_ROUTERS: [&str; 3] = [
    "pg-echo@consulcatalog",
    "secure@consulcatalog",
    "client-addr@consulcatalog",
];

/// What went wrong starting or stopping the sandbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// An address the user asked for is in use.
    #[error(
        "the {what} cannot listen on {addr}: the port is in use (a Consul agent or another sandbox?); choose another address with {flag} HOST:PORT, or {flag} 127.0.0.1:0 for any free port"
    )]
    PortTaken {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The flag that sets it.
        flag: &'static str,
    },
    /// A listener could not be bound.
    #[error("the {what} cannot listen on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// An example backend could not start.
    #[error("example backend {service}: {source}")]
    Backend {
        /// Its Consul service name.
        service: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("cannot generate the {what} of the TLS example: {message}")]
    Certificate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's or rustls' message.
        message: String,
    },
    /// The dev catalog could not start.
    #[error("cannot start the dev catalog: {source}")]
    Catalog {
        /// The catalog's error.
        source: CatalogError,
    },
    /// The dev catalog refused a registration.
    #[error("cannot register service {service} in the dev catalog: {source}")]
    Register {
        /// The service ID.
        service: String,
        /// The catalog's error.
        source: CatalogError,
    },
    /// The working directory or a file in it could not be written.
    #[error("{}: {source}", path.display())]
    WorkDir {
        /// The path.
        path: PathBuf,
        /// The file system error.
        source: std::io::Error,
    },
    /// The generated static configuration does not load (a bug of the sandbox).
    #[error("the generated static configuration {} does not load: {message}", path.display())]
    StaticConfig {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The tagway binary is missing.
    #[error(
        "tagway binary not found at {}: build it (`cargo build --release -p tagway`, or run scripts/sandbox which does) or pass --tagway PATH",
        path.display()
    )]
    TagwayNotFound {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The tagway binary could not be started.
    #[error("cannot start {}: {source}", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Waiting for the gateway process failed.
    #[error("cannot wait for the gateway process: {source}")]
    Wait {
        /// The OS error.
        source: std::io::Error,
    },
    /// The gateway exited by itself.
    #[error("the gateway exited ({status}){}{}", log_hint(log), tail_hint(tail))]
    GatewayExited {
        /// How it exited.
        status: String,
        /// Its log file.
        log: Option<PathBuf>,
        /// The end of its log.
        tail: String,
    },
    /// The gateway did not become ready in time.
    #[error("the gateway was not ready after {}: {last}{}{}", humantime::format_duration(*waited), log_hint(log), tail_hint(tail))]
    NotReady {
        /// How long the sandbox waited.
        waited: Duration,
        /// The last readiness probe's outcome.
        last: String,
        /// Its log file.
        log: Option<PathBuf>,
        /// The end of its log.
        tail: String,
    },
}

fn log_hint(log: &Option<PathBuf>) -> String {
    log.as_ref()
        .map(|p| format!("; its log: {}", p.display()))
        .unwrap_or_default()
}

fn tail_hint(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; it ends with:\n{tail}")
    }
}

/// How to start the sandbox.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// The dev catalog's listen address.
    pub catalog: Requested,
    /// The admin API's listen address.
    pub admin: Requested,
    /// Entry points on free ports instead of their defaults (15432, 15443, 15400, 15500); the
    /// admin API too unless given explicitly.
    pub free_ports: bool,
    /// The `tagway` binary.
    pub tagway: PathBuf,
    /// How long to wait for the gateway to be ready.
    pub ready_timeout: Duration,
    /// Show the gateway's logs on this terminal instead of writing them to `tagway.log`.
    pub inherit_gateway_logs: bool,
}

impl SandboxOptions {
    /// The defaults (dev catalog on 127.0.0.1:8500, admin on 127.0.0.1:8081, default entry point
    /// ports, 60s readiness limit) with the given binary.
    pub fn new(tagway: PathBuf) -> Self {
        SandboxOptions {
            catalog: Requested::default_addr(
                DEFAULT_CATALOG_ADDR.parse().expect("valid literal address"),
            ),
            admin: Requested::default_addr(
                DEFAULT_ADMIN_ADDR.parse().expect("valid literal address"),
            ),
            free_ports: false,
            tagway,
            ready_timeout: Duration::from_secs(60),
            inherit_gateway_logs: false,
        }
    }
}

/// Where everything is; printed as the machine-readable ready line.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxInfo {
    /// The dev catalog (`CONSUL_HTTP_ADDR`).
    pub catalog: SocketAddr,
    /// The gateway's admin API.
    pub admin: SocketAddr,
    /// Entry point name → address.
    pub entry_points: BTreeMap<String, SocketAddr>,
    /// Backend (Consul service ID) → address.
    pub backends: BTreeMap<String, SocketAddr>,
    /// The `hello` backend, not registered at start.
    pub hello: SocketAddr,
    /// The body of `PUT /v1/agent/service/register` that registers `hello`.
    pub hello_registration: String,
    /// The SNI name of the TLS passthrough service.
    pub secure_server_name: String,
    /// The CA certificate (PEM) the TLS backend's certificate chains to.
    pub secure_ca_file: PathBuf,
    /// The static configuration file.
    pub config_file: PathBuf,
    /// The gateway's log file (absent when its output is inherited).
    pub gateway_log: Option<PathBuf>,
    /// The gateway's access log.
    pub access_log: PathBuf,
    /// The gateway's process ID.
    pub gateway_pid: u32,
    /// The sandbox's working directory (deleted when it stops).
    pub work_dir: PathBuf,
    /// How readiness was established.
    pub readiness: String,
}

/// How the sandbox stopped.
#[derive(Clone, Copy, Debug)]
pub struct StopReport {
    /// How the gateway stopped.
    pub gateway: GatewayStop,
}

impl StopReport {
    /// The gateway exited 0 after SIGTERM (or by itself) without being killed.
    pub fn clean(&self) -> bool {
        self.gateway.status.success() && !self.gateway.killed
    }
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    gateway: GatewayProcess,
    backends: Backends,
    catalog: DevCatalogHandle,
    dir: tempfile::TempDir,
    info: SandboxInfo,
    notes: Vec<String>,
}

impl Sandbox {
    /// Starts everything and waits until the gateway is ready. On error, whatever was started is
    /// stopped again (the gateway process is killed when its handle drops).
    ///
    /// Must run on a thread that outlives the sandbox (see [`GatewayProcess::spawn`]).
    pub async fn start(opts: SandboxOptions) -> Result<Sandbox, SandboxError> {
        let mut notes = Vec::new();
        let dir = tempfile::Builder::new()
            .prefix("tagway-sandbox-")
            .tempdir()
            .map_err(|source| SandboxError::WorkDir {
                path: std::env::temp_dir(),
                source,
            })?;
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text)
                .map(|()| path.clone())
                .map_err(|source| SandboxError::WorkDir { path, source })
        };

        let listener = ports::bind_catalog(opts.catalog, &mut notes).await?;
        let catalog = DevCatalog::builder()
            .start_on(listener)
            .await
            .map_err(|source| SandboxError::Catalog { source })?;
        tracing::info!("dev catalog (Consul HTTP API) on {}", catalog.http_url());

        let certs = SecureCertificates::generate()?;
        let secure_ca_file = write("secure-ca.pem", &certs.ca_pem)?;
        let backends = Backends::start(&certs).await?;
        for reg in registrations(&backends) {
            let id = reg.service_id().to_owned();
            catalog
                .register(reg)
                .map_err(|source| SandboxError::Register {
                    service: id,
                    source,
                })?;
        }
        tracing::info!("example services registered: pg-echo (v1, v2), secure, client-addr");

        let mut reserved = Vec::new();
        let admin_l = ports::reserve(
            "admin API",
            "--admin-addr",
            opts.admin,
            opts.free_ports,
            &mut notes,
        )?;
        let admin = ports::local_addr("admin API", &admin_l)?;
        reserved.push(admin_l);
        let mut entry_points = BTreeMap::new();
        for (name, port) in ENTRY_POINTS {
            let l = ports::reserve(
                "entry point",
                "--free-ports",
                Requested::default_addr(SocketAddr::from(([127, 0, 0, 1], port))),
                opts.free_ports,
                &mut notes,
            )?;
            entry_points.insert(name.to_owned(), ports::local_addr("entry point", &l)?);
            reserved.push(l);
        }
        let config_text = static_config(&StaticInputs {
            entry_points: entry_points.clone(),
            admin,
            catalog: catalog.addr(),
        });
        let config_file = write("tagway.toml", &config_text)?;
        tagway_config::load_static(&config_file).map_err(|e| SandboxError::StaticConfig {
            path: config_file.clone(),
            message: e.to_string(),
        })?;

        let logs = if opts.inherit_gateway_logs {
            GatewayLogs::Inherit
        } else {
            GatewayLogs::File(dir.path().join("tagway.log"))
        };
        // The gateway binds the reserved ports now.
        drop(reserved);
        let mut gateway = GatewayProcess::spawn(&opts.tagway, &config_file, logs)?;
        tracing::info!(
            pid = gateway.pid(),
            "started {} run --config {}",
            opts.tagway.display(),
            config_file.display()
        );
        let readiness = match gateway
            .wait_ready(admin, entry_points[EP_EXTRA], opts.ready_timeout)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let _ = gateway
                    .stop(plan::GRACE_PERIOD + Duration::from_secs(8))
                    .await;
                return Err(e);
            }
        };
        if readiness == Readiness::Ready {
            // `/ready` can turn 200 just before the first Consul configuration is swapped in:
            // wait until the example routers are in use, so the walkthrough works at once.
            let routed = match gateway
                .wait_routers(admin, &EXAMPLE_ROUTERS, opts.ready_timeout)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = gateway
                        .stop(plan::GRACE_PERIOD + Duration::from_secs(8))
                        .await;
                    return Err(e);
                }
            };
            if !routed {
                notes.push(
                    "the gateway's admin API has no /api/tcp/routers: the routes may still be loading"
                        .to_owned(),
                );
            }
        }
        if let Readiness::EntryPointAccepting { why } = &readiness {
            notes.push(format!(
                "the gateway's readiness could not be read ({why}); it accepts connections, its routes may still be loading"
            ));
        }

        let info = SandboxInfo {
            catalog: catalog.addr(),
            admin,
            entry_points,
            backends: backends
                .all()
                .iter()
                .map(|b| (b.id.clone(), b.addr))
                .collect(),
            hello: backends.hello.addr,
            hello_registration: hello_registration_json(&backends.hello),
            secure_server_name: SECURE_SERVER_NAME.to_owned(),
            secure_ca_file,
            config_file,
            gateway_log: gateway.log_file().map(|p| p.to_owned()),
            access_log: dir.path().join("access.log"),
            gateway_pid: gateway.pid(),
            work_dir: dir.path().to_owned(),
            readiness: readiness.to_string(),
        };
        Ok(Sandbox {
            gateway,
            backends,
            catalog,
            dir,
            info,
            notes,
        })
    }

    /// Where everything is.
    pub fn info(&self) -> &SandboxInfo {
        &self.info
    }

    /// Remarks for the user (ports that were taken and replaced, readiness fallbacks).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The machine-readable line: [`READY_LINE_PREFIX`] followed by [`SandboxInfo`] as JSON.
    pub fn ready_line(&self) -> String {
        format!(
            "{READY_LINE_PREFIX}{}",
            serde_json::to_string(&self.info).unwrap_or_else(|_| "{}".into())
        )
    }

    /// What to try, with the real addresses.
    pub fn walkthrough(&self) -> String {
        walkthrough::render(&self.info, &self.backends, &self.notes)
    }

    /// Resolves when the gateway exits by itself (it should not): the error says how.
    pub async fn gateway_exited(&mut self) -> SandboxError {
        self.gateway.exited().await
    }

    /// The gateway's log tail (empty when its output is inherited).
    pub fn gateway_log_tail(&self, lines: usize) -> String {
        self.gateway.log_tail(lines)
    }

    /// Stops the gateway (SIGTERM, up to its grace period plus 8 seconds, then SIGKILL), then
    /// the backends and the dev catalog, and deletes the working directory.
    pub async fn stop(self) -> Result<StopReport, SandboxError> {
        let limit = plan::GRACE_PERIOD + Duration::from_secs(8);
        let gateway = self.gateway.stop(limit).await;
        self.backends.shutdown(Duration::from_secs(2)).await;
        self.catalog.shutdown().await;
        drop(self.dir);
        Ok(StopReport { gateway: gateway? })
    }
}
