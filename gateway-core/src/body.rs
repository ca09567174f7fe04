//! Body types of the request path: what goes to the upstream and what goes back to the client.
//!
//! Both are enums rather than boxed trait objects so that the common case (a hyper `Incoming`
//! body passed straight through) costs no allocation and streams frame by frame.
//!
//! ```
//! use gateway_core::body::ResponseBody;
//! use http_body::Body;
//!
//! let body = ResponseBody::full("hello");
//! assert_eq!(body.size_hint().exact(), Some(5));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;

pub use crate::proxy::pool::UpstreamBody;
use crate::server::ConnHold;

/// Errors that may cross a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to the upstream.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body read from a hyper connection (no allocation, streamed).
    Incoming(Incoming),
    /// A body read from a hyper connection whose client may keep the gateway waiting only so
    /// long in all (the server's
    /// [`body_read_timeout`](crate::server::ServerSettings::body_read_timeout)), or which
    /// keeps its connection marked busy until it ends (then with no deadline when the server
    /// sets none), so that an idle-connection release never cuts a body still to come.
    Timed(Pin<Box<TimedIncoming>>),
    /// Any other body (boxed once per request; used when embedding behind another server).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
    /// A body kept in a slot until the upstream asks for it, so a connection-level retry can
    /// send it again when the first attempt never read it.
    Deferred(Deferred),
}

impl ProxyBody {
    /// A client body from hyper whose client may keep the gateway waiting for at most
    /// `deadline` in all (see [`TimedIncoming`]); `None` for no deadline. A body already
    /// complete (no body, or `Content-Length: 0`) needs no timer.
    pub fn incoming(body: Incoming, deadline: Option<Duration>) -> ProxyBody {
        ProxyBody::incoming_held(body, deadline, None)
    }

    /// [`ProxyBody::incoming`], keeping `hold` (the server's mark that its connection is busy)
    /// until the body is read to its end or dropped. Only a body still to come has one.
    pub(crate) fn incoming_held(body: Incoming, deadline: Option<Duration>, hold: Option<ConnHold>) -> ProxyBody {
        if body.is_end_stream() || (deadline.is_none() && hold.is_none()) {
            return ProxyBody::Incoming(body);
        }
        ProxyBody::Timed(Box::pin(TimedIncoming {
            body,
            // No deadline: a timer that is never armed (and never registered).
            deadline: tokio::time::sleep(deadline.unwrap_or(Duration::MAX)),
            limit: deadline.unwrap_or(Duration::MAX),
            waited: Duration::ZERO,
            waiting_since: None,
            armed: deadline.is_some(),
            _hold: hold,
        }))
    }

    /// Wraps any body; hyper's `Incoming` is recognised and kept unboxed.
    pub fn from_body<B>(body: B) -> ProxyBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut slot = Some(body);
        if let Some(incoming) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Incoming>>() {
            return incoming.take().map_or(ProxyBody::Empty, ProxyBody::Incoming);
        }
        match slot {
            Some(body) if body.is_end_stream() => ProxyBody::Empty,
            Some(body) => ProxyBody::Boxed(body.map_err(Into::into).boxed_unsync()),
            None => ProxyBody::Empty,
        }
    }

    /// Moves this body into a shared slot; returns a body that takes it out on first poll and a
    /// handle that can get it back as long as nothing polled it.
    pub(crate) fn defer(self) -> (ProxyBody, BodySlot) {
        let hint = self.size_hint();
        let slot = Arc::new(Mutex::new(Some(self)));
        (ProxyBody::Deferred(Deferred { slot: slot.clone(), taken: None, hint }), BodySlot(slot))
    }
}

/// See [`ProxyBody::Deferred`].
#[derive(Debug)]
pub struct Deferred {
    slot: Arc<Mutex<Option<ProxyBody>>>,
    taken: Option<Box<ProxyBody>>,
    hint: SizeHint,
}

/// The retry side of a [`Deferred`] body.
#[derive(Debug, Clone)]
pub(crate) struct BodySlot(Arc<Mutex<Option<ProxyBody>>>);

impl BodySlot {
    /// Gets the body back for another attempt, if the last attempt never polled it.
    pub(crate) fn reclaim(&self) -> Option<ProxyBody> {
        let body = self.0.lock().ok()?.take()?;
        Some(body.defer_into(self.clone()))
    }
}

impl ProxyBody {
    fn defer_into(self, slot: BodySlot) -> ProxyBody {
        let hint = self.size_hint();
        if let Ok(mut guard) = slot.0.lock() {
            *guard = Some(self);
        }
        ProxyBody::Deferred(Deferred { slot: slot.0, taken: None, hint })
    }
}

