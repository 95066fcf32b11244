//! TCP router rules as an AST.
//!
//! Grammar (Traefik's TCP matchers): ``HostSNI(`a.example.com`, `b.example.com`)``,
//! ``HostSNIRegexp(`^.+\.example\.com$`)``, ``ClientIP(`10.0.0.0/8`)``, ``ALPN(`h2`)``, combined with
//! `&&`, `||`, `!` and parentheses; arguments in backquotes or double quotes.

use std::fmt;

use crate::checks::parse_ip_or_cidr;

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

impl Rule {
    /// The default priority of a router whose rule is `text`: its length in bytes, as Traefik;
    /// ``HostSNI(`*`)`` (a catch-all) gets 0, the lowest, so every other rule is tried first.
    pub fn default_priority(text: &str) -> i64 {
        match parse(text) {
            Ok(Rule::HostSni(names)) if names.iter().all(|n| n == "*") => 0,
            _ => i64::try_from(text.trim().len()).unwrap_or(i64::MAX),
        }
    }

    /// True when the rule inspects the TLS ClientHello: a `HostSNI` other than `*`, a
    /// `HostSNIRegexp` or an `ALPN` matcher anywhere in it. Such a rule never matches a
    /// connection that does not start with a TLS ClientHello.
    pub fn needs_tls(&self) -> bool {
        match self {
            Rule::HostSni(names) => names.iter().any(|n| n != "*"),
            Rule::HostSniRegexp(_) | Rule::Alpn(_) => true,
            Rule::ClientIp(_) => false,
            Rule::And(a, b) | Rule::Or(a, b) => a.needs_tls() || b.needs_tls(),
            Rule::Not(a) => a.needs_tls(),
        }
    }

    /// True when the rule matches every connection (``HostSNI(`*`)``, alone or in an `||`).
    pub fn is_catch_all(&self) -> bool {
        match self {
            Rule::HostSni(names) => names.iter().any(|n| n == "*"),
            Rule::Or(a, b) => a.is_catch_all() || b.is_catch_all(),
            Rule::And(a, b) => a.is_catch_all() && b.is_catch_all(),
            _ => false,
        }
    }
}

/// Why a rule could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid rule `{rule}` at column {column}: {kind}")]
pub struct RuleError {
    /// The rule as written.
    pub rule: String,
    /// 1-based column (in characters) where the problem is.
    pub column: usize,
    /// What is wrong.
    pub kind: RuleErrorKind,
}

/// What is wrong in a rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleErrorKind {
    /// The rule is empty.
    #[error("the rule is empty: write e.g. HostSNI(`db.example.com`) or HostSNI(`*`)")]
    Empty,
    /// Something else than what the grammar allows here.
    #[error("expected {expected}, found {found}")]
    Unexpected {
        /// What the grammar allows here.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A matcher name tagway does not know.
    #[error("unknown matcher `{name}`: TCP rules use HostSNI, HostSNIRegexp, ClientIP or ALPN")]
    UnknownMatcher {
        /// The name written.
        name: String,
    },
    /// A quoted argument without its closing quote.
    #[error("unterminated argument: add the closing {quote}")]
    Unterminated {
        /// The quote character.
        quote: char,
    },
    /// A matcher argument that is not valid for the matcher.
    #[error("{matcher}: {message}")]
    InvalidArgument {
        /// The matcher.
        matcher: String,
        /// The argument.
        argument: String,
        /// Why.
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    LParen,
    RParen,
    Comma,
    And,
    Or,
    Not,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Str(s) => format!("argument `{s}`"),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
            Tok::And => "`&&`".into(),
            Tok::Or => "`||`".into(),
            Tok::Not => "`!`".into(),
            Tok::End => "the end of the rule".into(),
        }
    }
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

