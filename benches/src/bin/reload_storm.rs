//! Latency under a reload storm: the same bounded load (50 keep-alive connections) against a
//! 10,000-route config, first with no reloads, then with ten reloads a second. Prints
//! requests, failures and p50/p99/max of each phase, and the p99 ratio (target: at most 2x).
//!
//! ```text
//! cargo run --release -p gateway-benches --bin reload_storm [-- SECONDS_PER_PHASE]
//! ```
//!
//! Everything runs in this process on 127.0.0.1: a tiny hyper upstream, the gateway, the load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

const CONNECTIONS: usize = 50;

fn config(upstream: std::net::SocketAddr, variant: usize) -> Config {
    let mut yaml = format!("_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{upstream}\n  routes:\n");
    for i in 0..10_000 {
        yaml.push_str(&format!(
            "  - {{name: r{i}, hosts: [\"h{i}.example.com\"], paths: [\"/api/v{variant}/{i}\"]}}\n"
        ));
    }
    yaml.push_str("  - {name: hot, paths: [\"/hot\"]}\n");
    Config::from_yaml(&yaml).expect("generated config parses")
}

struct Phase {
    latencies: Vec<Duration>,
    failed: usize,
    reloads: usize,
}

impl Phase {
    fn pct(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

async fn phase(url: &str, gateway: &Gateway, configs: &Arc<[Config; 2]>, length: Duration, reload: bool) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (stop, url) = (stop.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let (mut lat, mut failed) = (Vec::new(), 0usize);
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let req = http::Request::get(&url).body(Empty::new()).expect("request");
                let ok = match client.request(req).await {
                    Ok(resp) => resp.status() == 200 && resp.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    lat.push(start.elapsed());
                } else {
                    failed += 1;
                }
            }
            (lat, failed)
        }));
    }
    let reloader = {
        let (gateway, configs, stop) = (gateway.clone(), configs.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let (start, mut n) = (Instant::now(), 0usize);
            while start.elapsed() < length {
                let tick = Instant::now();
                if reload {
                    gateway.reload(&configs[n % 2]).expect("valid config");
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
            }
            stop.store(true, Ordering::Relaxed);
            n
        })
    };
    let reloads = reloader.await.expect("reloader");
    let mut out = Phase { latencies: Vec::new(), failed: 0, reloads };
    for t in tasks {
        let (lat, failed) = t.await.expect("load task");
        out.latencies.extend(lat);
        out.failed += failed;
    }
    out
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20).clamp(1, 600);
    let length = Duration::from_secs(secs);
    let up = gateway_benches::loopback_upstream().await;
    let configs = Arc::new([config(up, 1), config(up, 2)]);
    let gateway = Gateway::new(&configs[0]).expect("config compiles");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hot", listener.local_addr().expect("addr"));
    let g = gateway.clone();
    tokio::spawn(async move { g.serve(vec![listener], ServerSettings::default(), std::future::pending()).await });

    println!("{CONNECTIONS} connections, {secs} s per phase, 10,001 routes");
    println!(
        "{:<16} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9}",
        "phase", "requests", "failed", "reloads", "p50", "p99", "max"
    );
    let mut results = Vec::new();
    for (name, reload) in [("no reloads", false), ("10 reloads/s", true)] {
        let mut p = phase(&url, &gateway, &configs, length, reload).await;
        let (p50, p99, max) = (p.pct(0.5), p.pct(0.99), p.pct(1.0));
        println!(
            "{name:<16} {:>9} {:>7} {:>8} {:>9.2?} {:>9.2?} {:>9.2?}",
            p.latencies.len(),
            p.failed,
            p.reloads,
            p50,
            p99,
            max
        );
        results.push((p99, p.failed));
    }
    let ratio = results[1].0.as_secs_f64() / results[0].0.as_secs_f64().max(1e-9);
    println!(
        "p99 with reloads / without: {ratio:.2}x (target <= 2x); failed requests: {}",
        results[0].1 + results[1].1
    );
}
