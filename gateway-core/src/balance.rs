//! Load balancing over an upstream's targets, and the targets' health.
//!
//! Algorithms (Kong's upstream `algorithm`): weighted round-robin (a precomputed smooth
//! schedule), least-connections (fewest requests in flight relative to weight),
//! consistent-hashing (a hash ring of virtual nodes, so that a key keeps its target while the
//! target set is unchanged, and only the keys of a removed target move), and latency (peak
//! EWMA of response time, times requests in flight, the better of two random picks).
//!
//! Hand-written rather than `tower::balance`: that crate balances over a set of `Service`s
//! it drives to readiness, while here every target of a service shares one pooled client,
//! targets are filtered per request (health, circuit breakers, the target that just failed)
//! and the choice must be a cheap function of a few atomics.
//!
//! Health: every target has a state that survives reloads while its upstream keeps it. Passive
//! checks count outcomes of proxied requests; active checks probe targets on an interval (a
//! task per upstream that ends when no snapshot uses the upstream any more). Unhealthy targets
//! leave rotation; when none is left the answer is 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, StatusCode};

use crate::config::{ActiveHealthcheck, Algorithm, HashOn, Healthchecks, PassiveHealthcheck};

/// The health and load of one target; shared by every snapshot that keeps the target.
#[derive(Debug)]
pub(crate) struct TargetState {
    healthy: AtomicBool,
    inflight: AtomicU32,
    /// Peak EWMA of the time to the response head, in microseconds (`f64` bits).
    ewma_us: AtomicU64,
    /// When `ewma_us` was last updated, in microseconds since [`epoch`].
    ewma_at: AtomicU64,
    successes: AtomicU32,
    http_failures: AtomicU32,
    tcp_failures: AtomicU32,
    timeouts: AtomicU32,
    /// Why the target is unhealthy: one of the `REASON_*`.
    reason: AtomicU8,
    /// The last failing status, for `REASON_HTTP`.
    last_status: AtomicU16,
}

const REASON_NONE: u8 = 0;
const REASON_HTTP: u8 = 1;
const REASON_TCP: u8 = 2;
const REASON_TIMEOUT: u8 = 3;

impl Default for TargetState {
    fn default() -> Self {
        TargetState {
            healthy: AtomicBool::new(true),
            inflight: AtomicU32::new(0),
            ewma_us: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
            successes: AtomicU32::new(0),
            http_failures: AtomicU32::new(0),
            tcp_failures: AtomicU32::new(0),
            timeouts: AtomicU32::new(0),
            reason: AtomicU8::new(REASON_NONE),
            last_status: AtomicU16::new(0),
        }
    }
}

/// What one request or probe showed about a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    HttpFailure(u16),
    TcpFailure,
    Timeout,
}

/// Counts in a row that flip a target (0: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Thresholds {
    successes: u32,
    http_failures: u32,
    tcp_failures: u32,
    timeouts: u32,
}

impl TargetState {
    /// Whether the target is in rotation.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Why the target is out of rotation, for operators; `None` when healthy.
    pub(crate) fn reason(&self) -> Option<String> {
        if self.is_healthy() {
            return None;
        }
        Some(match self.reason.load(Ordering::Relaxed) {
            REASON_HTTP => format!("HTTP status {}", self.last_status.load(Ordering::Relaxed)),
            REASON_TCP => "connection failures".to_string(),
            REASON_TIMEOUT => "timeouts".to_string(),
            _ => "unhealthy".to_string(),
        })
    }

