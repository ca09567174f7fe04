//! What operators see of each request: Prometheus metrics, the access log and latency headers.
//!
//! The request path only bumps atomics in counters that the config compile resolved per route
//! and per service (no label lookups, no locks). The admin API's `/metrics` reads them at
//! scrape time through a prometheus-client [`Collector`], with upstream health, connection and
//! reload figures, and whatever plugins export ([`Plugin::export_metrics`]).
//!
//! Histograms are hand-written (fixed buckets, one atomic per bucket) rather than
//! prometheus-client's `Histogram`, whose `observe` takes a mutex shared by every request of
//! a series.
//!
//! A request's record ([`Exchange`]) is finished when its response body ends (or is dropped
//! by a client that went away), so the access log and the metrics see the bytes sent and the
//! whole duration.
//!
//! Label cardinality is bounded by the config: `route` and `service` are entity names (never
//! paths), status codes are counted by class (`2xx`), and consumers are never labels.
//!
//! [`Plugin::export_metrics`]: crate::plugin::Plugin::export_metrics

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::Shared;

/// What the gateway records about requests. All on by default except the latency headers
/// and the hook.
#[derive(Clone)]
#[non_exhaustive]
pub struct Observability {
    /// Count requests, latencies and bytes for `/metrics`.
    pub metrics: bool,
    /// One `tracing` event per request, target `gateway::access`, when its response ends.
    pub access_log: bool,
    /// `X-Gateway-Upstream-Latency` and `X-Gateway-Proxy-Latency` (milliseconds) on
    /// responses, as Kong's `X-Kong-Upstream-Latency` and `X-Kong-Proxy-Latency`.
    pub latency_headers: bool,
    /// Called with every finished request (to export spans, say). While one is set, new
    /// traces the gateway starts are marked sampled in the `traceparent` it sends upstream.
    pub on_finish: Option<FinishHook>,
    /// Also count requests per authenticated consumer (`gateway_consumer_requests_total`).
    /// Off by default: the series grow with the number of consumers.
    pub consumer_labels: bool,
}

/// See [`Observability::on_finish`].
pub type FinishHook = Arc<dyn Fn(&RequestRecord<'_>) + Send + Sync>;

impl std::fmt::Debug for Observability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observability")
            .field("metrics", &self.metrics)
            .field("access_log", &self.access_log)
            .field("latency_headers", &self.latency_headers)
            .field("on_finish", &self.on_finish.as_ref().map(|_| "hook"))
            .field("consumer_labels", &self.consumer_labels)
            .finish()
    }
}

impl Default for Observability {
    fn default() -> Self {
        Observability {
            metrics: true,
            access_log: true,
            latency_headers: false,
            on_finish: None,
            consumer_labels: false,
        }
    }
}

impl Observability {
    /// Nothing recorded: no metrics, no access log, no headers.
    pub fn off() -> Self {
        Observability {
            metrics: false,
            access_log: false,
            latency_headers: false,
            on_finish: None,
            consumer_labels: false,
        }
    }
}

/// A finished request, as an [`Observability::on_finish`] hook sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct RequestRecord<'a> {
    /// When the request arrived.
    pub started: std::time::SystemTime,
    /// Until the end of the response body.
    pub duration: Duration,
    /// Upstream request to its response head, when an upstream was called.
    pub upstream_latency: Option<Duration>,
    /// The request method.
    pub method: &'a str,
    /// The request's host (authority or `Host`).
    pub host: &'a str,
    /// The request path, without the query string.
    pub path: &'a str,
    /// The status sent to the client.
    pub status: u16,
    /// The matched route's name (empty when none matched).
    pub route: &'a str,
    /// The route's service name (empty when none).
    pub service: &'a str,
    /// The upstream target (`host:port`), when one was called.
    pub upstream: Option<&'a str>,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// False when the client went away before the body ended.
    pub complete: bool,
    /// The trace context of the gateway's hop, when an upstream was called.
    pub trace: Option<TraceContext>,
}

/// The W3C trace context of the gateway's hop: the ids it sent upstream in `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TraceContext {
    /// The trace id (the client's, or a new one).
    pub trace_id: u128,
    /// The gateway's span id: the parent id the upstream received.
    pub span_id: u64,
    /// The client's parent id, when the client sent a trace.
    pub parent_span_id: Option<u64>,
    /// The sampled flag sent upstream.
    pub sampled: bool,
}

impl TraceContext {
    pub(crate) fn new(trace_id: u128, span_id: u64, parent_span_id: Option<u64>, sampled: bool) -> Self {
        TraceContext { trace_id, span_id, parent_span_id, sampled }
    }
}

