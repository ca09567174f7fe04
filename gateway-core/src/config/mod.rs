//! The one config model: Kong's declarative format (`_format_version: "3.0"`), read from YAML
//! or JSON.
//!
//! ```
//! use gateway_core::config::Config;
//!
//! let config = Config::from_yaml(r#"
//! _format_version: "3.0"
//! services:
//!   - name: echo
//!     url: http://127.0.0.1:9000/api
//!     routes:
//!       - name: echo-route
//!         paths: ["/echo"]
//! "#).unwrap();
//! assert_eq!(config.services[0].routes[0].paths, vec!["/echo".to_string()]);
//! ```
//!
//! Every entity refuses unknown fields by name. Fields and entities that Kong has but this
//! gateway does not implement yet are accepted only when they hold Kong's default (so a file
//! exported by Kong loads unchanged); any other value is refused with a message that says the
//! feature is not supported yet, never silently dropped. Semantic checks (references, URLs,
//! regexes, ranges) happen when the config is compiled, see [`crate::Gateway`].

mod load;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use load::{ConfigError, Problem};

/// Kong's default for `connect_timeout`, `read_timeout` and `write_timeout`, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Kong's default number of connection-level retries of a service.
pub const DEFAULT_RETRIES: u32 = 5;
/// Kong's default target weight.
pub const DEFAULT_WEIGHT: u32 = 100;

/// A whole declarative config.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Must be `"3.0"`.
    #[serde(rename = "_format_version")]
    pub format_version: String,
    /// Kong's flag for hashing credentials on load; accepted and ignored.
    #[serde(rename = "_transform", default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<bool>,
    /// Kong's workspace; only `default` exists here.
    #[serde(rename = "_workspace", default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// A free-form comment.
    #[serde(rename = "_comment", default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Services (upstream APIs), each with nested routes and plugins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Top-level routes, each naming its service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Load-balanced upstreams, named by a service's host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
    /// Top-level targets, each naming its upstream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Target>,
    /// Plugins: global, or scoped to a service, route or consumer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<Plugin>,
    /// Consumers of the APIs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<Consumer>,
    /// TLS certificates served to clients, chosen by SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
    /// Top-level SNIs, each naming its certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snis: Vec<Sni>,
    /// CA certificates that services name to verify their upstreams.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates: Vec<CaCertificate>,
    // Kong entities that are not supported yet (refused when non-empty).
    #[serde(default, skip_serializing)]
    pub(crate) vaults: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) keyauth_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) jwt_secrets: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) acls: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) basicauth_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) hmacauth_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) oauth2_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) consumer_groups: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) key_sets: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) keys: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) filter_chains: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) parameters: Option<Value>,
}

/// A reference to another entity: its name or id, or an object with either.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum EntityRef {
    /// `service: my-service`
    Name(String),
    /// `service: { name: my-service }` or `service: { id: ... }`
    Object {
        /// The entity's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The entity's name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

impl EntityRef {
    /// The name or id this reference names.
    pub fn key(&self) -> Option<&str> {
        match self {
            EntityRef::Name(n) => Some(n),
            EntityRef::Object { name: Some(n), .. } => Some(n),
            EntityRef::Object { id: Some(i), .. } => Some(i),
            EntityRef::Object { .. } => None,
        }
    }
}

/// The protocol a service speaks to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// Plain HTTP.
    Http,
    /// HTTP/1.1 over TLS, the upstream's certificate verified (see [`Service::tls_verify`]).
    Https,
    /// gRPC: HTTP/2 with prior knowledge (h2c).
    Grpc,
    /// gRPC over TLS (HTTP/2 by ALPN).
    Grpcs,
    /// TCP streams (not supported).
    Tcp,
    /// TLS streams (not supported).
    Tls,
    /// TLS passthrough (not supported).
    #[serde(rename = "tls_passthrough")]
    TlsPassthrough,
    /// UDP (not supported).
    Udp,
    /// WebSocket (not supported yet as a service protocol).
    Ws,
    /// Secure WebSocket (not supported yet as a service protocol).
    Wss,
}

