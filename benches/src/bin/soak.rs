//! A bounded soak of the real `gateway` binary: mixed traffic for a fixed time while its
//! config file is rewritten (hot reloads) and short-lived connections come and go. Every
//! `--sample` seconds it records the gateway's RSS and open files and the requests and
//! unexpected answers of that interval; at the end it prints the table and a verdict, and
//! exits 1 unless memory and open files stayed flat and no request failed.
//!
//! ```text
//! cargo build --release -p gateway -p gateway-benches
//! target/release/soak --duration 600        # 10 minutes (the default)
//! ```
//!
//! The traffic, from 32 keep-alive connections, cycles through: `GET /open` (200), `GET
//! /auth` with a key (200) and without (401), `POST /open` with 4 KiB (200), `GET /nowhere`
//! (404), on routes with key-auth and rate-limiting (a limit it never reaches). A 33rd
//! client opens a new connection for every request. Everything runs on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/gateway")]
    gateway: PathBuf,
    /// Length of the run, in seconds (at most 3600).
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    sample: u64,
    /// Seconds between config rewrites (each one a hot reload).
    #[arg(long, default_value_t = 5)]
    reload_every: u64,
    /// Keep-alive client connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
}

/// Counters of the current interval; the sampler takes and resets them.
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    unexpected: AtomicU64,
}

fn config(upstream: std::net::SocketAddr, generation: u64) -> String {
    format!(
        r#"_format_version: "3.0"
# generation {generation}
consumers:
- username: soak
  keyauth_credentials: [{{key: soak-key}}]
services:
- name: s
  url: http://{upstream}
  routes:
  - name: open
    paths: ["/open"]
  - name: auth
    paths: ["/auth"]
    plugins:
    - name: key-auth
    - name: rate-limiting
      config: {{second: 1000000, policy: local}}
  - name: generation-{generation}
    paths: ["/generation/{generation}"]
"#
    )
}

/// Writes the config beside its path and renames it into place, as an editor or a ConfigMap
/// update does.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

fn proc_status(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, fds)
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// One request of the mix; true when it got the answer it should.
async fn one(client: &Client<HttpConnector, Full<Bytes>>, base: &str, i: u64) -> bool {
    let (method, path, key, body, want) = match i % 5 {
        0 => ("GET", "/open", false, 0, 200),
        1 => ("GET", "/auth", true, 0, 200),
        2 => ("GET", "/auth", false, 0, 401),
        3 => ("POST", "/open", false, 4096, 200),
        _ => ("GET", "/nowhere", false, 0, 404),
    };
    let mut req = http::Request::builder().method(method).uri(format!("{base}{path}"));
    if key {
        req = req.header("apikey", "soak-key");
    }
    let req = req.body(Full::new(Bytes::from(vec![b'x'; body]))).expect("request");
    match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
        Ok(Ok(resp)) => resp.status() == want && resp.into_body().collect().await.is_ok(),
        _ => false,
    }
}

