//! The HTTP/1.1 upstream connection pool: one per target, found when the config is compiled.
//!
//! Hand-written over `hyper::client::conn::http1` rather than left to hyper-util's legacy
//! `Client`, which finds a pool for every request by hashing the URI's authority (SipHash, a
//! byte per call) and spawns a task per request to put the connection back once it is ready:
//! together about a sixth of a proxied request's instructions. Here each target holds its
//! pool, and the response body hands the connection back when it ends (see
//! `UpstreamBody`). What that client does for a proxy is kept:
//! - a request that never reached a reused connection (the upstream closed it meanwhile) is
//!   sent again on another, as hyper-util's `retry_canceled_requests` does;
//! - at most `max_idle` idle connections per target; one idle for `idle_timeout` is never
//!   handed out again, and a task closes it within a quarter of that period;
//! - after a DNS change, connections to addresses no longer in the answer are not reused;
//! - TLS through the same connector, upgrades (WebSockets) through hyper's.
//!
//! One difference: hyper-util raced a new connection against a busy one becoming idle and
//! took whichever came first; here a request that finds no idle connection opens one, so a
//! burst may open a few more connections than before (nginx's `keepalive` behaves the same).
//!
//! HTTP/2 (gRPC) services stay on hyper-util's client: there a target shares one connection,
//! which no per-request checkout of this kind would help.

use std::collections::VecDeque;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpInfo};
use tokio::time::Instant;

use super::client::{Pool, TimeoutConnector};
use crate::body::{BoxError, ProxyBody};
use crate::dns::DnsEntry;

/// Idle connections of one target, and how to open more.
pub(crate) struct TargetPool {
    connector: HttpsConnector<TimeoutConnector>,
    /// `scheme://authority` of the target: what the connector dials.
    uri: Uri,
    limits: Pool,
    /// The target's DNS entry when it is given by host name.
    dns: Option<Arc<DnsEntry>>,
    state: Mutex<Idle>,
}

struct Idle {
    /// Most recently used last: checkouts take the warmest connection, and the coldest ones
    /// age out.
    conns: VecDeque<IdleConn>,
    /// Whether a task is evicting expired connections.
    reaping: bool,
}

struct IdleConn {
    conn: Conn,
    since: Instant,
}

/// One open connection to a target.
struct Conn {
    sender: SendRequest<ProxyBody>,
    /// The address it goes to (for retiring connections after a DNS change).
    remote: Option<IpAddr>,
}

impl std::fmt::Debug for TargetPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetPool").field("uri", &self.uri).field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// Why sending to the upstream failed.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent.
    Connect(BoxError),
    /// The exchange on an open connection failed.
    Send(hyper::Error),
    /// hyper-util's client failed (HTTP/2 services).
    Client(hyper_util::client::legacy::Error),
}

impl SendError {
    /// Nothing reached the upstream: no connection could be made.
    pub(crate) fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Send(_) => false,
            SendError::Client(e) => e.is_connect(),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(_) => f.write_str("upstream connect failed"),
            SendError::Send(_) => f.write_str("upstream exchange failed"),
            SendError::Client(_) => f.write_str("upstream client failed"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(&**e),
            SendError::Send(e) => Some(e),
            SendError::Client(e) => Some(e),
        }
    }
}

