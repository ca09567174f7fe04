//! The read-only admin API, in Kong's shapes.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once a config is loaded and the gateway is marked ready ([`Gateway::set_ready`]), else 503 |
//! | `GET /status` | connections, requests served, config hash, snapshot age, uptime |
//! | `GET /services`, `/services/{name or id}` | services (routes not nested, as Kong lists them) |
//! | `GET /routes`, `/routes/{name or id}` | every route, nested ones with their `service` |
//! | `GET /upstreams`, `/upstreams/{name}` | upstreams with their targets |
//! | `GET /upstreams/{name}/health` | per target: `HEALTHY`, `UNHEALTHY` (with why) or `HEALTHCHECKS_OFF`, and the DNS addresses |
//! | `GET /plugins` | every plugin instance with its scope; secret-looking config values redacted |
//! | `GET /consumers`, `/consumers/{username, custom_id or id}` | consumers, never their credentials |
//! | `GET /config` | the effective config; credentials and secrets redacted |
//! | `GET /metrics` | Prometheus (OpenMetrics text): see [`observe`](crate::observe) |
//!
//! Lists are `{"data": [...], "next": null}` as in Kong. Nothing here changes the gateway.
//!
//! With a token set ([`AdminSettings::token`]), every path but `/healthz` and `/readyz` (which
//! disclose nothing, and which Kubernetes probes call without credentials) needs it as
//! `Authorization: Bearer TOKEN` or Kong's `Kong-Admin-Token: TOKEN`; it is compared in
//! constant time. Without one, the admin listener should stay on loopback, which is the
//! binary's default.
//!
//! ```
//! use gateway_core::Gateway;
//! use gateway_core::admin::AdminSettings;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let gateway = Gateway::from_yaml("_format_version: \"3.0\"\n").unwrap();
//! let admin = gateway.admin(AdminSettings::default());
//! let resp = admin.oneshot(http::Request::get("/status").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! # }
//! ```
//!
//! [`Gateway::set_ready`]: crate::Gateway::set_ready

use std::convert::Infallible;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::body::ResponseBody;
use crate::config::Config;
use crate::observe::GatewayCollector;

/// Settings of the admin API.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AdminSettings {
    /// When set, requests must carry it (`Authorization: Bearer` or `Kong-Admin-Token`).
    pub token: Option<String>,
}

impl AdminSettings {
    /// Settings that require `token`.
    pub fn with_token(token: impl Into<String>) -> Self {
        AdminSettings { token: Some(token.into()) }
    }
}

/// The admin API as a tower service; see the [module docs](self).
#[derive(Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
    token: Option<Arc<[u8]>>,
    registry: Arc<prometheus_client::registry::Registry>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService").field("token", &self.token.as_ref().map(|_| "[redacted]")).finish()
    }
}

