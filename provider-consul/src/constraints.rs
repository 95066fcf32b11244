//! `providers.consulCatalog.constraints`: which services the provider considers, by their tags.
//!
//! Grammar (Traefik's): ``Tag(`a=b`)`` is true when a tag equals the text exactly;
//! ``TagRegex(`re`)`` when a tag contains a match of the regular expression (unanchored, like
//! Go's `MatchString`; write `^…$` to match whole tags); `!`, `&&` (binds tighter) and `||`
//! combine them, with parentheses. Arguments are in backquotes or double quotes. An empty
//! expression keeps every service. Unlike Traefik, an invalid regular expression is an error when
//! the configuration is read, not a silent "no match".

use std::fmt;

use regex::Regex;

/// A parsed constraint expression.
#[derive(Clone)]
pub struct Constraints {
    text: String,
    expr: Option<Expr>,
}

#[derive(Clone, Debug)]
enum Expr {
    Tag(String),
    TagRegex(Regex),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// Why a constraint expression does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid providers.consulCatalog.constraints {expression:?} at character {position}: {message}"
)]
#[non_exhaustive]
pub struct ConstraintError {
    /// The whole expression.
    pub expression: String,
    /// 1-based character position of the problem.
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Debug for Constraints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Constraints({:?})", self.text)
    }
}

impl Constraints {
    /// Parses an expression; empty (or only spaces) keeps everything.
    pub fn parse(text: &str) -> Result<Constraints, ConstraintError> {
        if text.trim().is_empty() {
            return Ok(Constraints {
                text: String::new(),
                expr: None,
            });
        }
        let mut p = Parser {
            text,
            chars: text.char_indices().collect(),
            pos: 0,
        };
        let expr = p.or()?;
        p.skip_ws();
        if p.pos < p.chars.len() {
            return Err(p.err("unexpected text after the expression"));
        }
        Ok(Constraints {
            text: text.to_owned(),
            expr: Some(expr),
        })
    }

    /// Keeps everything.
    pub fn none() -> Constraints {
        Constraints {
            text: String::new(),
            expr: None,
        }
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the tags satisfy the expression.
    pub fn matches<S: AsRef<str>>(&self, tags: &[S]) -> bool {
        self.expr.as_ref().is_none_or(|e| eval(e, tags))
    }
}

fn eval<S: AsRef<str>>(e: &Expr, tags: &[S]) -> bool {
    match e {
        Expr::Tag(t) => tags.iter().any(|x| x.as_ref() == t),
        Expr::TagRegex(r) => tags.iter().any(|x| r.is_match(x.as_ref())),
        Expr::Not(a) => !eval(a, tags),
        Expr::And(a, b) => eval(a, tags) && eval(b, tags),
        Expr::Or(a, b) => eval(a, tags) || eval(b, tags),
    }
}

struct Parser<'a> {
    text: &'a str,
    chars: Vec<(usize, char)>,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, message: &str) -> ConstraintError {
        ConstraintError {
            expression: self.text.to_owned(),
            position: self.pos + 1,
            message: message.to_owned(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|(_, c)| *c)
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        let n = s.chars().count();
        let ok = self
            .chars
            .get(self.pos..self.pos + n)
            .is_some_and(|w| w.iter().map(|(_, c)| *c).eq(s.chars()));
        if ok {
            self.pos += n;
        }
        ok
    }

    fn or(&mut self) -> Result<Expr, ConstraintError> {
        let mut left = self.and()?;
        while self.eat("||") {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ConstraintError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, ConstraintError> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let e = self.or()?;
            if !self.eat(")") {
                return Err(self.err("expected `)`"));
            }
            return Ok(e);
        }
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric()) {
            self.pos += 1;
        }
        let name: String = self.chars[start..self.pos].iter().map(|(_, c)| c).collect();
        if name.is_empty() {
            return Err(self.err("expected Tag(…), TagRegex(…), `!` or `(`"));
        }
        let func = match name.as_str() {
            "Tag" => 0,
            "TagRegex" => 1,
            _ => {
                self.pos = start;
                return Err(self.err(&format!("unknown function {name:?} (use Tag or TagRegex)")));
            }
        };
        if !self.eat("(") {
            return Err(self.err("expected `(`"));
        }
        let arg_pos = self.pos;
        let arg = self.string()?;
        if !self.eat(")") {
            return Err(self.err("expected `)` (one argument)"));
        }
        Ok(if func == 0 {
            Expr::Tag(arg)
        } else {
            Expr::TagRegex(Regex::new(&arg).map_err(|e| {
                let mut err = self.err(&format!("invalid regular expression: {e}"));
                err.position = arg_pos + 1;
                err
            })?)
        })
    }

    fn string(&mut self) -> Result<String, ConstraintError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ ('`' | '"')) => q,
            _ => return Err(self.err("expected a string in backquotes or double quotes")),
        };
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(c) if c == quote => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('\\') if quote == '"' => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c) => out.push(c),
                        None => return Err(self.err("unterminated string")),
                    }
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(expr: &str, tags: &[&str]) -> bool {
        Constraints::parse(expr).unwrap().matches(tags)
    }

    #[test]
    fn tag_is_exact_and_case_sensitive() {
        assert!(m("Tag(`env=prod`)", &["a", "env=prod"]));
        assert!(!m("Tag(`env=prod`)", &["env=production"]));
        assert!(!m("Tag(`env=prod`)", &["Env=prod"]));
        assert!(m(r#"Tag("env=prod")"#, &["env=prod"]));
    }

    #[test]
    fn tag_regex_is_unanchored_like_go() {
        assert!(m("TagRegex(`env=pr.*`)", &["x", "env=production"]));
        assert!(m("TagRegex(`prod`)", &["env=production"]));
        assert!(!m("TagRegex(`^prod`)", &["env=production"]));
    }

    #[test]
    fn operators_and_precedence() {
        let tags = ["a", "b"];
        assert!(m("Tag(`a`) && Tag(`b`)", &tags));
        assert!(!m("Tag(`a`) && Tag(`c`)", &tags));
        assert!(m("Tag(`c`) || Tag(`b`)", &tags));
        assert!(m("!Tag(`c`)", &tags));
        assert!(!m("! Tag(`a`)", &tags));
        // && binds tighter than ||: c || (a && b)
        assert!(m("Tag(`c`) || Tag(`a`) && Tag(`b`)", &tags));
        assert!(!m("(Tag(`c`) || Tag(`a`)) && Tag(`d`)", &tags));
        assert!(m("!(Tag(`c`) || Tag(`d`)) && TagRegex(`^a$`)", &tags));
        assert!(m("", &tags));
        assert!(m("   ", &[] as &[&str]));
    }

    #[test]
    fn errors_name_position_and_problem() {
        let e = Constraints::parse("Tag(`a`) && Label(`b`)").unwrap_err();
        assert_eq!(e.position, 13);
        assert!(e.to_string().contains("Label"), "{e}");
        let e = Constraints::parse("TagRegex(`(`)").unwrap_err();
        assert!(e.to_string().contains("regular expression"), "{e}");
        assert_eq!(e.position, 10);
        assert!(Constraints::parse("Tag(`a`").is_err());
        assert!(Constraints::parse("Tag(`a) ").is_err());
        assert!(Constraints::parse("Tag(`a`) Tag(`b`)").is_err());
        assert!(Constraints::parse("Tag(a)").is_err());
        assert!(Constraints::parse("&& Tag(`a`)").is_err());
    }
}