/// Upper bounds of the latency buckets, in seconds (+Inf is implied).
const BOUNDS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BOUNDS.iter().position(|b| secs <= *b).unwrap_or(BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn encode(&self, mut enc: MetricEncoder<'_>) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(b, n)| (b, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        enc.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Counters of one service.
#[derive(Debug, Default)]
pub(crate) struct ServiceMetrics {
    /// Client request to the end of the response body.
    total: Histogram,
    /// Upstream request sent to its response head.
    upstream: Histogram,
    /// The gateway's own share until the response head: total to head minus upstream.
    proxy: Histogram,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// Counters of one route (and its service).
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    pub(crate) route: Arc<str>,
    pub(crate) service: Arc<str>,
    /// By status class: 1xx .. 5xx.
    classes: [AtomicU64; 5],
    rate_limited: AtomicU64,
    svc: Arc<ServiceMetrics>,
}

impl RouteMetrics {
    /// A plugin answered the request itself with `status`.
    pub(crate) fn plugin_answered(&self, status: http::StatusCode) {
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Requests of one consumer, by status class ([`Observability::consumer_labels`]).
#[derive(Debug)]
pub(crate) struct ConsumerMetrics {
    name: Arc<str>,
    classes: [AtomicU64; 5],
}

/// The metrics of each route, service and consumer, kept across reloads for entities that
/// stay (so counters keep counting).
#[derive(Debug, Default)]
pub(crate) struct MetricsStore {
    routes: HashMap<(Arc<str>, Arc<str>), Arc<RouteMetrics>>,
    services: HashMap<Arc<str>, Arc<ServiceMetrics>>,
    consumers: HashMap<Arc<str>, Arc<ConsumerMetrics>>,
}

impl MetricsStore {
    /// The counters of consumer `name` in the config being compiled, reusing the current ones.
    pub(crate) fn consumer(&self, fresh: &mut MetricsStore, name: &str) -> Arc<ConsumerMetrics> {
        if let Some(m) = fresh.consumers.get(name) {
            return m.clone();
        }
        let m = self
            .consumers
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(ConsumerMetrics { name: name.into(), classes: Default::default() }));
        fresh.consumers.insert(name.into(), m.clone());
        m
    }

    /// The metrics of `route` on `service` in the config being compiled (`fresh`), reusing
    /// the current ones.
    pub(crate) fn route(&self, fresh: &mut MetricsStore, route: &Arc<str>, service: &Arc<str>) -> Arc<RouteMetrics> {
        let key = (route.clone(), service.clone());
        if let Some(m) = fresh.routes.get(&key) {
            return m.clone();
        }
        let svc = match fresh.services.get(service) {
            Some(s) => s.clone(),
            None => {
                let s = self.services.get(service).cloned().unwrap_or_default();
                fresh.services.insert(service.clone(), s.clone());
                s
            }
        };
        let m = self.routes.get(&key).filter(|m| Arc::ptr_eq(&m.svc, &svc)).cloned().unwrap_or_else(|| {
            Arc::new(RouteMetrics {
                route: route.clone(),
                service: service.clone(),
                classes: Default::default(),
                rate_limited: AtomicU64::new(0),
                svc,
            })
        });
        fresh.routes.insert(key, m.clone());
        m
    }
}

/// Request facts the access log needs, taken only when it is on.
#[derive(Debug)]
pub(crate) struct LogLine {
    pub(crate) request_id: HeaderValue,
    /// The client's address, as text.
    pub(crate) client: HeaderValue,
    pub(crate) method: Method,
    /// The `Host` header; the URI's authority (HTTP/2) wins, see [`LogLine::host`].
    pub(crate) host: Option<HeaderValue>,
    /// Logged without its query string: queries may carry credentials (key-auth).
    pub(crate) uri: http::Uri,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) consumer: Option<Arc<str>>,
    /// The W3C trace context sent upstream (none when no upstream was called).
    pub(crate) trace: Option<TraceContext>,
}

impl LogLine {
    /// The request's host: the URI's authority (HTTP/2, absolute-form), else `Host`.
    fn host(&self) -> Option<&str> {
        self.uri.authority().map(|a| a.as_str()).or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
    }
}

/// A trace id as the access log shows it: 32 hex digits, or `-`.
struct TraceId(Option<u128>);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(t) => write!(f, "{t:032x}"),
            None => f.write_str("-"),
        }
    }
}

