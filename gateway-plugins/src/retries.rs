//! `retries`: retries failed upstream calls, on top of a service's connection-level
//! `retries`, with exponential backoff, full jitter and a retry budget.
//!
//! ```yaml
//! plugins:
//!   - name: retries
//!     config: { attempts: 3, on_statuses: [502, 503, 504], backoff_base_ms: 25 }
//! ```
//!
//! - What is retried: connection failures and timeouts (each can be turned off), and the
//!   statuses listed in `on_statuses`.
//! - Only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) are retried unless
//!   `retry_non_idempotent` is set.
//! - A request body is kept for replay only up to `max_body_bytes`; a larger body (or one of
//!   unknown length that turns out larger) is sent once, never retried.
//! - tower's `TpsBudget` bounds retries to a share of recent requests (`budget_percent`, plus
//!   `budget_min_per_sec`), so retries cannot multiply load on a failing upstream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway_core::body::{ProxyBody, ReadError, read_limited};
use gateway_core::plugin::{BuildContext, Plugin, TypedFactory, UpstreamLayer, UpstreamService, typed_factory};
use gateway_core::proxy::{UpstreamFailure, X_REQUEST_ID, error_response, next_request_id};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use serde::Deserialize;
use tower::ServiceExt;
use tower::retry::budget::{Budget, TpsBudget};

/// Priority of retries: low, so its layer sits inside the layers of higher-priority plugins
/// and retries only the upstream call.
pub const PRIORITY: i32 = 20;

/// retries' config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesConfig {
    /// Attempts in all, the first included (default 3).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Retry when no connection could be made (default true).
    #[serde(default = "yes")]
    pub on_connect_error: bool,
    /// Retry when the upstream timed out (default true).
    #[serde(default = "yes")]
    pub on_timeout: bool,
    /// Retry on these upstream statuses (default none).
    #[serde(default)]
    pub on_statuses: Vec<u16>,
    /// Also retry POST, PATCH and other non-idempotent methods (default false).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// First backoff, ms (default 25); doubles per attempt, with full jitter.
    #[serde(default = "default_base")]
    pub backoff_base_ms: u64,
    /// Longest backoff, ms (default 1000).
    #[serde(default = "default_max")]
    pub backoff_max_ms: u64,
    /// Largest request body kept for replay, bytes (default 64 KiB).
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Retries allowed as a percentage of recent requests (default 20).
    #[serde(default = "default_percent")]
    pub budget_percent: f32,
    /// Retries always allowed per second, whatever the traffic (default 10).
    #[serde(default = "default_min")]
    pub budget_min_per_sec: u32,
}

fn default_attempts() -> u32 {
    3
}
fn yes() -> bool {
    true
}
fn default_base() -> u64 {
    25
}
fn default_max() -> u64 {
    1000
}
fn default_body() -> usize {
    64 * 1024
}
fn default_percent() -> f32 {
    20.0
}
fn default_min() -> u32 {
    10
}

/// What one route's retry layer needs.
struct Policy {
    attempts: u32,
    on_connect: bool,
    on_timeout: bool,
    statuses: Vec<StatusCode>,
    any_method: bool,
    base: Duration,
    max: Duration,
    max_body: usize,
    budget: TpsBudget,
}

/// The retries plugin.
pub struct Retries {
    policy: Arc<Policy>,
}

