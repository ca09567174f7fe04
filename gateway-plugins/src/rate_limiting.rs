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
//! `policy: local` counts per gateway process. `policy: redis` counts in a Redis server
//! shared by every replica: one Lua script checks every period and takes a unit in all of
//! them atomically, so several gateways enforce one exact limit. When Redis fails,
//! `fault_tolerant: true` (the default) proxies the request uncounted and logs it;
//! `fault_tolerant: false` answers 500.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::plugin::{Answer, BoxFuture, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use gateway_core::proxy::decimal_value;
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
    /// For `limit_by: path`: requests to this (normalised) path share one budget; requests to
    /// other paths are counted by client IP (Kong's rule).
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
    /// Redis settings for `policy: redis`.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Kong's older flat Redis field.
    #[serde(default)]
    pub redis_host: Option<String>,
    /// Kong's older flat Redis field.
    #[serde(default)]
    pub redis_port: Option<u16>,
    /// Kong's older flat Redis field.
    #[serde(default)]
    pub redis_username: Option<String>,
    /// Kong's older flat Redis field.
    #[serde(default)]
    pub redis_password: Option<String>,
    /// Kong's older flat Redis field.
    #[serde(default)]
    pub redis_database: Option<i64>,
    /// Kong's older flat Redis field.
    #[serde(default)]
    pub redis_timeout: Option<u64>,
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
            let stored = (cur >> 32) as u32;
            // A request that computed its window just before a boundary must not drag the
            // counter back from a newer window (that would forget the newer window's count).
            let (window, count) = match stored.cmp(&start) {
                std::cmp::Ordering::Less => (start, 0),
                _ => (stored, cur as u32),
            };
            if count >= limit {
                return None;
            }
            let next = (u64::from(window) << 32) | u64::from(count + 1);
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
    /// The key is copied only when it is new.
    fn counters(&self, key: &str, periods: usize, is_stale: impl Fn(&[Counter]) -> bool) -> Arc<[Counter]> {
        use std::hash::{BuildHasher, Hasher};
        let mut h =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
        h.write(key.as_bytes());
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
        if let Some(c) = shard.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            return c.clone();
        }
        let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
        // Keep memory bounded: when a shard grows, drop keys whose windows are all over.
        if map.len() >= 4096 && map.len().is_power_of_two() {
            map.retain(|_, c| !is_stale(c));
        }
        map.entry(key.to_owned()).or_insert_with(|| (0..periods).map(|_| Counter(AtomicU64::new(0))).collect()).clone()
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
#[derive(Clone, Copy)]
struct Usage {
    /// What is left in each configured period, in the order of `limits` (at most six): a
    /// fixed array, so that counting allocates nothing.
    remaining: [u32; 6],
    /// Seconds to the reset of the tightest period.
    reset: u64,
}

/// The rate-limiting plugin.
pub struct RateLimiting {
    limits: Vec<Limit>,
    limit_by: LimitBy,
    header_name: Option<HeaderName>,
    path: Option<String>,
    hide_headers: bool,
    error_code: StatusCode,
    error_message: String,
    store: Store,
    redis: Option<RedisPolicy>,
}

