//! Lock-free building blocks the data plane's counters are made of: fixed-bucket histograms and
//! the reasons a connection went nowhere.
//!
//! Everything here is plain atomics with `Relaxed` ordering: recording is one or two
//! `fetch_add`s, no allocation, no lock, no label lookup. The Prometheus exporter reads the atomics
//! at scrape time.

use std::fmt;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most buckets a [`Histogram`] can have (the `+Inf` bucket excluded).
pub const MAX_BUCKETS: usize = 16;

/// The bucket upper bounds of a kind of histogram, in microseconds, ascending.
pub trait Bounds {
    /// Upper bounds (inclusive), microseconds, ascending, at most [`MAX_BUCKETS`].
    const MICROS: &'static [u64];
}

/// Buckets of dial durations (TCP connect, plus the TLS handshake and PROXY header when the
/// transport does them): 0.5 ms … 30 s.
#[derive(Debug, Default)]
pub struct DialBuckets;

impl Bounds for DialBuckets {
    const MICROS: &'static [u64] = &[
        500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
        2_500_000, 5_000_000, 10_000_000, 30_000_000,
    ];
}

/// Buckets of connection durations (accept to close): 10 ms … 4 h.
#[derive(Debug, Default)]
pub struct ConnectionBuckets;

impl Bounds for ConnectionBuckets {
    const MICROS: &'static [u64] = &[
        10_000,
        50_000,
        100_000,
        500_000,
        1_000_000,
        5_000_000,
        10_000_000,
        30_000_000,
        60_000_000,
        300_000_000,
        900_000_000,
        1_800_000_000,
        3_600_000_000,
        14_400_000_000,
    ];
}

/// A histogram with fixed buckets (`B`), recorded with atomics.
///
/// Its buckets are allocated at the first observation: a gateway with 10,000s of servers keeps
/// two pointers for each server that never carried a connection, not two sets of buckets.
pub struct Histogram<B> {
    buckets: OnceLock<Box<Buckets>>,
    _bounds: PhantomData<B>,
}

/// The atomics of a histogram.
#[derive(Default)]
struct Buckets {
    /// Per-bucket counts (not cumulative); index `B::MICROS.len()` is the overflow (`+Inf` only).
    counts: [AtomicU64; MAX_BUCKETS + 1],
    sum_micros: AtomicU64,
}

impl<B> Default for Histogram<B> {
    fn default() -> Self {
        Histogram {
            buckets: OnceLock::new(),
            _bounds: PhantomData,
        }
    }
}

impl<B> fmt::Debug for Histogram<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count_slow())
            .field(
                "sum_micros",
                &self
                    .buckets
                    .get()
                    .map_or(0, |b| b.sum_micros.load(Ordering::Relaxed)),
            )
            .finish()
    }
}

impl<B> Histogram<B> {
    fn count_slow(&self) -> u64 {
        self.buckets.get().map_or(0, |b| {
            b.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
        })
    }
}

/// A consistent-enough reading of a histogram (each atomic read once).
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, cumulative count)` per bucket, `+Inf` excluded.
    pub buckets: Vec<(f64, u64)>,
    /// Number of observations (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl<B: Bounds> Histogram<B> {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let idx = B::MICROS
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(B::MICROS.len());
        let b = self.buckets.get_or_init(Box::default);
        b.counts[idx.min(MAX_BUCKETS)].fetch_add(1, Ordering::Relaxed);
        b.sum_micros.fetch_add(us, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count_slow()
    }

    /// Reads the histogram (cumulative buckets, as Prometheus wants them).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let read = |i: usize| {
            self.buckets
                .get()
                .map_or(0, |b| b.counts[i].load(Ordering::Relaxed))
        };
        let mut buckets = Vec::with_capacity(B::MICROS.len());
        let mut cumulative = 0u64;
        for (i, b) in B::MICROS.iter().enumerate().take(MAX_BUCKETS) {
            cumulative += read(i);
            buckets.push((*b as f64 / 1e6, cumulative));
        }
        let overflow = read(B::MICROS.len().min(MAX_BUCKETS));
        let sum = self
            .buckets
            .get()
            .map_or(0, |b| b.sum_micros.load(Ordering::Relaxed));
        HistogramSnapshot {
            buckets,
            count: cumulative + overflow,
            sum_seconds: sum as f64 / 1e6,
        }
    }
}

/// Why a connection went nowhere (metric label via [`Failure::as_str`]).
///
/// Every accepted connection either reaches a server, fails its TLS handshake (termination), or
/// ends with exactly one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Failure {
    /// No router of the entry point matches the connection.
    NoRoute,
    /// The router's `ipAllowList` refused the client.
    IpAllowList,
    /// The router's `inFlightConn` limit was reached for the client.
    InFlightLimit,
    /// The router's service had no healthy server to pick.
    NoHealthyServer,
    /// Every dial attempt failed (the reasons are counted per server).
    DialFailed,
    /// The TLS ClientHello did not arrive within the peek timeout.
    PeekTimeout,
    /// The ClientHello was too large, malformed, or the client closed before sending it.
    PeekError,
    /// The inbound PROXY protocol header was refused (malformed, or from an untrusted address).
    ProxyProtocol,
}

impl Failure {
    /// Number of reasons.
    pub const COUNT: usize = 8;
    /// Every reason, in index order.
    pub const ALL: [Failure; Self::COUNT] = [
        Failure::NoRoute,
        Failure::IpAllowList,
        Failure::InFlightLimit,
        Failure::NoHealthyServer,
        Failure::DialFailed,
        Failure::PeekTimeout,
        Failure::PeekError,
        Failure::ProxyProtocol,
    ];
    /// The reasons that are attributed to a router too (the router is known when they happen).
    pub const ROUTER: [Failure; 4] = [
        Failure::IpAllowList,
        Failure::InFlightLimit,
        Failure::NoHealthyServer,
        Failure::DialFailed,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::NoRoute => "no_route",
            Failure::IpAllowList => "ip_allow_list",
            Failure::InFlightLimit => "in_flight_limit",
            Failure::NoHealthyServer => "no_healthy_server",
            Failure::DialFailed => "dial_failed",
            Failure::PeekTimeout => "peek_timeout",
            Failure::PeekError => "peek_error",
            Failure::ProxyProtocol => "proxy_protocol",
        }
    }

    /// Position in [`Failure::ALL`].
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `N` counters of rare events (failures, dial errors), allocated at the first one: a gateway
/// with 10,000s of servers and routers keeps one pointer for each that never failed.
#[derive(Debug)]
pub struct RareCounts<const N: usize>(OnceLock<Box<[AtomicU64; N]>>);

impl<const N: usize> Default for RareCounts<N> {
    fn default() -> Self {
        RareCounts(OnceLock::new())
    }
}

impl<const N: usize> RareCounts<N> {
    /// Adds one to counter `i`.
    #[inline]
    pub fn inc(&self, i: usize) {
        self.0
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))))[i]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counter `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.0.get().map_or(0, |c| c[i].load(Ordering::Relaxed))
    }
}