/// An upstream API.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Optional id (any string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Unique name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Shorthand for protocol, host, port and path: `http://host:port/path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Protocol to the upstream (default `http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ServiceProtocol>,
    /// Upstream host name or IP, or the name of an `upstreams` entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Upstream port (default 80 for http, 443 for https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path prefix added to upstream requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Connection-level retries (connection refused or reset before a response), default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Timeout to establish an upstream connection, ms (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<u64>,
    /// Timeout between two successive reads from the upstream, ms (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_timeout: Option<u64>,
    /// Timeout between two successive writes to the upstream, ms (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_timeout: Option<u64>,
    /// `false` takes the service and its routes out of the routing table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Routes of this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Plugins scoped to this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<Plugin>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
    /// Verify the upstream's certificate (`https` and `grpcs`). Default `true`, unlike Kong,
    /// whose default follows an nginx setting that is off: an unverified upstream is one
    /// anyone on the path can impersonate. `false` is allowed and logged as a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_verify: Option<bool>,
    /// The CA certificates (ids or names of `ca_certificates` entities) that verify the
    /// upstream; when empty, the system's roots do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<Vec<String>>,
    /// Kong fields not supported yet.
    #[serde(default, skip_serializing)]
    pub(crate) tls_verify_depth: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) client_certificate: Option<Value>,
}

/// Route protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteProtocol {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
    /// gRPC in cleartext (h2c); matches like `http`.
    Grpc,
    /// gRPC over TLS; matches like `https`.
    Grpcs,
    /// TCP (not supported).
    Tcp,
    /// TLS (not supported).
    Tls,
    /// TLS passthrough (not supported).
    #[serde(rename = "tls_passthrough")]
    TlsPassthrough,
    /// UDP (not supported).
    Udp,
    /// WebSocket (not supported yet as a route protocol).
    Ws,
    /// Secure WebSocket (not supported yet as a route protocol).
    Wss,
}

/// How a route's `paths` match: Kong's meaning, or the two Kubernetes Ingress kinds.
///
/// This field is an extension of Kong's model, used by the Ingress adapter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathType {
    /// Kong: a plain path is a character prefix, a path starting with `~` is a regex.
    #[default]
    Kong,
    /// Ingress `Exact`: the whole path, case-sensitive.
    Exact,
    /// Ingress `Prefix`: prefix by path element; a trailing slash is ignored.
    ElementPrefix,
}

/// A rule that sends matching requests to a service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Optional id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Unique name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Protocols the route accepts (default `[http, https]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<RouteProtocol>>,
    /// Methods; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Hosts: exact, `*.example.com` or `example.*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Paths: plain prefixes, or regexes starting with `~`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Header criteria: name to accepted values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
    /// Status used when a route is matched over a protocol it does not accept (default 426).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_redirect_status_code: Option<u16>,
    /// Order among regex paths (higher first, default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex_priority: Option<i64>,
    /// Remove the matched path prefix before proxying (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_path: Option<bool>,
    /// Send the client's Host header to the upstream (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserve_host: Option<bool>,
    /// Kong's path joining algorithm; only `v0` (the default) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_handling: Option<String>,
    /// Accepted; bodies are always streamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_buffering: Option<bool>,
    /// Accepted; bodies are always streamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_buffering: Option<bool>,
    /// Extension: how `paths` match (default: Kong's rules).
    #[serde(default, skip_serializing_if = "is_default")]
    pub path_type: PathType,
    /// Extension: `*.example.com` hosts match exactly one label (Kubernetes Ingress rule).
    #[serde(default, skip_serializing_if = "is_default")]
    pub wildcard_single_label: bool,
    /// The service, for a top-level route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<EntityRef>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Plugins scoped to this route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<Plugin>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) snis: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) sources: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) destinations: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) expression: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) priority: Option<Value>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Load-balancing algorithms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Weighted round-robin.
    #[default]
    RoundRobin,
    /// Consistent hashing on `hash_on` (then `hash_fallback`): the same key goes to the
    /// same target while the target set is unchanged.
    ConsistentHashing,
    /// Fewest requests in flight, relative to weight.
    LeastConnections,
    /// Lowest peak-EWMA response time (times requests in flight), of two picked at random.
    Latency,
}

