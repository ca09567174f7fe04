//! An embeddable API gateway: a Kong-format config compiled into an immutable routing
//! snapshot, a streaming reverse proxy, and hot reload by atomic swap.
//!
//! # Serve on listeners the gateway owns
//!
//! ```no_run
//! use gateway_core::{Gateway, server::ServerSettings};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let gateway = Gateway::from_yaml(r#"
//! _format_version: "3.0"
//! services:
//!   - name: api
//!     url: http://127.0.0.1:9000
//!     routes:
//!       - paths: ["/api"]
//! "#)?;
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//!     let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//!     gateway.serve(vec![listener], ServerSettings::default(), shutdown).await?;
//!     Ok(())
//! }
//! ```
//!
//! # Use it as a tower service inside another server
//!
//! [`Gateway::service`] is a `tower::Service<http::Request<B>>` for any body `B`, so it can be
//! mounted in hyper, axum (`Router::fallback_service`) or any tower stack:
//!
//! ```
//! use gateway_core::Gateway;
//! use tower::ServiceExt;
//!
//! # #[tokio::main] async fn main() {
//! let gateway = Gateway::from_yaml("_format_version: \"3.0\"\n").unwrap();
//! let request = http::Request::get("http://example.com/nothing").body(String::new()).unwrap();
//! let response = gateway.service().oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 404); // no route yet
//! # }
//! ```
//!
//! # Write a plugin
//!
//! A plugin is a type with a few phase hooks (all optional), a typed config, and a factory in a
//! [`plugin::PluginRegistry`]; configs then name it like any other plugin:
//!
//! ```
//! use std::ops::ControlFlow;
//! use gateway_core::{Gateway, config::Config};
//! use gateway_core::body::ProxyBody;
//! use gateway_core::plugin::{Answer, Plugin, PluginRegistry, RequestContext, typed_factory};
//!
//! /// Adds a fixed header to every upstream request.
//! struct Stamp(http::HeaderValue);
//!
//! impl Plugin for Stamp {
//!     fn access(&self, _ctx: &mut RequestContext, req: &mut http::Request<ProxyBody>) -> ControlFlow<Answer> {
//!         req.headers_mut().insert("x-stamp", self.0.clone());
//!         ControlFlow::Continue(())
//!     }
//! }
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct StampConfig { value: String }
//!
//! let mut registry = PluginRegistry::default();
//! registry.register(typed_factory("stamp", 500, |c: StampConfig, _build| {
//!     http::HeaderValue::from_str(&c.value).map(Stamp).map_err(|e| e.to_string())
//! }));
//! let config = Config::from_yaml(r#"
//! _format_version: "3.0"
//! services:
//!   - name: api
//!     url: http://127.0.0.1:9000
//!     routes: [{ name: api, paths: ["/"] }]
//!     plugins: [{ name: stamp, config: { value: "v1" } }]
//! "#).unwrap();
//! let gateway = Gateway::builder().plugins(registry).build(&config).unwrap();
//! assert_eq!(gateway.routes()[0].plugins, vec!["stamp"]);
//! ```
//!
//! # Hot reload
//!
//! A new config compiles beside the old one; only a valid one replaces it, atomically. Requests
//! in flight finish on the snapshot they started on; connection pools of unchanged services
//! carry over.
//!
//! ```
//! use gateway_core::{Gateway, config::Config};
//!
//! let gateway = Gateway::from_yaml("_format_version: \"3.0\"\n").unwrap();
//! let bad = Config::from_yaml("_format_version: \"3.0\"\nroutes: [{paths: [\"no-slash\"]}]\n").unwrap();
//! let err = gateway.reload(&bad).unwrap_err();
//! assert!(err.to_string().contains("must start with `/`"));
//! assert_eq!(gateway.routes().len(), 0); // the old snapshot keeps serving
//! ```
//!
//! # Observe it
//!
//! Metrics (Prometheus), the access log and latency headers are set with
//! [`GatewayBuilder::observability`]; [`Gateway::admin`] is the read-only admin API with
//! `/metrics`, `/status` and the entities (see [`observe`] and [`admin`]).
//!
//! ```
//! use gateway_core::{Gateway, Observability, admin::AdminSettings, config::Config};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut observe = Observability::default();
//! observe.latency_headers = true;
//! let config = Config::from_yaml("_format_version: \"3.0\"\n").unwrap();
//! let gateway = Gateway::builder().observability(observe).build(&config).unwrap();
//! let admin = gateway.admin(AdminSettings::with_token("s3cret"));
//! let scrape = http::Request::get("/metrics").header("authorization", "Bearer s3cret").body(String::new()).unwrap();
//! let metrics = admin.oneshot(scrape).await.unwrap();
//! assert_eq!(metrics.status(), 200);
//! # }
//! ```

