//! tagway: a TCP service-mesh gateway for Consul and Nomad.

pub mod cli;
pub mod providers;
