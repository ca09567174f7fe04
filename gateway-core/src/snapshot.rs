//! Compiling a [`Config`] into an immutable [`Snapshot`]: every check, every parse, every
//! regex and every pre-computed header value happens here, once per config change, so that
//! the request path only reads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use crate::UpstreamSettings;
use crate::balance::{Balancer, BalancerSpec, HashSpec, HealthCache, HealthGroup, Passive, TargetRuntime, TargetState};
use crate::chain::Chain;
use crate::config::{
    Algorithm, Config, ConfigError, DEFAULT_RETRIES, DEFAULT_TIMEOUT_MS, DEFAULT_WEIGHT, PathType, Plugin, Problem,
    Route, RouteProtocol, Service, ServiceProtocol, Upstream, unsupported_fields,
};
use crate::dns::{Dns, DnsEntry};
use crate::observe::{ConsumerMetrics, MetricsStore, Observability, RouteMetrics};
use crate::plugin::{PluginRegistry, UpstreamService};
use crate::proxy::UpstreamCall;
use crate::proxy::client::{ClientKey, Pool, Timeouts, UpstreamClient, build_client};
use crate::router::{PathKind, PathSpec, RouteSpec, Router};
use crate::tls::{CertStore, UpstreamTls};

/// A compiled, immutable config. Requests load the current one once and use only it.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) router: Router,
    pub(crate) routes: Box<[RouteRuntime]>,
    /// For `gateway routes`: route index to its description.
    pub(crate) route_names: Box<[Arc<str>]>,
    /// Server certificates for TLS listeners, by SNI.
    pub(crate) certs: Arc<CertStore>,
    /// Upstreams and their targets' health, for the admin API.
    pub(crate) upstreams: Box<[UpstreamView]>,
    pub(crate) compiled_at: std::time::Instant,
    /// Counters of requests no route matched.
    pub(crate) unmatched: Arc<RouteMetrics>,
    /// Per consumer index, when requests are counted per consumer.
    pub(crate) consumer_metrics: Box<[Arc<ConsumerMetrics>]>,
    pub(crate) observe: Observability,
    /// Plugin instances whose config was refused (their routes answer 500).
    pub(crate) plugin_failures: Box<[crate::config::Problem]>,
}

/// An upstream as the admin API shows its health.
#[derive(Debug)]
pub(crate) struct UpstreamView {
    pub(crate) name: Arc<str>,
    /// Whether any health check (active or passive) runs.
    pub(crate) checked: bool,
    pub(crate) targets: Vec<TargetView>,
}

/// One target of an [`UpstreamView`].
#[derive(Debug)]
pub(crate) struct TargetView {
    pub(crate) label: Arc<str>,
    pub(crate) weight: u32,
    pub(crate) state: Arc<TargetState>,
    pub(crate) dns: Option<Arc<DnsEntry>>,
}

/// What a matched route needs at request time.
#[derive(Debug)]
pub(crate) struct RouteRuntime {
    pub(crate) name: Arc<str>,
    pub(crate) service: Option<Arc<ServiceRuntime>>,
    pub(crate) strip_path: bool,
    pub(crate) preserve_host: bool,
    pub(crate) allow_http: bool,
    pub(crate) allow_https: bool,
    pub(crate) redirect_status: StatusCode,
    /// The route's plugins, in execution order.
    pub(crate) chain: Chain,
    /// The upstream call wrapped in the layers plugins contributed (none: call it directly).
    pub(crate) upstream: Option<UpstreamService>,
    /// This route's counters (kept across reloads that keep the route and its service).
    pub(crate) metrics: Arc<RouteMetrics>,
}

/// A compiled service: where and how to send requests.
#[derive(Debug)]
pub(crate) struct ServiceRuntime {
    pub(crate) name: Arc<str>,
    pub(crate) scheme: Scheme,
    /// The service path; `None` stands for `/`.
    pub(crate) base_path: Option<Box<str>>,
    pub(crate) balancer: Balancer,
    pub(crate) retries: u32,
    /// HTTP/2 to the upstream (`grpc`, `grpcs`); HTTP/1.1 otherwise.
    pub(crate) version: http::Version,
}

/// State that outlives snapshots: upstream clients (and so their connection pools) keyed by
/// timeouts and TLS settings, reused by the next compile when a service's settings are
/// unchanged.
#[derive(Debug)]
pub(crate) struct ClientCache {
    clients: HashMap<ClientKey, UpstreamClient>,
    health: HealthCache,
    pub(crate) settings: UpstreamSettings,
    /// Upstream host names and their answers; shared by every client.
    dns: Arc<Dns>,
    /// Route and service counters, kept across reloads.
    metrics: MetricsStore,
    pub(crate) observe: Observability,
}

impl ClientCache {
    pub(crate) fn new(settings: &UpstreamSettings) -> Self {
        ClientCache {
            clients: HashMap::new(),
            health: HealthCache::default(),
            settings: settings.clone(),
            dns: Dns::new(settings.dns_resolver.clone()),
            metrics: MetricsStore::default(),
            observe: Observability::default(),
        }
    }
}

impl Default for ClientCache {
    fn default() -> Self {
        ClientCache::new(&UpstreamSettings::default())
    }
}

