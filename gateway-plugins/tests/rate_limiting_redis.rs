//! rate-limiting with `policy: redis` against a real redis-server started for each test on a
//! free loopback port (`redis-server` must be installed; `.ci/run` installs it).

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};

/// A redis-server child process on 127.0.0.1; killed when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (the README's test command and .ci/run install it)");
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if server.ping().await {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not come up on port {port}");
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(n)) if buf[..n].starts_with(b"+PONG"))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn start(upstream: std::net::SocketAddr, redis_port: u16, extra: &str) -> RunningGateway {
    let yaml = format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{upstream}
  routes: [{{name: limited, paths: ["/"]}}]
  plugins:
  - name: rate-limiting
    config: {{hour: 10, limit_by: service, policy: redis, redis: {{host: 127.0.0.1, port: {redis_port}, timeout: 500}}{extra}}}
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
async fn two_gateways_sharing_redis_enforce_one_exact_limit_under_concurrency() {
    let up = echo_upstream().await;
    for _attempt in 0..2 {
        let redis = RedisServer::start().await;
        let hour = hour_now();
        let a = start(up.addr, redis.port, "").await;
        let b = start(up.addr, redis.port, "").await;
        let passed = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for i in 0..16 {
            let url = if i % 2 == 0 { a.url("/") } else { b.url("/") };
            let (passed, refused) = (passed.clone(), refused.clone());
            clients.push(tokio::spawn(async move {
                let client = client();
                for _ in 0..4 {
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
        // The headers count the shared total.
        let last = get(&a.url("/")).await;
        a.shutdown().await;
        b.shutdown().await;
        if hour_now() != hour {
            continue;
        }
        assert_eq!(passed.load(Ordering::SeqCst), 10, "one limit across both gateways");
        assert_eq!(refused.load(Ordering::SeqCst), 54);
        assert_eq!(last.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(last.headers["x-ratelimit-remaining-hour"], "0");
        return;
    }
    panic!("crossed an hour boundary twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_follows_fault_tolerant() {
    let up = echo_upstream().await;
    let mut redis = RedisServer::start().await;
    let tolerant = start(up.addr, redis.port, "").await;
    let strict = start(up.addr, redis.port, ", fault_tolerant: false").await;
    let first = get(&tolerant.url("/")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-ratelimit-limit-hour"], "10");
    assert_eq!(get(&strict.url("/")).await.status, StatusCode::OK);

    redis.stop();
    let resp = get(&tolerant.url("/")).await;
    assert_eq!(resp.status, StatusCode::OK, "fault_tolerant proxies without counting");
    assert!(!resp.headers.contains_key("x-ratelimit-remaining-hour"));
    let resp = get(&strict.url("/")).await;
    assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp.json()["message"], "An unexpected error occurred");
    tolerant.shutdown().await;
    strict.shutdown().await;
}
