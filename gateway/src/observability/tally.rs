//! The per-connection bookkeeping the data path does for observability: the entry point's
//! open-connections gauge, why a connection went nowhere, the service's connection-duration
//! histogram, and the access-log record.
//!
//! A [`Tally`] lives on the connection task's stack. Without an access log it costs two relaxed
//! atomic operations and two clock reads per connection; with one, one boxed record per
//! connection, handed to the writer thread when the tally is dropped.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::balancer::Pick;
use crate::conn::EntryPointState;
use crate::copy::{Outcome, Transferred};
use crate::middleware::Refusal;
use crate::observability::accesslog::{CloseReason, Record};
use crate::observability::counters::Failure;
use crate::router::Route;

/// Bookkeeping of one connection, from accept to close. `E` holds the entry point: a reference
/// on a connection's task, an `Arc` in the event loop's table of connections.
#[derive(Debug)]
pub struct Tally<E: Deref<Target = EntryPointState>> {
    ep: E,
    start: Instant,
    record: Option<Box<Record>>,
}

impl<E: Deref<Target = EntryPointState>> Tally<E> {
    /// Starts counting a connection accepted on `ep` from `client`.
    #[inline]
    pub fn start(ep: E, client: SocketAddr) -> Self {
        ep.counters.open.fetch_add(1, Ordering::Relaxed);
        let record = ep
            .access_log
            .as_ref()
            .map(|_| Box::new(Record::new(ep.name.clone(), client)));
        Tally {
            ep,
            start: Instant::now(),
            record,
        }
    }

    /// The client address after the inbound PROXY header was read.
    #[inline]
    pub fn client(&mut self, client: SocketAddr) {
        if let Some(r) = &mut self.record {
            r.client = client;
        }
    }

    /// The connection went nowhere before a router was chosen (or for an entry-point reason).
    #[inline]
    pub fn fail(&mut self, f: Failure) {
        self.ep.counters.failures.inc(f);
        if let Some(r) = &mut self.record {
            r.close = CloseReason::Failed(f);
        }
    }

    /// The connection went nowhere after `route` took it.
    #[inline]
    pub fn fail_route(&mut self, route: &Route, f: Failure) {
        route.counters.failures.inc(f);
        self.fail(f);
    }

    /// A middleware of `route` refused the connection.
    #[inline]
    pub fn refused(&mut self, route: &Route, r: Refusal) {
        let f = match r {
            Refusal::NotAllowed => Failure::IpAllowList,
            Refusal::TooManyConnections => Failure::InFlightLimit,
        };
        self.fail_route(route, f);
    }

    /// `route` matched the connection (`sni` from its ClientHello).
    #[inline]
    pub fn routed(&mut self, route: &Arc<Route>, sni: Option<&str>) {
        if let Some(r) = &mut self.record {
            r.router = Some(route.clone());
            r.service = Some(route.service.service.clone());
            r.sni = sni.map(Into::into);
        }
    }

    /// The TLS handshake (termination) failed.
    #[inline]
    pub fn tls_failed(&mut self) {
        if let Some(r) = &mut self.record {
            r.close = CloseReason::TlsHandshake;
        }
    }

    /// A server was dialled.
    #[inline]
    pub fn connected(&mut self, pick: &Pick) {
        if let Some(r) = &mut self.record {
            r.service = Some(pick.service.clone());
            r.server = Some(pick.server.clone());
        }
    }

    /// The proxied connection ended.
    #[inline]
    pub fn finished(&mut self, pick: &Pick, t: &Transferred, outcome: &Outcome) {
        pick.service.counters.duration.observe(self.start.elapsed());
        if let Some(r) = &mut self.record {
            r.bytes_to_server = t.to_backend;
            r.bytes_to_client = t.to_client;
            r.close = match outcome {
                Outcome::Closed => CloseReason::Closed,
                Outcome::TerminationDelay => CloseReason::TerminationDelay,
                Outcome::Error(_) => CloseReason::Error,
            };
        }
    }
}

impl<E: Deref<Target = EntryPointState>> Drop for Tally<E> {
    fn drop(&mut self) {
        self.ep.counters.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(mut r) = self.record.take()
            && let Some(log) = &self.ep.access_log
        {
            r.duration = self.start.elapsed();
            log.send(r);
        }
    }
}