/// A request on a connection of its own, closed after the answer.
async fn churn(addr: std::net::SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /open HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n\r\n").await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(out.starts_with(b"HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(10), attempt).await, Ok(Some(true)))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let duration = Duration::from_secs(args.duration.clamp(10, 3600));
    if !args.gateway.exists() {
        eprintln!("{} not found: build it with `cargo build --release -p gateway`", args.gateway.display());
        return std::process::ExitCode::FAILURE;
    }
    let up = gateway_benches::loopback_upstream().await;
    let dir = std::env::temp_dir().join(format!("gateway-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("kong.yml");
    write_config(&file, &config(up, 0));
    let free = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    let (addr, admin) = (free(), free());
    let child = Command::new(&args.gateway)
        .arg("run")
        .arg("--config")
        .arg(&file)
        .args(["--listen", &addr.to_string(), "--admin-listen", &admin.to_string(), "--listen-tls", "off"])
        .args(["--access-log", "off", "--workers", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway");
    let gateway = Gateway(child);
    let pid = gateway.0.id();
    let base = format!("http://{addr}");
    let ready = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(ready.elapsed() < Duration::from_secs(15), "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (stop, counts, base) = (stop.clone(), counts.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut i = c as u64;
            while !stop.load(Ordering::Relaxed) {
                let counter = if one(&client, &base, i).await { &counts.ok } else { &counts.unexpected };
                counter.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    {
        let (stop, counts) = (stop.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let counter = if churn(addr).await { &counts.ok } else { &counts.unexpected };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    println!(
        "soak: {} s, {} keep-alive connections + 1 churning, a reload every {} s, gateway pid {pid}",
        duration.as_secs(),
        args.connections,
        args.reload_every
    );
    println!("| t (s) | requests | unexpected | reloads | RSS (MiB) | open files |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let start = Instant::now();
    let (mut samples, mut generation, mut last_reload) = (Vec::new(), 0u64, Instant::now());
    let (mut total_ok, mut total_bad, mut reloads_in_interval) = (0u64, 0u64, 0u64);
    let mut next_sample = start + Duration::from_secs(args.sample);
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if last_reload.elapsed() >= Duration::from_secs(args.reload_every) {
            generation += 1;
            write_config(&file, &config(up, generation));
            last_reload = Instant::now();
            reloads_in_interval += 1;
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(args.sample);
            let (ok, bad) = (counts.ok.swap(0, Ordering::Relaxed), counts.unexpected.swap(0, Ordering::Relaxed));
            let (rss, fds) = proc_status(pid);
            total_ok += ok;
            total_bad += bad;
            println!(
                "| {} | {} | {bad} | {reloads_in_interval} | {:.1} | {fds} |",
                start.elapsed().as_secs(),
                ok + bad,
                rss as f64 / 1024.0
            );
            reloads_in_interval = 0;
            samples.push((rss, fds));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    total_ok += counts.ok.swap(0, Ordering::Relaxed);
    total_bad += counts.unexpected.swap(0, Ordering::Relaxed);
    // The newest route must be served: the reloads took.
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let newest = format!("{base}/generation/{generation}");
    let reloaded = match client.request(http::Request::get(&newest).body(Full::new(Bytes::new())).expect("req")).await {
        Ok(r) => r.status() == 200,
        Err(_) => false,
    };
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);

    // Flat: after the first fifth of the run (warm-up: pools, allocator arenas), the last
    // samples are within 5% (at least 4 MiB) of the first, and open files within 50.
    let warm = samples.len() / 5;
    let (Some(&(base_rss, base_fds)), Some(last)) = (samples.get(warm), samples.len().checked_sub(3)) else {
        println!("too few samples for a verdict: run longer than {} samples", samples.len());
        return std::process::ExitCode::FAILURE;
    };
    let end_rss = samples[last..].iter().map(|s| s.0).max().unwrap_or(0);
    let end_fds = samples[last..].iter().map(|s| s.1).max().unwrap_or(0);
    let rss_flat = end_rss <= base_rss + (base_rss / 20).max(4096);
    let fds_flat = end_fds <= base_fds + 50;
    println!(
        "\n{total_ok} requests answered as expected, {total_bad} not; {generation} reloads (newest route served: {reloaded})"
    );
    println!(
        "RSS {:.1} MiB after warm-up, {:.1} MiB at the end ({}); open files {base_fds} -> {end_fds} ({})",
        base_rss as f64 / 1024.0,
        end_rss as f64 / 1024.0,
        if rss_flat { "flat" } else { "GREW" },
        if fds_flat { "flat" } else { "GREW" }
    );
    if rss_flat && fds_flat && total_bad == 0 && reloaded {
        println!("verdict: pass");
        std::process::ExitCode::SUCCESS
    } else {
        println!("verdict: FAIL");
        std::process::ExitCode::FAILURE
    }
}
