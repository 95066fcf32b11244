//! Fault injection for tests: errors, hangs, dropped connections, latency, a lost leader, and
//! the index going backwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::state::Store;

/// Consul's answer while the cluster has no leader; the default body of injected 500s.
pub const NO_LEADER_ERROR: &str = "rpc error making call: No cluster leader";

/// What an injected fault does to a matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultAction {
    /// Answer at once with this status and plain-text body (the request is not processed).
    Error {
        /// HTTP status, e.g. 500.
        status: u16,
        /// Body text.
        body: String,
    },
    /// Hold the request this long, then process it normally.
    Delay(Duration),
    /// Close the TCP connection without a complete answer. With `mid_body` the handler runs
    /// and the connection closes after half of the body was sent; otherwise it closes after
    /// `after` without any answer (the request is not processed), like a server that dies
    /// during a blocking query.
    DropConnection {
        /// How long the request is held before the connection closes.
        after: Duration,
        /// Send the headers and half the body first.
        mid_body: bool,
    },
}

/// An injected fault: an action, which requests it matches, and how many times it fires.
///
/// ```
/// use std::time::Duration;
/// use tagway_integration::catalog::FaultRule;
///
/// // The next 3 requests to any health endpoint answer 500.
/// let rule = FaultRule::server_error().path_prefix("/v1/health/").times(3);
/// // Every blocking query is cut after 200ms, until the rule is cleared.
/// let cut = FaultRule::drop_connection().after(Duration::from_millis(200));
/// # let _ = (rule, cut);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    action: FaultAction,
    path_prefix: Option<String>,
    method: Option<String>,
    remaining: Option<u32>,
}

impl FaultRule {
    /// A rule with this action, matching every request, firing until cleared.
    pub fn new(action: FaultAction) -> Self {
        FaultRule {
            action,
            path_prefix: None,
            method: None,
            remaining: None,
        }
    }

    /// Answer with `status` and `body`.
    pub fn error(status: u16, body: impl Into<String>) -> Self {
        Self::new(FaultAction::Error {
            status,
            body: body.into(),
        })
    }

    /// Answer `500 rpc error making call: No cluster leader`, as Consul does without a leader.
    pub fn server_error() -> Self {
        Self::error(500, NO_LEADER_ERROR)
    }

    /// Hold matching requests for `duration`, then answer normally.
    pub fn hang(duration: Duration) -> Self {
        Self::new(FaultAction::Delay(duration))
    }

    /// Close the connection of matching requests without answering (at once; see
    /// [`FaultRule::after`] and [`FaultRule::mid_body`]).
    pub fn drop_connection() -> Self {
        Self::new(FaultAction::DropConnection {
            after: Duration::ZERO,
            mid_body: false,
        })
    }

    /// For a dropped connection: hold the request this long first.
    pub fn after(mut self, after: Duration) -> Self {
        if let FaultAction::DropConnection { after: a, .. } = &mut self.action {
            *a = after;
        }
        self
    }

    /// For a dropped connection: process the request, send headers and half the body, then
    /// close.
    pub fn mid_body(mut self) -> Self {
        if let FaultAction::DropConnection { mid_body, .. } = &mut self.action {
            *mid_body = true;
        }
        self
    }

    /// Only requests whose path starts with `prefix` (e.g. `/v1/health/service/web`).
    pub fn path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.path_prefix = Some(prefix.into());
        self
    }

    /// Only requests with this method (`GET`, `PUT`).
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into().to_ascii_uppercase());
        self
    }

    /// Fire for the next `n` matching requests only.
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.remaining != Some(0)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
            && self.method.as_deref().is_none_or(|m| m == method)
    }
}

/// The fault state consulted by the HTTP layer.
#[derive(Default)]
pub(crate) struct FaultState {
    rules: Mutex<Vec<FaultRule>>,
    latency: Mutex<Duration>,
    leaderless: AtomicBool,
    total: AtomicU64,
    per_path: Mutex<HashMap<String, u64>>,
}

