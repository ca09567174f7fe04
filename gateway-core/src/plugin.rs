//! Plugins: named, configured and ordered units of request handling.
//!
//! A plugin implements [`Plugin`]: a few phase hooks with no-op defaults, called in a loop by
//! the one service each route compiles to, and optionally a tower layer wrapped around the
//! upstream call. A [`PluginFactory`] builds a plugin from its typed config when a config is
//! compiled; a [`PluginRegistry`] maps names to factories so config files can name plugins an
//! embedding binary registered.
//!
//! ```
//! use std::ops::ControlFlow;
//! use gateway_core::plugin::{Plugin, PluginRegistry, RequestContext, Answer, typed_factory};
//! use gateway_core::body::ProxyBody;
//!
//! /// Refuses requests without an `x-tenant` header.
//! struct RequireTenant { header: http::HeaderName }
//!
//! impl Plugin for RequireTenant {
//!     fn access(&self, ctx: &mut RequestContext, req: &mut http::Request<ProxyBody>) -> ControlFlow<Answer> {
//!         if req.headers().contains_key(&self.header) {
//!             ControlFlow::Continue(())
//!         } else {
//!             ControlFlow::Break(ctx.error(http::StatusCode::BAD_REQUEST, "missing tenant"))
//!         }
//!     }
//! }
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { #[serde(default = "default_header")] header: String }
//! fn default_header() -> String { "x-tenant".into() }
//!
//! let mut registry = PluginRegistry::default();
//! registry.register(typed_factory("require-tenant", 1000, |c: Config, _build| {
//!     let header = http::HeaderName::from_bytes(c.header.as_bytes()).map_err(|e| e.to_string())?;
//!     Ok(RequireTenant { header })
//! }));
//! assert!(registry.contains("require-tenant"));
//! ```
//!
//! # Phases
//!
//! For each request that matches a route, the plugins of that route run in order (see
//! *Ordering*):
//!
//! 1. [`Plugin::access`] (or [`Plugin::access_async`] for plugins that opt in with
//!    [`Plugin::is_async`]): after routing, in plugin order. May answer the request; then no
//!    later `access` hook and no upstream call runs, but the response and log phases do.
//! 2. [`Plugin::before_upstream`]: after every `access` hook passed, in plugin order, just
//!    before the upstream call (the place to add headers computed from what `access` learnt).
//! 3. the upstream call, through the layers plugins contributed ([`Plugin::layer`]);
//! 4. [`Plugin::response`]: on the response head, in reverse plugin order (the onion:
//!    the plugin that saw the request first sees the response last);
//! 5. [`Plugin::log`]: at the end, in plugin order, with the final status.
//!
//! ```text
//!  request ──► access(P1) ─► access(P2) ─► before_upstream(P1, P2) ─► layers ─► upstream
//!  response ◄─ response(P1) ◄─ response(P2) ◄──────────────────────── layers ◄─┘
//! ```
//!
//! # Ordering
//!
//! Each plugin has a priority (Kong's defaults for Kong's plugin names); higher runs first on
//! the request. Ties break by declaration order in the config. An instance may override the
//! order with `ordering: {before: [names], after: [names]}` (Kong's `{before: {access: [...]}}`
//! shape is accepted too); a cycle is a config error on the routes it touches. The order of
//! every route is computed once, when the config is compiled, and `gateway routes` prints it.
//!
//! # Scope
//!
//! An instance applies globally, to a service, to a route, to a consumer, or to a combination.
//! Of several instances of the same plugin the most specific wins, in Kong's order:
//! consumer+route+service, consumer+route, consumer+service, route+service, consumer, route,
//! service, global. Consumer-specific instances take effect once an authentication plugin has
//! identified the consumer (authentication runs first by priority).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::body::{ProxyBody, ResponseBody};
use crate::proxy::{ConnInfo, error_response};

/// A response a plugin answers with.
pub type Answer = Response<ResponseBody>;

/// A boxed future, for [`Plugin::access_async`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The service a plugin layer wraps: the upstream call, erased once per route.
pub type UpstreamService =
    tower::util::BoxCloneSyncService<Request<ProxyBody>, Response<ResponseBody>, std::convert::Infallible>;

/// A layer a plugin wraps around the upstream call, applied once when the route is built.
pub type UpstreamLayer = Arc<dyn Fn(UpstreamService) -> UpstreamService + Send + Sync>;

/// One unit of request handling. Every hook has a no-op default; implement the ones you need.
/// See the module docs for when each runs.
pub trait Plugin: Send + Sync + 'static {
    /// After routing, in plugin order. Return `ControlFlow::Break(answer)` to answer the
    /// request yourself (401, 403, 429, ...). The request is the client's, as received: changes
    /// to its method, headers, query and body carry to the upstream; its path was already
    /// decided by routing (rewrite the upstream path in [`Plugin::before_upstream`]).
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        let _ = (ctx, req);
        ControlFlow::Continue(())
    }

    /// Opt in to [`Plugin::access_async`] (a Redis counter, an external auth call). Decided
    /// once when the route is built, not per request.
    fn is_async(&self) -> bool {
        false
    }

    /// The async access hook, used instead of [`Plugin::access`] when [`Plugin::is_async`].
    fn access_async<'a>(
        &'a self,
        ctx: &'a mut RequestContext,
        req: &'a mut Request<ProxyBody>,
    ) -> BoxFuture<'a, ControlFlow<Answer>> {
        Box::pin(std::future::ready(self.access(ctx, req)))
    }

    /// After every access hook passed, just before the upstream call, in plugin order.
    fn before_upstream(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) {
        let _ = (ctx, req);
    }

    /// On the response head (the upstream's, or one a plugin answered with), in reverse
    /// plugin order.
    fn response(&self, ctx: &mut RequestContext, resp: &mut Response<ResponseBody>) {
        let _ = (ctx, resp);
    }

    /// At the end, in plugin order, with the status sent to the client.
    fn log(&self, ctx: &RequestContext, status: StatusCode) {
        let _ = (ctx, status);
    }

    /// A tower layer to wrap around the upstream call of every route this instance applies to
    /// (retries, circuit breaking, body transforms). Asked once per route build, of the
    /// route's default instance only: a layer cannot depend on the consumer, so plugins that
    /// contribute one should refuse consumer scope ([`TypedFactory::no_consumer`]).
    fn layer(&self) -> Option<UpstreamLayer> {
        None
    }

    /// Adds this instance's own series to `/metrics` at scrape time (a circuit breaker's state
    /// per target, say). Called once per instance per scrape, with the name of one route it
    /// serves. Keep label values bounded: targets and routes, never paths or consumers.
    fn export_metrics(&self, route: &str, out: &mut crate::observe::MetricsExport) {
        let _ = (route, out);
    }
}

