//! Client-side limits, exercised with raw sockets so the gateway's own answers are visible.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gateway_core::server::ServerSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

fn config(up: std::net::SocketAddr) -> String {
    format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{up}\n  routes: [{{name: r, paths: [\"/\"]}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_block_gets_431() {
    let up = echo_upstream().await;
    let gw = start_gateway(&config(up.addr)).await;
    let big = "a".repeat(40 * 1024);
    let answer = raw_exchange(gw.addr, format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    // The limit is exact, whatever size hyper's read buffer has grown to: a head a few bytes
    // over 32 KiB is refused, one a few bytes under is served.
    let head = |value_len: usize| {
        format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {}\r\n\r\n", "a".repeat(value_len))
    };
    let fixed = head(0).len();
    let answer = raw_exchange(gw.addr, head(32 * 1024 - fixed + 8).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    let answer = raw_exchange(gw.addr, head(32 * 1024 - fixed - 8).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
    // Just under the limit is fine.
    let ok = "a".repeat(16 * 1024);
    let answer = raw_exchange(
        gw.addr,
        format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {ok}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_get_431() {
    let up = echo_upstream().await;
    let gw = start_gateway(&config(up.addr)).await;
    let mut req = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
    for i in 0..120 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let answer = raw_exchange(gw.addr, req.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    gw.shutdown().await;
}

/// Plain HTTP/1.1 connections released when idle (the default) time their heads in the
/// gateway's connection task; the others leave it to hyper. Both must cut a trickle off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickle_is_cut_off_by_the_header_timeout() {
    header_trickle_cut_off(Some(Duration::from_millis(100))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickle_is_cut_off_by_the_header_timeout_without_idle_release() {
    header_trickle_cut_off(None).await;
}

async fn header_trickle_cut_off(release_idle_after: Option<Duration>) {
    let up = echo_upstream().await;
    let settings =
        ServerSettings { header_read_timeout: Duration::from_millis(400), release_idle_after, ..Default::default() };
    let gw = start_gateway_with(&config(up.addr), settings).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut closed = false;
    // Send one header byte every 100 ms, for at most 5 s; the server must hang up long before.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "slow header trickle was never cut off");
    assert!(start.elapsed() < Duration::from_secs(3), "cut off only after {:?}", start.elapsed());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let up = echo_upstream().await;
    let settings = ServerSettings { header_read_timeout: Duration::from_millis(300), ..Default::default() };
    let gw = start_gateway_with(&config(up.addr), settings).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the server must close the connection on its own.
    let start = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "idle connection still open after 5 s");
    assert!(start.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", start.elapsed());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_preface_trickling_connections_are_closed_by_the_header_timeout() {
    let up = echo_upstream().await;
    let settings = ServerSettings { header_read_timeout: Duration::from_millis(300), ..Default::default() };
    let gw = start_gateway_with(&config(up.addr), settings).await;
    for first_bytes in [&b""[..], &b"PR"[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let start = Instant::now();
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(first_bytes).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "{first_bytes:?}: connection still open after 5 s");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(250), "{first_bytes:?}: closed before the timeout, after {waited:?}");
        assert!(waited < Duration::from_secs(2), "{first_bytes:?}: closed only after {waited:?}");
    }
    // A normal request still works, over HTTP/1.1 and HTTP/2 alike.
    assert_eq!(get(&gw.url("/")).await.status, http::StatusCode::OK);
    let h2 = h2_client().request(http::Request::get(gw.url("/")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(h2.status(), http::StatusCode::OK);
    gw.shutdown().await;
}

/// Sends `head`, then `body` one byte every `every`, reading what comes back as it goes; stops
/// when the server closes the connection or after 50 bytes' time. Returns what the server
/// answered, whether it closed the connection, and how long that took.
async fn trickle(addr: std::net::SocketAddr, head: &str, body: &[u8], every: Duration) -> (String, bool, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut bytes = body.iter();
    for _ in 0..50 {
        tokio::time::sleep(every).await;
        if let Some(b) = bytes.next() {
            // The server may have closed already; the read below tells.
            let _ = s.write_all(std::slice::from_ref(b)).await;
        }
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&answer).into_owned(), true, start.elapsed()),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    (String::from_utf8_lossy(&answer).into_owned(), false, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickle_is_cut_off_by_the_whole_body_deadline() {
    let up = echo_upstream().await;
    let settings = ServerSettings { body_read_timeout: Some(Duration::from_millis(800)), ..Default::default() };
    let gw = start_gateway_with(&config(up.addr), settings).await;

    // Slow but whole within the deadline: served.
    let head = "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\n";
    let (answer, closed, _) = trickle(gw.addr, head, b"abcd", Duration::from_millis(100)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.300}");
    assert!(answer.contains("\"body_len\":4"), "{answer}");
    assert!(closed);

    // One byte every 100 ms never trips a per-read timeout; the whole-body deadline cuts it off
    // with 408, on a length-framed and on a chunked body alike, and the connection is closed.
    let chunked: Vec<u8> = std::iter::repeat_n(&b"1\r\nx\r\n"[..], 20).flatten().copied().collect();
    for (head, body) in [
        ("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n", &[b'x'; 1000][..]),
        ("POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n", &chunked[..]),
    ] {
        let (answer, closed, waited) = trickle(gw.addr, head, body, Duration::from_millis(100)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{head}: {answer:.300}");
        assert!(answer.contains("Request body timeout"), "{answer}");
        assert!(closed, "{head}: the connection stayed open");
        assert!(waited >= Duration::from_millis(700), "{head}: cut off before the deadline, after {waited:?}");
        assert!(waited < Duration::from_secs(3), "{head}: cut off only after {waited:?}");
    }
    // Claiming to be gRPC exempts nothing: only routes to gRPC services are (protocols.rs).
    let head = "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc\r\ncontent-length: 1000\r\n\r\n";
    let (answer, closed, _) = trickle(gw.addr, head, &[b'x'; 1000], Duration::from_millis(100)).await;
    // (The gateway's own answers to gRPC clients are gRPC statuses.)
    assert!(answer.contains("grpc-message: Request body timeout"), "claimed gRPC: {answer:.300}");
    assert!(closed);
    // The gateway goes on serving.
    assert_eq!(get(&gw.url("/")).await.status, http::StatusCode::OK);
    gw.shutdown().await;
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: its head and its body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("a content-length");
            if got.len() >= end + 4 + len {
                return (head, got[end + 4..end + 4 + len].to_vec());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// Idle keep-alive connections whose buffers are released, from the admin API's `/status`.
async fn idle_released(gw: &RunningGateway) -> u64 {
    use tower::ServiceExt;
    let admin = gw.gateway.admin(gateway_core::admin::AdminSettings::default());
    let req = http::Request::get("/status").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let resp = admin.oneshot(req).await.unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    status["server"]["connections_idle_released"].as_u64().expect("connections_idle_released")
}

fn releasing(after_ms: u64) -> ServerSettings {
    ServerSettings { release_idle_after: Some(Duration::from_millis(after_ms)), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_released_and_serves_its_next_requests() {
    let up = echo_upstream().await;
    let gw = start_gateway_with(&config(up.addr), releasing(100)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(idle_released(&gw).await, 0, "busy a moment ago");
    // Idle through two checks: released, the socket still open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idle_released(&gw).await, 1);
    // The next requests on the same socket are served as before, bodies and all.
    s.write_all(b"POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["uri"], "/second");
    assert_eq!(echo["body_len"], 5);
    assert_eq!(idle_released(&gw).await, 0, "in use again");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idle_released(&gw).await, 1, "released again");
    s.write_all(b"GET /third HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["uri"], "/third");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_not_released_while_a_request_is_in_flight() {
    let up = echo_upstream().await;
    let gw = start_gateway_with(&config(up.addr), releasing(50)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    // The upstream takes many periods to answer, and the client's body comes slowly: nothing
    // is read from the client for several periods at a time, and nothing may be lost.
    s.write_all(b"POST /slow/600 HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idle_released(&gw).await, 0);
    s.write_all(b"world").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["body_len"], 10);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_split_by_a_pause_is_served_whole() {
    let up = echo_upstream().await;
    let gw = start_gateway_with(&config(up.addr), releasing(50)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    read_response(&mut s).await;
    // Half a head, then a pause of several periods: the connection is taken apart with the
    // half in hyper's buffer, which must reach the next hyper connection.
    s.write_all(b"GET /split HTTP/1.1\r\nhost: x\r\nx-part").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(b": two\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["uri"], "/split");
    assert_eq!(echo["headers"]["x-part"][0], "two");
    gw.shutdown().await;
}

/// Checks that the server closes `s` (waiting at most 5 s) without sending anything, at least
/// `at_least` and less than `under` after `since`; `what` names the timeout in the messages.
async fn cut_off_unanswered(s: &mut TcpStream, since: Instant, at_least: Duration, under: Duration, what: &str) {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "{what}: the connection is still open after 5 s");
    let waited = since.elapsed();
    assert!(answer.is_empty(), "{what}: an answer came: {:?}", String::from_utf8_lossy(&answer));
    assert!(waited >= at_least, "{what}: closed too early, after {waited:?}");
    assert!(waited < under, "{what}: closed only after {waited:?}");
}

/// The first head's time counts from the accept, as nginx's `client_header_timeout` does: a
/// client that waits before its first bytes does not get a fresh timeout from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_head_is_timed_from_the_accept() {
    let up = echo_upstream().await;
    let settings = ServerSettings { header_read_timeout: Duration::from_millis(800), ..Default::default() };
    let gw = start_gateway_with(&config(up.addr), settings).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let connected = Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // 800 ms and a tick (200 ms) at most; a fresh timeout from the first bytes would be 1.4 s.
    let (at_least, under) = (Duration::from_millis(750), Duration::from_millis(1250));
    cut_off_unanswered(&mut s, connected, at_least, under, "the first head's timeout, from the accept").await;
    gw.shutdown().await;
}

/// Part of a second head sent with the first request and never finished: the connection is
/// released with it in hand, and the head's time keeps running across the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_left_unfinished_across_a_release_still_times_out() {
    let up = echo_upstream().await;
    let settings = ServerSettings { header_read_timeout: Duration::from_millis(600), ..releasing(50) };
    let gw = start_gateway_with(&config(up.addr), settings).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answered = Instant::now();
    let (at_least, under) = (Duration::from_millis(450), Duration::from_millis(1500));
    cut_off_unanswered(&mut s, answered, at_least, under, "the unfinished head's timeout").await;
    gw.shutdown().await;
}

/// A head that stops coming is cut off by the header timeout, and an idle connection closed
/// after it (the keep-alive time), even when the connection would be released only later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_head_or_an_idle_connection_times_out_before_a_later_release() {
    let up = echo_upstream().await;
    let settings = ServerSettings { header_read_timeout: Duration::from_millis(400), ..releasing(3000) };
    let gw = start_gateway_with(&config(up.addr), settings).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let stalled = Instant::now();
    // 400 ms and a tick, well before the release at 3 s.
    let (at_least, under) = (Duration::from_millis(250), Duration::from_millis(1500));
    cut_off_unanswered(&mut s, stalled, at_least, under, "the stalled head's timeout").await;

    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    read_response(&mut s).await;
    let idle = Instant::now();
    cut_off_unanswered(&mut s, idle, at_least, under, "the keep-alive time").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_connection_is_closed_after_the_keep_alive_time_and_at_shutdown() {
    let up = echo_upstream().await;
    let settings = ServerSettings { header_read_timeout: Duration::from_millis(800), ..releasing(50) };
    let mut gw = start_gateway_with(&config(up.addr), settings).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    read_response(&mut s).await;
    let idle_since = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idle_released(&gw).await, 1);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a released connection still open after 5 s");
    let waited = idle_since.elapsed();
    assert!(waited >= Duration::from_millis(700), "closed before the keep-alive time: {waited:?}");
    assert!(waited < Duration::from_millis(2000), "closed only after {waited:?}");
    assert_eq!(idle_released(&gw).await, 0);

    // A released connection ends at once when shutdown begins: it has nothing in flight.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    read_response(&mut s).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idle_released(&gw).await, 1);
    let stopping = Instant::now();
    let server = gw.begin_shutdown();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a released connection still open at shutdown");
    server.await.unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(2), "shutdown took {:?}", stopping.elapsed());
}
