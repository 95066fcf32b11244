//! Dialing backends: the transport crate's [`Transport`] (timeouts, keep-alive, PROXY protocol,
//! TLS, SPIFFE), re-exported with the helpers the counters need.

pub use tagway_transport::{
    BackendStream, ClientAddrs, DialError, DialErrorReason, Transport, TransportError, Transports,
};

/// Number of dial error reasons (size of the per-reason counter arrays).
pub const REASONS: usize = DialErrorReason::ALL.len();

/// Position of `reason` in [`DialErrorReason::ALL`].
pub fn reason_index(reason: DialErrorReason) -> usize {
    DialErrorReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REASONS - 1)
}
