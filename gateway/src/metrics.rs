//! Metrics-ready counters: plain atomics held by the runtime tables (per entry point, router,
//! service and server). An exporter reads them; the data path only increments.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::dial::{DialErrorReason, REASONS, reason_index};
use crate::observability::counters::{
    ConnectionBuckets, DialBuckets, FailureCounters, Histogram, RareCounts,
};

/// Counters of a router, a service or a server.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections handled (accepted for a router, dialled for a server).
    pub connections: AtomicU64,
    /// Connections open now.
    pub open: AtomicI64,
    /// Bytes from the client to the backend.
    pub bytes_in: AtomicU64,
    /// Bytes from the backend to the client.
    pub bytes_out: AtomicU64,
    /// Failed dials, by reason (index = [`reason_index`], order of [`DialErrorReason::ALL`]).
    dial_errors: RareCounts<REASONS>,
    /// Sum of the durations of successful dials, in microseconds.
    pub dial_micros: AtomicU64,
    /// Connections closed because no server was available.
    pub no_server: AtomicU64,
    /// Connections that went nowhere, by reason (routers).
    pub failures: FailureCounters,
    /// Durations of successful dials (servers).
    pub dial_duration: Histogram<DialBuckets>,
    /// Durations of proxied connections, accept to close (services).
    pub duration: Histogram<ConnectionBuckets>,
}

impl Counters {
    /// Counts one connection opening; the guard counts it closing.
    pub fn open(&self) -> OpenGuard<'_> {
        self.opened();
        OpenGuard(self)
    }

    /// Counts one connection opening, for a connection whose state is not on a task's stack
    /// (the event loops): [`Counters::closed`] counts it closing.
    pub fn opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection counted by [`Counters::opened`] closing.
    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a failed dial.
    pub fn dial_error(&self, reason: DialErrorReason) {
        self.dial_errors.inc(reason_index(reason));
    }

    /// Failed dials for `reason`.
    pub fn dial_errors(&self, reason: DialErrorReason) -> u64 {
        self.dial_errors.get(reason_index(reason))
    }

    /// Adds transferred bytes.
    pub fn add_bytes(&self, to_backend: u64, to_client: u64) {
        self.bytes_in.fetch_add(to_backend, Ordering::Relaxed);
        self.bytes_out.fetch_add(to_client, Ordering::Relaxed);
    }
}

/// Decrements the open-connections gauge when dropped.
#[derive(Debug)]
pub struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.closed();
    }
}

/// Counters of an entry point (kept across reloads).
#[derive(Debug, Default)]
pub struct EntryPointCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicI64,
    /// Accept errors (EMFILE, ENFILE, …).
    pub accept_errors: AtomicU64,
    /// Connections that matched no router (e.g. plaintext on an entry point with only TLS routers).
    pub unrouted: AtomicU64,
    /// Connections whose ClientHello peek failed (timeout, too large, closed early).
    pub peek_errors: AtomicU64,
    /// Connections whose inbound PROXY header was refused.
    pub proxy_protocol_errors: AtomicU64,
    /// Connections refused by a middleware.
    pub refused: AtomicU64,
    /// TLS handshakes (termination) that failed.
    pub tls_errors: AtomicU64,
    /// Connections that went nowhere, by reason.
    pub failures: FailureCounters,
}

impl EntryPointCounters {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
