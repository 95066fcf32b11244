//! Blocking-query mechanics shared by every watch: index bookkeeping, pacing (per-watch rate
//! limit, jittered exponential backoff with a cap), and the query itself.
//!
//! Consul's advice for blocking queries is followed: the index is reset to 0 when it goes
//! backwards (or is missing) so the next query returns at once with the current state; an index
//! of 0 is treated as 1 so the query still blocks; the HTTP timeout is above `wait + wait/16`
//! (Consul adds up to `wait/16` of jitter); and every watch is rate limited so one that returns
//! at once over and over (a flapping service, a buggy proxy stripping the index) cannot spin.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::client::{ClientError, ConsulClient, QueryMeta, QueryOptions};

/// Timing of the watches.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchTiming {
    /// `wait` of blocking queries (`endpoint.endpointWaitTime`; Consul's default 5 minutes).
    pub wait: Duration,
    /// First retry delay after an error.
    pub retry_min: Duration,
    /// Cap of the retry delay.
    pub retry_max: Duration,
    /// Requests one watch may make back to back before the rate limit applies.
    pub burst: u32,
    /// Sustained rate limit of one watch: one request per this interval.
    pub interval: Duration,
    /// Changes arriving within this window are published together.
    pub coalesce: Duration,
}

impl Default for WatchTiming {
    fn default() -> Self {
        WatchTiming {
            wait: Duration::from_secs(300),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(30),
            burst: 5,
            interval: Duration::from_millis(200),
            coalesce: Duration::from_millis(25),
        }
    }
}

/// A token bucket: `burst` requests at once, then one per `interval`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    interval: Duration,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(burst: u32, interval: Duration) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            burst,
            interval,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes a token, sleeping until one is available.
    pub async fn acquire(&mut self) {
        let now = Instant::now();
        if !self.interval.is_zero() {
            let refill = now.duration_since(self.last).as_secs_f64() / self.interval.as_secs_f64();
            self.tokens = (self.tokens + refill).min(self.burst);
        } else {
            self.tokens = self.burst;
        }
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return;
        }
        let missing = 1.0 - self.tokens;
        let sleep = self.interval.mul_f64(missing);
        tokio::time::sleep(sleep).await;
        self.tokens = 0.0;
        self.last = Instant::now();
    }
}

/// What an answer means for the watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// New data (or data that must be taken as new): process the body.
    Changed,
    /// The same index as before: the blocking query timed out; nothing to do.
    Unchanged,
}

/// The state of one blocking watch: its index and its pacing.
#[derive(Debug)]
pub struct Blocking {
    index: u64,
    limiter: RateLimiter,
    backoff: Option<ExponentialBackoff>,
    timing: Arc<WatchTiming>,
    failures: u32,
}

impl Blocking {
    /// A watch that has not queried yet (index 0: the first query returns at once).
    pub fn new(timing: Arc<WatchTiming>) -> Blocking {
        Blocking {
            index: 0,
            limiter: RateLimiter::new(timing.burst, timing.interval),
            backoff: None,
            timing,
            failures: 0,
        }
    }

    /// The index the next blocking query waits on (0 = none yet).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Forgets the index: the next query returns at once.
    pub fn reset(&mut self) {
        self.index = 0;
    }

    /// Waits before the next query: the backoff delay after an error, else the rate limit.
    pub async fn pace(&mut self) {
        if self.failures > 0 {
            let timing = &self.timing;
            let backoff = self.backoff.get_or_insert_with(|| {
                ExponentialBuilder::default()
                    .with_min_delay(timing.retry_min)
                    .with_max_delay(timing.retry_max)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times()
                    .build()
            });
            let delay = backoff.next().unwrap_or(self.timing.retry_max);
            tokio::time::sleep(delay.min(self.timing.retry_max * 2)).await;
        }
        self.limiter.acquire().await;
    }

    /// Records a failed query: the next [`pace`](Self::pace) backs off.
    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// Applies an answer's `X-Consul-Index`.
    pub fn observe(&mut self, meta: QueryMeta) -> Observed {
        self.failures = 0;
        self.backoff = None;
        let observed = classify(self.index, meta);
        match meta.index {
            None => self.index = 0,
            Some(0) => self.index = 1,
            Some(n) if n < self.index => {
                tracing::debug!(
                    old = self.index,
                    new = n,
                    "Consul index went backwards, resetting"
                );
                self.index = 0;
            }
            Some(n) => self.index = n,
        }
        observed
    }

