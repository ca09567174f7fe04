//! key-auth through the real proxy: every status, message and header a client or upstream sees.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};

async fn start(upstream: std::net::SocketAddr, plugin_config: &str) -> RunningGateway {
    let yaml = format!(
        r#"_format_version: "3.0"
consumers:
- username: alice
  custom_id: cust-1
  keyauth_credentials: [{{key: alice-key, id: cred-alice}}]
- username: bob
  keyauth_credentials: [{{key: bob-key}}]
- username: guest
services:
- name: s
  url: http://{upstream}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: key-auth, config: {plugin_config}}}]
"#
    );
    let gateway =
        Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
    start_running(gateway, ServerSettings::default()).await
}

fn req(gw: &RunningGateway, path: &str) -> http::request::Builder {
    Request::get(gw.url(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_wrong_and_duplicate_keys_get_kongs_401s() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "{}").await;
    let cases = [
        (req(&gw, "/"), "No API key found in request"),
        (req(&gw, "/").header("apikey", "nope"), "Unauthorized"),
        // A stored key's prefix, or the key and more, is not the key.
        (req(&gw, "/").header("apikey", "alice-ke"), "Unauthorized"),
        (req(&gw, "/").header("apikey", "alice-keyx"), "Unauthorized"),
        (req(&gw, "/").header("apikey", "alice-kez"), "Unauthorized"),
        (req(&gw, "/?apikey=nope"), "Unauthorized"),
        (req(&gw, "/").header("apikey", "alice-key").header("apikey", "bob-key"), "Duplicate API key found"),
        (req(&gw, "/?apikey=alice-key&apikey=bob-key"), "Duplicate API key found"),
        // Spoofed identity headers without a key get nowhere.
        (req(&gw, "/").header("x-consumer-username", "alice"), "No API key found in request"),
    ];
    for (builder, message) in cases {
        let resp = send(builder.body(full("")).unwrap()).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{message}");
        assert_eq!(resp.json()["message"], message);
        assert_eq!(resp.headers["www-authenticate"], "Key");
        assert!(resp.headers.contains_key("x-request-id"));
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_key_identifies_the_consumer_to_the_upstream() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "{}").await;
    let resp = send(
        req(&gw, "/")
            .header("apikey", "alice-key")
            .header("x-consumer-username", "mallory")
            .header("x-consumer-id", "forged")
            .header("x-anonymous-consumer", "true")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    let echo = resp.echo();
    assert_eq!(echo.headers["x-consumer-username"], vec!["alice"]);
    assert_eq!(echo.headers["x-consumer-id"], vec!["alice"]);
    assert_eq!(echo.header("x-consumer-custom-id"), Some("cust-1"));
    assert_eq!(echo.header("x-credential-identifier"), Some("cred-alice"));
    assert_eq!(echo.header("x-anonymous-consumer"), None);
    assert_eq!(echo.header("apikey"), Some("alice-key"), "kept unless hide_credentials");

    let echo = get(&gw.url("/items?apikey=bob-key&page=2")).await.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("bob"));
    assert_eq!(echo.header("x-consumer-custom-id"), None);
    assert_eq!(echo.uri, "/items?apikey=bob-key&page=2");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hide_credentials_removes_the_key_from_header_query_and_body() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "{hide_credentials: true, key_in_body: true, key_names: [apikey, x-key]}").await;
    let echo = send(req(&gw, "/").header("x-key", "alice-key").body(full("")).unwrap()).await.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("alice"));
    assert_eq!(echo.header("x-key"), None);

    let echo = get(&gw.url("/items?page=2&apikey=alice-key")).await.echo();
    assert_eq!(echo.uri, "/items?page=2");

    let form = send(
        Request::post(gw.url("/form"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("apikey=bob-key&name=x"))
            .unwrap(),
    )
    .await;
    assert_eq!(form.status, StatusCode::OK, "{}", String::from_utf8_lossy(&form.body));
    let echo = form.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("bob"));
    assert_eq!(echo.body_len, "name=x".len() as u64);

    let json = send(
        Request::post(gw.url("/json"))
            .header("content-type", "application/json")
            .body(full(r#"{"apikey":"alice-key","n":1}"#))
            .unwrap(),
    )
    .await;
    let echo = json.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("alice"));
    assert_eq!(echo.body_len, r#"{"n":1}"#.len() as u64);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_realm_and_preflight() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "{anonymous: guest, run_on_preflight: false, realm: api}").await;
    let echo = get(&gw.url("/")).await.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("guest"));
    assert_eq!(echo.header("x-anonymous-consumer"), Some("true"));
    assert_eq!(echo.header("x-credential-identifier"), None);
    // Kong's rule: with `anonymous`, a wrong key also proceeds as the anonymous consumer.
    let echo = send(req(&gw, "/").header("apikey", "bad").body(full("")).unwrap()).await.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("guest"));
    assert_eq!(echo.header("x-anonymous-consumer"), Some("true"));
    gw.shutdown().await;

    // Without `anonymous` the wrong key is refused, and the realm is announced.
    let gw = start(up.addr, "{realm: api}").await;
    let resp = send(req(&gw, "/").header("apikey", "bad").body(full("")).unwrap()).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers["www-authenticate"], "Key realm=\"api\"");
    gw.shutdown().await;

    let gw = start(up.addr, "{run_on_preflight: false}").await;
    let resp = send(Request::options(gw.url("/")).header("x-consumer-id", "forged").body(full("")).unwrap()).await;
    assert_eq!(resp.status, StatusCode::OK, "preflight passes without a key");
    assert_eq!(resp.echo().header("x-consumer-username"), None);
    assert_eq!(resp.echo().header("x-consumer-id"), None, "spoofed identity is stripped on preflights too");
    assert_eq!(send(Request::delete(gw.url("/")).body(full("")).unwrap()).await.status, StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_configs_fail_their_route_not_the_gateway() {
    let up = echo_upstream().await;
    for (credential, config) in [
        ("{key: k, colour: red}", "{}"),
        ("{key: k}", "{key_names: []}"),
        // The gateway sets it for the upstream: never read from a client.
        ("{key: k}", "{key_names: [x-credential-identifier]}"),
    ] {
        let yaml = format!(
            r#"_format_version: "3.0"
consumers: [{{username: a, keyauth_credentials: [{credential}]}}]
services:
- name: s
  url: http://{}
  routes: [{{name: guarded, paths: ["/guarded"], plugins: [{{name: key-auth, config: {config}}}]}}, {{name: open, paths: ["/open"]}}]
"#,
            up.addr
        );
        let gateway =
            Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
        let gw = start_running(gateway, ServerSettings::default()).await;
        let resp = send(Request::get(gw.url("/guarded")).header("apikey", "k").body(full("")).unwrap()).await;
        assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR, "{credential} {config}: the route fails closed");
        assert_eq!(get(&gw.url("/open")).await.status, StatusCode::OK, "other routes keep serving");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_strip_plugin_headers_through_connection() {
    let up = echo_upstream().await;
    let gw = start(up.addr, "{anonymous: guest}").await;
    let answer = raw(
        gw.addr,
        "GET / HTTP/1.1\r\nhost: x\r\nconnection: close, x-anonymous-consumer, x-consumer-username\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let echo: Echo = serde_json::from_str(body).unwrap();
    assert_eq!(echo.header("x-anonymous-consumer"), Some("true"));
    assert_eq!(echo.header("x-consumer-username"), Some("guest"));
    gw.shutdown().await;
}

#[test]
fn an_auth_plugin_scoped_to_a_consumer_is_refused_not_silently_skipped() {
    let yaml = r#"_format_version: "3.0"
consumers: [{username: alice, plugins: [{name: key-auth}]}]
services: [{name: s, url: "http://127.0.0.1:9", routes: [{name: r, paths: ["/"]}]}]
"#;
    let err =
        Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(yaml).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("consumers[0].plugins[0]: plugin `key-auth` cannot be scoped to a consumer"),
        "{err}"
    );
}

/// Two authentication plugins on one route (jwt runs first, by Kong's priorities): the last to
/// identify a consumer wins, and the upstream sees only its identity. Headers the first one
/// set and the second does not (alice's custom id) are gone, as are those a client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_plugins_identity_replaces_an_earlier_ones_entirely() {
    let up = echo_upstream().await;
    let yaml = format!(
        r#"_format_version: "3.0"
consumers:
- username: alice
  custom_id: cust-1
  jwt_secrets: [{{key: alice-iss, secret: alice-secret, id: cred-alice}}]
- username: bob
  keyauth_credentials: [{{key: bob-key, id: cred-bob}}]
services:
- name: s
  url: http://{}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: key-auth}}, {{name: jwt}}]
"#,
        up.addr
    );
    let gateway =
        Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
    let gw = start_running(gateway, ServerSettings::default()).await;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &std::collections::BTreeMap::from([("iss", "alice-iss")]),
        &jsonwebtoken::EncodingKey::from_secret(b"alice-secret"),
    )
    .unwrap();
    let resp = send(
        req(&gw, "/")
            .header("apikey", "bob-key")
            .header("authorization", format!("Bearer {token}"))
            .header("x-anonymous-consumer", "true")
            .header("x-consumer-groups", "admins")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
    let echo = resp.echo();
    assert_eq!(echo.headers["x-consumer-username"], vec!["bob"]);
    assert_eq!(echo.headers["x-consumer-id"], vec!["bob"]);
    assert_eq!(echo.headers["x-credential-identifier"], vec!["cred-bob"]);
    for gone in ["x-consumer-custom-id", "x-anonymous-consumer", "x-consumer-groups"] {
        assert_eq!(echo.header(gone), None, "{gone}");
    }
    gw.shutdown().await;
}

#[test]
fn a_key_two_consumers_share_is_a_config_error_naming_the_second() {
    let yaml = r#"_format_version: "3.0"
consumers:
- username: alice
  keyauth_credentials: [{key: shared-key}]
- username: bob
  keyauth_credentials: [{key: other-key}, {key: shared-key}]
services:
- name: s
  url: http://127.0.0.1:9
  routes: [{name: r, paths: ["/"]}]
  plugins: [{name: key-auth}]
"#;
    // The plugin is refused (its routes answer 500), and the problem says why.
    let gateway =
        Gateway::builder().plugins(gateway_plugins::registry()).build(&Config::from_yaml(yaml).unwrap()).unwrap();
    let failures = gateway.plugin_failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].message.contains("a key of consumer `bob` is not unique"), "{failures:?}");
}
