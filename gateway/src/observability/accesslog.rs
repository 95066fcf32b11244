//! The access log: one line per TCP connection (static `accessLog {filePath, format}`, off by
//! default).
//!
//! Connections hand a boxed [`Record`] to a bounded queue ([`AccessLogSender::send`] never
//! blocks: when the queue is full the line is dropped and counted); a dedicated thread formats the
//! lines and writes them through a buffer, flushing whenever the queue runs empty. The data path
//! never waits on the disk. At shutdown [`AccessLog::flush`] waits until every line queued so
//! far is written.
//!
//! Text lines are logfmt (`key=value`, values quoted when they need it); JSON lines are one
//! object per line with the same keys:
//!
//! ```text
//! time=2025-01-02T03:04:05.678Z entry_point=tcp client=127.0.0.1:40000 router=db@file service=db@file server=10.0.0.5:5432 sni=- bytes_to_server=120 bytes_to_client=4096 duration=0.250 close=closed
//! ```

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tagway_config::{AccessLog as AccessLogConfig, LogFormat};

use crate::balancer::{ServerState, ServiceInfo};
use crate::observability::counters::Failure;
use crate::router::Route;

/// Lines that may wait in the queue before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 16_384;

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// Both sides closed their write side.
    Closed,
    /// One side closed and the other did not within the termination delay.
    TerminationDelay,
    /// A read or write failed (reset, broken pipe…).
    Error,
    /// The TLS handshake (termination) failed.
    TlsHandshake,
    /// The connection went nowhere.
    Failed(Failure),
    /// The connection was cut before it finished (shutdown grace period over).
    Aborted,
}

impl CloseReason {
    /// The value written in the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::TerminationDelay => "termination_delay",
            CloseReason::Error => "error",
            CloseReason::TlsHandshake => "tls_handshake",
            CloseReason::Failed(f) => f.as_str(),
            CloseReason::Aborted => "aborted",
        }
    }
}

/// One connection, as the data path fills it in (names are read from the `Arc`s when the line is
/// written, off the data path).
#[derive(Debug)]
pub struct Record {
    /// When the connection was accepted.
    pub start: SystemTime,
    /// The entry point.
    pub entry_point: Arc<str>,
    /// The client address (PROXY-decoded when trusted).
    pub client: SocketAddr,
    /// The router that took the connection.
    pub router: Option<Arc<Route>>,
    /// The router's service; once a server is dialled, the load-balancer service it belongs to.
    pub service: Option<Arc<ServiceInfo>>,
    /// The server.
    pub server: Option<Arc<ServerState>>,
    /// The TLS SNI, if any.
    pub sni: Option<Box<str>>,
    /// Bytes from the client to the server.
    pub bytes_to_server: u64,
    /// Bytes from the server to the client.
    pub bytes_to_client: u64,
    /// Accept to close.
    pub duration: Duration,
    /// How it ended.
    pub close: CloseReason,
}

impl Record {
    /// A record for a connection accepted now, before anything is known.
    pub fn new(entry_point: Arc<str>, client: SocketAddr) -> Self {
        Record {
            start: SystemTime::now(),
            entry_point,
            client,
            router: None,
            service: None,
            server: None,
            sni: None,
            bytes_to_server: 0,
            bytes_to_client: 0,
            duration: Duration::ZERO,
            close: CloseReason::Aborted,
        }
    }

    /// The fields of the line.
    pub fn fields(&self) -> Fields<'_> {
        Fields {
            time: self.start,
            entry_point: &self.entry_point,
            client: self.client,
            router: self.router.as_deref().map(|r| r.name.as_str()),
            service: self.service.as_deref().map(|s| s.name.as_str()),
            server: self.server.as_deref().map(|s| s.address.as_str()),
            sni: self.sni.as_deref(),
            bytes_to_server: self.bytes_to_server,
            bytes_to_client: self.bytes_to_client,
            duration: self.duration,
            close: self.close,
        }
    }
}

/// The values of one access-log line.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a> {
    /// When the connection was accepted.
    pub time: SystemTime,
    /// The entry point.
    pub entry_point: &'a str,
    /// The client address.
    pub client: SocketAddr,
    /// The router (`name@provider`).
    pub router: Option<&'a str>,
    /// The service (`name@provider`).
    pub service: Option<&'a str>,
    /// The server address.
    pub server: Option<&'a str>,
    /// The TLS SNI.
    pub sni: Option<&'a str>,
    /// Bytes from the client to the server.
    pub bytes_to_server: u64,
    /// Bytes from the server to the client.
    pub bytes_to_client: u64,
    /// Accept to close.
    pub duration: Duration,
    /// How it ended.
    pub close: CloseReason,
}

fn needs_quotes(v: &str) -> bool {
    v.is_empty()
        || v.bytes()
            .any(|b| b <= b' ' || b == b'"' || b == b'=' || b == b'\\' || b >= 0x7f)
}

