//! acl, ip-restriction, request-size-limiting and correlation-id through the real proxy.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};

async fn start(upstream: std::net::SocketAddr, plugins: &str) -> RunningGateway {
    let yaml = format!(
        r#"_format_version: "3.0"
consumers:
- username: admin-user
  keyauth_credentials: [{{key: admin-key}}]
  acls: [{{group: admins}}, {{group: staff}}]
- username: plain-user
  keyauth_credentials: [{{key: plain-key}}]
services:
- name: s
  url: http://{upstream}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: {plugins}
"#
    );
    let gateway = Gateway::builder()
        .plugins(gateway_plugins::registry())
        .build(&Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")))
        .unwrap();
    start_running(gateway, ServerSettings::default()).await
}

async fn with_key(gw: &RunningGateway, key: &str) -> Answer {
    send(Request::get(gw.url("/")).header("apikey", key).header("x-consumer-groups", "admins").body(full("")).unwrap())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_allows_and_denies_by_group() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "[{name: key-auth}, {name: acl, config: {allow: [admins]}}]").await;
    let ok = with_key(&gw, "admin-key").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.echo().headers["x-consumer-groups"], vec!["admins, staff"]);
    let denied = with_key(&gw, "plain-key").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.json()["message"], "You cannot consume this service");
    gw.shutdown().await;

    let gw = start(up.addr, "[{name: key-auth}, {name: acl, config: {deny: [staff], hide_groups_header: true}}]").await;
    assert_eq!(with_key(&gw, "admin-key").await.status, StatusCode::FORBIDDEN);
    let plain = with_key(&gw, "plain-key").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.echo().header("x-consumer-groups"), None, "the client's copy is stripped, ours hidden");
    gw.shutdown().await;

    // Without an authentication plugin there is no consumer: 401.
    let gw = start(up.addr, "[{name: acl, config: {allow: [admins]}}]").await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json()["message"], "Unauthorized");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_restriction_checks_the_peer_address() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "[{name: ip-restriction, config: {deny: [127.0.0.1]}}]").await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    assert_eq!(resp.json()["message"], "Your IP address is not allowed");
    gw.shutdown().await;

    let gw =
        start(up.addr, "[{name: ip-restriction, config: {allow: [10.0.0.0/8], status: 401, message: go away}}]").await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json()["message"], "go away");
    gw.shutdown().await;

    let gw = start(up.addr, "[{name: ip-restriction, config: {allow: [127.0.0.0/8]}}]").await;
    // A forged X-Forwarded-For does not change who the client is.
    let resp = send(Request::get(gw.url("/")).header("x-forwarded-for", "10.1.1.1").body(full("")).unwrap()).await;
    assert_eq!(resp.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_limiting_refuses_large_bodies_with_or_without_a_length() {
    let up = echo_upstream().await;
    let gw =
        start(up.addr, "[{name: request-size-limiting, config: {allowed_payload_size: 10, size_unit: bytes}}]").await;
    let small = send(Request::post(gw.url("/")).body(full("0123456789")).unwrap()).await;
    assert_eq!(small.status, StatusCode::OK);
    assert_eq!(small.echo().body_len, 10);
    let big = send(Request::post(gw.url("/")).body(full("0123456789A")).unwrap()).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(big.json()["message"], "Request size limit exceeded");
    let chunked_big = raw(gw.addr, "POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n89ABCDEF\r\n0\r\n\r\n").await;
    assert!(chunked_big.starts_with("HTTP/1.1 413"), "{chunked_big}");
    let chunked_small = raw(
        gw.addr,
        "POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    .await;
    assert!(chunked_small.starts_with("HTTP/1.1 200"), "{chunked_small}");
    assert!(chunked_small.contains("\"body_len\":4"), "{chunked_small}");
    gw.shutdown().await;

    let gw = start(up.addr, "[{name: request-size-limiting, config: {require_content_length: true}}]").await;
    let answer = raw(
        gw.addr,
        "POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 411"), "{answer}");
    assert!(answer.contains("A valid Content-Length header is required"), "{answer}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_id_is_added_kept_and_echoed() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "[{name: correlation-id, config: {echo_downstream: true}}]").await;
    let first = get(&gw.url("/")).await;
    let id = first.echo().header("kong-request-id").expect("the upstream gets an id").to_string();
    assert!(id.contains('#'), "uuid#counter: {id}");
    assert_eq!(first.headers["kong-request-id"], id.as_str());
    let second = get(&gw.url("/")).await.echo().header("kong-request-id").unwrap().to_string();
    assert_ne!(id, second);
    let kept = send(Request::get(gw.url("/")).header("kong-request-id", "client-chosen").body(full("")).unwrap()).await;
    assert_eq!(kept.echo().header("kong-request-id"), Some("client-chosen"));
    assert_eq!(kept.headers["kong-request-id"], "client-chosen");
    gw.shutdown().await;
}
