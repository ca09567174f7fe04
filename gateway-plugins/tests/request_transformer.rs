//! request-transformer through the real proxy: what the upstream receives.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};

async fn start(upstream: std::net::SocketAddr, route: &str, config: &str) -> RunningGateway {
    let yaml = format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{upstream}
  routes: [{route}]
  plugins: [{{name: request-transformer, config: {config}}}]
"#
    );
    let gateway = Gateway::builder()
        .plugins(gateway_plugins::registry())
        .build(&Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")))
        .unwrap();
    start_running(gateway, ServerSettings::default()).await
}

/// A second upstream that echoes the request body, to check body transforms exactly.
async fn body_echo() -> Upstream {
    upstream_with(std::sync::Arc::new(|req: http::Request<hyper::body::Incoming>, _, _| {
        Box::pin(async move {
            let ct = req.headers().get("content-type").cloned();
            let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
            let mut resp = http::Response::new(full(body));
            if let Some(ct) = ct {
                resp.headers_mut().insert("content-type", ct);
            }
            resp
        })
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_query_follow_kongs_order_with_templates() {
    let up = echo_upstream().await;
    let gw = start(
        up.addr,
        r#"{name: r, paths: ["~/users/(?<id>\\d+)"], strip_path: false}"#,
        r#"{
          remove: {headers: [x-internal], querystring: [debug]},
          rename: {headers: ["x-old:x-new"], querystring: ["q:query"]},
          replace: {headers: ["x-mode:replaced", "x-absent:never"], querystring: ["page:1"]},
          add: {headers: ["x-user-id:$(uri_captures.id)", "x-mode:not-added", "x-from:$(headers.x-client)"], querystring: ["lang:en"]},
          append: {headers: ["x-tag:gateway"], querystring: ["tag:a"]}
        }"#,
    )
    .await;
    let resp = send(
        Request::get(gw.url("/users/42?debug=1&q=rust&page=7&tag=z"))
            .header("x-internal", "secret")
            .header("x-old", "value")
            .header("x-mode", "original")
            .header("x-client", "cli")
            .header("x-tag", "client")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    let echo = resp.echo();
    assert_eq!(echo.header("x-internal"), None);
    assert_eq!(echo.header("x-old"), None);
    assert_eq!(echo.header("x-new"), Some("value"));
    assert_eq!(echo.header("x-mode"), Some("replaced"));
    assert_eq!(echo.header("x-absent"), None, "replace only touches what is there");
    assert_eq!(echo.header("x-user-id"), Some("42"));
    assert_eq!(echo.header("x-from"), Some("cli"));
    assert_eq!(echo.headers["x-tag"], vec!["client", "gateway"]);
    assert_eq!(echo.uri, "/users/42?query=rust&page=1&tag=z&lang=en&tag=a");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_uri_and_http_method() {
    let up = echo_upstream().await;
    let gw = start(
        up.addr,
        r#"{name: r, paths: ["~/old/(?<name>\\w+)"]}"#,
        r#"{http_method: POST, replace: {uri: "/v2/items/$(uri_captures.name)"}}"#,
    )
    .await;
    let echo = get(&gw.url("/old/widget?x=1")).await.echo();
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.uri, "/v2/items/widget?x=1");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_form_bodies_are_transformed_and_others_pass_untouched() {
    let up = body_echo().await;
    let gw = start(
        up.addr,
        r#"{name: r, paths: ["/"]}"#,
        r#"{
          remove: {body: [password, /meta/internal]},
          rename: {body: ["user:username"]},
          add: {body: ["/meta/source:gateway", "count:3"], json_types: [string, number]},
          append: {body: ["roles:admin"]}
        }"#,
    )
    .await;
    let json = send(
        Request::post(gw.url("/"))
            .header("content-type", "application/json")
            .body(full(r#"{"user":"ann","password":"x","roles":["dev"],"meta":{"internal":1}}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(json.status, StatusCode::OK);
    assert_eq!(
        json.json(),
        serde_json::json!({"username":"ann","roles":["dev","admin"],"meta":{"source":"gateway"},"count":3})
    );

    let form = send(
        Request::post(gw.url("/"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("user=ann&password=x"))
            .unwrap(),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&form.body), "username=ann&%2Fmeta%2Fsource=gateway&count=3&roles=admin");

    let text =
        send(Request::post(gw.url("/")).header("content-type", "text/plain").body(full("password=x")).unwrap()).await;
    assert_eq!(String::from_utf8_lossy(&text.body), "password=x");

    // An empty JSON body is an empty object to add to.
    let empty =
        send(Request::post(gw.url("/")).header("content-type", "application/json").body(full("")).unwrap()).await;
    assert_eq!(empty.json(), serde_json::json!({"meta":{"source":"gateway"},"count":3,"roles":["admin"]}));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_templates_fail_the_route() {
    let up = echo_upstream().await;
    for bad in [
        r#"{add: {headers: ["x:$(os.time())"]}}"#,
        r#"{add: {headers: ["novalue"]}}"#,
        r#"{replace: {uri: "relative"}}"#,
    ] {
        let gw = start(up.addr, r#"{name: r, paths: ["/"]}"#, bad).await;
        assert_eq!(get(&gw.url("/")).await.status, StatusCode::INTERNAL_SERVER_ERROR, "{bad}");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_uri_values_cannot_leave_their_path_segment() {
    let up = echo_upstream().await;
    let gw = start(up.addr, r#"{name: r, paths: ["/u"]}"#, r#"{replace: {uri: "/v1/users/$(query_params.id)"}}"#).await;
    let echo = get(&gw.url("/u?id=..%2F..%2Fadmin")).await.echo();
    assert!(echo.uri.starts_with("/v1/users/..%2F..%2Fadmin?"), "{}", echo.uri);
    let echo = get(&gw.url("/u?id=1%3Frole%3Dadmin")).await.echo();
    assert!(echo.uri.starts_with("/v1/users/1%3Frole=admin?"), "{}", echo.uri);
    let echo = get(&gw.url("/u?id=..")).await.echo();
    assert!(echo.uri.starts_with("/v1/users/%2E%2E?"), "{}", echo.uri);
    gw.shutdown().await;
}