/// A named, load-balanced set of targets.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Optional id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The name services use as their host.
    pub name: String,
    /// Balancing algorithm (default round-robin).
    #[serde(default, skip_serializing_if = "is_default")]
    pub algorithm: Algorithm,
    /// Host header sent to targets (default: the service's host rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_header: Option<String>,
    /// Kong's ring-balancer size; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Targets of this upstream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Target>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
    /// Active and passive health checks (Kong's shape and defaults: all off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthchecks: Option<Healthchecks>,
    /// consistent-hashing: what to hash (default `none`: round-robin-like spread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// consistent-hashing: what to hash when `hash_on` gives nothing (not `cookie`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_fallback: Option<HashOn>,
    /// The header `hash_on: header` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on_header: Option<String>,
    /// The header `hash_fallback: header` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_fallback_header: Option<String>,
    /// The cookie `hash_on: cookie` reads, and sets (with a random value) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on_cookie: Option<String>,
    /// The `Path` of the cookie set for `hash_on: cookie` (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on_cookie_path: Option<String>,
    /// The query argument `hash_on: query_arg` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on_query_arg: Option<String>,
    /// The query argument `hash_fallback: query_arg` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_fallback_query_arg: Option<String>,
    /// The route regex capture (name or number) `hash_on: uri_capture` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on_uri_capture: Option<String>,
    /// The route regex capture `hash_fallback: uri_capture` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_fallback_uri_capture: Option<String>,
    /// Idle keep-alive connections kept per target address; overrides the gateway-wide
    /// `--upstream-keepalive-pool-size` for this upstream (0: no reuse). An extension to Kong's
    /// schema, which has this only gateway-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_pool_size: Option<u32>,
    /// Seconds an idle keep-alive connection is kept; overrides the gateway-wide
    /// `--upstream-keepalive-idle-timeout` for this upstream. An extension to Kong's schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_idle_timeout: Option<f64>,
    #[serde(default, skip_serializing)]
    pub(crate) client_certificate: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) use_srv_name: Option<Value>,
}

/// What consistent hashing hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// Nothing: spread like round-robin.
    #[default]
    None,
    /// The authenticated consumer's id (set by an auth plugin).
    Consumer,
    /// The client's address.
    Ip,
    /// A request header (`hash_on_header`).
    Header,
    /// A cookie (`hash_on_cookie`), set by the gateway when the client has none.
    Cookie,
    /// The request path, as routed (normalised).
    Path,
    /// A query argument (`hash_on_query_arg`).
    QueryArg,
    /// A capture of the route's regex path (`hash_on_uri_capture`).
    UriCapture,
}

/// Kong's upstream `healthchecks`, with Kong's defaults (every check off).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Healthchecks {
    /// Probes the gateway sends to each target.
    pub active: ActiveHealthcheck,
    /// Counting outcomes of proxied traffic.
    pub passive: PassiveHealthcheck,
    /// Kong's threshold of healthy weight; only 0 (off) is supported.
    pub threshold: f64,
}

/// Active health checks: HTTP(S) or TCP probes on an interval.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActiveHealthcheck {
    /// `http`, `https` or `tcp`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Path probed (HTTP types).
    pub http_path: String,
    /// Probe timeout in seconds.
    pub timeout: f64,
    /// How many targets are probed at once.
    pub concurrency: u32,
    /// Verify the target's certificate on `https` probes.
    pub https_verify_certificate: bool,
    /// SNI of `https` probes (default: the target's host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_sni: Option<String>,
    /// Extra probe headers: name to values.
    pub headers: std::collections::BTreeMap<String, Vec<String>>,
    /// When a target counts as healthy.
    pub healthy: ActiveHealthy,
    /// When a target counts as unhealthy.
    pub unhealthy: ActiveUnhealthy,
}

