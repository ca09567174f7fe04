//! circuit-breaker through the real proxy, against upstreams that fail on command.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::StatusCode;

/// An upstream that answers 503 while `failing` is set, 200 otherwise, counting calls.
async fn switchable() -> (Upstream, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let failing = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let (f, c) = (failing.clone(), calls.clone());
    let up = upstream_with(Arc::new(move |_req, addr, _| {
        c.fetch_add(1, Ordering::SeqCst);
        let fail = f.load(Ordering::SeqCst);
        Box::pin(async move {
            let mut resp = http::Response::new(full(addr.to_string()));
            if fail {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        })
    }))
    .await;
    (up, failing, calls)
}

async fn start(targets: &[std::net::SocketAddr]) -> RunningGateway {
    let targets: Vec<String> = targets.iter().map(|t| format!("{{target: \"{t}\"}}")).collect();
    let yaml = format!(
        r#"_format_version: "3.0"
upstreams: [{{name: pool, targets: [{}]}}]
services:
- name: s
  host: pool
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: circuit-breaker, config: {{consecutive_failures: 3, failure_ratio: 0, open_ms: 300}}}}]
"#,
        targets.join(", ")
    );
    let gateway =
        Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
    start_running(gateway, ServerSettings::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_fails_fast_half_opens_and_closes() {
    let (up, failing, calls) = switchable().await;
    let gw = start(&[up.addr]).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Open: answered at once, the upstream is not called.
    let fast = get(&gw.url("/")).await;
    assert_eq!(fast.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(fast.json()["message"], "The upstream service is unavailable (circuit open)");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let target = up.addr.to_string();
    assert_eq!(breaker_state(&gw, &target).await, "open", "/metrics shows the open breaker");

    // Half-open after open_ms: a failed probe opens it again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(get(&gw.url("/")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(get(&gw.url("/")).await.json()["message"], "The upstream service is unavailable (circuit open)");
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // The upstream recovers: the next probe closes the breaker and traffic flows.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 7);
    assert_eq!(breaker_state(&gw, &target).await, "closed");
    gw.shutdown().await;
}

/// The state `gateway_circuit_breaker_state` reports as 1 for `target` on route `r`.
async fn breaker_state(gw: &RunningGateway, target: &str) -> String {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let admin = gw.gateway.admin(gateway_core::admin::AdminSettings::default());
    let req = http::Request::get("/metrics").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let body = admin.oneshot(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let mut on = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("gateway_circuit_breaker_state{")) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let labels: std::collections::BTreeMap<&str, &str> = series
            .trim_start_matches("gateway_circuit_breaker_state{")
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels["route"] == "r" && labels["target"] == target && value.parse::<f64>().unwrap() == 1.0 {
            on.push(labels["state"].to_string());
        }
    }
    assert_eq!(on.len(), 1, "exactly one state: {text}");
    on.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_target_leaves_rotation_while_the_others_serve() {
    let (bad, _bad_failing, bad_calls) = switchable().await;
    let (good, good_failing, _) = switchable().await;
    good_failing.store(false, Ordering::SeqCst);
    let gw = start(&[bad.addr, good.addr]).await;
    // Round-robin alternates until the bad target has failed three times in a row.
    for _ in 0..6 {
        get(&gw.url("/")).await;
    }
    assert_eq!(bad_calls.load(Ordering::SeqCst), 3);
    for _ in 0..10 {
        let resp = get(&gw.url("/")).await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.body, good.addr.to_string());
    }
    assert_eq!(bad_calls.load(Ordering::SeqCst), 3, "the open target got no traffic");
    gw.shutdown().await;
}