impl TargetPool {
    pub(crate) fn new(
        connector: HttpsConnector<TimeoutConnector>,
        uri: Uri,
        limits: Pool,
        dns: Option<Arc<DnsEntry>>,
    ) -> Self {
        let state = Mutex::new(Idle { conns: VecDeque::new(), reaping: false });
        TargetPool { connector, uri, limits, dns, state }
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or a new one.
    ///
    /// On an idle connection the request is handed over at once, and the future waits for
    /// hyper's answer beside the connection (see [`Sending`]); without one, the future is the
    /// boxed [`Self::send_looping`].
    pub(crate) fn send(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + '_ {
        // A 2xx answer to CONNECT turns the connection into a tunnel, as a 101 does.
        let connect = req.method() == http::Method::CONNECT;
        match self.checkout() {
            Some(mut conn) => {
                let answer = conn.sender.try_send_request(req);
                Sending::Reused { answer, conn: Some(conn), pool: self, connect }
            }
            // Boxed: a connection's set-up (TLS state included) would otherwise make every
            // request's future kilobytes larger.
            None => Sending::Looping { fut: Box::pin(self.send_looping(req)) },
        }
    }

    /// [`Self::send`] the long way: on an idle connection or a new one, and on another when a
    /// reused one turns out to have closed before the request reached it.
    ///
    /// Not an `async fn`: that would move the request from its argument into a local, and keep
    /// both in the future's state.
    #[allow(clippy::manual_async_fn)] // on purpose, as said above
    fn send_looping(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + '_ {
        async move {
            let connect = req.method() == http::Method::CONNECT;
            loop {
                let (mut conn, reused) = match self.checkout() {
                    Some(conn) => (conn, true),
                    None => (self.connect().await?, false),
                };
                match conn.sender.try_send_request(req).await {
                    Ok(resp) => return Ok(self.answered(resp, conn, connect)),
                    Err(mut err) => match err.take_message() {
                        // It never reached the connection, which had closed meanwhile: another
                        // one gets it. A new connection that fails this way is a real failure.
                        Some(back) if reused => {
                            tracing::debug!(upstream = %self.uri, error = %err.error(), "pooled connection was closed; trying another");
                            req = back;
                        }
                        _ => return Err(SendError::Send(err.into_error())),
                    },
                }
            }
        }
    }

    /// The upstream's answer on `conn`, whose body gives the connection back when it ends,
    /// unless the exchange made it a tunnel.
    fn answered(self: &Arc<Self>, resp: Response<Incoming>, conn: Conn, connect: bool) -> Response<UpstreamBody> {
        // An upgraded connection is the tunnel's now; it never comes back.
        let upgraded =
            resp.status() == http::StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
        let release = (!upgraded).then(|| Release { conn, pool: self.clone() });
        resp.map(|body| UpstreamBody { body, release })
    }

    fn checkout(&self) -> Option<Conn> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.conns.is_empty() {
            return None;
        }
        // Idle too long: the upstream may be closing it right now (the idle timeout is meant
        // to stay below the upstream's own keep-alive timeout).
        let now = Instant::now();
        while let Some(idle) = state.conns.pop_back() {
            if now.duration_since(idle.since) < self.limits.idle_timeout && self.reusable(&idle.conn) {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Open, and after a DNS change still going to an address in the answer.
    fn reusable(&self, conn: &Conn) -> bool {
        let retired =
            || self.dns.as_ref().is_some_and(|e| e.retiring() && conn.remote.is_some_and(|ip| !e.current(ip)));
        !conn.sender.is_closed() && !retired()
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let io = tower_service::Service::call(&mut self.connector.clone(), self.uri.clone())
            .await
            .map_err(SendError::Connect)?;
        let mut extras = http::Extensions::new();
        io.connected().get_extras(&mut extras);
        let remote = extras.get::<HttpInfo>().map(|i| i.remote_addr().ip());
        let (sender, conn) =
            hyper::client::conn::http1::Builder::new().handshake(io).await.map_err(|e| SendError::Connect(e.into()))?;
        let uri = self.uri.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %uri, error = %e, "upstream connection ended");
            }
        });
        Ok(Conn { sender, remote })
    }

    /// Whether idle connections are kept at all.
    fn keeps_idle(&self) -> bool {
        self.limits.max_idle > 0 && !self.limits.idle_timeout.is_zero()
    }

    /// Keeps a connection that is ready for another request, if there is room (callers have
    /// checked that the pool keeps idle connections at all).
    fn put(self: &Arc<Self>, conn: Conn) {
        if !self.reusable(&conn) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let since = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.conns.len() >= self.limits.max_idle {
            // Full: the coldest goes, as nginx's `keepalive` does.
            state.conns.pop_front();
        }
        state.conns.push_back(IdleConn { conn, since });
        if !state.reaping {
            state.reaping = true;
            runtime.spawn(reap(Arc::downgrade(self), self.limits.idle_timeout));
        }
    }
}

