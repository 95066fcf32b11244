//! tagway's configuration model.
//!
//! Static configuration (entry points, providers, the default servers transport, admin, logging)
//! and dynamic configuration (TCP routers, services, servers transports, middlewares, TLS
//! certificates), the file formats that carry them, the tag decoder and validation.
#![warn(missing_docs)]

pub mod duration;
pub mod dynamic;
pub mod rule;
pub mod static_config;
pub mod tls;

pub use duration::Duration;
pub use dynamic::*;
pub use rule::Rule;
pub use static_config::*;
pub use tls::{ClientCertificate, FileOrContent};
