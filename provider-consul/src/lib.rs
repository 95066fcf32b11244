//! The Consul catalog provider.
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod connect;
pub mod constraints;
pub mod convert;
pub mod watch;
pub mod token;

#[cfg(test)]
mod test_stub;
#[cfg(test)]
mod test_pki;
