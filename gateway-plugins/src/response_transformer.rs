//! `response-transformer`: Kong's `remove / rename / replace / add / append` on the response's
//! headers and JSON body.
//!
//! ```yaml
//! plugins:
//!   - name: response-transformer
//!     config:
//!       remove: { headers: [x-powered-by], json: [internal, /meta/debug] }
//!       rename: { headers: ["x-old:x-new"] }
//!       add: { headers: ["x-served-by:gateway"], json: ["/meta/count:3"], json_types: [number] }
//! ```
//!
//! Operations run in Kong's order (remove, rename, replace, add, append). Templates read the
//! response's headers as the plugin received them (`$(headers.x-name)`); `query_params` and
//! `uri_captures` lookups render empty here. JSON field names that start with `/` are JSON
//! Pointers (see [`crate::transform`]).
//!
//! Header operations apply to every response, including the answers the gateway and other
//! plugins write (a 401 from key-auth, a 502), as Kong's `header_filter` does.
//!
//! JSON operations apply only when configured, and only to responses whose `Content-Type` is
//! JSON (`application/json` or `*/*+json`) and that carry a body in no `Content-Encoding`.
//! Other bodies stream through untouched, never buffered. A JSON body is read whole, at most
//! 8 MiB of it: a larger one passes through untransformed (what was read already is sent
//! first, then the rest, so nothing is lost) with a warning; one that is not a JSON object
//! passes through untouched.
//!
//! # Framing
//!
//! A body the gateway or a plugin wrote is in memory already: it is transformed at once and
//! gets an exact `Content-Length`. An upstream body is transformed as it is sent: the response
//! head leaves before the body is read, so its upstream `Content-Length` (now wrong) is removed
//! and the body goes out chunked (HTTP/1.1) or as DATA frames (HTTP/2), as Kong does.
//! (An exact length for upstream bodies would take a layer around the upstream call, which
//! needs the `tower-service` trait this crate does not depend on.)

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use gateway_core::body::{BoxError, ProxyBody, ResponseBody};
use gateway_core::plugin::{Answer, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use serde_json::Value;

use crate::request_transformer::ops_of;
use crate::transform::{Block, Lookup, Ops, Template, apply_headers, apply_json, header_name};

/// Kong's priority for response-transformer.
pub const PRIORITY: i32 = 800;
/// The largest JSON body transformed; larger ones pass through untouched.
pub const BODY_LIMIT: usize = 8 << 20;

/// response-transformer's config (Kong's fields).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseTransformerConfig {
    /// Header and JSON field names to remove.
    #[serde(default)]
    pub remove: Block,
    /// `old:new` renames.
    #[serde(default)]
    pub rename: Block,
    /// `name:value` replacements of present values.
    #[serde(default)]
    pub replace: Block,
    /// `name:value` additions of absent values.
    #[serde(default)]
    pub add: Block,
    /// `name:value` appended values.
    #[serde(default)]
    pub append: Block,
}

/// The response-transformer plugin.
pub struct ResponseTransformer {
    headers: Ops,
    /// The JSON body operations, when any are configured.
    json: Option<Arc<JsonOps>>,
    /// Some template reads response headers: keep a copy of them to read.
    needs_headers: bool,
}

/// JSON body operations and the most of a body they buffer.
struct JsonOps {
    ops: Ops,
    limit: usize,
}

/// Marks a `HEAD` request: its response has no body to transform, whatever its headers say.
#[derive(Clone, Copy)]
struct HeadRequest;

/// The factory to register.
pub fn factory() -> TypedFactory<
    ResponseTransformerConfig,
    impl Fn(ResponseTransformerConfig, &BuildContext<'_>) -> Result<ResponseTransformer, String> + Send + Sync,
> {
    typed_factory("response-transformer", PRIORITY, |c: ResponseTransformerConfig, _: &BuildContext<'_>| {
        ResponseTransformer::new(c)
    })
}