/// Kong's bundled plugins: named in "not supported yet" messages instead of "unknown plugin".
const KONG_PLUGINS: &[&str] = &[
    "acl",
    "acme",
    "ai-proxy",
    "aws-lambda",
    "azure-functions",
    "basic-auth",
    "bot-detection",
    "correlation-id",
    "cors",
    "datadog",
    "file-log",
    "grpc-gateway",
    "grpc-web",
    "hmac-auth",
    "http-log",
    "ip-restriction",
    "jwt",
    "key-auth",
    "ldap-auth",
    "loggly",
    "oauth2",
    "opentelemetry",
    "post-function",
    "pre-function",
    "prometheus",
    "proxy-cache",
    "rate-limiting",
    "redirect",
    "request-size-limiting",
    "request-termination",
    "request-transformer",
    "response-ratelimiting",
    "response-transformer",
    "session",
    "statsd",
    "syslog",
    "tcp-log",
    "udp-log",
    "zipkin",
];

struct Compiler<'a> {
    problems: Vec<Problem>,
    plugins: &'a PluginRegistry,
    /// Host names (not IP addresses) the services connect to, with their DNS entries.
    dns_names: HashMap<Box<str>, Arc<DnsEntry>>,
    /// The longest keep-alive idle timeout of any service.
    longest_idle: Duration,
}

impl Compiler<'_> {
    fn problem(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { at: at.into(), message: message.into(), line: None, column: None });
    }

    fn unsupported(&mut self, at: &str, fields: Vec<&'static str>) {
        for f in fields {
            self.problem(at, format!("`{f}` is a Kong field this gateway does not support yet"));
        }
    }

    fn check_plugins(&mut self, at: &str, plugins: &[Plugin]) {
        for (i, p) in plugins.iter().enumerate() {
            let at = format!("{at}plugins[{i}]");
            if !self.plugins.contains(&p.name) {
                if KONG_PLUGINS.contains(&p.name.as_str()) {
                    self.problem(&at, format!("Kong plugin `{}` is not supported yet", p.name));
                } else {
                    self.problem(&at, format!("unknown plugin `{}`", p.name));
                }
            }
        }
    }
}

fn label(kind: &str, index: usize, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{kind}[{index}] (name \"{n}\")"),
        None => format!("{kind}[{index}]"),
    }
}

fn timeout(c: &mut Compiler<'_>, at: &str, field: &str, value: Option<u64>) -> Duration {
    let ms = value.unwrap_or(DEFAULT_TIMEOUT_MS);
    if ms == 0 || ms > i32::MAX as u64 {
        c.problem(at, format!("`{field}` must be between 1 and {} ms, got {ms}", i32::MAX));
    }
    Duration::from_millis(ms.max(1))
}

