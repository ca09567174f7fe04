//! The reverse proxy: one request in, one upstream call, one response out.
//!
//! Proxy semantics, decided per RFC 9110 and Kong's behaviour:
//! - hop-by-hop headers are removed both ways: `Connection` and every header it names,
//!   `Keep-Alive`, `Proxy-Connection`, `TE` (except `TE: trailers`), `Transfer-Encoding`,
//!   `Upgrade`, and the proxy credentials `Proxy-Authorization` / `Proxy-Authenticate`;
//! - `X-Forwarded-For`, `X-Forwarded-Proto`, `-Host`, `-Port`, `-Path` (the client's path),
//!   `-Prefix` (the stripped prefix) and `X-Real-IP` are set from what the gateway saw,
//!   replacing what the client sent; from a trusted proxy (`GatewayBuilder::trusted_ips`)
//!   `X-Forwarded-For` is extended and the other `X-Forwarded-*` headers kept;
//! - `TE` goes up only as `TE: trailers` and never comes back;
//! - `Via` is appended on the way up and on the way back;
//! - every response carries `X-Request-Id`, which the upstream also receives;
//! - a client's `Forwarded` header is dropped (the `X-Forwarded-*` set replaces it);
//! - the path is normalised before routing (see [`path`]) and the upstream gets that path;
//! - HTTP/2 `cookie` fields are joined into one for the HTTP/1.1 upstream (RFC 9113 8.2.3).
//!
//! Failures become JSON answers `{"message": ..., "request_id": ...}` in exactly one place,
//! [`error_response`]: 400 for a path [`path::refused`] refuses or a broken request body,
//! 404 when no route matches, 502 when the upstream connection or its response fails, 503 when no target is available, 504 on an upstream timeout.

pub(crate) mod client;
pub mod path;
pub(crate) mod pool;

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper_util::client::legacy::connect::{HttpInfo, capture_connection};
use ipnet::IpNet;

use std::ops::ControlFlow;

use crate::balance::{BalanceKey, InFlight, KeyInput, Outcome, TargetRuntime};
use crate::body::{GatewayBody, ProxyBody, ResponseBody};
use crate::observe::{ConsumerMetrics, Exchange, LogLine, RouteMetrics, TraceContext};
use crate::plugin::RequestContext;
use crate::proxy::client::TargetClient;
use crate::router::{RouteInput, split_host};
use crate::server::ConnHold;
use crate::snapshot::{RouteRuntime, ServiceRuntime, Snapshot};

/// Facts about the connection a request arrived on.
///
/// The built-in server passes them directly; when the gateway runs as a plain tower service,
/// put a `ConnInfo` in the request extensions (otherwise the client is `0.0.0.0:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// The local address the request arrived at.
    pub local: SocketAddr,
    /// True when the connection is TLS, or when a trusted proxy's `X-Forwarded-Proto` says
    /// the client's was (see `GatewayBuilder::trusted_ips`).
    pub tls: bool,
}

/// Header values that are the same for every request of a connection, made once per
/// connection by the server (per request when embedded as a tower service).
#[derive(Debug, Clone)]
pub(crate) struct ConnValues {
    /// The peer's address.
    pub(crate) ip: HeaderValue,
    /// The client's address: the peer's, or the one a trusted proxy forwarded.
    pub(crate) client_ip: HeaderValue,
    port: HeaderValue,
    /// The trusted proxies, when the peer is one of them: its `X-Forwarded-*` headers are
    /// believed. `None` (the common case) costs nothing per request.
    trusted: Option<Arc<[IpNet]>>,
}

impl ConnValues {
    pub(crate) fn new(conn: &ConnInfo, trusted_ips: &Arc<[IpNet]>) -> Self {
        let peer = conn.client.ip().to_canonical();
        let ip = HeaderValue::from_str(&peer.to_string()).unwrap_or(HeaderValue::from_static("0.0.0.0"));
        ConnValues {
            client_ip: ip.clone(),
            ip,
            port: HeaderValue::from(conn.local.port()),
            trusted: trusted_ips.iter().any(|n| n.contains(&peer)).then(|| trusted_ips.clone()),
        }
    }
}

/// The client behind a trusted proxy, read from `X-Forwarded-For` right to left (the last
/// line first): the first address that is not a trusted proxy itself (nginx's
/// `real_ip_recursive on`), or the left-most when all are. Entries may carry a port
/// (`1.2.3.4:5678`, `[::1]:80`); empty entries are skipped. `Ok(None)` when there is no
/// header: the peer is the client. `Err` when an entry that is not an address comes before
/// any untrusted one: a client could otherwise pass as the trusted proxy itself.
fn forwarded_client(headers: &HeaderMap, trusted: &[IpNet]) -> Result<Option<IpAddr>, ()> {
    let mut last = None;
    for v in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        for part in v.as_bytes().rsplit(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() {
                continue;
            }
            let ip = std::str::from_utf8(part).ok().and_then(parse_forwarded_ip).ok_or(())?.to_canonical();
            if !trusted.iter().any(|n| n.contains(&ip)) {
                return Ok(Some(ip));
            }
            last = Some(ip);
        }
    }
    Ok(last)
}

/// An `X-Forwarded-For` entry: an address, with or without a port (`[v6]` brackets allowed).
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

impl Default for ConnInfo {
    fn default() -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        ConnInfo { client: unspecified, local: unspecified, tls: false }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_FORWARDED_PATH: HeaderName = HeaderName::from_static("x-forwarded-path");
static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// The request id header, on responses and on upstream requests.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The token this gateway adds to `Via`.
const VIA_TOKEN: &str = "gateway";

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those the `Connection` header names,
/// from a request: `TE: trailers` stays (gRPC needs it end to end).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, true);
}

/// [`remove_hop_by_hop`] for a response: `TE` is a request header and never goes back.
fn remove_hop_by_hop_from_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, false);
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Almost no request carries any of these: one pass over the names is cheaper than eight
    // hashed removes of absent headers.
    if headers.keys().any(is_hop_by_hop) {
        remove_hop_by_hop_present(headers, keep_te_trailers);
    }
}

/// Whether `name` is one of the hop-by-hop headers [`strip_hop_by_hop`] removes (besides those
/// `Connection` names).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
    )
}

/// The removals of [`strip_hop_by_hop`], once a pass over the names found something to remove.
fn remove_hop_by_hop_present(headers: &mut HeaderMap, keep_te_trailers: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            // A client must not be able to strip what the gateway itself sets.
            if name != X_REQUEST_ID {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::PROXY_AUTHENTICATE);
    if headers.contains_key(header::TE)
        && !(keep_te_trailers
            && headers.get_all(header::TE).iter().all(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers")))
    {
        headers.remove(header::TE);
    }
}

fn via_value<'a>(ours: &HeaderValue, previous: impl Iterator<Item = &'a HeaderValue>) -> HeaderValue {
    let mut b = BytesMut::with_capacity(64);
    for prev in previous {
        b.put_slice(prev.as_bytes());
        b.put_slice(b", ");
    }
    b.put_slice(ours.as_bytes());
    HeaderValue::from_maybe_shared(b.freeze()).unwrap_or_else(|_| ours.clone())
}

/// Adds this hop to `Via` (one hashed lookup when there is none yet, the common case).
fn append_via(headers: &mut HeaderMap, version: Version) {
    // Constants, checked when compiled: `from_static` called at run time on a string picked
    // by a `match` checks it a byte at a time, twice a request (about 250 instructions).
    const HTTP_10: HeaderValue = HeaderValue::from_static("1.0 gateway");
    const HTTP_11: HeaderValue = HeaderValue::from_static("1.1 gateway");
    const HTTP_2: HeaderValue = HeaderValue::from_static("2 gateway");
    const HTTP_3: HeaderValue = HeaderValue::from_static("3 gateway");
    let ours = match version {
        Version::HTTP_10 => HTTP_10,
        Version::HTTP_2 => HTTP_2,
        Version::HTTP_3 => HTTP_3,
        _ => HTTP_11,
    };
    debug_assert!(ours.as_bytes().ends_with(VIA_TOKEN.as_bytes()));
    match headers.entry(header::VIA) {
        header::Entry::Vacant(v) => {
            v.insert(ours);
        }
        header::Entry::Occupied(mut o) => {
            let v = via_value(&ours, o.iter());
            o.insert(v);
        }
    }
}

/// A new request id: 32 hex digits from a per-thread generator seeded from the OS.
pub fn next_request_id() -> HeaderValue {
    let (a, b) = random_pair();
    let mut out = [0u8; 32];
    hex_into(&mut out, &(u128::from(a) << 64 | u128::from(b)).to_be_bytes());
    HeaderValue::from_maybe_shared(shared_bytes(&out)).expect("hex is a valid header value")
}

/// Bytes made per request (the request id, forwarding header values, the upstream path), cut
/// from a per-thread 4 KiB buffer: one allocation per hundred or so values, and clones that
/// only count references. `HeaderValue::from_str` would allocate a `Vec` per value, and the
/// first clone of a `Vec`-backed `Bytes` (the headers kept for a retry clone every value)
/// allocates again to share it: about 2.5% of a proxied request's instructions. Hand-written
/// because neither `http` nor `bytes` has an arena. A buffer lives until the last value cut
/// from it is gone: values live as long as their request, the request id until the response
/// body ends, so a long streaming response keeps one 4 KiB buffer alive.
pub(crate) fn shared_bytes(s: &[u8]) -> Bytes {
    const CHUNK: usize = 4096;
    thread_local! {
        static ARENA: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
    }
    if s.len() > CHUNK / 8 {
        return Bytes::copy_from_slice(s);
    }
    ARENA
        .try_with(|arena| {
            let mut arena = arena.borrow_mut();
            if arena.capacity() < s.len() {
                *arena = BytesMut::with_capacity(CHUNK);
            }
            arena.extend_from_slice(s);
            arena.split().freeze()
        })
        // The thread is ending.
        .unwrap_or_else(|_| Bytes::copy_from_slice(s))
}

/// A header value of `n` in decimal (a count, a limit, a number of seconds), cut from the
/// per-request buffer of [`shared_bytes`]. `HeaderValue::from(n)` allocates a buffer for each
/// value, and the first clone of it allocates again to share it; a plugin that sets a few of
/// these per request (rate-limiting's remaining counts) pays the allocations on every request.
///
/// ```
/// assert_eq!(gateway_core::proxy::decimal_value(4096), "4096");
/// ```
pub fn decimal_value(n: u64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    HeaderValue::from_maybe_shared(shared_bytes(digits.format(n).as_bytes())).expect("digits are a valid header value")
}

/// A header value cut from [`shared_bytes`].
fn shared_value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(shared_bytes(s.as_bytes())).ok()
}

