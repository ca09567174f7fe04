//! Test harness: in-process upstreams and a running gateway, all on 127.0.0.1:0.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::Gateway;
use gateway_core::server::ServerSettings;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the echo upstream saw, as it reports it in its JSON body.
#[derive(Debug, serde::Deserialize)]
pub struct Echo {
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_len: u64,
    pub upstream: String,
    /// The address the request came from: the gateway's side of the upstream connection.
    pub peer: String,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.first()).map(String::as_str)
    }
}

/// A running upstream server; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    /// An upstream served by `task` on `addr`, stopped when dropped.
    pub fn from_task(addr: SocketAddr, task: JoinHandle<()>) -> Upstream {
        Upstream { addr, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type Handler = std::sync::Arc<
    dyn Fn(Request<Incoming>, SocketAddr, SocketAddr) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// Starts an upstream that answers with `handler`.
pub async fn upstream_with(handler: Handler) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve_upstream_conn(stream, handler.clone(), addr, peer));
        }
    });
    Upstream { addr, task }
}

/// Serves one upstream connection (HTTP/1.1 or h2c, upgrades allowed) with `handler`.
pub async fn serve_upstream_conn<I>(io: I, handler: Handler, addr: SocketAddr, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let fut = handler(req, addr, peer);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// An upstream that answers every request with a JSON description of it, after draining the
/// body. `/slow/<ms>` waits that long first.
pub async fn echo_upstream() -> Upstream {
    upstream_with(echo_handler()).await
}

/// The handler of [`echo_upstream`], to serve elsewhere (over TLS, say).
pub fn echo_handler() -> Handler {
    std::sync::Arc::new(|req: Request<Incoming>, addr: SocketAddr, peer: SocketAddr| {
        Box::pin(async move {
            if let Some(ms) = req.uri().path().rsplit_once("/slow/").and_then(|(_, ms)| ms.parse::<u64>().ok()) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let (parts, mut body) = req.into_parts();
            let mut body_len = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in &parts.headers {
                headers.entry(k.as_str().to_string()).or_default().push(v.to_str().unwrap_or("<bin>").to_string());
            }
            let json = serde_json::json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body_len": body_len,
                "upstream": addr.to_string(),
            "peer": peer.to_string(),
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("connection", "keep-alive, x-hop-from-upstream")
                .header("x-hop-from-upstream", "must not reach the client")
                .header("keep-alive", "timeout=5")
                .body(full(json.to_string()))
                .unwrap()
        })
    })
}

/// A running gateway on 127.0.0.1:0.
pub struct RunningGateway {
    pub addr: SocketAddr,
    /// The TLS listener, when started with [`start_running_tls`].
    pub tls_addr: Option<SocketAddr>,
    pub gateway: Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Asks the server to stop and waits until it has drained.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Asks the server to stop without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running")
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub async fn start_gateway(yaml: &str) -> RunningGateway {
    start_gateway_with(yaml, ServerSettings::default()).await
}

pub async fn start_gateway_with(yaml: &str, settings: ServerSettings) -> RunningGateway {
    let gateway = Gateway::from_yaml(yaml).unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
    start_running(gateway, settings).await
}

/// Serves an already built gateway on 127.0.0.1:0.
pub async fn start_running(gateway: Gateway, settings: ServerSettings) -> RunningGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let g = gateway.clone();
    let task = tokio::spawn(async move {
        g.serve(vec![listener], settings, async {
            let _ = rx.await;
        })
        .await
    });
    RunningGateway { addr, tls_addr: None, gateway, stop: Some(tx), task: Some(task) }
}

/// Serves an already built gateway on a plain and a TLS listener, both on 127.0.0.1:0.
pub async fn start_running_tls(gateway: Gateway, settings: ServerSettings) -> RunningGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls_addr = tls.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let g = gateway.clone();
    let task = tokio::spawn(async move {
        g.serve_tls(vec![listener], vec![tls], settings, async {
            let _ = rx.await;
        })
        .await
    });
    RunningGateway { addr, tls_addr: Some(tls_addr), gateway, stop: Some(tx), task: Some(task) }
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A client that speaks HTTP/2 with prior knowledge (h2c).
pub fn h2_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn echo(&self) -> Echo {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an echo ({e}): {} {}", self.status, String::from_utf8_lossy(&self.body)))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send(req: Request<TestBody>) -> Answer {
    let resp = client().request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer { status: parts.status, headers: parts.headers, body }
}

pub async fn get(url: &str) -> Answer {
    send(Request::get(url).body(full("")).unwrap()).await
}

pub async fn get_host(url: &str, host: &str) -> Answer {
    send(Request::get(url).header("host", host).body(full("")).unwrap()).await
}

/// A body of `remaining` bytes made on the fly, in `chunk`-sized frames: no memory held.
pub struct Generated {
    pub remaining: u64,
    pub chunk: Bytes,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// A closed port: bound, then released.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// Writes raw bytes on a fresh connection and reads until the server closes it (at most 5 s).
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

/// A config with two `protocols: [https]` routes to `upstream`: `/secure` (plain HTTP gets
/// 426) and `/moved` (plain HTTP is redirected with 301).
pub fn https_only_routes(upstream: SocketAddr) -> String {
    format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{upstream}
  routes:
  - {{name: secure, paths: ["/secure"], protocols: [https]}}
  - {{name: moved, paths: ["/moved"], protocols: [https], https_redirect_status_code: 301}}
"#
    )
}

/// An echo upstream that counts the requests it has received (as soon as each arrives).
pub async fn counting_echo_upstream() -> (Upstream, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let echo = echo_handler();
    let up = upstream_with(std::sync::Arc::new(move |req, addr, peer| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        echo(req, addr, peer)
    }))
    .await;
    (up, seen)
}

/// Waits until `count` reaches `n` (at most 10 s): the requests are in flight at the upstream.
pub async fn reached(count: &std::sync::atomic::AtomicUsize, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(tokio::time::Instant::now() < deadline, "the upstream saw {count:?} requests, not {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