pin_project_lite::pin_project! {
    /// [`TargetPool::send`]'s future. Written out by hand so that a request on an idle
    /// connection is handed to it before the future exists: an `async` block would keep the
    /// request (272 bytes) in its state beside hyper's answer future, which holds a slot for
    /// it too, and every request's future is copied as it is moved.
    #[project = SendingProj]
    enum Sending<'a, F> {
        /// Sent on a reused connection; hyper's answer pending.
        Reused { #[pin] answer: F, conn: Option<Conn>, pool: &'a Arc<TargetPool>, connect: bool },
        /// No idle connection, or the reused one had closed.
        Looping { fut: Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a>> },
    }
}

impl<F> Future for Sending<'_, F>
where
    F: Future<Output = Result<Response<Incoming>, TrySendError<Request<ProxyBody>>>>,
{
    type Output = Result<Response<UpstreamBody>, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (pool, back) = match self.as_mut().project() {
            SendingProj::Looping { fut } => return fut.as_mut().poll(cx),
            SendingProj::Reused { answer, conn, pool, connect } => match ready!(answer.poll(cx)) {
                Ok(resp) => {
                    let conn = conn.take().expect("Sending polled after it ended");
                    return Poll::Ready(Ok(pool.answered(resp, conn, *connect)));
                }
                Err(mut err) => match err.take_message() {
                    // It never reached the connection, which had closed meanwhile: another
                    // one gets it.
                    Some(back) => {
                        tracing::debug!(upstream = %pool.uri, error = %err.error(), "pooled connection was closed; trying another");
                        (*pool, back)
                    }
                    None => return Poll::Ready(Err(SendError::Send(err.into_error()))),
                },
            },
        };
        self.set(Sending::Looping { fut: Box::pin(pool.send_looping(back)) });
        self.poll(cx)
    }
}

/// Closes idle connections once they have been idle for `idle_timeout` (checking four times
/// per period, so none lives more than a quarter period longer); ends when none is left.
async fn reap(pool: Weak<TargetPool>, period: Duration) {
    loop {
        tokio::time::sleep((period / 4).max(Duration::from_millis(5))).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let mut state = pool.state.lock().unwrap_or_else(|e| e.into_inner());
        state.conns.retain(|c| now.duration_since(c.since) < period && !c.conn.sender.is_closed());
        if state.conns.is_empty() {
            state.reaping = false;
            return;
        }
    }
}

/// A connection on loan to a response: back to its pool when the body ends.
struct Release {
    conn: Conn,
    pool: Arc<TargetPool>,
}

impl Release {
    fn give_back(mut self) {
        if !self.pool.keeps_idle() {
            // Dropped: hyper closes the connection once its exchange is over.
        } else if self.conn.sender.is_ready() {
            self.pool.put(self.conn);
        } else if !self.conn.sender.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The connection task has not seen the end of the exchange yet (it runs on
            // another worker), or the request body is still going up: wait for it.
            runtime.spawn(async move {
                if std::future::poll_fn(|cx| self.conn.sender.poll_ready(cx)).await.is_ok() {
                    self.pool.put(self.conn);
                }
            });
        }
    }
}

/// An upstream response body. Gives its connection back to the pool when it ends.
pub struct UpstreamBody {
    body: Incoming,
    release: Option<Release>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("body", &self.body).finish_non_exhaustive()
    }
}