impl ResponseTransformer {
    /// Builds the plugin from its config.
    pub fn new(c: ResponseTransformerConfig) -> Result<Self, String> {
        let named = [
            ("remove", &c.remove),
            ("rename", &c.rename),
            ("replace", &c.replace),
            ("add", &c.add),
            ("append", &c.append),
        ];
        for (block, b) in named {
            if !b.querystring.is_empty() {
                return Err(format!(
                    "`{block}.querystring`: response-transformer has no query string to transform (that is request-transformer)"
                ));
            }
            if !b.body.is_empty() {
                return Err(format!("`{block}.body`: response-transformer transforms JSON bodies with `json`"));
            }
            if b.uri.is_some() {
                return Err(format!(
                    "`{block}.uri`: response-transformer has no URI to transform (that is request-transformer)"
                ));
            }
        }
        for (block, b) in [("remove", &c.remove), ("rename", &c.rename)] {
            if !b.json_types.is_empty() {
                return Err(format!("`{block}.json_types`: only `replace`, `add` and `append` have typed values"));
            }
        }
        let blocks = [&c.remove, &c.rename, &c.replace, &c.add, &c.append];
        let mut headers = ops_of(blocks, |b| &b.headers, "headers", false)?;
        for e in headers
            .remove
            .iter()
            .chain(&headers.rename)
            .chain(&headers.replace)
            .chain(&headers.add)
            .chain(&headers.append)
        {
            header_name("headers", &e.name)?;
        }
        // Literal values are checked now; templated ones that render invalid are skipped.
        let empty = HeaderMap::new();
        let lookup = Lookup { headers: &empty, query: None, captures: None };
        for e in &mut headers.rename {
            // `old: new` reads naturally; header names carry no spaces.
            let literal = e.value.as_ref().filter(|t| t.is_literal()).map(|t| t.render(&lookup).trim().to_string());
            if let Some(new) = literal {
                header_name("rename.headers", &new)?;
                e.value = Some(Template::parse(&new)?);
            }
        }
        for (field, list) in [("replace", &headers.replace), ("add", &headers.add), ("append", &headers.append)] {
            for e in list {
                if let Some(t) = e.value.as_ref().filter(|t| t.is_literal()) {
                    HeaderValue::from_str(&t.render(&lookup)).map_err(|_| {
                        format!("`{field}.headers`: `{}` has a value that is not a header value", e.name)
                    })?;
                }
            }
        }
        let json = ops_of(blocks, |b| &b.json, "json", true)?;
        let needs_headers = headers.templates().chain(json.templates()).any(Template::reads_headers);
        let json = (!json.is_empty()).then(|| Arc::new(JsonOps { ops: json, limit: BODY_LIMIT }));
        Ok(ResponseTransformer { headers, json, needs_headers })
    }
}

/// True when a `Content-Type` is JSON: `application/json` or any `+json` type.
fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else { return false };
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// True when this response has a JSON body this plugin may transform.
fn has_json_body(resp: &Response<ResponseBody>) -> bool {
    let status = resp.status().as_u16();
    if status < 200 || status == 204 || status == 304 || resp.body().is_end_stream() {
        return false;
    }
    let h = resp.headers();
    let encoded = h.get(header::CONTENT_ENCODING).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    !encoded && is_json(h.get(header::CONTENT_TYPE))
}

/// The transformed document, or `None` when `bytes` is not a JSON object (left untouched).
fn transform_json(ops: &Ops, bytes: &[u8], l: &Lookup<'_>) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(bytes).ok()?;
    if !doc.is_object() {
        return None;
    }
    apply_json(ops, &mut doc, l);
    serde_json::to_vec(&doc).ok()
}

/// Boxes any body as a [`ResponseBody`] (through [`ProxyBody::from_body`], which boxes every
/// body but hyper's own).
fn into_response_body<B>(body: B) -> ResponseBody
where
    B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    match ProxyBody::from_body(body) {
        ProxyBody::Boxed(b) => ResponseBody::Boxed(b),
        ProxyBody::Incoming(b) => ResponseBody::Upstream(b.into()),
        ProxyBody::Empty => ResponseBody::empty(),
        // Never produced by `from_body`; boxing it again keeps it whole regardless.
        other => into_response_body(other),
    }
}

impl ResponseTransformer {
    fn transform_body(
        &self,
        json: &Arc<JsonOps>,
        ctx: &RequestContext,
        resp: &mut Response<ResponseBody>,
        headers: &HeaderMap,
    ) {
        if resp.body().size_hint().lower() > json.limit as u64 {
            tracing::warn!(
                route = &*ctx.route,
                limit = json.limit,
                "response-transformer: JSON body too large to transform, passed through untouched"
            );
            return;
        }
        if let ResponseBody::Full(Some(bytes)) = resp.body() {
            // Written by the gateway or a plugin: in memory already, so transformed now.
            let lookup = Lookup { headers, query: None, captures: None };
            if let Some(out) = transform_json(&json.ops, bytes, &lookup) {
                resp.headers_mut().remove(header::TRANSFER_ENCODING);
                resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
                *resp.body_mut() = ResponseBody::full(out);
            }
            return;
        }
        let inner = std::mem::replace(resp.body_mut(), ResponseBody::empty());
        let body = JsonBody::new(inner, json.clone(), headers.clone(), ctx.route.clone());
        *resp.body_mut() = into_response_body(body);
        // The length changes and is known only once the body is read, after the head left.
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        resp.headers_mut().remove(header::TRANSFER_ENCODING);
    }
}