/// The factory to register.
pub fn factory() -> TypedFactory<
    RateLimitingConfig,
    impl Fn(RateLimitingConfig, &BuildContext<'_>) -> Result<RateLimiting, String> + Send + Sync,
> {
    typed_factory("rate-limiting", PRIORITY, |c: RateLimitingConfig, build: &BuildContext<'_>| {
        RateLimiting::new(c, build.instance())
    })
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

impl RateLimiting {
    /// Builds the plugin from its config.
    pub fn new(c: RateLimitingConfig, instance: &str) -> Result<Self, String> {
        let redis = match c.policy {
            Policy::Local => None,
            Policy::Cluster => return Err("policy `cluster` needs Kong's database; use `local` or `redis`".into()),
            Policy::Redis => {
                let mut rc = c.redis.clone().unwrap_or_default();
                // Kong's older flat fields.
                rc.host = rc.host.or(c.redis_host.clone());
                rc.port = rc.port.or(c.redis_port);
                rc.username = rc.username.or(c.redis_username.clone());
                rc.password = rc.password.or(c.redis_password.clone());
                rc.database = rc.database.or(c.redis_database);
                rc.timeout = rc.timeout.or(c.redis_timeout);
                Some(RedisPolicy::new(&rc, c.fault_tolerant, instance)?)
            }
        };
        let _ = c.sync_rate;
        if c.limit_by == LimitBy::Path && c.path.is_none() {
            return Err("`limit_by: path` needs `path`".into());
        }
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
            path: c.path.clone(),
            hide_headers: c.hide_client_headers,
            error_code,
            error_message: c.error_message,
            store: Store::new(),
            redis,
        })
    }

    /// The counting key: what `limit_by` counts by, in one string.
    fn key(&self, ctx: &RequestContext, req: &Request<ProxyBody>) -> String {
        let mut k = String::with_capacity(64);
        self.write_key(&mut k, ctx, req);
        k
    }

    /// Appends the counting key ([`RateLimiting::key`]) to `k`.
    fn write_key(&self, k: &mut String, ctx: &RequestContext, req: &Request<ProxyBody>) {
        use std::fmt::Write;
        // One budget per plugin instance (Kong keys counters on the instance's own scope): a
        // global limit is shared by every route it covers, not multiplied by them. The counter
        // store is per instance; Redis keys carry the instance's config location.
        let _ = &ctx.route;
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
                (None, None) => ip(k),
            },
            LimitBy::Credential => match &ctx.credential {
                Some(c) => {
                    k.push_str("credential:");
                    k.push_str(c);
                }
                None => ip(k),
            },
            LimitBy::Ip => ip(k),
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
                    None => ip(k),
                }
            }
            // Kong's rule: requests to `path` share one budget; any other path counts by IP.
            LimitBy::Path => match &self.path {
                Some(p) if req.uri().path() == p => {
                    k.push_str("path:");
                    k.push_str(p);
                }
                _ => ip(k),
            },
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What counting decided.
enum Outcome {
    /// Allowed: what is left per period, and seconds to the tightest reset.
    Allowed(Usage),
    /// Refused: seconds until the refusing window resets.
    Refused(u64),
}

impl RateLimiting {
    fn take_local(&self, key: &str, now: u64) -> Outcome {
        // At most six periods: fixed arrays, no allocation.
        let mut starts = [0u32; 6];
        for (s, l) in starts.iter_mut().zip(&self.limits) {
            *s = l.period.window(now).0 as u32;
        }
        let counters = self
            .store
            .counters(key, self.limits.len(), |c| c.iter().zip(&starts).all(|(c, start)| c.window_start() < *start));
        let mut taken = [(0usize, 0u32); 6];
        let mut n_taken = 0;
        let mut counts = [0u32; 6];
        for (i, limit) in self.limits.iter().enumerate() {
            let (start, end) = limit.period.window(now);
            match counters[i].take(start as u32, limit.limit) {
                Some(count) => {
                    counts[i] = count;
                    taken[n_taken] = (i, start as u32);
                    n_taken += 1;
                }
                None => {
                    for (i, start) in &taken[..n_taken] {
                        counters[*i].give_back(*start);
                    }
                    return Outcome::Refused(end - now);
                }
            }
        }
        self.allowed(&counts[..self.limits.len()], now)
    }

    /// Remaining per period and the reset of the tightest one, from the counts after this request.
    fn allowed(&self, counts: &[u32], now: u64) -> Outcome {
        let mut remaining = [0; 6];
        let (mut tightest, mut reset) = (u32::MAX, u64::MAX);
        for ((limit, count), slot) in self.limits.iter().zip(counts).zip(&mut remaining) {
            let left = limit.limit.saturating_sub(*count);
            let end = limit.period.window(now).1;
            *slot = left;
            if left < tightest || (left == tightest && end - now < reset) {
                tightest = left;
                reset = end - now;
            }
        }
        Outcome::Allowed(Usage { remaining, reset })
    }

