//! Blocking queries as Consul documents them.
//!
//! - `index` absent or `0`: answer at once.
//! - Otherwise hold the request while the resource's index is `<= index`, for `wait` (default
//!   5 minutes, at most 10 minutes) plus a random extra of up to `wait/16`, then answer with
//!   the current (unchanged) index and body.
//! - A restore (index rewind) wakes every blocking query at once, with the lower index.
//! - `X-Consul-Index` is never 0.
//!
//! Waiting is on `tokio::sync::watch` channels of the resources read: no polling, no thread
//! per request.

use std::time::Duration;

use futures_util::future::select_all;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::state::{Key, State, Store};
use super::util::{parse_go_duration, random_below};

/// Consul's default blocking wait.
pub(crate) const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// Consul's longest blocking wait.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// The consistency mode a read asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Consistency {
    /// The default mode.
    Leader,
    /// `?stale`.
    Stale,
    /// `?consistent`.
    Consistent,
}

impl Consistency {
    /// The value of `X-Consul-Effective-Consistency`.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Consistency::Leader => "leader",
            Consistency::Stale => "stale",
            Consistency::Consistent => "consistent",
        }
    }
}

/// The parsed read options of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReadOptions {
    pub(crate) min_index: u64,
    /// The wait after default and cap, before jitter.
    pub(crate) wait: Duration,
    pub(crate) consistency: Consistency,
    pub(crate) cached: bool,
}

