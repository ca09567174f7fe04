//! How the gateway reaches upstreams: host names resolved through DNS with their TTL and
//! re-resolved in the background (against a real UDP nameserver on loopback), and the
//! keep-alive pool limits.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use gateway_core::config::Config;
use gateway_core::{Gateway, UpstreamSettings};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::{TcpListener, UdpSocket};

/// What the fake nameserver answers for `svc.test`: an address, or SERVFAIL when `None`.
type Answer4 = Arc<Mutex<Option<Ipv4Addr>>>;

/// A nameserver on loopback UDP: `svc.test` → the current answer with `ttl`; every other
/// name → NXDOMAIN. Counts the A queries for `svc.test`.
struct FakeDns {
    addr: SocketAddr,
    answer: Answer4,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_dns(ttl: u32, first: Ipv4Addr) -> FakeDns {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let answer: Answer4 = Arc::new(Mutex::new(Some(first)));
    let queries = Arc::new(AtomicUsize::new(0));
    let (a, q) = (answer.clone(), queries.clone());
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
            let Ok(msg) = Message::from_vec(&buf[..n]) else { continue };
            let Some(query) = msg.queries.first().cloned() else { continue };
            let mut resp = Message::response(msg.metadata.id, msg.metadata.op_code);
            resp.metadata.recursion_desired = msg.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.metadata.authoritative = true;
            resp.add_query(query.clone());
            if query.name().to_ascii().trim_end_matches('.').eq_ignore_ascii_case("svc.test") {
                if query.query_type() == RecordType::A {
                    q.fetch_add(1, Ordering::SeqCst);
                    match *a.lock().unwrap() {
                        Some(ip) => {
                            resp.add_answer(Record::from_rdata(query.name().clone(), ttl, RData::A(A(ip))));
                        }
                        None => resp.metadata.response_code = ResponseCode::ServFail,
                    }
                }
            } else {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), from).await;
        }
    });
    FakeDns { addr, answer, queries, task }
}

