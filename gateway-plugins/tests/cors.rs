//! cors through the real proxy: preflights answered at the gateway, headers on actual responses.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Method, Request, StatusCode};

const APP: &str = "https://app.example.com";

async fn start(upstream: std::net::SocketAddr, cors: &str, key_auth: bool) -> RunningGateway {
    let auth = if key_auth { "{name: key-auth}, " } else { "" };
    let yaml = format!(
        r#"_format_version: "3.0"
consumers:
- username: alice
  keyauth_credentials: [{{key: alice-key}}]
services:
- name: s
  url: http://{upstream}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{auth}{{name: cors, config: {cors}}}]
"#
    );
    let gateway = Gateway::builder()
        .plugins(gateway_plugins::registry())
        .build(&Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")))
        .unwrap();
    start_running(gateway, ServerSettings::default()).await
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).map(|v| v.to_str().unwrap())
}

fn cors_headers(a: &Answer) -> Vec<&str> {
    a.headers.keys().map(|k| k.as_str()).filter(|k| k.starts_with("access-control-")).collect()
}

async fn preflight(gw: &RunningGateway, origin: &str, extra: &[(&str, &str)]) -> Answer {
    let mut req = Request::builder()
        .method(Method::OPTIONS)
        .uri(gw.url("/items"))
        .header("origin", origin)
        .header("access-control-request-method", "PUT");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    send(req.body(full("")).unwrap()).await
}

