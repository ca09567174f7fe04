//! Proxy semantics seen from both ends: what the client gets and what the upstream receives.

mod common;

use std::time::Duration;

use common::*;
use http::{Request, StatusCode};

fn one_service(upstream: std::net::SocketAddr, service_extra: &str, route_extra: &str) -> String {
    format!(
        r#"_format_version: "3.0"
services:
- name: svc
  url: http://{upstream}{service_extra}
  routes:
  - name: r
    {route_extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_with_kong_precedence() {
    let a = echo_upstream().await;
    let b = echo_upstream().await;
    let c = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
services:
- name: a
  url: http://{}
  routes: [{{name: root, paths: ["/"]}}]
- name: b
  url: http://{}
  routes: [{{name: api-host, hosts: ["api.example.com"], paths: ["/"]}}]
- name: c
  url: http://{}
  routes: [{{name: users-regex, paths: ["~/users/\\d+$"], strip_path: false}}]
"#,
        a.addr, b.addr, c.addr
    ))
    .await;
    assert_eq!(get(&gw.url("/anything")).await.echo().upstream, a.addr.to_string());
    assert_eq!(get_host(&gw.url("/anything"), "api.example.com").await.echo().upstream, b.addr.to_string());
    let users = get(&gw.url("/users/42")).await.echo();
    assert_eq!(users.upstream, c.addr.to_string());
    assert_eq!(users.uri, "/users/42");
    assert_eq!(get(&gw.url("/users/abc")).await.echo().upstream, a.addr.to_string());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_path_and_service_path_join_like_kong() {
    let up = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{0}/base
  routes:
  - {{name: strip, paths: ["/strip"]}}
  - {{name: keep, paths: ["/keep"], strip_path: false}}
- name: plain
  url: http://{0}
  routes:
  - {{name: plain, paths: ["/plain"]}}
"#,
        up.addr
    ))
    .await;
    assert_eq!(get(&gw.url("/strip/a/b?x=1&y=2")).await.echo().uri, "/base/a/b?x=1&y=2");
    assert_eq!(get(&gw.url("/strip")).await.echo().uri, "/base");
    assert_eq!(get(&gw.url("/keep/a")).await.echo().uri, "/base/keep/a");
    assert_eq!(get(&gw.url("/plain/x")).await.echo().uri, "/x");
    assert_eq!(get(&gw.url("/plain")).await.echo().uri, "/");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_host_decides_the_upstream_host_header() {
    let up = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{0}
  routes:
  - {{name: keep, paths: ["/keep"], preserve_host: true}}
  - {{name: rewrite, paths: ["/rewrite"]}}
"#,
        up.addr
    ))
    .await;
    assert_eq!(
        get_host(&gw.url("/keep"), "client.example:8080").await.echo().header("host"),
        Some("client.example:8080")
    );
    assert_eq!(
        get_host(&gw.url("/rewrite"), "client.example").await.echo().header("host"),
        Some(up.addr.to_string().as_str())
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_set() {
    let up = echo_upstream().await;
    let gw = start_gateway(&one_service(up.addr, "", r#"paths: ["/api"]"#)).await;
    let resp = send(
        Request::get(gw.url("/api/items?q=1"))
            .header("host", "shop.example.com")
            .header("connection", "keep-alive, x-drop-me")
            .header("x-drop-me", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("te", "gzip")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "spoofed.example")
            .header("x-real-ip", "198.51.100.1")
            .header("via", "1.1 edge")
            .header("x-end-to-end", "kept")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    let echo = resp.echo();
    for gone in ["connection", "x-drop-me", "keep-alive", "proxy-authorization", "te", "transfer-encoding", "upgrade"] {
        assert_eq!(echo.header(gone), None, "{gone} reached the upstream: {:?}", echo.headers);
    }
    assert_eq!(echo.header("x-end-to-end"), Some("kept"));
    // No trusted proxies configured: the client's own X-Forwarded-For is replaced.
    assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
    assert_eq!(echo.header("x-forwarded-host"), Some("shop.example.com"));
    assert_eq!(echo.header("x-forwarded-port"), Some(gw.addr.port().to_string().as_str()));
    assert_eq!(echo.header("x-forwarded-path"), Some("/api/items"));
    assert_eq!(echo.header("x-forwarded-prefix"), Some("/api"));
    assert_eq!(echo.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(echo.header("via"), Some("1.1 edge, 1.1 gateway"));
    assert_eq!(echo.uri, "/items?q=1");
    let id = echo.header("x-request-id").expect("upstream gets the request id").to_string();
    // The response: the upstream's hop-by-hop headers are gone, ours are there.
    assert_eq!(resp.headers.get("x-request-id").unwrap(), id.as_str());
    assert!(resp.headers.get("x-hop-from-upstream").is_none());
    assert!(resp.headers.get("keep-alive").is_none());
    assert_eq!(resp.headers.get("via").unwrap(), "1.1 gateway");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_forwarding_claims_never_reach_the_upstream() {
    // A route `/`: no prefix of the gateway's own to send, so a client's must be removed, as
    // must its `Forwarded`, and its hop-by-hop headers after a plain request.
    let up = echo_upstream().await;
    let gw = start_gateway(&one_service(up.addr, "", r#"paths: ["/"]"#)).await;
    for (name, value) in [
        ("x-forwarded-prefix", "/spoofed"),
        ("forwarded", "for=198.51.100.1;proto=https"),
        ("upgrade", "h2c"),
        ("x-forwarded-path", "/spoofed"),
    ] {
        let resp = send(Request::get(gw.url("/items")).header(name, value).body(full("")).unwrap()).await;
        let echo = resp.echo();
        let sent = echo.headers.get(name).cloned().unwrap_or_default();
        assert!(!sent.iter().any(|v| v == value), "{name}: {value} reached the upstream: {sent:?}");
    }
    // And a plain request carries none of them.
    let echo = get(&gw.url("/items")).await.echo();
    for name in ["x-forwarded-prefix", "forwarded", "upgrade"] {
        assert_eq!(echo.header(name), None, "{name}");
    }
    assert_eq!(echo.header("x-forwarded-path"), Some("/items"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_json_with_request_ids() {
    let dead = closed_port().await;
    let slow = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
upstreams:
- name: empty
  targets: [{{target: "127.0.0.1:1", weight: 0}}]
services:
- name: dead
  url: http://{dead}
  retries: 2
  routes: [{{name: dead, paths: ["/dead"]}}]
- name: none
  host: empty
  routes: [{{name: none, paths: ["/none"]}}]
- name: slow
  url: http://{slow}
  read_timeout: 200
  routes: [{{name: slow, paths: ["/slow"], strip_path: false}}]
"#,
        slow = slow.addr
    ))
    .await;
    let cases = [
        ("/nothing", 404, "no Route matched with those values"),
        ("/dead", 502, "An invalid response was received from the upstream server"),
        ("/none", 503, "failure to get a peer from the ring-balancer"),
        ("/slow/2000", 504, "The upstream server is timing out"),
    ];
    for (path, status, message) in cases {
        let resp = get(&gw.url(path)).await;
        assert_eq!(resp.status.as_u16(), status, "{path}");
        assert_eq!(resp.headers["content-type"], "application/json; charset=utf-8");
        let json = resp.json();
        assert_eq!(json["message"], message, "{path}");
        let id = resp.headers["x-request-id"].to_str().unwrap();
        assert_eq!(json["request_id"], id);
        assert_eq!(id.len(), 32);
    }
    // A slow upstream inside its timeout is fine.
    assert_eq!(get(&gw.url("/slow/50")).await.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_retried_on_the_next_target() {
    let live = echo_upstream().await;
    let dead = closed_port().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
  targets: [{{target: "{dead}"}}, {{target: "{live}"}}]
services:
- name: s
  host: pool
  retries: 1
  routes: [{{name: r, paths: ["/"]}}]
"#,
        live = live.addr
    ))
    .await;
    for i in 0..6 {
        // Half of these first try the dead target; the retry goes to the live one, body and all.
        let resp = send(Request::post(gw.url("/upload")).body(full(vec![b'x'; 1000 + i])).unwrap()).await;
        assert_eq!(resp.status, StatusCode::OK, "attempt {i}: {}", String::from_utf8_lossy(&resp.body));
        let echo = resp.echo();
        assert_eq!(echo.upstream, live.addr.to_string());
        assert_eq!(echo.body_len, 1000 + i as u64);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_by_weight() {
    let a = echo_upstream().await;
    let b = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
  targets: [{{target: "{}", weight: 300}}, {{target: "{}", weight: 100}}]
services:
- {{name: s, host: pool, routes: [{{name: r, paths: ["/"]}}]}}
"#,
        a.addr, b.addr
    ))
    .await;
    let mut to_a = 0;
    for _ in 0..40 {
        if get(&gw.url("/")).await.echo().upstream == a.addr.to_string() {
            to_a += 1;
        }
    }
    assert_eq!(to_a, 30);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_is_served_on_the_same_listener() {
    let up = echo_upstream().await;
    let gw = start_gateway(&one_service(up.addr, "", r#"paths: ["/"]"#)).await;
    let h2 = h2_client();
    let resp = h2.request(Request::get(gw.url("/h2")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["via"], "1.1 gateway");
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(echo.header("via"), Some("2 gateway"));
    assert_eq!(echo.header("x-forwarded-host"), Some("127.0.0.1"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_routes_answer_426_on_plain_http() {
    let up = echo_upstream().await;
    let gw = start_gateway(&https_only_routes(up.addr)).await;
    let resp = get(&gw.url("/secure")).await;
    assert_eq!(resp.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(resp.json()["message"], "Please use HTTPS protocol");
    let resp = get_host(&gw.url("/moved/x?y=1"), "shop.example:8000").await;
    assert_eq!(resp.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(resp.headers["location"], "https://shop.example/moved/x?y=1");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_download_reaches_the_client_before_the_upstream_finishes() {
    use http_body_util::BodyExt;
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let up = upstream_with(std::sync::Arc::new(move |_req, _addr, _peer| {
        let mut release = release_rx.clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, BoxError>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"first chunk;")))).await;
                // The rest only comes once the client proves it already has the first chunk.
                let _ = release.wait_for(|r| *r).await;
                let _ = tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"second chunk")))).await;
            });
            let body = http_body_util::StreamBody::new(ChannelStream(rx));
            http::Response::new(body.boxed_unsync())
        })
    }))
    .await;
    let gw = start_gateway(&one_service(up.addr, "", r#"paths: ["/"]"#)).await;
    let resp = client().request(Request::get(gw.url("/download")).body(full("")).unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk streamed")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first chunk;");
    release_tx.send(true).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second chunk");
    gw.shutdown().await;
}

struct ChannelStream(tokio::sync::mpsc::Receiver<Result<http_body::Frame<bytes::Bytes>, BoxError>>);

impl futures_util::Stream for ChannelStream {
    type Item = Result<http_body::Frame<bytes::Bytes>, BoxError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_works_as_a_tower_service() {
    use tower::ServiceExt;
    let up = echo_upstream().await;
    let gateway = gateway_core::Gateway::from_yaml(&one_service(up.addr, "/v1", r#"paths: ["/svc"]"#)).unwrap();
    let mut req = Request::post("http://embedded.example/svc/items").body("payload".to_string()).unwrap();
    req.extensions_mut().insert(gateway_core::ConnInfo {
        client: "192.0.2.7:5555".parse().unwrap(),
        local: "127.0.0.1:8000".parse().unwrap(),
        tls: false,
    });
    let resp = gateway.service().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect_bytes().await.unwrap();
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.uri, "/v1/items");
    assert_eq!(echo.body_len, 7);
    assert_eq!(echo.header("x-real-ip"), Some("192.0.2.7"));
    assert_eq!(echo.header("x-forwarded-port"), Some("8000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_write_times_out_with_504() {
    // An upstream that reads the request head and then never reads the body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..4 {
            let Ok((s, _)) = listener.accept().await else {
                break;
            };
            held.push(s);
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let gw = start_gateway(&format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{addr}\n  write_timeout: 300\n  retries: 0\n  routes: [{{name: r, paths: [\"/\"]}}]\n"
    ))
    .await;
    // Far more than loopback socket buffers hold, so the gateway's writes must block.
    let body = Generated { remaining: 256 << 20, chunk: bytes::Bytes::from(vec![1u8; 64 * 1024]) };
    let started = std::time::Instant::now();
    let resp = send(Request::post(gw.url("/upload")).body(http_body_util::BodyExt::boxed_unsync(body)).unwrap()).await;
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["message"], "The upstream server is timing out");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    stalled.abort();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_routing_and_the_upstream_gets_the_same_path() {
    let admin = echo_upstream().await;
    let public = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
services:
- name: admin
  url: http://{}
  routes: [{{name: admin, paths: ["/admin"], strip_path: false}}]
- name: public
  url: http://{}/pub
  routes: [{{name: public, paths: ["/public"]}}]
"#,
        admin.addr, public.addr
    ))
    .await;
    for path in ["/public/../admin", "/public/%2e%2e/admin", "/%61dmin", "/public/./../admin/"] {
        let echo = get(&gw.url(path)).await.echo();
        assert_eq!(echo.upstream, admin.addr.to_string(), "{path} slipped past the /admin route");
        assert!(echo.uri.starts_with("/admin"), "{path} reached the upstream as {}", echo.uri);
    }
    // The remainder after strip_path cannot climb out of the service path.
    let echo = get(&gw.url("/public../secret")).await.echo();
    assert_eq!(echo.uri, "/pub/secret");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_idle_upstream_connection_gets_a_full_read_timeout() {
    // The upstream notes the connection (client port) of every request it receives.
    let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, echo) = (peers.clone(), echo_handler());
    let up = upstream_with(std::sync::Arc::new(move |req, addr, peer| {
        seen.lock().unwrap().push(peer);
        echo(req, addr, peer)
    }))
    .await;
    let gw = start_gateway(&one_service(
        up.addr,
        "\n  read_timeout: 600",
        r#"paths: ["/"]
    strip_path: false"#,
    ))
    .await;
    assert_eq!(get(&gw.url("/warm")).await.status, StatusCode::OK);
    // The pooled connection idles for most of its read timeout, then carries a request whose
    // answer takes 300 ms: that is well inside the 600 ms read timeout.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let resp = get(&gw.url("/slow/300")).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
    // The timer, moved lazily to each wait's deadline, still fires on the reused connection:
    // a full read timeout after the request was written, not earlier, not much later. (A
    // moment first, for the connection to go back to the pool.)
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let resp = get(&gw.url("/slow/3000")).await;
    let waited = started.elapsed();
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT, "{}", String::from_utf8_lossy(&resp.body));
    assert!(waited >= Duration::from_millis(590) && waited < Duration::from_millis(2000), "{waited:?}");
    // All three requests went over the one connection: the last two on a reused one.
    let peers = peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert!(peers.iter().all(|p| *p == peers[0]), "not one connection: {peers:?}");
    gw.shutdown().await;
}

fn raw_echo(answer: &str) -> Echo {
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_get_body_reaches_the_upstream() {
    let up = echo_upstream().await;
    let gw = start_gateway(&one_service(up.addr, "", r#"paths: ["/"]"#)).await;
    let answer = raw(
        gw.addr,
        "GET /search HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(raw_echo(&answer).body_len, 11);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_decides_the_host_for_routing_and_upstream_alike() {
    let allowed = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes: [{{name: r, hosts: ["allowed.example"], preserve_host: true}}]
"#,
        allowed.addr
    ))
    .await;
    let answer =
        raw(gw.addr, "GET http://allowed.example/x HTTP/1.1\r\nhost: admin.internal\r\nconnection: close\r\n\r\n")
            .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(raw_echo(&answer).header("host"), Some("allowed.example"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_forwarded_header_is_dropped_and_h2_cookies_are_joined() {
    let up = echo_upstream().await;
    let gw = start_gateway(&one_service(up.addr, "", r#"paths: ["/"]"#)).await;
    let h2 = h2_client();
    let req = Request::get(gw.url("/c"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("forwarded", "for=10.0.0.1;proto=https;host=admin")
        .body(full(""))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.headers.get("cookie"), Some(&vec!["a=1; b=2".to_string()]));
    assert_eq!(echo.header("forwarded"), None);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_retried_for_get_but_never_for_post() {
    use tokio::io::AsyncReadExt;
    // A target that reads the request and hangs up without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dropper = listener.local_addr().unwrap();
    let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = drops.clone();
    // The heads the dropping target read, to compare with what the retry carried.
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                break;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            seen.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).to_lowercase());
            drop(s);
        }
    });
    let live = echo_upstream().await;
    let gw = start_gateway(&format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
  targets: [{{target: "{dropper}"}}, {{target: "{live}"}}]
services:
- {{name: s, host: pool, retries: 1, routes: [{{name: r, paths: ["/"]}}]}}
"#,
        live = live.addr
    ))
    .await;
    let mut compared = 0;
    for i in 0..4 {
        let resp =
            send(Request::get(gw.url("/idempotent")).header("x-client", format!("c{i}")).body(full("")).unwrap()).await;
        assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
        let echo = resp.echo();
        assert_eq!(echo.upstream, live.addr.to_string());
        // A retry carries what the first attempt carried: the client's headers and the
        // gateway's own (request id, forwarding headers, Via, trace context).
        let id = echo.header("x-request-id").expect("a request id").to_string();
        let first = heads.lock().unwrap().iter().find(|h| h.contains(&format!("x-request-id: {id}"))).cloned();
        if let Some(first) = first {
            compared += 1;
            for name in ["x-client", "x-forwarded-for", "x-forwarded-proto", "x-real-ip", "via", "traceparent"] {
                let value = echo.header(name).unwrap_or_else(|| panic!("the retry lacks {name}"));
                assert!(
                    first.contains(&format!("{name}: {value}")),
                    "{name}: {value} not in the first attempt:\n{first}"
                );
            }
        }
    }
    assert!(compared >= 1, "no GET met the dropping target first");
    let mut post_failures = 0;
    for _ in 0..4 {
        let resp = send(Request::post(gw.url("/not-idempotent")).body(full("payload")).unwrap()).await;
        match resp.status {
            StatusCode::OK => assert_eq!(resp.echo().upstream, live.addr.to_string()),
            StatusCode::BAD_GATEWAY => post_failures += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(post_failures, 2, "a POST that reached the dropping target must not be replayed");
    assert!(drops.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    task.abort();
    gw.shutdown().await;
}