fn push_value(out: &mut String, v: Option<&str>) {
    match v {
        None => out.push('-'),
        Some(v) if !needs_quotes(v) => out.push_str(v),
        Some(v) => {
            out.push('"');
            for c in v.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if c.is_control() || !c.is_ascii() => {
                        use std::fmt::Write as _;
                        let _ = write!(out, "\\u{{{:x}}}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
    }
}

/// Appends one line (with its newline) in `format` to `out`.
pub fn format_line(out: &mut String, f: &Fields<'_>, format: LogFormat) {
    use std::fmt::Write as _;
    match format {
        LogFormat::Text => {
            out.push_str("time=");
            super::time::write_rfc3339_millis(out, f.time);
            out.push_str(" entry_point=");
            push_value(out, Some(f.entry_point));
            let _ = write!(out, " client={}", f.client);
            out.push_str(" router=");
            push_value(out, f.router);
            out.push_str(" service=");
            push_value(out, f.service);
            out.push_str(" server=");
            push_value(out, f.server);
            out.push_str(" sni=");
            push_value(out, f.sni);
            let _ = writeln!(
                out,
                " bytes_to_server={} bytes_to_client={} duration={:.3} close={}",
                f.bytes_to_server,
                f.bytes_to_client,
                f.duration.as_secs_f64(),
                f.close.as_str()
            );
        }
        LogFormat::Json => {
            let v = serde_json::json!({
                "time": super::time::rfc3339_millis(f.time),
                "entry_point": f.entry_point,
                "client": f.client.to_string(),
                "router": f.router,
                "service": f.service,
                "server": f.server,
                "sni": f.sni,
                "bytes_to_server": f.bytes_to_server,
                "bytes_to_client": f.bytes_to_client,
                "duration": f.duration.as_secs_f64(),
                "close": f.close.as_str(),
            });
            let _ = writeln!(out, "{v}");
        }
    }
}

/// The access log cannot be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessLogError {
    /// `accessLog.filePath` cannot be opened for appending.
    #[error("accessLog.filePath {path}: cannot open for appending: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The writer thread cannot be started.
    #[error("access log: cannot start the writer thread: {0}")]
    Thread(io::Error),
}

/// What goes through the queue to the writer thread.
#[derive(Debug)]
enum Msg {
    /// A connection's record.
    Record(Box<Record>),
    /// Write out everything queued before, then answer.
    Flush(SyncSender<()>),
}

/// Where connections send their records. Cheap to clone; never blocks.
#[derive(Clone, Debug)]
pub struct AccessLogSender {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl AccessLogSender {
    /// Queues a record; when the queue is full the record is dropped and counted.
    #[inline]
    pub fn send(&self, r: Box<Record>) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Msg::Record(r))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped because the queue was full (or the writer stopped).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The running access log: the sender and the writer thread.
#[derive(Debug)]
pub struct AccessLog {
    sender: AccessLogSender,
    lines: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl AccessLog {
    /// Opens the file (or stdout when `filePath` is unset) and starts the writer thread.
    pub fn start(cfg: &AccessLogConfig) -> Result<AccessLog, AccessLogError> {
        let out: Box<dyn Write + Send> = match &cfg.file_path {
            Some(p) => Box::new(open_append(p)?),
            None => Box::new(io::stdout()),
        };
        Self::start_with(out, cfg.format, QUEUE_CAPACITY)
    }

    /// Starts the writer thread on `out`, with a queue of `capacity` lines.
    pub fn start_with(
        out: Box<dyn Write + Send>,
        format: LogFormat,
        capacity: usize,
    ) -> Result<AccessLog, AccessLogError> {
        let (tx, rx) = sync_channel(capacity.max(1));
        let lines = Arc::new(AtomicU64::new(0));
        let written = lines.clone();
        let thread = std::thread::Builder::new()
            .name("tagway-accesslog".into())
            .spawn(move || writer(rx, out, format, &written))
            .map_err(AccessLogError::Thread)?;
        Ok(AccessLog {
            sender: AccessLogSender {
                tx,
                dropped: Arc::default(),
            },
            lines,
            thread: Some(thread),
        })
    }

    /// A sender for connections.
    pub fn sender(&self) -> AccessLogSender {
        self.sender.clone()
    }

    /// Lines written so far.
    pub fn lines_written(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Records dropped so far.
    pub fn dropped(&self) -> u64 {
        self.sender.dropped()
    }

    /// Waits until every record queued before this call is written and flushed, for at most
    /// `timeout` (a full queue waits for room first). False when the time ran out. Called at
    /// shutdown, after the last connection ended: the process exit would otherwise cut the
    /// writer thread off with the last lines still queued.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let (ack_tx, ack_rx) = sync_channel(1);
        let mut msg = Msg::Flush(ack_tx);
        loop {
            match self.sender.tx.try_send(msg) {
                Ok(()) => break,
                // The writer stopped: nothing is queued any more.
                Err(TrySendError::Disconnected(_)) => return true,
                Err(TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        ack_rx.recv_timeout(left).is_ok()
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The thread ends (after writing what is queued) once every sender is gone; connections
        // may still hold senders, so it is not joined here.
        drop(self.thread.take());
    }
}

fn open_append(p: &Path) -> Result<std::fs::File, AccessLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|source| AccessLogError::Open {
            path: p.to_owned(),
            source,
        })
}

fn writer(rx: Receiver<Msg>, out: Box<dyn Write + Send>, format: LogFormat, lines: &AtomicU64) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::with_capacity(512);
    let mut failed = false;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => {
                    line.clear();
                    format_line(&mut line, &r.fields(), format);
                    drop(r);
                    if let Err(e) = out.write_all(line.as_bytes()) {
                        if !failed {
                            tracing::error!(error = %e, "access log: write failed; lines are being lost");
                            failed = true;
                        }
                    } else {
                        failed = false;
                        lines.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Everything queued before the flush request is written by now.
                Msg::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    fn fields(sni: Option<&str>) -> Fields<'_> {
        Fields {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            entry_point: "tcp",
            client: "192.0.2.1:40000".parse().unwrap(),
            router: Some("db@file"),
            service: Some("db@file"),
            server: Some("10.0.0.5:5432"),
            sni,
            bytes_to_server: 120,
            bytes_to_client: 4096,
            duration: Duration::from_millis(250),
            close: CloseReason::Closed,
        }
    }

    #[test]
    fn text_line() {
        let mut s = String::new();
        format_line(&mut s, &fields(None), LogFormat::Text);
        assert_eq!(
            s,
            "time=2023-11-14T22:13:20.123Z entry_point=tcp client=192.0.2.1:40000 router=db@file \
             service=db@file server=10.0.0.5:5432 sni=- bytes_to_server=120 bytes_to_client=4096 \
             duration=0.250 close=closed\n"
        );
        // Client-chosen SNI cannot forge fields.
        let mut s = String::new();
        format_line(&mut s, &fields(Some("a b=c\"\n")), LogFormat::Text);
        assert!(s.contains(r#" sni="a b=c\"\u{a}" "#), "{s}");
        assert_eq!(s.matches('\n').count(), 1);
    }

    #[test]
    fn json_line() {
        let mut s = String::new();
        format_line(&mut s, &fields(Some("a.example")), LogFormat::Json);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["entry_point"], "tcp");
        assert_eq!(v["client"], "192.0.2.1:40000");
        assert_eq!(v["sni"], "a.example");
        assert_eq!(v["bytes_to_client"], 4096);
        assert_eq!(v["duration"], 0.25);
        assert_eq!(v["close"], "closed");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writer_thread_writes_and_full_queue_drops() {
        let buf = Shared::default();
        let log = AccessLog::start_with(Box::new(buf.clone()), LogFormat::Text, 4).unwrap();
        let tx = log.sender();
        for i in 0..3u16 {
            let mut r = Record::new("tcp".into(), SocketAddr::from(([127, 0, 0, 1], 1000 + i)));
            r.close = CloseReason::Failed(Failure::NoRoute);
            tx.send(Box::new(r));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.lines_written() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.lines().all(|l| l.ends_with("close=no_route")),
            "{text}"
        );
        assert!(text.contains("client=127.0.0.1:1002"));
        assert_eq!(log.dropped(), 0);
        // A writer that never drains: capacity 1, the second record is dropped.
        let (tx2, _rx) = sync_channel(1);
        let s = AccessLogSender {
            tx: tx2,
            dropped: Arc::default(),
        };
        s.send(Box::new(Record::new(
            "tcp".into(),
            "127.0.0.1:1".parse().unwrap(),
        )));
        s.send(Box::new(Record::new(
            "tcp".into(),
            "127.0.0.1:1".parse().unwrap(),
        )));
        assert_eq!(s.dropped(), 1);
    }

    /// A sink that takes 2 ms per write: without a flush the lines are still queued.
    #[derive(Clone, Default)]
    struct Slow(Shared);
    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(2));
            self.0.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_waits_for_every_queued_line() {
        let buf = Slow::default();
        // A sink that takes 2 ms per write: right after the last send, lines are still queued
        // or buffered.
        let log = AccessLog::start_with(Box::new(buf.clone()), LogFormat::Text, 64).unwrap();
        let tx = log.sender();
        for i in 0..40u16 {
            tx.send(Box::new(Record::new(
                "tcp".into(),
                SocketAddr::from(([127, 0, 0, 1], 2000 + i)),
            )));
        }
        assert_eq!(log.dropped(), 0);
        assert!(log.flush(Duration::from_secs(10)));
        let text = String::from_utf8(buf.0.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 40, "{text}");
        assert!(text.contains("client=127.0.0.1:2039"), "{text}");
        // Nothing queued: answers at once. A writer that never answers: false after the timeout.
        assert!(log.flush(Duration::from_secs(1)));
        let (tx2, _rx) = sync_channel(1);
        let stuck = AccessLog {
            sender: AccessLogSender {
                tx: tx2,
                dropped: Arc::default(),
            },
            lines: Arc::default(),
            thread: None,
        };
        assert!(!stuck.flush(Duration::from_millis(20)));
    }
}