impl AdminService {
    pub(crate) fn new(shared: Arc<Shared>, settings: AdminSettings) -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(GatewayCollector { shared: shared.clone() }));
        AdminService { shared, token: settings.token.map(|t| Arc::from(t.into_bytes())), registry: Arc::new(registry) }
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else { return true };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .or_else(|| req.headers().get("kong-admin-token").map(HeaderValue::as_bytes));
        given.is_some_and(|g| bool::from(g.ct_eq(token)))
    }

    fn answer<B>(&self, req: &Request<B>) -> (StatusCode, Value) {
        let path = req.uri().path().trim_end_matches('/');
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        if !matches!(segments.as_slice(), ["healthz"] | ["readyz"]) && !self.authorized(req) {
            return (StatusCode::UNAUTHORIZED, json!({"message": "Unauthorized: a valid admin token is required"}));
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"message": "the admin API is read-only; change the config file instead"}),
            );
        }
        let config = self.shared.config.load();
        let not_found = || (StatusCode::NOT_FOUND, json!({"message": "Not found"}));
        let found = |v: Option<Value>| v.map_or_else(not_found, |v| (StatusCode::OK, v));
        match segments.as_slice() {
            ["healthz"] => (StatusCode::OK, json!({"status": "ok"})),
            ["readyz"] => {
                if self.shared.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, json!({"status": "ready"}))
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, json!({"status": "not ready"}))
                }
            }
            ["status"] => (StatusCode::OK, self.status(&config)),
            ["services"] => (StatusCode::OK, list(config.services.iter().map(service_json))),
            ["services", key] => found(
                config
                    .services
                    .iter()
                    .find(|s| s.name.as_deref() == Some(key) || s.id.as_deref() == Some(key))
                    .map(service_json),
            ),
            ["routes"] => (StatusCode::OK, list(routes(&config).into_iter().map(|(_, r)| r))),
            ["routes", key] => {
                found(routes(&config).into_iter().find(|(keys, _)| keys.iter().any(|k| k == key)).map(|(_, r)| r))
            }
            ["upstreams"] => (StatusCode::OK, list(config.upstreams.iter().map(|u| upstream_json(&config, u)))),
            ["upstreams", name] => found(
                config
                    .upstreams
                    .iter()
                    .find(|u| u.name == *name || u.id.as_deref() == Some(name))
                    .map(|u| upstream_json(&config, u)),
            ),
            ["upstreams", name, "health"] => found(self.health(name)),
            ["plugins"] => (StatusCode::OK, list(plugins(&config))),
            ["consumers"] => (StatusCode::OK, list(config.consumers.iter().map(to_json))),
            ["consumers", key] => found(
                config
                    .consumers
                    .iter()
                    .find(|c| [&c.username, &c.custom_id, &c.id].iter().any(|k| k.as_deref() == Some(key)))
                    .map(to_json),
            ),
            ["config"] => (StatusCode::OK, effective_config(&config)),
            _ => not_found(),
        }
    }

    fn status(&self, config: &Config) -> Value {
        let stats = &self.shared.stats;
        let snapshot = self.shared.snapshot.load();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(config).unwrap_or_default().hash(&mut hasher);
        json!({
            "server": {
                "connections_active": stats.connections_active.load(Ordering::Relaxed),
                "connections_accepted": stats.connections_accepted.load(Ordering::Relaxed),
                "connections_idle_released": stats.connections_idle_released.load(Ordering::Relaxed),
                "total_requests": stats.requests.load(Ordering::Relaxed),
            },
            "configuration_hash": format!("{:016x}", hasher.finish()),
            "routes": snapshot.routes.len(),
            "config_age_seconds": snapshot.compiled_at.elapsed().as_secs_f64(),
            "reloads": {
                "succeeded": stats.reloads_ok.load(Ordering::Relaxed),
                "failed": stats.reloads_failed.load(Ordering::Relaxed),
            },
            "uptime_seconds": self.shared.started.elapsed().as_secs_f64(),
            "version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn health(&self, name: &str) -> Option<Value> {
        let snapshot = self.shared.snapshot.load();
        let up = snapshot.upstreams.iter().find(|u| &*u.name == name)?;
        let data: Vec<Value> = up
            .targets
            .iter()
            .map(|t| {
                let (health, reason) = if !up.checked {
                    ("HEALTHCHECKS_OFF", None)
                } else {
                    match t.state.reason() {
                        None => ("HEALTHY", None),
                        Some(why) => ("UNHEALTHY", Some(why)),
                    }
                };
                let mut v = json!({"target": &*t.label, "weight": t.weight, "health": health});
                if let Some(why) = reason {
                    v["reason"] = json!(why);
                }
                if let Some(addrs) = t.dns.as_ref().and_then(|d| d.addresses()) {
                    v["data"] = json!({"addresses": addrs.iter().map(ToString::to_string).collect::<Vec<_>>()});
                }
                v
            })
            .collect();
        Some(json!({"data": data, "next": null}))
    }
}

impl<B> tower_service::Service<Request<B>> for AdminService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.uri().path() == "/metrics" && self.authorized(&req) && req.method() == Method::GET {
            let mut text = String::new();
            let resp = match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                Ok(()) => {
                    let mut resp = Response::new(ResponseBody::full(text));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                    );
                    resp
                }
                Err(_) => {
                    let mut resp = Response::new(ResponseBody::empty());
                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    resp
                }
            };
            return Box::pin(async move { Ok(resp) });
        }
        let (status, body) = self.answer(&req);
        let mut resp = Response::new(if req.method() == Method::HEAD {
            ResponseBody::empty()
        } else {
            ResponseBody::full(serde_json::to_vec(&body).unwrap_or_default())
        });
        *resp.status_mut() = status;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        Box::pin(async move { Ok(resp) })
    }
}

fn list(items: impl IntoIterator<Item = Value>) -> Value {
    json!({"data": items.into_iter().collect::<Vec<_>>(), "next": null})
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    let mut v = serde_json::to_value(v).unwrap_or(Value::Null);
    redact(&mut v);
    v
}

/// A service as Kong's admin API shows it: `url` spelled out as protocol, host, port, path.
fn service_json(s: &crate::config::Service) -> Value {
    let mut v = to_json(s);
    if let Some(o) = v.as_object_mut() {
        o.remove("routes");
        o.remove("plugins");
        if let Some(uri) = o.remove("url").and_then(|u| u.as_str().and_then(|u| u.parse::<http::Uri>().ok())) {
            let scheme = uri.scheme_str().unwrap_or("http");
            let default_port = if matches!(scheme, "https" | "grpcs") { 443 } else { 80 };
            o.insert("protocol".into(), json!(scheme));
            o.insert("host".into(), json!(uri.host()));
            o.insert("port".into(), json!(uri.port_u16().unwrap_or(default_port)));
            o.insert("path".into(), if uri.path() == "/" { Value::Null } else { json!(uri.path()) });
        }
    }
    v
}

