//! Routing tables of an entry point and rule matching.
//!
//! Routes are sorted by priority (explicit, else [`Rule::default_priority`]: the rule's length,
//! ``HostSNI(`*`)`` lowest), ties by name. A TLS connection tries the TLS routers first, then the non-TLS ones (a
//! ``HostSNI(`*`)`` catch-all takes any connection); a plaintext connection only the non-TLS
//! routers. When an entry point has no TLS router it routes at once, without reading a byte.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tagway_config::Rule;

use crate::balancer::Balancer;
use crate::metrics::Counters;
use crate::middleware::{Middleware, canonical_ip};

/// What a router does with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// A non-TLS router (raw TCP).
    None,
    /// Match TLS connections by SNI and forward the encrypted stream untouched.
    Passthrough,
    /// Terminate TLS and forward plaintext (or re-encrypt, as the service's transport says).
    Terminate,
}

/// A compiled router.
#[derive(Debug)]
pub struct Route {
    /// The router name (`name@provider`).
    pub name: String,
    /// The rule.
    pub rule: Rule,
    /// Priority (higher first).
    pub priority: i64,
    /// TLS handling.
    pub tls: TlsMode,
    /// The termination configuration (its `tls.options`), for [`TlsMode::Terminate`].
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    /// Middlewares, in order.
    pub middlewares: Vec<Arc<Middleware>>,
    /// The service.
    pub service: Arc<Balancer>,
    /// Counters of the router (kept across reloads while the router keeps its name).
    pub counters: Arc<Counters>,
}

/// What is known about a connection when routing it.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo<'a> {
    /// The SNI of the ClientHello (lower-case), if TLS.
    pub sni: Option<&'a str>,
    /// The ALPN protocols offered.
    pub alpn: &'a [String],
    /// The client address (PROXY-decoded when trusted).
    pub client_ip: IpAddr,
    /// The connection starts with a TLS ClientHello.
    pub tls: bool,
}

/// True when `rule` matches the connection.
pub fn matches(rule: &Rule, c: &ConnInfo<'_>) -> bool {
    match rule {
        Rule::HostSni(names) => names.iter().any(|n| {
            n == "*"
                || c.sni
                    .is_some_and(|s| s.eq_ignore_ascii_case(n.trim_end_matches('.')))
        }),
        Rule::HostSniRegexp(res) => c.sni.is_some_and(|s| res.iter().any(|r| r.is_match(s))),
        Rule::ClientIp(nets) => {
            let ip = canonical_ip(c.client_ip);
            nets.iter().any(|n| n.contains(&ip))
        }
        Rule::Alpn(protos) => protos.iter().any(|p| c.alpn.iter().any(|a| a == p)),
        Rule::And(a, b) => matches(a, c) && matches(b, c),
        Rule::Or(a, b) => matches(a, c) || matches(b, c),
        Rule::Not(a) => !matches(a, c),
        _ => false,
    }
}

/// Routes in priority order, with indexes by exact host name and by exact client address,
/// built once per configuration so that a connection does not evaluate every router's rule: with
/// thousands of ``HostSNI(`name`)`` or ``ClientIP(`address`)`` routers on one entry point, a
/// lookup costs a hash probe or two plus the routers whose rule cannot be indexed (regexps,
/// ranges of addresses, ALPN, `*`, combinations).
#[derive(Debug, Default)]
struct Ordered {
    routes: Vec<Arc<Route>>,
    /// The indexes: they depend only on rules and priorities, so a table whose routes were
    /// swapped for others with the same rules shares them.
    index: Arc<Index>,
}

#[derive(Debug, Default)]
struct Index {
    /// Lower-case host name (trailing dots trimmed) → positions of the routers whose rule is
    /// exactly ``HostSNI(`…`)`` naming it, ascending.
    by_name: HashMap<String, Vec<usize>>,
    /// Client address → positions of the routers whose rule is exactly ``ClientIP(`…`)`` with
    /// only single addresses (`/32`, `/128`), one of them this one, ascending.
    by_ip: HashMap<IpAddr, Vec<usize>>,
    /// Positions of every other router, ascending.
    other: Vec<usize>,
}

/// Adds position `i` under `key` (once, however often a rule lists the key).
fn index_at<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<usize>>, key: K, i: usize) {
    let at = map.entry(key).or_default();
    if at.last() != Some(&i) {
        at.push(i);
    }
}

impl Ordered {
    fn new(routes: Vec<Arc<Route>>) -> Self {
        let mut index = Index::default();
        for (i, r) in routes.iter().enumerate() {
            match &r.rule {
                Rule::HostSni(names) if !names.is_empty() && names.iter().all(|n| n != "*") => {
                    for n in names {
                        let key = n.trim_end_matches('.').to_ascii_lowercase();
                        index_at(&mut index.by_name, key, i);
                    }
                }
                Rule::ClientIp(nets)
                    if !nets.is_empty()
                        && nets.iter().all(|n| n.prefix_len() == n.max_prefix_len()) =>
                {
                    // A single-address network contains exactly its address (`matches` compares
                    // it with the canonical client address, as the lookup does).
                    for n in nets {
                        index_at(&mut index.by_ip, n.network(), i);
                    }
                }
                _ => index.other.push(i),
            }
        }
        Ordered {
            routes,
            index: Arc::new(index),
        }
    }

