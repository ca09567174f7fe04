//! The built-in server: HTTP/1.1 and HTTP/2 on every listener (prior knowledge, "h2c", on
//! plain ones; ALPN on TLS ones, with certificates chosen by SNI from the config), client-side
//! limits on by default, and graceful shutdown.
//!
//! ```no_run
//! use gateway_core::{Gateway, server::ServerSettings};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let gateway = Gateway::from_yaml("_format_version: \"3.0\"\n")?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! gateway.serve(vec![listener], ServerSettings::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! }).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;
use crate::body::{GatewayBody, ProxyBody};
use crate::proxy::{ConnInfo, ConnValues, handle};

/// Client-side limits and timeouts of the server. Every limit has a safe default.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Time a client has to send a complete request head, counted from the moment the
    /// connection is open or idle after a response; a connection whose head is late is closed
    /// without an answer. On plain HTTP/1.1 connections released when idle (the default) the
    /// first head's time includes the wait for the connection's first bytes; elsewhere that
    /// wait (or the TLS handshake) has a header timeout of its own. On HTTP/1.1 this is also
    /// the keep-alive idle timeout: an idle connection that sends nothing for this long is
    /// closed. Default 10 s.
    pub header_read_timeout: Duration,
    /// How long in all a client may keep the gateway waiting for its request body (`None`: no
    /// limit): the waits for its bytes summed over the whole body, from the first read, so a
    /// client trickling its body cannot hold a connection and an upstream request for ever,
    /// while time the upstream takes does not count. Past it the answer is 408 and the
    /// connection is closed (on HTTP/2, the stream). Routes to gRPC services are exempt (a
    /// client stream lasts as long as its call). Raise it for large uploads over slow links.
    /// Default 60 s.
    pub body_read_timeout: Option<Duration>,
    /// Largest request head in bytes (request line plus headers); larger heads get 431.
    /// Default 32 KiB.
    pub max_header_bytes: usize,
    /// Most request headers; more get 431. Default 100.
    pub max_headers: usize,
    /// HTTP/2: most concurrent streams per connection. Default 256.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2: interval of keep-alive pings, which also close dead connections. Default 20 s.
    pub http2_keepalive_interval: Option<Duration>,
    /// On shutdown, how long in-flight requests may take to finish. Default 30 s.
    pub shutdown_grace: Duration,
    /// HTTP/1.1 over plain TCP: a keep-alive connection idle this long (nothing read, no
    /// request or response in flight, nothing waiting to be written) gives back its buffers
    /// and request state and keeps only its socket until the client sends again, as nginx does
    /// with its keep-alive connections. An idle connection then costs about 3 KiB of heap instead of
    /// about 14 KiB. Checked by a timer per connection that fires once a period while it is
    /// open (or four times per header timeout, if that is more often; the same timer times the
    /// connection's request heads), so a connection is released between one and two periods
    /// after it went idle. `None` (or zero): never released. Default 100 ms.
    pub release_idle_after: Option<Duration>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Some(Duration::from_secs(60)),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            http2_max_concurrent_streams: 256,
            http2_keepalive_interval: Some(Duration::from_secs(20)),
            shutdown_grace: Duration::from_secs(30),
            release_idle_after: Some(Duration::from_millis(100)),
        }
    }
}

impl ServerSettings {
    /// `header_timer`: whether hyper times request heads. Plain HTTP/1.1 connections that are
    /// released when idle time them in [`serve_plain_http1`] instead.
    fn http1(&self, header_timer: bool) -> http1::Builder {
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(header_timer.then_some(self.header_read_timeout))
            // The exact limit on the head; the buffer bound alone is approximate, as hyper
            // reads into whatever capacity its buffer has grown to.
            .max_header_size(self.max_header_bytes)
            .max_buf_size(self.max_header_bytes.max(8192))
            .max_headers(self.max_headers)
            .keep_alive(true);
        b
    }

    fn http2(&self) -> http2::Builder<TokioExecutor> {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_concurrent_streams)
            .keep_alive_interval(self.http2_keepalive_interval)
            // Also bounds a CONTINUATION flood: h2 refuses a header block of more frames
            // than this size needs, and answers GOAWAY.
            .max_header_list_size(self.max_header_bytes.min(u32::MAX as usize) as u32)
            // Rapid reset (CVE-2023-44487): a client resetting more than 20 streams before
            // they are served gets GOAWAY. Local error resets (CVE-2025-8671, "MadeYouReset")
            // are capped too. Both are h2's defaults, set here so that they stay on.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(1024);
        b
    }
}

