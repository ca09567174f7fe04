//! TLS end to end: SNI certificate selection, ALPN, HTTPS-only routes, certificate reloads,
//! and verified TLS to upstreams.

mod common;
#[path = "common/logs.rs"]
mod logs;
#[path = "common/tls.rs"]
mod tls;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};
use logs::*;
use tls::{Ca, client_config, connect, der, request, tls_upstream};

fn get_req(host: &str, path: &str) -> Request<TestBody> {
    Request::get(path).header("host", host).body(full("")).unwrap()
}

fn h2_req(authority: &str, path: &str) -> Request<TestBody> {
    Request::get(format!("https://{authority}{path}")).version(http::Version::HTTP_2).body(full("")).unwrap()
}

/// A config with three certificates (a, b, and a default by `*`) in front of `upstream`.
fn three_certs(ca: &Ca, upstream: std::net::SocketAddr) -> (String, [String; 3]) {
    let (a_cert, a_key) = ca.leaf(&["a.example.com"]);
    let (b_cert, b_key) = ca.leaf(&["b.example.com"]);
    let (d_cert, d_key) = ca.leaf(&["default.example.com"]);
    let yaml = format!(
        r#"_format_version: "3.0"
services:
- name: echo
  url: http://{upstream}
  routes: [{{name: all, paths: ["/"]}}]
certificates:
- {{cert: {a_cert:?}, key: {a_key:?}, snis: [a.example.com]}}
- {{id: b, cert: {b_cert:?}, key: {b_key:?}}}
- {{cert: {d_cert:?}, key: {d_key:?}, snis: ["*"]}}
snis:
- {{name: b.example.com, certificate: {{id: b}}}}
"#
    );
    (yaml, [a_cert, b_cert, d_cert])
}

#[tokio::test]
async fn sni_selects_the_certificate_and_other_clients_get_the_default() {
    let up = echo_upstream().await;
    let ca = Ca::new("test ca");
    let (yaml, [a, b, d]) = three_certs(&ca, up.addr);
    let gw = start_running_tls(Gateway::from_yaml(&yaml).unwrap(), ServerSettings::default()).await;
    let tls_addr = gw.tls_addr.unwrap();
    // Verified against the CA: the chains are real, not just the leaf that was picked.
    let verified = client_config(std::slice::from_ref(&ca.der), &[b"http/1.1"]);
    let any = client_config(&[], &[b"http/1.1"]);

    let h = connect(tls_addr, "a.example.com", verified.clone()).await;
    assert_eq!(h.peer, der(&a));
    let answer = request(h, get_req("a.example.com", "/hello")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let echo = answer.echo();
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.uri, "/hello");

    assert_eq!(connect(tls_addr, "b.example.com", verified.clone()).await.peer, der(&b));
    assert_eq!(connect(tls_addr, "other.example.org", any.clone()).await.peer, der(&d));
    // An IP address as the server name: the client sends no SNI at all.
    assert_eq!(connect(tls_addr, "127.0.0.1", any).await.peer, der(&d));
}