impl Plugin for ResponseTransformer {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        if self.json.is_some() && req.method() == Method::HEAD {
            ctx.extensions.insert(HeadRequest);
        }
        ControlFlow::Continue(())
    }

    fn response(&self, ctx: &mut RequestContext, resp: &mut Response<ResponseBody>) {
        let original = if self.needs_headers { resp.headers().clone() } else { HeaderMap::new() };
        if let Some(json) = &self.json
            && ctx.extensions.get::<HeadRequest>().is_none()
            && has_json_body(resp)
        {
            self.transform_body(json, ctx, resp, &original);
        }
        apply_headers(&self.headers, resp.headers_mut(), &Lookup { headers: &original, query: None, captures: None });
    }
}

/// A JSON body transformed as it is sent: read whole (up to the limit), transformed, then
/// replayed. Over the limit, or on a read error, what was read is replayed as it was, followed
/// by the rest of the body (or the error).
struct JsonBody {
    state: State,
    json: Arc<JsonOps>,
    /// The response headers templates read.
    headers: HeaderMap,
    route: Arc<str>,
}

enum State {
    Reading { inner: ResponseBody, buf: BytesMut, trailers: Option<HeaderMap> },
    Replay { queue: VecDeque<Result<Frame<Bytes>, BoxError>>, rest: Option<ResponseBody> },
}

impl JsonBody {
    fn new(inner: ResponseBody, json: Arc<JsonOps>, headers: HeaderMap, route: Arc<str>) -> Self {
        let capacity = usize::try_from(inner.size_hint().lower()).unwrap_or(0).min(json.limit);
        let buf = BytesMut::with_capacity(capacity);
        JsonBody { state: State::Reading { inner, buf, trailers: None }, json, headers, route }
    }
}

