//! `circuit-breaker`: stops sending requests to an upstream target that keeps failing, and
//! answers at once instead of waiting on it.
//!
//! ```yaml
//! plugins:
//!   - name: circuit-breaker
//!     config: { consecutive_failures: 5, failure_ratio: 0.5, min_requests: 20, open_ms: 30000 }
//! ```
//!
//! Each upstream target has its own breaker:
//! - **closed**: requests flow; a failure (connection error, timeout, or a status in
//!   `failure_statuses`) is counted. The breaker opens after `consecutive_failures` failures in
//!   a row, or when at least `min_requests` requests in the current `window_ms` failed in a
//!   share of `failure_ratio` or more.
//! - **open**: for `open_ms` the target is skipped by the balancer; when every target of the
//!   service is open, the request is answered at once with 503 `The upstream service is
//!   unavailable (circuit open)` and no upstream call is made.
//! - **half-open**: after `open_ms`, up to `half_open_probes` requests go through; a success
//!   closes the breaker, a failure opens it again.
//!
//! State changes are logged (`circuit opened`, `half-open`, `closed`) with the target.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::observe::MetricsExport;
use gateway_core::plugin::{BuildContext, Plugin, TypedFactory, UpstreamLayer, UpstreamService, typed_factory};
use gateway_core::proxy::{
    TargetFilter, UpstreamFailure, UpstreamTarget, X_REQUEST_ID, error_response, next_request_id,
};
use http::{Request, Response, StatusCode};
use serde::Deserialize;
use tower::ServiceExt;

/// Priority of circuit-breaker: below retries, so a retry can go to another target once a
/// breaker opens.
pub const PRIORITY: i32 = 10;

/// circuit-breaker's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Open after this many failures in a row (0 turns the rule off; default 5).
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// Open when this share of a window's requests failed (0 turns the rule off; default 0.5).
    #[serde(default = "default_ratio")]
    pub failure_ratio: f64,
    /// The ratio rule needs at least this many requests in the window (default 20).
    #[serde(default = "default_min")]
    pub min_requests: u32,
    /// Length of the counting window, ms (default 10000).
    #[serde(default = "default_window")]
    pub window_ms: u64,
    /// How long a breaker stays open, ms (default 30000).
    #[serde(default = "default_open")]
    pub open_ms: u64,
    /// Requests let through while half-open (default 1).
    #[serde(default = "default_probes")]
    pub half_open_probes: u32,
    /// Upstream statuses counted as failures (default 500, 502, 503, 504).
    #[serde(default = "default_statuses")]
    pub failure_statuses: Vec<u16>,
}

fn default_consecutive() -> u32 {
    5
}
fn default_ratio() -> f64 {
    0.5
}
fn default_min() -> u32 {
    20
}
fn default_window() -> u64 {
    10_000
}
fn default_open() -> u64 {
    30_000
}
fn default_probes() -> u32 {
    1
}
fn default_statuses() -> Vec<u16> {
    vec![500, 502, 503, 504]
}

#[derive(Debug)]
enum State {
    Closed { window_start: Instant, total: u32, failed: u32, in_a_row: u32 },
    Open { until: Instant },
    HalfOpen { probes: u32, since: Instant },
}

struct Settings {
    consecutive: u32,
    ratio: f64,
    min_requests: u32,
    window: Duration,
    open: Duration,
    probes: u32,
    statuses: Vec<StatusCode>,
}

/// Breakers by target label. A breaker's state is a small mutex held for a few instructions.
struct Breakers {
    settings: Settings,
    by_target: RwLock<HashMap<Arc<str>, Arc<Mutex<State>>>>,
}

impl Breakers {
    fn breaker(&self, target: &str) -> Arc<Mutex<State>> {
        if let Some(b) = self.by_target.read().unwrap_or_else(|p| p.into_inner()).get(target) {
            return b.clone();
        }
        let mut map = self.by_target.write().unwrap_or_else(|p| p.into_inner());
        map.entry(Arc::from(target)).or_insert_with(|| Arc::new(Mutex::new(closed()))).clone()
    }

    /// May a request go to `target` now? Takes a probe slot when half-open.
    fn allow(&self, target: &str) -> bool {
        let b = self.breaker(target);
        let mut state = b.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= *until => {
                tracing::info!(target = target, "circuit half-open: probing");
                *state = State::HalfOpen { probes: 1, since: Instant::now() };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probes, .. } if *probes < self.settings.probes => {
                *probes += 1;
                true
            }
            // A probe whose outcome never came back (its request went to another target, or
            // the client left) must not hold the target out forever: after another open
            // period, probe again.
            State::HalfOpen { since, probes } if since.elapsed() >= self.settings.open => {
                *since = Instant::now();
                *probes = 1;
                true
            }
            State::HalfOpen { .. } => false,
        }
    }

    fn record(&self, target: &str, failed: bool) {
        let s = &self.settings;
        let b = self.breaker(target);
        let mut state = b.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match &mut *state {
            State::HalfOpen { .. } if failed => {
                tracing::warn!(target = target, "circuit opened again: the probe failed");
                *state = State::Open { until: now + s.open };
            }
            State::HalfOpen { .. } => {
                tracing::info!(target = target, "circuit closed: the probe succeeded");
                *state = closed();
            }
            State::Open { .. } => {}
            State::Closed { window_start, total, failed: fails, in_a_row } => {
                if now.duration_since(*window_start) >= s.window {
                    (*window_start, *total, *fails) = (now, 0, 0);
                }
                *total += 1;
                if failed {
                    *fails += 1;
                    *in_a_row += 1;
                } else {
                    *in_a_row = 0;
                }
                let by_row = s.consecutive > 0 && *in_a_row >= s.consecutive;
                let by_ratio =
                    s.ratio > 0.0 && *total >= s.min_requests && f64::from(*fails) / f64::from(*total) >= s.ratio;
                if failed && (by_row || by_ratio) {
                    tracing::warn!(target = target, failures = *fails, requests = *total, "circuit opened");
                    *state = State::Open { until: now + s.open };
                }
            }
        }
    }

    fn is_failure(&self, resp: &Response<ResponseBody>) -> bool {
        match resp.extensions().get::<UpstreamFailure>() {
            Some(UpstreamFailure::NoTarget | UpstreamFailure::ClientBody) => false,
            Some(_) => true,
            None => self.settings.statuses.contains(&resp.status()),
        }
    }
}