/// `host[:port]` with a default port; IPv6 literals in brackets.
fn parse_host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
        let host = &s[..end + 2];
        match &rest[end + 1..] {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(|| format!("`{s}`: expected `:port` after `]`"))?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{s}`: missing host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("`{s}`: invalid port `{p}`"))?,
    };
    Ok((host.to_string(), port))
}

fn host_header_for(host: &str, port: u16, scheme: &Scheme) -> String {
    let default = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    if port == default { host.to_string() } else { format!("{host}:{port}") }
}

/// Whether a target host is a name to resolve (not an IPv4 or bracketed IPv6 address).
fn is_host_name(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_err() && !host.starts_with('[')
}

/// A target's address, `Host` header and label.
fn target_address(
    host: &str,
    port: u16,
    host_header: Option<&str>,
    scheme: &Scheme,
) -> Result<(Authority, HeaderValue, String), String> {
    let label = format!("{host}:{port}");
    let authority: Authority = label.parse().map_err(|e| format!("`{label}` is not a valid address: {e}"))?;
    let header = host_header.map(str::to_string).unwrap_or_else(|| host_header_for(host, port, scheme));
    let host_header =
        HeaderValue::from_str(&header).map_err(|e| format!("`{header}` is not a valid Host header: {e}"))?;
    Ok((authority, host_header, label))
}

fn target_runtime(
    host: &str,
    port: u16,
    host_header: Option<&str>,
    scheme: &Scheme,
    state: Arc<TargetState>,
    client: &UpstreamClient,
    dns: &mut dyn FnMut(&str) -> Arc<crate::dns::DnsEntry>,
) -> Result<TargetRuntime, String> {
    let (authority, host_header, label) = target_address(host, port, host_header, scheme)?;
    let name = authority.host();
    let dns = is_host_name(name).then(|| dns(name));
    let client = client.for_target(scheme, &authority, dns.as_ref());
    Ok(TargetRuntime { authority, host_header, label: label.into(), state, dns, client })
}

struct ParsedUpstream<'a> {
    upstream: &'a Upstream,
    targets: Vec<(String, u16, u32)>,
    /// Filled once all targets are known: the targets' shared states, in `targets` order.
    states: Vec<Arc<TargetState>>,
    hash: Option<HashSpec>,
    passive: Option<Passive>,
    checks: Option<Arc<HealthGroup>>,
}

/// Compiles a config. Reuses and refreshes `clients`; never touches the network.
pub(crate) fn compile(
    config: &Config,
    plugins: &PluginRegistry,
    clients: &mut ClientCache,
) -> Result<Snapshot, ConfigError> {
    let mut c = Compiler { problems: Vec::new(), plugins, dns_names: HashMap::new(), longest_idle: Duration::ZERO };

    if config.format_version != "3.0" {
        c.problem(
            "_format_version",
            format!(
                "only \"3.0\" is supported, got \"{}\" (convert older files with `deck file convert`)",
                config.format_version
            ),
        );
    }
    if let Some(ws) = &config.workspace
        && ws != "default"
    {
        c.problem("_workspace", format!("workspaces are not supported (only `default`), got `{ws}`"));
    }
    let u = &config;
    let top = unsupported_fields(&[
        ("vaults", &u.vaults, &[]),
        ("consumer_groups", &u.consumer_groups, &[]),
        ("key_sets", &u.key_sets, &[]),
        ("keys", &u.keys, &[]),
        ("filter_chains", &u.filter_chains, &[]),
        ("parameters", &u.parameters, &[]),
    ]);
    for entity in top {
        c.problem(entity, format!("the Kong entity `{entity}` is not supported yet"));
    }

    let certs = crate::tls::compile_certificates(config, &mut |at, m| c.problem(at, m));
    let mut cas: HashMap<&str, Vec<rustls::pki_types::CertificateDer<'static>>> = HashMap::new();
    for (i, ca) in config.ca_certificates.iter().enumerate() {
        let at = format!("ca_certificates[{i}]");
        let Some(id) = ca.id.as_deref() else {
            c.problem(at, "a CA certificate needs an `id` for services to name it");
            continue;
        };
        match crate::tls::parse_certs(&ca.cert) {
            Ok(certs) => {
                if cas.insert(id, certs).is_some() {
                    c.problem(at, format!("duplicate CA certificate id `{id}`"));
                }
            }
            Err(e) => c.problem(at, format!("`cert`: {e}")),
        }
    }

    // Upstreams and their targets.
    let mut upstreams: HashMap<&str, ParsedUpstream<'_>> = HashMap::new();
    for (i, up) in config.upstreams.iter().enumerate() {
        let at = label("upstreams", i, Some(&up.name));
        let fls = [json!(false)];
        let fields = unsupported_fields(&[
            ("client_certificate", &up.client_certificate, &[]),
            ("use_srv_name", &up.use_srv_name, &fls),
        ]);
        c.unsupported(&at, fields);
        let hash = match crate::balance::hash_spec(up) {
            Ok(h) => (up.algorithm == Algorithm::ConsistentHashing).then_some(h),
            Err(e) => {
                c.problem(&at, e);
                None
            }
        };
        let checks = up.healthchecks.clone().unwrap_or_default();
        if checks.threshold != 0.0 {
            c.problem(&at, "`healthchecks.threshold` is not supported yet (only 0)");
        }
        if checks.active.https_sni.is_some() {
            c.problem(&at, "`healthchecks.active.https_sni` is not supported yet");
        }
        for (kind, field) in [(&checks.active.kind, "active"), (&checks.passive.kind, "passive")] {
            if !["http", "https", "tcp"].contains(&kind.as_str()) {
                c.problem(&at, format!("`healthchecks.{field}.type` must be http, https or tcp, got `{kind}`"));
            }
        }
        for (name, v) in [
            ("active.healthy.interval", checks.active.healthy.interval),
            ("active.unhealthy.interval", checks.active.unhealthy.interval),
            ("active.timeout", checks.active.timeout),
        ] {
            if !(0.0..=65535.0).contains(&v) {
                c.problem(&at, format!("`healthchecks.{name}` must be between 0 and 65535 seconds, got {v}"));
            }
        }
        if let Err(e) = crate::balance::probe_request(&checks.active) {
            c.problem(&at, e);
        }
        let mut targets = Vec::new();
        for (j, t) in up.targets.iter().enumerate() {
            let tat = format!("{at}.targets[{j}]");
            if t.upstream.is_some() {
                c.problem(&tat, "`upstream` is only allowed on top-level targets");
            }
            push_target(&mut c, &tat, t, &mut targets);
        }
        let passive = crate::balance::passive(&checks);
        let parsed = ParsedUpstream { upstream: up, targets, states: Vec::new(), hash, passive, checks: None };
        if upstreams.insert(up.name.as_str(), parsed).is_some() {
            c.problem(&at, format!("duplicate upstream name `{}`", up.name));
        }
    }
    for (j, t) in config.targets.iter().enumerate() {
        let tat = format!("targets[{j}]");
        let Some(key) = t.upstream.as_ref().and_then(|r| r.key()) else {
            c.problem(&tat, "a top-level target needs `upstream`");
            continue;
        };
        let found = upstreams
            .keys()
            .copied()
            .find(|k| *k == key)
            .or_else(|| config.upstreams.iter().find(|u| u.id.as_deref() == Some(key)).map(|u| u.name.as_str()));
        let Some(name) = found else {
            c.problem(&tat, format!("upstream `{key}` does not exist"));
            continue;
        };
        let mut parsed = Vec::new();
        push_target(&mut c, &tat, t, &mut parsed);
        if let Some(u) = upstreams.get_mut(name) {
            u.targets.extend(parsed);
        }
    }

    // Target states and active checkers carry over from the last compile when the upstream
    // keeps the target (and its checks are unchanged).
    // An upstream without checks starts afresh: nothing could bring back a target that an
    // earlier config's checks took out.
    let mut fresh_health = HealthCache::default();
    let mut fresh_metrics = MetricsStore::default();
    let mut views = Vec::new();
    for (name, up) in upstreams.iter_mut() {
        let checks = up.upstream.healthchecks.clone().unwrap_or_default();
        let checked =
            up.passive.is_some() || checks.active.healthy.interval > 0.0 || checks.active.unhealthy.interval > 0.0;
        for (h, p, _) in &up.targets {
            let key = (name.to_string(), format!("{h}:{p}"));
            let old = checked.then(|| clients.health.states.get(&key)).flatten();
            let state = fresh_health.states.get(&key).or(old).cloned().unwrap_or_default();
            fresh_health.states.insert(key, state.clone());
            up.states.push(state);
        }
        views.push(UpstreamView {
            name: Arc::from(*name),
            checked,
            targets: up
                .targets
                .iter()
                .zip(&up.states)
                .map(|((h, p, w), state)| TargetView {
                    label: format!("{h}:{p}").into(),
                    weight: *w,
                    state: state.clone(),
                    dns: is_host_name(h).then(|| clients.dns.entry(&mut c.dns_names, h)),
                })
                .collect(),
        });
        let signature = format!("{:?}|{:?}|{:?}", checks.active, up.targets, up.upstream.host_header);
        let group = match clients.health.groups.get(*name) {
            Some((sig, g)) if *sig == signature => Some(g.clone()),
            _ => {
                let mut probed = Vec::new();
                for ((h, p, _), state) in up.targets.iter().zip(&up.states) {
                    if let Ok((authority, host_header, label)) =
                        target_address(h, *p, up.upstream.host_header.as_deref(), &Scheme::HTTP)
                    {
                        probed.push((authority, host_header, label.into(), state.clone()));
                    }
                }
                HealthGroup::new(name, &checks, probed)
            }
        };
        if let Some(g) = &group {
            fresh_health.groups.insert(name.to_string(), (signature, g.clone()));
        }
        up.checks = group;
    }

    // Services.
    let mut fresh_clients: HashMap<ClientKey, UpstreamClient> = HashMap::new();
    let mut services: Vec<Option<Arc<ServiceRuntime>>> = Vec::new();
    let mut service_keys: HashMap<&str, usize> = HashMap::new();
    for (i, s) in config.services.iter().enumerate() {
        let at = label("services", i, s.name.as_deref());
        for key in [s.name.as_deref(), s.id.as_deref()].into_iter().flatten() {
            if service_keys.insert(key, i).is_some() {
                c.problem(&at, format!("duplicate service name or id `{key}`"));
            }
        }
        c.check_plugins(&format!("{at}."), &s.plugins);
        let built = compile_service(&mut c, &at, s, &upstreams, &cas, clients, &mut fresh_clients);
        services.push(built.map(Arc::new));
    }

    // Routes: nested first (in service order), then top-level.
    let mut routes: Vec<(String, &Route, Option<usize>)> = Vec::new();
    for (i, s) in config.services.iter().enumerate() {
        let sat = label("services", i, s.name.as_deref());
        for (j, r) in s.routes.iter().enumerate() {
            if r.service.is_some() {
                c.problem(
                    label(&format!("{sat}.routes"), j, r.name.as_deref()),
                    "a nested route must not name a `service`",
                );
            }
            routes.push((label(&format!("{sat}.routes"), j, r.name.as_deref()), r, Some(i)));
        }
    }
    for (j, r) in config.routes.iter().enumerate() {
        let at = label("routes", j, r.name.as_deref());
        let service = match &r.service {
            None => None,
            Some(reference) => match reference.key().and_then(|k| service_keys.get(k)) {
                Some(i) => Some(*i),
                None => {
                    c.problem(&at, format!("service `{}` does not exist", reference.key().unwrap_or("?")));
                    continue;
                }
            },
        };
        routes.push((at, r, service));
    }

    let mut plugin_problems = Vec::new();
    let mut plan = crate::chain::compile(config, plugins, &routes, &mut plugin_problems);
    for (at, message) in plugin_problems {
        c.problem(at, message);
    }

    let mut route_names = HashSet::new();
    let mut specs = Vec::new();
    let mut runtimes = Vec::new();
    let mut locations = Vec::new();
    for (ri, (at, r, service)) in routes.into_iter().enumerate() {
        let chain = std::mem::take(&mut plan.chains[ri]);
        for key in [r.name.as_deref(), r.id.as_deref()].into_iter().flatten() {
            if !route_names.insert(key) {
                c.problem(&at, format!("duplicate route name or id `{key}`"));
            }
        }
        c.check_plugins(&format!("{at}."), &r.plugins);
        if service.is_some_and(|s| config.services[s].enabled == Some(false)) {
            continue;
        }
        let service = service.and_then(|s| services[s].clone());
        let Some((spec, runtime)) = compile_route(&mut c, &at, r, service, chain, &mut |route, service| {
            clients.metrics.route(&mut fresh_metrics, route, service)
        }) else {
            continue;
        };
        specs.push(spec);
        runtimes.push(runtime);
        locations.push(at);
    }

    // Plugins and consumers.
    c.check_plugins("", &config.plugins);
    let mut consumer_keys = HashSet::new();
    for (i, consumer) in config.consumers.iter().enumerate() {
        let at = label("consumers", i, consumer.username.as_deref());
        if consumer.username.is_none() && consumer.custom_id.is_none() {
            c.problem(&at, "a consumer needs `username` or `custom_id`");
        }
        for key in
            [consumer.username.as_deref(), consumer.custom_id.as_deref(), consumer.id.as_deref()].into_iter().flatten()
        {
            if !consumer_keys.insert(key) {
                c.problem(&at, format!("duplicate consumer username, custom_id or id `{key}`"));
            }
        }
        c.check_plugins(&format!("{at}."), &consumer.plugins);
    }

    let router = match Router::new(specs) {
        Ok(r) => Some(r),
        Err(e) => {
            c.problem(locations.get(e.route).cloned().unwrap_or_default(), e.message);
            None
        }
    };
    match router {
        Some(router) if c.problems.is_empty() => {
            // Only a config that compiles replaces the cached clients (and their pools) and
            // health state, and starts active checks.
            clients.clients = fresh_clients;
            clients.dns.install(std::mem::take(&mut c.dns_names), c.longest_idle);
            let unmatched = clients.metrics.route(&mut fresh_metrics, &Arc::from(""), &Arc::from(""));
            let consumer_metrics: Box<[Arc<ConsumerMetrics>]> = if clients.observe.consumer_labels {
                let mut named = |i: usize, c: &crate::config::Consumer| {
                    let name = c.username.clone().or_else(|| c.id.clone()).or_else(|| c.custom_id.clone());
                    clients.metrics.consumer(&mut fresh_metrics, &name.unwrap_or_else(|| format!("consumers[{i}]")))
                };
                config.consumers.iter().enumerate().map(|(i, c)| named(i, c)).collect()
            } else {
                Box::default()
            };
            clients.metrics = fresh_metrics;
            for (_, g) in fresh_health.groups.values() {
                g.ensure_started();
            }
            clients.health = fresh_health;
            Ok(Snapshot {
                router,
                route_names: runtimes.iter().map(|r: &RouteRuntime| r.name.clone()).collect(),
                routes: runtimes.into(),
                certs: Arc::new(certs),
                upstreams: {
                    views.sort_by(|a, b| a.name.cmp(&b.name));
                    views.into()
                },
                compiled_at: std::time::Instant::now(),
                unmatched,
                consumer_metrics,
                observe: clients.observe.clone(),
                plugin_failures: std::mem::take(&mut plan.failures).into(),
            })
        }
        _ => Err(ConfigError { source_name: None, problems: c.problems }),
    }
}

fn push_target(c: &mut Compiler<'_>, at: &str, t: &crate::config::Target, out: &mut Vec<(String, u16, u32)>) {
    let weight = t.weight.unwrap_or(DEFAULT_WEIGHT);
    if weight > 65535 {
        c.problem(at, format!("`weight` must be between 0 and 65535, got {weight}"));
    }
    match parse_host_port(&t.target, 8000) {
        Ok((host, port)) => out.push((host, port, weight)),
        Err(e) => c.problem(at, format!("invalid `target` {e}")),
    }
}

#[allow(clippy::too_many_arguments)] // one call site
fn compile_service(
    c: &mut Compiler<'_>,
    at: &str,
    s: &Service,
    upstreams: &HashMap<&str, ParsedUpstream<'_>>,
    cas: &HashMap<&str, Vec<rustls::pki_types::CertificateDer<'static>>>,
    old_clients: &ClientCache,
    fresh_clients: &mut HashMap<ClientKey, UpstreamClient>,
) -> Option<ServiceRuntime> {
    let null = [Value::Null];
    let fields = unsupported_fields(&[
        ("tls_verify_depth", &s.tls_verify_depth, &null),
        ("client_certificate", &s.client_certificate, &null),
    ]);
    c.unsupported(at, fields);

    let (mut protocol, mut host, mut port, mut path) = (s.protocol, s.host.clone(), s.port, s.path.clone());
    if let Some(url) = &s.url {
        if s.host.is_some() || s.port.is_some() || s.path.is_some() || s.protocol.is_some() {
            c.problem(at, "`url` is shorthand for protocol, host, port and path: set either `url` or those fields");
        }
        match url.parse::<http::Uri>() {
            Ok(uri) if uri.scheme().is_some() && uri.host().is_some() => {
                protocol = match uri.scheme_str() {
                    Some("http") => Some(ServiceProtocol::Http),
                    Some("https") => Some(ServiceProtocol::Https),
                    Some("grpc") => Some(ServiceProtocol::Grpc),
                    Some("grpcs") => Some(ServiceProtocol::Grpcs),
                    Some(other) => {
                        c.problem(at, format!("`url` has an unknown scheme `{other}`"));
                        None
                    }
                    None => None,
                };
                host = uri.host().map(str::to_string);
                port = uri.port_u16();
                path = match uri.path() {
                    "" | "/" => None,
                    p => Some(p.to_string()),
                };
                if uri.query().is_some() {
                    c.problem(at, "`url` must not have a query string");
                }
            }
            _ => c.problem(at, format!("`url` `{url}` is not an absolute http(s) URL")),
        }
    }
    let protocol = protocol.unwrap_or(ServiceProtocol::Http);
    let (scheme, version) = match protocol {
        ServiceProtocol::Http => (Scheme::HTTP, http::Version::HTTP_11),
        ServiceProtocol::Https => (Scheme::HTTPS, http::Version::HTTP_11),
        ServiceProtocol::Grpc => (Scheme::HTTP, http::Version::HTTP_2),
        ServiceProtocol::Grpcs => (Scheme::HTTPS, http::Version::HTTP_2),
        other => {
            c.problem(
                at,
                format!(
                    "service protocol `{}` is not supported yet (http, https, grpc and grpcs are)",
                    json!(other).as_str().unwrap_or("?")
                ),
            );
            (Scheme::HTTP, http::Version::HTTP_11)
        }
    };
    let mut tls = UpstreamTls { skip_verify: s.tls_verify == Some(false), roots: None };
    if let Some(ids) = s.ca_certificates.as_ref().filter(|ids| !ids.is_empty()) {
        let mut roots = Vec::new();
        for id in ids {
            match cas.get(id.as_str()) {
                Some(certs) => roots.extend(certs.iter().cloned()),
                None => c.problem(at, format!("CA certificate `{id}` does not exist")),
            }
        }
        tls.roots = Some(roots.into());
    }
    if tls.skip_verify && scheme == Scheme::HTTPS {
        tracing::warn!(service = at, "`tls_verify: false`: the upstream's certificate is not verified");
    }
    let Some(host) = host else {
        c.problem(at, "a service needs `url` or `host`");
        return None;
    };
    if let Some(p) = &path {
        if !p.starts_with('/') {
            c.problem(at, format!("`path` must start with `/`, got `{p}`"));
        } else if p.contains(['?', '#']) || p.parse::<http::uri::PathAndQuery>().is_err() {
            c.problem(at, format!("`path` `{p}` is not a valid URL path"));
        }
    }
    let retries = s.retries.unwrap_or(DEFAULT_RETRIES);
    if retries > 32767 {
        c.problem(at, format!("`retries` must be between 0 and 32767, got {retries}"));
    }
    let timeouts = Timeouts {
        connect: timeout(c, at, "connect_timeout", s.connect_timeout),
        read: timeout(c, at, "read_timeout", s.read_timeout),
        write: timeout(c, at, "write_timeout", s.write_timeout),
    };
    let defaults = &old_clients.settings;
    let up = upstreams.get(host.as_str()).map(|u| u.upstream);
    let pool = Pool {
        max_idle: up.and_then(|u| u.keepalive_pool_size).map_or(defaults.keepalive_pool_size, |n| n as usize),
        idle_timeout: match up.and_then(|u| u.keepalive_idle_timeout) {
            Some(secs) if (0.0..=86400.0).contains(&secs) => Duration::from_secs_f64(secs),
            Some(secs) => {
                c.problem(
                    at,
                    format!(
                        "upstream `{host}`: `keepalive_idle_timeout` must be between 0 and 86400 seconds, got {secs}"
                    ),
                );
                defaults.keepalive_idle_timeout
            }
            None => defaults.keepalive_idle_timeout,
        },
    };
    c.longest_idle = c.longest_idle.max(pool.idle_timeout);
    let key = ClientKey { timeouts, tls, h2: version == http::Version::HTTP_2, pool };
    let client = match fresh_clients.get(&key) {
        Some(client) => client.clone(),
        None => {
            let client = old_clients.clients.get(&key).cloned().unwrap_or_else(|| build_client(&key, &old_clients.dns));
            fresh_clients.insert(key, client.clone());
            client
        }
    };
    let (targets, spec): (Vec<(TargetRuntime, u32)>, BalancerSpec) = match upstreams.get(host.as_str()) {
        Some(up) => {
            let mut out = Vec::new();
            for ((h, p, w), state) in up.targets.iter().zip(&up.states) {
                let dns = &mut |name: &str| old_clients.dns.entry(&mut c.dns_names, name);
                match target_runtime(h, *p, up.upstream.host_header.as_deref(), &scheme, state.clone(), &client, dns) {
                    Ok(t) => out.push((t, *w)),
                    Err(e) => c.problem(at, format!("upstream `{}`: {e}", up.upstream.name)),
                }
            }
            let spec = BalancerSpec {
                algorithm: up.upstream.algorithm,
                hash: up.hash.clone(),
                passive: up.passive.clone(),
                checks: up.checks.clone(),
            };
            (out, spec)
        }
        None => {
            let port = port.unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
            let dns = &mut |name: &str| old_clients.dns.entry(&mut c.dns_names, name);
            match target_runtime(&host, port, None, &scheme, Arc::default(), &client, dns) {
                Ok(t) => (vec![(t, 1)], BalancerSpec::round_robin()),
                Err(e) => {
                    c.problem(at, e);
                    return None;
                }
            }
        }
    };
    Some(ServiceRuntime {
        name: s.name.clone().or_else(|| s.id.clone()).unwrap_or_else(|| host.clone()).into(),
        scheme,
        base_path: path.filter(|p| p != "/").map(Into::into),
        balancer: Balancer::new(targets, spec),
        retries,
        version,
    })
}

/// Finds a route's counters by route and service name.
type MetricsFor<'a> = dyn FnMut(&Arc<str>, &Arc<str>) -> Arc<RouteMetrics> + 'a;

fn compile_route(
    c: &mut Compiler<'_>,
    at: &str,
    r: &Route,
    service: Option<Arc<ServiceRuntime>>,
    chain: Chain,
    metrics: &mut MetricsFor<'_>,
) -> Option<(RouteSpec, RouteRuntime)> {
    let before = c.problems.len();
    let empty = [json!([])];
    let fields = unsupported_fields(&[
        ("snis", &r.snis, &empty),
        ("sources", &r.sources, &empty),
        ("destinations", &r.destinations, &empty),
        ("expression", &r.expression, &[]),
        ("priority", &r.priority, &[json!(0)]),
    ]);
    c.unsupported(at, fields);
    if let Some(ph) = &r.path_handling
        && ph != "v0"
    {
        c.problem(at, format!("`path_handling: {ph}` is not supported (only v0, Kong's default)"));
    }
    if r.methods.is_empty() && r.hosts.is_empty() && r.paths.is_empty() && r.headers.is_empty() {
        c.problem(at, "a route must set at least one of `methods`, `hosts`, `headers` or `paths`");
    }
    let protocols = r.protocols.clone().unwrap_or_else(|| vec![RouteProtocol::Http, RouteProtocol::Https]);
    for p in &protocols {
        if !matches!(p, RouteProtocol::Http | RouteProtocol::Https | RouteProtocol::Grpc | RouteProtocol::Grpcs) {
            c.problem(
                at,
                format!(
                    "route protocol `{}` is not supported yet (http, https, grpc and grpcs are)",
                    json!(p).as_str().unwrap_or("?")
                ),
            );
        }
    }
    let redirect = r.https_redirect_status_code.unwrap_or(426);
    if ![426, 301, 302, 307, 308].contains(&redirect) {
        c.problem(at, format!("`https_redirect_status_code` must be one of 426, 301, 302, 307, 308, got {redirect}"));
    }
    let mut methods = Vec::new();
    for (i, m) in r.methods.iter().enumerate() {
        match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) => methods.push(m),
            Err(_) => c.problem(format!("{at}.methods[{i}]"), format!("`{m}` is not a valid method")),
        }
    }
    let mut headers = Vec::new();
    for (name, values) in &r.headers {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) if n == http::header::HOST => {
                c.problem(format!("{at}.headers"), "use `hosts` to match the Host header")
            }
            Ok(n) if values.is_empty() => c.problem(format!("{at}.headers.{n}"), "needs at least one value"),
            Ok(n) => headers.push((n, values.clone())),
            Err(_) => c.problem(format!("{at}.headers"), format!("`{name}` is not a valid header name")),
        }
    }
    let mut paths = Vec::new();
    for (i, p) in r.paths.iter().enumerate() {
        let pat = format!("{at}.paths[{i}]");
        let spec = match (r.path_type, p.strip_prefix('~')) {
            (PathType::Kong, Some(re)) => PathSpec::new(re, PathKind::Regex),
            (PathType::Kong, None) => PathSpec::new(p, PathKind::Prefix),
            (_, Some(_)) => {
                c.problem(&pat, "regex paths need `path_type: kong`");
                continue;
            }
            (PathType::Exact, None) => PathSpec::new(p, PathKind::Exact),
            (PathType::ElementPrefix, None) => PathSpec::new(p, PathKind::ElementPrefix),
        };
        if spec.kind == PathKind::Regex {
            if let Err(e) = regex::Regex::new(&spec.pattern) {
                c.problem(&pat, format!("invalid regex `{}`: {e}", spec.pattern));
                continue;
            }
        } else if !spec.pattern.starts_with('/') {
            c.problem(&pat, format!("a path must start with `/` (or `~` for a regex), got `{p}`"));
            continue;
        }
        paths.push(spec);
    }
    for (i, h) in r.hosts.iter().enumerate() {
        if let Err(e) = Router::new(vec![RouteSpec { hosts: vec![h.clone()], ..Default::default() }]) {
            c.problem(format!("{at}.hosts[{i}]"), e.message);
        }
    }
    if c.problems.len() > before {
        return None;
    }
    let spec = RouteSpec {
        hosts: r.hosts.clone(),
        wildcard_single_label: r.wildcard_single_label,
        paths,
        methods,
        headers,
        regex_priority: r.regex_priority.unwrap_or(0),
    };
    let preserve_host = r.preserve_host.unwrap_or(false);
    // Layers are applied once, here; a request clones the one erased service at most.
    let upstream = match (&service, chain.layers.is_empty()) {
        (Some(s), false) => {
            let base = UpstreamService::new(UpstreamCall { service: s.clone(), preserve_host });
            Some(chain.layers.iter().rev().fold(base, |inner, layer| layer(inner)))
        }
        _ => None,
    };
    let name: Arc<str> = r.name.clone().or_else(|| r.id.clone()).unwrap_or_else(|| at.to_string()).into();
    let service_label: Arc<str> = service.as_ref().map_or_else(|| Arc::from(""), |s| s.name.clone());
    let runtime = RouteRuntime {
        metrics: metrics(&name, &service_label),
        name,
        service,
        strip_path: r.strip_path.unwrap_or(true),
        preserve_host,
        chain,
        upstream,
        allow_http: protocols.iter().any(|p| matches!(p, RouteProtocol::Http | RouteProtocol::Grpc)),
        allow_https: protocols.iter().any(|p| matches!(p, RouteProtocol::Https | RouteProtocol::Grpcs)),
        redirect_status: StatusCode::from_u16(redirect).unwrap_or(StatusCode::UPGRADE_REQUIRED),
    };
    Some((spec, runtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(yaml: &str) -> Vec<String> {
        let config = Config::from_yaml(yaml).expect("parses");
        match compile(&config, &PluginRegistry::default(), &mut ClientCache::default()) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| format!("{}: {}", p.at, p.message)).collect(),
        }
    }

    #[test]
    fn valid_config_compiles() {
        assert!(errors("_format_version: \"3.0\"\nservices:\n- name: a\n  url: http://127.0.0.1:9/x\n  routes:\n  - name: r\n    paths: [/a]\n").is_empty());
    }

    #[test]
    fn problems_name_the_entity_and_field() {
        let e = errors(
            r#"_format_version: "2.1"
services:
- name: a
  url: http://127.0.0.1:9
  tls_verify_depth: 3
  routes:
  - name: r
    paths: ["~/(bad"]
  - name: r2
    hosts: ["a.*.b"]
- name: a
  host: h
  connect_timeout: 0
routes:
- name: top
  service: missing
  paths: [/x]
plugins:
- name: rate-limiting
- name: no-such-plugin
vaults:
- name: env
upstreams:
- name: u
  use_srv_name: true
"#,
        );
        let want = [
            "_format_version: only \"3.0\" is supported",
            "vaults: the Kong entity `vaults` is not supported yet",
            "upstreams[0] (name \"u\"): `use_srv_name` is a Kong field this gateway does not support yet",
            "services[0] (name \"a\"): `tls_verify_depth` is a Kong field this gateway does not support yet",
            "services[1] (name \"a\"): duplicate service name or id `a`",
            "services[1] (name \"a\"): `connect_timeout` must be between 1",
            "routes[0] (name \"top\"): service `missing` does not exist",
            "services[0] (name \"a\").routes[0] (name \"r\").paths[0]: invalid regex `/(bad`",
            "services[0] (name \"a\").routes[1] (name \"r2\").hosts[0]: invalid host `a.*.b`",
            "plugins[0]: Kong plugin `rate-limiting` is not supported yet",
            "plugins[1]: unknown plugin `no-such-plugin`",
        ];
        for w in want {
            assert!(e.iter().any(|got| got.starts_with(w)), "missing {w:?} in {e:#?}");
        }
    }

    #[test]
    fn kong_defaults_of_unsupported_fields_are_accepted() {
        let e = errors(
            r#"_format_version: "3.0"
upstreams:
- name: u
  hash_on: none
  hash_fallback: none
  hash_on_cookie_path: /
  use_srv_name: false
  healthchecks:
    active: {healthy: {interval: 0}, unhealthy: {interval: 0}}
    passive: {unhealthy: {http_failures: 0}}
  targets: [{target: "127.0.0.1:9000"}]
services:
- name: s
  host: u
  tls_verify: null
  routes:
  - paths: [/]
    snis: []
    request_buffering: true
    path_handling: v0
"#,
        );
        assert!(e.is_empty(), "{e:#?}");
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let settings = UpstreamSettings::default();
        let cache = ClientCache::new(&settings);
        let key = ClientKey {
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                read: Duration::from_secs(1),
                write: Duration::from_secs(1),
            },
            tls: UpstreamTls::default(),
            h2: false,
            pool: Pool { max_idle: 1, idle_timeout: Duration::from_secs(1) },
        };
        let client = build_client(&key, &cache.dns);
        let mut names = HashMap::new();
        let mut t = |n: &str| {
            let dns = &mut |h: &str| cache.dns.entry(&mut names, h);
            target_runtime(n, 1, None, &Scheme::HTTP, Arc::default(), &client, dns).unwrap()
        };
        let b = Balancer::new(vec![(t("a"), 300), (t("b"), 100), (t("c"), 0)], BalancerSpec::round_robin());
        let mut counts = HashMap::new();
        for _ in 0..400 {
            *counts.entry(b.pick(None, None, &|_| true).unwrap().label.to_string()).or_insert(0) += 1;
        }
        assert_eq!(counts.get("a:1"), Some(&300));
        assert_eq!(counts.get("b:1"), Some(&100));
        assert_eq!(counts.get("c:1"), None);
        assert!(Balancer::new(vec![(t("z"), 0)], BalancerSpec::round_robin()).pick(None, None, &|_| true).is_none());
    }
}