/// A consumer, as plugins see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// Index of the consumer in the compiled config; stable for one snapshot.
    pub index: usize,
    /// The consumer's id (its `id`, or else its username or custom_id).
    pub id: Arc<str>,
    /// `username`, when set.
    pub username: Option<Arc<str>>,
    /// `custom_id`, when set.
    pub custom_id: Option<Arc<str>>,
}

/// Per-request state shared by the plugins of a route: who is calling, what matched, what
/// authentication found, and typed values plugins leave for each other.
pub struct RequestContext {
    /// The connection the request came on.
    pub conn: ConnInfo,
    /// The matched route's name.
    pub route: Arc<str>,
    /// The route's service name, if it has one.
    pub service: Option<Arc<str>>,
    /// This request's id (also in the `X-Request-Id` headers).
    pub request_id: HeaderValue,
    /// When the gateway received the request.
    pub started: Instant,
    /// The consumer an authentication plugin identified.
    pub consumer: Option<Arc<ConsumerInfo>>,
    /// The identifier of the credential that authenticated the request.
    pub credential: Option<Arc<str>>,
    /// Values plugins pass to each other (an anonymous-consumer flag, a rate-limit key, ...).
    pub extensions: http::Extensions,
    /// The route's regex and the (normalised) path it matched, for [`RequestContext::uri_captures`].
    pub(crate) route_regex: Option<(Arc<regex::Regex>, Box<str>)>,
}

impl fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestContext")
            .field("route", &self.route)
            .field("request_id", &self.request_id)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl RequestContext {
    /// The client's address.
    pub fn client_addr(&self) -> SocketAddr {
        self.conn.client
    }

    /// The capture groups of the route's regex path on this request (Kong's `uri_captures`),
    /// when the route matched by a regex.
    pub fn uri_captures(&self) -> Option<regex::Captures<'_>> {
        let (re, path) = self.route_regex.as_ref()?;
        re.captures(path)
    }

    /// A Kong-shaped JSON error answer carrying this request's id.
    pub fn error(&self, status: StatusCode, message: &str) -> Answer {
        error_response(status, message, &self.request_id)
    }
}

/// What a factory can see while building a plugin: the consumers and their credentials.
#[derive(Debug)]
pub struct BuildContext<'a> {
    pub(crate) consumers: &'a [Arc<ConsumerInfo>],
    pub(crate) credentials: &'a [BTreeMap<String, Vec<Value>>],
    pub(crate) instance: String,
}

