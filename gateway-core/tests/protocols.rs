//! Protocols beyond request/response HTTP/1.1: WebSocket upgrades tunnelled both ways (and
//! across reloads), and gRPC over HTTP/2 end to end with trailers, streaming and gRPC errors.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use common::*;
use futures_util::{SinkExt, StreamExt};
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// An upstream that accepts WebSocket upgrades and echoes every message, prefixed by what it
/// saw of the handshake request (`path`, `x-forwarded-for`).
async fn websocket_echo() -> Upstream {
    upstream_with(Arc::new(|mut req: Request<Incoming>, _addr, _peer| {
        Box::pin(async move {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                return Response::builder().status(400).body(full("not a websocket handshake")).unwrap();
            };
            let seen = format!(
                "{} xff={}",
                req.uri().path(),
                req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("-")
            );
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let mut ws =
                    tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                while let Some(Ok(Message::Text(t))) = ws.next().await {
                    if ws.send(Message::text(format!("{seen}: {t}"))).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                .body(full(""))
                .unwrap()
        })
    }))
    .await
}

fn ws_config(upstream: SocketAddr, extra_route: &str) -> String {
    format!(
        r#"_format_version: "3.0"
services:
- name: ws
  url: http://{upstream}/socket
  routes:
  - {{name: ws, paths: ["/ws"]}}
  {extra_route}
"#
    )
}

#[tokio::test]
async fn websocket_is_tunnelled_both_ways_and_survives_reloads() {
    let up = websocket_echo().await;
    let gw = start_gateway(&ws_config(up.addr, "")).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/ws/chat", gw.addr), tcp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(resp.headers().contains_key("x-request-id"));

    ws.send(Message::text("hello")).await.unwrap();
    let first = ws.next().await.unwrap().unwrap();
    assert_eq!(first.into_text().unwrap().as_str(), "/socket/chat xff=127.0.0.1: hello");

    // A reload that changes everything, the WebSocket's own route included.
    let replaced = ws_config(up.addr, "- {name: other, paths: [\"/other\"]}").replace("\"/ws\"", "\"/ws2\"");
    gw.gateway.reload(&Config::from_yaml(&replaced).unwrap()).unwrap();
    assert_eq!(get(&gw.url("/ws/chat")).await.status, StatusCode::NOT_FOUND, "the route is gone");
    for i in 0..3 {
        ws.send(Message::text(format!("after reload {i}"))).await.unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(msg.into_text().unwrap().as_str(), format!("/socket/chat xff=127.0.0.1: after reload {i}"));
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn an_upgrade_the_upstream_declines_is_an_ordinary_response() {
    let up = echo_upstream().await;
    let gw = start_gateway(&ws_config(up.addr, "")).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let err = tokio_tungstenite::client_async(format!("ws://{}/ws", gw.addr), tcp).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(resp) = err else { panic!("{err}") };
    assert_eq!(resp.status(), StatusCode::OK);
    // The plain echo saw the upgrade request, with the upgrade headers passed on.
    let echo: serde_json::Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
    assert_eq!(echo["headers"]["upgrade"][0], "websocket");
    assert_eq!(echo["headers"]["connection"][0], "upgrade");
}

/// One gRPC message: flag, length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

fn channel_body() -> (FrameTx, TestBody) {
    let (tx, rx) = mpsc::channel(8);
    let stream = tokio_stream_from(rx);
    (tx, BodyExt::boxed_unsync(StreamBody::new(stream)))
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A gRPC-shaped h2c upstream, see [`grpc_echo_handler`].
async fn grpc_echo() -> Upstream {
    upstream_with(grpc_echo_handler()).await
}

/// Answers each request message with `echo: <payload>` as soon as it arrives, then trailers
/// with `grpc-status: 0` and what it saw (`te`, the HTTP version, the path).
fn grpc_echo_handler() -> Handler {
    Arc::new(|req: Request<Incoming>, _addr, _peer| {
        Box::pin(async move {
            let te = req.headers().get("te").cloned().unwrap_or(HeaderValue::from_static("-"));
            let version = format!("{:?}", req.version());
            let path = req.uri().path().to_string();
            let (tx, body) = channel_body();
            let mut incoming = req.into_body();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    while buf.len() >= 5 {
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        if buf.len() < 5 + len {
                            break;
                        }
                        buf.advance(5);
                        let payload = buf.split_to(len);
                        let reply = [b"echo: ", &payload[..]].concat();
                        let _ = tx.send(Ok(Frame::data(grpc_frame(&reply)))).await;
                    }
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                trailers.insert("x-seen-te", te);
                trailers.insert("x-seen-version", HeaderValue::from_str(&version).unwrap());
                trailers.insert("x-seen-path", HeaderValue::from_str(&path).unwrap());
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            });
            Response::builder().header("content-type", "application/grpc").body(body).unwrap()
        })
    })
}

async fn grpc_config(upstream: SocketAddr, scheme: &str) -> String {
    let down = closed_port().await;
    format!(
        r#"_format_version: "3.0"
services:
- name: greeter
  url: {scheme}://{upstream}
  tls_verify: false
  routes:
  - {{name: greeter, paths: ["/helloworld.Greeter/"], strip_path: false, protocols: [grpc, grpcs]}}
- name: down
  url: grpc://{down}
  retries: 0
  routes:
  - {{name: down, paths: ["/down.Service/"], protocols: [grpc]}}
"#
    )
}

fn grpc_request(authority: SocketAddr, path: &str, body: TestBody) -> Request<TestBody> {
    Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// Reads the next gRPC message payload from a response body.
async fn next_message(body: &mut Incoming, buf: &mut BytesMut) -> Option<Bytes> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() >= 5 + len {
                buf.advance(5);
                return Some(buf.split_to(len).freeze());
            }
        }
        let frame = body.frame().await?.ok()?;
        match frame.into_data() {
            Ok(d) => buf.extend_from_slice(&d),
            Err(_) => return None,
        }
    }
}