    /// The same table with some routes swapped for others of the same name, rule and
    /// priority (positions and indexes stay valid, and are shared).
    fn replaced(&self, with: &HashMap<&str, Arc<Route>>) -> Ordered {
        let mut routes = self.routes.clone();
        // The routes are sorted by (priority, name), which the replacements keep: each is found
        // by binary search, not by looking every route's name up.
        for r in with.values() {
            if let Ok(i) = routes.binary_search_by(|x| order(x, r)) {
                routes[i] = r.clone();
            }
        }
        Ordered {
            routes,
            index: self.index.clone(),
        }
    }

    /// The first route (in priority order) whose rule matches.
    fn find(&self, c: &ConnInfo<'_>) -> Option<&Arc<Route>> {
        let ix = &*self.index;
        // An indexed rule matches exactly when its list holds the SNI (or the client address):
        // the first position listed is the best match of that index.
        let by_name = c.sni.and_then(|sni| {
            let hit = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
                ix.by_name.get(&sni.to_ascii_lowercase())
            } else {
                ix.by_name.get(sni)
            };
            hit.and_then(|v| v.first().copied())
        });
        let by_ip = if ix.by_ip.is_empty() {
            None
        } else {
            ix.by_ip
                .get(&canonical_ip(c.client_ip))
                .and_then(|v| v.first().copied())
        };
        let indexed = match (by_name, by_ip) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let bound = indexed.unwrap_or(usize::MAX);
        ix.other
            .iter()
            .take_while(|&&i| i < bound)
            .find(|&&i| matches(&self.routes[i].rule, c))
            .or(indexed.as_ref())
            .map(|&i| &self.routes[i])
    }
}

/// The order of an entry point's routes: priority, highest first, then name.
fn order(a: &Arc<Route>, b: &Arc<Route>) -> std::cmp::Ordering {
    b.priority
        .cmp(&a.priority)
        .then_with(|| a.name.cmp(&b.name))
}

/// The routes of one entry point.
#[derive(Debug, Default)]
pub struct EntryTable {
    tls_routes: Ordered,
    plain_routes: Ordered,
}

impl EntryTable {
    /// Builds the table; sorts by priority then name.
    pub fn new(routes: Vec<Arc<Route>>) -> Self {
        let (mut tls_routes, mut plain_routes): (Vec<_>, Vec<_>) =
            routes.into_iter().partition(|r| r.tls != TlsMode::None);
        tls_routes.sort_by(order);
        plain_routes.sort_by(order);
        EntryTable {
            tls_routes: Ordered::new(tls_routes),
            plain_routes: Ordered::new(plain_routes),
        }
    }

    /// This table with the routes named in `with` swapped for the given ones, which must have
    /// the same rule, priority and TLS mode (a router recompiled because its service changed):
    /// no sorting nor indexing again.
    pub fn replaced(&self, with: &HashMap<&str, Arc<Route>>) -> EntryTable {
        EntryTable {
            tls_routes: self.tls_routes.replaced(with),
            plain_routes: self.plain_routes.replaced(with),
        }
    }

    /// True when connections must be peeked (some router needs the ClientHello).
    pub fn needs_peek(&self) -> bool {
        !self.tls_routes.routes.is_empty()
    }

    /// True when there is no route at all.
    pub fn is_empty(&self) -> bool {
        self.tls_routes.routes.is_empty() && self.plain_routes.routes.is_empty()
    }

    /// The route for a connection.
    pub fn route(&self, c: &ConnInfo<'_>) -> Option<&Arc<Route>> {
        let tls = if c.tls { self.tls_routes.find(c) } else { None };
        tls.or_else(|| self.plain_routes.find(c))
    }

