//! Smooth weighted round-robin (nginx's algorithm) over healthy servers and nested weighted
//! services.
//!
//! Each pick adds every available peer's weight to its current value, takes the peer with the
//! largest current value and subtracts the total from it: over any window of `sum(weights)` picks
//! each peer is chosen exactly `weight` times, and picks of one peer are spread out (3:1 gives
//! `a a b a`, never `a a a … b b`). Weight 0 is never picked. A server is available when its
//! health check (if any) passes and it is not held out after a failed dial. A pick is one short,
//! uncontended lock and a scan of the peers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::metrics::Counters;
use tagway_transport::ServerAddr;

/// Milliseconds since the first call (tokio's clock, so paused-clock tests work), never 0.
pub(crate) fn now_ms() -> u64 {
    static BASE: OnceLock<tokio::time::Instant> = OnceLock::new();
    let base = *BASE.get_or_init(tokio::time::Instant::now);
    tokio::time::Instant::now()
        .saturating_duration_since(base)
        .as_millis() as u64
        + 1
}

/// One server (instance) of a load balancer, shared by the runtime tables, the health checker and
/// open connections.
#[derive(Debug)]
pub struct ServerState {
    /// `host:port`, split when the configuration was compiled (see [`ServerAddr`]).
    pub address: ServerAddr,
    /// Dial with TLS.
    pub tls: bool,
    /// Weight in the round-robin (0 = never picked).
    pub weight: u32,
    healthy: AtomicBool,
    held_until: AtomicU64,
    /// Counters of this server.
    pub counters: Counters,
}

impl ServerState {
    /// A healthy server.
    pub fn new(address: impl Into<String>, weight: u32, tls: bool) -> Self {
        ServerState {
            address: ServerAddr::new(address),
            tls,
            weight,
            healthy: AtomicBool::new(true),
            held_until: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// The health check's verdict (true when no check is configured).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the health check's verdict; takes effect on the next pick.
    pub fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Ordering::Relaxed);
    }

    /// Holds the server out of the rotation for `d` (after a failed dial).
    pub fn hold_out(&self, d: Duration) {
        if !d.is_zero() {
            self.held_until
                .store(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// True when the server may be picked at `now` (from [`now_ms`]).
    fn available_at(&self, now: u64) -> bool {
        self.weight > 0 && self.is_healthy() && self.held_until.load(Ordering::Relaxed) <= now
    }

    /// True when the server may be picked now.
    pub fn is_available(&self) -> bool {
        self.available_at(now_ms())
    }
}

/// A peer of a weighted round-robin.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A server.
    Server(Arc<ServerState>),
    /// A nested service (`weighted.services`).
    Service(Arc<Balancer>),
}

/// A smooth weighted round-robin over peers.
#[derive(Debug)]
pub struct Balancer {
    peers: Vec<(i64, Peer)>,
    current: Mutex<Vec<i64>>,
    /// The service this balancer implements (name, transport, counters).
    pub service: Arc<ServiceInfo>,
    /// See [`Balancer::is_plain`].
    plain: bool,
}

/// What a service carries besides its peers.
#[derive(Debug, Default)]
pub struct ServiceInfo {
    /// The service name (`name@provider`).
    pub name: String,
    /// The transport its servers are dialled with (load balancers only).
    pub transport: Option<crate::dial::Transport>,
    /// The transport sends a PROXY header (the original addresses are needed when dialling).
    pub proxy_protocol: bool,
    /// How long the other side may stay open after one side closed (None = no deadline).
    pub termination_delay: Option<Duration>,
    /// Counters of the service (kept across reloads while the service keeps its name).
    pub counters: Arc<Counters>,
}

/// A picked server and the load-balancer service it belongs to.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The server.
    pub server: Arc<ServerState>,
    /// Its load-balancer service.
    pub service: Arc<ServiceInfo>,
}

/// Servers already tried for one connection (the next pick skips them).
pub type Tried = Vec<Arc<ServerState>>;

impl Balancer {
    /// A balancer over `peers` with their weights.
    pub fn new(peers: Vec<(u32, Peer)>) -> Self {
        Self::with_service(peers, Arc::default())
    }

    /// A balancer over `peers` implementing `service`.
    pub fn with_service(peers: Vec<(u32, Peer)>, service: Arc<ServiceInfo>) -> Self {
        let n = peers.len();
        let dials_plain = service
            .transport
            .as_ref()
            .is_some_and(|t| !t.always_tls() && t.proxy_protocol().is_none())
            && !service.proxy_protocol;
        let plain = peers.iter().all(|(_, p)| match p {
            Peer::Server(s) => dials_plain && !s.tls && s.address.socket_addr().is_some(),
            Peer::Service(b) => b.plain,
        });
        Balancer {
            peers: peers.into_iter().map(|(w, p)| (i64::from(w), p)).collect(),
            current: Mutex::new(vec![0; n]),
            service,
            plain,
        }
    }

    /// True when every server this service can pick (nested services included) is dialled as
    /// plain TCP to an IP address, with no TLS and no PROXY header: what the event-loop data
    /// path ([`crate::evloop`]) dials itself.
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    /// The peers with their weights.
    pub fn peers(&self) -> impl Iterator<Item = (u32, &Peer)> {
        self.peers.iter().map(|(w, p)| (*w as u32, p))
    }

    fn peer_available(peer: &Peer, weight: i64, now: u64, tried: &Tried, depth: u8) -> bool {
        if weight <= 0 {
            return false;
        }
        match peer {
            Peer::Server(s) => s.available_at(now) && !tried.iter().any(|t| Arc::ptr_eq(t, s)),
            Peer::Service(b) => depth < MAX_DEPTH && b.available_inner(now, tried, depth + 1),
        }
    }