/// Lower-case hex of `bytes` into `out` (twice as long), a byte's two digits at a time from a
/// table: half the work of a digit at a time, and no bounds check per digit.
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [HEX[i >> 4], HEX[i & 15]];
            i += 1;
        }
        t
    };
    debug_assert_eq!(out.len(), 2 * bytes.len());
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[usize::from(*byte)]);
    }
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// W3C Trace Context (<https://www.w3.org/TR/trace-context/>) on the upstream request: the
/// client's trace continues with a new parent id for the gateway's hop (its flags and
/// `tracestate` kept); a request without a valid `traceparent` starts a new trace (flags 00:
/// unless a finish hook exports spans (`sample_new`)) and any `tracestate` is dropped, as the
/// spec requires. Returns what was sent, for the access log and the hook. `tracestate_sent`:
/// whether the request has a `tracestate` to drop (removing an absent one still hashes its
/// name; the caller's scan of the names already knows).
fn propagate_trace(h: &mut HeaderMap, sample_new: bool, tracestate_sent: bool) -> TraceContext {
    // One hashed lookup reads and replaces `traceparent`.
    let (context, fresh) = match h.entry(&TRACEPARENT) {
        header::Entry::Occupied(mut o) => {
            let incoming = parse_traceparent(o.get().as_bytes());
            let (context, value) = next_traceparent(incoming, sample_new);
            o.insert(value);
            (context, incoming.is_none())
        }
        header::Entry::Vacant(v) => {
            let (context, value) = next_traceparent(None, sample_new);
            v.insert(value);
            (context, true)
        }
    };
    if fresh && tracestate_sent {
        h.remove(&TRACESTATE);
    }
    context
}

/// The gateway's hop of the trace `incoming` (a new trace when `None`), and its `traceparent`
/// value, cut from the per-request buffer ([`shared_bytes`]): a `Vec` here cost two
/// allocations, its own and sharing it when the headers kept for a retry clone it.
fn next_traceparent(incoming: Option<(u128, u64, u8)>, sample_new: bool) -> (TraceContext, HeaderValue) {
    let (a, b) = random_pair();
    let (trace, parent, flags) = match incoming {
        Some((trace, parent, flags)) => (trace, Some(parent), flags),
        None => ((u128::from(a) << 64 | u128::from(b)).max(1), None, u8::from(sample_new)),
    };
    let span = (a ^ b.rotate_left(29)).max(1);
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut out[3..35], &trace.to_be_bytes());
    hex_into(&mut out[36..52], &span.to_be_bytes());
    hex_into(&mut out[53..55], &[flags]);
    let value = HeaderValue::from_maybe_shared(shared_bytes(&out)).expect("hex is a valid header value");
    (TraceContext::new(trace, span, parent, flags & 1 == 1), value)
}

/// A valid `traceparent`'s trace id, parent id and flags (version 00, or a later version's
/// first four fields); `None` for anything malformed, all-zero ids or version `ff`.
fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    fn hex(s: &[u8]) -> Option<u128> {
        if s.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)) {
            u128::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
        } else {
            None
        }
    }
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (version > 0 && v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace = hex(&v[3..35]).filter(|t| *t != 0)?;
    let parent = u64::try_from(hex(&v[36..52]).filter(|p| *p != 0)?).ok()?;
    let flags = u8::try_from(hex(&v[53..55])?).ok()?;
    Some((trace, parent, flags))
}

/// Two fast, unpredictable-enough numbers (a per-thread splitmix64 stream seeded from the OS):
/// request ids, balancer dice, cookie values. Not for secrets.
fn random_pair() -> (u64, u64) {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(std::hash::RandomState::new().build_hasher().finish());
    }
    fn splitmix(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(x);
        (splitmix(x), splitmix(x ^ 0xD1B5_4A32_D192_ED03))
    })
}

/// One number from the same stream as request ids.
pub(crate) fn random_u64() -> u64 {
    random_pair().0
}

/// Builds the one kind of answer the gateway writes itself: a short JSON body.
pub fn error_response(status: StatusCode, message: &str, request_id: &HeaderValue) -> Response<ResponseBody> {
    let id = request_id.to_str().unwrap_or("");
    let mut body = String::with_capacity(message.len() + id.len() + 32);
    body.push_str("{\"message\":");
    let _ = write!(body, "{}", serde_json::Value::from(message));
    body.push_str(",\"request_id\":\"");
    body.push_str(id);
    body.push_str("\"}");
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    resp
}

/// Kong's v0 path joining of the service path and the (stripped) request path, written into
/// `out` (cleared first): `true` when it differs from `req_path`, `false` when the request's own
/// path goes upstream unchanged (then `out` is not to be used). The caller's buffer is reused
/// from request to request, so this allocates nothing.
pub(crate) fn upstream_path(
    out: &mut String,
    base: Option<&str>,
    req_path: &str,
    matched_len: usize,
    strip: bool,
) -> bool {
    out.clear();
    let base = base.unwrap_or("/");
    let base_trimmed = base.strip_suffix('/').unwrap_or(base);
    if base == "/" && (!strip || matched_len == 0) {
        return false;
    }
    let postfix = if strip { path::sanitize_postfix(req_path.get(matched_len..).unwrap_or("")) } else { "" };
    if base.ends_with('/') {
        if strip {
            if postfix.is_empty() {
                if base == "/" {
                    out.push('/');
                } else if req_path.ends_with('/') {
                    out.push_str(base);
                } else {
                    out.push_str(base_trimmed);
                }
            } else if postfix.starts_with('/') {
                out.push_str(base_trimmed);
                out.push_str(postfix);
            } else {
                out.push_str(base);
                out.push_str(postfix);
            }
        } else {
            out.push_str(base);
            out.push_str(req_path.get(1..).unwrap_or(""));
        }
    } else if strip {
        out.push_str(base);
        if postfix.is_empty() {
            if req_path.len() > 1 && req_path.ends_with('/') {
                out.push('/');
            }
        } else {
            if !postfix.starts_with('/') {
                out.push('/');
            }
            out.push_str(postfix);
        }
    } else {
        out.push_str(base);
        if req_path != "/" {
            out.push_str(req_path);
        }
    }
    // A route `/` with strip_path (Kong's default) puts back the `/` it took.
    out != req_path
}

fn is_timeout(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && h.is_timeout()
        {
            return true;
        }
        cur = e.source();
    }
    false
}

fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let _ = write!(s, ": {e}");
        cur = e.source();
    }
    s
}

/// What the request's record learns while it is handled.
#[derive(Default)]
struct Facts {
    metrics: Option<Arc<RouteMetrics>>,
    upstream: Option<Arc<str>>,
    upstream_latency: Option<Duration>,
    consumer: Option<Arc<str>>,
    /// The W3C trace context sent upstream.
    trace: Option<TraceContext>,
    consumer_metrics: Option<Arc<ConsumerMetrics>>,
}

/// Gives a request's header map room for the gateway's headers at a low load. `http`'s maps
/// probe linearly, and a map of a client's few headers plus the ten or so added here sits near
/// its 3/4 load limit, where every insert and lookup probes several slots. Grown once per map:
/// hyper hands a map on from request to response to request on a connection, capacity kept.
fn roomy(h: &mut HeaderMap) {
    const ROOM: usize = 24;
    if h.capacity() < ROOM {
        h.reserve(ROOM - h.len().min(ROOM));
    }
}

/// Upstream-bound values computed from the request head before plugins run.
struct Forwarding {
    pq: PathAndQuery,
    host: Option<HeaderValue>,
    path: Option<HeaderValue>,
    prefix: Option<HeaderValue>,
    client_host: Option<HeaderValue>,
    /// The protocol a client asked to switch to (`Upgrade`), to pass on.
    upgrade: Option<HeaderValue>,
}

