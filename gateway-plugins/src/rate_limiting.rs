//! `rate-limiting`: Kong's fixed-window limits per second, minute, hour, day, month and year,
//! counted per consumer, credential, IP, service, header or path.
//!
//! ```yaml
//! plugins:
//!   - name: rate-limiting
//!     config: { second: 10, hour: 100, limit_by: ip }
//! ```
//!
//! Every response carries `X-RateLimit-Limit-<Period>` and `X-RateLimit-Remaining-<Period>`
//! for each configured period, plus `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset` for the period closest to its limit (unless `hide_client_headers`). A
//! refused request gets `error_code` (429) with `error_message` and `Retry-After`.
//!
//! # Why fixed windows are hand-written here
//!
//! `governor` (GCRA) smooths traffic: it cannot say how many requests remain in Kong's
//! calendar windows, nor guarantee that *exactly* N requests pass in a window, which this
//! plugin promises even under concurrency. Each (route, identifier, period) has one atomic
//! word holding the window start and the count; a request takes a unit with a
//! compare-and-swap that refuses at the limit, so N concurrent clients can never push the
//! count past N. When one of several periods refuses, the units already taken in the other
//! periods are given back.
//!
//! The local policy counts per gateway process. A policy shared by several replicas (Redis)
//! is not supported yet and is refused by name.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::plugin::{Answer, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use serde::Deserialize;

/// Kong's priority for rate-limiting.
pub const PRIORITY: i32 = 910;

/// What requests are counted together.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LimitBy {
    /// The authenticated consumer (falling back to the credential, then the IP).
    #[default]
    Consumer,
    /// The credential (falling back to the IP).
    Credential,
    /// The client IP.
    Ip,
    /// The service: all clients together.
    Service,
    /// The value of `header_name` (falling back to the IP).
    Header,
    /// The request path.
    Path,
}

/// Where counters live.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// In this process.
    #[default]
    Local,
    /// Kong's database cluster (not supported).
    Cluster,
    /// A Redis server shared by replicas (not supported yet).
    Redis,
}

/// rate-limiting's config (Kong's fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitingConfig {
    /// Requests per second.
    #[serde(default)]
    pub second: Option<u64>,
    /// Requests per minute.
    #[serde(default)]
    pub minute: Option<u64>,
    /// Requests per hour.
    #[serde(default)]
    pub hour: Option<u64>,
    /// Requests per day.
    #[serde(default)]
    pub day: Option<u64>,
    /// Requests per calendar month (UTC).
    #[serde(default)]
    pub month: Option<u64>,
    /// Requests per calendar year (UTC).
    #[serde(default)]
    pub year: Option<u64>,
    /// What is counted together.
    #[serde(default)]
    pub limit_by: LimitBy,
    /// The header for `limit_by: header`.
    #[serde(default)]
    pub header_name: Option<String>,
    /// Kong's field for `limit_by: path`; requests are counted per request path.
    #[serde(default)]
    pub path: Option<String>,
    /// Where counters live (only `local` is supported).
    #[serde(default)]
    pub policy: Policy,
    /// Proxy when the counter store fails (only meaningful for shared policies).
    #[serde(default = "yes")]
    pub fault_tolerant: bool,
    /// Do not send the rate-limit headers.
    #[serde(default)]
    pub hide_client_headers: bool,
    /// Status of a refusal (default 429).
    #[serde(default = "default_error_code")]
    pub error_code: u16,
    /// Message of a refusal.
    #[serde(default = "default_error_message")]
    pub error_message: String,
    /// Kong's sync setting for shared policies; accepted and ignored by `local`.
    #[serde(default)]
    pub sync_rate: Option<f64>,
    /// Kong's Redis settings; refused until the Redis policy exists.
    #[serde(default)]
    pub redis: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}
fn default_error_code() -> u16 {
    429
}
fn default_error_message() -> String {
    "API rate limit exceeded".to_string()
}

/// A window length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Second,
    Minute,
    Hour,
    Day,
    Month,
    Year,
}

impl Period {
    const ALL: [Period; 6] = [Period::Second, Period::Minute, Period::Hour, Period::Day, Period::Month, Period::Year];

