//! Load balancing and health checks through a running gateway: each algorithm's
//! distribution, targets leaving and rejoining rotation, and 503 when none is left.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gateway_core::config::Config;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

/// An upstream that answers every request with `status` (changeable) and its own address in
/// `x-upstream`, after sleeping `delay`.
async fn status_upstream(status: Arc<AtomicU16>, delay: Duration) -> Upstream {
    upstream_with(Arc::new(move |req: Request<Incoming>, addr: SocketAddr, _| {
        let status = status.clone();
        Box::pin(async move {
            let slow = req.uri().path().rsplit_once("/slow/").and_then(|(_, ms)| ms.parse::<u64>().ok());
            tokio::time::sleep(delay + Duration::from_millis(slow.unwrap_or(0))).await;
            Response::builder()
                .status(status.load(Ordering::Relaxed))
                .header("x-upstream", addr.to_string())
                .body(full(addr.to_string()))
                .unwrap()
        })
    }))
    .await
}

fn upstream_config(targets: &[(SocketAddr, u32)], upstream_extra: &str) -> String {
    let targets: String =
        targets.iter().map(|(a, w)| format!("  - {{target: \"{a}\", weight: {w}}}\n")).collect::<Vec<_>>().concat();
    format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
{upstream_extra}
  targets:
{targets}services:
- name: s
  host: pool
  retries: 0
  routes: [{{name: r, paths: ["/"]}}]
"#
    )
}

/// Sends `n` requests one after the other; counts answers per upstream (or per status).
async fn tally(url: &str, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let mut req = Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let a = send(req.body(full("")).unwrap()).await;
        let key = match a.headers.get("x-upstream") {
            Some(u) => u.to_str().unwrap().to_string(),
            None => a.status.to_string(),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

async fn upstreams(n: usize) -> (Vec<Upstream>, Vec<Arc<AtomicU16>>) {
    let mut ups = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..n {
        let s = Arc::new(AtomicU16::new(200));
        ups.push(status_upstream(s.clone(), Duration::ZERO).await);
        statuses.push(s);
    }
    (ups, statuses)
}

#[tokio::test]
async fn round_robin_follows_weights() {
    let (ups, _) = upstreams(3).await;
    let cfg = upstream_config(&[(ups[0].addr, 100), (ups[1].addr, 300), (ups[2].addr, 0)], "  algorithm: round-robin");
    let gw = start_gateway(&cfg).await;
    let counts = tally(&gw.url("/"), 40, &[]).await;
    assert_eq!(counts.get(&ups[0].addr.to_string()), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&ups[1].addr.to_string()), Some(&30), "{counts:?}");
    assert_eq!(counts.get(&ups[2].addr.to_string()), None, "weight 0 gets nothing");
}

#[tokio::test]
async fn least_connections_avoids_the_busy_target() {
    let (ups, _) = upstreams(2).await;
    let gw =
        start_gateway(&upstream_config(&[(ups[0].addr, 100), (ups[1].addr, 100)], "  algorithm: least-connections"))
            .await;
    let slow_url = gw.url("/slow/1500");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = tally(&gw.url("/"), 10, &[]).await;
    let busy = slow.await.unwrap().headers["x-upstream"].to_str().unwrap().to_string();
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert!(!counts.contains_key(&busy), "the target with a request in flight got none: {counts:?}, busy {busy}");
}

/// An upstream that answers `/stream` with its head at once and the rest of the body 1.5 s
/// later, anything else at once; `x-upstream` names it.
async fn streaming_upstream() -> Upstream {
    upstream_with(Arc::new(|req: Request<Incoming>, addr: SocketAddr, _| {
        Box::pin(async move {
            let body = if req.uri().path() == "/stream" {
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, BoxError>>(2);
                tokio::spawn(async move {
                    let _ = tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"first ")))).await;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let _ = tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"last")))).await;
                });
                http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(tokio_stream_from(rx)))
            } else {
                full("quick")
            };
            Response::builder().header("x-upstream", addr.to_string()).body(body).unwrap()
        })
    }))
    .await
}