/// Turns the client's request into the upstream's: path, forwarding headers, trace context
/// (returned: what was sent), framing.
#[allow(clippy::too_many_arguments)] // two call sites, which hold these apart
fn prepare(
    parts: &mut http::request::Parts,
    body: &ProxyBody,
    fwd: Forwarding,
    conn: &ConnInfo,
    values: &ConnValues,
    request_id: &HeaderValue,
    upstream_version: Version,
    sample_new: bool,
) -> TraceContext {
    roomy(&mut parts.headers);
    let tracestate_sent = set_forwarding_headers(
        &mut parts.headers,
        conn,
        values,
        fwd.host,
        fwd.path,
        fwd.prefix,
        request_id,
        parts.version,
    );
    let trace = propagate_trace(&mut parts.headers, sample_new, tracestate_sent);
    if upstream_version == Version::HTTP_2 {
        // gRPC servers may insist on it; it is the one `TE` HTTP/2 allows.
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    } else if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    if let Some(upgrade) = fwd.upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    // A body of unknown length must be framed explicitly on HTTP/1.1, or hyper sends none
    // for GET/HEAD; HTTP/2 frames bodies itself.
    if upstream_version == Version::HTTP_11
        && !http_body::Body::is_end_stream(body)
        && http_body::Body::size_hint(body).exact().is_none()
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    if let Some(h) = fwd.client_host {
        parts.headers.insert(header::HOST, h);
    }
    parts.version = upstream_version;
    // The path is routing's; the query is whatever the access hooks left (key-auth may have
    // removed a key from it).
    let pq = if parts.uri.query() == fwd.pq.query() {
        fwd.pq
    } else {
        let mut s = String::with_capacity(fwd.pq.as_str().len());
        s.push_str(fwd.pq.path());
        if let Some(q) = parts.uri.query().filter(|q| !q.is_empty()) {
            s.push('?');
            s.push_str(q);
        }
        PathAndQuery::from_maybe_shared(Bytes::from(s)).unwrap_or(fwd.pq)
    };
    parts.uri = Uri::from(pq);
    trace
}

/// What the head of a request decided, before the first await: routing, the protocol checks
/// and, for a route without plugins, the upstream request itself.
///
/// Computed by a plain function ([`route_head`]) on purpose: an `async fn` keeps every local
/// that was ever borrowed in its state across the awaits that follow, and the per-request
/// future is allocated, written and moved for every request. With the head work inline, the
/// request's parts, the path, the host and their copies sat beside the upstream call in a
/// 7 KB future. It names the route by its index in the snapshot, not by reference, so that
/// [`handle`] can route before it builds its future (see there).
enum Step {
    /// Answered before routing (a bad `X-Forwarded-For`): neither logged nor counted.
    Bare(Response<ResponseBody>),
    /// The gateway's own answer: an invalid path, no route, the wrong protocol, a route whose
    /// plugins failed to build, a route without a service.
    Answer(Response<ResponseBody>),
    /// A route without plugins: the upstream request, ready to send.
    Upstream {
        /// The route's index in the snapshot; it has a service.
        route: usize,
        /// The upstream request, in its two parts: `call_upstream` takes them apart.
        parts: http::request::Parts,
        body: ProxyBody,
        /// `Set-Cookie` for `hash_on: cookie` when the key was made up.
        cookie: Option<HeaderValue>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        /// The request's id, as `up` carries it.
        request_id: HeaderValue,
    },
    /// A route with plugins: the client's request, and the run's state, boxed (the plugin
    /// context is large, and a variant this size would grow every request's future, plugins
    /// or not).
    Plugins { run: Box<PluginRun>, req: Request<ProxyBody> },
}

/// The route at `index` in `snapshot` and its service: a [`Step`] names only routes that
/// have one.
fn routed(snapshot: &Snapshot, index: usize) -> (&RouteRuntime, &Arc<ServiceRuntime>) {
    let route = &snapshot.routes[index];
    (route, route.service.as_ref().expect("routing hands on only routes with a service"))
}

/// The state of a request on a route with plugins, from routing to the log hooks.
struct PluginRun {
    /// The route's index in the snapshot; it has a service.
    route: usize,
    /// Taken when the upstream request is prepared.
    fwd: Option<Forwarding>,
    ctx: RequestContext,
    /// The connection's values, copied only for a run that goes on in a future of its own
    /// (an async access hook, layers around the upstream call): the others borrow them.
    values: Option<ConnValues>,
    /// The id the upstream and the client get (the context's is the plugins' to read).
    request_id: HeaderValue,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The path the router saw, kept only when the service hashes requests to targets (the
    /// key is taken after the plugins, which may identify a consumer).
    path: Option<Box<str>>,
}

/// Handles one request against one snapshot. Never fails: every error is an HTTP answer (a
/// gRPC answer when the client speaks gRPC). The `Result` is the service's: the callers hand
/// this future on as it is, since wrapping it in another `async` block to add the `Ok` would
/// move it once more per request. `values`: the connection's, borrowed (copied only for a
/// route with plugins). `hold`: the connection's busy mark, which the response body keeps
/// until it is gone.
///
/// Everything up to the upstream call runs here, before the future exists (see [`Handling`]
/// for why the future is written out by hand): routing, the head's checks, the upstream
/// request, and the call's own set-up. A gateway answer is ready at once.
pub(crate) fn handle(
    snapshot: Arc<Snapshot>,
    req: Request<ProxyBody>,
    conn: ConnInfo,
    values: &ConnValues,
    hold: Option<ConnHold>,
) -> impl Future<Output = Result<Response<GatewayBody>, std::convert::Infallible>> + Send + 'static + use<> {
    let start = Instant::now();
    let mut facts = Facts::default();
    let (step, seen, grpc, bytes_in) = route_head(&snapshot, req, conn, values, start, &mut facts);
    let record = Record { snapshot, facts, seen, start, bytes_in, hold, grpc };
    match step {
        Step::Bare(resp) => {
            Handling::Ready { resp: Some(Ok(resp.map(|b| GatewayBody::new(b, None, None, record.hold)))) }
        }
        Step::Answer(resp) => Handling::Ready { resp: Some(record.end(resp)) },
        Step::Upstream { route, parts, body, cookie, client_upgrade, request_id } => {
            let (r, service) = routed(&record.snapshot, route);
            let (service, preserve_host) = (service.clone(), r.preserve_host);
            let sent = Instant::now();
            Handling::Upstream {
                call: call_upstream(service, preserve_host, parts, body, Some(request_id)),
                record,
                then: Then { route, cookie, client_upgrade, sent, plugins: None },
            }
        }
        Step::Plugins { run, req } => plugins_step(record, run, req, values, |service, preserve_host, parts, body| {
            call_upstream(service, preserve_host, parts, body, None)
        }),
    }
}

/// [`handle`] for a route with plugins. The synchronous access hooks run here, and when they
/// all pass the upstream call is built in place, as for a route without plugins; the first
/// async hook, or layers around the upstream call, hand the rest to a future of its own.
///
/// Out of line, so that the plugin path's moves do not shape the code of the path without
/// plugins; `call` builds the upstream call (the same future type as `handle`'s other arm).
#[inline(never)]
fn plugins_step<C>(
    mut record: Record,
    mut run: Box<PluginRun>,
    mut req: Request<ProxyBody>,
    values: &ConnValues,
    call: impl FnOnce(Arc<ServiceRuntime>, bool, http::request::Parts, ProxyBody) -> C,
) -> Handling<C> {
    let (route, service) = routed(&record.snapshot, run.route);
    // A trusted proxy's client, when it forwarded one (see `route_http`).
    let forwarded = run.values.take();
    let vals = forwarded.as_ref().unwrap_or(values);
    let from = match access_sync(&route.chain.slots, 0, &mut run.ctx, &mut req) {
        Access::Answered(answer) => {
            let mut resp = plugin_answered(&record.snapshot, route, answer, &mut run);
            deliver(&mut resp, None, run.client_upgrade.take(), &route.name);
            plugins_respond(&record.snapshot, &mut run, &mut resp, &mut record.facts);
            return Handling::Ready { resp: Some(record.end(resp)) };
        }
        Access::Async(from) => Some(from),
        Access::Passed if route.upstream.is_some() => Some(route.chain.slots.len()),
        Access::Passed => None,
    };
    if let Some(from) = from {
        run.values = Some(forwarded.unwrap_or_else(|| values.clone()));
        return Handling::Plugins {
            run: Box::pin(async move {
                let resp = run_plugins(&record.snapshot, run, req, from, &mut record.facts).await;
                record.end(resp)
            }),
        };
    }
    let (up, cookie) = plugins_upstream(&record.snapshot, &mut run, req, vals, &mut record.facts);
    let (parts, body) = up.into_parts();
    let (service, preserve_host) = (service.clone(), route.preserve_host);
    let (route, client_upgrade) = (run.route, run.client_upgrade.take());
    let sent = Instant::now();
    Handling::Upstream {
        call: call(service, preserve_host, parts, body),
        record,
        then: Then { route, cookie, client_upgrade, sent, plugins: Some(run) },
    }
}

/// What the end of a request needs, whichever way it was answered: the log line's and the
/// metrics' record.
struct Record {
    snapshot: Arc<Snapshot>,
    facts: Facts,
    seen: Option<Seen>,
    start: Instant,
    bytes_in: u64,
    hold: Option<ConnHold>,
    /// The client speaks gRPC.
    grpc: bool,
}

impl Record {
    /// The client's response: the gateway's own answers (not the upstream's) become gRPC
    /// statuses for gRPC clients, which do not read HTTP statuses or JSON bodies; then
    /// [`finish`].
    fn end(self, mut resp: Response<ResponseBody>) -> Result<Response<GatewayBody>, std::convert::Infallible> {
        if self.grpc && resp.status() != StatusCode::OK && matches!(resp.body(), ResponseBody::Full(_)) {
            resp = grpc_answer(resp);
        }
        finish(&self.snapshot, resp, self.facts, self.seen, self.start, self.bytes_in, self.hold)
    }
}

/// What the end of an upstream call still has to do with its answer.
struct Then {
    /// The route's index in the snapshot.
    route: usize,
    /// `Set-Cookie` for `hash_on: cookie` when the key was made up.
    cookie: Option<HeaderValue>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    sent: Instant,
    /// A route with plugins: their response and log hooks are still to run.
    plugins: Option<Box<PluginRun>>,
}