    fn available_inner(&self, now: u64, tried: &Tried, depth: u8) -> bool {
        self.peers
            .iter()
            .any(|(w, p)| Self::peer_available(p, *w, now, tried, depth))
    }

    /// True when a pick would find a server.
    pub fn has_available(&self) -> bool {
        self.available_inner(now_ms(), &Vec::new(), 0)
    }

    /// Picks a server, skipping those in `tried`; `None` when no server is available.
    pub fn pick(&self, tried: &Tried) -> Option<Pick> {
        self.pick_inner(now_ms(), tried, 0)
    }

    fn pick_inner(&self, now: u64, tried: &Tried, depth: u8) -> Option<Pick> {
        let mut skip: u64 = 0; // children that turned out empty in this pick (≤ 64 tracked)
        for _ in 0..self.peers.len().max(1) {
            let idx = {
                let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for (i, (w, p)) in self.peers.iter().enumerate() {
                    if (i < 64 && skip & (1 << i) != 0)
                        || !Self::peer_available(p, *w, now, tried, depth)
                    {
                        continue;
                    }
                    cur[i] += *w;
                    total += *w;
                    if best.is_none_or(|b| cur[i] > cur[b]) {
                        best = Some(i);
                    }
                }
                let b = best?;
                cur[b] -= total;
                b
            };
            match &self.peers[idx].1 {
                Peer::Server(s) => {
                    return Some(Pick {
                        server: s.clone(),
                        service: self.service.clone(),
                    });
                }
                Peer::Service(inner) => {
                    if let Some(s) = inner.pick_inner(now, tried, depth + 1) {
                        return Some(s);
                    }
                    if idx < 64 {
                        skip |= 1 << idx;
                    }
                }
            }
        }
        None
    }
}

/// Bound on the nesting of weighted services (cycles are refused when compiling; this is a
/// second guard).
const MAX_DEPTH: u8 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(ws: &[u32]) -> (Vec<Arc<ServerState>>, Balancer) {
        let s: Vec<_> = ws
            .iter()
            .enumerate()
            .map(|(i, w)| Arc::new(ServerState::new(format!("s{i}:1"), *w, false)))
            .collect();
        let b = Balancer::new(
            s.iter()
                .map(|x| (x.weight, Peer::Server(x.clone())))
                .collect(),
        );
        (s, b)
    }

    fn name(b: &Balancer) -> String {
        b.pick(&Vec::new())
            .map(|p| p.server.address.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn smooth_three_to_one() {
        let (_, b) = servers(&[3, 1]);
        let seq: Vec<String> = (0..8).map(|_| name(&b)).collect();
        assert_eq!(
            seq,
            [
                "s0:1", "s0:1", "s1:1", "s0:1", "s0:1", "s0:1", "s1:1", "s0:1"
            ]
        );
    }

    #[test]
    fn nginx_example_and_zero_weight() {
        // nginx's documented example: weights 5,1,1 give a a b a c a a.
        let (_, b) = servers(&[5, 1, 1, 0]);
        let seq: String = (0..7).map(|_| name(&b).chars().nth(1).unwrap()).collect();
        assert_eq!(seq, "0010200");
        for _ in 0..1000 {
            assert_ne!(name(&b), "s3:1");
        }
        let (_, b) = servers(&[0, 0]);
        assert!(b.pick(&Vec::new()).is_none());
        assert!(!b.has_available());
    }

    #[test]
    fn unhealthy_and_tried_are_skipped() {
        let (s, b) = servers(&[1, 1, 1]);
        s[1].set_healthy(false);
        for _ in 0..10 {
            assert_ne!(name(&b), "s1:1");
        }
        let tried = vec![s[0].clone()];
        for _ in 0..10 {
            assert_eq!(b.pick(&tried).unwrap().server.address, "s2:1");
        }
        let tried = vec![s[0].clone(), s[2].clone()];
        assert!(b.pick(&tried).is_none());
        s[1].set_healthy(true);
        assert_eq!(b.pick(&tried).unwrap().server.address, "s1:1");
    }

    #[tokio::test(start_paused = true)]
    async fn hold_out_expires() {
        let (s, b) = servers(&[1, 1]);
        s[0].hold_out(Duration::from_secs(2));
        for _ in 0..4 {
            assert_eq!(name(&b), "s1:1");
        }
        tokio::time::advance(Duration::from_millis(2001)).await;
        let picks: Vec<String> = (0..4).map(|_| name(&b)).collect();
        assert!(picks.contains(&"s0:1".to_owned()));
    }

    #[test]
    fn nested_weighted_services() {
        let (a, ba) = servers(&[1, 1]);
        let (c, bc) = servers(&[1]);
        let top = Balancer::new(vec![
            (3, Peer::Service(Arc::new(ba))),
            (1, Peer::Service(Arc::new(bc))),
            (5, Peer::Service(Arc::new(Balancer::new(vec![])))),
        ]);
        let mut count_c = 0;
        for _ in 0..400 {
            let s = top.pick(&Vec::new()).unwrap().server;
            if Arc::ptr_eq(&s, &c[0]) {
                count_c += 1;
            }
        }
        assert_eq!(count_c, 100);
        a[0].set_healthy(false);
        a[1].set_healthy(false);
        for _ in 0..10 {
            assert!(Arc::ptr_eq(&top.pick(&Vec::new()).unwrap().server, &c[0]));
        }
    }
}