pub mod admin;
mod balance;
pub mod body;
mod chain;
pub mod config;
mod dns;
pub mod observe;
pub mod plugin;
pub mod proxy;
pub mod router;
pub mod server;
mod snapshot;
pub mod tls;

/// The ipnet crate, re-exported: [`GatewayBuilder::trusted_ips`] takes its `IpNet`s.
pub use ipnet;
/// The regex crate, re-exported: [`plugin::RequestContext::uri_captures`] returns its `Captures`.
pub use regex;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::net::TcpListener;

use crate::body::{BoxError, GatewayBody, ProxyBody};
use crate::config::{Config, ConfigError};
pub use crate::observe::Observability;
use crate::plugin::PluginRegistry;
pub use crate::proxy::ConnInfo;
use crate::server::ServerSettings;
use crate::snapshot::{ClientCache, Snapshot, compile};

/// State shared by every connection and by the reload path.
pub(crate) struct Shared {
    /// The snapshot requests use; replaced whole on reload.
    pub(crate) snapshot: ArcSwap<Snapshot>,
    /// Writer-side state: only compiles take this lock, never requests.
    compile_state: Mutex<CompileState>,
    /// The config the current snapshot was compiled from, for the admin API.
    pub(crate) config: ArcSwap<Config>,
    pub(crate) stats: Stats,
    /// `/readyz`: set by the embedder (the Kubernetes mode, until its caches are synced).
    pub(crate) ready: AtomicBool,
    pub(crate) started: Instant,
    /// Source objects the config source refused, for `/metrics` ([`Gateway::set_rejected`]).
    pub(crate) rejected: ArcSwap<Vec<observe::Rejected>>,
    /// Proxies whose `X-Forwarded-*` headers are believed ([`GatewayBuilder::trusted_ips`]).
    pub(crate) trusted_ips: Arc<[ipnet::IpNet]>,
}

/// Counters the server and the admin API share.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) connections_active: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    /// Idle keep-alive connections holding only their socket (see
    /// [`server::ServerSettings::release_idle_after`]).
    pub(crate) connections_idle_released: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) reloads_ok: AtomicU64,
    pub(crate) reloads_failed: AtomicU64,
}

struct CompileState {
    clients: ClientCache,
    plugins: PluginRegistry,
}

/// A gateway: the current routing snapshot plus what it needs to compile the next one.
///
/// Cheap to clone (a handle to shared state).
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("routes", &self.shared.snapshot.load().router.len()).finish()
    }
}

/// Builds a [`Gateway`].
#[derive(Debug, Default)]
pub struct GatewayBuilder {
    plugins: PluginRegistry,
    upstream: UpstreamSettings,
    observe: Observability,
    trusted_ips: Vec<ipnet::IpNet>,
}

/// How the gateway connects to upstreams: DNS and keep-alive pools.
///
/// The pool settings are the defaults for every upstream; an upstream entity can override
/// them with `keepalive_pool_size` and `keepalive_idle_timeout`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct UpstreamSettings {
    /// Nameservers for upstream host names, as Kong's `dns_resolver`; empty (the default)
    /// uses `/etc/resolv.conf`. `/etc/hosts` is read either way.
    pub dns_resolver: Vec<std::net::SocketAddr>,
    /// Idle keep-alive connections kept per upstream address, as Kong's
    /// `upstream_keepalive_pool_size` (default 512; 0 turns reuse off).
    pub keepalive_pool_size: usize,
    /// How long an idle keep-alive connection is kept, as Kong's
    /// `upstream_keepalive_idle_timeout` (default 60 s). Never longer than 90% of the
    /// service's `read_timeout`, so an idle connection is not reused just before its read
    /// timer fires.
    pub keepalive_idle_timeout: std::time::Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            dns_resolver: Vec::new(),
            keepalive_pool_size: 512,
            keepalive_idle_timeout: std::time::Duration::from_secs(60),
        }
    }
}