pin_project_lite::pin_project! {
    /// The future of one request ([`handle`]).
    ///
    /// Written out by hand because an `async` block costs a request dearly here: its
    /// captured values stay in every state, beside the future it awaits, so the routing
    /// decision (376 bytes) sat next to the upstream call that had taken its contents, and a
    /// future it awaits is moved into a slot of its own when first polled. The request's
    /// future is moved twice more after it is built (out of the service, into hyper's slot),
    /// so each byte of it is copied three times per request. Here the upstream call is built
    /// in place and polled where it is, next to only what the end of the request needs.
    #[project = HandlingProj]
    #[project_replace = HandlingOwn]
    enum Handling<C> {
        /// Waiting for the upstream: a route without plugins, or one whose access hooks all
        /// ran at once (`then` carries its plugin run, whose response and log hooks follow).
        Upstream { #[pin] call: C, record: Record, then: Then },
        /// A route with plugins whose run goes on in a future of its own, boxed: an async
        /// access hook, or layers around the upstream call (see [`plugins_step`]).
        Plugins { run: crate::plugin::BoxFuture<'static, Result<Response<GatewayBody>, std::convert::Infallible>> },
        /// Answered without waiting.
        Ready { resp: Option<Result<Response<GatewayBody>, std::convert::Infallible>> },
        /// Answered, and the answer handed on.
        Done,
    }
}

impl<C> Future for Handling<C>
where
    C: Future<Output = (Response<ResponseBody>, Option<Arc<str>>)>,
{
    type Output = Result<Response<GatewayBody>, std::convert::Infallible>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::{Poll, ready};
        match self.as_mut().project() {
            HandlingProj::Upstream { call, .. } => {
                let (mut resp, target) = ready!(call.poll(cx));
                let HandlingOwn::Upstream { mut record, then, .. } = self.project_replace(Handling::Done) else {
                    unreachable!("the state was Upstream")
                };
                record.facts.upstream_latency = Some(then.sent.elapsed());
                record.facts.upstream = target;
                let route = &record.snapshot.routes[then.route];
                deliver(&mut resp, then.cookie, then.client_upgrade, &route.name);
                if let Some(mut run) = then.plugins {
                    plugins_respond(&record.snapshot, &mut run, &mut resp, &mut record.facts);
                }
                Poll::Ready(record.end(resp))
            }
            HandlingProj::Plugins { run } => run.as_mut().poll(cx),
            HandlingProj::Ready { resp } => Poll::Ready(resp.take().expect("a request's future polled after it ended")),
            HandlingProj::Done => panic!("a request's future polled after it ended"),
        }
    }
}

/// The access log's view of a request: method, `Host`, URI and client address. Boxed: only a
/// logged or hooked request has one, and it would add 192 bytes to every request's future.
type Seen = Box<(http::Method, Option<HeaderValue>, Uri, HeaderValue)>;

/// The head of [`handle`]: the client as trusted proxies tell it, what the log and metrics
/// need from the request, and the routing decision ([`Step`]).
fn route_head(
    snapshot: &Snapshot,
    req: Request<ProxyBody>,
    mut conn: ConnInfo,
    values: &ConnValues,
    start: Instant,
    facts: &mut Facts,
) -> (Step, Option<Seen>, bool, u64) {
    // A copy of the connection's values with the client a trusted proxy forwarded.
    let mut forwarded = None;
    if let Some(trusted) = &values.trusted {
        match forwarded_client(req.headers(), trusted) {
            Ok(None) => {}
            Ok(Some(client)) => {
                // Plugins (rate limiting by ip, ip-restriction), balancing by ip and the
                // access log see the client a trusted proxy forwarded.
                conn.client = SocketAddr::new(client, conn.client.port());
                if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
                    forwarded = Some(ConnValues { client_ip: v, ..values.clone() });
                }
            }
            Err(()) => {
                let resp = error_response(StatusCode::BAD_REQUEST, "invalid X-Forwarded-For", &next_request_id());
                return (Step::Bare(resp), None, false, 0);
            }
        }
        // The scheme the client used to reach the trusted proxy, as Kong reads it: a load
        // balancer that terminates TLS makes `protocols: [https]` routes and the https
        // redirect work. The last value is the nearest proxy's.
        let proto = req.headers().get_all(&X_FORWARDED_PROTO).iter().next_back();
        if let Some(proto) = proto.map(|v| v.as_bytes().rsplit(|&b| b == b',').next().unwrap_or(b"").trim_ascii()) {
            if proto.eq_ignore_ascii_case(b"https") {
                conn.tls = true;
            } else if proto.eq_ignore_ascii_case(b"http") {
                conn.tls = false;
            }
        }
    }
    let values = forwarded.as_ref().unwrap_or(values);
    let hooked = snapshot.observe.on_finish.is_some();
    let grpc = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let bytes_in = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // The access log's view of the request, taken before it moves on (only when logging or
    // hooked): cheap copies that share the request's buffers. The URI carries the HTTP/2
    // authority; the Host header is kept for HTTP/1.
    let seen = (snapshot.observe.access_log || hooked).then(|| {
        let host = req.headers().get(header::HOST).cloned();
        Box::new((req.method().clone(), host, req.uri().clone(), values.client_ip.clone()))
    });
    (route_http(snapshot, req, conn, values, forwarded.is_some(), start, facts), seen, grpc, bytes_in)
}

/// The end of [`handle`]: latency headers, and the log line and metrics the body finishes.
fn finish(
    snapshot: &Snapshot,
    mut resp: Response<ResponseBody>,
    facts: Facts,
    seen: Option<Seen>,
    start: Instant,
    bytes_in: u64,
    hold: Option<ConnHold>,
) -> Result<Response<GatewayBody>, std::convert::Infallible> {
    let (metrics_on, access_log, latency_headers) =
        (snapshot.observe.metrics, snapshot.observe.access_log, snapshot.observe.latency_headers);
    let hook = snapshot.observe.on_finish.clone();
    let head = start.elapsed();
    if latency_headers {
        let ms = |d: Duration| decimal_value(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let h = resp.headers_mut();
        if let Some(up) = facts.upstream_latency {
            h.insert(X_UPSTREAM_LATENCY.clone(), ms(up));
        }
        h.insert(X_PROXY_LATENCY.clone(), ms(head.saturating_sub(facts.upstream_latency.unwrap_or_default())));
    }
    let in_flight = resp.extensions_mut().remove::<Arc<InFlight>>();
    if !metrics_on && !access_log && hook.is_none() {
        return Ok(resp.map(|b| GatewayBody::new(b, None, in_flight, hold)));
    }
    let log = seen.map(|seen| *seen).map(|(method, host, uri, client)| LogLine {
        request_id: resp.headers().get(&X_REQUEST_ID).cloned().unwrap_or_else(|| HeaderValue::from_static("-")),
        client,
        method,
        host,
        uri,
        upstream: facts.upstream,
        consumer: facts.consumer,
        trace: facts.trace,
    });
    let exchange = Box::new(Exchange {
        metrics: facts.metrics,
        log,
        access_log,
        count: metrics_on,
        consumer: facts.consumer_metrics.filter(|_| metrics_on),
        hook,
        start,
        head,
        upstream: facts.upstream_latency,
        status: resp.status().as_u16(),
        bytes_in,
        bytes_out: 0,
    });
    Ok(resp.map(|b| GatewayBody::new(b, Some(exchange), in_flight, hold)))
}

/// Kong's `X-Kong-Upstream-Latency`, under this gateway's name (milliseconds).
static X_UPSTREAM_LATENCY: HeaderName = HeaderName::from_static("x-gateway-upstream-latency");
/// Kong's `X-Kong-Proxy-Latency`, under this gateway's name (milliseconds).
static X_PROXY_LATENCY: HeaderName = HeaderName::from_static("x-gateway-proxy-latency");

/// An HTTP answer turned into a trailers-only gRPC answer: HTTP 200 with `grpc-status` (the
/// mapping of gRPC's "HTTP to gRPC status code mapping") and `grpc-message` from the body's
/// `message`. The answer is the gateway's own, its body complete (`ResponseBody::Full`).
fn grpc_answer(resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    let code = match parts.status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        500 => 13,
        _ => 2, // UNKNOWN
    };
    let bytes = match body {
        ResponseBody::Full(bytes) => bytes.unwrap_or_default(),
        _ => Bytes::new(),
    };
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| parts.status.canonical_reason().unwrap_or("").to_string());
    // grpc-message is percent-encoded (gRPC's PROTOCOL-HTTP2): anything outside printable
    // ASCII, and `%` itself.
    let mut encoded = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(b as char);
        } else {
            let _ = write!(encoded, "%{b:02X}");
        }
    }
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    parts.headers.insert(HeaderName::from_static("grpc-status"), HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        parts.headers.insert(HeaderName::from_static("grpc-message"), v);
    }
    Response::from_parts(parts, ResponseBody::empty())
}

/// A client's `Upgrade` (WebSocket and the like) when its request asks for one: HTTP/1.1,
/// `Connection: upgrade`, and the `Upgrade` header.
fn upgrade_request(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let wants = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))));
    if !wants {
        // Most requests: no second lookup.
        return None;
    }
    // `h2c` is not passed on: an upstream that took the upgrade would serve HTTP/2 requests
    // for any path through the tunnel, past the router and every plugin (h2c smuggling).
    // The request goes on as a plain HTTP/1.1 one.
    let upgrade = parts.headers.get(header::UPGRADE)?;
    let h2c = upgrade.to_str().map_or(true, |v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
    if h2c { None } else { Some(upgrade.clone()) }
}

/// Joins the client's and the upstream's upgraded connections and copies bytes both ways
/// until either side closes. The tunnel holds no snapshot: reloads do not touch it.
fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, route: Arc<str>) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(route = &*route, error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(route = &*route, up, down, "upgraded connection closed"),
            Err(e) => tracing::debug!(route = &*route, error = %e, "upgraded connection ended with an error"),
        }
    });
}

