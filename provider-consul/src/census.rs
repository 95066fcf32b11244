//! The instance census: which services gained or lost a checked instance, read from one answer
//! of `/v1/health/state/any` (every check of the catalog: ~10 MB of JSON at 30,000 instances).
//!
//! Only three strings of each check matter (`Node`, `ServiceID`, `ServiceName`), so the answer
//! is scanned rather than deserialized: strings are skipped with `memchr`, nested values by
//! bracket depth, and the three wanted strings are borrowed from the answer (decoded only when
//! they hold escapes). The scan checks the answer's structure (an array of objects of
//! `"key": value` pairs) but not the grammar of the values it skips: numbers, literals and the
//! nesting inside skipped values are not validated. That is enough for a hint about which
//! services to fetch again; every service is still read from its own endpoint.

use std::borrow::Cow;
use std::collections::HashMap;

/// A census answer that is not an array of check objects.
#[derive(Debug, thiserror::Error)]
#[error("{what} at byte {at} of the check list")]
pub struct CensusError {
    what: &'static str,
    at: usize,
}

/// Per service, the digest of its checked instances (sorted, deduplicated `(node, service ID)`
/// pairs, hashed with `digest` as the service watch hashes its own instances) from an answer of
/// `/v1/health/state/any`. Node checks (no `ServiceID`) are not instances and are left out.
pub fn census_digests(
    body: &[u8],
    digest: impl Fn(&[(&str, &str)]) -> u64,
) -> Result<HashMap<String, u64>, CensusError> {
    let mut by_service: HashMap<Cow<'_, str>, Vec<Instance<'_>>> = HashMap::new();
    let mut s = Scan { b: body, i: 0 };
    if s.peek() == Some(b'n') {
        s.literal(b"null")?;
        s.end()?;
        return Ok(HashMap::new());
    }
    s.eat(b'[')?;
    if s.peek() == Some(b']') {
        s.i += 1;
    } else {
        loop {
            let check = s.check()?;
            if let (Some(name), Some(id)) = (check.service_name, check.service_id)
                && !id.is_empty()
            {
                by_service
                    .entry(name)
                    .or_default()
                    .push((check.node.unwrap_or_default(), id));
            }
            match s.peek() {
                Some(b',') => s.i += 1,
                Some(b']') => {
                    s.i += 1;
                    break;
                }
                _ => return Err(s.error("expected `,` or `]` after a check")),
            }
        }
    }
    s.end()?;
    Ok(by_service
        .into_iter()
        .map(|(name, mut pairs)| {
            pairs.sort_unstable();
            pairs.dedup();
            let borrowed: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(n, i)| (n.as_ref(), i.as_ref()))
                .collect();
            (name.into_owned(), digest(&borrowed))
        })
        .collect())
}

/// The position of the first `"` or `\\` in `s`, eight bytes at a time (most strings of a
/// check are short, too short for a vectorised search to pay for its set-up).
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = 0x2222_2222_2222_2222;
    const BACKSLASHES: u64 = 0x5c5c_5c5c_5c5c_5c5c;
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let (q, b) = (w ^ QUOTES, w ^ BACKSLASHES);
        // A byte of `q` or `b` is zero where `w` holds a quote or a backslash; the lowest flag
        // set is exact (false flags only appear above a true one).
        let found = (q.wrapping_sub(ONES) & !q | b.wrapping_sub(ONES) & !b) & HIGH;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    s[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\')
        .map(|k| i + k)
}

/// A checked instance: `(node, service ID)`.
type Instance<'a> = (Cow<'a, str>, Cow<'a, str>);