/// One request's record, finished when its response ends.
pub(crate) struct Exchange {
    pub(crate) metrics: Option<Arc<RouteMetrics>>,
    pub(crate) log: Option<LogLine>,
    /// Whether to write the access log line (`log` may be there for the hook only).
    pub(crate) access_log: bool,
    pub(crate) hook: Option<FinishHook>,
    /// Whether to count the request in `metrics` (which also names the route).
    pub(crate) count: bool,
    /// The authenticated consumer's counters, when counted per consumer.
    pub(crate) consumer: Option<Arc<ConsumerMetrics>>,
    pub(crate) start: Instant,
    /// Until the response head.
    pub(crate) head: Duration,
    pub(crate) upstream: Option<Duration>,
    pub(crate) status: u16,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

impl Exchange {
    /// Records the request; `complete` is false when the client went away mid-body.
    pub(crate) fn finish(&self, complete: bool) {
        let total = self.start.elapsed();
        let class = usize::from(self.status / 100).clamp(1, 5) - 1;
        if let Some(c) = &self.consumer {
            c.classes[class].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(m) = self.metrics.as_ref().filter(|_| self.count) {
            m.classes[class].fetch_add(1, Ordering::Relaxed);
            let svc = &m.svc;
            svc.total.observe(total);
            if let Some(up) = self.upstream {
                svc.upstream.observe(up);
                svc.proxy.observe(self.head.saturating_sub(up));
            } else {
                svc.proxy.observe(self.head);
            }
            svc.bytes_in.fetch_add(self.bytes_in, Ordering::Relaxed);
            svc.bytes_out.fetch_add(self.bytes_out, Ordering::Relaxed);
        }
        let (route, service) = self.metrics.as_ref().map_or(("", ""), |m| (&*m.route, &*m.service));
        if let (Some(l), Some(hook)) = (&self.log, &self.hook) {
            hook(&RequestRecord {
                started: std::time::SystemTime::now() - total,
                duration: total,
                upstream_latency: self.upstream,
                method: l.method.as_str(),
                host: l.host().unwrap_or(""),
                path: l.uri.path(),
                status: self.status,
                route,
                service,
                upstream: l.upstream.as_deref(),
                bytes_out: self.bytes_out,
                complete,
                trace: l.trace,
            });
        }
        if let Some(l) = self.log.as_ref().filter(|_| self.access_log) {
            tracing::info!(
                target: "gateway::access",
                request_id = l.request_id.to_str().unwrap_or("-"),
                trace_id = %TraceId(l.trace.map(|t| t.trace_id)),
                client_ip = l.client.to_str().unwrap_or("-"),
                method = l.method.as_str(),
                host = l.host().unwrap_or("-"),
                path = l.uri.path(),
                status = self.status,
                route = if route.is_empty() { "-" } else { route },
                service = if service.is_empty() { "-" } else { service },
                upstream = l.upstream.as_deref().unwrap_or("-"),
                consumer = l.consumer.as_deref().unwrap_or("-"),
                bytes_in = self.bytes_in,
                bytes_out = self.bytes_out,
                latency_us = u64::try_from(total.as_micros()).unwrap_or(u64::MAX),
                upstream_latency_us = self.upstream.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                complete,
            );
        }
    }
}

/// A plugin's way to add series to `/metrics` ([`Plugin::export_metrics`]): gauges and
/// counters with labels, named by the plugin.
///
/// [`Plugin::export_metrics`]: crate::plugin::Plugin::export_metrics
#[derive(Debug, Default)]
pub struct MetricsExport {
    families: Vec<ExportedFamily>,
}

/// Name, help, type and samples (labels, value) of one exported family.
type ExportedFamily = (String, String, MetricType, Vec<(Vec<(String, String)>, f64)>);

impl MetricsExport {
    /// Adds a gauge sample; samples of one `name` form one family (the first `help` wins).
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.push(name, help, MetricType::Gauge, labels, value);
    }

    /// Adds a counter sample (`name` without the `_total` suffix, which is added).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.push(name, help, MetricType::Counter, labels, value);
    }

    fn push(&mut self, name: &str, help: &str, kind: MetricType, labels: &[(&str, &str)], value: f64) {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match self.families.iter_mut().find(|f| f.0 == name) {
            Some(f) => f.3.push((labels, value)),
            None => self.families.push((name.to_string(), help.to_string(), kind, vec![(labels, value)])),
        }
    }
}

/// Source objects of one kind refused for one reason ([`Gateway::set_rejected`]).
///
/// [`Gateway::set_rejected`]: crate::Gateway::set_rejected
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The object kind, e.g. `Ingress` or `KongPlugin`.
    pub kind: String,
    /// A short, bounded reason, e.g. `unknown plugin` or `missing secret` (not a message
    /// with names in it: it is a label).
    pub reason: String,
    /// How many objects.
    pub count: u64,
}