/// Routing and the request head's checks; for a route without plugins, the upstream request
/// too. See [`Step`] for why this is not async. `forwarded`: `values` name the client a
/// trusted proxy forwarded, not the connection's (see [`route_head`]).
fn route_http(
    snapshot: &Snapshot,
    req: Request<ProxyBody>,
    conn: ConnInfo,
    values: &ConnValues,
    forwarded: bool,
    start: Instant,
    facts: &mut Facts,
) -> Step {
    let request_id = next_request_id();
    let (mut parts, mut body) = req.into_parts();
    let upgrade = upgrade_request(&parts);
    let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    // Before routing and plugins: a client must not be able to name, in `Connection`, a header
    // a plugin sets (`X-Anonymous-Consumer`, `X-Consumer-Groups`) and have it stripped later.
    remove_hop_by_hop(&mut parts.headers);
    let original_pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let normalized = path::normalize(original_pq.path());
    let path: &str = &normalized;
    if path::refused(original_pq.path(), path) {
        return Step::Answer(error_response(StatusCode::BAD_REQUEST, "invalid request path", &request_id));
    }

    // Host: HTTP/2 carries it in :authority, HTTP/1 in the Host header.
    let raw_host = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or(""),
    };
    let (host, host_port) = split_host(raw_host);
    let found = snapshot.router.find(&RouteInput {
        host: &host,
        port: host_port,
        path,
        method: &parts.method,
        headers: &parts.headers,
    });
    let metrics_on = snapshot.observe.metrics;
    let sample_new = snapshot.observe.on_finish.is_some();
    // The route's counters also carry its names, which the access log and the hook show.
    let named = metrics_on || snapshot.observe.access_log || sample_new;
    let Some(found) = found else {
        if named {
            facts.metrics = Some(snapshot.unmatched.clone());
        }
        return Step::Answer(error_response(StatusCode::NOT_FOUND, "no Route matched with those values", &request_id));
    };
    let route = &snapshot.routes[found.route];
    if named {
        facts.metrics = Some(route.metrics.clone());
    }

    if (conn.tls && !route.allow_https) || (!conn.tls && !route.allow_http) {
        return Step::Answer(protocol_mismatch(route.redirect_status, conn.tls, raw_host, &original_pq, &request_id));
    }
    if let Some(failure) = &route.chain.failure {
        tracing::error!(
            route = &*route.name,
            problem = &**failure,
            "route refused: its plugin configuration is invalid"
        );
        return Step::Answer(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "An unexpected error occurred",
            &request_id,
        ));
    }
    let Some(service) = route.service.as_deref() else {
        return Step::Answer(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no Service found with those values",
            &request_id,
        ));
    };
    if service.version == Version::HTTP_2 {
        // A gRPC service (the only HTTP/2 upstreams): a client stream lasts as long as its
        // call. Decided by the route, not by the request, so a client cannot opt out by
        // claiming to be gRPC.
        body.disarm_deadline();
    }

    // Everything the upstream request needs from the head, computed while the head is intact.
    thread_local! {
        static UPSTREAM_PATH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    let pq = UPSTREAM_PATH.with_borrow_mut(|p| {
        let changed = upstream_path(p, service.base_path.as_deref(), path, found.matched_len, route.strip_path);
        if !changed && matches!(normalized, Cow::Borrowed(_)) {
            return Ok(original_pq.clone());
        }
        if !changed {
            p.clear();
            p.push_str(path);
        }
        if let Some(q) = original_pq.query() {
            p.push('?');
            p.push_str(q);
        }
        PathAndQuery::from_maybe_shared(shared_bytes(p.as_bytes()))
    });
    let Ok(pq) = pq else {
        return Step::Answer(error_response(StatusCode::BAD_REQUEST, "invalid request path", &request_id));
    };
    let fwd = Forwarding {
        pq,
        host: shared_value(&host),
        path: shared_value(path),
        prefix: (route.strip_path && found.matched_len > 1).then(|| shared_value(&path[..found.matched_len])).flatten(),
        // The host the router saw is the host the upstream gets: the request target's
        // authority wins over a Host header (RFC 9112 3.2.2).
        client_host: if route.preserve_host {
            match parts.uri.authority() {
                Some(a) => shared_value(a.as_str()),
                None => parts.headers.get(header::HOST).cloned(),
            }
        } else {
            None
        },
        upgrade: if client_upgrade.is_some() { upgrade } else { None },
    };
    // Plugins see the path the router saw (`%61dmin` is `admin` to them too).
    if let (Cow::Owned(p), false) = (&normalized, route.chain.slots.is_empty()) {
        let pq = match original_pq.query() {
            Some(q) => format!("{p}?{q}"),
            None => p.clone(),
        };
        if let Ok(pq) = PathAndQuery::from_maybe_shared(Bytes::from(pq)) {
            let mut uri = parts.uri.clone().into_parts();
            uri.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(uri) {
                parts.uri = uri;
            }
        }
    }
    let slots = &route.chain.slots;
    let route_regex = snapshot.router.regex(&found);
    if slots.is_empty() {
        let cookie = attach_balance_key(service, &mut parts, None, values, path, route_regex.map(|r| &**r));
        let trace = prepare(&mut parts, &body, fwd, &conn, values, &request_id, service.version, sample_new);
        facts.trace = Some(trace);
        return Step::Upstream { route: found.route, parts, body, cookie, client_upgrade, request_id };
    }
    let req = Request::from_parts(parts, body);

    let ctx = RequestContext {
        conn,
        route: route.name.clone(),
        service: Some(service.name.clone()),
        request_id: request_id.clone(),
        started: start,
        consumer: None,
        credential: None,
        extensions: http::Extensions::new(),
        route_regex: route_regex.map(|re| (re.clone(), Box::from(path))),
    };
    let path = service.balancer.hash_spec().map(|_| Box::from(path));
    // A trusted proxy's client: the run's own copy of the values (`handle` knows only the
    // connection's).
    let values = forwarded.then(|| values.clone());
    let run = PluginRun { route: found.route, fwd: Some(fwd), ctx, values, request_id, client_upgrade, path };
    Step::Plugins { run: Box::new(run), req }
}

/// How far the access hooks got ([`access_sync`]).
enum Access {
    /// A plugin answered the request.
    Answered(Response<ResponseBody>),
    /// Every hook let the request pass.
    Passed,
    /// Stopped before the slot at this index, whose plugin is async.
    Async(usize),
}

/// The consumer an authentication plugin identified, by index: what picks a slot's instance.
fn consumer_index(ctx: &RequestContext) -> Option<usize> {
    ctx.consumer.as_ref().map(|c| c.index)
}

/// Runs the access hooks from slot `from` on, in plugin order, up to the first async one.
fn access_sync(
    slots: &[crate::chain::Slot],
    from: usize,
    ctx: &mut RequestContext,
    req: &mut Request<ProxyBody>,
) -> Access {
    for (i, slot) in slots.iter().enumerate().skip(from) {
        let Some(p) = slot.pick(consumer_index(ctx)) else { continue };
        if p.is_async() {
            return Access::Async(i);
        }
        if let ControlFlow::Break(answer) = p.access(ctx, req) {
            return Access::Answered(answer);
        }
    }
    Access::Passed
}

/// A plugin's answer, as the client gets it: the request's id, and counted as the plugin's.
fn plugin_answered(
    snapshot: &Snapshot,
    route: &RouteRuntime,
    mut answer: Response<ResponseBody>,
    run: &mut PluginRun,
) -> Response<ResponseBody> {
    let id = std::mem::replace(&mut run.request_id, HeaderValue::from_static(""));
    answer.headers_mut().insert(X_REQUEST_ID.clone(), id);
    if snapshot.observe.metrics {
        route.metrics.plugin_answered(answer.status());
    }
    answer
}

/// The upstream request of a run whose access hooks all passed: the balancing key, the
/// forwarding headers and path ([`prepare`]), then the `before_upstream` hooks. Returns the
/// request and the `Set-Cookie` value of `hash_on: cookie`.
fn plugins_upstream(
    snapshot: &Snapshot,
    run: &mut PluginRun,
    req: Request<ProxyBody>,
    values: &ConnValues,
    facts: &mut Facts,
) -> (Request<ProxyBody>, Option<HeaderValue>) {
    let (route, service) = routed(snapshot, run.route);
    let consumer_id = run.ctx.consumer.as_ref().map(|c| &*c.id);
    let regex = run.ctx.route_regex.as_ref().map(|(re, _)| &**re);
    let path = run.path.as_deref().unwrap_or("");
    let (mut parts, body) = req.into_parts();
    let cookie = attach_balance_key(service, &mut parts, consumer_id, values, path, regex);
    let fwd = run.fwd.take().expect("a run's upstream request is prepared once");
    let sample_new = snapshot.observe.on_finish.is_some();
    let trace = prepare(&mut parts, &body, fwd, &run.ctx.conn, values, &run.request_id, service.version, sample_new);
    facts.trace = Some(trace);
    let mut up = Request::from_parts(parts, body);
    for slot in route.chain.slots.iter() {
        if let Some(p) = slot.pick(consumer_index(&run.ctx)) {
            p.before_upstream(&mut run.ctx, &mut up);
        }
    }
    (up, cookie)
}

/// What every answer to a routed request gets before plugins see it: the balancing cookie
/// (`hash_on: cookie`, when the key was made up), and the tunnel when the upstream switched
/// protocols.
fn deliver(
    resp: &mut Response<ResponseBody>,
    cookie: Option<HeaderValue>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    route: &Arc<str>,
) {
    if let Some(c) = cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    finish_upgrade(resp, client_upgrade, route);
}