#[tokio::test]
async fn alpn_offers_h2_then_http11() {
    let up = echo_upstream().await;
    let ca = Ca::new("test ca");
    let (yaml, _) = three_certs(&ca, up.addr);
    let gw = start_running_tls(Gateway::from_yaml(&yaml).unwrap(), ServerSettings::default()).await;
    let tls_addr = gw.tls_addr.unwrap();

    let h =
        connect(tls_addr, "a.example.com", client_config(std::slice::from_ref(&ca.der), &[b"h2", b"http/1.1"])).await;
    assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
    let answer = request(h, h2_req("a.example.com", "/over-h2")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let echo = answer.echo();
    assert_eq!(echo.uri, "/over-h2");
    assert_eq!(echo.version, "HTTP/1.1", "the upstream is HTTP/1.1 whatever the client speaks");
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));

    let h = connect(tls_addr, "a.example.com", client_config(std::slice::from_ref(&ca.der), &[b"http/1.1"])).await;
    assert_eq!(h.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(request(h, get_req("a.example.com", "/over-h1")).await.status, StatusCode::OK);

    // No ALPN at all: HTTP/1.1.
    let h = connect(tls_addr, "a.example.com", client_config(std::slice::from_ref(&ca.der), &[])).await;
    assert_eq!(h.alpn, None);
    assert_eq!(request(h, get_req("a.example.com", "/plain")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn https_only_routes_redirect_or_refuse_plain_http() {
    let up = echo_upstream().await;
    let yaml = format!(
        r#"_format_version: "3.0"
services:
- name: echo
  url: http://{}
  routes:
  - {{name: moved, paths: ["/moved"], protocols: [https], https_redirect_status_code: 301}}
  - {{name: upgrade, paths: ["/upgrade"], protocols: [https]}}
  - {{name: plain, paths: ["/plain"], protocols: [http]}}
"#,
        up.addr
    );
    let gw = start_running_tls(Gateway::from_yaml(&yaml).unwrap(), ServerSettings::default()).await;
    let tls_addr = gw.tls_addr.unwrap();

    let moved = get_host(&gw.url("/moved/x?q=1"), "api.example.com:8000").await;
    assert_eq!(moved.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(moved.headers["location"], "https://api.example.com/moved/x?q=1");
    let upgrade = get(&gw.url("/upgrade")).await;
    assert_eq!(upgrade.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(upgrade.json()["message"], "Please use HTTPS protocol");

    let any = client_config(&[], &[b"http/1.1"]);
    let over_tls =
        request(connect(tls_addr, "api.example.com", any.clone()).await, get_req("api.example.com", "/moved/x")).await;
    assert_eq!(over_tls.status, StatusCode::OK);
    assert_eq!(over_tls.echo().uri, "/x");
    // An http-only route refuses TLS clients the way Kong does.
    let plain_over_tls = request(connect(tls_addr, "api.example.com", any).await, get_req("x", "/plain")).await;
    assert_eq!(plain_over_tls.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(get(&gw.url("/plain")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn reload_swaps_certificates_and_open_connections_keep_working() {
    let up = echo_upstream().await;
    let ca = Ca::new("test ca");
    let (yaml, [a, ..]) = three_certs(&ca, up.addr);
    let gw = start_running_tls(Gateway::from_yaml(&yaml).unwrap(), ServerSettings::default()).await;
    let tls_addr = gw.tls_addr.unwrap();
    let roots = [ca.der.clone()];

    // An HTTP/1.1 keep-alive connection opened before the reload.
    let h = connect(tls_addr, "a.example.com", client_config(&roots, &[b"http/1.1"])).await;
    assert_eq!(h.peer, der(&a));
    let io = hyper_util::rt::TokioIo::new(h.stream);
    let (mut old_conn, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(io).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(old_conn.send_request(get_req("a.example.com", "/before")).await.unwrap().status(), 200);

    let (yaml2, [a2, ..]) = three_certs(&ca, up.addr);
    gw.gateway.reload(&Config::from_yaml(&yaml2).unwrap()).unwrap();
    let h = connect(tls_addr, "a.example.com", client_config(&roots, &[b"http/1.1"])).await;
    assert_eq!(h.peer, der(&a2), "new handshakes see the reloaded certificate");
    assert_ne!(der(&a), der(&a2));
    assert_eq!(old_conn.send_request(get_req("a.example.com", "/after")).await.unwrap().status(), 200);

    // A config whose certificate does not load is refused; the current one keeps serving.
    let broken = yaml2.replacen("-----BEGIN CERTIFICATE-----", "-----BEGIN CERTIFICATE-----garbage", 1);
    let err = gw.gateway.reload(&Config::from_yaml(&broken).unwrap()).unwrap_err().to_string();
    assert!(err.contains("certificates[0]") && err.contains("invalid PEM"), "{err}");
    assert_eq!(connect(tls_addr, "a.example.com", client_config(&roots, &[])).await.peer, der(&a2));
}

#[tokio::test]
async fn without_certificates_a_tls_listener_serves_a_self_signed_one() {
    let up = echo_upstream().await;
    let yaml = format!("_format_version: \"3.0\"\nservices:\n- url: http://{}\n  routes: [{{paths: [/]}}]\n", up.addr);
    let gw = start_running_tls(Gateway::from_yaml(&yaml).unwrap(), ServerSettings::default()).await;
    let h = connect(gw.tls_addr.unwrap(), "localhost", client_config(&[], &[b"http/1.1"])).await;
    assert!(!h.peer.is_empty());
    assert_eq!(request(h, get_req("localhost", "/")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn https_upstreams_are_verified_against_their_ca_certificates() {
    // The log lines of the current thread (the test runs on one).
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let ca = Ca::new("upstream ca");
    let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"]);
    let up = tls_upstream(echo_handler(), &cert, &key, &[b"http/1.1"]).await;
    let other_ca = Ca::new("someone else");
    let yaml = format!(
        r#"_format_version: "3.0"
ca_certificates:
- {{id: ours, cert: {ca:?}}}
- {{id: theirs, cert: {other:?}}}
services:
- name: verified
  url: https://{addr}
  ca_certificates: [ours]
  routes: [{{paths: ["/verified"]}}]
- name: wrong-ca
  url: https://{addr}
  ca_certificates: [theirs]
  retries: 0
  routes: [{{paths: ["/wrong-ca"]}}]
- name: system-roots
  url: https://{addr}
  retries: 0
  routes: [{{paths: ["/system"]}}]
- name: unverified
  url: https://{addr}
  tls_verify: false
  routes: [{{paths: ["/unverified"]}}]
- name: by-name
  url: https://localhost:{port}
  ca_certificates: [ours]
  routes: [{{paths: ["/by-name"]}}]
"#,
        ca = ca.pem,
        other = other_ca.pem,
        addr = up.addr,
        port = up.addr.port(),
    );
    let gw = start_gateway(&yaml).await;

    let ok = get(&gw.url("/verified/x")).await;
    assert_eq!(ok.status, StatusCode::OK);
    let echo = ok.echo();
    assert_eq!(echo.uri, "/x");
    assert_eq!(echo.header("host"), Some(up.addr.to_string().as_str()));
    let by_name = get(&gw.url("/by-name")).await;
    assert_eq!(by_name.status, StatusCode::OK, "SNI and verification by the host name");
    assert_eq!(by_name.echo().header("host"), Some(format!("localhost:{}", up.addr.port()).as_str()));
    assert_eq!(get(&gw.url("/unverified")).await.status, StatusCode::OK);

    for path in ["/wrong-ca", "/system"] {
        let failed = get(&gw.url(path)).await;
        assert_eq!(failed.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(failed.json()["message"], "An invalid response was received from the upstream server");
    }
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("upstream request failed") && l.contains("wrong-ca"))
        .unwrap_or_else(|| panic!("no log line for the failed verification in:\n{text}"));
    assert!(line.contains("invalid peer certificate") && line.contains("UnknownIssuer"), "{line}");
}

#[tokio::test]
async fn bad_tls_settings_are_config_errors() {
    let err = Gateway::from_yaml(
        r#"_format_version: "3.0"
ca_certificates:
- {id: broken, cert: "not a pem"}
services:
- url: https://127.0.0.1:1
  ca_certificates: [missing]
  routes: [{paths: [/]}]
"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ca_certificates[0]: `cert`: cannot read PEM file `not a pem`"), "{err}");
    assert!(err.contains("services[0]: CA certificate `missing` does not exist"), "{err}");
}
