//! The read-only admin API: Kong-shaped entity lists, upstream health with reasons, status
//! counters, the token, and no secret ever shown.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use gateway_core::Gateway;
use gateway_core::admin::{AdminService, AdminSettings};
use gateway_core::config::Config;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;
use tower::ServiceExt;

async fn admin_get(admin: &AdminService, path: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = admin.clone().oneshot(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e})")))
}

const SECRETS: &[&str] = &["k3y-s3cr3t", "jwt-hmac-s3cr3t", "redis-s3cr3t", "PRIVATE KEY"];

fn secret_config(upstream: &str, closed: &str) -> String {
    format!(
        r#"_format_version: "3.0"
services:
- name: api
  url: http://{upstream}
  plugins:
  - name: rate-limiting
    config: {{minute: 100, policy: local, redis_password: redis-s3cr3t}}
  routes:
  - name: api-route
    paths: ["/api"]
    plugins: [{{name: key-auth}}]
- name: pooled
  host: pool
  routes: [{{name: pool-route, paths: ["/pool"]}}]
upstreams:
- name: pool
  healthchecks:
    active:
      type: tcp
      timeout: 1
      healthy: {{interval: 0.1, successes: 1}}
      unhealthy: {{interval: 0.1, tcp_failures: 1}}
  targets:
  - target: "{upstream}"
  - target: "{closed}"
    weight: 50
consumers:
- username: alice
  keyauth_credentials: [{{key: k3y-s3cr3t}}]
  jwt_secrets: [{{key: alice-iss, secret: jwt-hmac-s3cr3t, algorithm: HS256}}]
certificates:
- cert: |
{cert}
  key: |
{key}
  snis: [{{name: example.test}}]
"#,
        cert = indent(&CERT.0),
        key = indent(&CERT.1),
    )
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

static CERT: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(|| {
    let c = rcgen::generate_simple_self_signed(vec!["example.test".into()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
});

fn build(yaml: &str) -> Gateway {
    Gateway::builder()
        .plugins(gateway_plugins_free_registry())
        .build(&Config::parse(yaml).unwrap())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// gateway-core's tests cannot use gateway-plugins; key-auth, jwt and rate-limiting are only
/// names here, registered as no-op plugins that accept any config.
fn gateway_plugins_free_registry() -> gateway_core::plugin::PluginRegistry {
    use gateway_core::plugin::typed_factory;
    let mut r = gateway_core::plugin::PluginRegistry::default();
    r.register(typed_factory("key-auth", 1250, |_: Value, _| Ok(Noop)).with_credentials(&["keyauth_credentials"]));
    r.register(typed_factory("jwt", 1450, |_: Value, _| Ok(Noop)).with_credentials(&["jwt_secrets"]));
    r.register(typed_factory("rate-limiting", 910, |_: Value, _| Ok(Noop)));
    r
}

struct Noop;
impl gateway_core::plugin::Plugin for Noop {}

#[tokio::test]
async fn entities_are_listed_in_kong_shapes_without_secrets() {
    let up = echo_upstream().await;
    let closed = closed_port().await;
    let gateway = build(&secret_config(&up.addr.to_string(), &closed.to_string()));
    let admin = gateway.admin(AdminSettings::default());

    let (s, services) = admin_get(&admin, "/services", &[]).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = services["data"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["api", "pooled"]);
    assert!(services["next"].is_null());
    let (s, one) = admin_get(&admin, "/services/api", &[]).await;
    assert_eq!((s, one["host"].as_str()), (StatusCode::OK, Some(up.addr.ip().to_string().as_str())));
    assert_eq!(admin_get(&admin, "/services/nope", &[]).await.0, 404);

    let (_, routes) = admin_get(&admin, "/routes", &[]).await;
    let route = &routes["data"][0];
    assert_eq!(route["name"], "api-route");
    assert_eq!(route["service"]["name"], "api");
    assert_eq!(admin_get(&admin, "/routes/pool-route", &[]).await.1["paths"][0], "/pool");

    let (_, plugins) = admin_get(&admin, "/plugins", &[]).await;
    let scopes: Vec<(String, String)> = plugins["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let scope = if p["service"].is_object() { "service" } else { "route" };
            (p["name"].as_str().unwrap().to_string(), scope.to_string())
        })
        .collect();
    assert!(scopes.contains(&("rate-limiting".into(), "service".into())), "{scopes:?}");
    assert!(scopes.contains(&("key-auth".into(), "route".into())), "{scopes:?}");

    let (_, consumers) = admin_get(&admin, "/consumers", &[]).await;
    assert_eq!(consumers["data"][0]["username"], "alice");
    assert!(consumers["data"][0].get("keyauth_credentials").is_none());

    let (_, config) = admin_get(&admin, "/config", &[]).await;
    assert_eq!(config["consumers"][0]["keyauth_credentials"][0]["key"], "[redacted]", "credentials listed, redacted");
    assert_eq!(config["consumers"][0]["jwt_secrets"][0]["secret"], "[redacted]");
    assert_eq!(config["services"][0]["plugins"][0]["config"]["minute"], 100, "plain settings stay");

    // No endpoint shows a secret.
    for path in [
        "/status",
        "/services",
        "/services/api",
        "/routes",
        "/upstreams",
        "/upstreams/pool",
        "/upstreams/pool/health",
        "/plugins",
        "/consumers",
        "/consumers/alice",
        "/config",
    ] {
        let (s, body) = admin_get(&admin, path, &[]).await;
        assert_eq!(s, 200, "{path}");
        let text = body.to_string();
        for secret in SECRETS {
            assert!(!text.contains(secret), "{path} shows `{secret}`: {text}");
        }
    }
}

#[tokio::test]
async fn upstream_health_says_which_target_is_out_and_why() {
    let up = echo_upstream().await;
    let closed = closed_port().await;
    let gateway = build(&secret_config(&up.addr.to_string(), &closed.to_string()));
    let gw = start_running(gateway.clone(), Default::default()).await;
    let admin = gateway.admin(AdminSettings::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    let health = loop {
        let (s, health) = admin_get(&admin, "/upstreams/pool/health", &[]).await;
        assert_eq!(s, 200);
        if health["data"][1]["health"] == "UNHEALTHY" {
            break health;
        }
        assert!(Instant::now() < deadline, "the closed target never went unhealthy: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["data"][0]["target"], up.addr.to_string());
    assert_eq!(health["data"][0]["health"], "HEALTHY");
    assert_eq!(health["data"][1]["target"], closed.to_string());
    assert_eq!(health["data"][1]["weight"], 50);
    assert_eq!(health["data"][1]["reason"], "connection failures");
    assert_eq!(admin_get(&admin, "/upstreams/nope/health", &[]).await.0, 404);

    // Status counts what was served.
    let (_, before) = admin_get(&admin, "/status", &[]).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/pool")).await.status, 200);
    }
    let (_, after) = admin_get(&admin, "/status", &[]).await;
    let served = |v: &Value| v["server"]["total_requests"].as_u64().unwrap();
    assert_eq!(served(&after) - served(&before), 3);
    assert!(after["server"]["connections_accepted"].as_u64().unwrap() >= 1);
    assert_eq!(after["routes"], 2);
    assert_eq!(after["configuration_hash"].as_str().unwrap().len(), 16);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_configured_token_is_required_except_for_probes() {
    let gateway = Gateway::from_yaml("_format_version: \"3.0\"\n").unwrap();
    let admin = gateway.admin(AdminSettings::with_token("t0ken"));
    assert_eq!(admin_get(&admin, "/status", &[]).await.0, 401);
    assert_eq!(admin_get(&admin, "/config", &[("authorization", "Bearer wrong")]).await.0, 401);
    assert_eq!(admin_get(&admin, "/config", &[("authorization", "Bearer t0ke")]).await.0, 401);
    assert_eq!(admin_get(&admin, "/config", &[("authorization", "Bearer t0ken")]).await.0, 200);
    assert_eq!(admin_get(&admin, "/status", &[("kong-admin-token", "t0ken")]).await.0, 200);
    assert_eq!(admin_get(&admin, "/healthz", &[]).await.0, 200);
    assert_eq!(admin_get(&admin, "/readyz", &[]).await.0, 200);
    gateway.set_ready(false);
    assert_eq!(admin_get(&admin, "/readyz", &[]).await.0, 503);
}

#[tokio::test]
async fn reloads_are_counted_and_the_config_follows() {
    let gateway = Gateway::from_yaml("_format_version: \"3.0\"\n").unwrap();
    let admin = gateway.admin(AdminSettings::default());
    let good = Config::parse("_format_version: \"3.0\"\nservices: [{name: s, url: \"http://127.0.0.1:9\"}]\n").unwrap();
    gateway.reload(&good).unwrap();
    let bad = Config::parse("_format_version: \"3.0\"\nservices: [{name: s}]\n").unwrap();
    assert!(gateway.reload(&bad).is_err());
    let (_, status) = admin_get(&admin, "/status", &[]).await;
    assert_eq!(status["reloads"]["succeeded"], 1);
    assert_eq!(status["reloads"]["failed"], 1);
    let (_, services) = admin_get(&admin, "/services", &[]).await;
    assert_eq!(services["data"][0]["name"], "s", "the last good config is shown");
}
