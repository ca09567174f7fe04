//! retries through the real proxy, against upstreams that fail on command.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};

/// An upstream that answers 503 to its first `failures` requests, then 200 with the body length.
async fn flaky(failures: usize) -> (Upstream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let up = upstream_with(Arc::new(move |req: http::Request<hyper::body::Incoming>, _, _| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
            let mut resp = http::Response::new(full(format!("{}", body.len())));
            if n < failures {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        })
    }))
    .await;
    (up, calls)
}

async fn start(service: &str, config: &str) -> RunningGateway {
    let yaml = format!(
        r#"_format_version: "3.0"
services:
- {service}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: retries, config: {config}}}]
"#
    );
    let gateway = Gateway::builder()
        .plugins(gateway_plugins::registry())
        .build(&Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")))
        .unwrap();
    start_running(gateway, ServerSettings::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_statuses_are_retried_with_the_body_replayed() {
    let (up, calls) = flaky(2).await;
    let gw = start(
        &format!("name: s\n  url: http://{}", up.addr),
        "{attempts: 3, on_statuses: [503], retry_non_idempotent: true}",
    )
    .await;
    let resp = send(Request::put(gw.url("/")).body(full("twelve bytes")).unwrap()).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body, "12", "the body was replayed whole");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_retried_unless_enabled() {
    // The first two calls fail: the POST takes the first and is not retried; the GET takes
    // the second and is retried into the third.
    let (up, calls) = flaky(2).await;
    let gw = start(&format!("name: s\n  url: http://{}", up.addr), "{attempts: 3, on_statuses: [503]}").await;
    let resp = send(Request::post(gw.url("/")).body(full("x")).unwrap()).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A GET on the same route is retried.
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_bounded_and_unlisted_failures_pass_through() {
    let (up, calls) = flaky(100).await;
    let gw =
        start(&format!("name: s\n  url: http://{}", up.addr), "{attempts: 2, on_statuses: [503], backoff_base_ms: 1}")
            .await;
    assert_eq!(get(&gw.url("/")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    gw.shutdown().await;

    let (up, calls) = flaky(100).await;
    let gw = start(&format!("name: s\n  url: http://{}", up.addr), "{attempts: 3}").await;
    assert_eq!(get(&gw.url("/")).await.status, StatusCode::SERVICE_UNAVAILABLE, "503 is not listed");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_and_a_budget_stops_retry_storms() {
    // Timeouts: the echo upstream's /slow/ path outlasts a 100 ms read timeout every time.
    let slow = echo_upstream().await;
    let gw = start(
        &format!("name: s\n  url: http://{}\n  read_timeout: 100\n  retries: 0", slow.addr),
        "{attempts: 3, backoff_base_ms: 1}",
    )
    .await;
    let started = std::time::Instant::now();
    let resp = get(&gw.url("/slow/1000")).await;
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(300), "three attempts of 100 ms: {:?}", started.elapsed());
    gw.shutdown().await;

    // A budget of 0% with no minimum allows no retry at all.
    let (up, calls) = flaky(100).await;
    let gw = start(
        &format!("name: s\n  url: http://{}", up.addr),
        "{attempts: 5, on_statuses: [503], budget_percent: 0, budget_min_per_sec: 0}",
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5, "no retries beyond the budget");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_replay_is_sent_once_and_whole() {
    // The first call fails with a listed status: a replayable body would be retried.
    let (up, calls) = flaky(1).await;
    let gw =
        start(&format!("name: s\n  url: http://{}", up.addr), "{attempts: 3, on_statuses: [503], max_body_bytes: 16}")
            .await;
    // Known length, over the limit.
    let resp = send(Request::put(gw.url("/")).body(full(vec![b'a'; 100])).unwrap()).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "sent once, not retried");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Unknown length (chunked), found to be over the limit while reading it.
    let answer = raw(
        gw.addr,
        "PUT / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("32"), "the upstream got all 32 bytes: {answer}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    gw.shutdown().await;
}

/// Every attempt carries what the gateway attached for the upstream call: with consistent
/// hashing, a key's requests stay on one target through the retries layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_requests_keep_their_consistent_hashing_key() {
    let (a, b, c) = (echo_upstream().await, echo_upstream().await, echo_upstream().await);
    let yaml = format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
  algorithm: consistent-hashing
  hash_on: header
  hash_on_header: x-user
  targets: [{{target: "{}"}}, {{target: "{}"}}, {{target: "{}"}}]
services:
- name: s
  host: pool
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: retries, config: {{attempts: 2, on_statuses: [503]}}}}]
"#,
        a.addr, b.addr, c.addr
    );
    let gateway =
        Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
    let gw = start_running(gateway, ServerSettings::default()).await;
    for user in ["alice", "bob", "carol", "dave"] {
        let mut targets = std::collections::BTreeSet::new();
        for _ in 0..6 {
            let answer = send(Request::get(gw.url("/")).header("x-user", user).body(full("")).unwrap()).await;
            assert_eq!(answer.status, StatusCode::OK);
            targets.insert(answer.echo().upstream);
        }
        assert_eq!(targets.len(), 1, "{user}'s requests went to {targets:?}");
    }
    gw.shutdown().await;
}
