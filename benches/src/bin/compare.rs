//! Side-by-side load comparison on loopback: the upstream directly (the ceiling), the gateway
//! with no plugins, the gateway with key-auth + rate-limiting + jwt, nginx (1 worker,
//! keep-alive upstream pool), haproxy (1 thread) and `hyper-proxy`, the least a proxy on
//! hyper does (this binary's `serve_hyper_proxy`: the floor of the gateway's stack), measured
//! in rounds (A B C ... A B C) so that the machine's drift hits every target alike. Writes the
//! medians and the ratios to nginx into BENCHMARKS.md: the ratio of the medians, and the median
//! of the ratios within each round, which the drift over the whole run touches less.
//!
//! ```text
//! benches/compare [--rounds 3] [--duration 10] [--connections 50,256] [--quick]
//! ```
//!
//! `--baseline PATH` adds a second gateway binary (another build, without plugins) as the
//! target `baseline`, measured in the same rounds: an A/B of two builds that the runner's
//! drift between separate runs cannot blur.
//!
//! Layout, as the reference figures were measured: each proxy alone on core 0 (`taskset`),
//! the upstream and wrk (1 thread) together on core 1. The runner installs nothing; it says
//! what is missing (`wrk`, `nginx`, `haproxy`, `taskset`) and leaves those targets out.
//! `benches/compare` builds the release binaries first; this binary expects them built.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "Load comparison of the gateway with nginx and haproxy on loopback")]
struct Args {
    /// Rounds; every target is measured once per round and connection count.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// wrk connection counts, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [50usize, 256])]
    connections: Vec<usize>,
    /// 2 rounds of 3 s, 1,000 idle connections: a smoke run, not figures to quote.
    #[arg(long)]
    quick: bool,
    /// Idle keep-alive connections held open for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Only these targets (direct, gateway, baseline, gateway-plugins, nginx, haproxy,
    /// hyper-proxy), comma separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/gateway")]
    gateway: PathBuf,
    /// Another gateway binary (another build), measured without plugins as the target
    /// `baseline` in the same rounds as the others.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Where the results go (the section between the compare markers is replaced); `-` for
    /// standard output only.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: String,
    /// Internal: serve the benchmark upstream on this address and print its port.
    #[arg(long, hide = true)]
    serve_upstream: Option<SocketAddr>,
    /// Internal: serve the minimal hyper proxy (the stack's floor) on this address, to the
    /// upstream given by `--proxy-to`.
    #[arg(long, hide = true, requires = "proxy_to")]
    serve_hyper_proxy: Option<SocketAddr>,
    /// Internal: the upstream of `--serve-hyper-proxy`.
    #[arg(long, hide = true)]
    proxy_to: Option<SocketAddr>,
}

/// The 12-byte body every request gets from the upstream.
const BODY: &[u8] = b"hello world\n";
const API_KEY: &str = "bench-key";

fn main() {
    let mut args = Args::parse();
    if let Some(addr) = args.serve_upstream {
        serve_upstream(addr);
        return;
    }
    if let (Some(addr), Some(upstream)) = (args.serve_hyper_proxy, args.proxy_to) {
        serve_hyper_proxy(addr, upstream);
        return;
    }
    if args.quick {
        args.rounds = 2;
        args.duration = 3;
        args.idle_connections = args.idle_connections.min(1_000);
    }
    if let Err(e) = run(&args) {
        eprintln!("compare: {e}");
        std::process::exit(1);
    }
}