impl Default for ActiveHealthcheck {
    fn default() -> Self {
        ActiveHealthcheck {
            kind: "http".into(),
            http_path: "/".into(),
            timeout: 1.0,
            concurrency: 10,
            https_verify_certificate: true,
            https_sni: None,
            headers: Default::default(),
            healthy: ActiveHealthy::default(),
            unhealthy: ActiveUnhealthy::default(),
        }
    }
}

/// Active checks: the healthy side.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActiveHealthy {
    /// Seconds between probes of a healthy target (0: none).
    pub interval: f64,
    /// Statuses that count as a success.
    pub http_statuses: Vec<u16>,
    /// Successes in a row that make an unhealthy target healthy (0: never).
    pub successes: u32,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy { interval: 0.0, http_statuses: vec![200, 302], successes: 0 }
    }
}

/// Active checks: the unhealthy side.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActiveUnhealthy {
    /// Seconds between probes of an unhealthy target (0: none).
    pub interval: f64,
    /// Statuses that count as an HTTP failure.
    pub http_statuses: Vec<u16>,
    /// HTTP failures in a row that make a target unhealthy (0: never).
    pub http_failures: u32,
    /// Connection failures in a row that make a target unhealthy (0: never).
    pub tcp_failures: u32,
    /// Timeouts in a row that make a target unhealthy (0: never).
    pub timeouts: u32,
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: 0.0,
            http_statuses: vec![429, 404, 500, 501, 502, 503, 504, 505],
            http_failures: 0,
            tcp_failures: 0,
            timeouts: 0,
        }
    }
}

/// Passive checks: outcomes of proxied requests.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthcheck {
    /// `http` or `https` (the same here).
    #[serde(rename = "type")]
    pub kind: String,
    /// The healthy side.
    pub healthy: PassiveHealthy,
    /// The unhealthy side.
    pub unhealthy: PassiveUnhealthy,
}

impl Default for PassiveHealthcheck {
    fn default() -> Self {
        PassiveHealthcheck {
            kind: "http".into(),
            healthy: PassiveHealthy::default(),
            unhealthy: PassiveUnhealthy::default(),
        }
    }
}

/// Passive checks: the healthy side.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthy {
    /// Statuses that count as a success.
    pub http_statuses: Vec<u16>,
    /// Successes in a row that make an unhealthy target healthy (0: never).
    pub successes: u32,
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: vec![
                200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 306, 307, 308,
            ],
            successes: 0,
        }
    }
}

/// Passive checks: the unhealthy side.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveUnhealthy {
    /// Statuses that count as an HTTP failure.
    pub http_statuses: Vec<u16>,
    /// HTTP failures in a row that make a target unhealthy (0: never).
    pub http_failures: u32,
    /// Connection failures in a row that make a target unhealthy (0: never).
    pub tcp_failures: u32,
    /// Timeouts in a row that make a target unhealthy (0: never).
    pub timeouts: u32,
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy { http_statuses: vec![429, 500, 503], http_failures: 0, tcp_failures: 0, timeouts: 0 }
    }
}

/// One backend address of an upstream.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Optional id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `host:port` (port defaults to 8000, as in Kong).
    pub target: String,
    /// Relative weight, 0 to 65535 (default 100); 0 takes the target out of rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The upstream, for a top-level target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<EntityRef>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
}

/// A plugin instance.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    /// Optional id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The plugin's registered name, e.g. `key-auth`.
    pub name: String,
    /// Optional instance name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name: Option<String>,
    /// The plugin's own configuration, checked by its factory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    /// `false` disables this instance (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Protocols the plugin runs on; accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<RouteProtocol>>,
    /// Scope: a service (top-level plugins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<EntityRef>,
    /// Scope: a route (top-level plugins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<EntityRef>,
    /// Scope: a consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<EntityRef>,
    /// Per-instance order override (Kong's dynamic ordering), checked by the plugin layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Value>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
}