    fn record(&self, outcome: Outcome, t: &Thresholds, label: &str, source: &'static str) {
        let bump = |c: &AtomicU32| c.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let (count, threshold, reason) = match outcome {
            Outcome::Success => {
                self.http_failures.store(0, Ordering::Relaxed);
                self.tcp_failures.store(0, Ordering::Relaxed);
                self.timeouts.store(0, Ordering::Relaxed);
                let n = bump(&self.successes);
                if !self.is_healthy() && t.successes > 0 && n >= t.successes {
                    self.healthy.store(true, Ordering::Relaxed);
                    self.reason.store(REASON_NONE, Ordering::Relaxed);
                    tracing::info!(target: "gateway::health", upstream_target = label, source, "target is healthy again");
                }
                return;
            }
            Outcome::HttpFailure(status) => {
                self.last_status.store(status, Ordering::Relaxed);
                (bump(&self.http_failures), t.http_failures, REASON_HTTP)
            }
            Outcome::TcpFailure => (bump(&self.tcp_failures), t.tcp_failures, REASON_TCP),
            Outcome::Timeout => (bump(&self.timeouts), t.timeouts, REASON_TIMEOUT),
        };
        self.successes.store(0, Ordering::Relaxed);
        if self.is_healthy() && threshold > 0 && count >= threshold {
            self.reason.store(reason, Ordering::Relaxed);
            self.healthy.store(false, Ordering::Relaxed);
            tracing::warn!(
                target: "gateway::health",
                upstream_target = label,
                source,
                reason = self.reason().unwrap_or_default(),
                "target is unhealthy: out of rotation"
            );
        }
    }

    fn cost(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        // An untried target looks fast, so that it gets tried.
        (ewma.max(1.0)) * f64::from(self.inflight.load(Ordering::Relaxed) + 1)
    }

    fn observe_latency(&self, rtt: Duration) {
        const DECAY_US: f64 = 10_000_000.0;
        let now = epoch().elapsed().as_micros() as u64;
        let rtt = rtt.as_micros() as f64;
        let prev = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.ewma_at.swap(now, Ordering::Relaxed)) as f64;
        let next = if rtt > prev {
            rtt // the peak: react to a slowdown at once
        } else {
            let w = (-elapsed / DECAY_US).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_us.store(next.to_bits(), Ordering::Relaxed);
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One upstream address, with its header values computed once and its shared state.
#[derive(Debug)]
pub(crate) struct TargetRuntime {
    pub(crate) authority: Authority,
    pub(crate) host_header: HeaderValue,
    pub(crate) label: Arc<str>,
    pub(crate) state: Arc<TargetState>,
    /// The DNS entry of a target given by host name (not for IP addresses).
    pub(crate) dns: Option<Arc<crate::dns::DnsEntry>>,
    /// How requests reach it: its connection pool (HTTP/1.1), or the shared HTTP/2 client.
    pub(crate) client: crate::proxy::client::TargetClient,
}

/// How a request's hash key is found (consistent hashing).
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    None,
    Consumer,
    Ip,
    Header(HeaderName),
    Cookie { name: Box<str>, path: Box<str> },
    Path,
    QueryArg(Box<str>),
    UriCapture(Box<str>),
}

impl KeySource {
    fn new(
        on: HashOn,
        header: Option<&str>,
        cookie: Option<(&str, &str)>,
        arg: Option<&str>,
        capture: Option<&str>,
    ) -> Result<Self, String> {
        Ok(match on {
            HashOn::None => KeySource::None,
            HashOn::Consumer => KeySource::Consumer,
            HashOn::Ip => KeySource::Ip,
            HashOn::Path => KeySource::Path,
            HashOn::Header => {
                let h = header.ok_or("needs the header to hash on")?;
                KeySource::Header(
                    HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("`{h}` is not a header name"))?,
                )
            }
            HashOn::Cookie => {
                let (name, path) = cookie.ok_or("needs `hash_on_cookie`")?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    return Err(format!("`{name}` is not a cookie name"));
                }
                KeySource::Cookie { name: name.into(), path: path.into() }
            }
            HashOn::QueryArg => KeySource::QueryArg(arg.ok_or("needs the query argument to hash on")?.into()),
            HashOn::UriCapture => KeySource::UriCapture(capture.ok_or("needs the capture to hash on")?.into()),
        })
    }
}

/// What a request offers for its hash key.
pub(crate) struct KeyInput<'a> {
    pub(crate) consumer: Option<&'a str>,
    pub(crate) client_ip: &'a HeaderValue,
    pub(crate) headers: &'a http::HeaderMap,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) capture: &'a dyn Fn(&str) -> Option<String>,
}

