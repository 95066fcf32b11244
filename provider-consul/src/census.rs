//! The instance census: which services gained or lost a checked instance, read from one answer
//! of `/v1/health/state/any` (every check of the catalog: ~10 MB of JSON at 30,000 instances).
//!
//! Only three strings of each check matter (`Node`, `ServiceID`, `ServiceName`), so the answer
//! is scanned rather than deserialized, chunk by chunk as it arrives ([`Census::feed`]): the
//! whole answer is never held, only the check cut by the end of a chunk. Strings are skipped
//! eight bytes at a time, nested values by bracket depth, and each checked instance is reduced
//! to a hash of its `(node, service ID)` at once. The scan checks the answer's structure (an
//! array of objects of `"key": value` pairs) but not the grammar of the values it skips:
//! numbers, literals and the nesting inside skipped values are not validated. That is enough
//! for a hint about which services to fetch again; every service is still read from its own
//! endpoint.

use std::borrow::Cow;
use std::collections::HashMap;

/// A census answer that is not an array of check objects.
#[derive(Debug, thiserror::Error)]
#[error("{what} at byte {at} of the check list")]
pub struct CensusError {
    what: &'static str,
    at: usize,
}

/// The digest of a service's checked instances, given as `(node, service ID)` pairs in any
/// order and with repeats (an instance with two checks): the census and the service watch
/// compute it the same way, so equal digests mean the same instances.
pub fn instances_digest<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    let mut hashes: Vec<u64> = pairs.into_iter().map(pair_hash).collect();
    digest_of(&mut hashes)
}

fn pair_hash((node, id): (&str, &str)) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((node, id))
}

fn digest_of(hashes: &mut Vec<u64>) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    hashes.sort_unstable();
    hashes.dedup();
    BuildHasherDefault::<DefaultHasher>::default().hash_one(&*hashes)
}

/// An instance census read from an answer of `/v1/health/state/any` fed chunk by chunk.
#[derive(Debug, Default)]
pub struct Census {
    /// Bytes received and not yet scanned: at most the check cut by the end of a chunk.
    pending: Vec<u8>,
    /// Bytes of the answer scanned and dropped (for the offsets of errors).
    dropped: usize,
    next: Next,
    /// Per service name, the hashes of its checked instances.
    by_service: HashMap<String, Vec<u64>>,
}

impl crate::watch::StreamDecoder for Census {
    type Output = HashMap<String, u64>;

    fn feed(&mut self, chunk: &[u8]) -> Result<(), serde_json::Error> {
        Census::feed(self, chunk).map_err(serde::de::Error::custom)
    }

    fn finish(self) -> Result<Self::Output, serde_json::Error> {
        Census::finish(self).map_err(serde::de::Error::custom)
    }
}

/// What the scan expects next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// `[` (or `null`).
    #[default]
    Open,
    /// The first check or `]`.
    FirstOrClose,
    /// A check, after a comma.
    Check,
    /// `,` or `]`.
    CommaOrClose,
    /// Nothing but white space.
    End,
}