/// Two echo upstreams on the same port, one on 127.0.0.1 and one on 127.0.0.2, so that a DNS
/// answer alone decides which one a `svc.test:PORT` target reaches.
async fn twin_upstreams() -> (Upstream, Upstream) {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(("127.0.0.2", port)).await {
            return (serve(a), serve(b));
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// Serves the echo handler on `listener`; counts nothing.
fn serve(listener: TcpListener) -> Upstream {
    serve_counting(listener, Arc::default())
}

/// Serves the echo handler on `listener`, counting accepted connections.
fn serve_counting(listener: TcpListener, accepted: Arc<AtomicUsize>) -> Upstream {
    serve_counting_closes(listener, accepted, Arc::default())
}

fn gateway_with_dns(yaml: &str, dns: SocketAddr) -> Gateway {
    let mut settings = UpstreamSettings::default();
    settings.dns_resolver = vec![dns];
    Gateway::builder().upstream_settings(settings).build(&Config::parse(yaml).unwrap()).unwrap()
}

#[tokio::test]
async fn dns_re_resolution_moves_traffic_and_keeps_the_last_answer_when_dns_fails() {
    let (a, b) = twin_upstreams().await;
    let port = a.addr.port();
    let dns = fake_dns(1, Ipv4Addr::new(127, 0, 0, 1)).await;
    let yaml = format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
  targets: [{{target: "svc.test:{port}"}}]
services:
- name: s
  host: pool
  routes: [{{name: r, paths: ["/"]}}]
"#
    );
    let gw = start_running(gateway_with_dns(&yaml, dns.addr), Default::default()).await;

    // Several requests over the gateway's keep-alive connection to the first address.
    for _ in 0..3 {
        let answer = get(&gw.url("/")).await;
        assert_eq!(answer.status, 200);
        let echo = answer.echo();
        assert_eq!(echo.upstream, a.addr.to_string());
        assert_eq!(echo.header("host"), Some(format!("svc.test:{port}").as_str()), "Host is the name, not the IP");
    }

    // Without any traffic, the name is re-resolved when its 1 s TTL runs out.
    let before = dns.queries.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = dns.queries.load(Ordering::SeqCst);
    assert!(after > before, "no background re-resolution: {before} queries, then {after}");

    // The answer changes: traffic follows, although a keep-alive connection to the old
    // address sits in the pool.
    *dns.answer.lock().unwrap() = Some(Ipv4Addr::new(127, 0, 0, 2));
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let echo = get(&gw.url("/")).await.echo();
        if echo.upstream == b.addr.to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "traffic still goes to {} after the DNS change", echo.upstream);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        let echo = get(&gw.url("/")).await.echo();
        assert_eq!(echo.upstream, b.addr.to_string(), "a pooled connection to the old address was reused");
    }

    // The nameserver fails: the last good answer keeps serving.
    *dns.answer.lock().unwrap() = None;
    let failing_since = dns.queries.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(dns.queries.load(Ordering::SeqCst) > failing_since, "the failing name was not retried");
    for _ in 0..3 {
        let answer = get(&gw.url("/")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.echo().upstream, b.addr.to_string());
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_name_that_does_not_resolve_answers_502() {
    let dns = fake_dns(1, Ipv4Addr::LOCALHOST).await;
    let yaml = r#"_format_version: "3.0"
services:
- name: s
  url: http://missing.test:8080
  retries: 0
  routes: [{name: r, paths: ["/"]}]
"#;
    let gw = start_running(gateway_with_dns(yaml, dns.addr), Default::default()).await;
    let answer = get(&gw.url("/")).await;
    assert_eq!(answer.status, 502);
    gw.shutdown().await;
}

/// Sends `n` requests to `path` at once and waits for all of them.
async fn burst(gw: &RunningGateway, path: &str, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = gw.url(path);
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

fn pool_config(target: SocketAddr, extra: &str) -> String {
    format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
{extra}
  targets: [{{target: "{target}"}}]
services:
- name: s
  host: pool
  routes: [{{name: r, paths: ["/"]}}]
"#
    )
}

async fn counting_upstream() -> (Upstream, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let up = serve_counting(TcpListener::bind("127.0.0.1:0").await.unwrap(), accepted.clone());
    (up, accepted)
}

#[tokio::test]
async fn keepalive_pool_size_bounds_the_idle_connections_kept() {
    // Default pool (512): a second burst reuses the first burst's connections.
    let (up, accepted) = counting_upstream().await;
    let gw = start_gateway(&pool_config(up.addr, "")).await;
    burst(&gw, "/slow/200", 6).await;
    let first = accepted.load(Ordering::SeqCst);
    assert_eq!(first, 6, "six concurrent requests need six connections");
    burst(&gw, "/slow/200", 6).await;
    let new = accepted.load(Ordering::SeqCst) - first;
    assert!(new <= 1, "the default pool should keep the connections, {new} new ones");
    gw.shutdown().await;

    // keepalive_pool_size: 2 keeps two of the six.
    let (up, accepted) = counting_upstream().await;
    let gw = start_gateway(&pool_config(up.addr, "  keepalive_pool_size: 2")).await;
    burst(&gw, "/slow/200", 6).await;
    let first = accepted.load(Ordering::SeqCst);
    burst(&gw, "/slow/200", 6).await;
    let new = accepted.load(Ordering::SeqCst) - first;
    assert!(new >= 4, "only two idle connections may be kept, yet only {new} new ones were needed");
    gw.shutdown().await;

    // keepalive_pool_size: 0 turns reuse off.
    let (up, accepted) = counting_upstream().await;
    let gw = start_gateway(&pool_config(up.addr, "  keepalive_pool_size: 0")).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/")).await.status, 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn keepalive_idle_timeout_closes_idle_connections() {
    let (up, accepted) = counting_upstream().await;
    let gw = start_gateway(&pool_config(up.addr, "  keepalive_idle_timeout: 0.3")).await;
    assert_eq!(get(&gw.url("/")).await.status, 200);
    assert_eq!(get(&gw.url("/")).await.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "back-to-back requests share the connection");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(get(&gw.url("/")).await.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the idle connection outlived keepalive_idle_timeout");
    gw.shutdown().await;

    // Gateway-wide setting, from UpstreamSettings.
    let (up, accepted) = counting_upstream().await;
    let mut settings = UpstreamSettings::default();
    settings.keepalive_idle_timeout = Duration::from_millis(300);
    let gateway =
        Gateway::builder().upstream_settings(settings).build(&Config::parse(&pool_config(up.addr, "")).unwrap());
    let gw = start_running(gateway.unwrap(), Default::default()).await;
    assert_eq!(get(&gw.url("/")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(get(&gw.url("/")).await.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_pool_settings_are_config_errors() {
    let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9);
    let err = Gateway::new(&Config::parse(&pool_config(target, "  keepalive_idle_timeout: -1")).unwrap()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("keepalive_idle_timeout") && text.contains("pool"), "{text}");
}

/// An upstream that closes every connection right after its answer, without saying so
/// (no `Connection: close`): each pooled connection is dead by the time the next request
/// wants it. Counts the requests it answered.
async fn closing_upstream() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body_start = loop {
                    let Ok(n @ 1..) = stream.read(&mut chunk).await else { return };
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < body_start + len {
                    let Ok(n @ 1..) = stream.read(&mut chunk).await else { return };
                    buf.extend_from_slice(&chunk[..n]);
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                // Dropped here: closed, though the answer promised keep-alive.
            });
        }
    });
    (addr, answered, task)
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_meanwhile_is_not_a_failure() {
    // POST and no retries: a request lost on a dead pooled connection would be a 502. It
    // never reached that connection, so it goes on a new one.
    let (addr, answered, task) = closing_upstream().await;
    let gw = start_gateway(&pool_config(addr, "").replace("name: s\n", "name: s\n  retries: 0\n")).await;
    for i in 0..100 {
        let req = http::Request::post(gw.url("/")).body(full("hello")).unwrap();
        let answer = send(req).await;
        assert_eq!((answer.status.as_u16(), &answer.body[..]), (200, &b"ok"[..]), "request {i}");
    }
    assert_eq!(answered.load(Ordering::SeqCst), 100);
    gw.shutdown().await;
    task.abort();
}

/// Serves the echo handler, counting connections accepted and connections that ended.
fn serve_counting_closes(listener: TcpListener, accepted: Arc<AtomicUsize>, ended: Arc<AtomicUsize>) -> Upstream {
    let addr = listener.local_addr().unwrap();
    let handler = echo_handler();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            accepted.fetch_add(1, Ordering::SeqCst);
            let (handler, ended) = (handler.clone(), ended.clone());
            tokio::spawn(async move {
                serve_upstream_conn(stream, handler, addr, peer).await;
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Upstream::from_task(addr, task)
}

#[tokio::test]
async fn a_reload_keeps_a_kept_targets_connections_and_closes_a_removed_ones() {
    let (accepted, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let up = serve_counting_closes(TcpListener::bind("127.0.0.1:0").await.unwrap(), accepted.clone(), ended.clone());
    let other = echo_upstream().await;
    let gw = start_gateway(&pool_config(up.addr, "")).await;
    let first = get(&gw.url("/")).await.echo();
    assert_eq!(first.upstream, up.addr.to_string());

    // Same target, another route: the pooled connection carries on.
    let more_routes =
        pool_config(up.addr, "").replace("paths: [\"/\"]}]", "paths: [\"/\"]}, {name: r2, paths: [\"/two\"]}]");
    gw.gateway.reload(&Config::parse(&more_routes).unwrap()).unwrap();
    for path in ["/", "/two"] {
        let again = get(&gw.url(path)).await.echo();
        assert_eq!(again.peer, first.peer, "{path} should reuse the pooled connection");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // The target is gone: its idle connection is closed, not kept for the idle timeout.
    gw.gateway.reload(&Config::parse(&pool_config(other.addr, "")).unwrap()).unwrap();
    assert_eq!(get(&gw.url("/")).await.echo().upstream, other.addr.to_string());
    let deadline = Instant::now() + Duration::from_secs(5);
    while ended.load(Ordering::SeqCst) < 1 {
        assert!(Instant::now() < deadline, "the removed target's connection is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn answers_without_a_body_give_their_connection_back() {
    let (up, accepted) = counting_upstream().await;
    let gw = start_gateway(&pool_config(up.addr, "")).await;
    for _ in 0..5 {
        let answer = send(http::Request::head(gw.url("/")).body(full("")).unwrap()).await;
        assert_eq!(answer.status, 200);
        assert!(answer.body.is_empty());
    }
    assert_eq!(get(&gw.url("/")).await.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "HEAD answers should leave the connection in the pool");
    gw.shutdown().await;
}
