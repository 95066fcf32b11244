//! tagway's Consul catalog provider.
//!
//! Watches the Consul catalog with blocking queries and turns the tags of healthy instances into
//! tagway's TCP configuration, the way Traefik's `consulCatalog` provider reads them (same tag
//! grammar, same defaults), plus Consul Connect (leaf certificate and CA roots from the agent,
//! backends checked against their exact SPIFFE ID).
//!
//! ```no_run
//! # async fn example(cfg: tagway_config::ConsulCatalog) -> Result<(), Box<dyn std::error::Error>> {
//! use tagway_provider_consul::ConsulProvider;
//!
//! let running = ConsulProvider::new(&cfg)?.start(async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })?;
//! let mut config = running.config(); // watch::Receiver<Arc<Dynamic>>, names unqualified
//! config.changed().await?;
//! println!("{} routers", config.borrow().tcp.routers.len());
//! # Ok(()) }
//! ```
//!
//! Modules: [`client`] (HTTP client, TLS, token), [`watch`] (blocking-query mechanics),
//! [`convert`] (tags → configuration, incremental merge), [`constraints`], [`connect`],
//! [`census`] (which services gained or lost an instance), [`provider`] (the running provider).
#![warn(missing_docs)]

pub mod api;
pub mod census;
pub mod client;
pub mod connect;
pub mod constraints;
pub mod convert;
pub mod provider;
pub mod token;
pub mod watch;

pub use client::ClientError;
pub use connect::ConnectIdentity;
pub use convert::{CONNECT_TRANSPORT_PREFIX, CatalogError};
pub use provider::{ConsulProvider, Mode, ProviderError, ProviderOptions, Running, Status};

/// The provider name used to qualify this provider's resources (`name@consulcatalog`).
pub const PROVIDER_NAME: &str = "consulcatalog";

#[cfg(test)]
mod test_consul;
#[cfg(test)]
mod test_pki;
#[cfg(test)]
mod test_stub;