    /// Runs one query: blocking on the current index when `block` is true (and an index is
    /// known), else returning at once. `Ok(None)` = unchanged. On error the watch backs off.
    ///
    /// Answers of at least [`OFF_THREAD_DECODE`] bytes (the catalog, the census of every check
    /// at 10,000 services) are decoded on tokio's blocking pool, so the runtime thread that
    /// publishes configurations and serves connections is not held up for tens of milliseconds.
    pub async fn query<T: DeserializeOwned + Send + 'static>(
        &mut self,
        client: &ConsulClient,
        segments: &[&str],
        namespace: Option<&str>,
        block: bool,
    ) -> Result<Option<T>, ClientError> {
        self.query_with(client, segments, namespace, block, |body| {
            serde_json::from_slice::<T>(body)
        })
        .await
    }

    /// The options of the next query: this watch's index when it blocks.
    fn options<'a>(&self, block: bool, namespace: Option<&'a str>) -> QueryOptions<'a> {
        QueryOptions {
            index: if block { self.index } else { 0 },
            wait: Some(self.timing.wait),
            namespace,
        }
    }

    /// Takes the outcome of a query into the watch's index and backoff.
    fn settle<T>(
        &mut self,
        result: Result<(Option<T>, QueryMeta), ClientError>,
    ) -> Result<Option<T>, ClientError> {
        match result {
            Ok((value, meta)) => {
                self.observe(meta);
                Ok(value)
            }
            Err(e) => {
                self.failed();
                Err(e)
            }
        }
    }

    /// [`Blocking::query`] with the answer's body given to `decode` (on the blocking pool for
    /// large answers): a caller can borrow strings from the body instead of copying them.
    pub async fn query_with<T: Send + 'static>(
        &mut self,
        client: &ConsulClient,
        segments: &[&str],
        namespace: Option<&str>,
        block: bool,
        decode: impl FnOnce(&[u8]) -> Result<T, serde_json::Error> + Send + 'static,
    ) -> Result<Option<T>, ClientError> {
        let opts = self.options(block, namespace);
        let result = async {
            let t0 = std::time::Instant::now();
            let (resp, meta) = client.get_bytes(segments, &opts).await?;
            let t_head = t0.elapsed();
            // The index moves only once the body arrived in full.
            let changed = classify(self.index, meta);
            let endpoint = || client.url(segments).to_string();
            let timeout = client.timeout_for(&opts);
            let body = read_body(resp)
                .await
                .map_err(|source| body_error(source, endpoint(), timeout))?;
            let t_body = t0.elapsed();
            if changed == Observed::Unchanged {
                return Ok((None, meta));
            }
            let bytes = body.len();
            let decoded = if body.len() >= OFF_THREAD_DECODE {
                joined(tokio::task::spawn_blocking(move || decode(&body))).await
            } else {
                decode(&body)
            };
            let value = decoded.map_err(|source| ClientError::Decode {
                endpoint: endpoint(),
                source,
            })?;
            log_answer(segments, bytes, t_head, Some(t_body), t0.elapsed());
            Ok((Some(value), meta))
        }
        .await;
        self.settle(result)
    }

    /// [`Blocking::query`] for the largest answers: the body is given to `decoder` chunk by
    /// chunk as it arrives and never held whole.
    pub async fn query_stream<D: StreamDecoder + Send + 'static>(
        &mut self,
        client: &ConsulClient,
        segments: &[&str],
        namespace: Option<&str>,
        block: bool,
        mut decoder: D,
    ) -> Result<Option<D::Output>, ClientError> {
        let opts = self.options(block, namespace);
        let result = async {
            let t0 = std::time::Instant::now();
            let (mut resp, meta) = client.get_bytes(segments, &opts).await?;
            let t_head = t0.elapsed();
            let changed = classify(self.index, meta) == Observed::Changed;
            let endpoint = || client.url(segments).to_string();
            let timeout = client.timeout_for(&opts);
            let decode_error = |source| ClientError::Decode {
                endpoint: endpoint(),
                source,
            };
            // The decoder runs on the blocking pool, a few chunks behind the socket: scanning
            // a 10 MB answer takes tens of ms the runtime thread spends on other watches.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(STREAM_AHEAD);
            let worker = changed.then(|| {
                tokio::task::spawn_blocking(move || {
                    while let Some(chunk) = rx.blocking_recv() {
                        decoder.feed(&chunk)?;
                    }
                    decoder.finish()
                })
            });
            let mut bytes = 0;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|source| body_error(source, endpoint(), timeout))?
            {
                bytes += chunk.len();
                // A send fails only when the decoder stopped on an error, told below.
                if worker.is_some() && tx.send(chunk).await.is_err() {
                    break;
                }
            }
            drop(tx);
            // The index moves only once the body arrived in full.
            let Some(worker) = worker else {
                return Ok((None, meta));
            };
            let value = joined(worker).await.map_err(decode_error)?;
            log_answer(segments, bytes, t_head, None, t0.elapsed());
            Ok((Some(value), meta))
        }
        .await;
        self.settle(result)
    }
}