    fn name(self) -> &'static str {
        match self {
            Period::Second => "Second",
            Period::Minute => "Minute",
            Period::Hour => "Hour",
            Period::Day => "Day",
            Period::Month => "Month",
            Period::Year => "Year",
        }
    }

    /// (start, end) of the window holding `now`, in Unix seconds (UTC calendar for month/year).
    fn window(self, now: u64) -> (u64, u64) {
        let fixed = |len: u64| (now - now % len, now - now % len + len);
        match self {
            Period::Second => fixed(1),
            Period::Minute => fixed(60),
            Period::Hour => fixed(3600),
            Period::Day => fixed(86_400),
            Period::Month => {
                let (y, m, _) = civil_from_days((now / 86_400) as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1) as u64 * 86_400, days_from_civil(ny, nm, 1) as u64 * 86_400)
            }
            Period::Year => {
                let (y, _, _) = civil_from_days((now / 86_400) as i64);
                (days_from_civil(y, 1, 1) as u64 * 86_400, days_from_civil(y + 1, 1, 1) as u64 * 86_400)
            }
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One counter: the window start (high 32 bits, Unix seconds) and the count (low 32 bits).
struct Counter(AtomicU64);

impl Counter {
    /// Takes one unit in the window starting at `start` unless `limit` is reached; returns
    /// the count after taking it, or `None` when refused.
    fn take(&self, start: u32, limit: u32) -> Option<u32> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let count = if (cur >> 32) as u32 == start { cur as u32 } else { 0 };
            if count >= limit {
                return None;
            }
            let next = (u64::from(start) << 32) | u64::from(count + 1);
            match self.0.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(count + 1),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Gives back a unit taken in the window starting at `start` (if that window is current).
    fn give_back(&self, start: u32) {
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            ((cur >> 32) as u32 == start && cur as u32 > 0).then(|| cur - 1)
        });
    }

    fn window_start(&self) -> u32 {
        (self.0.load(Ordering::Relaxed) >> 32) as u32
    }
}

const SHARDS: usize = 32;

/// Counters by key, sharded so that finding a counter rarely contends; the count itself is
/// a lock-free atomic.
struct Store {
    shards: Vec<RwLock<HashMap<String, Arc<[Counter]>>>>,
}

impl Store {
    fn new() -> Self {
        Store { shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect() }
    }

    /// The counters (one per configured period) of `key`, created on first use.
    fn counters(&self, key: String, periods: usize, is_stale: impl Fn(&[Counter]) -> bool) -> Arc<[Counter]> {
        use std::hash::{BuildHasher, Hasher};
        let mut h =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
        h.write(key.as_bytes());
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
        if let Some(c) = shard.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return c.clone();
        }
        let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
        // Keep memory bounded: when a shard grows, drop keys whose windows are all over.
        if map.len() >= 4096 && map.len().is_power_of_two() {
            map.retain(|_, c| !is_stale(c));
        }
        map.entry(key).or_insert_with(|| (0..periods).map(|_| Counter(AtomicU64::new(0))).collect()).clone()
    }
}

/// One configured limit.
struct Limit {
    period: Period,
    limit: u32,
    limit_header: HeaderName,
    remaining_header: HeaderName,
    limit_value: HeaderValue,
}

/// What the response hook needs to write the headers.
#[derive(Clone)]
struct Usage {
    /// (limit index, remaining) per configured period.
    remaining: Vec<(usize, u32)>,
    reset: u64,
}

/// The rate-limiting plugin.
pub struct RateLimiting {
    limits: Vec<Limit>,
    limit_by: LimitBy,
    header_name: Option<HeaderName>,
    hide_headers: bool,
    error_code: StatusCode,
    error_message: String,
    store: Store,
}

