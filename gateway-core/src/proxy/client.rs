//! The pooled keep-alive upstream clients, with nginx-style timeouts on the socket.
//!
//! HTTP/1.1 targets each get their own pool (`super::pool`); HTTP/2 services use hyper-util's
//! client, which pools connections per authority. This module adds a connector whose
//! streams enforce `read_timeout` and `write_timeout` the way Kong and nginx mean them: the
//! longest wait for the next read (write) on the upstream connection. A timer that fires
//! surfaces as an `io::ErrorKind::TimedOut` inside the hyper error, which the proxy answers
//! with 504.
//!
//! Hand-written rather than `tokio-io-timeout` because a proxy needs one twist: every
//! successful write pushes the read deadline back. hyper keeps a read pending on idle pooled
//! connections and while it uploads a request body; without the push-back, a connection that
//! sat idle would give the next request only what is left of the timer, and a slow upload
//! would time out although the upstream reads it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Mutex, Weak};

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, ProxyBody};
use crate::dns::{Dns, DnsResolve};
use crate::tls::UpstreamTls;

use super::pool::TargetPool;

/// hyper-util's pooled client (HTTP/2 services): plain or TLS by the URI's scheme.
pub(crate) type SharedClient = Client<HttpsConnector<TimeoutConnector>, ProxyBody>;

/// The client of every service with the same [`ClientKey`], kept across reloads.
#[derive(Debug, Clone)]
pub(crate) enum UpstreamClient {
    /// HTTP/1.1: a pool per target, handed to the target when the config is compiled.
    H1(Arc<TargetPools>),
    /// HTTP/2 (gRPC): hyper-util's client.
    H2(Arc<SharedClient>),
}

/// How a target's requests are sent, decided when the config is compiled.
#[derive(Debug, Clone)]
pub(crate) enum TargetClient {
    /// HTTP/1.1: the target's own pool.
    Pool(Arc<TargetPool>),
    /// HTTP/2: hyper-util's client, which finds the target's connection by the URI.
    Shared(Arc<SharedClient>),
}

/// The per-target pools of one [`ClientKey`].
pub(crate) struct TargetPools {
    connector: HttpsConnector<TimeoutConnector>,
    limits: Pool,
    /// Held weakly: a pool lives as long as some snapshot's target uses it, so that a reload
    /// keeping a target keeps its connections, and a removed target's close.
    pools: Mutex<HashMap<(Scheme, Authority), Weak<TargetPool>>>,
}

impl std::fmt::Debug for TargetPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetPools").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// The client of one target (at config compile); `dns`: the target's entry when it is
    /// given by host name.
    pub(crate) fn for_target(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        dns: Option<&Arc<crate::dns::DnsEntry>>,
    ) -> TargetClient {
        let pools = match self {
            UpstreamClient::H2(c) => return TargetClient::Shared(c.clone()),
            UpstreamClient::H1(pools) => pools,
        };
        let mut map = pools.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scheme.clone(), authority.clone());
        if let Some(pool) = map.get(&key).and_then(Weak::upgrade) {
            return TargetClient::Pool(pool);
        }
        map.retain(|_, w| w.strong_count() > 0);
        let uri = Uri::from_parts({
            let mut p = http::uri::Parts::default();
            p.scheme = Some(scheme.clone());
            p.authority = Some(authority.clone());
            p.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            p
        })
        .expect("scheme and authority make a URI");
        let pool = Arc::new(TargetPool::new(pools.connector.clone(), uri, pools.limits, dns.cloned()));
        map.insert(key, Arc::downgrade(&pool));
        TargetClient::Pool(pool)
    }
}

/// What makes two services' clients (and pools) different.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey {
    pub(crate) timeouts: Timeouts,
    pub(crate) tls: UpstreamTls,
    /// HTTP/2 only (gRPC): prior knowledge over plain TCP, ALPN `h2` over TLS.
    pub(crate) h2: bool,
    pub(crate) pool: Pool,
}

/// Keep-alive pool limits of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Pool {
    /// Idle keep-alive connections kept per target address (0: no reuse).
    pub(crate) max_idle: usize,
    /// How long an idle keep-alive connection is kept.
    pub(crate) idle_timeout: Duration,
}

/// Timeouts of one service, the key of the shared client cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) read: Duration,
    pub(crate) write: Duration,
}

/// Builds a pooled client for a set of timeouts and TLS settings.
pub(crate) fn build_client(key: &ClientKey, dns: &Arc<Dns>) -> UpstreamClient {
    let connector = build_connector(key, dns);
    // An idle pooled connection must be dropped before its own read timer would fire.
    let limits =
        Pool { max_idle: key.pool.max_idle, idle_timeout: key.pool.idle_timeout.min(key.timeouts.read.mul_f32(0.9)) };
    if !key.h2 {
        return UpstreamClient::H1(Arc::new(TargetPools { connector, limits, pools: Mutex::default() }));
    }
    UpstreamClient::H2(Arc::new(
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(limits.idle_timeout)
            .pool_max_idle_per_host(limits.max_idle)
            .http2_only(true)
            .build(connector),
    ))
}

