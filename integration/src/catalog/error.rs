//! Errors of the dev catalog's Rust API.

use std::net::SocketAddr;

/// What went wrong in a dev catalog operation called from Rust.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// The listener could not be bound.
    #[error("dev catalog: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The listen address is not a socket address.
    #[error(
        "dev catalog: invalid listen address {addr:?}: expected host:port such as 127.0.0.1:8500"
    )]
    InvalidAddress {
        /// The text given.
        addr: String,
    },
    /// A listener was handed over but its local address cannot be read.
    #[error("dev catalog: cannot read the local address of the listener: {source}")]
    ListenerAddress {
        /// The socket error.
        source: std::io::Error,
    },
    /// No service instance with this ID on this node.
    #[error("dev catalog: unknown service ID {service_id:?} on node {node:?}")]
    UnknownService {
        /// The node searched.
        node: String,
        /// The service ID asked for.
        service_id: String,
    },
    /// No check with this ID on this node.
    #[error("dev catalog: unknown check ID {check_id:?} on node {node:?}")]
    UnknownCheck {
        /// The node searched.
        node: String,
        /// The check ID asked for.
        check_id: String,
    },
    /// No node with this name.
    #[error("dev catalog: unknown node {node:?}")]
    UnknownNode {
        /// The node asked for.
        node: String,
    },
    /// A registration is invalid (empty name, bad weights, check without an ID, …).
    #[error("dev catalog: invalid registration of {what}: {reason}")]
    InvalidRegistration {
        /// The service, node or check concerned.
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// The Connect CA could not generate or sign a certificate.
    #[error("dev catalog: Connect CA cannot issue a certificate for {subject}: {source}")]
    Certificate {
        /// The service (or root) the certificate was for.
        subject: String,
        /// The generator's error.
        source: rcgen::Error,
    },
}

impl CatalogError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        CatalogError::InvalidRegistration {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Listen-address helper used by the builder.
    pub(crate) fn bind(addr: SocketAddr, source: std::io::Error) -> Self {
        CatalogError::Bind {
            addr: addr.to_string(),
            source,
        }
    }
}
