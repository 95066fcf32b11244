//! Configuration providers that live in the gateway: the file provider. (The Consul catalog
//! provider is the `tagway-provider-consul` crate.) Each provider publishes its own dynamic
//! configuration, with unqualified names, through a `tokio::sync::watch` channel; the CLI's
//! `run` merges (`name@provider`) and validates them.

pub mod file;
