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

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;

/// Errors that may cross a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to the upstream.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A body read from a hyper connection (no allocation, streamed).
    Incoming(Incoming),
    /// Any other body (boxed once per request; used when embedding behind another server).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
    /// A body kept in a slot until the upstream asks for it, so a connection-level retry can
    /// send it again when the first attempt never read it.
    Deferred(Deferred),
}

impl ProxyBody {
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

/// The client's request body broke (an invalid chunk, a connection cut mid-body): the
/// client's fault, answered 400, never counted against the upstream.
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(|e| Box::new(ClientBodyError(e)) as BoxError),
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
            ProxyBody::Boxed(b) => b.is_end_stream(),
            ProxyBody::Deferred(d) => d.hint.exact() == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Incoming(b) => b.size_hint(),
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
    /// The body failed while reading (client gone, malformed framing).
    #[error("body read failed: {0}")]
    Failed(BoxError),
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
    /// The upstream's body, streamed frame by frame.
    Upstream(Incoming),
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
    exchange: Option<crate::observe::Exchange>,
    /// Counts the request as in flight to its target until the body is gone.
    _in_flight: Option<std::sync::Arc<crate::balance::InFlight>>,
}

impl std::fmt::Debug for GatewayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBody").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl GatewayBody {
    pub(crate) fn new(
        inner: ResponseBody,
        exchange: Option<crate::observe::Exchange>,
        in_flight: Option<std::sync::Arc<crate::balance::InFlight>>,
    ) -> Self {
        GatewayBody { inner, exchange, _in_flight: in_flight }
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
            Some(Err(_)) => this.finish(false),
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