    /// Every route, TLS ones first.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.tls_routes
            .routes
            .iter()
            .chain(self.plain_routes.routes.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tagway_config::rule::parse;

    fn route(name: &str, rule: &str, tls: TlsMode, prio: Option<i64>) -> Arc<Route> {
        let r = parse(rule).unwrap();
        Arc::new(Route {
            name: name.into(),
            priority: prio.unwrap_or_else(|| Rule::default_priority(rule)),
            rule: r,
            tls,
            tls_config: None,
            middlewares: vec![],
            service: Arc::new(Balancer::new(vec![])),
            counters: Arc::default(),
        })
    }

    fn info<'a>(sni: Option<&'a str>, alpn: &'a [String], ip: &str) -> ConnInfo<'a> {
        ConnInfo {
            sni,
            alpn,
            client_ip: ip.parse().unwrap(),
            tls: sni.is_some() || !alpn.is_empty(),
        }
    }

    #[test]
    fn priorities_and_fallbacks() {
        let t = EntryTable::new(vec![
            route("catch", "HostSNI(`*`)", TlsMode::None, None),
            route("a", "HostSNI(`a.example`)", TlsMode::Passthrough, None),
            route(
                "long",
                "HostSNI(`a.example`) && ClientIP(`10.0.0.0/8`)",
                TlsMode::Terminate,
                None,
            ),
            route(
                "re",
                "HostSNIRegexp(`^.+\\.re\\.example$`)",
                TlsMode::Passthrough,
                None,
            ),
            route("h2", "ALPN(`h2`)", TlsMode::Passthrough, Some(1)),
        ]);
        assert!(t.needs_peek());
        let none: &[String] = &[];
        let h2 = ["h2".to_string()];
        let name = |c: ConnInfo<'_>| t.route(&c).map(|r| r.name.clone());
        assert_eq!(
            name(info(Some("a.example"), none, "10.1.1.1")).as_deref(),
            Some("long")
        );
        assert_eq!(
            name(info(Some("a.example"), none, "::ffff:10.1.1.1")).as_deref(),
            Some("long")
        );
        assert_eq!(
            name(info(Some("a.example"), none, "192.0.2.1")).as_deref(),
            Some("a")
        );
        assert_eq!(
            name(info(Some("x.re.example"), none, "192.0.2.1")).as_deref(),
            Some("re")
        );
        assert_eq!(
            name(info(Some("zzz"), &h2, "192.0.2.1")).as_deref(),
            Some("h2")
        );
        // TLS without a TLS match and plaintext fall to the catch-all.
        assert_eq!(
            name(info(Some("zzz"), none, "192.0.2.1")).as_deref(),
            Some("catch")
        );
        assert_eq!(
            name(info(None, none, "192.0.2.1")).as_deref(),
            Some("catch")
        );
    }

    /// The indexes give the same answer as evaluating every rule in priority order, for names
    /// and addresses in and out of them, case, trailing dots, IPv4-mapped client addresses,
    /// priorities that interleave indexed and non-indexed routers, and duplicates.
    #[test]
    fn indexed_lookup_agrees_with_a_linear_scan() {
        let rules = [
            ("a1", "HostSNI(`a.example`)", Some(5)),
            ("a2", "HostSNI(`A.Example`, `b.example`)", Some(7)),
            ("dup", "HostSNI(`c.example`, `c.example`)", None),
            ("re", "HostSNIRegexp(`^[ab]\\.example$`)", Some(6)),
            ("ip", "ClientIP(`10.0.0.0/8`)", Some(100)),
            ("host1", "ClientIP(`10.1.2.3`)", Some(150)),
            ("host2", "ClientIP(`192.0.2.9/32`, `2001:db8::1`)", Some(4)),
            ("host3", "ClientIP(`192.0.2.9`)", Some(-5)),
            ("hostdup", "ClientIP(`10.0.0.1`, `10.0.0.1`)", Some(9)),
            ("mixed", "ClientIP(`10.0.0.1`, `172.16.0.0/12`)", Some(10)),
            (
                "and",
                "HostSNI(`b.example`) && ClientIP(`192.0.2.0/24`)",
                Some(8),
            ),
            ("not", "!HostSNI(`a.example`)", Some(1)),
            ("alpn", "ALPN(`h2`)", Some(6)),
            ("star", "HostSNI(`*`)", None),
            ("late", "HostSNI(`a.example`)", Some(-3)),
        ];
        let routes: Vec<Arc<Route>> = rules
            .iter()
            .map(|(n, r, p)| route(n, r, TlsMode::Passthrough, *p))
            .collect();
        let t = EntryTable::new(routes.clone());
        let mut sorted = routes;
        sorted.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        let h2 = ["h2".to_string()];
        let none: &[String] = &[];
        let mut checked = 0;
        for sni in [
            Some("a.example"),
            Some("A.EXAMPLE"),
            Some("b.example"),
            Some("c.example"),
            Some("d.example"),
            Some("a.example."),
            None,
        ] {
            for alpn in [none, &h2[..]] {
                for ip in [
                    "10.1.2.3",
                    "192.0.2.9",
                    "::ffff:10.0.0.1",
                    "2001:db8::1",
                    "::ffff:192.0.2.9",
                    "172.16.5.5",
                    "10.0.0.1",
                ] {
                    let mut c = info(sni, alpn, ip);
                    c.tls = true;
                    let linear = sorted.iter().find(|r| matches(&r.rule, &c));
                    assert_eq!(
                        t.route(&c).map(|r| &r.name),
                        linear.map(|r| &r.name),
                        "sni {sni:?} alpn {alpn:?} ip {ip}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 98);
    }

    #[test]
    fn plaintext_without_catch_all_is_unrouted() {
        let t = EntryTable::new(vec![route(
            "a",
            "HostSNI(`a.example`)",
            TlsMode::Passthrough,
            None,
        )]);
        let none: &[String] = &[];
        assert!(t.route(&info(None, none, "127.0.0.1")).is_none());
        let t = EntryTable::new(vec![route(
            "ip",
            "ClientIP(`127.0.0.0/8`)",
            TlsMode::None,
            None,
        )]);
        assert!(!t.needs_peek());
        assert!(t.route(&info(None, none, "127.0.0.1")).is_some());
        assert!(t.route(&info(None, none, "10.0.0.1")).is_none());
    }
}
