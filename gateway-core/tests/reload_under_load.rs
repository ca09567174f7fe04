//! Reload without loss: continuous load on keep-alive connections while a 10,000-route config
//! is reloaded back to back, up to ten times a second (a debug build compiles fewer). Not one
//! request may fail. Latency under the same storm, in a release build at ten reloads a second,
//! is `benches/src/bin/reload_storm.rs`'s business.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gateway_core::config::Config;

fn big_config(upstream: std::net::SocketAddr, variant: usize) -> Config {
    let mut yaml = format!("_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{upstream}\n  routes:\n");
    for i in 0..10_000 {
        yaml.push_str(&format!(
            "  - {{name: r{i}, hosts: [\"h{i}.example.com\"], paths: [\"/api/v{variant}/{i}\"]}}\n"
        ));
    }
    // The route the load uses is in every variant.
    yaml.push_str("  - {name: hot, paths: [\"/hot\"]}\n");
    Config::from_yaml(&yaml).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_storm_of_10k_routes_drops_no_request() {
    let up = echo_upstream().await;
    let configs = Arc::new([big_config(up.addr, 1), big_config(up.addr, 2)]);
    let gateway = gateway_core::Gateway::new(&configs[0]).unwrap();
    let gw = start_running(gateway, gateway_core::server::ServerSettings::default()).await;

    let run_for = Duration::from_secs(5);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..50 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), gw.url("/hot/x"));
        clients.push(tokio::spawn(async move {
            let client = client(); // one pool per task: keep-alive connections that live through reloads
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(&url).body(full("")).unwrap();
                match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                    Ok(Ok(resp)) if resp.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {:?}", other.map(|r| r.map(|r| r.status())));
                    }
                }
            }
        }));
    }

    let reloads = {
        let (gateway, configs, stop) = (gw.gateway.clone(), configs.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut n = 0usize;
            let start = Instant::now();
            // At least 10 reloads however slow this build is, within a hard 60 s bound.
            while (start.elapsed() < run_for || n < 10) && start.elapsed() < Duration::from_secs(60) {
                let tick = Instant::now();
                gateway.reload(&configs[n % 2]).unwrap();
                n += 1;
                if let Some(rest) = Duration::from_millis(100).checked_sub(tick.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            stop.store(true, Ordering::Relaxed);
            n
        })
    };
    let reloads = reloads.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{reloads} reloads, {ok} requests served, {failed} failed");
    assert_eq!(failed, 0, "{failed} of {} requests failed during {reloads} reloads", ok + failed);
    assert!(reloads >= 10, "the storm happened: {reloads} reloads");
    assert!(ok >= 500, "the load happened: {ok} requests");
    assert_eq!(gw.gateway.routes().len(), 10_001);
}