async fn check_grpc_streaming(send: impl Fn(TestBody) -> ResponseFut) {
    // Streaming: each reply arrives before the next request message is sent.
    let (tx, body) = channel_body();
    let resp = send(body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    for name in ["ann", "bob", "cyd"] {
        // Pauses the gateway waits through: 450 ms in all, past a short body deadline, which
        // gRPC routes are exempt from.
        tokio::time::sleep(Duration::from_millis(150)).await;
        tx.send(Ok(Frame::data(grpc_frame(name.as_bytes())))).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), next_message(&mut body, &mut buf)).await.unwrap();
        assert_eq!(reply.as_deref(), Some(format!("echo: {name}").as_bytes()));
    }
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        if let Ok(t) = frame.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("the upstream's trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-seen-te"], "trailers");
    assert_eq!(trailers["x-seen-version"], "HTTP/2.0");
    assert_eq!(trailers["x-seen-path"], "/helloworld.Greeter/SayHello");
}

type ResponseFut = std::pin::Pin<Box<dyn std::future::Future<Output = Response<Incoming>> + Send>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_reach_an_h2c_upstream_with_trailers() {
    let up = grpc_echo().await;
    let settings = ServerSettings { body_read_timeout: Some(Duration::from_millis(300)), ..Default::default() };
    let gw = start_gateway_with(&grpc_config(up.addr, "grpc").await, settings).await;
    let addr = gw.addr;

    // Unary.
    let req = grpc_request(addr, "/helloworld.Greeter/SayHello", full(grpc_frame(b"world")));
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(&collected.to_bytes()[..], &grpc_frame(b"echo: world")[..]);

    check_grpc_streaming(move |body| {
        let req = grpc_request(addr, "/helloworld.Greeter/SayHello", body);
        Box::pin(async move { h2_client().request(req).await.unwrap() })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcs_over_tls_both_sides() {
    let ca = tls::Ca::new("grpc ca");
    let (cert, key) = ca.leaf(&["127.0.0.1"]);
    let up = tls::tls_upstream(grpc_echo_handler(), &cert, &key, &[b"h2"]).await;
    let gw = start_running_tls(
        gateway_core::Gateway::from_yaml(&grpc_config(up.addr, "grpcs").await).unwrap(),
        gateway_core::server::ServerSettings::default(),
    )
    .await;
    let tls_addr = gw.tls_addr.unwrap();
    check_grpc_streaming(move |body| {
        Box::pin(async move {
            let h = tls::connect(tls_addr, "localhost", tls::client_config(&[], &[b"h2"])).await;
            assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(h.stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send.send_request(grpc_request(tls_addr, "/helloworld.Greeter/SayHello", body)).await.unwrap()
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_answers_to_grpc_clients_are_grpc_statuses() {
    let up = grpc_echo().await;
    let gw = start_gateway(&grpc_config(up.addr, "grpc").await).await;
    for (path, code, message) in [
        ("/nothing.Here/Call", "12", "no Route matched with those values"),
        ("/down.Service/Call", "14", "An invalid response was received from the upstream server"),
    ] {
        let resp = h2_client().request(grpc_request(gw.addr, path, full(grpc_frame(b"x")))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], code, "{path}");
        assert_eq!(resp.headers()["grpc-message"], message);
        assert!(resp.headers().contains_key("x-request-id"));
        assert!(resp.into_body().collect().await.unwrap().to_bytes().is_empty());
    }
    // Plain HTTP clients still get the JSON answer.
    assert_eq!(get(&gw.url("/nothing")).await.status, StatusCode::NOT_FOUND);
}