/// Chunks of a streamed answer received ahead of its decoder. Few: a chunk is whatever one read
/// of the socket gave (up to ~400 KB when the answer arrives faster than it is scanned), and the
/// rest of the answer waits in the socket's buffers rather than in the gateway's heap.
const STREAM_AHEAD: usize = 2;

/// Answers at least this large are decoded off the runtime thread (see [`Blocking::query`]).
pub const OFF_THREAD_DECODE: usize = 256 * 1024;

/// Whether an answer with `meta` is new relative to `index`.
fn classify(index: u64, meta: QueryMeta) -> Observed {
    match meta.index {
        Some(n) if n != 0 && n == index => Observed::Unchanged,
        _ => Observed::Changed,
    }
}

/// Logs (target `tagway::timing`, debug) when an answer's headers arrived, when its body had
/// (`None`: streamed, decoded as it arrived) and when it was decoded, from the request's start.
fn log_answer(
    segments: &[&str],
    bytes: usize,
    head: Duration,
    body: Option<Duration>,
    decoded: Duration,
) {
    tracing::debug!(
        target: "tagway::timing",
        endpoint = segments.last().copied().unwrap_or_default(),
        bytes,
        head_us = head.as_micros() as u64,
        body_us = body.map(|b| b.as_micros() as u64),
        decoded_us = decoded.as_micros() as u64,
        streamed = body.is_none(),
        "consul answer"
    );
}

/// The result of work on the blocking pool (a panic there is resumed here).
async fn joined<T>(handle: tokio::task::JoinHandle<T>) -> T {
    match handle.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down, and this watch with it.
        Err(_) => std::future::pending().await,
    }
}

/// A decoder fed an answer's body chunk by chunk as it arrives ([`Blocking::query_stream`]).
pub trait StreamDecoder {
    /// What the whole answer decodes to.
    type Output: Send + 'static;
    /// Reads the next piece of the body.
    fn feed(&mut self, chunk: &[u8]) -> Result<(), serde_json::Error>;
    /// The value, once the whole body was fed.
    fn finish(self) -> Result<Self::Output, serde_json::Error>;
}

/// A failure while reading an answer's body.
fn body_error(source: reqwest::Error, endpoint: String, timeout: Duration) -> ClientError {
    if source.is_timeout() {
        ClientError::Timeout { endpoint, timeout }
    } else {
        ClientError::Transport {
            endpoint,
            source: source.without_url(),
        }
    }
}

