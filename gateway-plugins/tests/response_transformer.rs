//! response-transformer through the real proxy: what the client receives.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

async fn start(upstream: std::net::SocketAddr, config: &str) -> RunningGateway {
    let yaml = format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{upstream}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: response-transformer, config: {config}}}]
"#
    );
    let gateway = Gateway::builder()
        .plugins(gateway_plugins::registry())
        .build(&Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")))
        .unwrap();
    start_running(gateway, ServerSettings::default()).await
}

/// An upstream that answers every request with `headers` and `body` (sent with its length).
async fn fixed_upstream(headers: &[(&str, &str)], body: impl Into<Bytes>) -> Upstream {
    let body: Bytes = body.into();
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    upstream_with(Arc::new(move |_req, _, _| {
        let (body, headers) = (body.clone(), headers.clone());
        Box::pin(async move {
            let mut resp = Response::builder();
            for (k, v) in headers {
                resp = resp.header(k, v);
            }
            resp.body(full(body)).unwrap()
        })
    }))
    .await
}

/// A body fed by a channel: no length known, each message a frame, sent when the test says so.
struct Channel(mpsc::Receiver<Bytes>);

impl Body for Channel {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// An upstream whose one response streams what the returned sender sends.
async fn channel_upstream(content_type: &'static str) -> (Upstream, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(16);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let up = upstream_with(Arc::new(move |_req, _, _| {
        let rx = rx.lock().unwrap().take().expect("one request");
        Box::pin(async move {
            Response::builder().header("content-type", content_type).body(Channel(rx).boxed_unsync()).unwrap()
        })
    }))
    .await;
    (up, tx)
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).map(|v| v.to_str().unwrap())
}

