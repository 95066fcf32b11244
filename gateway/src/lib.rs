//! tagway: a TCP service-mesh gateway for Consul and Nomad.
//!
//! The data plane: entry points, SNI peek and routing, TLS passthrough and termination, smooth
//! weighted round-robin over healthy servers, TCP health checks, proxying with half-close and
//! `terminationDelay`, hot reload of the dynamic configuration and graceful drain.
#![warn(missing_docs)]

pub mod admin;
pub mod anchor;
pub mod balancer;
pub mod cli;
pub mod clienthello;
pub mod conn;
pub mod copy;
pub mod dial;
pub mod entrypoint;
#[cfg(target_os = "linux")]
pub mod evloop;
pub mod health;
pub mod metrics;
pub mod middleware;
pub mod observability;
pub mod providers;
pub mod proxy_in;
pub mod router;
pub mod runtime;
pub mod server;
pub mod tls;
