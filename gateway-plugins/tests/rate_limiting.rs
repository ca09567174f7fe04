//! rate-limiting (local policy) through the real proxy: headers, refusals, exact counting
//! under concurrency, per-consumer budgets.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};

async fn start(upstream: std::net::SocketAddr, config: &str) -> RunningGateway {
    let yaml = format!(
        r#"_format_version: "3.0"
consumers:
- username: alice
  keyauth_credentials: [{{key: alice-key}}]
- username: bob
  keyauth_credentials: [{{key: bob-key}}]
services:
- name: s
  url: http://{upstream}
  routes:
  - {{name: limited, paths: ["/limited"], plugins: [{{name: rate-limiting, config: {config}}}]}}
  - name: per-consumer
    paths: ["/per-consumer"]
    plugins: [{{name: key-auth}}, {{name: rate-limiting, config: {{hour: 2}}}}]
"#
    );
    let gateway =
        Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
    start_running(gateway, ServerSettings::default()).await
}

fn hour_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 3600
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_count_down_and_the_limit_answers_429() {
    let up = echo_upstream().await;
    for _attempt in 0..2 {
        let hour = hour_now();
        let gw = start(up.addr, "{hour: 3, day: 10}").await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(get(&gw.url("/limited")).await);
        }
        gw.shutdown().await;
        if hour_now() != hour {
            continue; // an hour boundary fell inside the test: counts restarted, run again
        }
        for (i, resp) in seen[..3].iter().enumerate() {
            assert_eq!(resp.status, StatusCode::OK);
            assert_eq!(resp.headers["x-ratelimit-limit-hour"], "3");
            assert_eq!(resp.headers["x-ratelimit-remaining-hour"], (2 - i).to_string().as_str());
            assert_eq!(resp.headers["x-ratelimit-limit-day"], "10");
            assert_eq!(resp.headers["x-ratelimit-remaining-day"], (9 - i).to_string().as_str());
            assert_eq!(resp.headers["ratelimit-limit"], "3");
            assert_eq!(resp.headers["ratelimit-remaining"], (2 - i).to_string().as_str());
            let reset: u64 = resp.headers["ratelimit-reset"].to_str().unwrap().parse().unwrap();
            assert!((1..=3600).contains(&reset), "{reset}");
        }
        let refused = &seen[3];
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.json()["message"], "API rate limit exceeded");
        assert_eq!(refused.headers["x-ratelimit-remaining-hour"], "0");
        let retry: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
        return;
    }
    panic!("crossed an hour boundary twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_n_pass_with_16_concurrent_clients() {
    const N: u64 = 40;
    let up = echo_upstream().await;
    for _attempt in 0..2 {
        let hour = hour_now();
        let gw = start(up.addr, &format!("{{hour: {N}, limit_by: service}}")).await;
        let passed = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for _ in 0..16 {
            let (url, passed, refused) = (gw.url("/limited"), passed.clone(), refused.clone());
            clients.push(tokio::spawn(async move {
                let client = client();
                for _ in 0..10 {
                    let resp = client.request(Request::get(&url).body(full("")).unwrap()).await.unwrap();
                    match resp.status() {
                        StatusCode::OK => passed.fetch_add(1, Ordering::SeqCst),
                        StatusCode::TOO_MANY_REQUESTS => refused.fetch_add(1, Ordering::SeqCst),
                        other => panic!("unexpected {other}"),
                    };
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        gw.shutdown().await;
        if hour_now() != hour {
            continue;
        }
        assert_eq!(passed.load(Ordering::SeqCst), N);
        assert_eq!(refused.load(Ordering::SeqCst), 160 - N);
        return;
    }
    panic!("crossed an hour boundary twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_has_its_own_budget_and_headers_can_be_hidden() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "{hour: 1, hide_client_headers: true, error_code: 503, error_message: slow down}").await;
    let as_user = |key: &'static str| {
        let url = gw.url("/per-consumer");
        async move { send(Request::get(url).header("apikey", key).body(full("")).unwrap()).await.status }
    };
    let hour = hour_now();
    let statuses =
        [as_user("alice-key").await, as_user("alice-key").await, as_user("alice-key").await, as_user("bob-key").await];
    if hour_now() == hour {
        assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS, StatusCode::OK]);
    }
    let first = get(&gw.url("/limited")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("x-ratelimit-remaining-hour"), "hidden");
    let second = get(&gw.url("/limited")).await;
    if hour_now() == hour {
        assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second.json()["message"], "slow down");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_limit_config_fails_its_route() {
    let up = echo_upstream().await;
    for bad in ["{}", "{minute: 10, hour: 5}", "{hour: 5, policy: redis}", "{hour: 5, limit_by: header}"] {
        let gw = start(up.addr, bad).await;
        assert_eq!(get(&gw.url("/limited")).await.status, StatusCode::INTERNAL_SERVER_ERROR, "{bad}");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_is_one_budget_across_routes() {
    let up = echo_upstream().await;
    for _attempt in 0..2 {
        let hour = hour_now();
        let yaml = format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes: [{{name: a, paths: ["/a"]}}, {{name: b, paths: ["/b"]}}]
plugins: [{{name: rate-limiting, config: {{hour: 3, limit_by: ip}}}}]
"#,
            up.addr
        );
        let gateway =
            Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
        let gw = start_running(gateway, ServerSettings::default()).await;
        let mut statuses = Vec::new();
        for path in ["/a", "/b", "/a", "/b"] {
            statuses.push(get(&gw.url(path)).await.status);
        }
        gw.shutdown().await;
        if hour_now() != hour {
            continue;
        }
        assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
        return;
    }
    panic!("crossed an hour boundary twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_by_path_counts_the_normalised_path() {
    let up = echo_upstream().await;
    for _attempt in 0..2 {
        let hour = hour_now();
        let yaml = format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes: [{{name: a, paths: ["/api"], strip_path: false}}]
  plugins: [{{name: rate-limiting, config: {{hour: 2, limit_by: path, path: /api/users}}}}]
"#,
            up.addr
        );
        let gateway =
            Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
        let gw = start_running(gateway, ServerSettings::default()).await;
        let mut statuses = Vec::new();
        // Three spellings of one path share one budget.
        for path in ["/api/users", "/api/%75sers", "/api/x/../users"] {
            statuses.push(get(&gw.url(path)).await.status);
        }
        gw.shutdown().await;
        if hour_now() != hour {
            continue;
        }
        assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
        return;
    }
    panic!("crossed an hour boundary twice");
}