/// An mpsc receiver as a stream (without a tokio-stream dependency).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn least_connections_counts_a_request_until_its_body_is_sent() {
    let ups = [streaming_upstream().await, streaming_upstream().await];
    let gw =
        start_gateway(&upstream_config(&[(ups[0].addr, 100), (ups[1].addr, 100)], "  algorithm: least-connections"))
            .await;
    // A response whose head has arrived but whose body is still streaming.
    let resp = client().request(Request::get(gw.url("/stream")).body(full("")).unwrap()).await.unwrap();
    let busy = resp.headers()["x-upstream"].to_str().unwrap().to_string();
    let counts = tally(&gw.url("/quick"), 6, &[]).await;
    assert!(!counts.contains_key(&busy), "the target still sending a body got requests: {counts:?}, busy {busy}");
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first last");
    // Once the body is sent the target counts as idle again and takes its share.
    let counts = tally(&gw.url("/quick"), 6, &[]).await;
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[tokio::test]
async fn latency_prefers_the_fast_target() {
    let fast = status_upstream(Arc::new(AtomicU16::new(200)), Duration::ZERO).await;
    let slow = status_upstream(Arc::new(AtomicU16::new(200)), Duration::from_millis(60)).await;
    let gw = start_gateway(&upstream_config(&[(fast.addr, 100), (slow.addr, 100)], "  algorithm: latency")).await;
    let counts = tally(&gw.url("/"), 40, &[]).await;
    let to_fast = counts.get(&fast.addr.to_string()).copied().unwrap_or(0);
    let to_slow = counts.get(&slow.addr.to_string()).copied().unwrap_or(0);
    assert!(to_slow >= 1, "the slow target was tried: {counts:?}");
    assert!(to_fast >= 36, "the fast target gets nearly everything once measured: {counts:?}");
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_on_their_target_and_moves_only_a_removed_targets_keys() {
    let (ups, _) = upstreams(3).await;
    let hashing = "  algorithm: consistent-hashing\n  hash_on: header\n  hash_on_header: x-user\n  hash_fallback: ip";
    let all: Vec<(SocketAddr, u32)> = ups.iter().map(|u| (u.addr, 100)).collect();
    let gw = start_gateway(&upstream_config(&all, hashing)).await;
    let mut owner = HashMap::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let counts = tally(&gw.url("/"), 4, &[("x-user", &user)]).await;
        assert_eq!(counts.len(), 1, "{user} always lands on one target: {counts:?}");
        owner.insert(user, counts.into_keys().next().unwrap());
    }
    let used: std::collections::HashSet<_> = owner.values().collect();
    assert_eq!(used.len(), 3, "30 keys spread over all three targets: {owner:?}");
    // No header: the fallback (client ip, always 127.0.0.1 here) is one key.
    assert_eq!(tally(&gw.url("/"), 6, &[]).await.len(), 1);

    // Remove the third target: only its keys move.
    let removed = ups[2].addr.to_string();
    gw.gateway.reload(&Config::from_yaml(&upstream_config(&all[..2], hashing)).unwrap()).unwrap();
    for (user, before) in &owner {
        let after = tally(&gw.url("/"), 1, &[("x-user", user)]).await.into_keys().next().unwrap();
        if *before != removed {
            assert_eq!(&after, before, "{user} moved although its target stayed");
        } else {
            assert_ne!(after, removed);
        }
    }
}

