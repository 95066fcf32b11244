//! TLS ClientHello peek: reassembles the first handshake message across reads and across several
//! TLS records, bounded by a size limit and a timeout, and extracts SNI and ALPN. Every byte read is
//! kept so it can be replayed to the backend (passthrough) or to the TLS acceptor (termination).
//!
//! The parser never panics on garbage: every length is checked against the bytes present.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// TLS record content type of handshake records.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Largest TLS record payload allowed by RFC 8446 (plus the allowed expansion of TLS 1.2).
const MAX_RECORD: usize = 16384 + 2048;
/// Bound on the records one ClientHello may be split into.
const MAX_RECORDS: usize = 4096;
/// Extension number of server_name.
const EXT_SERVER_NAME: u16 = 0;
/// Extension number of application_layer_protocol_negotiation.
const EXT_ALPN: u16 = 16;

/// Default bound on the bytes read while peeking (records included).
pub const DEFAULT_MAX_PEEK: usize = 64 * 1024;
/// Default bound on the time spent waiting for the whole ClientHello.
pub const DEFAULT_PEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the ClientHello told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The server name (SNI), lower-cased; `None` when the client sent none.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order.
    pub alpn: Vec<String>,
}

/// Result of looking at the bytes read so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// More bytes are needed to decide.
    NeedMore,
    /// The bytes are not a TLS handshake (plaintext or garbage).
    NotTls,
    /// A complete ClientHello.
    Hello(ClientHelloInfo),
}

/// Why a peek failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeekError {
    /// The ClientHello did not arrive in time.
    #[error("timed out after {elapsed:?} waiting for the TLS ClientHello ({read} bytes read)")]
    Timeout {
        /// The timeout that expired.
        elapsed: Duration,
        /// Bytes read before it expired.
        read: usize,
    },
    /// The ClientHello (with its records) is larger than the limit.
    #[error("TLS ClientHello larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client closed before a whole ClientHello arrived.
    #[error("client closed after {read} bytes, before a whole TLS ClientHello")]
    Eof {
        /// Bytes read before the end.
        read: usize,
    },
    /// A read error.
    #[error("reading the TLS ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// What a peek found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peeked {
    /// A TLS ClientHello.
    Tls(ClientHelloInfo),
    /// Plaintext: the first bytes are not a TLS handshake, or the client sent nothing in time (a
    /// server-first protocol).
    Plain,
}

/// Reads from `r` into `buf` (which may already hold bytes, e.g. left over after a PROXY header)
/// until the bytes are a complete ClientHello or clearly not TLS.
///
/// Bounded by `limit` bytes and `timeout`. A client that sends nothing within the timeout is
/// plaintext (server-first protocols); one that sent part of a handshake and stalls is an error.
pub async fn peek<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
    timeout: Duration,
) -> Result<Peeked, PeekError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut need = 1;
    loop {
        if buf.len() >= need {
            match sniff_need(buf, limit)? {
                (Sniff::Hello(info), _) => return Ok(Peeked::Tls(info)),
                (Sniff::NotTls, _) => return Ok(Peeked::Plain),
                (Sniff::NeedMore, n) => need = n,
            }
        }
        let len = buf.len();
        let want = limit.saturating_sub(len).clamp(1, 4096);
        buf.resize(len + want, 0);
        let read = tokio::time::timeout_at(deadline, r.read(&mut buf[len..])).await;
        buf.truncate(
            len + read
                .as_ref()
                .ok()
                .and_then(|r| r.as_ref().ok())
                .copied()
                .unwrap_or(0),
        );
        match read {
            Err(_) if len == 0 => return Ok(Peeked::Plain),
            Err(_) => {
                return Err(PeekError::Timeout {
                    elapsed: timeout,
                    read: len,
                });
            }
            Ok(Err(e)) => return Err(PeekError::Io(e)),
            Ok(Ok(0)) => return Err(PeekError::Eof { read: len }),
            Ok(Ok(_)) => {}
        }
    }
}

/// Looks at the bytes read so far. `limit` bounds the total (records included).
pub fn sniff(buf: &[u8], limit: usize) -> Result<Sniff, PeekError> {
    sniff_need(buf, limit).map(|(s, _)| s)
}

