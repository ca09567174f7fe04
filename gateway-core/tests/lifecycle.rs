//! Hot reload and graceful shutdown, under real traffic.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config_for(up: std::net::SocketAddr, prefix: &str) -> String {
    format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{up}{prefix}\n  routes: [{{name: r, paths: [\"/\"]}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_continuous_load_fails_no_request() {
    let up = echo_upstream().await;
    let gw = start_gateway(&config_for(up.addr, "/one")).await;
    let one = Config::from_yaml(&config_for(up.addr, "/one")).unwrap();
    let two = Config::from_yaml(&config_for(up.addr, "/two")).unwrap();
    let ok = Arc::new(AtomicU64::new(0));
    let seen_two = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let url = gw.url("/x");
        let (ok, seen_two) = (ok.clone(), seen_two.clone());
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut failures = Vec::new();
            // Bounded by time and by count.
            for _ in 0..100_000 {
                if Instant::now() > deadline {
                    break;
                }
                let req = http::Request::get(&url).body(full("")).unwrap();
                match client.request(req).await {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
                        let echo: Echo = serde_json::from_slice(&body).unwrap();
                        assert!(echo.uri == "/one/x" || echo.uri == "/two/x", "{}", echo.uri);
                        if echo.uri == "/two/x" {
                            seen_two.fetch_add(1, Ordering::Relaxed);
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(resp) => failures.push(format!("status {}", resp.status())),
                    Err(e) => failures.push(format!("error {e}")),
                }
            }
            failures
        }));
    }
    let mut reloads = 0;
    while Instant::now() < deadline {
        gw.gateway.reload(if reloads % 2 == 0 { &two } else { &one }).unwrap();
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(failures.is_empty(), "{} failed requests, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(reloads > 50, "only {reloads} reloads");
    assert!(ok.load(Ordering::Relaxed) > 100, "only {} requests", ok.load(Ordering::Relaxed));
    assert!(seen_two.load(Ordering::Relaxed) > 0, "the reloaded config never served");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_is_refused_and_the_old_config_keeps_serving() {
    let up = echo_upstream().await;
    let gw = start_gateway(&config_for(up.addr, "/good")).await;
    let bad = Config::from_yaml(&format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{}\n  routes: [{{name: r, paths: [\"~/(broken\"]}}]\n",
        up.addr
    ))
    .unwrap();
    let err = gw.gateway.reload(&bad).unwrap_err();
    assert!(err.to_string().contains("routes[0] (name \"r\").paths[0]: invalid regex"), "{err}");
    assert_eq!(get(&gw.url("/x")).await.echo().uri, "/good/x");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let (up, seen) = counting_echo_upstream().await;
    let mut gw = start_gateway(&config_for(up.addr, "")).await;
    let url = gw.url("/slow/700");
    let in_flight = tokio::spawn(async move { get(&url).await });
    reached(&seen, 1).await;
    let started = Instant::now();
    let server = gw.begin_shutdown();
    // New connections are refused once the listener is closed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err(), "still accepting after shutdown began");
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.echo().uri, "/slow/700");
    server.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400), "server stopped before the request finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_survive_a_reload_of_an_unchanged_service() {
    let up = echo_upstream().await;
    let gw = start_gateway(&config_for(up.addr, "")).await;
    // One client connection, sequential requests: the gateway reuses one pooled upstream connection.
    let first = get(&gw.url("/a")).await.echo().peer;
    assert_eq!(get(&gw.url("/b")).await.echo().peer, first, "no keep-alive to the upstream");
    // Same service, a new route: the pool carries over.
    let reloaded = format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{}\n  routes: [{{name: r, paths: [\"/\"]}}, {{name: extra, paths: [\"/extra\"]}}]\n",
        up.addr
    );
    gw.gateway.reload(&Config::from_yaml(&reloaded).unwrap()).unwrap();
    assert_eq!(gw.gateway.routes().len(), 2);
    assert_eq!(get(&gw.url("/c")).await.echo().peer, first, "the reload dropped the upstream pool");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_busy_after_the_grace_period_are_closed() {
    let (up, seen) = counting_echo_upstream().await;
    let settings = ServerSettings { shutdown_grace: Duration::from_millis(300), ..Default::default() };
    let mut gw = start_gateway_with(&config_for(up.addr, ""), settings).await;
    // The upstream holds this request for 5 s, far past the grace period.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /slow/5000 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    reached(&seen, 1).await;
    let started = Instant::now();
    let server = gw.begin_shutdown();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection outlived the grace period by 3 s");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "closed before the grace period ended: {waited:?}");
    assert!(waited < Duration::from_secs(2), "closed only after {waited:?}");
    assert!(rest.is_empty(), "an answer came: {}", String::from_utf8_lossy(&rest));
    tokio::time::timeout(Duration::from_secs(2), server).await.expect("serve returned").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_sent_nothing_yet_are_closed_at_once_on_shutdown() {
    let up = echo_upstream().await;
    let mut gw = start_gateway(&config_for(up.addr, "")).await;
    // Silent, and half an HTTP/2 preface: both still waiting for their first request.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    partial.write_all(b"PRI * HT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let server = gw.begin_shutdown();
    for s in [&mut silent, &mut partial] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a connection with no request held shutdown for 3 s");
    }
    // Well within the default 30 s grace period and 10 s header timeout.
    tokio::time::timeout(Duration::from_secs(2), server).await.expect("serve returned").unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "shutdown took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_still_busy_after_the_grace_period_are_closed() {
    let (up, seen) = counting_echo_upstream().await;
    let settings = ServerSettings { shutdown_grace: Duration::from_millis(300), ..Default::default() };
    let mut gw = start_gateway_with(&config_for(up.addr, ""), settings).await;
    let url = gw.url("/slow/5000");
    let in_flight = tokio::spawn(async move {
        let req = http::Request::get(url).body(full("")).unwrap();
        h2_client().request(req).await.map(|r| r.status())
    });
    reached(&seen, 1).await;
    let started = Instant::now();
    let server = gw.begin_shutdown();
    let outcome = tokio::time::timeout(Duration::from_secs(3), in_flight).await;
    let outcome = outcome.expect("the HTTP/2 request outlived the grace period by 3 s").unwrap();
    assert!(outcome.is_err(), "an answer came: {outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(250), "cut before the grace period ended");
    tokio::time::timeout(Duration::from_secs(2), server).await.expect("serve returned").unwrap().unwrap();
}
