//! Upstream faults the client must see plainly: an upstream that closes mid-response gives a
//! truncated answer and a closed connection, never a hang, and the failure is logged; a client
//! that hangs up ends its upstream call.
//! (Slow, refusing and vanishing upstreams are in `proxy.rs` and the plugins' `retries.rs`,
//! Redis stopping in `rate_limiting_redis.rs`, reload storms in `reload_under_load.rs`.)

mod common;
#[path = "common/logs.rs"]
mod logs;

use std::time::{Duration, Instant};

use common::*;
use logs::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The JSON log lines written so far.
fn log_lines() -> Vec<serde_json::Value> {
    captured_log().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// One service at `upstream` without retries, routed from `/`; `extra`: more service fields.
fn service_yaml(upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{upstream}\n  retries: 0\n{extra}  routes: [{{name: r, paths: [\"/\"]}}]\n"
    )
}

/// Reads up to the end of a request head; false if the connection ended first.
async fn read_head(s: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// An upstream that reads a request head, writes `answer` and closes the connection.
async fn cut_off_upstream(answer: &'static [u8]) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                if !read_head(&mut s).await {
                    return;
                }
                let _ = s.write_all(answer).await;
                // Dropping the socket closes it, mid-response.
            });
        }
    });
    Upstream::from_task(addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_mid_response_gives_a_truncated_answer_and_is_logged() {
    log_lines();
    let length_framed = cut_off_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789").await;
    let chunked =
        cut_off_upstream(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n64\r\n01234").await;
    for (name, upstream) in [("content-length", &length_framed), ("chunked", &chunked)] {
        let gw = start_gateway(&service_yaml(upstream.addr, "")).await;
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /cut HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let start = Instant::now();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(read.is_ok(), "{name}: the client was left hanging with {text:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "{name}: closed only after {:?}", start.elapsed());
        // The head and what the upstream sent arrived, then the connection closed: the client
        // can tell the answer is short (by its length, or the missing last chunk).
        assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}");
        assert!(text.contains("0123456789"), "{name}: {text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        if name == "chunked" {
            assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
            assert!(!body.ends_with("0\r\n\r\n"), "{name}: a truncated body was ended as if whole: {body:?}");
        } else {
            assert!(head.to_ascii_lowercase().contains("content-length: 1000"), "{head}");
            assert!(body.len() < 1000, "{name}: {body:?}");
        }
        let request_id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("{name}: no x-request-id in {head}"))
            .to_string();
        gw.shutdown().await;

        let lines = log_lines();
        let access = lines
            .iter()
            .find(|l| l["target"] == "gateway::access" && l["request_id"] == request_id.as_str())
            .unwrap_or_else(|| panic!("{name}: no access line for {request_id}"));
        assert_eq!(access["complete"], false, "{name}: {access}");
        assert!(
            lines.iter().any(|l| l["level"] == "WARN"
                && l["message"].as_str().is_some_and(|m| m.contains("response body broke off"))),
            "{name}: no warning"
        );
    }
}

/// nginx's default (`proxy_ignore_client_abort off`): a client that hangs up while its request
/// waits for the upstream's answer ends the upstream call, so an upstream is not left working
/// for nobody. hyper notices the hang-up by reading the client's socket while the request is in
/// flight; serving with `half_close` would skip that read (about 750 instructions a request
/// less, measured) and leave the upstream call running until its own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_before_the_answer_ends_the_upstream_call() {
    // An upstream that reads a request head, never answers, and reports when the gateway
    // closes the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let task = tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        if !read_head(&mut s).await {
            return;
        }
        let mut buf = [0u8; 4096];
        // Waits for the end of the connection, answering nothing.
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(Instant::now());
    });
    let upstream = Upstream::from_task(addr, task);
    // Long upstream timeouts: only the client's hang-up can end the call within the test.
    let gw = start_gateway(&service_yaml(upstream.addr, "  read_timeout: 60000\n")).await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    // The request reaches the upstream, then the client goes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hung_up = Instant::now();
    drop(client);
    let ended = tokio::time::timeout(Duration::from_secs(5), closed.recv()).await;
    let ended = ended.expect("the upstream call outlived the client by 5 s").expect("the upstream saw a request");
    assert!(ended.duration_since(hung_up) < Duration::from_secs(2), "ended {:?} after", ended - hung_up);
    gw.shutdown().await;
}
