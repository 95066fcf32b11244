//! Interim reader of rule text into `tagway_config::Rule`, used until `tagway_config::rule::parse`
//! lands on main (then this module is replaced by a `pub use`). Grammar: `HostSNI`,
//! `HostSNIRegexp`, `ClientIP`, `ALPN` with backquoted or double-quoted arguments, `&&`, `||`, `!`
//! and parentheses (`&&` binds tighter than `||`).

use tagway_config::Rule;

/// A rule that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid rule {rule:?} at byte {at}: {message}")]
#[non_exhaustive]
pub struct RuleError {
    /// The rule text.
    pub rule: String,
    /// Byte offset of the problem.
    pub at: usize,
    /// What is wrong.
    pub message: String,
}

/// Reads a rule.
pub fn parse(text: &str) -> Result<Rule, RuleError> {
    let mut p = P { s: text, i: 0 };
    let r = p.or()?;
    p.ws();
    if p.i != text.len() {
        return Err(p.err("unexpected text after the rule"));
    }
    Ok(r)
}

struct P<'a> {
    s: &'a str,
    i: usize,
}

impl P<'_> {
    fn err(&self, m: &str) -> RuleError {
        RuleError {
            rule: self.s.to_owned(),
            at: self.i,
            message: m.to_owned(),
        }
    }
    fn ws(&mut self) {
        while self.s[self.i..].starts_with(char::is_whitespace) {
            self.i += 1;
        }
    }
    fn eat(&mut self, t: &str) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(t) {
            self.i += t.len();
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Result<Rule, RuleError> {
        let mut l = self.and()?;
        while self.eat("||") {
            l = Rule::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Rule, RuleError> {
        let mut l = self.unary()?;
        while self.eat("&&") {
            l = Rule::And(Box::new(l), Box::new(self.unary()?));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Rule, RuleError> {
        if self.eat("!") {
            return Ok(Rule::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let r = self.or()?;
            if !self.eat(")") {
                return Err(self.err("expected )"));
            }
            return Ok(r);
        }
        self.ws();
        let start = self.i;
        while self.s[self.i..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
            self.i += 1;
        }
        let name = &self.s[start..self.i];
        if !self.eat("(") {
            return Err(self.err("expected ( after a matcher name"));
        }
        let mut args = Vec::new();
        loop {
            self.ws();
            let q = match self.s[self.i..].chars().next() {
                Some(c @ ('`' | '"')) => c,
                _ => return Err(self.err("expected a quoted argument")),
            };
            self.i += 1;
            let Some(end) = self.s[self.i..].find(q) else {
                return Err(self.err("unterminated argument"));
            };
            args.push(self.s[self.i..self.i + end].to_owned());
            self.i += end + 1;
            if self.eat(",") {
                continue;
            }
            if self.eat(")") {
                break;
            }
            return Err(self.err("expected , or )"));
        }
        match name.to_ascii_lowercase().as_str() {
            "hostsni" => Ok(Rule::HostSni(
                args.iter().map(|a| a.to_ascii_lowercase()).collect(),
            )),
            "hostsniregexp" => args
                .iter()
                .map(|a| regex::Regex::new(a).map_err(|e| self.err(&e.to_string())))
                .collect::<Result<_, _>>()
                .map(Rule::HostSniRegexp),
            "clientip" => args
                .iter()
                .map(|a| {
                    a.parse::<ipnet::IpNet>()
                        .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| self.err(&format!("invalid IP or CIDR {a:?}")))
                })
                .collect::<Result<_, _>>()
                .map(Rule::ClientIp),
            "alpn" => Ok(Rule::Alpn(args)),
            _ => Err(self.err(&format!("unknown matcher {name:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_grammar() {
        let r =
            parse("HostSNI(`a.example`, `B.example`) || (ALPN(`h2`) && !ClientIP(`10.0.0.0/8`))")
                .unwrap();
        assert_eq!(
            r.to_string(),
            "(HostSNI(`a.example`, `b.example`) || (ALPN(`h2`) && !ClientIP(`10.0.0.0/8`)))"
        );
        assert!(parse("HostSNIRegexp(`^.+\\.example$`)").is_ok());
        assert!(parse("HostSNI(`a`").is_err());
        assert!(parse("Host(`a`)").is_err());
        assert!(parse("HostSNI(`a`) &&").is_err());
    }
}