pin_project_lite::pin_project! {
    /// See [`ProxyBody::Timed`]. Hand-written rather than tower-http's `TimeoutBody`, which
    /// times each frame separately: a client trickling one byte per frame would pass it.
    ///
    /// The deadline counts only the time the gateway waits for the client's bytes, summed
    /// over the whole body: time before the first read (plugins, the upstream connection) and
    /// time the upstream takes to accept what was read (backpressure) are not the client's.
    /// The 408 answer also ends an HTTP/1.1 connection: hyper does not keep alive a
    /// connection whose request body was not read to its end.
    #[derive(Debug)]
    pub struct TimedIncoming {
        body: Incoming,
        #[pin]
        deadline: tokio::time::Sleep,
        limit: Duration,
        // Time spent waiting for the client so far, not counting the current wait.
        waited: Duration,
        // When the current wait for the client began.
        waiting_since: Option<tokio::time::Instant>,
        armed: bool,
        _hold: Option<ConnHold>,
    }
}

impl Body for TimedIncoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = Pin::new(this.body).poll_frame(cx) {
            if let Some(since) = this.waiting_since.take() {
                *this.waited += since.elapsed();
            }
            return Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(ClientBodyError::Broken(e)) as BoxError)));
        }
        if !*this.armed {
            return Poll::Pending;
        }
        if this.waiting_since.is_none() {
            let now = tokio::time::Instant::now();
            *this.waiting_since = Some(now);
            this.deadline.as_mut().reset(now + this.limit.saturating_sub(*this.waited));
        }
        ready!(this.deadline.poll(cx));
        Poll::Ready(Some(Err(Box::new(ClientBodyError::Deadline(*this.limit)))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl ProxyBody {
    /// Lifts the body deadline of a [`ProxyBody::Timed`] body (a gRPC call's client stream
    /// lasts as long as the call); other bodies are unchanged.
    pub fn disarm_deadline(&mut self) {
        if let ProxyBody::Timed(b) = self {
            *b.as_mut().project().armed = false;
        }
    }
}

/// The client's request body failed: the client's fault, answered 400 or 408, never counted
/// against the upstream.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientBodyError {
    /// The body broke: an invalid chunk, a connection cut mid-body.
    Broken(hyper::Error),
    /// The client kept the gateway waiting for its body longer than this in all.
    Deadline(Duration),
}

impl ClientBodyError {
    /// The client error a failed body is answered with, and its message.
    pub fn answer(&self) -> (http::StatusCode, &'static str) {
        match self {
            ClientBodyError::Broken(_) => (http::StatusCode::BAD_REQUEST, "Bad request body"),
            ClientBodyError::Deadline(_) => (http::StatusCode::REQUEST_TIMEOUT, "Request body timeout"),
        }
    }

    /// The `ClientBodyError` in an error's chain of sources, if the client's body is what
    /// failed.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(found) = e.downcast_ref::<ClientBodyError>() {
                return Some(found);
            }
            cur = e.source();
        }
        None
    }
}

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientBodyError::Broken(e) => write!(f, "client request body: {e}"),
            ClientBodyError::Deadline(d) => write!(f, "client request body: waited for it {d:?} in all"),
        }
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientBodyError::Broken(e) => Some(e),
            ClientBodyError::Deadline(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Incoming(b) => {
                Pin::new(b).poll_frame(cx).map_err(|e| Box::new(ClientBodyError::Broken(e)) as BoxError)
            }
            ProxyBody::Timed(b) => b.as_mut().poll_frame(cx),
            ProxyBody::Boxed(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Deferred(d) => {
                if d.taken.is_none() {
                    match d.slot.lock().ok().and_then(|mut g| g.take()) {
                        Some(body) => d.taken = Some(Box::new(body)),
                        // Never forward a truncated body: an empty slot means another attempt
                        // already took it.
                        None => {
                            return Poll::Ready(Some(Err("request body already taken by another attempt".into())));
                        }
                    }
                }
                match d.taken.as_mut() {
                    Some(b) => Pin::new(b.as_mut()).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Incoming(b) => b.is_end_stream(),
            ProxyBody::Timed(b) => b.is_end_stream(),
            ProxyBody::Boxed(b) => b.is_end_stream(),
            ProxyBody::Deferred(d) => d.hint.exact() == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::Timed(b) => b.size_hint(),
            ProxyBody::Boxed(b) => b.size_hint(),
            ProxyBody::Deferred(d) => d.hint,
        }
    }
}

/// Why [`read_limited`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The body is longer than `limit`. `read` holds what was read before stopping and the
    /// rest is still in the body: `ProxyBody::prefixed(read, body)` is the whole body again.
    #[error("body larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
        /// The bytes consumed before the limit was passed.
        read: Bytes,
    },
    /// The body failed while reading (client gone, malformed framing, too slow).
    #[error("body read failed: {0}")]
    Failed(BoxError),
}