/// The end of a run, on the answer (the upstream's or a plugin's, already [`deliver`]ed): the
/// response hooks in reverse plugin order, the log hooks, and what the log and the metrics
/// learn of the consumer.
fn plugins_respond(snapshot: &Snapshot, run: &mut PluginRun, resp: &mut Response<ResponseBody>, facts: &mut Facts) {
    let slots = &snapshot.routes[run.route].chain.slots;
    let ctx = &mut run.ctx;
    for slot in slots.iter().rev() {
        if let Some(p) = slot.pick(consumer_index(ctx)) {
            p.response(ctx, resp);
        }
    }
    let status = resp.status();
    for slot in slots.iter() {
        if let Some(p) = slot.pick(consumer_index(ctx)) {
            p.log(ctx, status);
        }
    }
    facts.consumer = ctx.consumer.as_ref().map(|c| c.username.clone().unwrap_or_else(|| c.id.clone()));
    if let Some(c) = &ctx.consumer {
        facts.consumer_metrics = snapshot.consumer_metrics.get(c.index).cloned();
    }
}

/// The rest of a run that [`handle`] could not finish at once: the access hooks from slot
/// `from` on (the first async one), the upstream call (through the route's layers, if any),
/// then the response and log hooks.
///
/// The run stays in its box, used in place: moving its fields out would copy them into this
/// future's state.
async fn run_plugins(
    snapshot: &Snapshot,
    mut run: Box<PluginRun>,
    mut req: Request<ProxyBody>,
    from: usize,
    facts: &mut Facts,
) -> Response<ResponseBody> {
    let (route, service) = routed(snapshot, run.route);
    let slots = &route.chain.slots;
    let mut answered = None;
    let mut from = from;
    while from < slots.len() {
        match access_sync(slots, from, &mut run.ctx, &mut req) {
            Access::Answered(answer) => {
                answered = Some(answer);
                break;
            }
            Access::Passed => break,
            Access::Async(i) => {
                let p = slots[i].pick(consumer_index(&run.ctx)).expect("access_sync stopped at a plugin");
                if let ControlFlow::Break(answer) = p.access_async(&mut run.ctx, &mut req).await {
                    answered = Some(answer);
                    break;
                }
                from = i + 1;
            }
        }
    }
    let mut cookie = None;
    let mut resp = match answered {
        Some(answer) => plugin_answered(snapshot, route, answer, &mut run),
        None => {
            let values = run.values.take().expect("a run in a future of its own has the connection's values");
            let up;
            (up, cookie) = plugins_upstream(snapshot, &mut run, req, &values, facts);
            let sent = Instant::now();
            let resp = match &route.upstream {
                Some(layered) => {
                    let resp = tower::ServiceExt::oneshot(layered.clone(), up).await.unwrap_or_else(|e| match e {});
                    facts.upstream = resp.extensions().get::<UpstreamTarget>().map(|t| t.0.clone());
                    resp
                }
                None => {
                    let (parts, body) = up.into_parts();
                    let (resp, target) = call_upstream(&**service, route.preserve_host, parts, body, None).await;
                    facts.upstream = target;
                    resp
                }
            };
            facts.upstream_latency = Some(sent.elapsed());
            resp
        }
    };
    deliver(&mut resp, cookie, run.client_upgrade.take(), &route.name);
    plugins_respond(snapshot, &mut run, &mut resp, facts);
    resp
}

/// Consistent hashing: puts the request's key in its extensions for the balancer, and returns
/// the `Set-Cookie` value when `hash_on: cookie` had to make the key up.
fn attach_balance_key(
    service: &ServiceRuntime,
    req: &mut http::request::Parts,
    consumer: Option<&str>,
    values: &ConnValues,
    path: &str,
    regex: Option<&regex::Regex>,
) -> Option<HeaderValue> {
    let spec = service.balancer.hash_spec()?;
    let capture = |name: &str| {
        let caps = regex?.captures(path)?;
        match name.parse::<usize>() {
            Ok(i) => caps.get(i),
            Err(_) => caps.name(name),
        }
        .map(|m| m.as_str().to_string())
    };
    let input = KeyInput {
        consumer,
        client_ip: &values.client_ip,
        headers: &req.headers,
        path,
        query: req.uri.query(),
        capture: &capture,
    };
    let (key, cookie) = spec.key(&input);
    if let Some(k) = key {
        req.extensions.insert(BalanceKey(k));
    }
    cookie
}

/// When the upstream agreed to switch protocols, starts the tunnel between the two upgraded
/// connections (hyper hands them over once the 101 is written to the client).
fn finish_upgrade(resp: &mut Response<ResponseBody>, client: Option<hyper::upgrade::OnUpgrade>, route: &Arc<str>) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    match (client, resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()) {
        (Some(client), Some(upstream)) => tunnel(client, upstream, route.clone()),
        _ => {
            // A 101 nobody asked for (or a plugin answered it): nothing to join.
            tracing::warn!(route = &**route, "101 response without an upgrade on both sides; answering 502");
            *resp = error_response(
                StatusCode::BAD_GATEWAY,
                "An invalid response was received from the upstream server",
                resp.headers().get(&X_REQUEST_ID).unwrap_or(&HeaderValue::from_static("")),
            );
        }
    }
}

/// Why the upstream call failed, in the extensions of the gateway's own 502/503/504 answers,
/// so that layers (retries, circuit breaking) can tell failures apart without parsing bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection could be made (refused, unreachable, connect timeout): nothing was sent.
    Connect,
    /// The upstream did not answer in time (read or write timeout).
    Timeout,
    /// The connection broke or the answer was not valid HTTP.
    Protocol,
    /// No target was available.
    NoTarget,
    /// The client's request body broke while it was sent, or did not arrive in time (answered
    /// 400 or 408; the upstream is not blamed).
    ClientBody,
}

/// A filter a layer puts in the request extensions to steer target choice: the balancer skips
/// targets for which it returns `false` (a circuit breaker keeps open targets out). When it
/// refuses every target the answer is 503 with [`UpstreamFailure::NoTarget`].
#[derive(Clone)]
pub struct TargetFilter(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl std::fmt::Debug for TargetFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TargetFilter")
    }
}

/// The upstream target that answered, in the response extensions of a layered call.
#[derive(Debug, Clone)]
pub struct UpstreamTarget(pub Arc<str>);

/// The upstream call as a tower service: what plugin layers wrap. Built once per route.
#[derive(Clone)]
pub(crate) struct UpstreamCall {
    pub(crate) service: Arc<ServiceRuntime>,
    pub(crate) preserve_host: bool,
}

impl tower_service::Service<Request<ProxyBody>> for UpstreamCall {
    type Response = Response<ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = crate::plugin::BoxFuture<'static, Result<Response<ResponseBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let (mut resp, target) = call_upstream(&*this.service, this.preserve_host, parts, body, None).await;
            if let Some(t) = target {
                resp.extensions_mut().insert(UpstreamTarget(t));
            }
            Ok(resp)
        })
    }
}

type Failure = (StatusCode, &'static str, UpstreamFailure);

fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE].contains(m)
}

/// Sends a prepared request to one of the service's targets, retrying connection-level
/// failures on another target; answers failures as JSON errors.
///
/// One future for the whole call, its state built before it starts: an `async fn` keeps its
/// arguments twice in its state (as arguments, and as the locals they move into), and a
/// future nested in another keeps what it was handed beside what its parent still holds; both
/// are written and copied with the request's future on every request. `request_id`: the
/// request's `X-Request-Id` when the caller knows it (a hashed lookup otherwise: plugins and
/// layers may have set another).
///
/// `service`: a reference, or an `Arc` when the future must own it ([`handle`]'s).
///
/// Always inlined: built out of line, the future (hundreds of bytes) is returned through a
/// temporary and copied into the request's future, once more per request.
#[inline(always)]
fn call_upstream<S>(
    service: S,
    preserve_host: bool,
    parts: http::request::Parts,
    body: ProxyBody,
    request_id: Option<HeaderValue>,
) -> impl Future<Output = (Response<ResponseBody>, Option<Arc<str>>)> + Send
where
    S: std::ops::Deref<Target = ServiceRuntime> + Send,
{
    let request_id = request_id.or_else(|| parts.headers.get(&X_REQUEST_ID).cloned()).unwrap_or_else(next_request_id);
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let (mut body, slot) = if service.retries > 0 && !http_body::Body::is_end_stream(&body) {
        let (b, s) = body.defer();
        (b, Some(s))
    } else {
        (body, None)
    };
    // Only when a retry can be sent: the first attempt takes the headers themselves.
    let copy = (service.retries > 0).then(|| HeadersCopy::of(&parts.headers));
    let filter = parts.extensions.get::<TargetFilter>().cloned();
    let key = parts.extensions.get::<BalanceKey>().map(|k| k.0);
    // What the attempts need of the request's head: not the head itself (224 bytes), which
    // would stay in the call's future for its whole length.
    let (method, mut headers) = (parts.method, parts.headers);
    async move {
        let service: &ServiceRuntime = &service;
        let mut target_label = None;
        let mut attempt = 0u32;
        let mut failed: Option<&TargetRuntime> = None;
        let result = loop {
            let picked = match &filter {
                None => service.balancer.pick(key, failed, &|_| true),
                Some(f) => service.balancer.pick(key, failed, &|t| (f.0)(&t.label)),
            };
            let Some(target) = picked else {
                break Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "failure to get a peer from the ring-balancer",
                    UpstreamFailure::NoTarget,
                ));
            };
            target_label = Some(target.label.clone());
            let last = attempt >= service.retries;
            let in_flight = service.balancer.begin(target);
            // Each branch builds its request inside the call that takes it: a request held in
            // a local would keep its 272 bytes in this future's state across the await.
            let request = |headers: &mut HeaderMap, body, uri| {
                attempt_request(
                    &method,
                    headers,
                    copy.as_ref(),
                    attempt,
                    body,
                    service.version,
                    target,
                    preserve_host,
                    uri,
                )
            };
            let sent = match &target.client {
                TargetClient::Pool(pool) => {
                    // HTTP/1.1 to the target itself: origin form (authority form for CONNECT).
                    let uri = if method == http::Method::CONNECT {
                        Uri::from(target.authority.clone())
                    } else {
                        Uri::from(pq.clone())
                    };
                    pool.send(request(&mut headers, body, uri)).await
                }
                TargetClient::Shared(client) => {
                    let uri = Uri::from_parts({
                        let mut p = http::uri::Parts::default();
                        p.scheme = Some(service.scheme.clone());
                        p.authority = Some(target.authority.clone());
                        p.path_and_query = Some(pq.clone());
                        p
                    })
                    .expect("scheme, authority and path make a URI");
                    let mut req = request(&mut headers, body, uri);
                    // After a DNS change, find out which address this request's shared
                    // connection goes to, and retire it if the answer dropped that address (see
                    // `crate::dns`); rare, so the capture's allocation is paid only then.
                    let capture = target.dns.as_ref().filter(|e| e.retiring()).map(|_| capture_connection(&mut req));
                    let sent = client.request(req).await;
                    if let (Ok(resp), Some(capture), Some(entry)) = (&sent, capture, &target.dns)
                        && let Some(info) = resp.extensions().get::<HttpInfo>()
                        && !entry.current(info.remote_addr().ip())
                        && let Some(conn) = capture.connection_metadata().as_ref()
                    {
                        conn.poison();
                    }
                    sent.map(|r| r.map(crate::body::UpstreamBody::from)).map_err(pool::SendError::Client)
                }
            };
            match judge(service, target, in_flight, sent, &method, (attempt, last), slot.as_ref()) {
                Judged::Done(result) => break result,
                Judged::Retry(b) => {
                    body = b;
                    attempt += 1;
                    failed = Some(target);
                }
            }
        };
        (answer(result, request_id), target_label)
    }
}