/// A consumer of the APIs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Optional id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Unique user name; this or `custom_id` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Unique external id; this or `username` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    /// Plugins scoped to this consumer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<Plugin>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) keyauth_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) jwt_secrets: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) acls: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) basicauth_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) hmacauth_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) oauth2_credentials: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) groups: Option<Value>,
}

impl Consumer {
    /// The credential sections of this consumer (`keyauth_credentials`, `jwt_secrets`, ...).
    pub fn credential_sections(&self) -> [(&'static str, Option<&Value>); 7] {
        [
            ("keyauth_credentials", self.keyauth_credentials.as_ref()),
            ("jwt_secrets", self.jwt_secrets.as_ref()),
            ("acls", self.acls.as_ref()),
            ("basicauth_credentials", self.basicauth_credentials.as_ref()),
            ("hmacauth_credentials", self.hmacauth_credentials.as_ref()),
            ("oauth2_credentials", self.oauth2_credentials.as_ref()),
            ("groups", self.groups.as_ref()),
        ]
    }
}

impl Config {
    /// Top-level credential entities (each item names its `consumer`).
    pub fn top_level_credentials(&self) -> [(&'static str, Option<&Value>); 6] {
        [
            ("keyauth_credentials", self.keyauth_credentials.as_ref()),
            ("jwt_secrets", self.jwt_secrets.as_ref()),
            ("acls", self.acls.as_ref()),
            ("basicauth_credentials", self.basicauth_credentials.as_ref()),
            ("hmacauth_credentials", self.hmacauth_credentials.as_ref()),
            ("oauth2_credentials", self.oauth2_credentials.as_ref()),
        ]
    }
}

/// A certificate and its private key, PEM-encoded: inline, or a path to a PEM file (any value
/// that does not contain `-----BEGIN` is read as a path when the config is compiled).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Optional id, what top-level `snis` name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The certificate chain (leaf first), PEM or a file path.
    pub cert: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1), PEM or a file path.
    pub key: String,
    /// Server names served with this certificate: exact (`api.example.com`), or a wildcard
    /// at either end (`*.example.com`, `example.*`). The certificate named by `*`, or else
    /// the first with no SNIs at all, serves clients that send no (or an unknown) name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snis: Vec<SniName>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) cert_alt: Option<Value>,
    #[serde(default, skip_serializing)]
    pub(crate) key_alt: Option<Value>,
}

/// A server name nested in a certificate: `api.example.com` or `{ name: api.example.com }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SniName {
    /// `- api.example.com`
    Name(String),
    /// `- name: api.example.com`
    Object {
        /// The server name.
        name: String,
        /// Optional id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Free-form tags.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tags: Vec<String>,
    },
}

impl SniName {
    /// The server name.
    pub fn name(&self) -> &str {
        match self {
            SniName::Name(n) | SniName::Object { name: n, .. } => n,
        }
    }
}

/// A top-level SNI: a server name and the certificate that serves it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sni {
    /// Optional id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The server name (see [`Certificate::snis`] for wildcards).
    pub name: String,
    /// The certificate, by id.
    pub certificate: EntityRef,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
}

/// A CA certificate (PEM, inline or a file path) that services name in `ca_certificates`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaCertificate {
    /// The id services use to name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// One or more PEM certificates, or a file path.
    pub cert: String,
    /// Kong's digest of `cert`; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_digest: Option<String>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    /// Kong bookkeeping, ignored.
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
}

/// Lists the Kong-only fields of an entity that hold something other than Kong's default.
pub(crate) fn unsupported_fields(fields: &[(&'static str, &Option<Value>, &[Value])]) -> Vec<&'static str> {
    fields
        .iter()
        .filter_map(|(name, value, defaults)| match value {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(v) if defaults.contains(v) => None,
            Some(_) => Some(*name),
        })
        .collect()
}