impl BuildContext<'_> {
    /// Where this instance is in the config (its `id` when it has one, else its position such
    /// as `services[0].plugins[1]`): the same in every replica reading the same config, so
    /// shared state (Redis keys) can be named after it.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Every consumer of the config.
    pub fn consumers(&self) -> &[Arc<ConsumerInfo>] {
        self.consumers
    }

    /// The credentials of one section (`keyauth_credentials`, `jwt_secrets`, `acls`, ...) of
    /// every consumer, as raw config values: the plugin that owns the section parses them.
    pub fn credentials<'s>(
        &'s self,
        section: &'s str,
    ) -> impl Iterator<Item = (&'s Arc<ConsumerInfo>, &'s Value)> + 's {
        self.consumers
            .iter()
            .zip(self.credentials)
            .flat_map(move |(c, sections)| sections.get(section).into_iter().flatten().map(move |v| (c, v)))
    }
}

/// Builds plugin instances of one name from their config.
pub trait PluginFactory: Send + Sync + 'static {
    /// The name configs use, e.g. `key-auth`.
    fn name(&self) -> &str;

    /// The default priority: higher runs first on the request.
    fn priority(&self) -> i32;

    /// Consumer credential sections this plugin owns (`keyauth_credentials` for key-auth).
    fn credential_sections(&self) -> &[&'static str] {
        &[]
    }

    /// Whether an instance may be scoped to a consumer. Authentication plugins say no (Kong's
    /// `no_consumer`): they run before any consumer is known, so a consumer-only instance would
    /// never run and would leave the route open. Such a config is refused.
    fn consumer_scope_allowed(&self) -> bool {
        true
    }

    /// Builds an instance from its `config` (an empty object when the config has none).
    fn build(&self, config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Plugin>, String>;
}

/// A factory from a typed config and a build function; the config is deserialized with serde
/// (use `#[serde(deny_unknown_fields)]` so typos are refused).
pub fn typed_factory<C, P, F>(name: &'static str, priority: i32, build: F) -> TypedFactory<C, F>
where
    C: DeserializeOwned + 'static,
    P: Plugin,
    F: Fn(C, &BuildContext<'_>) -> Result<P, String> + Send + Sync + 'static,
{
    TypedFactory { name, priority, sections: &[], no_consumer: false, build, _config: std::marker::PhantomData }
}

/// See [`typed_factory`].
pub struct TypedFactory<C, F> {
    name: &'static str,
    priority: i32,
    sections: &'static [&'static str],
    no_consumer: bool,
    build: F,
    _config: std::marker::PhantomData<fn() -> C>,
}

impl<C, F> TypedFactory<C, F> {
    /// Refuses instances scoped to a consumer (see [`PluginFactory::consumer_scope_allowed`]).
    #[must_use]
    pub fn no_consumer(mut self) -> Self {
        self.no_consumer = true;
        self
    }

    /// Declares the consumer credential sections this plugin owns.
    #[must_use]
    pub fn with_credentials(mut self, sections: &'static [&'static str]) -> Self {
        self.sections = sections;
        self
    }
}

impl<C, P, F> PluginFactory for TypedFactory<C, F>
where
    C: DeserializeOwned + 'static,
    P: Plugin,
    F: Fn(C, &BuildContext<'_>) -> Result<P, String> + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        self.name
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn credential_sections(&self) -> &[&'static str] {
        self.sections
    }
    fn consumer_scope_allowed(&self) -> bool {
        !self.no_consumer
    }
    fn build(&self, config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Plugin>, String> {
        let typed: C = serde_json::from_value(config.clone()).map_err(|e| format!("invalid config: {e}"))?;
        Ok(Arc::new((self.build)(typed, ctx)?))
    }
}

/// The plugins a config may name, by name.
#[derive(Clone, Default)]
pub struct PluginRegistry {
    factories: BTreeMap<String, Arc<dyn PluginFactory>>,
}

impl fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.factories.keys()).finish()
    }
}

impl PluginRegistry {
    /// Registers a factory under its name, replacing any earlier one of that name.
    pub fn register(&mut self, factory: impl PluginFactory) -> &mut Self {
        self.factories.insert(factory.name().to_string(), Arc::new(factory));
        self
    }

    /// True when `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// The factory registered as `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn PluginFactory>> {
        self.factories.get(name)
    }

    /// The factory that owns a consumer credential section.
    pub(crate) fn owner_of_section(&self, section: &str) -> Option<&str> {
        self.factories.values().find(|f| f.credential_sections().contains(&section)).map(|f| f.name())
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }
}