/// Reads the current snapshot and counters at scrape time.
pub(crate) struct GatewayCollector {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

const NO_LABELS: [(&str, &str); 0] = [];

/// A single gauge or counter value as prometheus-client encodes it.
#[derive(Debug)]
struct Value(MetricType, f64);

impl EncodeMetric for Value {
    fn encode(&self, mut enc: MetricEncoder<'_>) -> std::fmt::Result {
        match self.0 {
            MetricType::Counter => enc.encode_counter::<NoLabelSet, f64, f64>(&self.1, None),
            _ => enc.encode_gauge(&self.1),
        }
    }
    fn metric_type(&self) -> MetricType {
        self.0
    }
}

fn family<L: prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        Value(kind, v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let snap = self.shared.snapshot.load();
        let stats = &self.shared.stats;
        let mut routes: Vec<&Arc<RouteMetrics>> = snap.routes.iter().map(|r| &r.metrics).collect();
        routes.push(&snap.unmatched);
        let mut services: Vec<&RouteMetrics> = Vec::new();
        for r in &routes {
            if !services.iter().any(|s| Arc::ptr_eq(&s.svc, &r.svc)) {
                services.push(r);
            }
        }

        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        family(
            &mut enc,
            "gateway_http_requests",
            "Requests by route, service and status class.",
            MetricType::Counter,
            routes.iter().flat_map(|r| {
                CLASSES.iter().zip(&r.classes).filter_map(move |(c, n)| {
                    let n = n.load(Ordering::Relaxed);
                    (n > 0).then(|| ([("route", &*r.route), ("service", &*r.service), ("code", *c)], n as f64))
                })
            }),
        )?;
        family(
            &mut enc,
            "gateway_consumer_requests",
            "Requests by authenticated consumer and status class (when enabled).",
            MetricType::Counter,
            snap.consumer_metrics.iter().flat_map(|c| {
                CLASSES.iter().zip(&c.classes).filter_map(move |(class, n)| {
                    let n = n.load(Ordering::Relaxed);
                    (n > 0).then(|| ([("consumer", &*c.name), ("code", *class)], n as f64))
                })
            }),
        )?;
        family(
            &mut enc,
            "gateway_rate_limit_rejections",
            "Requests a plugin refused with 429, by route.",
            MetricType::Counter,
            routes
                .iter()
                .map(|r| {
                    ([("route", &*r.route), ("service", &*r.service)], r.rate_limited.load(Ordering::Relaxed) as f64)
                })
                .filter(|(_, n)| *n > 0.0),
        )?;
        for (name, help, pick) in [
            (
                "gateway_request_latency_seconds",
                "From the request to the end of the response body, by service.",
                (|s: &ServiceMetrics| &s.total) as fn(&ServiceMetrics) -> &Histogram,
            ),
            (
                "gateway_upstream_latency_seconds",
                "From sending the upstream request to its response head, by service.",
                |s| &s.upstream,
            ),
            (
                "gateway_proxy_latency_seconds",
                "Time the gateway itself added until the response head, by service.",
                |s| &s.proxy,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for s in &services {
                pick(&s.svc).encode(m.encode_family(&[("service", &*s.service)])?)?;
            }
        }
        family(
            &mut enc,
            "gateway_bandwidth_bytes",
            "Body bytes by service and direction (ingress: request bodies as declared by Content-Length; egress: response bodies as sent).",
            MetricType::Counter,
            services.iter().flat_map(|s| {
                [
                    (
                        [("service", &*s.service), ("direction", "ingress")],
                        s.svc.bytes_in.load(Ordering::Relaxed) as f64,
                    ),
                    (
                        [("service", &*s.service), ("direction", "egress")],
                        s.svc.bytes_out.load(Ordering::Relaxed) as f64,
                    ),
                ]
            }),
        )?;
        family(
            &mut enc,
            "gateway_upstream_target_health",
            "1 when the target is in rotation, 0 when health checks took it out.",
            MetricType::Gauge,
            snap.upstreams.iter().flat_map(|u| {
                u.targets.iter().map(move |t| {
                    (
                        [("upstream", &*u.name), ("target", &*t.label)],
                        if t.state.reason().is_none() { 1.0 } else { 0.0 },
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "gateway_connections_active",
            "Open client connections.",
            MetricType::Gauge,
            [(NO_LABELS, stats.connections_active.load(Ordering::Relaxed) as f64)],
        )?;
        family(
            &mut enc,
            "gateway_connections_idle_released",
            "Idle keep-alive client connections holding only their socket, their buffers released.",
            MetricType::Gauge,
            [(NO_LABELS, stats.connections_idle_released.load(Ordering::Relaxed) as f64)],
        )?;
        family(
            &mut enc,
            "gateway_connections_accepted",
            "Client connections accepted.",
            MetricType::Counter,
            [(NO_LABELS, stats.connections_accepted.load(Ordering::Relaxed) as f64)],
        )?;
        family(
            &mut enc,
            "gateway_config_reloads",
            "Config reloads by result.",
            MetricType::Counter,
            [
                ([("result", "success")], stats.reloads_ok.load(Ordering::Relaxed) as f64),
                ([("result", "failure")], stats.reloads_failed.load(Ordering::Relaxed) as f64),
            ],
        )?;
        let rejected = self.shared.rejected.load();
        family(
            &mut enc,
            "gateway_source_objects_rejected",
            "Source objects (Kubernetes resources) the last translation refused, by kind and reason.",
            MetricType::Gauge,
            rejected.iter().map(|r| ([("kind", r.kind.as_str()), ("reason", r.reason.as_str())], r.count as f64)),
        )?;
        family(
            &mut enc,
            "gateway_config_age_seconds",
            "Seconds since the serving config was compiled.",
            MetricType::Gauge,
            [(NO_LABELS, snap.compiled_at.elapsed().as_secs_f64())],
        )?;

        // What plugins export, each plugin instance once.
        let mut export = MetricsExport::default();
        let mut seen: Vec<*const ()> = Vec::new();
        for r in snap.routes.iter() {
            for p in r.chain.instances() {
                let ptr = Arc::as_ptr(p).cast::<()>();
                if !seen.contains(&ptr) {
                    seen.push(ptr);
                    p.export_metrics(&r.name, &mut export);
                }
            }
        }
        for (name, help, kind, samples) in &export.families {
            let mut m = enc.encode_descriptor(name, help, None, *kind)?;
            for (labels, v) in samples {
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Value(*kind, *v).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[3].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[BOUNDS.len()].load(Ordering::Relaxed), 1);
    }
}

/// A log writer buffered like nginx's `access_log ... buffer=64k flush=...`: lines are copied
/// into a 64 KiB buffer and written out when it fills or every `flush_every`, so a request
/// pays for a memory copy, not a system call (nor a thread wake-up, as a channel to a writer
/// thread would cost). Lines reach the output at most `flush_every` late; dropping the last
/// handle returned by [`BufferedLog::new`]'s guard flushes what is left.
///
/// Use it as a `tracing_subscriber` writer: `.with_writer(move || log.clone())`.
///
/// ```
/// use std::time::Duration;
/// let (log, _flush_on_exit) = gateway_core::observe::BufferedLog::new(std::io::sink(), Duration::from_millis(200));
/// let mut w = log.clone();
/// std::io::Write::write_all(&mut w, b"a line\n").unwrap();
/// ```
#[derive(Clone)]
pub struct BufferedLog {
    inner: Arc<std::sync::Mutex<std::io::BufWriter<Box<dyn std::io::Write + Send>>>>,
}

impl std::fmt::Debug for BufferedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BufferedLog")
    }
}

/// Flushes a [`BufferedLog`] when dropped (at exit), and stops its flusher thread.
#[derive(Debug)]
pub struct FlushGuard(BufferedLog);

impl Drop for FlushGuard {
    fn drop(&mut self) {
        let _ = std::io::Write::flush(&mut self.0);
    }
}

impl BufferedLog {
    /// Buffers `out`, flushing every `flush_every` from a background thread.
    pub fn new(out: impl std::io::Write + Send + 'static, flush_every: Duration) -> (BufferedLog, FlushGuard) {
        let inner = Arc::new(std::sync::Mutex::new(std::io::BufWriter::with_capacity(
            64 * 1024,
            Box::new(out) as Box<dyn std::io::Write + Send>,
        )));
        let weak = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new().name("log-flush".into()).spawn(move || {
            loop {
                std::thread::sleep(flush_every);
                let Some(inner) = weak.upgrade() else { return };
                let _ = std::io::Write::flush(&mut *inner.lock().unwrap_or_else(|p| p.into_inner()));
            }
        });
        if let Err(e) = spawned {
            eprintln!("log flusher thread not started ({e}): lines are written when the buffer fills");
        }
        let log = BufferedLog { inner };
        (log.clone(), FlushGuard(log))
    }
}

impl std::io::Write for BufferedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}