/// The connector: TCP with timeouts, then TLS for `https` URIs.
fn build_connector(key: &ClientKey, dns: &Arc<Dns>) -> HttpsConnector<TimeoutConnector> {
    let t = key.timeouts;
    let mut http = HttpConnector::new_with_resolver(DnsResolve(dns.clone()));
    http.set_connect_timeout(Some(t.connect));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    // The scheme of the request's URI decides: `http` passes through, `https` gets TLS with
    // the service's verification and SNI from the target's host name.
    http.enforce_http(false);
    let tcp = TimeoutConnector { http, read: t.read, write: t.write };
    let builder = HttpsConnectorBuilder::new().with_tls_config(crate::tls::client_config(&key.tls)).https_or_http();
    if key.h2 { builder.enable_http2().wrap_connector(tcp) } else { builder.enable_http1().wrap_connector(tcp) }
}

/// `HttpConnector` plus read/write timeouts on the stream.
#[derive(Debug, Clone)]
pub(crate) struct TimeoutConnector {
    http: HttpConnector<DnsResolve>,
    read: Duration,
    write: Duration,
}

impl tower_service::Service<Uri> for TimeoutConnector {
    type Response = TimedIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TimedIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let (read, write) = (self.read, self.write);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(TimedIo { io, read: Deadline::new(read), write: Deadline::new(write) })
        })
    }
}

/// A timer armed while an operation is pending and disarmed when it completes.
///
/// Lazy, as nginx's timers are in spirit: arming and pushing back only note when the current
/// wait began (one clock read). The tokio timer is left where it is and moved to the current
/// wait's deadline only when it fires early, so a busy connection costs no timer update per
/// request (several per request before; tokio extends an unfired timer without its lock, but
/// the calls still cost). The timer's deadline never lies after the current wait's, since
/// waits only start later.
///
/// Polling the timer is skipped, too, while it has not fired and already holds the waker of
/// the task polling (a connection's task, after its handshake always the same one): it will
/// wake that task.
#[derive(Debug)]
struct Deadline {
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    /// When the pending operation began waiting; `None` when nothing waits.
    since: Option<Instant>,
    /// The waker the timer was last polled with.
    waker: Option<std::task::Waker>,
}

impl Deadline {
    fn new(limit: Duration) -> Self {
        Deadline { limit, sleep: Box::pin(tokio::time::sleep(limit)), since: None, waker: None }
    }

    /// Called when the operation is pending: arms the timer on the first call and reports
    /// whether it has fired.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if !self.sleep.is_elapsed() && self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        // Past the check above, which a busy connection passes several times a request: the
        // sum checks for overflow and carries nanoseconds, which costs more than the check.
        let due = since + self.limit;
        while self.sleep.as_mut().poll(cx).is_ready() {
            if self.sleep.deadline() >= due {
                return true;
            }
            // An earlier wait's deadline: move on to this wait's, and poll again so that the
            // timer holds this task's waker.
            self.sleep.as_mut().reset(due);
        }
        // A timer polled when the task's budget is used up answers `Pending` without taking
        // the waker (tokio's cooperative scheduling; a `Pending` poll gives its unit back, so
        // this tells exactly): then the next wait polls it again.
        if !tokio::task::coop::has_budget_remaining() {
            self.waker = None;
        } else if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        false
    }

    /// The operation made progress.
    fn disarm(&mut self) {
        self.since = None;
    }

    /// Pushes an armed timer back to a full period from now.
    fn push_back(&mut self) {
        if self.since.is_some() {
            self.since = Some(Instant::now());
        }
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("upstream {what} timed out"))
}

/// An upstream connection with read/write timeouts.
#[derive(Debug)]
pub(crate) struct TimedIo {
    io: TokioIo<TcpStream>,
    read: Deadline,
    write: Deadline,
}

impl Connection for TimedIo {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read.disarm();
                Poll::Ready(r)
            }
            Poll::Pending if this.read.poll_expired(cx) => Poll::Ready(Err(timed_out("read"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl TimedIo {
    /// Bookkeeping after a write or flush: `wrote` says whether bytes went out. Only written
    /// bytes push the read deadline back; hyper flushes on every turn of its loop, and a flush
    /// with nothing to send is no sign of a live upstream.
    fn after_write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>, wrote: bool) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.write.disarm();
                if wrote && r.is_ok() {
                    self.read.push_back();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.write.poll_expired(cx) => Poll::Ready(Err(timed_out("write"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for TimedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, r, true)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.after_write(cx, r, false)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, r, true)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use hyper::rt::Read as _;

    use super::*;

    /// A read that first waits with the task's budget used up (the timer cannot take the
    /// waker then) must still time out.
    #[tokio::test]
    async fn a_read_deadline_armed_without_budget_still_fires() {
        // An upstream that accepts and never sends anything.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let _held = listener.accept().await.unwrap();
        let limit = Duration::from_millis(200);
        let mut io = TimedIo { io: TokioIo::new(stream), read: Deadline::new(limit), write: Deadline::new(limit) };
        let mut first = true;
        let read = std::future::poll_fn(|cx| {
            if std::mem::take(&mut first) {
                loop {
                    let mut spend = std::pin::pin!(tokio::task::coop::consume_budget());
                    if spend.as_mut().poll(cx).is_pending() {
                        break;
                    }
                }
                assert!(!tokio::task::coop::has_budget_remaining());
            }
            let mut buf = [MaybeUninit::uninit(); 16];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut buf);
            Pin::new(&mut io).poll_read(cx, buf.unfilled())
        });
        let result = tokio::time::timeout(Duration::from_secs(3), read).await.expect("the read deadline fired");
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
