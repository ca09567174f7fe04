//! `--features otel`: the binary exports a span per proxied request to an OTLP/HTTP collector,
//! nested in the client's trace. The collector here is a plain HTTP server on loopback that
//! keeps the protobuf bodies; the span's ids are looked for as the raw bytes protobuf stores.
#![cfg(feature = "otel")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Reads one HTTP/1.1 request head; returns (request line, headers lower-cased).
fn read_head(reader: &mut BufReader<TcpStream>) -> Option<(String, Vec<(String, String)>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some((line, headers))
}

/// Serves `respond(request line, headers, body)` on every request of every connection.
fn serve(
    listener: TcpListener,
    respond: impl Fn(&str, &[(String, String)], Vec<u8>) -> String + Send + Sync + 'static,
) {
    let respond = Arc::new(respond);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let respond = respond.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                while let Some((line, headers)) = read_head(&mut reader) {
                    let len =
                        headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if stream.write_all(respond(&line, &headers, body).as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_proxied_request_becomes_a_span_in_the_clients_trace() {
    // The collector keeps every export's body.
    let exports: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let sink = exports.clone();
    serve(collector, move |line, headers, body| {
        assert!(line.starts_with("POST /v1/traces "), "{line}");
        assert!(headers.iter().any(|(k, v)| k == "content-type" && v == "application/x-protobuf"), "{headers:?}");
        sink.lock().unwrap().push(body);
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string()
    });
    // The upstream answers with the traceparent it received.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    serve(upstream, |_, headers, _| {
        let tp = headers.iter().find(|(k, _)| k == "traceparent").map_or("", |(_, v)| v.as_str()).to_string();
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{tp}", tp.len())
    });

    let dir = std::env::temp_dir().join(format!("gateway-otel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kong.yml");
    std::fs::write(
        &file,
        format!(
            "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{upstream_addr}\n  routes:\n  - name: traced\n    paths: [\"/\"]\n"
        ),
    )
    .unwrap();
    let addr = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(&file)
        .args(["--listen", &addr.to_string(), "--listen-tls", "off", "--admin-listen", &free_port().to_string()])
        .args(["--otlp-endpoint", &format!("http://{collector_addr}/v1/traces")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stops the gateway however the test ends.
    let mut child = KillOnDrop(child);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_parent = "00f067aa0ba902b7";
    let deadline = Instant::now() + Duration::from_secs(15);
    let received = loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                s,
                "GET /x HTTP/1.1\r\nhost: a\r\ntraceparent: 00-{trace}-{client_parent}-01\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            break out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap();
        }
        assert!(Instant::now() < deadline, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let parts: Vec<&str> = received.split('-').collect();
    assert_eq!(parts.len(), 4, "the upstream got a traceparent: {received:?}");
    assert_eq!(parts[1], trace, "the upstream continues the client's trace: {received}");
    let gateway_span = parts[2].to_string();

    // SIGTERM: the gateway stops and flushes its batched spans.
    assert!(Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let exports = exports.lock().unwrap();
    let span = exports.iter().find(|b| contains(b, &hex(&gateway_span))).expect("an export with the gateway's span");
    assert!(contains(span, &hex(trace)), "the span is in the client's trace");
    assert!(contains(span, &hex(client_parent)), "the span's parent is the client's span");
    assert!(contains(span, b"GET traced"), "the span is named by method and route");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