impl ReadError {
    /// The answer for a body that could not be read: 413 when too large, else the client
    /// error of [`ClientBodyError::answer`] (400 "Bad request body" for anything else).
    pub fn answer(&self) -> (http::StatusCode, &'static str) {
        match self {
            ReadError::TooLarge { .. } => (http::StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
            ReadError::Failed(e) => ClientBodyError::find(e.as_ref())
                .map_or((http::StatusCode::BAD_REQUEST, "Bad request body"), ClientBodyError::answer),
        }
    }
}

/// Reads a whole body into memory, refusing more than `limit` bytes. For plugins that must
/// see a body (credentials in a form, size limits on chunked uploads, body transforms); put
/// the bytes back with [`ProxyBody::full`]. Nothing is lost when the body is too large: see
/// [`ReadError::TooLarge`].
pub async fn read_limited(body: &mut ProxyBody, limit: usize) -> Result<Bytes, ReadError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge { limit, read: Bytes::new() });
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Failed)?;
        if let Some(data) = frame.data_ref() {
            buf.extend_from_slice(data);
            if buf.len() > limit {
                return Err(ReadError::TooLarge { limit, read: buf.freeze() });
            }
        }
    }
    Ok(buf.freeze())
}

impl ProxyBody {
    /// `prefix` followed by the rest of `rest`: a body partly read, made whole again.
    pub fn prefixed(prefix: Bytes, rest: ProxyBody) -> ProxyBody {
        if prefix.is_empty() {
            return rest;
        }
        let hint = {
            let h = rest.size_hint();
            let mut s = SizeHint::new();
            s.set_lower(h.lower() + prefix.len() as u64);
            if let Some(u) = h.upper() {
                s.set_upper(u + prefix.len() as u64);
            }
            s
        };
        ProxyBody::Boxed(Prefixed { prefix: Some(prefix), rest, hint }.boxed_unsync())
    }
}

/// See [`ProxyBody::prefixed`].
struct Prefixed {
    prefix: Option<Bytes>,
    rest: ProxyBody,
    hint: SizeHint,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl ProxyBody {
    /// A complete in-memory body.
    pub fn full(bytes: Bytes) -> ProxyBody {
        if bytes.is_empty() {
            ProxyBody::Empty
        } else {
            ProxyBody::Boxed(http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed_unsync())
        }
    }
}

/// A response body: the upstream's, streamed, or one the gateway wrote.
#[derive(Debug)]
pub enum ResponseBody {
    /// The upstream's body, streamed frame by frame (`UpstreamBody::from` an `Incoming`).
    Upstream(UpstreamBody),
    /// A complete body written by the gateway (error answers, plugin answers).
    Full(Option<Bytes>),
    /// Any other body, boxed (for plugins that transform bodies).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl ResponseBody {
    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ResponseBody::Full(if bytes.is_empty() { None } else { Some(bytes) })
    }

    /// An empty body.
    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }

    /// Collects the whole body (for tests and small bodies).
    pub async fn collect_bytes(self) -> Result<Bytes, BoxError> {
        Ok(BodyExt::collect(self).await?.to_bytes())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Upstream(b) => {
                let frame = ready!(Pin::new(b).poll_frame(cx));
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(b) => b.is_end_stream(),
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(b) => b.size_hint(),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Boxed(b) => b.size_hint(),
        }
    }
}

/// The body of every response the gateway sends: the [`ResponseBody`], plus the request's
/// record (metrics, access log), finished when the body ends or is dropped.
pub struct GatewayBody {
    inner: ResponseBody,
    /// Boxed: hyper moves the body several times on its way to the connection, and the record
    /// (430 bytes, most of it the access log's line) would be copied with it on every request,
    /// logged or not; a box costs an allocation only when there is a record.
    exchange: Option<Box<crate::observe::Exchange>>,
    /// Counts the request as in flight to its target until the body is gone.
    _in_flight: Option<std::sync::Arc<crate::balance::InFlight>>,
    /// Marks the client connection busy until the body is gone.
    _hold: Option<ConnHold>,
}

impl std::fmt::Debug for GatewayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBody").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl GatewayBody {
    /// `hold`: the connection's busy mark, kept until the body is gone.
    pub(crate) fn new(
        inner: ResponseBody,
        exchange: Option<Box<crate::observe::Exchange>>,
        in_flight: Option<std::sync::Arc<crate::balance::InFlight>>,
        hold: Option<ConnHold>,
    ) -> Self {
        GatewayBody { inner, exchange, _in_flight: in_flight, _hold: hold }
    }

    /// Collects the whole body (for tests and small bodies).
    pub async fn collect_bytes(self) -> Result<Bytes, BoxError> {
        Ok(BodyExt::collect(self).await?.to_bytes())
    }

    fn finish(&mut self, complete: bool) {
        if let Some(e) = self.exchange.take() {
            e.finish(complete);
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(e), Some(d)) = (&mut this.exchange, f.data_ref()) {
                    e.bytes_out += d.len() as u64;
                }
            }
            Some(Err(e)) => {
                // An upstream that closed mid-response, most often: the client gets a
                // truncated answer (the connection is closed, or the stream reset).
                tracing::warn!(error = %e, "response body broke off; the client's answer is truncated");
                this.finish(false);
            }
            None => this.finish(true),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is empty: that is a complete response too.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