/// As [`sniff`], and for `NeedMore` the buffer length below which nothing can change (the end of
/// the record being read), so a client that trickles bytes costs one parse per record.
fn sniff_need(buf: &[u8], limit: usize) -> Result<(Sniff, usize), PeekError> {
    if buf.is_empty() {
        return Ok((Sniff::NeedMore, 1));
    }
    if buf[0] != CONTENT_HANDSHAKE {
        return Ok((Sniff::NotTls, 0));
    }
    // Reassemble the handshake layer from as many records as are present.
    let mut hs: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    let mut records = 0usize;
    loop {
        if buf.len() < pos + 5 {
            // Reject a partial record header early when what is there is already wrong.
            let head = &buf[pos..];
            if head.first().is_some_and(|&t| t != CONTENT_HANDSHAKE)
                || head.get(1).is_some_and(|&v| v != 3)
            {
                return Ok((Sniff::NotTls, 0));
            }
            return need_more(buf, limit, pos + 5);
        }
        records += 1;
        if records > MAX_RECORDS {
            return Err(PeekError::TooLarge { limit });
        }
        let rec = &buf[pos..pos + 5];
        if rec[0] != CONTENT_HANDSHAKE || rec[1] != 3 || rec[2] > 4 {
            return Ok((Sniff::NotTls, 0));
        }
        let len = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
        if len == 0 || len > MAX_RECORD {
            return Ok((Sniff::NotTls, 0));
        }
        let start = pos + 5;
        let end = start + len;
        let avail = end.min(buf.len());
        hs.extend_from_slice(&buf[start..avail]);
        if hs.len() >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Ok((Sniff::NotTls, 0));
            }
            let msg_len =
                (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            // The records carrying the message need at least 5 header bytes per 16 KiB.
            if msg_len + 4 + 5 * (msg_len / 16384 + 1) > limit {
                return Err(PeekError::TooLarge { limit });
            }
            if hs.len() >= 4 + msg_len {
                let sniff = match parse_client_hello(&hs[4..4 + msg_len]) {
                    Some(info) => Sniff::Hello(info),
                    None => Sniff::NotTls,
                };
                return Ok((sniff, 0));
            }
        }
        if avail < end {
            return need_more(buf, limit, end);
        }
        pos = end;
    }
}