/// Query parameters in order, repeated keys kept.
#[derive(Clone, Debug, Default)]
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    /// Parses a raw query string.
    pub(crate) fn parse(query: Option<&str>) -> Self {
        Params(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `key` is present (with or without a value).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// Every value of `key`.
    pub(crate) fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A 400 answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BadRequest(pub(crate) String);

/// Parses consistency, `wait` and `index` in Consul's order, with Consul's 400 texts.
pub(crate) fn parse_read_options(p: &Params) -> Result<ReadOptions, BadRequest> {
    let mut stale = p.has("stale");
    let consistent = p.has("consistent");
    let cached = p.has("cached");
    if let Some(max_stale) = p.get("max_stale").filter(|v| !v.is_empty()) {
        match parse_go_duration(max_stale) {
            Some(d) => {
                if d > 0 {
                    stale = true;
                }
            }
            None => {
                return Err(BadRequest(format!("Invalid max_stale value {max_stale:?}")));
            }
        }
    }
    if stale && consistent {
        return Err(BadRequest(
            "Cannot specify ?stale with ?consistent, conflicting semantics.".to_owned(),
        ));
    }
    if cached && consistent {
        return Err(BadRequest(
            "Cannot specify ?cached with ?consistent, conflicting semantics.".to_owned(),
        ));
    }
    let mut wait = DEFAULT_WAIT;
    if let Some(w) = p.get("wait").filter(|v| !v.is_empty()) {
        let nanos =
            parse_go_duration(w).ok_or_else(|| BadRequest("Invalid wait time".to_owned()))?;
        if nanos > 0 {
            wait = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).min(MAX_WAIT);
        }
    }
    let mut min_index = 0;
    if let Some(i) = p.get("index").filter(|v| !v.is_empty()) {
        min_index = i
            .parse::<u64>()
            .map_err(|_| BadRequest("Invalid index".to_owned()))?;
    }
    let consistency = if consistent {
        Consistency::Consistent
    } else if stale {
        Consistency::Stale
    } else {
        Consistency::Leader
    };
    Ok(ReadOptions {
        min_index,
        wait,
        consistency,
        cached,
    })
}

/// The random extra wait: uniform in `[0, wait/16)`.
pub(crate) fn jitter(wait: Duration) -> Duration {
    let cap = (wait / 16).as_nanos().min(u128::from(u64::MAX)) as u64;
    Duration::from_nanos(random_below(cap))
}

/// Resolves when any receiver sees a change (or its channel closes).
pub(crate) async fn any_changed(rxs: &mut [watch::Receiver<u64>]) {
    if rxs.is_empty() {
        std::future::pending::<()>().await;
    }
    let futures = rxs.iter_mut().map(|rx| Box::pin(rx.changed()));
    let _ = select_all(futures).await;
}

/// Runs `compute` under the read lock until its index passes `min_index`, the wait (with
/// jitter) runs out, the index is rewound, or the catalog stops; returns the last result.
pub(crate) async fn blocking_query<T>(
    store: &Store,
    opts: &ReadOptions,
    keys: &[Key],
    mut compute: impl FnMut(&State, &[u64]) -> (u64, T),
) -> (u64, T) {
    let deadline = Instant::now() + opts.wait + jitter(opts.wait);
    let mut abandon = store.abandon_rx();
    let mut finish = false;
    loop {
        let ((index, value), mut rxs) = store.read(keys, &mut compute);
        let index = index.max(1);
        if finish || opts.min_index == 0 || index > opts.min_index {
            drop(rxs);
            store.release(keys);
            return (index, value);
        }
        tokio::select! {
            () = any_changed(&mut rxs) => {}
            () = sleep_until(deadline) => finish = true,
            _ = abandon.changed() => finish = true,
            () = store.shutdown.cancelled() => finish = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(q: &str) -> Result<ReadOptions, BadRequest> {
        parse_read_options(&Params::parse(Some(q)))
    }

    #[test]
    fn defaults_do_not_block() {
        let o = opts("").expect("ok");
        assert_eq!(o.min_index, 0);
        assert_eq!(o.wait, DEFAULT_WAIT);
        assert_eq!(o.consistency, Consistency::Leader);
    }

    #[test]
    fn wait_is_capped_and_defaulted() {
        assert_eq!(
            opts("index=5&wait=30s").expect("ok").wait,
            Duration::from_secs(30)
        );
        assert_eq!(opts("index=5&wait=1h").expect("ok").wait, MAX_WAIT);
        assert_eq!(opts("index=5&wait=0s").expect("ok").wait, DEFAULT_WAIT);
        assert_eq!(opts("index=5&wait=-3s").expect("ok").wait, DEFAULT_WAIT);
        assert_eq!(opts("index=5&wait=").expect("ok").wait, DEFAULT_WAIT);
    }

    #[test]
    fn malformed_values_are_consul_400s() {
        assert_eq!(
            opts("wait=5").err(),
            Some(BadRequest("Invalid wait time".into()))
        );
        assert_eq!(
            opts("index=abc").err(),
            Some(BadRequest("Invalid index".into()))
        );
        assert_eq!(
            opts("index=-1").err(),
            Some(BadRequest("Invalid index".into()))
        );
        assert_eq!(
            opts("stale&consistent").err(),
            Some(BadRequest(
                "Cannot specify ?stale with ?consistent, conflicting semantics.".into()
            ))
        );
        assert_eq!(
            opts("max_stale=1s&consistent").err(),
            Some(BadRequest(
                "Cannot specify ?stale with ?consistent, conflicting semantics.".into()
            ))
        );
        assert!(opts("max_stale=xyz").is_err());
        // Consistency is checked before wait and index, as in Consul.
        assert_eq!(
            opts("stale&consistent&index=abc").err(),
            Some(BadRequest(
                "Cannot specify ?stale with ?consistent, conflicting semantics.".into()
            ))
        );
        assert_eq!(
            opts("wait=bad&index=bad").err(),
            Some(BadRequest("Invalid wait time".into()))
        );
    }

    #[test]
    fn jitter_stays_below_a_sixteenth() {
        let wait = Duration::from_secs(16);
        for _ in 0..1000 {
            assert!(jitter(wait) < Duration::from_secs(1));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn params_keep_repeats() {
        let p = Params::parse(Some("tag=a&tag=b%20c&passing"));
        assert_eq!(p.all("tag"), vec!["a", "b c"]);
        assert!(p.has("passing"));
        assert_eq!(p.get("passing"), Some(""));
    }
}
