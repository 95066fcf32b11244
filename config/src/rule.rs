//! TCP router rules as an AST.
//!
//! Grammar (Traefik's TCP matchers): ``HostSNI(`a.example.com`, `b.example.com`)``,
//! ``HostSNIRegexp(`^.+\.example\.com$`)``, ``ClientIP(`10.0.0.0/8`)``, ``ALPN(`h2`)``, combined with
//! `&&`, `||`, `!` and parentheses; arguments in backquotes or double quotes.

use std::fmt;

/// A parsed rule.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Rule {
    /// ``HostSNI(`host`, …)``: matches any of the names (case-insensitive); `*` matches every
    /// connection, TLS or not.
    HostSni(Vec<String>),
    /// ``HostSNIRegexp(`re`, …)``: the SNI matches any of the regular expressions.
    HostSniRegexp(Vec<regex::Regex>),
    /// ``ClientIP(`ip or cidr`, …)``: the client address is in any of the ranges.
    ClientIp(Vec<ipnet::IpNet>),
    /// ``ALPN(`proto`, …)``: the ClientHello offers any of the protocols.
    Alpn(Vec<String>),
    /// Both sides match.
    And(Box<Rule>, Box<Rule>),
    /// Either side matches.
    Or(Box<Rule>, Box<Rule>),
    /// The inner rule does not match.
    Not(Box<Rule>),
}

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        use Rule::*;
        match (self, other) {
            (HostSni(a), HostSni(b)) | (Alpn(a), Alpn(b)) => a == b,
            (HostSniRegexp(a), HostSniRegexp(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.as_str() == y.as_str())
            }
            (ClientIp(a), ClientIp(b)) => a == b,
            (And(a1, a2), And(b1, b2)) | (Or(a1, a2), Or(b1, b2)) => a1 == b1 && a2 == b2,
            (Not(a), Not(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Rule {
    /// Writes the rule back in Traefik's syntax (fully parenthesised).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn args<T: fmt::Display>(f: &mut fmt::Formatter<'_>, name: &str, xs: &[T]) -> fmt::Result {
            write!(f, "{name}(")?;
            for (i, x) in xs.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "`{x}`")?;
            }
            f.write_str(")")
        }
        match self {
            Rule::HostSni(v) => args(f, "HostSNI", v),
            Rule::HostSniRegexp(v) => {
                let s: Vec<&str> = v.iter().map(|r| r.as_str()).collect();
                args(f, "HostSNIRegexp", &s)
            }
            Rule::ClientIp(v) => args(f, "ClientIP", v),
            Rule::Alpn(v) => args(f, "ALPN", v),
            Rule::And(a, b) => write!(f, "({a} && {b})"),
            Rule::Or(a, b) => write!(f, "({a} || {b})"),
            Rule::Not(a) => write!(f, "!{a}"),
        }
    }
}