/// The hash key chosen for a request, in its extensions on the way to the balancer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BalanceKey(pub(crate) u64);

/// Consistent hashing's key rules.
#[derive(Debug, Clone)]
pub(crate) struct HashSpec {
    on: KeySource,
    fallback: KeySource,
}

impl HashSpec {
    /// The request's key, and a `Set-Cookie` value when `hash_on: cookie` made one up.
    pub(crate) fn key(&self, input: &KeyInput<'_>) -> (Option<u64>, Option<HeaderValue>) {
        if let Some(k) = key_of(&self.on, input) {
            return (Some(k), None);
        }
        if let KeySource::Cookie { name, path } = &self.on {
            let value = format!("{:016x}", crate::proxy::random_u64());
            let cookie = HeaderValue::from_str(&format!("{name}={value}; Path={path}")).ok();
            return (Some(fnv1a(value.as_bytes())), cookie);
        }
        (key_of(&self.fallback, input), None)
    }
}

fn key_of(source: &KeySource, input: &KeyInput<'_>) -> Option<u64> {
    match source {
        KeySource::None => None,
        KeySource::Consumer => input.consumer.map(|c| fnv1a(c.as_bytes())),
        KeySource::Ip => Some(fnv1a(input.client_ip.as_bytes())),
        KeySource::Header(h) => {
            let mut values = input.headers.get_all(h).iter().peekable();
            values.peek()?;
            let mut hash = FNV_OFFSET;
            for (i, v) in values.enumerate() {
                if i > 0 {
                    hash = fnv1a_more(hash, b",");
                }
                hash = fnv1a_more(hash, v.as_bytes());
            }
            Some(hash)
        }
        KeySource::Cookie { name, .. } => input
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == &**name)
            .map(|(_, v)| fnv1a(v.as_bytes())),
        KeySource::Path => Some(fnv1a(input.path.as_bytes())),
        KeySource::QueryArg(arg) => form_value(input.query?, arg).map(|v| fnv1a(v.as_bytes())),
        KeySource::UriCapture(name) => (input.capture)(name).map(|v| fnv1a(v.as_bytes())),
    }
}

fn form_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find(|(k, _)| *k == name).map(|(_, v)| v)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: stable across processes and versions, so that replicas agree on the ring.
fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_more(FNV_OFFSET, bytes)
}

