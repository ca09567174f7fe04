//! The attack suite: request smuggling, path spellings that try to get past a plugin, and
//! spoofed identity and forwarding headers, sent over raw sockets to a running gateway.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An echo upstream that also records the path of every request it receives.
async fn recording_upstream() -> (Upstream, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let echo = echo_handler();
    let log = seen.clone();
    let handler: Handler = Arc::new(move |req: Request<Incoming>, addr: SocketAddr, peer: SocketAddr| {
        log.lock().unwrap().push(req.uri().to_string());
        echo(req, addr, peer)
    });
    (upstream_with(handler).await, seen)
}

fn gateway(yaml: &str, trusted: &[&str]) -> Gateway {
    Gateway::builder()
        .plugins(gateway_plugins::registry())
        .trusted_ips(trusted.iter().map(|n| n.parse().unwrap()).collect())
        .build(&Config::from_yaml(yaml).unwrap())
        .unwrap()
}

/// `/admin` behind key-auth, `/public` open, both on `upstream`.
fn admin_and_public(upstream: SocketAddr, public_plugins: &str) -> String {
    format!(
        r#"_format_version: "3.0"
consumers:
- username: alice
  custom_id: cust-1
  keyauth_credentials: [{{key: alice-key, id: cred-alice}}]
- username: guest
services:
- name: s
  url: http://{upstream}
  routes:
  - name: admin
    paths: ["/admin"]
    strip_path: false
    plugins: [{{name: key-auth, config: {{hide_credentials: true}}}}]
  - name: public
    paths: ["/public"]
    strip_path: false
    plugins: [{public_plugins}]
"#
    )
}

/// Sends raw bytes, reads until the gateway closes the connection (at most 5 s) and says
/// whether it did close.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.is_ok();
    (String::from_utf8_lossy(&out).to_string(), closed)
}

