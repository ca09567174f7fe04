//! Test harness: named echo upstreams and a gateway serving translated manifests, all on
//! 127.0.0.1:0.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gateway_core::Gateway;
use gateway_core::server::ServerSettings;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// An upstream answering every request with JSON: its name, and the path, host and headers
/// it received.
pub async fn echo(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    async move {
                        let headers: BTreeMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        let body = serde_json::json!({
                            "service": name,
                            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                            "host": headers.get("host").cloned().unwrap_or_default(),
                            "headers": headers,
                        });
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Replaces every `ECHO_PORT_<name>` in `text` with the port of a fresh echo upstream named
/// `<name>` (one per distinct name).
pub async fn with_echo_ports(text: &str) -> String {
    let mut out = text.to_string();
    let mut names: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("ECHO_PORT_") {
        let tail = &rest[i + "ECHO_PORT_".len()..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).unwrap_or(tail.len());
        let name = tail[..end].to_string();
        if !names.contains(&name) {
            names.push(name);
        }
        rest = &tail[end..];
    }
    // Longest names first, so `ECHO_PORT_a` does not eat the start of `ECHO_PORT_ab`.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let addr = echo(&name).await;
        out = out.replace(&format!("ECHO_PORT_{name}"), &addr.port().to_string());
    }
    out
}

/// A running gateway and its address; stops when dropped.
pub struct Running {
    pub gateway: Gateway,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts `gateway` on a loopback port.
pub async fn serve(gateway: Gateway) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let g = gateway.clone();
    let settings = ServerSettings { shutdown_grace: Duration::from_secs(1), ..ServerSettings::default() };
    tokio::spawn(async move {
        let _ = g
            .serve(vec![listener], settings, async {
                let _ = stopped.await;
            })
            .await;
    });
    Running { gateway, addr, stop: Some(stop) }
}

/// A gateway with every first-party plugin and an empty config.
pub fn empty_gateway() -> Gateway {
    let mut config = gateway_core::config::Config::default();
    config.format_version = "3.0".into();
    Gateway::builder().plugins(gateway_plugins::registry()).build(&config).unwrap()
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// What a request through the gateway got back.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    /// The echo's JSON, when an upstream answered.
    pub fn echo(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

pub async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(String, String)],
) -> Answer {
    let mut req = Request::builder().method(method).uri(format!("http://{addr}{path}")).header("host", host);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let response =
        tokio::time::timeout(Duration::from_secs(10), client.request(req.body(Full::new(Bytes::new())).unwrap()))
            .await
            .expect("the gateway answers within 10 s")
            .expect("the gateway answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}