impl GatewayBuilder {
    /// Uses `registry` to resolve plugin names in configs.
    #[must_use]
    pub fn plugins(mut self, registry: PluginRegistry) -> Self {
        self.plugins = registry;
        self
    }

    /// Sets what is recorded about requests: metrics, the access log, latency headers (see
    /// [`observe`]).
    #[must_use]
    pub fn observability(mut self, observe: Observability) -> Self {
        self.observe = observe;
        self
    }

    /// Sets how upstreams are reached (DNS, keep-alive pools).
    #[must_use]
    pub fn upstream_settings(mut self, settings: UpstreamSettings) -> Self {
        self.upstream = settings;
        self
    }

    /// The proxies in front of the gateway whose `X-Forwarded-*` headers are believed, as
    /// Kong's `trusted_ips` (none by default). From a trusted peer, `X-Forwarded-For` is
    /// extended and the client it names (the right-most address that is not itself trusted)
    /// is the client for plugins, balancing and logs; its `X-Forwarded-Proto`, `-Host`,
    /// `-Port`, `-Path` and `-Prefix` pass through. From anyone else those headers are
    /// replaced with what the gateway sees.
    #[must_use]
    pub fn trusted_ips(mut self, nets: Vec<ipnet::IpNet>) -> Self {
        // Peers are compared in canonical form (`::ffff:10.0.0.1` is `10.0.0.1`), so the
        // nets are too.
        self.trusted_ips = nets
            .into_iter()
            .map(|n| match n {
                ipnet::IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                    Some(v4) if v6.prefix_len() >= 96 => {
                        ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(n, ipnet::IpNet::V4)
                    }
                    _ => n,
                },
                v4 => v4,
            })
            .collect();
        self
    }

    /// Compiles `config` and returns a gateway serving it.
    pub fn build(self, config: &Config) -> Result<Gateway, ConfigError> {
        let mut clients = ClientCache::new(&self.upstream);
        clients.observe = self.observe;
        let mut state = CompileState { clients, plugins: self.plugins };
        let snapshot = compile(config, &state.plugins, &mut state.clients)?;
        Ok(Gateway {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                compile_state: Mutex::new(state),
                config: ArcSwap::from_pointee(config.clone()),
                stats: Stats::default(),
                ready: AtomicBool::new(true),
                started: Instant::now(),
                rejected: ArcSwap::default(),
                trusted_ips: self.trusted_ips.into(),
            }),
        })
    }
}

/// One line of the compiled route table, see [`Gateway::routes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLine {
    /// The route's name (or id, or position in the config).
    pub route: String,
    /// Hosts, or `*`.
    pub hosts: String,
    /// The path criterion.
    pub path: String,
    /// Methods, or `*`.
    pub methods: String,
    /// The service name, or `-`.
    pub service: String,
    /// The route's plugins in execution order.
    pub plugins: Vec<String>,
}

impl Gateway {
    /// A builder, to set a plugin registry.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// Compiles `config` with no plugins registered.
    pub fn new(config: &Config) -> Result<Gateway, ConfigError> {
        Gateway::builder().build(config)
    }

    /// Parses and compiles a YAML (or JSON) config.
    pub fn from_yaml(text: &str) -> Result<Gateway, ConfigError> {
        Gateway::new(&Config::parse(text)?)
    }