/// The factory to register.
pub fn factory()
-> TypedFactory<RetriesConfig, impl Fn(RetriesConfig, &BuildContext<'_>) -> Result<Retries, String> + Send + Sync> {
    typed_factory("retries", PRIORITY, |c: RetriesConfig, _: &BuildContext<'_>| Retries::new(c)).no_consumer()
}

impl Retries {
    /// Builds the plugin from its config.
    pub fn new(c: RetriesConfig) -> Result<Self, String> {
        if c.attempts == 0 || c.attempts > 10 {
            return Err(format!("`attempts` must be between 1 and 10, got {}", c.attempts));
        }
        if c.budget_min_per_sec > 1_000_000 {
            return Err(format!("`budget_min_per_sec` must be at most 1000000, got {}", c.budget_min_per_sec));
        }
        if !(0.0..=1000.0).contains(&c.budget_percent) {
            return Err(format!("`budget_percent` must be between 0 and 1000, got {}", c.budget_percent));
        }
        let statuses = c
            .on_statuses
            .iter()
            .map(|s| StatusCode::from_u16(*s).map_err(|_| format!("`on_statuses`: {s} is not a status")))
            .collect::<Result<_, _>>()?;
        Ok(Retries {
            policy: Arc::new(Policy {
                attempts: c.attempts,
                on_connect: c.on_connect_error,
                on_timeout: c.on_timeout,
                statuses,
                any_method: c.retry_non_idempotent,
                base: Duration::from_millis(c.backoff_base_ms),
                max: Duration::from_millis(c.backoff_max_ms.max(c.backoff_base_ms)),
                max_body: c.max_body_bytes,
                budget: TpsBudget::new(Duration::from_secs(10), c.budget_min_per_sec, c.budget_percent / 100.0),
            }),
        })
    }
}

impl Policy {
    fn method_allowed(&self, m: &Method) -> bool {
        self.any_method
            || [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE].contains(m)
    }

    fn should_retry(&self, resp: &Response<gateway_core::body::ResponseBody>) -> bool {
        match resp.extensions().get::<UpstreamFailure>() {
            Some(UpstreamFailure::Connect) => self.on_connect,
            Some(UpstreamFailure::Timeout) => self.on_timeout,
            Some(UpstreamFailure::Protocol | UpstreamFailure::NoTarget | UpstreamFailure::ClientBody) => false,
            None => self.statuses.contains(&resp.status()),
        }
    }

    /// Exponential backoff with full jitter: a random wait up to `base * 2^(attempt-1)`.
    fn backoff(&self, attempt: u32) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let ceiling = self.base.saturating_mul(1 << (attempt - 1).min(16)).min(self.max);
        let random = std::hash::RandomState::new().build_hasher().finish();
        ceiling.mul_f64((random % 10_000) as f64 / 10_000.0)
    }
}

async fn call(
    policy: Arc<Policy>,
    inner: UpstreamService,
    req: Request<ProxyBody>,
) -> Response<gateway_core::body::ResponseBody> {
    policy.budget.deposit();
    if policy.attempts < 2 || !policy.method_allowed(req.method()) {
        return inner.oneshot(req).await.unwrap_or_else(|e| match e {});
    }
    let (parts, mut body) = req.into_parts();
    // Keep the body for replay when it is small enough; otherwise send it once.
    let body_bytes: Bytes = if body.is_end_stream() {
        Bytes::new()
    } else if body.size_hint().lower() as usize > policy.max_body {
        return inner.oneshot(Request::from_parts(parts, body)).await.unwrap_or_else(|e| match e {});
    } else {
        match read_limited(&mut body, policy.max_body).await {
            Ok(b) => b,
            // Larger than we keep for replay: send it once, whole.
            Err(ReadError::TooLarge { read, .. }) => {
                let whole = ProxyBody::prefixed(read, body);
                return inner.oneshot(Request::from_parts(parts, whole)).await.unwrap_or_else(|e| match e {});
            }
            Err(e @ ReadError::Failed(_)) => {
                let id = parts.headers.get(&X_REQUEST_ID).cloned().unwrap_or_else(next_request_id);
                let (status, message) = e.answer();
                return error_response(status, message, &id);
            }
        }
    };
    let mut attempt = 1;
    loop {
        let mut req = Request::new(ProxyBody::full(body_bytes.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        // What the gateway attached for the upstream call (the consistent-hashing key, a
        // circuit breaker's target filter) goes with every attempt.
        *req.extensions_mut() = parts.extensions.clone();
        let resp = inner.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
        if attempt >= policy.attempts || !policy.should_retry(&resp) {
            return resp;
        }
        if !policy.budget.withdraw() {
            tracing::debug!(attempt, "retry budget exhausted; returning the failure");
            return resp;
        }
        tracing::debug!(attempt, status = resp.status().as_u16(), "retrying the upstream call");
        tokio::time::sleep(policy.backoff(attempt)).await;
        attempt += 1;
    }
}

impl Plugin for Retries {
    fn layer(&self) -> Option<UpstreamLayer> {
        let policy = self.policy.clone();
        Some(Arc::new(move |inner: UpstreamService| {
            let policy = policy.clone();
            UpstreamService::new(tower::service_fn(move |req: Request<ProxyBody>| {
                let (policy, inner) = (policy.clone(), inner.clone());
                async move { Ok(call(policy, inner, req).await) }
            }))
        }))
    }
}