fn closed() -> State {
    State::Closed { window_start: Instant::now(), total: 0, failed: 0, in_a_row: 0 }
}

/// The circuit-breaker plugin.
pub struct CircuitBreaker {
    breakers: Arc<Breakers>,
}

/// The factory to register.
pub fn factory() -> TypedFactory<
    CircuitBreakerConfig,
    impl Fn(CircuitBreakerConfig, &BuildContext<'_>) -> Result<CircuitBreaker, String> + Send + Sync,
> {
    typed_factory("circuit-breaker", PRIORITY, |c: CircuitBreakerConfig, _: &BuildContext<'_>| CircuitBreaker::new(c))
        .no_consumer()
}

impl CircuitBreaker {
    /// Builds the plugin from its config.
    pub fn new(c: CircuitBreakerConfig) -> Result<Self, String> {
        if c.consecutive_failures == 0 && c.failure_ratio <= 0.0 {
            return Err("set `consecutive_failures` or `failure_ratio`, or the breaker never opens".into());
        }
        if !(0.0..=1.0).contains(&c.failure_ratio) {
            return Err(format!("`failure_ratio` must be between 0 and 1, got {}", c.failure_ratio));
        }
        if c.window_ms == 0 || c.open_ms == 0 || c.half_open_probes == 0 {
            return Err("`window_ms`, `open_ms` and `half_open_probes` must be positive".into());
        }
        let statuses = c
            .failure_statuses
            .iter()
            .map(|s| StatusCode::from_u16(*s).map_err(|_| format!("`failure_statuses`: {s} is not a status")))
            .collect::<Result<_, _>>()?;
        Ok(CircuitBreaker {
            breakers: Arc::new(Breakers {
                settings: Settings {
                    consecutive: c.consecutive_failures,
                    ratio: c.failure_ratio,
                    min_requests: c.min_requests,
                    window: Duration::from_millis(c.window_ms),
                    open: Duration::from_millis(c.open_ms),
                    probes: c.half_open_probes,
                    statuses,
                },
                by_target: RwLock::new(HashMap::new()),
            }),
        })
    }
}

async fn call(breakers: Arc<Breakers>, inner: UpstreamService, mut req: Request<ProxyBody>) -> Response<ResponseBody> {
    let refused = Arc::new(AtomicBool::new(false));
    let filter = {
        let (breakers, refused) = (breakers.clone(), refused.clone());
        TargetFilter(Arc::new(move |target: &str| {
            let allowed = breakers.allow(target);
            if !allowed {
                refused.store(true, Ordering::Relaxed);
            }
            allowed
        }))
    };
    let id = req.headers().get(&X_REQUEST_ID).cloned();
    req.extensions_mut().insert(filter);
    let resp = inner.oneshot(req).await.unwrap_or_else(|e| match e {});
    if resp.extensions().get::<UpstreamFailure>() == Some(&UpstreamFailure::NoTarget) && refused.load(Ordering::Relaxed)
    {
        let id = id.unwrap_or_else(next_request_id);
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "The upstream service is unavailable (circuit open)",
            &id,
        );
    }
    // A client's broken body tested nothing: neither a failure nor a success of the target.
    if let Some(UpstreamTarget(target)) = resp.extensions().get::<UpstreamTarget>()
        && resp.extensions().get::<UpstreamFailure>() != Some(&UpstreamFailure::ClientBody)
    {
        breakers.record(target, breakers.is_failure(&resp));
    }
    resp
}

impl Plugin for CircuitBreaker {
    fn export_metrics(&self, route: &str, out: &mut MetricsExport) {
        let map = self.breakers.by_target.read().unwrap_or_else(|p| p.into_inner());
        for (target, state) in map.iter() {
            let state = match &*state.lock().unwrap_or_else(|p| p.into_inner()) {
                State::Closed { .. } => "closed",
                State::Open { .. } => "open",
                State::HalfOpen { .. } => "half_open",
            };
            for s in ["closed", "open", "half_open"] {
                out.gauge(
                    "gateway_circuit_breaker_state",
                    "1 for the state each target's breaker is in, by route and target.",
                    &[("route", route), ("target", target), ("state", s)],
                    if s == state { 1.0 } else { 0.0 },
                );
            }
        }
    }

    fn layer(&self) -> Option<UpstreamLayer> {
        let breakers = self.breakers.clone();
        Some(Arc::new(move |inner: UpstreamService| {
            let breakers = breakers.clone();
            UpstreamService::new(tower::service_fn(move |req: Request<ProxyBody>| {
                let (breakers, inner) = (breakers.clone(), inner.clone());
                async move { Ok(call(breakers, inner, req).await) }
            }))
        }))
    }
}