fn status_of(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_refused_with_400_and_the_connection_closed() {
    let (up, seen) = recording_upstream().await;
    let gw = start_running(gateway(&admin_and_public(up.addr, ""), &[]), ServerSettings::default()).await;
    let smuggled = "GET /public/smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    // hyper refuses every malformed framing with 400 and closes. Content-Length beside
    // Transfer-Encoding is the one it accepts, as RFC 9112 6.3 allows: the body is read by
    // Transfer-Encoding alone, the Content-Length dropped, and the connection closed after
    // the answer, so what follows the body is never read as a request.
    let attempts: Vec<(&str, u16, String)> = vec![
        (
            "Content-Length and Transfer-Encoding together",
            200,
            format!(
                "POST /public/a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "Transfer-Encoding and Content-Length together",
            200,
            format!(
                "POST /public/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two differing Content-Length headers",
            400,
            format!("POST /public/a HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: 44\r\n\r\n{smuggled}"),
        ),
        (
            "a Content-Length list",
            400,
            format!("POST /public/a HTTP/1.1\r\nhost: x\r\ncontent-length: 0, 44\r\n\r\n{smuggled}"),
        ),
        (
            "a signed Content-Length",
            400,
            format!("POST /public/a HTTP/1.1\r\nhost: x\r\ncontent-length: +0\r\n\r\n{smuggled}"),
        ),
        (
            "an obs-folded header",
            400,
            format!("GET /public/a HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n{smuggled}"),
        ),
        (
            "an obs-folded Transfer-Encoding",
            400,
            format!("POST /public/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding:\r\n chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "Transfer-Encoding other than chunked last",
            400,
            format!(
                "POST /public/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        ("a space before the colon", 400, format!("GET /public/a HTTP/1.1\r\nhost : x\r\n\r\n{smuggled}")),
    ];
    for (what, status, request) in &attempts {
        let (answer, closed) = exchange(gw.addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), *status, "{what}: {answer:.300}");
        assert!(closed, "{what}: the connection stays open");
        let answers = answer.split("\r\n").filter(|l| l.starts_with("HTTP/1.1 ")).count();
        assert_eq!(answers, 1, "{what}: {answer}");
    }
    // Invalid chunk sizes: the head is fine, so the request has gone on when the body turns
    // out bad; the client gets 400 (not a 502: the upstream did nothing wrong) and the
    // connection is closed.
    for (what, body) in [
        ("a chunk size that is not hex", "zz\r\nhello\r\n0\r\n\r\n"),
        ("a chunk size that overflows", "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("a chunk size with a sign", "-5\r\nhello\r\n0\r\n\r\n"),
    ] {
        let request =
            format!("POST /public/chunked HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{body}{smuggled}");
        let (answer, closed) = exchange(gw.addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), 400, "{what}: {answer:.300}");
        assert!(answer.contains("Bad request body"), "{what}: {answer:.300}");
        assert!(closed, "{what}: the connection stays open");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|p| !p.contains("smuggled")), "the upstream saw a smuggled request: {seen:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_path_gets_past_a_plugin() {
    let (up, seen) = recording_upstream().await;
    let gw = start_running(gateway(&admin_and_public(up.addr, ""), &[]), ServerSettings::default()).await;
    // Each spelling either reaches the `/admin` route (401 without the key, and the upstream
    // gets the path the router saw) or is refused (404: no route; 400: a hidden dot segment).
    let cases = [
        ("/admin", 401, Some("/admin")),
        ("/public/../admin", 401, Some("/admin")),
        ("/public/%2e%2e/admin", 401, Some("/admin")),
        ("/public/%2E%2E/admin", 401, Some("/admin")),
        ("/public/./../admin", 401, Some("/admin")),
        ("//admin", 401, Some("/admin")),
        ("/./admin", 401, Some("/admin")),
        ("/admin%2f", 401, Some("/admin%2F")),
        ("/%61dmin", 401, Some("/admin")),
        ("/%61%64%6d%69%6e/x", 401, Some("/admin/x")),
        ("/admin;x", 401, Some("/admin;x")),
        // A dot segment behind an escaped slash would climb out of `/public` in an upstream
        // that decodes `%2F`: refused.
        ("/public/..%2fadmin", 400, None),
        ("/public%2f..%2fadmin", 400, None),
        ("/public/..%5cadmin", 400, None),
        // A stray `%` would let `%%32e` normalise to `%2e`; `..;` is `..` to Tomcat.
        ("/public/%%32e%%32e/admin", 400, None),
        ("/public/..%%32fadmin", 400, None),
        ("/public/..;/admin", 400, None),
        ("/ADMIN", 404, None),
        ("/Admin", 404, None),
        ("/%2fadmin", 404, None),
    ];
    for (path, want, upstream_path) in cases {
        let (answer, _) =
            exchange(gw.addr, format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await;
        assert_eq!(status_of(&answer), want, "{path}: {answer:.300}");
        if let Some(expected) = upstream_path.filter(|_| want == 401) {
            seen.lock().unwrap().clear();
            let (answer, _) = exchange(
                gw.addr,
                format!("GET {path} HTTP/1.1\r\nhost: x\r\napikey: alice-key\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await;
            assert_eq!(status_of(&answer), 200, "{path} with the key: {answer:.300}");
            assert_eq!(seen.lock().unwrap().as_slice(), [expected.to_string()], "{path}");
        }
    }
    // An HTTP/2 client is held to the same rules.
    let resp = h2_client().request(Request::get(gw.url("/public/%2e%2e/admin")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}

fn echo_of(answer: &str) -> Echo {
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo ({e}): {answer}"))
}

const SPOOFED: &str = "x-consumer-id: 0000\r\nx-consumer-username: root\r\nx-consumer-custom-id: root\r\n\
x-credential-identifier: root-cred\r\nx-anonymous-consumer: false\r\nx-consumer-groups: admins\r\n\
x-forwarded-for: 6.6.6.6\r\nx-real-ip: 6.6.6.6\r\nx-forwarded-proto: https\r\nx-forwarded-host: evil.example\r\n\
x-forwarded-port: 1\r\nx-forwarded-prefix: /evil\r\nx-forwarded-path: /evil\r\nforwarded: for=6.6.6.6\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_and_forwarding_headers_are_replaced() {
    let up = echo_upstream().await;
    let yaml = admin_and_public(up.addr, "{name: key-auth, config: {anonymous: guest}}");
    let gw = start_running(gateway(&yaml, &[]), ServerSettings::default()).await;

    // An authenticated consumer: every identity header is the plugin's, none the client's.
    let req =
        format!("GET /admin HTTP/1.1\r\nhost: api.test\r\napikey: alice-key\r\n{SPOOFED}connection: close\r\n\r\n");
    let echo = echo_of(&exchange(gw.addr, req.as_bytes()).await.0);
    assert_eq!(echo.header("x-consumer-username"), Some("alice"));
    assert_eq!(echo.header("x-consumer-custom-id"), Some("cust-1"));
    assert_eq!(echo.header("x-credential-identifier"), Some("cred-alice"));
    assert_ne!(echo.header("x-consumer-id"), Some("0000"));
    for name in ["x-anonymous-consumer", "x-consumer-groups", "apikey", "forwarded"] {
        assert_eq!(echo.headers.get(name), None, "{name}");
    }
    // The anonymous consumer: no credential, whatever the client claims.
    let req = format!("GET /public HTTP/1.1\r\nhost: api.test\r\n{SPOOFED}connection: close\r\n\r\n");
    let echo = echo_of(&exchange(gw.addr, req.as_bytes()).await.0);
    assert_eq!(echo.header("x-consumer-username"), Some("guest"));
    assert_eq!(echo.header("x-anonymous-consumer"), Some("true"));
    for name in ["x-credential-identifier", "x-consumer-custom-id", "x-consumer-groups"] {
        assert_eq!(echo.headers.get(name), None, "{name}");
    }
    // Forwarding headers from an untrusted client are replaced, not appended to.
    assert_eq!(echo.headers["x-forwarded-for"], ["127.0.0.1"]);
    assert_eq!(echo.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
    assert_eq!(echo.header("x-forwarded-host"), Some("api.test"));
    assert_eq!(echo.header("x-forwarded-port"), Some(gw.addr.port().to_string().as_str()));
    assert_eq!(echo.header("x-forwarded-path"), Some("/public"));
    assert_eq!(echo.headers.get("x-forwarded-prefix"), None);
    gw.shutdown().await;

    // Behind a trusted proxy (127.0.0.0/8 here) the chain is extended and the client it
    // names is the client.
    let gw = start_running(gateway(&yaml, &["127.0.0.0/8"]), ServerSettings::default()).await;
    let req = "GET /public HTTP/1.1\r\nhost: api.test\r\nx-forwarded-for: 6.6.6.6, 10.1.1.1\r\n\
x-forwarded-proto: https\r\nx-forwarded-host: shop.example\r\nx-forwarded-port: 443\r\nconnection: close\r\n\r\n";
    let echo = echo_of(&exchange(gw.addr, req.as_bytes()).await.0);
    assert_eq!(echo.headers["x-forwarded-for"], ["6.6.6.6, 10.1.1.1, 127.0.0.1"]);
    assert_eq!(echo.header("x-real-ip"), Some("10.1.1.1"));
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header("x-forwarded-host"), Some("shop.example"));
    assert_eq!(echo.header("x-forwarded-port"), Some("443"));
    // The chain is read entry by entry, right to left: whatever a client put on the left (even
    // bytes that are not ASCII) does not matter once an untrusted address is found; ports
    // and brackets are allowed, empty entries skipped, several lines read last first.
    for (xff, client) in [
        ("\u{80}garbage, 10.1.1.1", "10.1.1.1"),
        ("1.2.3.4:5678", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:db8::2", "2001:db8::2"),
        ("::ffff:10.2.2.2", "10.2.2.2"),
        ("10.3.3.3, , 127.0.0.5", "10.3.3.3"),
        ("6.6.6.6\r\nx-forwarded-for: 10.4.4.4", "10.4.4.4"),
        ("127.0.0.9", "127.0.0.9"),
    ] {
        let req =
            format!("GET /public HTTP/1.1\r\nhost: api.test\r\nx-forwarded-for: {xff}\r\nconnection: close\r\n\r\n");
        let echo = echo_of(&exchange(gw.addr, req.as_bytes()).await.0);
        assert_eq!(echo.header("x-real-ip"), Some(client), "{xff:?}");
    }
    // An entry that is not an address before any untrusted one: the client is unknown, and
    // taking the trusted proxy for it would let anyone pass as the proxy.
    for xff in ["10.1.1.1, not-an-ip", "unknown", "10.1.1.1, 127.0.0.1, \u{80}"] {
        let req =
            format!("GET /public HTTP/1.1\r\nhost: api.test\r\nx-forwarded-for: {xff}\r\nconnection: close\r\n\r\n");
        let (answer, _) = exchange(gw.addr, req.as_bytes()).await;
        assert_eq!(status_of(&answer), 400, "{xff:?}: {answer:.300}");
        assert!(answer.contains("invalid X-Forwarded-For"), "{answer:.300}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_by_ip_counts_the_real_client() {
    let up = echo_upstream().await;
    let yaml = admin_and_public(up.addr, "{name: rate-limiting, config: {hour: 1, limit_by: ip}}");
    let status = |addr: SocketAddr, xff: &'static str| async move {
        let req = format!("GET /public HTTP/1.1\r\nhost: x\r\nx-forwarded-for: {xff}\r\nconnection: close\r\n\r\n");
        status_of(&exchange(addr, req.as_bytes()).await.0)
    };
    // Untrusted: a new X-Forwarded-For per request does not buy a new allowance.
    let gw = start_running(gateway(&yaml, &[]), ServerSettings::default()).await;
    assert_eq!(status(gw.addr, "1.1.1.1").await, 200);
    assert_eq!(status(gw.addr, "2.2.2.2").await, 429);
    gw.shutdown().await;
    // Behind a trusted proxy each forwarded client has its own allowance.
    let gw = start_running(gateway(&yaml, &["127.0.0.1/32"]), ServerSettings::default()).await;
    assert_eq!(status(gw.addr, "1.1.1.1").await, 200);
    assert_eq!(status(gw.addr, "2.2.2.2").await, 200);
    assert_eq!(status(gw.addr, "1.1.1.1").await, 429);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_garbage_and_conflicting_lengths_become_502() {
    // Raw upstreams that answer each connection with fixed bytes.
    async fn raw_upstream(answer: &'static [u8]) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                });
            }
        });
        Upstream::from_task(addr, task)
    }
    for (what, answer) in [
        ("not HTTP", &b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..]),
        ("two differing Content-Length", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\nhello"),
        (
            "Content-Length with Transfer-Encoding",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("a status line without a code", b"HTTP/1.1 OK\r\n\r\n"),
        ("an invalid header name", b"HTTP/1.1 200 OK\r\nbad header: x\r\ncontent-length: 0\r\n\r\n"),
    ] {
        let up = raw_upstream(answer).await;
        let yaml = format!(
            "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{}\n  retries: 0\n  routes: [{{name: r, paths: [\"/\"]}}]\n",
            up.addr
        );
        let gw = start_running(gateway(&yaml, &[]), ServerSettings::default()).await;
        let (got, _) = exchange(gw.addr, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert_eq!(status_of(&got), 502, "{what}: {got:.300}");
        assert!(!got.contains("hello") && !got.contains("SSH"), "{what}: passed through: {got}");
        gw.shutdown().await;
    }
}

/// A response's hop-by-hop headers stop at the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let handler: Handler = Arc::new(|_req, _addr, _peer| {
        Box::pin(async {
            Response::builder()
                .header("connection", "x-secret-hop")
                .header("x-secret-hop", "internal")
                .header("keep-alive", "timeout=5")
                .header("proxy-authenticate", "Basic")
                .header("upgrade", "h2c")
                .header("te", "trailers")
                .header("x-normal", "kept")
                .body(full("ok"))
                .unwrap()
        })
    });
    let up = upstream_with(handler).await;
    let yaml = format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{}\n  routes: [{{name: r, paths: [\"/\"]}}]\n",
        up.addr
    );
    let gw = start_running(gateway(&yaml, &[]), ServerSettings::default()).await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.headers["x-normal"], "kept");
    for name in ["x-secret-hop", "keep-alive", "proxy-authenticate", "upgrade", "te"] {
        assert!(resp.headers.get(name).is_none(), "{name} reached the client");
    }
    gw.shutdown().await;
}

/// An `h2c` upgrade is not passed on: an upstream that took it would serve HTTP/2 requests for
/// any path through the tunnel, past the router and the plugins. The request goes on as a
/// plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_not_passed_to_the_upstream() {
    let up = echo_upstream().await;
    let gw = start_running(gateway(&admin_and_public(up.addr, ""), &[]), ServerSettings::default()).await;
    for upgrade in ["h2c", "H2C", "websocket, h2c"] {
        let req = format!(
            "GET /public HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings, close\r\nupgrade: {upgrade}\r\n\
http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let (answer, _) = exchange(gw.addr, req.as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{upgrade}: {answer:.300}");
        let echo = echo_of(&answer);
        for name in ["upgrade", "http2-settings", "connection"] {
            assert_eq!(echo.headers.get(name), None, "{upgrade}: {name} reached the upstream");
        }
    }
    gw.shutdown().await;
}

/// `X-Forwarded-Proto` from a trusted proxy (a load balancer that terminates TLS) is the
/// scheme for `protocols: [https]` routes and the https redirect; from anyone else it changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_trusted_proxy_can_say_the_client_used_https() {
    let up = echo_upstream().await;
    let yaml = https_only_routes(up.addr);
    let request = |path: &str, proto: Option<&str>| {
        let proto = proto.map(|p| format!("x-forwarded-proto: {p}\r\n")).unwrap_or_default();
        format!("GET {path} HTTP/1.1\r\nhost: shop.test\r\n{proto}connection: close\r\n\r\n")
    };
    let untrusted = start_running(gateway(&yaml, &[]), ServerSettings::default()).await;
    for proto in [None, Some("https"), Some("HTTPS")] {
        let (answer, _) = exchange(untrusted.addr, request("/secure", proto).as_bytes()).await;
        assert_eq!(status_of(&answer), 426, "untrusted, {proto:?}: {answer}");
    }
    untrusted.shutdown().await;

    let trusted = start_running(gateway(&yaml, &["127.0.0.0/8"]), ServerSettings::default()).await;
    for proto in ["https", "HTTPS", "http, https"] {
        let (answer, _) = exchange(trusted.addr, request("/secure", Some(proto)).as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "trusted, {proto}: {answer}");
        assert_eq!(echo_of(&answer).header("x-forwarded-proto"), Some(proto));
    }
    for proto in [None, Some("http"), Some("https, http")] {
        let (answer, _) = exchange(trusted.addr, request("/secure", proto).as_bytes()).await;
        assert_eq!(status_of(&answer), 426, "trusted, {proto:?}: {answer}");
    }
    let (answer, _) = exchange(trusted.addr, request("/moved/x", Some("http")).as_bytes()).await;
    assert_eq!(status_of(&answer), 301, "{answer}");
    assert!(answer.contains("location: https://shop.test/moved/x"), "{answer}");
    let (answer, _) = exchange(trusted.addr, request("/moved/x", Some("https")).as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    trusted.shutdown().await;
}