impl FaultState {
    /// Counts a request and picks the fault for it, if any.
    pub(crate) fn on_request(&self, method: &str, path: &str) -> (Duration, Option<FaultAction>) {
        self.total.fetch_add(1, Ordering::Relaxed);
        *self
            .per_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.to_owned())
            .or_default() += 1;
        let latency = *self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let action = rules.iter_mut().find(|r| r.matches(method, path)).map(|r| {
            if let Some(n) = &mut r.remaining {
                *n -= 1;
            }
            r.action.clone()
        });
        rules.retain(|r| r.remaining != Some(0));
        (latency, action)
    }

    pub(crate) fn known_leader(&self) -> bool {
        !self.leaderless.load(Ordering::Relaxed)
    }
}

/// Fault controls of a running dev catalog (cheap to clone).
#[derive(Clone)]
pub struct Faults {
    pub(crate) state: Arc<FaultState>,
    pub(crate) store: Arc<Store>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rules = self.state.rules.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Faults").field("rules", &*rules).finish()
    }
}

impl Faults {
    /// Adds a rule; rules are tried in the order added and the first match fires.
    pub fn add(&self, rule: FaultRule) {
        self.state
            .rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rule);
    }

    /// Removes every rule, the latency and the lost leader.
    pub fn clear(&self) {
        self.state
            .rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.set_latency(Duration::ZERO);
        self.set_known_leader(true);
    }

    /// Adds `latency` before every request is processed (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap_or_else(|e| e.into_inner()) = latency;
    }

    /// The next `n` requests answer `500 rpc error making call: No cluster leader`.
    pub fn fail_next(&self, n: u32) {
        self.add(FaultRule::server_error().times(n));
    }

    /// The next `n` requests are held for `duration` before being processed.
    pub fn hang_next(&self, n: u32, duration: Duration) {
        self.add(FaultRule::hang(duration).times(n));
    }

    /// The next `n` requests have their connection closed without an answer.
    pub fn drop_next(&self, n: u32) {
        self.add(FaultRule::drop_connection().times(n));
    }

    /// With `false`, reads answer `X-Consul-KnownLeader: false` and `/v1/status/leader`
    /// answers `""`.
    pub fn set_known_leader(&self, known: bool) {
        self.state.leaderless.store(!known, Ordering::Relaxed);
    }

    /// Moves every index back to at most `to` (at least 1), as a snapshot restore does:
    /// every blocking query returns at once with the lower index, and a client that keeps
    /// its old index then blocks until its wait runs out. Later writes count up from `to`.
    pub fn rewind_index(&self, to: u64) {
        self.store.rewind(to);
    }

    /// Number of HTTP requests received so far (faulted ones included).
    pub fn requests(&self) -> u64 {
        self.state.total.load(Ordering::Relaxed)
    }

    /// Number of HTTP requests received so far whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> u64 {
        self.state
            .per_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, n)| *n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fire_in_order_and_run_out() {
        let st = FaultState::default();
        st.rules.lock().expect("lock").push(
            FaultRule::server_error()
                .path_prefix("/v1/health/")
                .times(2),
        );
        st.rules
            .lock()
            .expect("lock")
            .push(FaultRule::hang(Duration::from_secs(1)).method("put"));
        assert_eq!(st.on_request("GET", "/v1/catalog/services").1, None);
        assert!(matches!(
            st.on_request("GET", "/v1/health/service/web").1,
            Some(FaultAction::Error { status: 500, .. })
        ));
        assert!(st.on_request("GET", "/v1/health/x").1.is_some());
        assert_eq!(st.on_request("GET", "/v1/health/x").1, None);
        assert_eq!(
            st.on_request("PUT", "/v1/agent/service/register").1,
            Some(FaultAction::Delay(Duration::from_secs(1)))
        );
        assert_eq!(st.total.load(Ordering::Relaxed), 5);
    }
}