    /// Compiles `config` beside the current snapshot and swaps it in. On error nothing
    /// changes: the current snapshot keeps serving.
    pub fn reload(&self, config: &Config) -> Result<(), ConfigError> {
        let mut state = self.shared.compile_state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        let snapshot = match compile(config, &state.plugins, &mut state.clients) {
            Ok(s) => s,
            Err(e) => {
                self.shared.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.shared.snapshot.store(Arc::new(snapshot));
        self.shared.config.store(Arc::new(config.clone()));
        self.shared.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Checks a config the way [`Gateway::reload`] would, without swapping anything in.
    pub fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let state = self.shared.compile_state.lock().unwrap_or_else(|p| p.into_inner());
        compile(config, &state.plugins, &mut ClientCache::new(&state.clients.settings)).map(drop)
    }

    /// The compiled route table in precedence order: the first line that matches a request
    /// serves it.
    pub fn routes(&self) -> Vec<RouteLine> {
        let snap = self.shared.snapshot.load();
        snap.router
            .describe()
            .into_iter()
            .map(|d| {
                let rt = &snap.routes[d.route];
                RouteLine {
                    route: snap.route_names[d.route].to_string(),
                    hosts: d.hosts,
                    path: d.path,
                    methods: d.methods,
                    service: rt.service.as_ref().map_or_else(|| "-".to_string(), |s| s.name.to_string()),
                    plugins: rt.chain.names(),
                }
            })
            .collect()
    }

    /// This gateway as a tower service. Always ready; see [`GatewayService`].
    pub fn service(&self) -> GatewayService {
        GatewayService { shared: self.shared.clone() }
    }

    /// The read-only admin API (status, entities, upstream health, effective config) as a
    /// tower service, to serve on an admin listener; see [`admin`].
    pub fn admin(&self, settings: admin::AdminSettings) -> admin::AdminService {
        admin::AdminService::new(self.shared.clone(), settings)
    }

    /// The plugin instances of the current config whose plugin refused their config: where
    /// each is (`services[0] (name "x").routes[1].plugins[0]`) and why. The routes such a
    /// plugin applies to answer 500 rather than run without it; everything else serves.
    pub fn plugin_failures(&self) -> Vec<config::Problem> {
        self.shared.snapshot.load().plugin_failures.to_vec()
    }

    /// Marks the gateway ready or not for the admin API's `/readyz` (ready from the start;
    /// a Kubernetes mode clears it until its caches are synced).
    pub fn set_ready(&self, ready: bool) {
        self.shared.ready.store(ready, Ordering::Relaxed);
    }

    /// Reports the source objects the last translation refused (Kubernetes objects with a bad
    /// annotation, a missing Secret, ...), counted by kind and reason, for the
    /// `gateway_source_objects_rejected` gauge on `/metrics`. Replaces the previous report.
    pub fn set_rejected(&self, rejected: Vec<observe::Rejected>) {
        self.shared.rejected.store(Arc::new(rejected));
    }

    /// Serves on `listeners` until `shutdown` resolves, then drains gracefully.
    pub async fn serve(
        &self,
        listeners: Vec<TcpListener>,
        settings: ServerSettings,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        server::serve(self.shared.clone(), listeners, Vec::new(), settings, shutdown).await
    }

    /// Like [`Gateway::serve`], plus TLS listeners. Their certificates come from the config's
    /// `certificates` and `snis` (see [`tls`]) and follow reloads; a client whose name no
    /// certificate covers gets the default one, or a self-signed one made at startup.
    pub async fn serve_tls(
        &self,
        listeners: Vec<TcpListener>,
        tls_listeners: Vec<TcpListener>,
        settings: ServerSettings,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        server::serve(self.shared.clone(), listeners, tls_listeners, settings, shutdown).await
    }
}

/// The gateway as a `tower::Service`. It is always ready (`poll_ready` returns `Ready` at once)
/// and does all its work in `call`; it never returns an error, every failure is an HTTP answer.
///
/// The client address comes from a [`ConnInfo`] in the request extensions when present.
#[derive(Clone)]
pub struct GatewayService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GatewayService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService").finish_non_exhaustive()
    }
}

impl<B> tower_service::Service<http::Request<B>> for GatewayService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().copied().unwrap_or_default();
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let snapshot = self.shared.snapshot.load_full();
        let req = req.map(ProxyBody::from_body);
        let values = proxy::ConnValues::new(&conn, &self.shared.trusted_ips);
        Box::pin(proxy::handle(snapshot, req, conn, &values, None))
    }
}