/// The whole body of `resp`, copied chunk by chunk into one buffer sized from
/// `Content-Length`: a 10 MB answer (every check of a large catalog) is held once, not once in
/// the received chunks and once more collected.
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    /// Larger announced lengths grow as the body arrives instead of being reserved up front.
    const MAX_RESERVE: u64 = 64 << 20;
    let reserve = resp.content_length().unwrap_or(0).min(MAX_RESERVE);
    let mut body = Vec::with_capacity(usize::try_from(reserve).unwrap_or(0));
    while let Some(chunk) = resp.chunk().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tagway_config::ConsulEndpoint;

    use super::*;
    use crate::client::Settings;
    use crate::test_stub::{Reply, Stub};

    fn client(stub: &Stub) -> ConsulClient {
        let ep = ConsulEndpoint {
            address: Some(stub.addr().to_string()),
            ..Default::default()
        };
        ConsulClient::new(
            Settings::resolve(&ep, false, false, false, &|_| None).unwrap(),
            8,
        )
        .unwrap()
    }

    /// A stub giving these answers (index, body) in turn.
    async fn answering(answers: Vec<(u64, String)>) -> Stub {
        let answers = Arc::new(Mutex::new(answers));
        Stub::start(move |_| {
            let (i, b) = answers.lock().unwrap().remove(0);
            Reply::json(200, &b).with_index(i)
        })
        .await
    }

    fn timing() -> Arc<WatchTiming> {
        Arc::new(WatchTiming {
            wait: Duration::from_secs(1),
            ..Default::default()
        })
    }

    #[test]
    fn index_rules() {
        let mut b = Blocking::new(timing());
        let m = |i| QueryMeta { index: i };
        assert_eq!(b.observe(m(Some(10))), Observed::Changed);
        assert_eq!(b.index(), 10);
        assert_eq!(b.observe(m(Some(10))), Observed::Unchanged);
        assert_eq!(b.observe(m(Some(12))), Observed::Changed);
        assert_eq!(b.index(), 12);
        assert_eq!(b.observe(m(Some(3))), Observed::Changed, "backwards");
        assert_eq!(b.index(), 0, "reset so the next query returns at once");
        assert_eq!(b.observe(m(Some(0))), Observed::Changed);
        assert_eq!(b.index(), 1, "0 is treated as 1 so the query blocks");
        assert_eq!(b.observe(m(None)), Observed::Changed);
        assert_eq!(b.index(), 0, "missing index: reset");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_a_burst_then_the_interval() {
        let mut r = RateLimiter::new(3, Duration::from_millis(100));
        let t0 = Instant::now();
        for _ in 0..3 {
            r.acquire().await;
        }
        assert_eq!(Instant::now(), t0, "the burst is free");
        r.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(100));
        r.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(200));
        tokio::time::advance(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        for _ in 0..3 {
            r.acquire().await;
        }
        assert_eq!(
            Instant::now(),
            t1,
            "the bucket refilled, capped at the burst"
        );
        r.acquire().await;
        assert_eq!(Instant::now() - t1, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_with_jitter_and_is_capped_then_resets() {
        let t = Arc::new(WatchTiming {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            burst: 100,
            interval: Duration::ZERO,
            ..Default::default()
        });
        let mut b = Blocking::new(t);
        let mut delays = Vec::new();
        for _ in 0..12 {
            b.failed();
            let t0 = Instant::now();
            b.pace().await;
            delays.push(Instant::now() - t0);
        }
        assert!(delays[0] >= Duration::from_millis(100), "{delays:?}");
        assert!(delays[0] < Duration::from_millis(400), "{delays:?}");
        assert!(delays[4] > delays[0], "grows: {delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "capped (jitter adds at most the delay itself): {delays:?}"
        );
        b.observe(QueryMeta { index: Some(1) });
        let t0 = Instant::now();
        b.pace().await;
        assert_eq!(Instant::now(), t0, "a success resets the backoff");
    }

    /// A catalog answer above the off-thread threshold decodes the same (and a broken one
    /// still names the endpoint), from a single-threaded runtime like the gateway's.
    #[tokio::test]
    async fn large_answers_are_decoded_off_the_runtime_thread() {
        let services: serde_json::Map<String, serde_json::Value> = (0..10_000)
            .map(|i| {
                let tags = vec![format!("traefik.tcp.routers.r{i}.rule=HostSNI(`*`)")];
                (format!("svc-{i:05}"), serde_json::json!(tags))
            })
            .collect();
        let body = serde_json::Value::Object(services).to_string();
        assert!(body.len() >= OFF_THREAD_DECODE, "{}", body.len());
        let broken = format!("{}garbage", &body[..body.len() - 1]);
        let stub = answering(vec![(7, body), (8, broken)]).await;
        let c = client(&stub);
        let mut b = Blocking::new(timing());
        let segs = ["v1", "catalog", "services"];
        let got = b
            .query::<crate::api::CatalogServices>(&c, &segs, None, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 10_000);
        assert_eq!(
            got["svc-04242"],
            ["traefik.tcp.routers.r4242.rule=HostSNI(`*`)"]
        );
        let err = b
            .query::<crate::api::CatalogServices>(&c, &segs, None, false)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("/v1/catalog/services"), "{err}");
    }

    /// A streamed answer is decoded as it arrives, from a single-threaded runtime like the
    /// gateway's; a broken one is a decode error naming the endpoint and keeps the index; an
    /// unchanged one is not decoded.
    #[tokio::test]
    async fn streamed_answers_are_decoded_chunk_by_chunk() {
        let checks: Vec<serde_json::Value> = (0..30_000)
            .map(|i| {
                serde_json::json!({
                    "Node": format!("n{}", i % 3), "CheckID": format!("c{i}"),
                    "ServiceID": format!("s{}-{}", i / 3, i % 3),
                    "ServiceName": format!("s{}", i / 3), "Output": "x".repeat(100),
                })
            })
            .collect();
        let body = serde_json::Value::Array(checks).to_string();
        let broken = format!("{}}}", &body[..body.len() - 1]);
        let stub = answering(vec![(7, body.clone()), (8, broken), (7, body)]).await;
        let c = client(&stub);
        let mut b = Blocking::new(timing());
        let segs = ["v1", "health", "state", "any"];
        let census = crate::census::Census::new;
        let got = b
            .query_stream(&c, &segs, None, true, census())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 10_000);
        assert_eq!(
            got["s4242"],
            crate::census::instances_digest([
                ("n0", "s4242-0"),
                ("n1", "s4242-1"),
                ("n2", "s4242-2")
            ])
        );
        let err = b
            .query_stream(&c, &segs, None, true, census())
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("/v1/health/state/any"), "{err}");
        assert_eq!(b.index(), 7, "a broken answer does not move the index");
        let unchanged = b.query_stream(&c, &segs, None, true, census()).await;
        assert!(unchanged.unwrap().is_none(), "same index: unchanged");
    }

    #[tokio::test]
    async fn blocking_query_sends_index_and_wait_and_follows_the_index() {
        let next = Arc::new(Mutex::new(vec![5u64, 5, 9, 2]));
        let n2 = next.clone();
        let stub = Stub::start(move |_| {
            let i = n2.lock().unwrap().remove(0);
            Reply::json(200, &format!(r#"{{"svc{i}":[]}}"#)).with_index(i)
        })
        .await;
        let c = client(&stub);
        let mut b = Blocking::new(timing());
        let segs = ["v1", "catalog", "services"];
        let r = b.query::<crate::api::CatalogServices>(&c, &segs, None, true);
        assert!(r.await.unwrap().unwrap().contains_key("svc5"));
        let r = b.query::<crate::api::CatalogServices>(&c, &segs, None, true);
        assert!(r.await.unwrap().is_none(), "same index: unchanged");
        let r = b.query::<crate::api::CatalogServices>(&c, &segs, None, true);
        assert!(r.await.unwrap().unwrap().contains_key("svc9"));
        let r = b.query::<crate::api::CatalogServices>(&c, &segs, None, true);
        assert!(
            r.await.unwrap().unwrap().contains_key("svc2"),
            "backwards: taken"
        );
        assert_eq!(b.index(), 0);
        let reqs = stub.requests();
        assert_eq!(reqs[0].index(), 0);
        assert_eq!(reqs[0].param("wait"), None, "no wait without an index");
        assert_eq!(reqs[1].index(), 5);
        assert_eq!(reqs[1].param("wait"), Some("1000ms"));
        assert_eq!(reqs[2].index(), 5);
        assert_eq!(reqs[3].index(), 9);
    }

    #[tokio::test]
    async fn errors_keep_the_index() {
        let calls = Arc::new(Mutex::new(0));
        let c2 = calls.clone();
        let stub = Stub::start(move |_| {
            let mut n = c2.lock().unwrap();
            *n += 1;
            if *n == 2 {
                Reply::json(500, "rpc error")
            } else {
                Reply::json(200, "{}").with_index(7)
            }
        })
        .await;
        let c = client(&stub);
        let mut b = Blocking::new(timing());
        let segs = ["v1", "catalog", "services"];
        b.query::<crate::api::CatalogServices>(&c, &segs, None, true)
            .await
            .unwrap();
        let e = b
            .query::<crate::api::CatalogServices>(&c, &segs, None, true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("500"), "{e}");
        assert_eq!(b.index(), 7);
        assert_eq!(b.failures(), 1);
        let r = b
            .query::<crate::api::CatalogServices>(&c, &segs, None, true)
            .await
            .unwrap();
        assert!(r.is_none());
        assert_eq!(b.failures(), 0);
    }
}