/// Waits until the first bytes of a connection tell HTTP/1 from HTTP/2's preface (peeking, so
/// nothing is consumed): `Some(true)` for HTTP/2, `Some(false)` for HTTP/1, `None` when the
/// client closed first.
///
/// Deciding here rather than in hyper-util's auto builder saves memory on every connection:
/// the auto builder reads the first bytes itself and replays them, so hyper's first read
/// returns only those and its 8 KiB read buffer grows to 16 KiB for the rest of the head, and
/// stays so for the life of the keep-alive connection.
async fn protocol_decidable(stream: &tokio::net::TcpStream) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) if n >= PREFACE.len() => return Some(buf == PREFACE),
            Ok(n) if !PREFACE.starts_with(&buf[..n]) => return Some(false),
            // Part of the preface so far: the rest is on its way (or never comes, and the
            // caller's timeout ends the wait). Peeking again at once would spin.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The connection builders: one per protocol, chosen by the first bytes on plain listeners
/// (HTTP/1.1 or h2c) and by ALPN on TLS listeners.
struct Builders {
    h1: http1::Builder,
    /// HTTP/1.1 without hyper's header timer, for the connections [`serve_plain_http1`] serves.
    h1_released: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// Where shutdown is, as connections see it through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Finish in-flight requests, take no new ones.
    Draining,
    /// The grace period is over: close now.
    Closing,
}

/// Waits until shutdown reaches `phase` (or the server is gone); cheap to poll again. A
/// connection's `select!` polls this whenever the connection's task wakes, a few times a
/// request, and a watch wait takes the channel's lock each time (about 500 instructions a
/// request). Once a poll of the wait has registered the task's waker, the wait is polled again
/// only when the channel has changed since (one atomic load otherwise), and a change wakes the
/// task through that waker. A poll made with the task's coop budget used up registers nothing
/// (tokio answers `Pending` at once then), so it does not count.
async fn reached(watch: &mut tokio::sync::watch::Receiver<Phase>, phase: Phase) {
    let probe = watch.clone();
    let wait = watch.wait_for(|p| *p >= phase);
    tokio::pin!(wait);
    let mut registered = false;
    std::future::poll_fn(|cx| {
        if registered && !probe.has_changed().unwrap_or(true) {
            return std::task::Poll::Pending;
        }
        registered = tokio::task::coop::has_budget_remaining();
        wait.as_mut().poll(cx).map(|_| ())
    })
    .await
}

/// Serves one connection with the builder of its protocol until it ends, or until shutdown
/// is signalled, then lets it finish gracefully (in-flight requests complete, keep-alive
/// ends), or closes it when the grace period is over.
async fn serve_connection<I, S>(
    builders: &Builders,
    h2: bool,
    io: I,
    svc: S,
    mut shutdown: tokio::sync::watch::Receiver<Phase>,
    client: std::net::SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::body::GatewayBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    if h2 {
        // Boxed: HTTP/2's connection state is several times HTTP/1's, and the larger branch
        // would size the task of every HTTP/1 connection.
        let conn = builders.h2.serve_connection(io, svc);
        Box::pin(drive(conn, |c| c.graceful_shutdown(), &mut shutdown, client)).await
    } else {
        let conn = builders.h1.serve_connection(io, svc).with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), &mut shutdown, client).await
    }
}

/// Drives a connection to its end, or until shutdown begins; then [`drain`]s it.
///
/// Hand-written rather than hyper-util's `GracefulShutdown`: its watcher takes hyper-util's
/// auto connections and hyper's plain HTTP/1 ones, not hyper's HTTP/1 connection with
/// upgrades, which WebSocket tunnels need.
async fn drive<C>(
    conn: C,
    graceful: fn(Pin<&mut C>),
    shutdown: &mut tokio::sync::watch::Receiver<Phase>,
    client: std::net::SocketAddr,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    // `biased`: polled in order, the connection first, without the random pick of a first
    // branch that `select!` makes on each of the task's wake-ups (several per request). The
    // others are seen whenever the connection waits, which is all they need.
    tokio::select! {
        biased;
        r = conn.as_mut() => ended(r, client),
        _ = reached(shutdown, Phase::Draining) => drain(conn, graceful, shutdown, client).await,
    }
}