fn fnv1a_more(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix: FNV's low bits are weak and ring positions compare whole words.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

#[derive(Debug)]
enum Algo {
    RoundRobin { schedule: Box<[u32]> },
    LeastConnections,
    Hash { ring: Box<[(u64, u32)]>, spec: HashSpec },
    Latency,
}

/// Passive checks of a balancer's targets.
#[derive(Debug, Clone)]
pub(crate) struct Passive {
    healthy: Box<[u16]>,
    unhealthy: Box<[u16]>,
    thresholds: Thresholds,
}

impl Passive {
    fn new(p: &PassiveHealthcheck) -> Option<Self> {
        let thresholds = Thresholds {
            successes: p.healthy.successes,
            http_failures: p.unhealthy.http_failures,
            tcp_failures: p.unhealthy.tcp_failures,
            timeouts: p.unhealthy.timeouts,
        };
        (thresholds != Thresholds::default()).then(|| Passive {
            healthy: p.healthy.http_statuses.clone().into(),
            unhealthy: p.unhealthy.http_statuses.clone().into(),
            thresholds,
        })
    }
}

/// Picks targets for a service.
#[derive(Debug)]
pub(crate) struct Balancer {
    pub(crate) targets: Box<[TargetRuntime]>,
    weights: Box<[u32]>,
    algo: Algo,
    next: AtomicUsize,
    passive: Option<Passive>,
    /// Keeps the upstream's active checker running while a snapshot uses this balancer.
    checks: Option<Arc<HealthGroup>>,
}

/// A request in flight to a target (least-connections and latency count them), from the
/// upstream call until the response body has been sent (the guard travels with the response
/// to the gateway's body, in an `Arc` in the response's extensions).
#[derive(Debug)]
pub(crate) struct InFlight {
    state: Arc<TargetState>,
    /// Set for the latency algorithm only: least-connections reads no latency.
    started: Option<Instant>,
}

impl InFlight {
    /// The response head arrived: record the latency (latency algorithm).
    pub(crate) fn answered(&self) {
        if let Some(started) = self.started {
            self.state.observe_latency(started.elapsed());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What [`Balancer::new`] needs beyond the targets.
pub(crate) struct BalancerSpec {
    pub(crate) algorithm: Algorithm,
    pub(crate) hash: Option<HashSpec>,
    pub(crate) passive: Option<Passive>,
    pub(crate) checks: Option<Arc<HealthGroup>>,
}

impl BalancerSpec {
    /// A plain round-robin over the given targets, no checks.
    pub(crate) fn round_robin() -> Self {
        BalancerSpec { algorithm: Algorithm::RoundRobin, hash: None, passive: None, checks: None }
    }
}

impl Balancer {
    pub(crate) fn new(targets: Vec<(TargetRuntime, u32)>, spec: BalancerSpec) -> Self {
        let live: Vec<(TargetRuntime, u32)> = targets.into_iter().filter(|(_, w)| *w > 0).collect();
        let weights: Box<[u32]> = live.iter().map(|(_, w)| *w).collect();
        let algo = match spec.algorithm {
            Algorithm::RoundRobin => Algo::RoundRobin { schedule: smooth_schedule(&weights) },
            Algorithm::LeastConnections => Algo::LeastConnections,
            Algorithm::Latency => Algo::Latency,
            Algorithm::ConsistentHashing => Algo::Hash {
                ring: hash_ring(&live.iter().map(|(t, w)| (&*t.label, *w)).collect::<Vec<_>>()),
                spec: spec.hash.unwrap_or(HashSpec { on: KeySource::None, fallback: KeySource::None }),
            },
        };
        Balancer {
            targets: live.into_iter().map(|(t, _)| t).collect(),
            weights,
            algo,
            next: AtomicUsize::new(0),
            passive: spec.passive,
            checks: spec.checks,
        }
    }

    /// Starts the upstream's active checks if they are not running (a config compiled
    /// outside a tokio runtime starts them when served).
    pub(crate) fn ensure_checks_started(&self) {
        if let Some(g) = &self.checks {
            g.ensure_started();
        }
    }

    /// Consistent hashing's key rules, when this balancer hashes.
    pub(crate) fn hash_spec(&self) -> Option<&HashSpec> {
        match &self.algo {
            Algo::Hash { spec, .. } => Some(spec),
            _ => None,
        }
    }

    /// A target for a request: healthy, accepted by `allowed`, and not `avoid` (the target
    /// that just failed) unless it is the only one left. `None` when no target qualifies.
    pub(crate) fn pick(
        &self,
        key: Option<u64>,
        avoid: Option<&TargetRuntime>,
        allowed: &dyn Fn(&TargetRuntime) -> bool,
    ) -> Option<&TargetRuntime> {
        let ok = |t: &TargetRuntime| t.state.is_healthy() && allowed(t);
        let not_avoided = |t: &TargetRuntime| avoid.is_none_or(|a| !std::ptr::eq(t, a));
        self.pick_with(key, &|t| ok(t) && not_avoided(t)).or_else(|| avoid.and_then(|_| self.pick_with(key, &ok)))
    }

    fn pick_with(&self, key: Option<u64>, eligible: &dyn Fn(&TargetRuntime) -> bool) -> Option<&TargetRuntime> {
        let n = self.targets.len();
        if n == 0 {
            return None;
        }
        match &self.algo {
            Algo::RoundRobin { schedule } => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..schedule.len())
                    .map(|i| &self.targets[schedule[(start + i) % schedule.len()] as usize])
                    .find(|t| eligible(t))
            }
            Algo::LeastConnections => {
                // Fewest in flight per unit of weight; ties rotate.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<(usize, u64)> = None;
                for i in 0..n {
                    let idx = (start + i) % n;
                    let t = &self.targets[idx];
                    if !eligible(t) {
                        continue;
                    }
                    let load = u64::from(t.state.inflight.load(Ordering::Relaxed));
                    let w = u64::from(self.weights[idx]);
                    let better = match best {
                        None => true,
                        Some((b, bl)) => load * u64::from(self.weights[b]) < bl * w,
                    };
                    if better {
                        best = Some((idx, load));
                    }
                }
                best.map(|(i, _)| &self.targets[i])
            }
            Algo::Hash { ring, .. } => {
                let key = key.unwrap_or_else(|| fnv1a(&self.next.fetch_add(1, Ordering::Relaxed).to_le_bytes()));
                let start = ring.partition_point(|(h, _)| *h < key);
                (0..ring.len()).map(|i| &self.targets[ring[(start + i) % ring.len()].1 as usize]).find(|t| eligible(t))
            }
            Algo::Latency => {
                // Power of two choices: two random eligible targets, the cheaper wins.
                let r = crate::proxy::random_u64();
                let first = |from: usize| (0..n).map(|i| &self.targets[(from + i) % n]).find(|t| eligible(t));
                let i = (r as usize) % n;
                let a = first(i)?;
                // The second die never lands on the first's slot, so two targets are compared.
                let j = if n > 1 { (i + 1 + ((r >> 32) as usize) % (n - 1)) % n } else { i };
                let b = first(j).unwrap_or(a);
                Some(if b.state.cost() < a.state.cost() { b } else { a })
            }
        }
    }

    /// Starts counting a request to `target` when the algorithm needs in-flight counts.
    pub(crate) fn begin(&self, target: &TargetRuntime) -> Option<InFlight> {
        matches!(self.algo, Algo::LeastConnections | Algo::Latency).then(|| {
            target.state.inflight.fetch_add(1, Ordering::Relaxed);
            InFlight { state: target.state.clone(), started: matches!(self.algo, Algo::Latency).then(Instant::now) }
        })
    }

    /// Feeds a proxied request's outcome to passive health checks.
    pub(crate) fn report(&self, target: &TargetRuntime, outcome: Result<StatusCode, Outcome>) {
        let Some(p) = &self.passive else { return };
        let outcome = match outcome {
            Ok(status) if p.unhealthy.contains(&status.as_u16()) => Outcome::HttpFailure(status.as_u16()),
            Ok(status) if p.healthy.contains(&status.as_u16()) => Outcome::Success,
            Ok(_) => return,
            Err(o) => o,
        };
        target.state.record(outcome, &p.thresholds, &target.label, "passive");
    }
}

/// The smooth weighted round-robin schedule (nginx's algorithm), precomputed.
fn smooth_schedule(weights: &[u32]) -> Box<[u32]> {
    let mut weights: Vec<u64> = weights.iter().map(|w| u64::from(*w)).collect();
    if weights.is_empty() {
        return Box::new([]);
    }
    let g = weights.iter().copied().fold(0, gcd);
    if g > 1 {
        weights.iter_mut().for_each(|w| *w /= g);
    }
    // Keep the schedule small: scale big weight sums down (ratios kept to ~0.1%).
    let sum: u64 = weights.iter().sum();
    if sum > 1000 {
        weights.iter_mut().for_each(|w| *w = (*w * 1000 / sum).max(1));
    }
    let total: i64 = weights.iter().map(|w| *w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += *w as i64;
        }
        let (best, _) =
            current.iter().enumerate().max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i))).expect("non-empty");
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule.into()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A ring of virtual nodes: each target gets points in proportion to its weight (160 per
/// average weight, at least one), placed by a stable hash of its address.
fn hash_ring(targets: &[(&str, u32)]) -> Box<[(u64, u32)]> {
    let sum: u64 = targets.iter().map(|(_, w)| u64::from(*w)).sum();
    if sum == 0 {
        return Box::new([]);
    }
    let n = targets.len() as u64;
    let mut ring = Vec::new();
    for (i, (label, w)) in targets.iter().enumerate() {
        let points = (160 * n * u64::from(*w) / sum).max(1);
        for p in 0..points {
            ring.push((fnv1a(format!("{label}#{p}").as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring.into()
}

/// Builds the hash rules of an upstream.
pub(crate) fn hash_spec(up: &crate::config::Upstream) -> Result<HashSpec, String> {
    let cookie = up.hash_on_cookie.as_deref().map(|c| (c, up.hash_on_cookie_path.as_deref().unwrap_or("/")));
    let on = KeySource::new(
        up.hash_on.unwrap_or_default(),
        up.hash_on_header.as_deref(),
        cookie,
        up.hash_on_query_arg.as_deref(),
        up.hash_on_uri_capture.as_deref(),
    )
    .map_err(|e| format!("`hash_on` {e}"))?;
    let fallback_on = up.hash_fallback.unwrap_or_default();
    if fallback_on == HashOn::Cookie {
        return Err("`hash_fallback` cannot be `cookie`".into());
    }
    if matches!(on, KeySource::Cookie { .. } | KeySource::None) && fallback_on != HashOn::None {
        return Err("`hash_fallback` needs a `hash_on` that can miss (not `none` or `cookie`)".into());
    }
    let fallback = KeySource::new(
        fallback_on,
        up.hash_fallback_header.as_deref(),
        None,
        up.hash_fallback_query_arg.as_deref(),
        up.hash_fallback_uri_capture.as_deref(),
    )
    .map_err(|e| format!("`hash_fallback` {e}"))?;
    Ok(HashSpec { on, fallback })
}

/// Active checks of one upstream: its targets' states and how to probe them. The probing
/// task holds only a weak reference and ends when the last snapshot using it is gone.
#[derive(Debug)]
pub(crate) struct HealthGroup {
    upstream: Arc<str>,
    config: ActiveHealthcheck,
    /// `http_path` and `headers`, parsed once (the compile reported any that do not parse).
    path: http::uri::PathAndQuery,
    headers: http::HeaderMap,
    targets: Vec<(Authority, HeaderValue, Arc<str>, Arc<TargetState>)>,
    started: AtomicBool,
}

/// The probe request's path and headers from an active check's config, or what is wrong.
pub(crate) fn probe_request(a: &ActiveHealthcheck) -> Result<(http::uri::PathAndQuery, http::HeaderMap), String> {
    if !a.http_path.starts_with('/') {
        return Err(format!("`healthchecks.active.http_path` must start with `/`, got `{}`", a.http_path));
    }
    let path = a
        .http_path
        .parse()
        .map_err(|e| format!("`healthchecks.active.http_path` `{}` is not a valid path: {e}", a.http_path))?;
    let mut headers = http::HeaderMap::new();
    for (name, values) in &a.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`healthchecks.active.headers`: `{name}` is not a header name"))?;
        for v in values {
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("`healthchecks.active.headers.{name}`: `{v}` is not a header value"))?;
            headers.append(name.clone(), value);
        }
    }
    Ok((path, headers))
}

impl HealthGroup {
    /// The active checker for an upstream, or `None` when its active checks are off.
    pub(crate) fn new(
        upstream: &str,
        checks: &Healthchecks,
        targets: Vec<(Authority, HeaderValue, Arc<str>, Arc<TargetState>)>,
    ) -> Option<Arc<Self>> {
        let a = &checks.active;
        if a.healthy.interval <= 0.0 && a.unhealthy.interval <= 0.0 {
            return None;
        }
        let (path, headers) = probe_request(a).ok()?;
        Some(Arc::new(HealthGroup {
            upstream: upstream.into(),
            config: a.clone(),
            path,
            headers,
            targets,
            started: AtomicBool::new(false),
        }))
    }

    /// Starts probing, once, when a tokio runtime is at hand (else the server starts it).
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        handle.spawn(probe_loop(Arc::downgrade(self)));
    }
}

async fn probe_loop(group: Weak<HealthGroup>) {
    let (client, scheme, thresholds, healthy_every, unhealthy_every, count) = {
        let Some(g) = group.upgrade() else { return };
        let c = &g.config;
        let https = c.kind == "https";
        let tls = crate::tls::UpstreamTls { skip_verify: !c.https_verify_certificate, roots: None };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config(&tls))
            .https_or_http()
            .enable_http1()
            .build();
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector);
        let t = Thresholds {
            successes: c.healthy.successes,
            http_failures: c.unhealthy.http_failures,
            tcp_failures: c.unhealthy.tcp_failures,
            timeouts: c.unhealthy.timeouts,
        };
        let every = |s: f64| (s > 0.0).then(|| Duration::from_secs_f64(s));
        let scheme = if https { Scheme::HTTPS } else { Scheme::HTTP };
        (client, scheme, t, every(c.healthy.interval), every(c.unhealthy.interval), g.targets.len())
    };
    let mut due: Vec<Instant> = vec![Instant::now(); count];
    loop {
        let next = due.iter().min().copied().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::time::sleep_until(next.into()).await;
        let Some(g) = group.upgrade() else { return };
        let now = Instant::now();
        let mut probes = Vec::new();
        for (i, (authority, host, label, state)) in g.targets.iter().enumerate() {
            if due[i] > now {
                continue;
            }
            let every = if state.is_healthy() { healthy_every } else { unhealthy_every };
            // A side with interval 0 is not probed; look again in a second.
            due[i] = now + every.unwrap_or(Duration::from_secs(1));
            if every.is_none() {
                continue;
            }
            let (client, scheme, g2) = (client.clone(), scheme.clone(), g.clone());
            let (authority, host, label, state) = (authority.clone(), host.clone(), label.clone(), state.clone());
            probes.push(async move {
                let outcome = probe(&g2, &client, scheme, &authority, &host).await;
                tracing::debug!(target: "gateway::health", upstream = &*g2.upstream, upstream_target = &*label, ?outcome, "probe");
                if let Some(outcome) = outcome {
                    state.record(outcome, &thresholds, &label, "active");
                }
            });
        }
        let concurrency = g.config.concurrency.max(1) as usize;
        drop(g);
        futures_util::StreamExt::for_each_concurrent(futures_util::stream::iter(probes), concurrency, |p| p).await;
    }
}

type ProbeClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// One probe; `None` when the status is in neither list (it counts for nothing, as in Kong).
async fn probe(
    g: &HealthGroup,
    client: &ProbeClient,
    scheme: Scheme,
    authority: &Authority,
    host: &HeaderValue,
) -> Option<Outcome> {
    let c = &g.config;
    let timeout = Duration::from_secs_f64(c.timeout.max(0.001));
    if c.kind == "tcp" {
        return Some(match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(authority.as_str())).await {
            Ok(Ok(_)) => Outcome::Success,
            Ok(Err(_)) => Outcome::TcpFailure,
            Err(_) => Outcome::Timeout,
        });
    }
    let uri = http::Uri::builder().scheme(scheme).authority(authority.clone()).path_and_query(g.path.clone()).build();
    let Ok(uri) = uri else { return Some(Outcome::TcpFailure) };
    let mut req = http::Request::new(http_body_util::Empty::new());
    *req.uri_mut() = uri;
    *req.headers_mut() = g.headers.clone();
    req.headers_mut().insert(http::header::HOST, host.clone());
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Some(Outcome::Timeout),
        Ok(Err(_)) => Some(Outcome::TcpFailure),
        Ok(Ok(resp)) => {
            let s = resp.status().as_u16();
            if c.unhealthy.http_statuses.contains(&s) {
                Some(Outcome::HttpFailure(s))
            } else if c.healthy.http_statuses.contains(&s) {
                Some(Outcome::Success)
            } else {
                None
            }
        }
    }
}

/// Target states and active checkers kept across compiles, keyed by upstream.
#[derive(Debug, Default)]
pub(crate) struct HealthCache {
    pub(crate) states: HashMap<(String, String), Arc<TargetState>>,
    pub(crate) groups: HashMap<String, (String, Arc<HealthGroup>)>,
}

/// Builds the passive rules of an upstream.
pub(crate) fn passive(checks: &Healthchecks) -> Option<Passive> {
    Passive::new(&checks.passive)
}