/// A plain hyper HTTP/1.1 server on one current-thread runtime: as cheap an upstream as this
/// stack makes, so the proxies are what is measured.
fn serve_upstream(addr: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the upstream");
        println!("{}", listener.local_addr().expect("local address").port());
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req: hyper::Request<Incoming>| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

/// The least a reverse proxy on this stack does, as the floor the gateway is measured against:
/// hyper's HTTP/1.1 server and client on one current-thread runtime, each client connection
/// with its own keep-alive upstream connection (opened on its first request), the request
/// passed on as it came (headers, body) and the response streamed back as it came. No
/// routing, no header rewriting, no timeouts, no pool shared between client connections, no
/// retries: what it costs per request is hyper's and tokio's part of any proxy built on them.
fn serve_hyper_proxy(addr: SocketAddr, upstream: SocketAddr) {
    use hyper::client::conn::http1::SendRequest;
    use std::sync::{Arc, Mutex};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the proxy");
        println!("{}", listener.local_addr().expect("local address").port());
        // Ends on SIGINT by returning, so a profiler it runs under writes its files.
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = &mut interrupted => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                // HTTP/1.1 serves a connection's requests one after another, so one upstream
                // connection per client connection is never asked for two at once.
                let sender: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let sender = sender.clone();
                    async move {
                        let kept = sender.lock().expect("not poisoned").take();
                        let mut conn = match kept {
                            Some(c) if !c.is_closed() => c,
                            _ => {
                                let io = tokio::net::TcpStream::connect(upstream).await?;
                                let _ = io.set_nodelay(true);
                                let (c, task) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                                    .await
                                    .map_err(std::io::Error::other)?;
                                tokio::spawn(task);
                                c
                            }
                        };
                        conn.ready().await.map_err(std::io::Error::other)?;
                        let resp = conn.send_request(req).await.map_err(std::io::Error::other)?;
                        *sender.lock().expect("not poisoned") = Some(conn);
                        Ok::<_, std::io::Error>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

/// One process under test (with its children, for nginx's workers).
struct Target {
    name: &'static str,
    url: String,
    child: Option<Child>,
    /// RSS right after start, before any load (KiB).
    idle_rss: u64,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Target {
    /// The process and its direct children (nginx's workers).
    fn pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else { return Vec::new() };
        let mut pids = vec![child.id()];
        pids.extend(children(child.id()));
        pids
    }

    /// CPU seconds used so far (user + system), over the process tree.
    fn cpu_seconds(&self) -> f64 {
        self.pids().iter().map(|&p| cpu_seconds(p)).sum()
    }

    /// A `/proc/PID/status` field in KiB (VmRSS, VmHWM), summed over the process tree.
    fn memory_kib(&self, field: &str) -> u64 {
        self.pids().iter().map(|&p| status_kib(p, field)).sum()
    }
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the parenthesised command: state, ppid, ...
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            if rest.split_whitespace().nth(1).and_then(|v| v.parse::<u32>().ok()) == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    ticks as f64 / clock_ticks() as f64
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Waits until `url` answers 200 with the upstream's body.
fn wait_ready(name: &str, url: &str, headers: &[(String, String)]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match get_once(url, headers) {
            Ok((200, body)) if body.ends_with(std::str::from_utf8(BODY).unwrap()) => return Ok(()),
            Ok((status, _)) => last = format!("status {status}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{name} did not answer 200 at {url} within 10 s (last: {last})"))
}

/// One HTTP/1.1 GET over a fresh connection: (status, body).
fn get_once(url: &str, headers: &[(String, String)]) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut req = String::from("GET / HTTP/1.1\r\nHost: bench.local\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status line")?;
    Ok((status, out))
}

/// Starts `cmd` on core 0; `Err` if it exits at once.
fn spawn_pinned(program: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = Command::new("taskset")
        .arg("-c")
        .arg("0")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = child.try_wait() {
        return Err(format!("{} exited at once ({status})", program.display()));
    }
    Ok(child)
}

struct Env {
    dir: PathBuf,
    /// This process's open-file limit, which the proxies inherit.
    max_files: u64,
    upstream_port: u16,
    headers: Vec<(String, String)>,
}

fn gateway_config(env: &Env, plugins: bool) -> String {
    let mut yaml = format!(
        "_format_version: \"3.0\"\nservices:\n- name: upstream\n  url: http://127.0.0.1:{}\n  routes: [{{name: all, paths: [\"/\"]}}]\n",
        env.upstream_port
    );
    if plugins {
        yaml.push_str(
            "  plugins:\n  - {name: key-auth}\n  - {name: rate-limiting, config: {second: 1000000000, policy: local}}\n  - {name: jwt}\nconsumers:\n- username: bench\n  keyauth_credentials: [{key: bench-key}]\n  jwt_secrets: [{key: bench-iss, secret: bench-secret}]\n",
        );
    }
    yaml
}

fn start_gateway(env: &Env, gateway: &Path, name: &'static str, plugins: bool) -> Result<Target, String> {
    let file = env.dir.join(format!("{name}.yaml"));
    std::fs::write(&file, gateway_config(env, plugins)).map_err(|e| e.to_string())?;
    let port = free_port();
    let args: Vec<String> = [
        "run",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--listen-tls",
        "off",
        "--admin-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--workers",
        "1",
        "--access-log",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let child = spawn_pinned(gateway, &args, &env.dir.join(format!("{name}.log")))?;
    Ok(Target { name, url: format!("http://127.0.0.1:{port}/"), child: Some(child), idle_rss: 0 })
}

fn start_nginx(env: &Env) -> Result<Target, String> {
    let port = free_port();
    let dir = env.dir.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let conf = format!(
        r#"worker_processes 1;
worker_rlimit_nofile {fds};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream backend {{
        server 127.0.0.1:{up};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        dir = dir.display(),
        up = env.upstream_port,
        fds = env.max_files,
        conns = env.max_files - 100,
    );
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf).map_err(|e| e.to_string())?;
    let nginx = PathBuf::from(which_path("nginx").ok_or("nginx not found")?);
    let args = vec!["-p".into(), dir.display().to_string(), "-c".into(), file.display().to_string()];
    let child = spawn_pinned(&nginx, &args, &dir.join("stdout.log"))?;
    Ok(Target { name: "nginx", url: format!("http://127.0.0.1:{port}/"), child: Some(child), idle_rss: 0 })
}

/// The minimal hyper proxy (`serve_hyper_proxy`), this binary itself, on core 0 as the others.
fn start_hyper_proxy(env: &Env) -> Result<Target, String> {
    let port = free_port();
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let args = [
        "--serve-hyper-proxy".to_string(),
        format!("127.0.0.1:{port}"),
        "--proxy-to".to_string(),
        format!("127.0.0.1:{}", env.upstream_port),
    ];
    let child = spawn_pinned(&me, &args, &env.dir.join("hyper-proxy.log"))?;
    Ok(Target { name: "hyper-proxy", url: format!("http://127.0.0.1:{port}/"), child: Some(child), idle_rss: 0 })
}

fn start_haproxy(env: &Env) -> Result<Target, String> {
    let port = free_port();
    let conf = format!(
        r#"global
    nbthread 1
    ulimit-n {fds}
    maxconn {conns}
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
frontend bench
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    http-reuse always
    server up 127.0.0.1:{up}
"#,
        up = env.upstream_port,
        fds = env.max_files,
        // haproxy wants two descriptors per connection it may accept.
        conns = (env.max_files - 100) / 2,
    );
    let file = env.dir.join("haproxy.cfg");
    std::fs::write(&file, conf).map_err(|e| e.to_string())?;
    let haproxy = PathBuf::from(which_path("haproxy").ok_or("haproxy not found")?);
    let args = vec!["-db".into(), "-f".into(), file.display().to_string()];
    let child = spawn_pinned(&haproxy, &args, &env.dir.join("haproxy.log"))?;
    Ok(Target { name: "haproxy", url: format!("http://127.0.0.1:{port}/"), child: Some(child), idle_rss: 0 })
}

/// The soft open-file limit of this process (`Max open files` in `/proc/self/limits`).
fn open_file_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

fn which_path(tool: &str) -> Option<String> {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// CPU seconds of the proxy per 1,000 requests (0 for direct).
    cpu_per_1000: f64,
    errors: u64,
}

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

fn wrk(env: &Env, target: &Target, connections: usize, seconds: u64) -> Result<Sample, String> {
    let script = env.dir.join("report.lua");
    let cpu_before = target.cpu_seconds();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("-s")
        .arg(&script);
    for (k, v) in &env.headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    let out = cmd.arg(&target.url).output().map_err(|e| format!("cannot run wrk: {e}"))?;
    let cpu = target.cpu_seconds() - cpu_before;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("wrk printed no result: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
    let n: Vec<f64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let [requests, duration_us, errors, non2xx, p50, p99, p999] = n[..] else {
        return Err(format!("unexpected wrk result line: {line}"));
    };
    Ok(Sample {
        // Only 2xx answers count: a target refusing fast must not look fast.
        rps: (requests - non2xx) / (duration_us / 1e6),
        p50_us: p50,
        p99_us: p99,
        p999_us: p999,
        cpu_per_1000: if target.child.is_some() { cpu / requests * 1000.0 } else { 0.0 },
        errors: (errors + non2xx) as u64,
    })
}

/// Opens `n` keep-alive connections to `url`, one request on each, holds them, and returns
/// the target's RSS (KiB) while they are open, or an error.
fn rss_with_idle_connections(target: &Target, n: usize, headers: &[(String, String)]) -> Result<u64, String> {
    let addr: SocketAddr = target.url.trim_start_matches("http://").trim_end_matches('/').parse().unwrap();
    let mut request = String::from("GET / HTTP/1.1\r\nHost: bench.local\r\n");
    for (k, v) in headers {
        let _ = write!(request, "{k}: {v}\r\n");
    }
    request.push_str("\r\n");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let sem = sem.clone();
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await;
                let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
                // Read until the whole 12-byte body is in (headers end with the body).
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.ends_with(BODY) {
                    let k = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                        .await
                        .map_err(|_| "timeout".to_string())?
                        .map_err(|e| e.to_string())?;
                    if k == 0 {
                        return Err("closed".to_string());
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                Ok::<_, String>(s)
            }));
        }
        let mut open = Vec::with_capacity(n);
        let mut failed = 0usize;
        let mut first_error = None;
        for t in tasks {
            match t.await.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(s) => open.push(s),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = target.memory_kib("VmRSS");
        drop(open);
        if failed > 0 {
            return Err(format!("{failed} of {n} connections failed (first: {})", first_error.unwrap_or_default()));
        }
        Ok(rss)
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let s = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&s).lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn run(args: &Args) -> Result<(), String> {
    let mut missing = Vec::new();
    for tool in ["taskset", "wrk", "nginx", "haproxy"] {
        if !which(tool) {
            missing.push(tool);
        }
    }
    if missing.contains(&"taskset") || missing.contains(&"wrk") {
        return Err(format!(
            "missing {}: install them (Debian: apt-get install -y util-linux wrk) and run again",
            missing.join(", ")
        ));
    }
    for tool in &missing {
        eprintln!("compare: {tool} is not installed (Debian: apt-get install -y {tool}); its target is left out");
    }
    if !args.gateway.exists() {
        return Err(format!(
            "{} does not exist: build it first (cargo build --release -p gateway), or use benches/compare",
            args.gateway.display()
        ));
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);

    let dir = std::env::temp_dir().join(format!("gateway-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("report.lua"), WRK_SCRIPT).map_err(|e| e.to_string())?;

    // The upstream, on core 1 beside wrk.
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut upstream = Command::new("taskset")
        .args(["-c", "1"])
        .arg(&me)
        .arg("--serve-upstream")
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the upstream: {e}"))?;
    let mut port_line = String::new();
    {
        use std::io::BufRead;
        let stdout = upstream.stdout.take().expect("piped");
        std::io::BufReader::new(stdout).read_line(&mut port_line).map_err(|e| e.to_string())?;
    }
    let upstream_port: u16 = port_line.trim().parse().map_err(|_| format!("the upstream printed {port_line:?}"))?;
    let upstream_guard = Target { name: "upstream", url: String::new(), child: Some(upstream), idle_rss: 0 };

    let token = gateway_benches::hs256_token("bench-iss", b"bench-secret");
    // Every target gets the same request bytes, credentials included.
    let headers = vec![("apikey".to_string(), API_KEY.to_string()), ("Authorization".to_string(), token)];
    let max_files = open_file_limit();
    if (max_files as usize) < args.idle_connections + 1_000 {
        eprintln!(
            "compare: the open-file limit is {max_files}, too low for {} idle connections (raise it with ulimit -n; benches/compare does)",
            args.idle_connections
        );
    }
    let env = Env { dir: dir.clone(), max_files, upstream_port, headers };

    let mut targets: Vec<Target> = Vec::new();
    if wanted("direct") {
        targets.push(Target {
            name: "direct",
            url: format!("http://127.0.0.1:{upstream_port}/"),
            child: None,
            idle_rss: 0,
        });
    }
    type Start<'a> = Box<dyn Fn() -> Result<Target, String> + 'a>;
    let mut starts: Vec<(&str, Start<'_>)> = vec![
        ("gateway", Box::new(|| start_gateway(&env, &args.gateway, "gateway", false))),
        ("gateway-plugins", Box::new(|| start_gateway(&env, &args.gateway, "gateway-plugins", true))),
        ("nginx", Box::new(|| start_nginx(&env))),
        ("haproxy", Box::new(|| start_haproxy(&env))),
        ("hyper-proxy", Box::new(|| start_hyper_proxy(&env))),
    ];
    if let Some(baseline) = args.baseline.as_deref() {
        let env = &env;
        starts.insert(1, ("baseline", Box::new(move || start_gateway(env, baseline, "baseline", false))));
    }
    for (name, start) in starts {
        if !wanted(name) || missing.contains(&name) {
            continue;
        }
        let mut t = start()?;
        wait_ready(name, &t.url, &env.headers)?;
        std::thread::sleep(Duration::from_millis(200));
        t.idle_rss = t.memory_kib("VmRSS");
        targets.push(t);
    }
    let plan = format!(
        "{} rounds x {:?} connections x {} s per run, targets: {}",
        args.rounds,
        args.connections,
        args.duration,
        targets.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
    );
    eprintln!("compare: {plan}");

    // Warm-up: a short run on each, discarded (pools filled, caches and page tables warm).
    for t in &targets {
        wrk(&env, t, 50, 1)?;
    }
    let mut samples: BTreeMap<(usize, &str), Vec<Sample>> = BTreeMap::new();
    for round in 1..=args.rounds {
        for &c in &args.connections {
            for t in &targets {
                let s = wrk(&env, t, c, args.duration)?;
                eprintln!(
                    "round {round} c={c:<4} {:<16} {:>9.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us  p99.9 {:>6.0} us  cpu {:.4} s/1000 req  errors {}",
                    t.name, s.rps, s.p50_us, s.p99_us, s.p999_us, s.cpu_per_1000, s.errors
                );
                samples.entry((c, t.name)).or_default().push(s);
            }
        }
    }
    let peak: Vec<(&str, u64)> = targets.iter().map(|t| (t.name, t.memory_kib("VmHWM"))).collect();
    let mut idle_conns: BTreeMap<&str, Result<(u64, u64), String>> = BTreeMap::new();
    for t in targets.iter().filter(|t| t.child.is_some()) {
        let before = t.memory_kib("VmRSS");
        let r = rss_with_idle_connections(t, args.idle_connections, &env.headers).map(|with| (before, with));
        if let Err(e) = &r {
            eprintln!("compare: {} with {} idle connections: {e}", t.name, args.idle_connections);
        }
        idle_conns.insert(t.name, r);
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(upstream_guard);

    // The report.
    let mut md = String::new();
    let _ = writeln!(md, "## Load comparison with nginx and haproxy\n");
    let _ = writeln!(
        md,
        "`benches/compare` ({}), {}. Measured {} on {}.\n",
        if args.quick { "quick mode: a smoke run, not figures to quote" } else { "full run" },
        plan,
        today(),
        machine()
    );
    let _ = writeln!(
        md,
        "Layout: each proxy alone on core 0 (`taskset -c 0`), the upstream (a hyper HTTP/1.1 server on one \
         thread, 12-byte body) and `wrk -t1 --latency` together on core 1; every target gets the same \
         request, `apikey` and `Authorization: Bearer` headers included. The gateway runs with \
         `--workers 1 --access-log off`, nginx with 1 worker, `access_log off` and a keep-alive upstream \
         pool, haproxy with `nbthread 1` and `http-reuse always`. `hyper-proxy` is the least a proxy on \
         the gateway's stack does (hyper's HTTP/1.1 server and client on one current-thread tokio \
         runtime, one keep-alive upstream connection per client connection, the request and response \
         passed on unchanged): the floor of that stack. Medians over the rounds; CPU is \
         user + system time of the proxy's processes from `/proc/PID/stat`.\n"
    );
    if let Some(baseline) = &args.baseline {
        let _ = writeln!(
            md,
            "`baseline` is another build of the gateway (`{}`), run as `gateway` is, without plugins.\n",
            baseline.display()
        );
    }
    let _ = writeln!(
        md,
        "Versions: {}; {}; {}.\n",
        version(args.gateway.to_str().unwrap_or("gateway"), "--version"),
        version("nginx", "-v"),
        version("haproxy", "-v")
    );
    let _ = writeln!(
        md,
        "Ratios to nginx: the ratio of the medians, then in brackets the median of the ratios within \
         each round. A round runs the targets back to back, so its ratio is less exposed to the \
         runner's drift over the whole run; when the two disagree, the runner moved during the run.\n"
    );
    for &c in &args.connections {
        let nginx = samples.get(&(c, "nginx"));
        let _ = writeln!(md, "### {c} connections\n");
        let _ = writeln!(
            md,
            "| target | req/s | vs nginx | p50 | p99 | p99 vs nginx | p99.9 | CPU ms / 1000 req | CPU vs nginx | errors |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for t in &targets {
            let Some(s) = samples.get(&(c, t.name)) else { continue };
            let figure = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
            let vs_nginx = |f: fn(&Sample) -> f64| nginx.map_or_else(|| "-".to_string(), |n| ratios(s, n, f));
            let measured = t.child.is_some();
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} | {:.0} µs | {:.0} µs | {} | {:.0} µs | {} | {} | {} |",
                t.name,
                figure(|x| x.rps),
                vs_nginx(|x| x.rps),
                figure(|x| x.p50_us),
                figure(|x| x.p99_us),
                vs_nginx(|x| x.p99_us),
                figure(|x| x.p999_us),
                if measured { format!("{:.1}", figure(|x| x.cpu_per_1000) * 1000.0) } else { "-".into() },
                if measured { vs_nginx(|x| x.cpu_per_1000) } else { "-".into() },
                s.iter().map(|x| x.errors).sum::<u64>(),
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "### Memory\n");
    let _ = writeln!(
        md,
        "| target | idle RSS | peak RSS under load | RSS with {} idle keep-alive connections | extra |",
        args.idle_connections
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
    for (name, peak) in &peak {
        let Some(t) = targets.iter().find(|t| t.name == *name) else { continue };
        if t.child.is_none() {
            continue;
        }
        let (with, extra) = match idle_conns.get(name) {
            Some(Ok((before, with))) => (mib(*with), mib(with.saturating_sub(*before))),
            Some(Err(e)) => (format!("failed: {e}"), "-".into()),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(md, "| {} | {} | {} | {} | {} |", name, mib(t.idle_rss), mib(*peak), with, extra);
    }
    let _ = writeln!(md);
    print!("{md}");
    if args.output != "-" {
        write_section(Path::new(&args.output), &md)?;
        eprintln!("compare: results written to {}", args.output);
    }
    drop(targets);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A target's figure `f` against nginx's (`base`, the same rounds): the ratio of the medians,
/// and in brackets the median of the ratios within each round (`1.02x (0.98x)`).
fn ratios(s: &[Sample], base: &[Sample], f: fn(&Sample) -> f64) -> String {
    let of_medians = (median(s.iter().map(f).collect()), median(base.iter().map(f).collect()));
    let per_round: Vec<f64> =
        s.iter().zip(base).filter(|(a, b)| f(a) > 0.0 && f(b) > 0.0).map(|(a, b)| f(a) / f(b)).collect();
    match of_medians {
        (a, b) if a > 0.0 && b > 0.0 && !per_round.is_empty() => {
            format!("{:.2}x ({:.2}x)", a / b, median(per_round))
        }
        _ => "-".to_string(),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

const START: &str = "<!-- compare:start (written by benches/compare; edits inside are replaced) -->";
const END: &str = "<!-- compare:end -->";

/// Replaces the compare section of `path` (between the markers), or appends it.
fn write_section(path: &Path, section: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{START}\n{section}{END}");
    let out = match (text.find(START), text.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &text[..a], block, &text[b + END.len()..]),
        _ => format!("{}\n{block}\n", text.trim_end()),
    };
    std::fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