/// Tells a connection to finish gracefully (in-flight requests complete, keep-alive ends)
/// and waits for it, or closes it when the grace period is over.
async fn drain<C>(
    mut conn: Pin<&mut C>,
    graceful: fn(Pin<&mut C>),
    shutdown: &mut tokio::sync::watch::Receiver<Phase>,
    client: std::net::SocketAddr,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    graceful(conn.as_mut());
    tokio::select! {
        r = conn.as_mut() => ended(r, client),
        // Dropping the connection closes it, requests in flight or not.
        _ = reached(shutdown, Phase::Closing) => {
            tracing::debug!(%client, "closed at the end of the shutdown grace period");
        }
    }
}

fn ended(result: Result<(), hyper::Error>, client: std::net::SocketAddr) {
    if let Err(e) = result {
        tracing::debug!(%client, error = %e, "connection ended with an error");
    }
}

/// What the task of an HTTP/1 connection needs to know to tell that the connection is idle,
/// which hyper does not say: shared by the connection's socket ([`Watched`]), its service
/// (which marks every request and its bodies with a [`ConnHold`]) and the task.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Requests, request bodies still to come and response bodies alive.
    held: AtomicUsize,
    /// Bytes came from the client since the task last looked.
    read: AtomicBool,
    /// A whole request head came (the service was called) since the task last looked.
    headed: AtomicBool,
    /// The last write to the client had to wait.
    write_blocked: AtomicBool,
    /// The connection was about to be released with part of a request head in hand: not
    /// again until a whole head has come (releasing it mid-head would only cost a new hyper
    /// connection), and the head's time keeps running.
    replayed: AtomicBool,
}

/// Marks a client connection busy while it lives: kept by a request's future, then by its
/// response body, and by its request body while that is still to come.
#[derive(Debug)]
pub(crate) struct ConnHold(Arc<Activity>);

impl ConnHold {
    fn new(activity: &Arc<Activity>) -> ConnHold {
        activity.held.fetch_add(1, Ordering::Relaxed);
        ConnHold(activity.clone())
    }
}