    fn finish(&self, ctx: &mut RequestContext, outcome: Outcome) -> ControlFlow<Answer> {
        match outcome {
            Outcome::Refused(retry_after) => {
                let mut answer = ctx.error(self.error_code, &self.error_message);
                if !self.hide_headers {
                    self.write_headers(answer.headers_mut(), &Usage { remaining: [0; 6], reset: retry_after });
                }
                answer.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
                ControlFlow::Break(answer)
            }
            Outcome::Allowed(usage) => {
                if !self.hide_headers {
                    ctx.extensions.insert(usage);
                }
                ControlFlow::Continue(())
            }
        }
    }
}

impl Plugin for RateLimiting {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        // The key is built in a buffer kept for the thread: the store copies it only when new.
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let outcome = KEY.with_borrow_mut(|k| {
            k.clear();
            self.write_key(k, ctx, req);
            self.take_local(k, now_secs())
        });
        self.finish(ctx, outcome)
    }

    fn is_async(&self) -> bool {
        self.redis.is_some()
    }

    fn access_async<'a>(
        &'a self,
        ctx: &'a mut RequestContext,
        req: &'a mut Request<ProxyBody>,
    ) -> BoxFuture<'a, ControlFlow<Answer>> {
        Box::pin(async move {
            let Some(redis) = &self.redis else { return self.access(ctx, req) };
            let now = now_secs();
            let key = self.key(ctx, req);
            match redis.take(&self.limits, &key, now).await {
                Ok(Ok(counts)) => {
                    let outcome = self.allowed(&counts, now);
                    self.finish(ctx, outcome)
                }
                Ok(Err(refused_at)) => {
                    let end = self.limits[refused_at].period.window(now).1;
                    self.finish(ctx, Outcome::Refused(end - now))
                }
                Err(e) if redis.fault_tolerant => {
                    tracing::warn!(route = &*ctx.route, error = %e, "rate-limiting: Redis failed; proxying without counting (fault_tolerant)");
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    tracing::error!(route = &*ctx.route, error = %e, "rate-limiting: Redis failed; refusing (fault_tolerant is false)");
                    ControlFlow::Break(ctx.error(StatusCode::INTERNAL_SERVER_ERROR, "An unexpected error occurred"))
                }
            }
        })
    }

    fn response(&self, ctx: &mut RequestContext, resp: &mut Response<ResponseBody>) {
        if let Some(usage) = ctx.extensions.remove::<Usage>() {
            self.write_headers(resp.headers_mut(), &usage);
        }
    }
}

/// Takes a unit in every period or none, atomically, in Redis: a request is refused as soon
/// as one period is at its limit, so all gateways sharing the server enforce one exact limit.
/// KEYS: one per period; ARGV: the limits, then the TTLs. Returns `{1, counts...}` or
/// `{0, index of the refusing period}`.
const TAKE_SCRIPT: &str = r"
local n = #KEYS
for i = 1, n do
  local c = tonumber(redis.call('GET', KEYS[i]) or '0')
  if c >= tonumber(ARGV[i]) then return {0, i} end
end
local out = {1}
for i = 1, n do
  local c = redis.call('INCR', KEYS[i])
  if c == 1 then redis.call('EXPIRE', KEYS[i], ARGV[n + i]) end
  out[#out + 1] = c
end
return out
";

/// Kong's `redis` settings (the supported subset).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Host (required for `policy: redis`).
    #[serde(default)]
    pub host: Option<String>,
    /// Port (default 6379).
    #[serde(default)]
    pub port: Option<u16>,
    /// ACL user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// Database number (default 0).
    #[serde(default)]
    pub database: Option<i64>,
    /// Timeout of each Redis operation, ms (default 2000).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Connect timeout, ms (default: `timeout`).
    #[serde(default)]
    pub connect_timeout: Option<u64>,
    /// Kong's send timeout; accepted (one timeout bounds the whole call).
    #[serde(default)]
    pub send_timeout: Option<u64>,
    /// Kong's read timeout; accepted (one timeout bounds the whole call).
    #[serde(default)]
    pub read_timeout: Option<u64>,
    /// TLS to Redis (not supported yet: only `false`).
    #[serde(default)]
    pub ssl: bool,
    /// Kong's field; accepted.
    #[serde(default)]
    pub ssl_verify: bool,
    /// Kong's field; accepted.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Kong's pool settings; accepted (one multiplexed connection is used).
    #[serde(default)]
    pub keepalive_pool_size: Option<u64>,
    /// Kong's pool settings; accepted.
    #[serde(default)]
    pub keepalive_backlog: Option<u64>,
}

