//! The Consul catalog provider.