impl Drop for ConnHold {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket of a plain HTTP/1 connection: notes reads and waiting writes in the
/// connection's [`Activity`], and gives back first the bytes of a request head that hyper had
/// read when its connection was released.
struct Watched {
    stream: TcpStream,
    replay: Bytes,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() != before {
            this.activity.read.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.activity.write_blocked.store(r.is_pending(), Ordering::Relaxed);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.activity.write_blocked.store(r.is_pending(), Ordering::Relaxed);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The waker of a connection's release timer: notes that the timer fired, then wakes the
/// connection's task. The task wakes several times a request for its socket and its requests,
/// and polling tokio's timer on each of those (its entry's state, the waker registered again)
/// cost about 240 instructions a request; with this the task polls the timer only after it
/// fired, and otherwise reads one flag.
struct TimerWake {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for TimerWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// What [`watch`] saw on a plain HTTP/1 connection.
enum Quiet {
    /// Idle for `release_after`, or for the header timeout (the keep-alive time) if that is
    /// shorter: nothing read, nothing held, no write waiting.
    Idle,
    /// A request head has been on its way for the header timeout.
    HeadTimedOut,
}

/// Watches a plain HTTP/1 connection from its task, with one timer that fires once a
/// `tick` (reset then, whatever the connection does), and resolves once the connection has
/// been idle for `release_after` or `header_timeout`, whichever is shorter (at least that, in
/// whole ticks), or a request head has been coming for `header_timeout` (give or take a tick).
///
/// The head's clock is `head_since`, kept by the caller across the hyper connections a
/// released connection goes through: it runs while bytes come (or wait in hand) and no
/// request is made of them, from the tick before the first of them (from the connection's
/// accept for its first head), and stops when a request comes. Timed here rather than by
/// hyper's header timer, which a hyper connection arms for every request head and drops once
/// the head is read: a tokio timer registered, polled and deregistered per request, about 700
/// instructions a request, where this costs nothing per request.
async fn watch(
    activity: &Activity,
    tick: Duration,
    release_after: Duration,
    header_timeout: Duration,
    head_since: &mut Option<tokio::time::Instant>,
) -> Quiet {
    // `fired` starts set: the first poll registers the timer.
    let timer = Arc::new(TimerWake { fired: AtomicBool::new(true), task: AtomicWaker::new() });
    let waker = Waker::from(timer.clone());
    let mut last = tokio::time::Instant::now();
    let sleep = tokio::time::sleep_until(last + tick);
    tokio::pin!(sleep);
    let mut quiet_since = last;
    std::future::poll_fn(|cx| {
        while timer.fired.swap(false, Ordering::Acquire) {
            timer.task.register(cx.waker());
            // A poll without coop budget left wakes `waker` at once, so it is polled again.
            ready!(sleep.as_mut().poll(&mut Context::from_waker(&waker)));
            let now = tokio::time::Instant::now();
            let read = activity.read.swap(false, Ordering::Relaxed);
            let held = activity.held.load(Ordering::Relaxed) != 0;
            let replayed = activity.replayed.load(Ordering::Relaxed);
            if activity.headed.swap(false, Ordering::Relaxed) || held {
                *head_since = None;
            } else {
                if read || replayed {
                    // Bytes came after the last tick, or part of a head is in hand, and no
                    // request was made of them: a head is on its way.
                    head_since.get_or_insert(last);
                }
                // Checked on quiet ticks too, so that a head that stopped coming is cut off on
                // time, not only once the connection has been released and the head replayed.
                if head_since.is_some_and(|since| now.duration_since(since) >= header_timeout) {
                    return Poll::Ready(Quiet::HeadTimedOut);
                }
            }
            if read || held || replayed || activity.write_blocked.load(Ordering::Relaxed) {
                quiet_since = now;
            } else if now.duration_since(quiet_since) >= release_after.min(header_timeout) {
                // Idle for the release, or for the keep-alive time if that comes first (the
                // caller then closes the connection).
                return Poll::Ready(Quiet::Idle);
            }
            last = now;
            sleep.as_mut().reset(now + tick);
            timer.fired.store(true, Ordering::Relaxed);
        }
        Poll::Pending
    })
    .await
}

/// How a connection's serving ended, or why it paused.
enum Next {
    Ended(Result<(), hyper::Error>),
    Draining,
    Quiet(Quiet),
}

/// Serves a plain HTTP/1 connection like [`serve_connection`], and releases it whenever it
/// is idle for `release_after` (see [`ServerSettings::release_idle_after`]): hyper's
/// connection, with its read and write buffers and its cached header map, is taken apart,
/// and only the socket, the service and this task stay until the client sends again, the
/// keep-alive time is up, or shutdown begins. A new hyper connection then serves on.
#[allow(clippy::too_many_arguments)] // one call site
async fn serve_plain_http1<S>(
    builders: &Builders,
    stream: TcpStream,
    mut svc: S,
    mut shutdown: tokio::sync::watch::Receiver<Phase>,
    client: std::net::SocketAddr,
    activity: Arc<Activity>,
    release_after: Duration,
    header_timeout: Duration,
    accepted: tokio::time::Instant,
    shared: &Shared,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = GatewayBody> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    let mut io = Watched { stream, replay: Bytes::new(), activity: activity.clone() };
    // The first head's time counts from the accept, the wait for its first bytes included.
    let mut head_since = Some(accepted);
    // Often enough for the header timeout to be kept within a quarter of itself.
    let tick = release_after.min(header_timeout / 4).max(Duration::from_millis(1));
    loop {
        let mut conn = builders.h1_released.serve_connection(TokioIo::new(io), svc).with_upgrades();
        // `biased`, as in `drive`.
        let next = tokio::select! {
            biased;
            r = &mut conn => Next::Ended(r),
            _ = reached(&mut shutdown, Phase::Draining) => Next::Draining,
            q = watch(&activity, tick, release_after, header_timeout, &mut head_since) => Next::Quiet(q),
        };
        match next {
            Next::Ended(r) => return ended(r, client),
            Next::Draining => {
                return drain(Pin::new(&mut conn), |c| c.graceful_shutdown(), &mut shutdown, client).await;
            }
            Next::Quiet(Quiet::HeadTimedOut) => {
                // Closed without an answer, as hyper's header timer does.
                tracing::debug!(%client, "no request head within the header timeout; closing");
                return;
            }
            Next::Quiet(Quiet::Idle) => {}
        }
        // Idle: nothing in flight, so nothing of hyper's state is lost. `None` only after an
        // upgrade, which ends the connection's future first.
        let Some(hyper::server::conn::http1::Parts { io: parts_io, read_buf, service, .. }) = conn.into_parts() else {
            return;
        };
        svc = service;
        io = parts_io.into_inner();
        if !read_buf.is_empty() {
            io.replay = read_buf;
            activity.replayed.store(true, Ordering::Relaxed);
            continue;
        }
        // Empty, but it holds hyper's 8 KiB read buffer until dropped.
        drop(read_buf);
        shared.stats.connections_idle_released.fetch_add(1, Ordering::Relaxed);
        // The connection went idle at least one period ago; the keep-alive time counts from then.
        let woke = tokio::select! {
            biased;
            _ = reached(&mut shutdown, Phase::Draining) => false,
            r = tokio::time::timeout(header_timeout.saturating_sub(release_after), io.stream.readable()) => {
                matches!(r, Ok(Ok(())))
            }
        };
        shared.stats.connections_idle_released.fetch_sub(1, Ordering::Relaxed);
        if !woke {
            tracing::debug!(%client, "idle keep-alive connection closed");
            return;
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
/// within [`ServerSettings::shutdown_grace`], and returns.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    tls_listeners: Vec<TcpListener>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let builders =
        Arc::new(Builders { h1: settings.http1(true), h1_released: settings.http1(false), h2: settings.http2() });
    let acceptor = if tls_listeners.is_empty() {
        None
    } else {
        let fallback = crate::tls::self_signed().map_err(io::Error::other)?;
        let certs = shared.clone();
        let resolver =
            crate::tls::SnapshotCerts { current: Box::new(move || certs.snapshot.load().certs.clone()), fallback };
        if shared.snapshot.load().certs.is_empty() {
            tracing::warn!("no certificates configured: TLS listeners serve a self-signed certificate for `localhost`");
        }
        let config = crate::tls::server_config(Arc::new(resolver)).map_err(io::Error::other)?;
        Some(tokio_rustls::TlsAcceptor::from(config))
    };
    for route in shared.snapshot.load().routes.iter() {
        if let Some(service) = &route.service {
            service.balancer.ensure_checks_started();
        }
    }
    // Connections hold a receiver; shutdown moves them to draining, then to closing once the
    // grace period is over, and waits until all are dropped.
    let (graceful, _) = tokio::sync::watch::channel(Phase::Serving);
    let mut accept_tasks = tokio::task::JoinSet::new();
    let all = listeners.into_iter().map(|l| (l, None)).chain(tls_listeners.into_iter().map(|l| (l, acceptor.clone())));
    for (listener, tls) in all {
        let local = listener.local_addr()?;
        tracing::info!(%local, tls = tls.is_some(), "listening");
        let shared = shared.clone();
        let builders = builders.clone();
        let watcher = graceful.subscribe();
        let header_timeout = settings.header_read_timeout;
        let body_timeout = settings.body_read_timeout;
        let release_after = settings.release_idle_after;
        accept_tasks.spawn(async move {
            loop {
                let (stream, client) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%local, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let accepted = tokio::time::Instant::now();
                let _ = stream.set_nodelay(true);
                let conn_info = ConnInfo { client, local, tls: tls.is_some() };
                let shared = shared.clone();
                let builders = builders.clone();
                let mut watcher = watcher.clone();
                let tls = tls.clone();
                shared.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
                let open = OpenConnection::new(shared.clone());
                tokio::spawn(async move {
                    let _open = open;
                    let values = ConnValues::new(&conn_info, &shared.trusted_ips);
                    let conn_shared = shared.clone();
                    // `activity` only where the connection can be released (plain HTTP/1.1):
                    // elsewhere nothing reads the busy marks, and each costs atomic counts.
                    let make_svc = move |activity: Option<Arc<Activity>>| {
                        service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            shared.stats.requests.fetch_add(1, Ordering::Relaxed);
                            let (hold, body_hold) = match &activity {
                                Some(activity) => {
                                    activity.replayed.store(false, Ordering::Relaxed);
                                    activity.headed.store(true, Ordering::Relaxed);
                                    let body_hold = (!hyper::body::Body::is_end_stream(req.body()))
                                        .then(|| ConnHold::new(activity));
                                    (Some(ConnHold::new(activity)), body_hold)
                                }
                                None => (None, None),
                            };
                            let snapshot = shared.snapshot.load_full();
                            let req = req.map(|body| ProxyBody::incoming_held(body, body_timeout, body_hold));
                            // Not boxed: hyper's HTTP/1 connection keeps one boxed slot for
                            // its request's future, allocated with the connection, which this
                            // future is moved into; a box of its own would allocate and free
                            // again per request. The slot lives as long as hyper's
                            // connection, which on plain HTTP/1.1 is taken apart when idle.
                            handle(snapshot, req, conn_info, &values, hold)
                        })
                    };
                    let Some(acceptor) = tls else {
                        // The first bytes tell HTTP/2's preface from HTTP/1; bound that wait
                        // by the header timeout, or a client trickling `P`, `R`, `I` holds the
                        // connection forever.
                        // A connection that has sent no request yet is closed at shutdown.
                        let first_bytes = tokio::select! {
                            biased;
                            r = tokio::time::timeout(header_timeout, protocol_decidable(&stream)) => r,
                            _ = reached(&mut watcher, Phase::Draining) => return,
                        };
                        let h2 = match first_bytes {
                            Ok(Some(h2)) => h2,
                            Ok(None) => return,
                            Err(_) => {
                                tracing::debug!(%client, "no request head within the header timeout; closing");
                                return;
                            }
                        };
                        match release_after {
                            Some(after) if !h2 && !after.is_zero() => {
                                let activity = Arc::new(Activity::default());
                                let svc = make_svc(Some(activity.clone()));
                                serve_plain_http1(
                                    &builders,
                                    stream,
                                    svc,
                                    watcher,
                                    client,
                                    activity,
                                    after,
                                    header_timeout,
                                    accepted,
                                    &conn_shared,
                                )
                                .await
                            }
                            _ => {
                                let svc = make_svc(None);
                                serve_connection(&builders, h2, TokioIo::new(stream), svc, watcher, client).await
                            }
                        }
                        return;
                    };
                    // Boxed: the TLS states (handshake, rustls session) are larger than the
                    // plaintext ones and would otherwise size every connection's task.
                    Box::pin(async move {
                        // The handshake counts against the header timeout too.
                        let handshake = tokio::select! {
                            biased;
                            r = tokio::time::timeout(header_timeout, acceptor.accept(stream)) => r,
                            _ = reached(&mut watcher, Phase::Draining) => return,
                        };
                        let stream = match handshake {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%client, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%client, "no TLS handshake within the header timeout; closing");
                                return;
                            }
                        };
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        serve_connection(&builders, h2, TokioIo::new(stream), make_svc(None), watcher, client).await;
                    })
                    .await;
                });
            }
        });
    }
    shutdown.await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    accept_tasks.abort_all();
    while accept_tasks.join_next().await.is_some() {}
    // The accept loops are gone with their receivers: what is left are open connections.
    graceful.send_replace(Phase::Draining);
    if tokio::time::timeout(settings.shutdown_grace, graceful.closed()).await.is_err() {
        tracing::warn!(grace = ?settings.shutdown_grace, "grace period over; closing remaining connections");
        graceful.send_replace(Phase::Closing);
        // Every connection task wakes and drops its connection, with the requests in flight
        // on it; this waits only for the tasks to run.
        let _ = tokio::time::timeout(Duration::from_secs(1), graceful.closed()).await;
    }
    Ok(())
}

/// Counts a connection as active while it lives.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: Arc<Shared>) -> Self {
        shared.stats.connections_active.fetch_add(1, Ordering::Relaxed);
        OpenConnection(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `reached` once (with the task's coop budget used up first, if asked), then moves
    /// shutdown on: the wait must end, woken by the change alone. It runs in a task of its own
    /// so that the test's timeout waking up cannot poll it again.
    async fn drains_after_a_first_poll(spend_budget_first: bool) {
        let task = tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::watch::channel(Phase::Serving);
            let wait = reached(&mut rx, Phase::Draining);
            tokio::pin!(wait);
            let mut first = true;
            let waiting = std::future::poll_fn(|cx| {
                if std::mem::take(&mut first) {
                    if spend_budget_first {
                        loop {
                            let mut spend = std::pin::pin!(tokio::task::coop::consume_budget());
                            if spend.as_mut().poll(cx).is_pending() {
                                break;
                            }
                        }
                        assert!(!tokio::task::coop::has_budget_remaining());
                    }
                    assert!(wait.as_mut().poll(cx).is_pending(), "still serving");
                    return std::task::Poll::Pending;
                }
                wait.as_mut().poll(cx)
            });
            let change = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tx.send(Phase::Draining).unwrap();
                std::future::pending::<()>().await
            };
            // `waiting` first: a change sent after it answered `Pending` must wake it.
            tokio::select! {
                biased;
                _ = waiting => {}
                _ = change => {}
            }
        });
        tokio::time::timeout(Duration::from_secs(3), task).await.expect("the connection saw the shutdown").unwrap();
    }

    #[tokio::test]
    async fn a_connection_sees_shutdown() {
        drains_after_a_first_poll(false).await;
    }

    #[tokio::test]
    async fn a_connection_first_polled_without_budget_still_sees_shutdown() {
        drains_after_a_first_poll(true).await;
    }
}