/// The Redis policy: one multiplexed, self-reconnecting connection, made on first use.
struct RedisPolicy {
    /// Where the instance is in the config, so instances with different limits never share keys.
    instance: String,
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    script: redis::Script,
    timeout: std::time::Duration,
    fault_tolerant: bool,
}

impl RedisPolicy {
    fn new(c: &RedisConfig, fault_tolerant: bool, instance: &str) -> Result<Self, String> {
        if c.ssl {
            return Err("`redis.ssl` is not supported yet".into());
        }
        let _ =
            (c.ssl_verify, &c.server_name, c.keepalive_pool_size, c.keepalive_backlog, c.send_timeout, c.read_timeout);
        let host = c.host.clone().ok_or("policy `redis` needs `redis.host`")?;
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(host, c.port.unwrap_or(6379)),
            redis: redis::RedisConnectionInfo {
                db: c.database.unwrap_or(0),
                username: c.username.clone(),
                password: c.password.clone(),
                ..Default::default()
            },
        };
        let client = redis::Client::open(info).map_err(|e| format!("redis: {e}"))?;
        let timeout = std::time::Duration::from_millis(c.timeout.unwrap_or(2000).max(1));
        Ok(RedisPolicy {
            instance: instance.to_string(),
            client,
            conn: tokio::sync::OnceCell::new(),
            script: redis::Script::new(TAKE_SCRIPT),
            timeout,
            fault_tolerant,
        })
    }

    /// `Ok(Ok(counts))` when allowed, `Ok(Err(period index))` when refused, `Err` when Redis failed.
    async fn take(&self, limits: &[Limit], key: &str, now: u64) -> Result<Result<Vec<u32>, usize>, String> {
        let call = async {
            let conn = self
                .conn
                .get_or_try_init(|| {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(self.timeout)
                        .set_response_timeout(self.timeout)
                        .set_number_of_retries(1);
                    redis::aio::ConnectionManager::new_with_config(self.client.clone(), config)
                })
                .await?;
            let mut invocation = self.script.prepare_invoke();
            for l in limits {
                let (start, _) = l.period.window(now);
                invocation.key(format!("ratelimit:{}:{key}:{}:{start}", self.instance, l.period.name()));
            }
            for l in limits {
                invocation.arg(l.limit);
            }
            for l in limits {
                let (_, end) = l.period.window(now);
                invocation.arg(end - now + 1);
            }
            let reply: Vec<i64> = invocation.invoke_async(&mut conn.clone()).await?;
            Ok::<_, redis::RedisError>(reply)
        };
        let reply = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        match reply.as_slice() {
            [1, counts @ ..] if counts.len() == limits.len() => Ok(Ok(counts.iter().map(|c| *c as u32).collect())),
            [0, i] if *i >= 1 && (*i as usize) <= limits.len() => Ok(Err(*i as usize - 1)),
            other => Err(format!("unexpected script reply {other:?}")),
        }
    }
}

impl RateLimiting {
    fn write_headers(&self, h: &mut http::HeaderMap, usage: &Usage) {
        // Values cut from the gateway's per-request buffer, and shared between the two headers
        // that carry the same number: `HeaderValue::from(u32)` allocates each one.
        let mut tightest: Option<(&Limit, u32, HeaderValue)> = None;
        for (limit, &left) in self.limits.iter().zip(&usage.remaining) {
            let value = decimal_value(u64::from(left));
            h.insert(limit.limit_header.clone(), limit.limit_value.clone());
            h.insert(limit.remaining_header.clone(), value.clone());
            if tightest.as_ref().is_none_or(|(_, l, _)| left < *l) {
                tightest = Some((limit, left, value));
            }
        }
        if let Some((limit, _, left)) = tightest {
            h.insert(RATELIMIT_LIMIT.clone(), limit.limit_value.clone());
            h.insert(RATELIMIT_REMAINING.clone(), left);
            h.insert(RATELIMIT_RESET.clone(), decimal_value(usage.reset.max(1)));
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