#[tokio::test]
async fn hash_on_cookie_sets_the_cookie_and_sticks_to_it() {
    let (ups, _) = upstreams(3).await;
    let hashing =
        "  algorithm: consistent-hashing\n  hash_on: cookie\n  hash_on_cookie: sticky\n  hash_on_cookie_path: /app";
    let all: Vec<(SocketAddr, u32)> = ups.iter().map(|u| (u.addr, 100)).collect();
    let gw = start_gateway(&upstream_config(&all, hashing)).await;
    let first = get(&gw.url("/")).await;
    let set = first.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("sticky=") && set.ends_with("; Path=/app"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let counts = tally(&gw.url("/"), 8, &[("cookie", &cookie)]).await;
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(counts.keys().next().unwrap(), first.headers["x-upstream"].to_str().unwrap());
    let with_cookie = send(Request::get(gw.url("/")).header("cookie", &cookie).body(full("")).unwrap()).await;
    assert!(!with_cookie.headers.contains_key("set-cookie"), "a client with the cookie gets no new one");
}

async fn wait_until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

const ACTIVE: &str = r#"  healthchecks:
    active:
      http_path: /health
      timeout: 1
      healthy: {interval: 0.1, successes: 2}
      unhealthy: {interval: 0.1, http_failures: 2, tcp_failures: 2, timeouts: 2}"#;

#[tokio::test]
async fn active_checks_take_a_failing_target_out_and_bring_it_back() {
    let (ups, statuses) = upstreams(2).await;
    let gw = start_gateway(&upstream_config(&[(ups[0].addr, 100), (ups[1].addr, 100)], ACTIVE)).await;
    let a = ups[0].addr.to_string();
    let b = ups[1].addr.to_string();
    assert_eq!(tally(&gw.url("/"), 4, &[]).await.len(), 2);

    statuses[0].store(500, Ordering::Relaxed);
    wait_until("a to leave rotation", async || tally(&gw.url("/"), 6, &[]).await.keys().all(|k| *k == b)).await;
    statuses[0].store(200, Ordering::Relaxed);
    wait_until("a to come back", async || tally(&gw.url("/"), 6, &[]).await.contains_key(&a)).await;

    // Every target down: Kong's 503.
    statuses[0].store(503, Ordering::Relaxed);
    statuses[1].store(503, Ordering::Relaxed);
    // (The targets answer 503 themselves too: wait for the gateway's own answer.)
    wait_until("no target left", async || !get(&gw.url("/")).await.headers.contains_key("x-upstream")).await;
    let answer = get(&gw.url("/")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json()["message"], "failure to get a peer from the ring-balancer");
}

#[tokio::test]
async fn passive_checks_count_live_failures_and_state_survives_a_reload() {
    let (ups, statuses) = upstreams(2).await;
    let passive = "  healthchecks:\n    passive:\n      unhealthy: {http_failures: 2, http_statuses: [500]}";
    let cfg = upstream_config(&[(ups[0].addr, 100), (ups[1].addr, 100)], passive);
    let gw = start_gateway(&cfg).await;
    let b = ups[1].addr.to_string();
    statuses[0].store(500, Ordering::Relaxed);
    let early = tally(&gw.url("/"), 6, &[]).await;
    assert_eq!(early.get(&ups[0].addr.to_string()), Some(&2), "two failures, then out: {early:?}");
    let later = tally(&gw.url("/"), 10, &[]).await;
    assert_eq!(later.get(&b), Some(&10), "{later:?}");

    // A reload that keeps the upstream keeps its health (passive-only: it stays out).
    let reloaded = cfg.replace(
        "routes: [{name: r, paths: [\"/\"]}]",
        "routes: [{name: r, paths: [\"/\"]}, {name: r2, paths: [\"/other\"]}]",
    );
    assert_ne!(reloaded, cfg);
    gw.gateway.reload(&Config::from_yaml(&reloaded).unwrap()).unwrap();
    assert_eq!(tally(&gw.url("/"), 6, &[]).await.get(&b), Some(&6));

    // Turning the checks off puts every target back: nothing else could revive it.
    let unchecked = reloaded.replace(passive, "");
    assert_ne!(unchecked, reloaded);
    gw.gateway.reload(&Config::from_yaml(&unchecked).unwrap()).unwrap();
    let back = tally(&gw.url("/"), 6, &[]).await;
    assert_eq!(back.get(&ups[0].addr.to_string()), Some(&3), "{back:?}");
}

#[tokio::test]
async fn bad_balancing_settings_are_config_errors() {
    let err = gateway_core::Gateway::from_yaml(
        r#"_format_version: "3.0"
upstreams:
- name: a
  algorithm: consistent-hashing
  hash_on: header
- name: b
  hash_on: cookie
  hash_on_cookie: sticky
  hash_fallback: ip
- name: c
  healthchecks: {active: {type: grpc, http_path: health, healthy: {interval: -1}}}
- name: d
  healthchecks: {active: {headers: {"bad header": [x]}, https_sni: probe.test, healthy: {interval: 1}}}
"#,
    )
    .unwrap_err()
    .to_string();
    for want in [
        "upstreams[0] (name \"a\"): `hash_on` needs the header to hash on",
        "upstreams[1] (name \"b\"): `hash_fallback` needs a `hash_on` that can miss",
        "upstreams[2] (name \"c\"): `healthchecks.active.type` must be http, https or tcp, got `grpc`",
        "`healthchecks.active.healthy.interval` must be between 0 and 65535 seconds, got -1",
        "`healthchecks.active.http_path` must start with `/`, got `health`",
        "upstreams[3] (name \"d\"): `healthchecks.active.headers`: `bad header` is not a header name",
        "`healthchecks.active.https_sni` is not supported yet",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