async fn get_from(gw: &RunningGateway, origin: Option<&str>, key: Option<&str>) -> Answer {
    let mut req = Request::get(gw.url("/items"));
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    if let Some(k) = key {
        req = req.header("apikey", k);
    }
    send(req.body(full("")).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_are_answered_before_key_auth_and_its_401_carries_cors_headers() {
    let up = echo_upstream().await;
    let gw = start(
        up.addr,
        &format!("{{origins: [\"{APP}\"], credentials: true, max_age: 600, exposed_headers: [x-request-id, x-total]}}"),
        true,
    )
    .await;
    assert_eq!(gw.gateway.routes()[0].plugins, vec!["cors", "key-auth"]);

    // A preflight carries no credentials: cors answers it before key-auth could refuse it.
    let pre = preflight(&gw, APP, &[("access-control-request-headers", "apikey,x-custom")]).await;
    assert_eq!(pre.status, StatusCode::OK);
    assert!(pre.body.is_empty(), "answered by the gateway, not the upstream");
    assert_eq!(header(&pre, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&pre, "vary"), Some("Origin"));
    assert_eq!(header(&pre, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(&pre, "access-control-allow-headers"), Some("apikey,x-custom"));
    assert_eq!(
        header(&pre, "access-control-allow-methods"),
        Some("GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT")
    );
    assert_eq!(header(&pre, "access-control-max-age"), Some("600"));
    assert_eq!(header(&pre, "access-control-allow-private-network"), None, "not enabled");
    assert_eq!(header(&pre, "www-authenticate"), None);
    assert!(pre.headers.contains_key("x-request-id"));

    // The actual request without a key: key-auth's 401, readable by the page.
    let denied = get_from(&gw, Some(APP), None).await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    assert_eq!(header(&denied, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&denied, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(&denied, "access-control-expose-headers"), Some("x-request-id,x-total"));
    assert_eq!(header(&denied, "vary"), Some("Origin"));

    // With the key: the upstream's response, with the same headers.
    let ok = get_from(&gw, Some(APP), Some("alice-key")).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.echo().method, "GET");
    assert_eq!(header(&ok, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&ok, "access-control-expose-headers"), Some("x-request-id,x-total"));
    assert_eq!(header(&ok, "access-control-allow-methods"), None, "preflight headers only on preflights");

    // An OPTIONS that is not a preflight is an ordinary request: key-auth judges it.
    let plain = send(Request::options(gw.url("/items")).header("origin", APP).body(full("")).unwrap()).await;
    assert_eq!(plain.status, StatusCode::UNAUTHORIZED);

    // A preflight from another origin is answered too, with no CORS headers.
    let other = preflight(&gw, "https://evil.example.net", &[]).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(cors_headers(&other), Vec::<&str>::new());
    assert_eq!(header(&other, "vary"), None);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_methods_headers_and_private_network() {
    let up = echo_upstream().await;
    let gw =
        start(up.addr, r#"{origins: ["*"], methods: [GET, post], headers: [x-a, x-b], private_network: true}"#, false)
            .await;
    let pre = preflight(
        &gw,
        APP,
        &[("access-control-request-headers", "x-other"), ("access-control-request-private-network", "true")],
    )
    .await;
    assert_eq!(pre.status, StatusCode::OK);
    assert_eq!(header(&pre, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&pre, "vary"), None, "`*` does not vary by origin");
    assert_eq!(header(&pre, "access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(header(&pre, "access-control-allow-headers"), Some("x-a,x-b"), "configured headers win over the echo");
    assert_eq!(header(&pre, "access-control-allow-private-network"), Some("true"));
    assert_eq!(header(&pre, "access-control-max-age"), None);
    assert_eq!(header(&pre, "access-control-allow-credentials"), None);

    let pre = preflight(&gw, APP, &[]).await;
    assert_eq!(header(&pre, "access-control-allow-private-network"), None, "only when asked for");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actual_requests_with_star_exact_and_regex_origins() {
    let up = echo_upstream().await;

    // `*` without credentials: `*`, no Vary; no Origin, no CORS headers.
    let gw = start(up.addr, "{}", false).await;
    let resp = get_from(&gw, Some(APP), None).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&resp, "vary"), None);
    assert_eq!(header(&resp, "access-control-allow-credentials"), None);
    assert_eq!(header(&resp, "access-control-expose-headers"), None);
    let resp = get_from(&gw, None, None).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(cors_headers(&resp), Vec::<&str>::new());
    gw.shutdown().await;

    // `*` with credentials: the origin is echoed (browsers refuse `*` with credentials).
    let gw = start(up.addr, r#"{origins: ["*"], credentials: true}"#, false).await;
    let resp = get_from(&gw, Some(APP), None).await;
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&resp, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(&resp, "vary"), Some("Origin"));
    gw.shutdown().await;

    // Exact and regex origins; anything else proceeds without CORS headers.
    let gw = start(up.addr, r#"{origins: ["http://localhost:8080", 'https://.*\.example\.org']}"#, false).await;
    for allowed in ["http://localhost:8080", "https://api.example.org", "https://a.b.example.org"] {
        let resp = get_from(&gw, Some(allowed), None).await;
        assert_eq!(header(&resp, "access-control-allow-origin"), Some(allowed));
        assert_eq!(header(&resp, "vary"), Some("Origin"));
    }
    for refused in ["http://localhost:8081", "https://api.example.org.evil.io", "http://api.example.org", "null"] {
        let resp = get_from(&gw, Some(refused), None).await;
        assert_eq!(resp.status, StatusCode::OK, "{refused}: the request still goes through");
        assert_eq!(resp.echo().method, "GET");
        assert_eq!(cors_headers(&resp), Vec::<&str>::new(), "{refused}");
        assert_eq!(header(&resp, "vary"), None);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_continue_sends_the_preflight_upstream() {
    let up = echo_upstream().await;
    let gw = start(up.addr, &format!("{{origins: [\"{APP}\"], preflight_continue: true, max_age: 5}}"), false).await;
    let pre = preflight(&gw, APP, &[("access-control-request-headers", "x-custom")]).await;
    assert_eq!(pre.status, StatusCode::OK);
    let echo = pre.echo();
    assert_eq!(echo.method, "OPTIONS", "the upstream answered");
    assert_eq!(echo.header("origin"), Some(APP));
    assert_eq!(header(&pre, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&pre, "access-control-allow-headers"), Some("x-custom"));
    assert_eq!(header(&pre, "access-control-max-age"), Some("5"));
    assert_eq!(header(&pre, "vary"), Some("Origin"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_fails_the_route() {
    let up = echo_upstream().await;
    for bad in [
        r#"{origins: ["https://(unclosed"]}"#,
        r#"{methods: ["GET POST"]}"#,
        r#"{headers: ["not a header"]}"#,
        r#"{max_age: -1}"#,
        r#"{origin: ["*"]}"#,
    ] {
        let gw = start(up.addr, bad, false).await;
        assert_eq!(get_from(&gw, Some(APP), None).await.status, StatusCode::INTERNAL_SERVER_ERROR, "{bad}");
        gw.shutdown().await;
    }
}