impl From<Incoming> for UpstreamBody {
    /// A body with no connection to give back.
    fn from(body: Incoming) -> Self {
        UpstreamBody { body, release: None }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            // Broken: hyper closes the connection.
            Some(Err(_)) => this.release = None,
            // Trailers end a body, though `is_end_stream` does not say so: hyper's server
            // writes them and drops the body without polling it again.
            Some(Ok(f)) if !f.is_trailers() && !this.body.is_end_stream() => {}
            _ => {
                if let Some(r) = this.release.take() {
                    r.give_back();
                }
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body hyper never polled because it was empty (204, HEAD, `Content-Length: 0`)
        // ends here. One dropped before its end leaves the connection mid-response: hyper
        // closes it once its sender is gone too.
        if let Some(r) = self.release.take()
            && http_body::Body::is_end_stream(&self.body)
        {
            r.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;

    use super::super::client::{ClientKey, TargetClient, Timeouts, build_client};
    use super::*;

    /// A body of unknown length (so chunked on HTTP/1.1) made of these frames.
    struct Frames(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

    impl http_body::Body for Frames {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.get_mut().0.pop_front().map(Ok))
        }
    }

    /// An HTTP/1.1 upstream answering `ok`; counts the connections it accepted.
    async fn upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                // `/trailers` ends its (chunked) body with trailers.
                let ok = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let mut frames =
                        std::collections::VecDeque::from([http_body::Frame::data(bytes::Bytes::from("ok"))]);
                    if req.uri().path() == "/trailers" {
                        let mut t = http::HeaderMap::new();
                        t.insert("x-checksum", http::HeaderValue::from_static("1"));
                        frames.push_back(http_body::Frame::trailers(t));
                    }
                    let body = Frames(frames);
                    // hyper sends only the trailers the head declares.
                    let resp = Response::builder().header("trailer", "x-checksum").body(body).unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), ok));
            }
        });
        (addr, accepted)
    }

    fn pool_for(addr: std::net::SocketAddr) -> Arc<TargetPool> {
        let limit = Duration::from_secs(5);
        let key = ClientKey {
            timeouts: Timeouts { connect: limit, read: limit, write: limit },
            tls: Default::default(),
            h2: false,
            pool: Pool { max_idle: 8, idle_timeout: limit },
        };
        let client = build_client(&key, &crate::dns::Dns::new(Vec::new()));
        match client.for_target(&http::uri::Scheme::HTTP, &addr.to_string().parse().unwrap(), None) {
            TargetClient::Pool(pool) => pool,
            TargetClient::Shared(_) => panic!("an HTTP/1.1 target gets a pool"),
        }
    }

    /// The race hyper-util's `retry_canceled_requests` covers, made deterministic: a pooled
    /// connection looks open at checkout, the request is queued on it, and the connection
    /// ends before writing it (here its task was never run and is dropped). hyper hands the
    /// request back; it must go on a new connection instead of failing.
    #[tokio::test]
    async fn a_request_queued_on_a_pooled_connection_that_then_ends_goes_on_a_new_one() {
        let (addr, accepted) = upstream().await;
        let pool = pool_for(addr);
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake::<_, ProxyBody>(TokioIo::new(stream)).await.unwrap();
        pool.put(Conn { sender, remote: None });
        assert_eq!(pool.state.lock().unwrap().conns.len(), 1, "the connection is pooled");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(conn);
        });
        let req = Request::builder().uri("/").header("host", "upstream").body(ProxyBody::Empty).unwrap();
        let resp = pool.send(req).await.expect("sent again on a new connection");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// hyper's server stops polling a body once it has written its trailers, so a trailers
    /// frame must give the connection back by itself.
    #[tokio::test]
    async fn a_body_ending_in_trailers_gives_its_connection_back() {
        let (addr, accepted) = upstream().await;
        let pool = pool_for(addr);
        for _ in 0..3 {
            let req = Request::builder()
                .uri("/trailers")
                .header("host", "upstream")
                .header("te", "trailers")
                .body(ProxyBody::Empty)
                .unwrap();
            let mut body = pool.send(req).await.unwrap().into_body();
            let mut data = Vec::new();
            loop {
                let frame = body.frame().await.expect("a trailers frame before the end").unwrap();
                match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => {
                        assert_eq!(f.trailers_ref().unwrap()["x-checksum"], "1");
                        break;
                    }
                }
            }
            assert_eq!(data, b"ok");
            // Dropped after the trailers without polling for the end, as hyper's server does.
            drop(body);
            tokio::time::timeout(Duration::from_secs(2), async {
                while pool.state.lock().unwrap().conns.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the connection is back in the pool");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection served all three");
    }
}