/// One counter per [`Failure`].
#[derive(Debug, Default)]
pub struct FailureCounters(RareCounts<{ Failure::COUNT }>);

impl FailureCounters {
    /// Adds one for `f`.
    #[inline]
    pub fn inc(&self, f: Failure) {
        self.0.inc(f.index());
    }

    /// The count for `f`.
    pub fn get(&self, f: Failure) -> u64 {
        self.0.get(f.index())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rare_counters_are_allocated_at_the_first_event() {
        let f = FailureCounters::default();
        assert!(f.0.0.get().is_none());
        assert_eq!(f.get(Failure::NoRoute), 0);
        f.inc(Failure::NoRoute);
        f.inc(Failure::NoRoute);
        assert_eq!(f.get(Failure::NoRoute), 2);
        assert!(
            Failure::ALL
                .iter()
                .filter(|x| **x != Failure::NoRoute)
                .all(|x| f.get(*x) == 0)
        );
        assert!(std::mem::size_of::<FailureCounters>() <= 16);
    }

    #[test]
    fn a_histogram_allocates_its_buckets_at_the_first_observation() {
        let h = Histogram::<DialBuckets>::default();
        assert!(h.buckets.get().is_none());
        let empty = h.snapshot();
        assert_eq!(empty.count, 0);
        assert_eq!(empty.buckets.len(), DialBuckets::MICROS.len());
        assert!(empty.buckets.iter().all(|(_, c)| *c == 0));
        h.observe(Duration::from_micros(700));
        assert!(h.buckets.get().is_some());
        let one = h.snapshot();
        assert_eq!(one.count, 1);
        assert_eq!(one.buckets[0].1, 0, "700 µs is above the 500 µs bucket");
        assert_eq!(one.buckets[1].1, 1);
        assert!(std::mem::size_of::<Histogram<DialBuckets>>() <= 16);
    }

    #[test]
    fn indices_follow_all() {
        for (i, f) in Failure::ALL.iter().enumerate() {
            assert_eq!(f.index(), i, "{f}");
        }
    }

    #[test]
    fn buckets_fit() {
        assert!(DialBuckets::MICROS.len() <= MAX_BUCKETS);
        assert!(ConnectionBuckets::MICROS.len() <= MAX_BUCKETS);
        assert!(DialBuckets::MICROS.windows(2).all(|w| w[0] < w[1]));
        assert!(ConnectionBuckets::MICROS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn histogram_is_cumulative_with_overflow() {
        let h = Histogram::<DialBuckets>::default();
        h.observe(Duration::from_micros(400)); // ≤ 0.5 ms
        h.observe(Duration::from_micros(500)); // ≤ 0.5 ms (inclusive)
        h.observe(Duration::from_millis(3)); // ≤ 5 ms
        h.observe(Duration::from_secs(60)); // overflow
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.0005, 2));
        assert_eq!(s.buckets[1], (0.001, 2));
        assert_eq!(s.buckets[3], (0.005, 3));
        assert_eq!(s.buckets.last().unwrap(), &(30.0, 3));
        assert!((s.sum_seconds - 60.0039).abs() < 1e-9, "{}", s.sum_seconds);
        let f = FailureCounters::default();
        f.inc(Failure::PeekTimeout);
        f.inc(Failure::PeekTimeout);
        assert_eq!(f.get(Failure::PeekTimeout), 2);
        assert_eq!(f.get(Failure::NoRoute), 0);
    }
}