/// The three strings of a check the census reads.
#[derive(Default)]
struct Check<'a> {
    node: Option<Cow<'a, str>>,
    service_id: Option<Cow<'a, str>>,
    service_name: Option<Cow<'a, str>>,
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn error(&self, what: &'static str) -> CensusError {
        CensusError { what, at: self.i }
    }

    /// The next byte after white space (not consumed).
    fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.i += 1;
            } else {
                return Some(c);
            }
        }
        None
    }

    fn eat(&mut self, c: u8) -> Result<(), CensusError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(match c {
                b'[' => "expected `[`",
                b'{' => "expected `{`",
                b':' => "expected `:`",
                _ => "unexpected byte",
            }))
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), CensusError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.error("unexpected literal"))
        }
    }

    /// Nothing but white space is left.
    fn end(&mut self) -> Result<(), CensusError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("trailing bytes after the check list")),
        }
    }

    /// A string: the range of its raw content and whether it holds escapes.
    fn string(&mut self) -> Result<(usize, usize, bool), CensusError> {
        self.eat(b'"')
            .map_err(|_| self.error("expected a string"))?;
        self.rest_of_string()
    }

    /// The rest of a string whose opening quote was just consumed.
    fn rest_of_string(&mut self) -> Result<(usize, usize, bool), CensusError> {
        let start = self.i;
        let mut escaped = false;
        loop {
            let rest = &self.b[self.i..];
            let found = quote_or_backslash(rest);
            match found {
                None => {
                    self.i = self.b.len();
                    return Err(self.error("unterminated string"));
                }
                Some(k) if rest[k] == b'\\' => {
                    escaped = true;
                    self.i += k + 2;
                    if self.i > self.b.len() {
                        self.i = self.b.len();
                        return Err(self.error("unterminated string"));
                    }
                }
                Some(k) => {
                    let end = self.i + k;
                    self.i = end + 1;
                    return Ok((start, end, escaped));
                }
            }
        }
    }

    /// The text of a string scanned by [`Scan::string`].
    fn text(
        &self,
        (start, end, escaped): (usize, usize, bool),
    ) -> Result<Cow<'a, str>, CensusError> {
        let bad = || CensusError {
            what: "invalid string",
            at: start,
        };
        if escaped {
            // Includes the quotes: serde_json decodes the escapes.
            serde_json::from_slice::<String>(&self.b[start - 1..=end])
                .map(Cow::Owned)
                .map_err(|_| bad())
        } else {
            std::str::from_utf8(&self.b[start..end])
                .map(Cow::Borrowed)
                .map_err(|_| bad())
        }
    }

    /// Skips one value of any kind.
    fn skip_value(&mut self) -> Result<(), CensusError> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                loop {
                    match self.b.get(self.i) {
                        None => return Err(self.error("unterminated object or array")),
                        Some(b'"') => {
                            self.i += 1;
                            self.rest_of_string()?;
                            continue;
                        }
                        Some(b'{' | b'[') => depth += 1,
                        Some(b'}' | b']') => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Ok(());
                            }
                        }
                        Some(_) => {}
                    }
                    self.i += 1;
                }
            }
            Some(_) => {
                let start = self.i;
                while let Some(c) = self.b.get(self.i) {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                        break;
                    }
                    self.i += 1;
                }
                if self.i == start {
                    Err(self.error("expected a value"))
                } else {
                    Ok(())
                }
            }
            None => Err(self.error("expected a value")),
        }
    }

    /// One check object.
    fn check(&mut self) -> Result<Check<'a>, CensusError> {
        let mut check = Check::default();
        self.eat(b'{')?;
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(check);
        }
        loop {
            let key = self.string()?;
            let decoded;
            let key_bytes = if key.2 {
                decoded = self.text(key)?;
                decoded.as_bytes()
            } else {
                &self.b[key.0..key.1]
            };
            let slot = match key_bytes {
                b"Node" => Some(&mut check.node),
                b"ServiceID" => Some(&mut check.service_id),
                b"ServiceName" => Some(&mut check.service_name),
                _ => None,
            };
            self.eat(b':')?;
            match slot {
                Some(slot) if self.peek() == Some(b'"') => {
                    let raw = self.string()?;
                    *slot = Some(self.text(raw)?);
                }
                _ => self.skip_value()?,
            }
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(check);
                }
                _ => return Err(self.error("expected `,` or `}` in a check")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(v: &[(&str, &str)]) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        BuildHasherDefault::<DefaultHasher>::default().hash_one(v)
    }

    /// What the census computes, by full deserialization: the reference for the scanner.
    fn by_serde(body: &[u8]) -> HashMap<String, u64> {
        let checks: Option<Vec<serde_json::Map<String, serde_json::Value>>> =
            serde_json::from_slice(body).expect("valid JSON");
        let mut by: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for c in checks.unwrap_or_default() {
            let s = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
            if !s("ServiceID").is_empty() && c.contains_key("ServiceName") {
                by.entry(s("ServiceName"))
                    .or_default()
                    .push((s("Node"), s("ServiceID")));
            }
        }
        by.into_iter()
            .map(|(k, mut v)| {
                v.sort_unstable();
                v.dedup();
                let b: Vec<(&str, &str)> =
                    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                (k, digest(&b))
            })
            .collect()
    }

    #[test]
    fn the_scan_agrees_with_full_deserialization() {
        let bodies: [&[u8]; 6] = [
            br#"[
                {"Node":"n1","CheckID":"serfHealth","ServiceID":"","ServiceName":"","ServiceTags":[]},
                {"Node":"n2","CheckID":"c2","ServiceID":"web-2","ServiceName":"web","Output":"ok \"quoted\" {[",
                 "Definition":{"TCP":"a:1","Nested":{"x":[1,2,{"y":"}"}]}},"ExposedPort":0,"CreateIndex":12},
                {"Node":"n1","CheckID":"c1","ServiceID":"web-1","ServiceName":"web","ServiceTags":["a","b\\"]},
                {"Node":"n1","CheckID":"c1b","ServiceID":"web-1","ServiceName":"web","Interval":null,"T":true},
                {"Node":"n\u0031","CheckID":"d","ServiceID":"db\"1","ServiceName":"d\u00e9b"},
                {"ServiceName":"orphan","ServiceID":"o-1"},
                {"Node":"n3","ServiceID":"only-id"},
                {}
            ]"#,
            b"[]",
            b" [ ] ",
            b"null",
            br#"[{"Node":"n","ServiceID":"s","ServiceName":"x"}]"#,
            "[{\"Node\":\"nœud\",\"ServiceID\":\"s-ü\",\"ServiceName\":\"ünï\"}]".as_bytes(),
        ];
        for body in bodies {
            let scanned = census_digests(body, digest).expect("scans");
            assert_eq!(scanned, by_serde(body), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn malformed_answers_are_errors_that_say_where() {
        for (body, what) in [
            (&b"{}"[..], "expected `[`"),
            (b"[{\"Node\":\"n\"", "expected `,` or `}` in a check"),
            (b"[{\"Node\":\"n", "unterminated string"),
            (b"[{\"Node\" \"n\"}]", "expected `:`"),
            (
                b"[{\"Node\":\"n\"}] x",
                "trailing bytes after the check list",
            ),
            (b"[{\"Def\":{\"a\":[1,2}", "unterminated object or array"),
            (
                b"[{\"Node\":\"n\"} {}]",
                "expected `,` or `]` after a check",
            ),
            (b"[{\"Node\":\"\\ud800\"}]", "invalid string"),
            (b"[{\"Node\":}]", "expected a value"),
        ] {
            let e = census_digests(body, digest).expect_err(what);
            assert_eq!(e.what, what, "{}", String::from_utf8_lossy(body));
            assert!(e.to_string().contains("at byte"), "{e}");
        }
    }
}
