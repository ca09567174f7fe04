//! Arbitrary bytes from a client, over an in-memory connection, through hyper's HTTP/1.1
//! server and the whole gateway (routing, path normalisation, key-auth, jwt, rate limiting,
//! request transforms, the proxy to a real loopback upstream): never a panic, never a hang,
//! and whatever comes back is HTTP.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

/// A loopback upstream answering `ok` after reading the body, on a thread of its own.
fn upstream() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    tokio::spawn(async move {
                        let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                            use http_body_util::BodyExt;
                            let _ = req.into_body().collect().await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        rx.recv().unwrap()
    })
}

fn gateway() -> &'static gateway_core::Gateway {
    static GW: OnceLock<gateway_core::Gateway> = OnceLock::new();
    GW.get_or_init(|| {
        let up = upstream();
        let yaml = format!(
            r#"_format_version: "3.0"
consumers:
- username: alice
  keyauth_credentials: [{{key: alice-key}}]
  jwt_secrets: [{{key: iss, secret: s3cret}}]
services:
- name: s
  url: http://{up}/base
  routes:
  - {{name: open, paths: ["/"]}}
  - name: admin
    paths: ["/admin"]
    strip_path: false
    plugins: [{{name: key-auth, config: {{hide_credentials: true}}}}]
  - name: jwt
    paths: ["/jwt"]
    plugins: [{{name: jwt}}]
  - name: regex
    paths: ["~/users/(?<id>\\d+)$"]
    plugins:
    - name: request-transformer
      config:
        add: {{headers: ["x-user:$(uri_captures.id)", "x-q:$(query_params.q)"], querystring: ["from:$(headers.host)"]}}
        rename: {{headers: ["x-a:x-b"]}}
        replace: {{uri: "/u/$(uri_captures.id)"}}
  - name: limited
    paths: ["/rl"]
    methods: [GET, POST]
    plugins: [{{name: rate-limiting, config: {{second: 1000000, limit_by: ip}}}}]
"#
        );
        let config = gateway_core::config::Config::from_yaml(&yaml).unwrap();
        gateway_core::Gateway::builder().plugins(gateway_plugins::registry()).build(&config).unwrap()
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let gateway = gateway();
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let svc = TowerToHyperService::new(gateway.service());
        let conn = tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(1)).max_buf_size(32 * 1024);
            let _ = b.serve_connection(TokioIo::new(server), svc).with_upgrades().await;
        });
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection hung: {:?}", String::from_utf8_lossy(data));
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
            "not HTTP: {:?}",
            String::from_utf8_lossy(&out)
        );
        conn.abort();
    });
});