/// What became of one attempt.
enum Judged {
    /// The call's outcome: an answer, or a failure that is not retried.
    Done(Result<Response<crate::body::UpstreamBody>, Failure>),
    /// Failed, and retried with this body.
    Retry(ProxyBody),
}

/// Reports an attempt's outcome to the balancer and decides whether it is retried: connection
/// failures for any method (nothing was sent), other failures only for idempotent methods and
/// only while the body is still ours, never past the last attempt. `(attempt, last)`: the
/// attempt's number from 0, and whether it is the last one allowed.
fn judge(
    service: &ServiceRuntime,
    target: &TargetRuntime,
    in_flight: Option<InFlight>,
    sent: Result<Response<crate::body::UpstreamBody>, pool::SendError>,
    method: &http::Method,
    (attempt, last): (u32, bool),
    slot: Option<&crate::body::BodySlot>,
) -> Judged {
    match sent {
        Ok(resp)
            if resp.headers().contains_key(header::TRANSFER_ENCODING)
                && resp.headers().contains_key(header::CONTENT_LENGTH) =>
        {
            // Framed two ways: hyper reads it by Transfer-Encoding, but the Content-Length
            // passed on would frame it differently downstream. A protocol failure of the
            // target; the unread body keeps the connection out of the pool.
            drop(in_flight);
            service.balancer.report(target, Err(Outcome::TcpFailure));
            tracing::warn!(
                service = &*service.name,
                upstream = &*target.label,
                "upstream response has both Content-Length and Transfer-Encoding"
            );
            Judged::Done(Err((
                StatusCode::BAD_GATEWAY,
                "An invalid response was received from the upstream server",
                UpstreamFailure::Protocol,
            )))
        }
        Ok(mut resp) => {
            if let Some(f) = in_flight {
                f.answered();
                // Still in flight until the body is sent: `GatewayBody` holds it.
                resp.extensions_mut().insert(Arc::new(f));
            }
            service.balancer.report(target, Ok(resp.status()));
            Judged::Done(Ok(resp))
        }
        Err(err) => {
            drop(in_flight);
            // The client's body failed (broken, or too slow): its fault, not the target's.
            if let Some((status, message)) = crate::body::ClientBodyError::find(&err).map(|c| c.answer()) {
                tracing::info!(service = &*service.name, error = %error_chain(&err), "client request body failed");
                return Judged::Done(Err((status, message, UpstreamFailure::ClientBody)));
            }
            let timeout = is_timeout(&err);
            service.balancer.report(target, Err(if timeout { Outcome::Timeout } else { Outcome::TcpFailure }));
            let retryable = err.is_connect() || (!timeout && is_idempotent(method));
            let retry_body = if retryable && !last {
                match slot {
                    None => Some(ProxyBody::Empty),
                    Some(slot) => slot.reclaim(),
                }
            } else {
                None
            };
            tracing::warn!(
                service = &*service.name,
                upstream = &*target.label,
                attempt = attempt + 1,
                retrying = retry_body.is_some(),
                error = %error_chain(&err),
                "upstream request failed"
            );
            match retry_body {
                Some(b) => Judged::Retry(b),
                None => Judged::Done(Err(if timeout {
                    (StatusCode::GATEWAY_TIMEOUT, "The upstream server is timing out", UpstreamFailure::Timeout)
                } else {
                    let kind = if err.is_connect() { UpstreamFailure::Connect } else { UpstreamFailure::Protocol };
                    (StatusCode::BAD_GATEWAY, "An invalid response was received from the upstream server", kind)
                })),
            }
        }
    }
}

/// The client's answer to an upstream call: the upstream's response made ready to pass on, or
/// the gateway's JSON error for a failure.
fn answer(
    result: Result<Response<crate::body::UpstreamBody>, Failure>,
    request_id: HeaderValue,
) -> Response<ResponseBody> {
    match result {
        Ok(resp) => {
            let (mut rparts, rbody) = resp.into_parts();
            let switching = (rparts.status == StatusCode::SWITCHING_PROTOCOLS)
                .then(|| rparts.headers.get(header::UPGRADE).cloned())
                .flatten();
            remove_hop_by_hop_from_response(&mut rparts.headers);
            if let Some(protocol) = switching {
                rparts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                rparts.headers.insert(header::UPGRADE, protocol);
            }
            append_via(&mut rparts.headers, rparts.version);
            rparts.headers.insert(X_REQUEST_ID.clone(), request_id);
            rparts.version = Version::HTTP_11;
            Response::from_parts(rparts, ResponseBody::Upstream(rbody))
        }
        Err((status, message, kind)) => {
            let mut resp = error_response(status, message, &request_id);
            resp.extensions_mut().insert(kind);
            resp
        }
    }
}

/// RFC 9113 8.2.3: HTTP/2 may split `cookie` into several fields; HTTP/1.1 needs one.
fn join_cookies(h: &mut HeaderMap) {
    let mut values = h.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined = BytesMut::with_capacity(256);
    for (i, v) in h.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.put_slice(b"; ");
        }
        joined.put_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(joined.freeze()) {
        h.insert(header::COOKIE, v);
    }
}