impl Census {
    /// A census with nothing read yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next piece of the answer.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), CensusError> {
        self.pending.extend_from_slice(chunk);
        self.scan(false)
    }

    /// Per service, the digest of its checked instances ([`instances_digest`]), once the whole
    /// answer was fed. Node checks (no `ServiceID`) are not instances and are left out.
    pub fn finish(mut self) -> Result<HashMap<String, u64>, CensusError> {
        self.scan(true)?;
        if self.next != Next::End {
            return Err(CensusError {
                what: if self.next == Next::Open {
                    "expected `[`"
                } else {
                    "unbalanced brackets"
                },
                at: self.dropped + self.pending.len(),
            });
        }
        Ok(self
            .by_service
            .into_iter()
            .map(|(name, mut hashes)| (name, digest_of(&mut hashes)))
            .collect())
    }

    /// Scans every complete check of `pending` and drops what it scanned. Unless `last`, a
    /// check (or `null`) cut by the end of `pending` waits for the next chunk.
    fn scan(&mut self, last: bool) -> Result<(), CensusError> {
        let mut s = Scan {
            b: &self.pending,
            i: 0,
        };
        let dropped = self.dropped;
        let shift = |mut e: CensusError| {
            e.at += dropped;
            e
        };
        // An error at the end of the bytes received so far only means "more to come".
        let cut = |e: &CensusError, len: usize| !last && e.at >= len;
        let len = self.pending.len();
        loop {
            let mark = s.i;
            let Some(c) = s.peek() else { break };
            match (self.next, c) {
                (Next::Open, b'n') => match s.literal(b"null") {
                    Ok(()) => self.next = Next::End,
                    Err(_) if !last && len - s.i < 4 && b"null".starts_with(&s.b[s.i..]) => {
                        s.i = mark;
                        break;
                    }
                    Err(e) => return Err(shift(e)),
                },
                (Next::Open, b'[') => {
                    s.i += 1;
                    self.next = Next::FirstOrClose;
                }
                (Next::Open, _) => return Err(shift(s.error("expected `[`"))),
                (Next::FirstOrClose | Next::CommaOrClose, b']') => {
                    s.i += 1;
                    self.next = Next::End;
                }
                (Next::CommaOrClose, b',') => {
                    s.i += 1;
                    self.next = Next::Check;
                }
                (Next::CommaOrClose, _) => {
                    return Err(shift(s.error("expected `,` or `]` after a check")));
                }
                (Next::FirstOrClose | Next::Check, _) => match s.check() {
                    Ok(check) => {
                        self.next = Next::CommaOrClose;
                        if let (Some(name), Some(id)) = (check.service_name, check.service_id)
                            && !id.is_empty()
                        {
                            let node = check.node.as_deref().unwrap_or("");
                            let h = pair_hash((node, &id));
                            match self.by_service.get_mut(name.as_ref()) {
                                Some(v) => v.push(h),
                                None => {
                                    self.by_service.insert(name.into_owned(), vec![h]);
                                }
                            }
                        }
                    }
                    Err(e) if cut(&e, len) => {
                        s.i = mark;
                        break;
                    }
                    Err(e) => return Err(shift(e)),
                },
                (Next::End, _) => {
                    return Err(shift(s.error("trailing bytes after the check list")));
                }
            }
        }
        let scanned = s.i;
        self.pending.drain(..scanned);
        self.dropped += scanned;
        Ok(())
    }
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

    /// The census of `body` fed in pieces of `size` bytes.
    fn census(body: &[u8], size: usize) -> Result<HashMap<String, u64>, CensusError> {
        let mut c = Census::new();
        for piece in body.chunks(size.max(1)) {
            c.feed(piece)?;
        }
        c.finish()
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
            .map(|(k, v)| {
                let d = instances_digest(v.iter().map(|(a, b)| (a.as_str(), b.as_str())));
                (k, d)
            })
            .collect()
    }

    #[test]
    fn the_scan_agrees_with_full_deserialization_however_the_answer_is_cut() {
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
            let want = by_serde(body);
            for size in [body.len(), 1, 2, 3, 5, 7, 8, 13, 64] {
                let got = census(body, size).expect("scans");
                assert_eq!(
                    got,
                    want,
                    "pieces of {size}: {}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn repeats_and_order_do_not_change_a_digest() {
        assert_eq!(
            instances_digest([("n1", "a"), ("n2", "b"), ("n1", "a")]),
            instances_digest([("n2", "b"), ("n1", "a")])
        );
        assert_ne!(
            instances_digest([("n1", "a")]),
            instances_digest([("n1", "a"), ("n2", "b")])
        );
        assert_ne!(instances_digest([("n1", "a")]), instances_digest([]));
    }

    #[test]
    fn malformed_answers_are_errors_that_say_where() {
        for (body, what) in [
            (&b"{}"[..], "expected `[`"),
            (b"", "expected `[`"),
            (b"nul", "unexpected literal"),
            (b"[{\"Node\":\"n\"", "expected `,` or `}` in a check"),
            (b"[{\"Node\":\"n", "unterminated string"),
            (b"[{\"Node\" \"n\"}]", "expected `:`"),
            (
                b"[{\"Node\":\"n\"}] x",
                "trailing bytes after the check list",
            ),
            (b"null x", "trailing bytes after the check list"),
            (b"[{\"Def\":{\"a\":[1,2}", "unterminated object or array"),
            (
                b"[{\"Node\":\"n\"} {}]",
                "expected `,` or `]` after a check",
            ),
            (b"[{\"Node\":\"\\ud800\"}]", "invalid string"),
            (b"[{\"Node\":}]", "expected a value"),
            (b"[{},", "unbalanced brackets"),
        ] {
            for size in [body.len(), 1, 3] {
                let e = census(body, size).expect_err(what);
                assert_eq!(
                    e.what,
                    what,
                    "pieces of {size}: {}",
                    String::from_utf8_lossy(body)
                );
                assert!(e.to_string().contains("at byte"), "{e}");
            }
        }
        // Offsets count from the start of the answer, whatever was dropped before.
        let e = census(b"[{},{},{}] x", 2).unwrap_err();
        assert_eq!(e.at, 11);
    }
}