/// The factory to register.
pub fn factory() -> TypedFactory<
    RateLimitingConfig,
    impl Fn(RateLimitingConfig, &BuildContext<'_>) -> Result<RateLimiting, String> + Send + Sync,
> {
    typed_factory("rate-limiting", PRIORITY, |c: RateLimitingConfig, _: &BuildContext<'_>| RateLimiting::new(c))
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

impl RateLimiting {
    /// Builds the plugin from its config.
    pub fn new(c: RateLimitingConfig) -> Result<Self, String> {
        match c.policy {
            Policy::Local => {}
            Policy::Cluster => return Err("policy `cluster` needs Kong's database; use `local`".into()),
            Policy::Redis => return Err("policy `redis` is not supported yet; use `local`".into()),
        }
        if c.redis.is_some() {
            return Err("`redis` settings need policy `redis`, which is not supported yet".into());
        }
        let _ = (c.fault_tolerant, c.sync_rate, &c.path);
        let values = [c.second, c.minute, c.hour, c.day, c.month, c.year];
        let mut limits = Vec::new();
        for (period, value) in Period::ALL.into_iter().zip(values) {
            let Some(v) = value else { continue };
            let limit = u32::try_from(v).map_err(|_| format!("`{}` is too large", period.name().to_lowercase()))?;
            let name = period.name();
            limits.push(Limit {
                period,
                limit,
                limit_header: HeaderName::from_bytes(
                    format!("x-ratelimit-limit-{name}").to_ascii_lowercase().as_bytes(),
                )
                .map_err(|e| e.to_string())?,
                remaining_header: HeaderName::from_bytes(
                    format!("x-ratelimit-remaining-{name}").to_ascii_lowercase().as_bytes(),
                )
                .map_err(|e| e.to_string())?,
                limit_value: HeaderValue::from(limit),
            });
        }
        if limits.is_empty() {
            return Err("set at least one of `second`, `minute`, `hour`, `day`, `month`, `year`".into());
        }
        // Kong requires each longer period to allow at least as much as a shorter one.
        for pair in limits.windows(2) {
            if pair[1].limit < pair[0].limit {
                return Err(format!(
                    "the limit per {} ({}) is lower than the limit per {} ({})",
                    pair[1].period.name().to_lowercase(),
                    pair[1].limit,
                    pair[0].period.name().to_lowercase(),
                    pair[0].limit
                ));
            }
        }
        let header_name = match (c.limit_by, &c.header_name) {
            (LimitBy::Header, None) => return Err("`limit_by: header` needs `header_name`".into()),
            (LimitBy::Header, Some(h)) => Some(
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("`header_name` `{h}` is not a header name"))?,
            ),
            _ => None,
        };
        let error_code =
            StatusCode::from_u16(c.error_code).map_err(|_| format!("`error_code` {} is not a status", c.error_code))?;
        Ok(RateLimiting {
            limits,
            limit_by: c.limit_by,
            header_name,
            hide_headers: c.hide_client_headers,
            error_code,
            error_message: c.error_message,
            store: Store::new(),
        })
    }

    /// The counting key: the route, then what `limit_by` counts by, in one string.
    fn key(&self, ctx: &RequestContext, req: &Request<ProxyBody>) -> String {
        use std::fmt::Write;
        let mut k = String::with_capacity(64);
        k.push_str(&ctx.route);
        k.push('|');
        let ip = |k: &mut String| {
            let _ = write!(k, "ip:{}", ctx.client_addr().ip().to_canonical());
        };
        match self.limit_by {
            LimitBy::Consumer => match (&ctx.consumer, &ctx.credential) {
                (Some(c), _) => {
                    k.push_str("consumer:");
                    k.push_str(&c.id);
                }
                (None, Some(cred)) => {
                    k.push_str("credential:");
                    k.push_str(cred);
                }
                (None, None) => ip(&mut k),
            },
            LimitBy::Credential => match &ctx.credential {
                Some(c) => {
                    k.push_str("credential:");
                    k.push_str(c);
                }
                None => ip(&mut k),
            },
            LimitBy::Ip => ip(&mut k),
            LimitBy::Service => {
                k.push_str("service:");
                k.push_str(ctx.service.as_deref().unwrap_or(""));
            }
            LimitBy::Header => {
                match self.header_name.as_ref().and_then(|h| req.headers().get(h)).and_then(|v| v.to_str().ok()) {
                    Some(v) => {
                        k.push_str("header:");
                        k.push_str(v);
                    }
                    None => ip(&mut k),
                }
            }
            LimitBy::Path => {
                k.push_str("path:");
                k.push_str(req.uri().path());
            }
        }
        k
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Plugin for RateLimiting {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        let now = now_secs();
        // At most six periods: fixed arrays, no allocation.
        let mut starts = [0u32; 6];
        for (s, l) in starts.iter_mut().zip(&self.limits) {
            *s = l.period.window(now).0 as u32;
        }
        let counters = self.store.counters(self.key(ctx, req), self.limits.len(), |c| {
            c.iter().zip(&starts).all(|(c, start)| c.window_start() < *start)
        });
        let mut taken = [(0usize, 0u32); 6];
        let mut n_taken = 0;
        let mut remaining = Vec::with_capacity(self.limits.len());
        let mut refused_reset = None;
        let mut reset = u64::MAX;
        let mut tightest = u32::MAX;
        for (i, limit) in self.limits.iter().enumerate() {
            let (start, end) = limit.period.window(now);
            let counter = &counters[i];
            match counter.take(start as u32, limit.limit) {
                Some(count) => {
                    let left = limit.limit - count;
                    remaining.push((i, left));
                    if left < tightest || (left == tightest && end - now < reset) {
                        tightest = left;
                        reset = end - now;
                    }
                    taken[n_taken] = (i, start as u32);
                    n_taken += 1;
                }
                None => {
                    refused_reset = Some(end - now);
                    remaining.push((i, 0));
                    break;
                }
            }
        }
        if let Some(retry_after) = refused_reset {
            for (i, start) in &taken[..n_taken] {
                counters[*i].give_back(*start);
            }
            let mut answer = ctx.error(self.error_code, &self.error_message);
            if !self.hide_headers {
                let usage = Usage {
                    remaining: self.limits.iter().enumerate().map(|(i, _)| (i, 0)).collect(),
                    reset: retry_after,
                };
                self.write_headers(answer.headers_mut(), &usage);
            }
            answer.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
            return ControlFlow::Break(answer);
        }
        if !self.hide_headers {
            ctx.extensions.insert(Usage { remaining, reset });
        }
        ControlFlow::Continue(())
    }

    fn response(&self, ctx: &mut RequestContext, resp: &mut Response<ResponseBody>) {
        if let Some(usage) = ctx.extensions.remove::<Usage>() {
            self.write_headers(resp.headers_mut(), &usage);
        }
    }
}

impl RateLimiting {
    fn write_headers(&self, h: &mut http::HeaderMap, usage: &Usage) {
        let mut tightest: Option<(u32, u32)> = None;
        for &(i, left) in &usage.remaining {
            let limit = &self.limits[i];
            h.insert(limit.limit_header.clone(), limit.limit_value.clone());
            h.insert(limit.remaining_header.clone(), HeaderValue::from(left));
            if tightest.is_none_or(|(_, l)| left < l) {
                tightest = Some((limit.limit, left));
            }
        }
        if let Some((limit, left)) = tightest {
            h.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(limit));
            h.insert(RATELIMIT_REMAINING.clone(), HeaderValue::from(left));
            h.insert(RATELIMIT_RESET.clone(), HeaderValue::from(usage.reset.max(1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_windows() {
        // 2026-11-22T16:35:24Z
        let now = 1_795_365_324;
        assert_eq!(Period::Minute.window(now), (1_795_365_300, 1_795_365_360));
        let (start, end) = Period::Month.window(now);
        assert_eq!(civil_from_days(start as i64 / 86_400), (2026, 11, 1));
        assert_eq!(civil_from_days(end as i64 / 86_400), (2026, 12, 1));
        let (start, end) = Period::Year.window(now);
        assert_eq!(civil_from_days(start as i64 / 86_400), (2026, 1, 1));
        assert_eq!(civil_from_days(end as i64 / 86_400), (2027, 1, 1));
        for days in [-1000, 0, 59, 365, 10_957, 20_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn a_counter_never_passes_its_limit_under_contention() {
        let c = Arc::new(Counter(AtomicU64::new(0)));
        let passed = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (c, passed) = (c.clone(), passed.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if c.take(7, 500).is_some() {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(passed.load(Ordering::Relaxed), 500);
        assert_eq!(c.take(8, 500), Some(1), "a new window starts from zero");
    }
}