/// The body's framing is right: a `Content-Length`, when present, is the body's length.
fn assert_framing(a: &Answer) {
    if let Some(len) = header(a, "content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), a.body.len(), "Content-Length matches the body");
    } else {
        assert_eq!(header(a, "transfer-encoding"), Some("chunked"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_operations_follow_kongs_order_with_templates() {
    let up = fixed_upstream(
        &[
            ("content-type", "text/plain"),
            ("x-internal", "secret"),
            ("x-gone", "upstream"),
            ("x-old", "value"),
            ("x-mode", "original"),
            ("x-tag", "upstream"),
        ],
        "hello",
    )
    .await;
    let gw = start(
        up.addr,
        r#"{
          remove: {headers: [x-internal, x-gone]},
          rename: {headers: ["x-old:x-new"]},
          replace: {headers: ["x-mode:replaced", "x-absent:never"]},
          add: {headers: ["x-gone:back", "x-new:not-added", "x-mode:not-added", "x-was:$(headers.x-mode)", "x-q:[$(query_params.a)]"]},
          append: {headers: ["x-tag:gateway", "x-new:appended"]}
        }"#,
    )
    .await;
    let resp = get(&gw.url("/?a=1")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(header(&resp, "x-internal"), None);
    assert_eq!(header(&resp, "x-gone"), Some("back"), "removed before it is added");
    assert_eq!(header(&resp, "x-old"), None);
    let all = |name: &str| -> Vec<&str> { resp.headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect() };
    assert_eq!(all("x-new"), ["value", "appended"], "renamed before add (not added) and append");
    assert_eq!(header(&resp, "x-mode"), Some("replaced"));
    assert_eq!(header(&resp, "x-absent"), None, "replace only touches what is there");
    assert_eq!(header(&resp, "x-was"), Some("original"), "templates read the upstream's response headers");
    assert_eq!(header(&resp, "x-q"), Some("[]"), "no query string on a response");
    assert_eq!(all("x-tag"), ["upstream", "gateway"]);
    assert_eq!(&resp.body[..], b"hello");
    assert_eq!(header(&resp, "content-length"), Some("5"), "a body left alone keeps its length");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_are_transformed_with_types_and_pointers() {
    let original = r#"{"user":"ann","secret":"x","count":"1","tags":["a"],"meta":{"internal":1,"v":1}}"#;
    for content_type in ["application/json", "application/json; charset=utf-8", "application/problem+json"] {
        let up = fixed_upstream(&[("content-type", content_type)], original).await;
        let gw = start(
            up.addr,
            r#"{
              remove: {json: [secret, /meta/internal]},
              rename: {json: ["user:username"]},
              replace: {json: ["count:5", "missing:never"], json_types: [number, string]},
              add: {json: ["/meta/source:gateway", "ok:true", "/meta/v:2"], json_types: [string, boolean, number]},
              append: {json: ["tags:b"]}
            }"#,
        )
        .await;
        let resp = get(&gw.url("/")).await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(
            resp.json(),
            serde_json::json!({
                "username": "ann", "count": 5, "ok": true, "tags": ["a", "b"],
                "meta": {"v": 1, "source": "gateway"}
            }),
            "{content_type}"
        );
        assert_ne!(header(&resp, "content-length"), Some(original.len().to_string().as_str()));
        assert_framing(&resp);
        assert_eq!(header(&resp, "content-type"), Some(content_type));
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_get_header_and_json_operations_with_an_exact_length() {
    let gw = start(
        closed_port().await,
        r#"{add: {headers: ["x-added:yes"], json: ["/meta/source:gateway"]}, remove: {json: [request_id]}}"#,
    )
    .await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY);
    assert_eq!(header(&resp, "x-added"), Some("yes"));
    let json = resp.json();
    assert_eq!(json["meta"], serde_json::json!({"source": "gateway"}));
    assert!(json.get("request_id").is_none());
    assert!(json["message"].is_string());
    assert_eq!(header(&resp, "content-length"), Some(resp.body.len().to_string().as_str()));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_bodies_pass_untouched_and_stream() {
    // A JSON body in an encoding the plugin cannot read, and a JSON array: both as they came.
    let config = r#"{add: {json: ["x:1"], headers: ["x-seen:1"]}}"#;
    let gzip =
        fixed_upstream(&[("content-type", "application/json"), ("content-encoding", "gzip")], "\x1f\u{8b}raw").await;
    let gw = start(gzip.addr, config).await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(&resp.body[..], "\x1f\u{8b}raw".as_bytes());
    assert_eq!(header(&resp, "content-length"), Some(resp.body.len().to_string().as_str()));
    gw.shutdown().await;
    for raw in ["[1,2]", "not json"] {
        let up = fixed_upstream(&[("content-type", "application/json")], raw).await;
        let gw = start(up.addr, config).await;
        let resp = get(&gw.url("/")).await;
        assert_eq!(&resp.body[..], raw.as_bytes());
        assert_framing(&resp);
        gw.shutdown().await;
    }

    // A streamed text body: the client gets the first chunk before the upstream sends the next.
    let (up, tx) = channel_upstream("text/plain").await;
    let gw = start(up.addr, config).await;
    let resp = client().request(Request::get(gw.url("/")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen"], "1");
    let mut body = resp.into_body();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .expect("the first chunk arrives while the upstream still holds the rest")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first"));
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    assert_eq!(body.collect().await.unwrap().to_bytes(), Bytes::from_static(b"second"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_over_the_limit_pass_whole_and_untouched() {
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(gateway_plugins::response_transformer::BODY_LIMIT));
    let config = r#"{add: {json: ["x:1"]}}"#;

    // With a Content-Length: judged by it, never buffered.
    let up = fixed_upstream(&[("content-type", "application/json")], big.clone()).await;
    let gw = start(up.addr, config).await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.body.len(), big.len());
    assert!(resp.body == big.as_bytes());
    assert_eq!(header(&resp, "content-length"), Some(big.len().to_string().as_str()));
    gw.shutdown().await;

    // Without one: what was read before the limit goes out first, then the rest.
    let (up, tx) = channel_upstream("application/json").await;
    let gw = start(up.addr, config).await;
    let sender = {
        let big = Bytes::from(big.clone());
        tokio::spawn(async move {
            for chunk in big.chunks(1 << 20) {
                tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
        })
    };
    let resp = get(&gw.url("/")).await;
    sender.await.unwrap();
    assert_eq!(resp.body.len(), big.len());
    assert!(resp.body == big.as_bytes());
    assert_framing(&resp);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_responses_keep_their_length() {
    let up = echo_upstream().await;
    let gw = start(up.addr, r#"{add: {json: ["x:1"]}}"#).await;
    let get = get(&gw.url("/")).await;
    assert_eq!(get.json()["x"], "1");
    let head = send(Request::head(gw.url("/")).body(full("")).unwrap()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    let len: usize = header(&head, "content-length").expect("HEAD keeps the upstream's length").parse().unwrap();
    assert!(len > 0);
    assert_eq!(head.headers.get(header::TRANSFER_ENCODING), None);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_only_fields_and_bad_values_fail_the_route() {
    let up = echo_upstream().await;
    for bad in [
        r#"{add: {querystring: ["a:b"]}}"#,
        r#"{remove: {body: [password]}}"#,
        r#"{replace: {uri: "/new"}}"#,
        r#"{remove: {json: [a], json_types: [number]}}"#,
        r#"{add: {headers: ["x:$(os.time())"]}}"#,
        r#"{add: {headers: ["novalue"]}}"#,
        r#"{rename: {headers: ["x-a:not a name"]}}"#,
        r#"{http_method: POST}"#,
    ] {
        let gw = start(up.addr, bad).await;
        assert_eq!(get(&gw.url("/")).await.status, StatusCode::INTERNAL_SERVER_ERROR, "{bad}");
        gw.shutdown().await;
    }
}