fn lex(text: &str) -> Result<Vec<(Tok, usize)>, (usize, RuleErrorKind)> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let col = |i: usize| i + 1;
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].1;
        let start = i;
        match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => out.push((Tok::LParen, col(start))),
            ')' => out.push((Tok::RParen, col(start))),
            ',' => out.push((Tok::Comma, col(start))),
            '!' => out.push((Tok::Not, col(start))),
            '&' | '|' => {
                if chars.get(i + 1).map(|x| x.1) == Some(c) {
                    i += 1;
                    out.push((if c == '&' { Tok::And } else { Tok::Or }, col(start)));
                } else {
                    return Err((
                        col(start),
                        RuleErrorKind::Unexpected {
                            expected: if c == '&' {
                                "`&&`".into()
                            } else {
                                "`||`".into()
                            },
                            found: format!("`{c}`"),
                        },
                    ));
                }
            }
            '`' | '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(&(_, ch)) = chars.get(i) else {
                        return Err((col(start), RuleErrorKind::Unterminated { quote: c }));
                    };
                    if ch == c {
                        break;
                    }
                    if c == '"' && ch == '\\' {
                        i += 1;
                        match chars.get(i).map(|x| x.1) {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(other) => s.push(other),
                            None => {
                                return Err((col(start), RuleErrorKind::Unterminated { quote: c }));
                            }
                        }
                    } else {
                        s.push(ch);
                    }
                    i += 1;
                }
                out.push((Tok::Str(s), col(start)));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = String::new();
                while let Some(&(_, ch)) = chars.get(i) {
                    if ch.is_ascii_alphanumeric() || ch == '_' {
                        s.push(ch);
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push((Tok::Ident(s), col(start)));
                continue;
            }
            other => {
                return Err((
                    col(start),
                    RuleErrorKind::Unexpected {
                        expected: "a matcher, `!` or `(`".into(),
                        found: format!("`{other}`"),
                    },
                ));
            }
        }
        i += 1;
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

/// Parses a TCP rule: ``HostSNI(`a.example.com`)``, ``HostSNIRegexp(`^.+\.example\.com$`)``,
/// ``ClientIP(`10.0.0.0/8`, `::1`)``, ``ALPN(`h2`)``, combined with `&&` (binds tighter), `||`,
/// `!` and parentheses; arguments in backquotes or double quotes, one or more per matcher;
/// matcher names are case-insensitive. Host names are lowercased.
pub fn parse(text: &str) -> Result<Rule, RuleError> {
    let err = |column, kind| RuleError {
        rule: text.to_owned(),
        column,
        kind,
    };
    if text.trim().is_empty() {
        return Err(err(1, RuleErrorKind::Empty));
    }
    let toks = lex(text).map_err(|(c, k)| err(c, k))?;
    let mut p = Parser { toks, pos: 0 };
    let rule = p.or().map_err(|(c, k)| err(c, k))?;
    match p.peek() {
        (Tok::End, _) => Ok(rule),
        (t, c) => Err(err(
            c,
            RuleErrorKind::Unexpected {
                expected: "`&&`, `||` or the end of the rule".into(),
                found: t.describe(),
            },
        )),
    }
}

type PResult<T> = Result<T, (usize, RuleErrorKind)>;

impl Parser {
    fn peek(&self) -> (Tok, usize) {
        self.toks[self.pos.min(self.toks.len() - 1)].clone()
    }