fn need_more(buf: &[u8], limit: usize, need: usize) -> Result<(Sniff, usize), PeekError> {
    if buf.len() >= limit || need > limit {
        Err(PeekError::TooLarge { limit })
    } else {
        Ok((Sniff::NeedMore, need))
    }
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Parses a ClientHello body (after the 4-byte handshake header).
fn parse_client_hello(body: &[u8]) -> Option<ClientHelloInfo> {
    let mut r = Reader { data: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut info = ClientHelloInfo::default();
    if r.data.is_empty() {
        return Some(info);
    }
    let mut exts = Reader { data: r.vec16()? };
    while !exts.data.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        match kind {
            EXT_SERVER_NAME => info.sni = parse_sni(data),
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Some(info)
}

fn parse_sni(data: &[u8]) -> Option<String> {
    let mut r = Reader { data };
    let mut list = Reader { data: r.vec16()? };
    while !list.data.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == 0 {
            let name = std::str::from_utf8(name).ok()?;
            let name = name.strip_suffix('.').unwrap_or(name);
            return Some(name.to_ascii_lowercase());
        }
    }
    None
}

fn parse_alpn(data: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader { data };
    let mut list = Reader { data: r.vec16()? };
    let mut out = Vec::new();
    while !list.data.is_empty() {
        let p = list.vec8()?;
        out.push(String::from_utf8_lossy(p).into_owned());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello from rustls with the given SNI and ALPN.
    pub(crate) fn rustls_client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-frames the handshake bytes of `hello` into records of `size` payload bytes.
    fn split_records(hello: &[u8], size: usize) -> Vec<u8> {
        let payload = &hello[5..];
        let mut out = Vec::new();
        for chunk in payload.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn parses_rustls_hello() {
        let hello = rustls_client_hello("Api.Example.com", &["h2", "http/1.1"]);
        let got = sniff(&hello, DEFAULT_MAX_PEEK).unwrap();
        assert_eq!(
            got,
            Sniff::Hello(ClientHelloInfo {
                sni: Some("api.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
            })
        );
    }

    #[test]
    fn every_truncation_needs_more() {
        let hello = rustls_client_hello("a.example", &["x"]);
        for n in 1..hello.len() {
            assert_eq!(
                sniff(&hello[..n], DEFAULT_MAX_PEEK).unwrap(),
                Sniff::NeedMore,
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn one_byte_records_reassemble() {
        let hello = rustls_client_hello("frag.example", &["h2"]);
        let framed = split_records(&hello, 1);
        assert!(framed.len() > 5 * (hello.len() - 5));
        match sniff(&framed, DEFAULT_MAX_PEEK).unwrap() {
            Sniff::Hello(info) => assert_eq!(info.sni.as_deref(), Some("frag.example")),
            other => panic!("unexpected {other:?}"),
        }
        for n in 1..framed.len() {
            assert_eq!(
                sniff(&framed[..n], DEFAULT_MAX_PEEK).unwrap(),
                Sniff::NeedMore
            );
        }
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n", 100).unwrap(), Sniff::NotTls);
        assert_eq!(sniff(b"\x16\x03\x01\x00\x00", 100).unwrap(), Sniff::NotTls);
        assert_eq!(sniff(b"\x16\x02", 100).unwrap(), Sniff::NotTls);
        // A handshake record that is not a ClientHello.
        assert_eq!(
            sniff(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", 100).unwrap(),
            Sniff::NotTls
        );
    }

    #[test]
    fn size_limit() {
        let hello = rustls_client_hello("big.example", &[]);
        assert!(matches!(
            sniff(&hello, 64),
            Err(PeekError::TooLarge { limit: 64 })
        ));
        // A record header announcing a huge handshake message.
        let buf = [22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff];
        assert!(matches!(sniff(&buf, 1000), Err(PeekError::TooLarge { .. })));
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random garbage behind a valid-looking record header, and
        // random corruption of a real hello.
        let hello = rustls_client_hello("g.example", &["h2"]);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5000 {
            let mut buf = hello.clone();
            let flips = (next() % 8) as usize + 1;
            for _ in 0..flips {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            let cut = (next() as usize) % (buf.len() + 1);
            let _ = sniff(&buf[..cut], DEFAULT_MAX_PEEK);
            let len = (next() % 300) as usize;
            let mut g: Vec<u8> = vec![22, 3, 1];
            g.extend_from_slice(&(len as u16).to_be_bytes());
            g.extend((0..len).map(|_| next() as u8));
            let _ = sniff(&g, DEFAULT_MAX_PEEK);
        }
    }

    #[tokio::test]
    async fn peek_reassembles_across_reads() {
        let hello = rustls_client_hello("reads.example", &[]);
        let framed = split_records(&hello, 7);
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in framed.chunks(3) {
                a.write_all(c).await.unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        let mut buf = Vec::new();
        let got = peek(&mut b, &mut buf, DEFAULT_MAX_PEEK, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            got,
            Peeked::Tls(ClientHelloInfo {
                sni: Some("reads.example".into()),
                alpn: vec![]
            })
        );
        assert_eq!(buf, split_records(&hello, 7));
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn peek_timeouts() {
        // Nothing sent: plaintext (server-first protocol).
        let (_a, mut b) = tokio::io::duplex(64);
        let mut buf = Vec::new();
        let got = peek(&mut b, &mut buf, 1024, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(got, Peeked::Plain);
        // Part of a hello, then silence: error.
        let (mut a, mut b) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        a.write_all(&[22, 3, 1, 0, 50, 1]).await.unwrap();
        let mut buf = Vec::new();
        let got = peek(&mut b, &mut buf, 1024, Duration::from_secs(1)).await;
        assert!(
            matches!(got, Err(PeekError::Timeout { read: 6, .. })),
            "{got:?}"
        );
        // EOF mid-hello.
        drop(a);
        let mut buf = vec![22];
        let got = peek(&mut b, &mut buf, 1024, Duration::from_secs(1)).await;
        assert!(matches!(got, Err(PeekError::Eof { .. })), "{got:?}");
    }
}