/// The forwarding headers of the upstream request (`X-Forwarded-*`, `X-Real-IP`,
/// `X-Request-Id`, `Via`), with hop-by-hop headers and a client's `Forwarded` stripped.
/// Returns whether the client sent a `tracestate` (found by the same scan of the names).
#[allow(clippy::too_many_arguments)] // one call site; the values are computed at different times
fn set_forwarding_headers(
    h: &mut HeaderMap,
    conn: &ConnInfo,
    values: &ConnValues,
    host: Option<HeaderValue>,
    path: Option<HeaderValue>,
    prefix: Option<HeaderValue>,
    request_id: &HeaderValue,
    version: Version,
) -> bool {
    // One pass over the names finds what there is to strip: removing an absent header still
    // hashes its name (a custom name byte by byte), and most requests carry none of these.
    let (mut hop_by_hop, mut forwarded, mut prefix_sent, mut tracestate_sent) = (false, false, false, false);
    for name in h.keys() {
        hop_by_hop |= is_hop_by_hop(name);
        forwarded |= name == header::FORWARDED;
        prefix_sent |= name == X_FORWARDED_PREFIX;
        tracestate_sent |= name == TRACESTATE;
    }
    if hop_by_hop {
        remove_hop_by_hop_present(h, true);
    }
    if forwarded {
        h.remove(header::FORWARDED);
    }
    // A trusted proxy's `X-Forwarded-For` is extended and its other `X-Forwarded-*` headers
    // kept (Kong's `trusted_ips`); anyone else's are replaced, so a client cannot claim
    // another address, scheme or host.
    let trusted = values.trusted.is_some();
    let xff = match trusted.then(|| h.get(&X_FORWARDED_FOR)).flatten() {
        None => Some(values.ip.clone()),
        Some(_) => {
            let mut joined = BytesMut::with_capacity(64);
            for v in h.get_all(&X_FORWARDED_FOR) {
                joined.put_slice(v.as_bytes());
                joined.put_slice(b", ");
            }
            joined.put_slice(values.ip.as_bytes());
            HeaderValue::from_maybe_shared(joined.freeze()).ok()
        }
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(X_REAL_IP.clone(), values.client_ip.clone());
    let mut set = |name: &HeaderName, v: Option<HeaderValue>| {
        if trusted && h.contains_key(name) {
            return;
        }
        match v {
            Some(v) => h.insert(name.clone(), v),
            None => h.remove(name),
        };
    };
    set(&X_FORWARDED_PROTO, Some(HeaderValue::from_static(if conn.tls { "https" } else { "http" })));
    set(&X_FORWARDED_HOST, host);
    set(&X_FORWARDED_PORT, Some(values.port.clone()));
    set(&X_FORWARDED_PATH, path);
    if prefix.is_some() || prefix_sent {
        set(&X_FORWARDED_PREFIX, prefix);
    }
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    append_via(h, version);
    tracestate_sent
}

/// A request's headers kept for a retry, as one flat byte string: for each header in the
/// map's order, the lengths of its name and value and whether the value is sensitive (7 bytes,
/// written at once), then the name and the value. Taken once before the first attempt,
/// whose request takes the headers themselves, and read back into a map only when a retry is
/// actually sent.
///
/// Hand-written because `HeaderMap::clone` costs more for the headers a client sends: it
/// allocates the map's two tables, copies every 100-byte entry and clones each name and value
/// through `Bytes`' vtable, and a custom name parsed by hyper is `Vec`-backed, so its first
/// clone allocates to share it. Measured (callgrind): a kept clone and its drop cost about 600
/// instructions per custom client header, this copy about 130; for the gateway's own
/// headers (static names, shared values) the two cost about the same, some 1,400 for ten.
struct HeadersCopy(Vec<u8>);

impl HeadersCopy {
    fn of(headers: &HeaderMap) -> Self {
        // One pass: a guess at the size (most headers are shorter; a long cookie or token
        // grows it once) costs less than a first pass over the map to add up the lengths.
        // A `Vec`, not `BytesMut`: its fixed-size writes compile to plain stores, where each
        // `BufMut::put_*` is a `memcpy` call; and not frozen into `Bytes`, which allocates
        // again for a `Vec` not filled to its capacity.
        let mut b = Vec::with_capacity(headers.len() * 96);
        for (k, v) in headers {
            let name = k.as_str().as_bytes();
            // A name is at most 64 KiB (`http` refuses longer ones); a value can be longer.
            let [n0, n1] = (name.len() as u16).to_be_bytes();
            let [l0, l1, l2, l3] = (v.len() as u32).to_be_bytes();
            b.extend_from_slice(&[n0, n1, u8::from(v.is_sensitive()), l0, l1, l2, l3]);
            b.extend_from_slice(name);
            b.extend_from_slice(v.as_bytes());
        }
        HeadersCopy(b)
    }

    /// The headers as they were copied: the same names, values, order and sensitivity.
    fn restore(&self) -> HeaderMap {
        use bytes::Buf;
        let mut rest = &self.0[..];
        let mut headers = HeaderMap::new();
        while rest.remaining() >= 7 {
            let n = usize::from(rest.get_u16());
            let sensitive = rest.get_u8() == 1;
            let len = rest.get_u32() as usize;
            let (name, tail) = rest.split_at(n);
            let (value, tail) = tail.split_at(len);
            rest = tail;
            // Neither can fail: both were a valid name and value when copied.
            if let (Ok(name), Ok(mut value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                value.set_sensitive(sensitive);
                headers.append(name, value);
            }
        }
        headers
    }
}

/// One attempt's request to `target`.
#[allow(clippy::too_many_arguments)] // one call site, the closure in `call_upstream`
fn attempt_request(
    method: &http::Method,
    headers: &mut HeaderMap,
    copy: Option<&HeadersCopy>,
    attempt: u32,
    body: ProxyBody,
    version: Version,
    target: &TargetRuntime,
    preserve_host: bool,
    uri: Uri,
) -> Request<ProxyBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.version_mut() = version;
    *req.uri_mut() = uri;
    // The headers themselves go upstream first: a map keeps its capacity as hyper passes it on
    // (a request's map becomes the connection's next response map, and that the next
    // request's), while a new map would grow again with every request's added headers. A
    // retry reads the copy back.
    *req.headers_mut() = match (copy, attempt) {
        (Some(copy), 1..) => copy.restore(),
        _ => std::mem::take(headers),
    };
    // The client's `Host` when preserved (an HTTP/2 client's `:authority` is in it by now);
    // the target's otherwise.
    if !preserve_host || !req.headers().contains_key(header::HOST) {
        req.headers_mut().insert(header::HOST, target.host_header.clone());
    }
    req
}

fn protocol_mismatch(
    status: StatusCode,
    tls: bool,
    raw_host: &str,
    pq: &PathAndQuery,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    if status == StatusCode::UPGRADE_REQUIRED || tls {
        let mut resp = error_response(StatusCode::UPGRADE_REQUIRED, "Please use HTTPS protocol", request_id);
        if status == StatusCode::UPGRADE_REQUIRED && !tls {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("TLS/1.2, HTTP/1.1"));
        }
        return resp;
    }
    let mut resp = error_response(status, "Please use HTTPS protocol", request_id);
    if let Ok(loc) = HeaderValue::from_str(&format!("https://{}{}", split_host(raw_host).0, pq)) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_copy_restores_every_header_as_it_was() {
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("example.com"));
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append("x-custom", HeaderValue::from_static("one"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append("x-custom", HeaderValue::from_static(""));
        h.append(header::ACCEPT, HeaderValue::from_bytes(b"caf\xe9 \x80 obs-text").unwrap());
        let mut secret = HeaderValue::from_static("Bearer t");
        secret.set_sensitive(true);
        h.append(header::AUTHORIZATION, secret);
        h.append("x-long", HeaderValue::from_bytes(&vec![b'v'; 70_000]).unwrap());
        let name = "x-".to_string() + &"n".repeat(1000);
        h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("long name"));

        let copy = HeadersCopy::of(&h);
        for _ in 0..2 {
            let back = copy.restore();
            let pairs = |m: &HeaderMap| {
                m.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec(), v.is_sensitive())).collect::<Vec<_>>()
            };
            assert_eq!(pairs(&back), pairs(&h));
            assert!(back.get(header::AUTHORIZATION).unwrap().is_sensitive());
            assert!(!back.get(header::HOST).unwrap().is_sensitive());
            assert_eq!(back.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1", "b=2"]);
        }
        assert!(HeadersCopy::of(&HeaderMap::new()).restore().is_empty());
    }

    #[test]
    fn v0_path_joining_matches_kong() {
        // (service path, request path, matched length, strip) -> upstream path
        let cases: &[(Option<&str>, &str, usize, bool, &str)] = &[
            (Some("/api/"), "/foo/bar", 4, true, "/api/bar"),
            (Some("/api/"), "/foo/bar", 4, false, "/api/foo/bar"),
            (Some("/api/"), "/foo", 4, true, "/api"),
            (Some("/api/"), "/foo/", 4, true, "/api/"),
            (Some("/api"), "/foo/bar", 4, true, "/api/bar"),
            (Some("/api"), "/foo", 4, true, "/api"),
            (Some("/api"), "/foo/", 4, true, "/api/"),
            (Some("/api"), "/foobar", 4, true, "/api/bar"),
            (Some("/api"), "/foo/bar", 4, false, "/api/foo/bar"),
            (Some("/api"), "/", 1, false, "/api"),
            (None, "/foo/bar", 4, true, "/bar"),
            (None, "/foo", 4, true, "/"),
            (None, "/foobar", 4, true, "/bar"),
            (Some("/api"), "/", 1, true, "/api"),
            (Some("/api/v1"), "/foo../admin", 4, true, "/api/v1/admin"),
            (Some("/api/v1"), "/foo..", 4, true, "/api/v1"),
        ];
        let mut out = String::from("left over from the last request");
        for (base, req, m, strip, want) in cases {
            let changed = upstream_path(&mut out, *base, req, *m, *strip);
            let got = if changed { out.as_str() } else { req };
            assert_eq!(got, *want, "base {base:?} req {req} matched {m} strip {strip}");
            assert_eq!(changed, req != want, "changed is said only of a changed path: {base:?} {req}");
        }
        assert!(!upstream_path(&mut out, None, "/x", 2, false), "no copy when nothing changes");
        assert!(!upstream_path(&mut out, None, "/x/y", 1, true), "route / with strip_path: the same path");
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        let mut t = HeaderMap::new();
        t.insert(header::TE, HeaderValue::from_static("trailers"));
        remove_hop_by_hop(&mut t);
        assert!(t.contains_key(header::TE), "TE: trailers is end-to-end for gRPC");
        remove_hop_by_hop_from_response(&mut t);
        assert!(t.is_empty(), "TE never goes back to a client");
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let a = next_request_id();
        let b = next_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }

    #[test]
    fn per_request_bytes_keep_their_content_and_share_buffers() {
        let values: Vec<(String, Bytes)> = (0..2000)
            .map(|i| {
                let s = format!("/path/{i}/{}", "x".repeat(i % 50));
                let b = shared_bytes(s.as_bytes());
                (s, b)
            })
            .collect();
        for (s, b) in &values {
            assert_eq!(&b[..], s.as_bytes());
        }
        // Cut one after another from one buffer (except where a new buffer began).
        let adjacent = values.windows(2).filter(|w| w[1].1.as_ptr() == w[0].1.as_ptr().wrapping_add(w[0].1.len()));
        assert!(adjacent.count() > 1900, "values should share buffers");
        let long = "y".repeat(5000);
        assert_eq!(&shared_bytes(long.as_bytes())[..], long.as_bytes());
        assert_eq!(shared_value("a\nb"), None, "invalid header values are refused");
    }

    #[test]
    fn error_bodies_are_kong_shaped_json() {
        let id = HeaderValue::from_static("abc");
        let resp = error_response(StatusCode::NOT_FOUND, "no Route matched with those values", &id);
        let ResponseBody::Full(Some(b)) = resp.body() else { panic!("full body") };
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        assert_eq!(v, serde_json::json!({"message": "no Route matched with those values", "request_id": "abc"}));
        assert_eq!(resp.headers()["x-request-id"], "abc");
    }
}