/// Every route with the keys it can be found by, nested ones naming their service.
fn routes(config: &Config) -> Vec<(Vec<String>, Value)> {
    let nested = config.services.iter().flat_map(|s| {
        let service = s.name.clone().or_else(|| s.id.clone());
        s.routes.iter().map(move |r| (r, service.clone()))
    });
    nested
        .chain(config.routes.iter().map(|r| (r, None)))
        .map(|(r, service)| {
            let mut v = to_json(r);
            if let Some(o) = v.as_object_mut() {
                o.remove("plugins");
                if let Some(s) = service {
                    o.insert("service".into(), json!({"name": s}));
                }
            }
            let keys = [&r.name, &r.id].into_iter().flatten().cloned().collect();
            (keys, v)
        })
        .collect()
}

fn upstream_json(config: &Config, u: &crate::config::Upstream) -> Value {
    let mut v = to_json(u);
    let top = config.targets.iter().filter(|t| {
        t.upstream.as_ref().and_then(|r| r.key()).is_some_and(|k| k == u.name || Some(k) == u.id.as_deref())
    });
    let targets: Vec<Value> = u.targets.iter().chain(top).map(to_json).collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("targets".into(), json!(targets));
    }
    v
}

/// Every plugin instance with its scope (`service`, `route`, `consumer`), as Kong lists them.
fn plugins(config: &Config) -> Vec<Value> {
    let mut out = Vec::new();
    let mut push = |p: &crate::config::Plugin, scope: Option<(&str, Option<&String>)>| {
        let mut v = to_json(p);
        if let (Some((kind, Some(name))), Some(o)) = (scope, v.as_object_mut()) {
            o.insert(kind.into(), json!({"name": name}));
        }
        out.push(v);
    };
    for p in &config.plugins {
        push(p, None);
    }
    for s in &config.services {
        let name = s.name.as_ref().or(s.id.as_ref());
        for p in &s.plugins {
            push(p, Some(("service", name)));
        }
        for r in &s.routes {
            for p in &r.plugins {
                push(p, Some(("route", r.name.as_ref().or(r.id.as_ref()))));
            }
        }
    }
    for r in &config.routes {
        for p in &r.plugins {
            push(p, Some(("route", r.name.as_ref().or(r.id.as_ref()))));
        }
    }
    for c in &config.consumers {
        for p in &c.plugins {
            push(p, Some(("consumer", c.username.as_ref().or(c.custom_id.as_ref()).or(c.id.as_ref()))));
        }
    }
    out
}

/// The config as loaded, with the consumers' credentials listed but their secrets redacted.
fn effective_config(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).unwrap_or(Value::Null);
    if let Some(consumers) = v.get_mut("consumers").and_then(Value::as_array_mut) {
        for (c, out) in config.consumers.iter().zip(consumers) {
            let Some(out) = out.as_object_mut() else { continue };
            for (section, value) in c.credential_sections() {
                if let Some(value) = value {
                    out.insert(section.into(), value.clone());
                }
            }
        }
    }
    redact(&mut v);
    v
}

const REDACTED: &str = "[redacted]";

/// Whether a field of this name holds a secret: credentials (`key`, `secret`, `password`),
/// private keys, tokens, and anything named like them in plugin configs (`redis_password`,
/// `client_secret`, `api_token`).
fn is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(n.as_str(), "key" | "secret" | "password" | "token" | "private_key" | "apikey" | "api_key")
        || ["password", "secret", "token", "private_key", "credential"].iter().any(|s| n.ends_with(s))
}

/// Replaces every secret-looking value (see [`is_secret`]) with `"[redacted]"`, at any depth.
fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => redact_map(map),
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn redact_map(map: &mut Map<String, Value>) {
    for (k, v) in map.iter_mut() {
        if is_secret(k) && !v.is_null() && !v.is_object() && !v.is_array() {
            *v = json!(REDACTED);
        } else if is_secret(k) && v.is_array() {
            // `key_names`-like lists are not secret, but `secrets: [...]` is.
            for item in v.as_array_mut().into_iter().flatten() {
                if item.is_string() {
                    *item = json!(REDACTED);
                } else {
                    redact(item);
                }
            }
        } else {
            redact(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        for s in ["key", "secret", "password", "redis_password", "client_secret", "api_token", "Token"] {
            assert!(is_secret(s), "{s}");
        }
        for s in ["key_names", "hide_credentials", "name", "hash_on_header", "keepalive_pool_size", "secret_is_base64"]
        {
            assert!(!is_secret(s), "{s}");
        }
    }

    #[test]
    fn redacts_at_any_depth() {
        let mut v =
            json!({"a": [{"config": {"redis_password": "p", "key_names": ["apikey"], "nested": {"secret": "s"}}}]});
        redact(&mut v);
        assert_eq!(
            v,
            json!({"a": [{"config": {"redis_password": REDACTED, "key_names": ["apikey"], "nested": {"secret": REDACTED}}}]})
        );
    }
}