    fn bump(&mut self) -> (Tok, usize) {
        let t = self.peek();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn or(&mut self) -> PResult<Rule> {
        let mut left = self.and()?;
        while self.peek().0 == Tok::Or {
            self.bump();
            let right = self.and()?;
            left = Rule::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> PResult<Rule> {
        let mut left = self.unary()?;
        while self.peek().0 == Tok::And {
            self.bump();
            let right = self.unary()?;
            left = Rule::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> PResult<Rule> {
        match self.bump() {
            (Tok::Not, _) => Ok(Rule::Not(Box::new(self.unary()?))),
            (Tok::LParen, _) => {
                let inner = self.or()?;
                match self.bump() {
                    (Tok::RParen, _) => Ok(inner),
                    (t, c) => Err((
                        c,
                        RuleErrorKind::Unexpected {
                            expected: "`)`, `&&` or `||`".into(),
                            found: t.describe(),
                        },
                    )),
                }
            }
            (Tok::Ident(name), c) => self.matcher(&name, c),
            (t, c) => Err((
                c,
                RuleErrorKind::Unexpected {
                    expected: "a matcher (HostSNI, HostSNIRegexp, ClientIP, ALPN), `!` or `(`"
                        .into(),
                    found: t.describe(),
                },
            )),
        }
    }

    fn matcher(&mut self, name: &str, column: usize) -> PResult<Rule> {
        const NAMES: [&str; 4] = ["HostSNI", "HostSNIRegexp", "ClientIP", "ALPN"];
        let Some(canonical) = NAMES.iter().find(|n| n.eq_ignore_ascii_case(name)) else {
            return Err((
                column,
                RuleErrorKind::UnknownMatcher {
                    name: name.to_owned(),
                },
            ));
        };
        match self.bump() {
            (Tok::LParen, _) => {}
            (t, c) => {
                return Err((
                    c,
                    RuleErrorKind::Unexpected {
                        expected: format!("`(` after {canonical}"),
                        found: t.describe(),
                    },
                ));
            }
        }
        let mut args: Vec<(String, usize)> = Vec::new();
        loop {
            match self.bump() {
                (Tok::Str(s), c) => args.push((s, c)),
                (t, c) => {
                    return Err((
                        c,
                        RuleErrorKind::Unexpected {
                            expected: "an argument in backquotes (`…`) or double quotes".into(),
                            found: t.describe(),
                        },
                    ));
                }
            }
            match self.bump() {
                (Tok::Comma, _) => continue,
                (Tok::RParen, _) => break,
                (t, c) => {
                    return Err((
                        c,
                        RuleErrorKind::Unexpected {
                            expected: "`,` or `)`".into(),
                            found: t.describe(),
                        },
                    ));
                }
            }
        }
        let invalid = |arg: &str, c: usize, message: String| {
            (
                c,
                RuleErrorKind::InvalidArgument {
                    matcher: (*canonical).to_owned(),
                    argument: arg.to_owned(),
                    message,
                },
            )
        };
        match *canonical {
            "HostSNI" => {
                let mut names = Vec::new();
                for (a, c) in &args {
                    let a = a.trim();
                    let valid = a == "*"
                        || (!a.is_empty()
                            && a.split('.').all(|l| {
                                !l.is_empty()
                                    && l.bytes().all(|b| {
                                        b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
                                    })
                            }));
                    if !valid {
                        return Err(invalid(
                            a,
                            *c,
                            format!(
                                "`{a}` is not a host name (use HostSNIRegexp for patterns, HostSNI(`*`) for every connection)"
                            ),
                        ));
                    }
                    names.push(a.to_ascii_lowercase());
                }
                if names.len() > 1 && names.iter().any(|n| n == "*") {
                    return Err(invalid(
                        "*",
                        args[0].1,
                        "`*` already matches every connection: write HostSNI(`*`) alone".into(),
                    ));
                }
                Ok(Rule::HostSni(names))
            }
            "HostSNIRegexp" => {
                let mut res = Vec::new();
                for (a, c) in &args {
                    match regex::Regex::new(a) {
                        Ok(r) => res.push(r),
                        Err(e) => {
                            return Err(invalid(
                                a,
                                *c,
                                format!("invalid regular expression `{a}`: {e}"),
                            ));
                        }
                    }
                }
                Ok(Rule::HostSniRegexp(res))
            }
            "ClientIP" => {
                let mut nets = Vec::new();
                for (a, c) in &args {
                    nets.push(parse_ip_or_cidr(a).map_err(|m| invalid(a, *c, m))?);
                }
                Ok(Rule::ClientIp(nets))
            }
            _ => {
                let mut protos = Vec::new();
                for (a, c) in &args {
                    if a.is_empty() {
                        return Err(invalid(a, *c, "empty protocol name".into()));
                    }
                    if a == "acme-tls/1" {
                        return Err(invalid(
                            a,
                            *c,
                            "`acme-tls/1` is reserved for ACME TLS-ALPN challenges".into(),
                        ));
                    }
                    protos.push(a.clone());
                }
                Ok(Rule::Alpn(protos))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sni(names: &[&str]) -> Rule {
        Rule::HostSni(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn parses_matchers_and_operators() {
        assert_eq!(parse("HostSNI(`*`)").unwrap(), sni(&["*"]));
        assert_eq!(
            parse("HostSNI(\"A.example.com\", `b.example.com`)").unwrap(),
            sni(&["a.example.com", "b.example.com"])
        );
        assert_eq!(parse("hostsni(`a`)").unwrap(), sni(&["a"]));
        let r = parse("HostSNI(`a`) && !ClientIP(`10.0.0.0/8`, `1.2.3.4`) || ALPN(`h2`)").unwrap();
        assert_eq!(
            r,
            Rule::Or(
                Box::new(Rule::And(
                    Box::new(sni(&["a"])),
                    Box::new(Rule::Not(Box::new(Rule::ClientIp(vec![
                        "10.0.0.0/8".parse().unwrap(),
                        "1.2.3.4/32".parse().unwrap()
                    ]))))
                )),
                Box::new(Rule::Alpn(vec!["h2".into()]))
            )
        );
        let r = parse("HostSNI(`a`) && (ALPN(`h2`) || ALPN(`http/1.1`))").unwrap();
        assert!(matches!(r, Rule::And(_, b) if matches!(*b, Rule::Or(..))));
        let r = parse(r"HostSNIRegexp(`^.+\.example\.com$`)").unwrap();
        assert_eq!(r.to_string(), r"HostSNIRegexp(`^.+\.example\.com$`)");
        // Display round-trips.
        let r = parse("!(HostSNI(`a`) || ClientIP(`::1`))").unwrap();
        assert_eq!(parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        let cases = [
            ("", 1, "empty"),
            (
                "HostSNI(`a`",
                12,
                "expected `,` or `)`, found the end of the rule",
            ),
            ("HostSNI(`a`) &", 14, "expected `&&`"),
            ("HostSNI(`a`) && ", 17, "expected a matcher"),
            ("Host(`a`)", 1, "unknown matcher `Host`"),
            ("HostSNI(a)", 9, "expected an argument in backquotes"),
            ("HostSNI(`a)", 9, "unterminated argument"),
            (
                "ClientIP(`10.0.0.0/33`)",
                10,
                "`10.0.0.0/33` is neither an IP address nor a CIDR",
            ),
            ("HostSNIRegexp(`(`)", 15, "invalid regular expression"),
            (
                "HostSNI(`a`) HostSNI(`b`)",
                14,
                "expected `&&`, `||` or the end of the rule",
            ),
            ("(HostSNI(`a`)", 14, "expected `)`"),
            ("HostSNI(`a/b`)", 9, "not a host name"),
            ("HostSNI(`*`, `a`)", 9, "alone"),
            ("ALPN(`acme-tls/1`)", 6, "reserved"),
        ];
        for (rule, col, needle) in cases {
            let e = parse(rule).unwrap_err();
            assert_eq!(e.column, col, "{rule}: {e}");
            let s = e.to_string();
            assert!(s.contains(needle), "{rule}: {s}");
            assert!(s.contains(&format!("`{rule}`")), "{s}");
        }
    }

    #[test]
    fn priorities_and_helpers() {
        assert_eq!(Rule::default_priority("HostSNI(`*`)"), 0);
        assert_eq!(Rule::default_priority("HostSNI(`a.b`)"), 14);
        assert!(
            Rule::default_priority("ClientIP(`1.2.3.4`)") > Rule::default_priority("HostSNI(`*`)")
        );
        assert!(parse("HostSNI(`*`)").unwrap().is_catch_all());
        assert!(!parse("HostSNI(`*`)").unwrap().needs_tls());
        assert!(parse("HostSNI(`a`)").unwrap().needs_tls());
        assert!(parse("ClientIP(`::1`) && ALPN(`h2`)").unwrap().needs_tls());
        assert!(!parse("ClientIP(`::1`)").unwrap().needs_tls());
        assert!(!parse("ClientIP(`::1`)").unwrap().is_catch_all());
        assert!(
            parse("ClientIP(`::1`) || HostSNI(`*`)")
                .unwrap()
                .is_catch_all()
        );
    }
}
