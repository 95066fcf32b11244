//! TCP middlewares: `ipAllowList` and `inFlightConn`.
//!
//! Client addresses are canonicalised first: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a
//! dual-stack listener reports IPv4 clients) is the IPv4 address, so `10.0.0.0/8` matches it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

/// A source range that is neither a CIDR nor an IP address.
#[derive(Debug, thiserror::Error)]
#[error("invalid IP range {range:?}: expected a CIDR (10.0.0.0/8) or an IP address")]
#[non_exhaustive]
pub struct RangeError {
    /// The text that was read.
    pub range: String,
}

/// The canonical form of a client address (IPv4-mapped IPv6 becomes IPv4).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Parses CIDRs or bare IPs (canonicalised).
pub fn parse_ranges(ranges: &[String]) -> Result<Vec<IpNet>, RangeError> {
    ranges
        .iter()
        .map(|r| {
            let t = r.trim();
            if let Ok(n) = t.parse::<IpNet>() {
                let addr = canonical_ip(n.addr());
                if addr != n.addr() {
                    // ::ffff:10.0.0.0/104 → 10.0.0.0/8
                    let p = n.prefix_len().saturating_sub(96);
                    return IpNet::new(addr, p).map_err(|_| RangeError { range: r.clone() });
                }
                return Ok(n.trunc());
            }
            t.parse::<IpAddr>()
                .map(|ip| IpNet::from(canonical_ip(ip)))
                .map_err(|_| RangeError { range: r.clone() })
        })
        .collect()
}

/// `ipAllowList`: only clients in the source ranges pass.
#[derive(Clone, Debug)]
pub struct IpAllowList {
    ranges: Vec<IpNet>,
}

impl IpAllowList {
    /// Builds the list from `sourceRange`.
    pub fn new(source_range: &[String]) -> Result<Self, RangeError> {
        Ok(IpAllowList {
            ranges: parse_ranges(source_range)?,
        })
    }

    /// True when `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.ranges.iter().any(|n| n.contains(&ip))
    }
}

/// `inFlightConn`: at most `amount` simultaneous connections per client IP.
#[derive(Debug)]
pub struct InFlightConn {
    amount: u64,
    counts: Arc<Mutex<HashMap<IpAddr, u64>>>,
}

/// Holds one in-flight slot; releases it when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, u64>>>,
}

impl InFlightConn {
    /// A limiter of `amount` connections per client IP.
    pub fn new(amount: u64) -> Self {
        InFlightConn {
            amount,
            counts: Arc::default(),
        }
    }

    /// Takes a slot for `ip`, or `None` when the client is at its limit.
    pub fn acquire(&self, ip: IpAddr) -> Option<InFlightGuard> {
        let ip = canonical_ip(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.amount {
            return None;
        }
        *n += 1;
        Some(InFlightGuard {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// A limiter of `amount` connections per client IP that shares the counts of `prev` (a
    /// reload): connections opened before it still count, and release their slot here when they
    /// end.
    pub fn carry_over(amount: u64, prev: &InFlightConn) -> Self {
        InFlightConn {
            amount,
            counts: prev.counts.clone(),
        }
    }

    /// Connections currently held by `ip`.
    pub fn current(&self, ip: IpAddr) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&canonical_ip(ip)).copied().unwrap_or(0)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// One middleware of a router's chain, compiled.
#[derive(Debug)]
#[non_exhaustive]
pub enum Middleware {
    /// `ipAllowList`.
    IpAllowList(IpAllowList),
    /// `inFlightConn`.
    InFlightConn(InFlightConn),
}

/// Why a middleware refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client is not in the allow list.
    NotAllowed,
    /// The client has too many connections open.
    TooManyConnections,
}

impl Refusal {
    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "ip_not_allowed",
            Refusal::TooManyConnections => "in_flight_limit",
        }
    }
}

/// Runs a chain of middlewares for a client; the returned guards must live as long as the
/// connection.
pub fn apply(chain: &[Arc<Middleware>], ip: IpAddr) -> Result<Vec<InFlightGuard>, Refusal> {
    let mut guards = Vec::new();
    for m in chain {
        match &**m {
            Middleware::IpAllowList(l) => {
                if !l.allows(ip) {
                    return Err(Refusal::NotAllowed);
                }
            }
            Middleware::InFlightConn(l) => match l.acquire(ip) {
                Some(g) => guards.push(g),
                None => return Err(Refusal::TooManyConnections),
            },
        }
    }
    Ok(guards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_canonicalises() {
        let l = IpAllowList::new(&[
            "10.0.0.0/8".into(),
            "192.0.2.7".into(),
            "::ffff:172.16.0.0/112".into(),
            "2001:db8::/32".into(),
        ])
        .unwrap();
        assert!(l.allows("10.9.8.7".parse().unwrap()));
        assert!(l.allows("::ffff:10.9.8.7".parse().unwrap()));
        assert!(l.allows("192.0.2.7".parse().unwrap()));
        assert!(!l.allows("192.0.2.8".parse().unwrap()));
        assert!(l.allows("172.16.3.4".parse().unwrap()));
        assert!(!l.allows("172.17.0.1".parse().unwrap()));
        assert!(l.allows("2001:db8::5".parse().unwrap()));
        assert!(!l.allows("2001:db9::5".parse().unwrap()));
        assert!(IpAllowList::new(&["10.0.0.0/33".into()]).is_err());
        assert!(IpAllowList::new(&["nope".into()]).is_err());
    }

    #[test]
    fn in_flight_guards() {
        let l = InFlightConn::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.acquire(ip).unwrap();
        let b = l.acquire("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert!(l.acquire(ip).is_none());
        assert!(l.acquire("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert_eq!(l.current(ip), 1);
        let _c = l.acquire(ip).unwrap();
        drop(b);
        assert_eq!(l.current(ip), 1);
    }

    #[test]
    fn chain_order() {
        let chain = vec![
            Arc::new(Middleware::IpAllowList(
                IpAllowList::new(&["127.0.0.0/8".into()]).unwrap(),
            )),
            Arc::new(Middleware::InFlightConn(InFlightConn::new(1))),
        ];
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let g = apply(&chain, ip).unwrap();
        assert_eq!(apply(&chain, ip).unwrap_err(), Refusal::TooManyConnections);
        assert_eq!(
            apply(&chain, "10.0.0.1".parse().unwrap()).unwrap_err(),
            Refusal::NotAllowed
        );
        drop(g);
        assert!(apply(&chain, ip).is_ok());
    }
}