impl Body for JsonBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Replay { queue, rest } => {
                    if let Some(item) = queue.pop_front() {
                        return Poll::Ready(Some(item));
                    }
                    return match rest {
                        Some(rest) => Pin::new(rest).poll_frame(cx),
                        None => Poll::Ready(None),
                    };
                }
                State::Reading { inner, buf, trailers } => {
                    let mut queue = VecDeque::new();
                    let rest = match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) if buf.len() + data.len() <= this.json.limit => {
                                buf.extend_from_slice(&data);
                                continue;
                            }
                            Ok(data) => {
                                tracing::warn!(
                                    route = &*this.route,
                                    limit = this.json.limit,
                                    "response-transformer: JSON body too large to transform, passed through untouched"
                                );
                                if !buf.is_empty() {
                                    queue.push_back(Ok(Frame::data(buf.split().freeze())));
                                }
                                queue.push_back(Ok(Frame::data(data)));
                                Some(std::mem::replace(inner, ResponseBody::empty()))
                            }
                            Err(frame) => {
                                if let Ok(t) = frame.into_trailers() {
                                    *trailers = Some(t);
                                }
                                continue;
                            }
                        },
                        Some(Err(e)) => {
                            if !buf.is_empty() {
                                queue.push_back(Ok(Frame::data(buf.split().freeze())));
                            }
                            queue.push_back(Err(e));
                            None
                        }
                        None => {
                            let read = buf.split().freeze();
                            let lookup = Lookup { headers: &this.headers, query: None, captures: None };
                            let out = match transform_json(&this.json.ops, &read, &lookup) {
                                Some(out) => Bytes::from(out),
                                None => read,
                            };
                            if !out.is_empty() {
                                queue.push_back(Ok(Frame::data(out)));
                            }
                            if let Some(t) = trailers.take() {
                                queue.push_back(Ok(Frame::trailers(t)));
                            }
                            None
                        }
                    };
                    this.state = State::Replay { queue, rest };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Reading { .. } => false,
            State::Replay { queue, rest } => queue.is_empty() && rest.as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Reading { .. } => SizeHint::default(),
            State::Replay { queue, rest } => {
                let queued: u64 = queue
                    .iter()
                    .filter_map(|f| f.as_ref().ok().and_then(Frame::data_ref).map(|d| d.len() as u64))
                    .sum();
                let rest = rest.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + queued);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + queued);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::entries;
    use http_body_util::BodyExt;

    fn ops(add: &[&str]) -> Ops {
        let list: Vec<String> = add.iter().map(|s| s.to_string()).collect();
        Ops { add: entries("add.json", &list, true, &[]).unwrap(), ..Ops::default() }
    }

    /// A body of several frames, optionally failing at the end.
    struct Frames(VecDeque<Result<Frame<Bytes>, BoxError>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn frames(items: Vec<Result<Frame<Bytes>, BoxError>>) -> ResponseBody {
        into_response_body(Frames(items.into()))
    }

    fn json_body(inner: ResponseBody, limit: usize, add: &[&str]) -> JsonBody {
        JsonBody::new(inner, Arc::new(JsonOps { ops: ops(add), limit }), HeaderMap::new(), "r".into())
    }

    #[tokio::test]
    async fn transforms_a_body_split_in_frames_and_keeps_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("1"));
        let inner = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"{\"a\":"))),
            Ok(Frame::data(Bytes::from_static(b"1}"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let collected = json_body(inner, 1024, &["b:2"]).collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "1");
        assert_eq!(collected.to_bytes(), Bytes::from_static(br#"{"a":1,"b":"2"}"#));
    }

    #[tokio::test]
    async fn over_the_limit_everything_passes_in_order_untouched() {
        let inner = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"{\"a\":"))),
            Ok(Frame::data(Bytes::from_static(b"\"0123456789\""))),
            Ok(Frame::data(Bytes::from_static(b"}"))),
        ]);
        let out = json_body(inner, 8, &["b:2"]).collect().await.unwrap().to_bytes();
        assert_eq!(out, Bytes::from_static(br#"{"a":"0123456789"}"#));
    }

    #[tokio::test]
    async fn not_an_object_or_not_json_passes_untouched() {
        for raw in [&b"[1,2]"[..], b"not json", b"  "] {
            let inner = ResponseBody::Boxed(
                http_body_util::Full::new(Bytes::copy_from_slice(raw)).map_err(|e| match e {}).boxed_unsync(),
            );
            let out = json_body(inner, 1024, &["b:2"]).collect().await.unwrap().to_bytes();
            assert_eq!(&out[..], raw);
        }
    }

    #[tokio::test]
    async fn a_read_error_is_passed_on_after_what_was_read() {
        let inner = frames(vec![Ok(Frame::data(Bytes::from_static(b"{\"a\":"))), Err("upstream reset".into())]);
        let mut body = json_body(inner, 1024, &["b:2"]);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, Bytes::from_static(b"{\"a\":"));
        assert_eq!(body.frame().await.unwrap().unwrap_err().to_string(), "upstream reset");
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn json_content_types() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_json(Some(&v("application/json"))));
        assert!(is_json(Some(&v("Application/JSON; charset=utf-8"))));
        assert!(is_json(Some(&v("application/problem+json"))));
        assert!(!is_json(Some(&v("text/plain"))));
        assert!(!is_json(Some(&v("application/jsonp"))));
        assert!(!is_json(None));
    }

    #[test]
    fn request_only_fields_are_refused() {
        let bad = |yaml: &str| {
            let c: ResponseTransformerConfig = serde_json::from_str(yaml).unwrap();
            ResponseTransformer::new(c).err().unwrap_or_default()
        };
        assert!(bad(r#"{"add": {"querystring": ["a:b"]}}"#).contains("add.querystring"));
        assert!(bad(r#"{"remove": {"body": ["a"]}}"#).contains("`json`"));
        assert!(bad(r#"{"replace": {"uri": "/x"}}"#).contains("replace.uri"));
        assert!(bad(r#"{"add": {"headers": ["x:a\nb"]}}"#).contains("not a header value"));
        assert!(bad(r#"{"rename": {"headers": ["x:bad name"]}}"#).contains("not a header name"));
        assert!(
            ResponseTransformer::new(serde_json::from_str(r#"{"rename": {"headers": ["x-a: x-b"]}}"#).unwrap()).is_ok()
        );
    }
}
