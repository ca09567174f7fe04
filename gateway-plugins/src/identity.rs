//! What authentication plugins share: the consumer headers the upstream receives, and the
//! rule that clients can never send those headers themselves.

use std::sync::Arc;

use gateway_core::body::ProxyBody;
use gateway_core::plugin::{Answer, BuildContext, ConsumerInfo, RequestContext};
use http::{HeaderMap, HeaderName, HeaderValue, Request};

/// `X-Consumer-ID`
pub static CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
/// `X-Consumer-Username`
pub static CONSUMER_USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");
/// `X-Consumer-Custom-ID`
pub static CONSUMER_CUSTOM_ID: HeaderName = HeaderName::from_static("x-consumer-custom-id");
/// `X-Credential-Identifier`
pub static CREDENTIAL_IDENTIFIER: HeaderName = HeaderName::from_static("x-credential-identifier");
/// `X-Anonymous-Consumer`
pub static ANONYMOUS_CONSUMER: HeaderName = HeaderName::from_static("x-anonymous-consumer");
/// `X-Consumer-Groups`
pub static CONSUMER_GROUPS: HeaderName = HeaderName::from_static("x-consumer-groups");

/// The identity headers, in the order of [`present`]'s bits.
fn identity_headers() -> [&'static HeaderName; 6] {
    [
        &CONSUMER_ID,
        &CONSUMER_USERNAME,
        &CONSUMER_CUSTOM_ID,
        &CREDENTIAL_IDENTIFIER,
        &ANONYMOUS_CONSUMER,
        &CONSUMER_GROUPS,
    ]
}

/// Whether `name` is an identity header: the gateway sets them, so no plugin may read a
/// credential from one (`key_names`, jwt's `header_names`); the plugin's build refuses it.
pub fn is_identity_header(name: &HeaderName) -> bool {
    identity_headers().contains(&name)
}

/// Which identity headers `h` holds, as bits in [`identity_headers`]' order. One pass over
/// the names, so that absent headers are not removed one by one: a remove hashes the name
/// byte by byte even when there is nothing to remove, and most requests carry none.
fn present(h: &HeaderMap) -> u8 {
    let mut bits = 0;
    for name in h.keys() {
        let name = name.as_str();
        if (name.starts_with("x-consumer-") || name.starts_with("x-credential-") || name.starts_with("x-anonymous-"))
            && let Some(i) = identity_headers().iter().position(|n| n.as_str() == name)
        {
            bits |= 1 << i;
        }
    }
    bits
}

/// Sets the identity headers to `values` (in [`identity_headers`]' order): a header with a
/// value is inserted (an insert replaces), one without is removed when present.
fn set_identity_headers(h: &mut HeaderMap, values: [Option<&HeaderValue>; 6]) {
    let bits = present(h);
    for (i, (name, value)) in identity_headers().into_iter().zip(values).enumerate() {
        match value {
            Some(v) => {
                h.insert(name.clone(), v.clone());
            }
            None if bits & (1 << i) != 0 => {
                h.remove(name);
            }
            None => {}
        }
    }
}

/// Removes every identity header a client (or an earlier plugin) set.
pub fn strip_identity_headers(req: &mut Request<ProxyBody>) {
    set_identity_headers(req.headers_mut(), [None; 6]);
}

/// A consumer and credential with the header values the upstream receives, computed once
/// when the plugin is built so that authenticating a request allocates nothing.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The consumer.
    pub consumer: Arc<ConsumerInfo>,
    /// The credential's identifier (`None` for the anonymous consumer).
    pub credential: Option<Arc<str>>,
    id: Option<HeaderValue>,
    username: Option<HeaderValue>,
    custom_id: Option<HeaderValue>,
    credential_value: Option<HeaderValue>,
}

impl Identity {
    /// Prepares the headers of `consumer` authenticated by `credential`.
    pub fn new(consumer: Arc<ConsumerInfo>, credential: Option<Arc<str>>) -> Self {
        let value = |s: &str| HeaderValue::from_str(s).ok();
        Identity {
            id: value(&consumer.id),
            username: consumer.username.as_deref().and_then(value),
            custom_id: consumer.custom_id.as_deref().and_then(value),
            credential_value: credential.as_deref().and_then(value),
            consumer,
            credential,
        }
    }
}

/// Records an authenticated consumer and sets the headers the upstream receives; every other
/// identity header, whether a client or an earlier plugin set it, is removed. A header both
/// present and set is replaced in one insert.
pub fn set_consumer(ctx: &mut RequestContext, req: &mut Request<ProxyBody>, who: &Identity, anonymous: bool) {
    let anonymous_value = HeaderValue::from_static("true");
    let values = [
        who.id.as_ref(),
        who.username.as_ref(),
        who.custom_id.as_ref(),
        who.credential_value.as_ref().filter(|_| !anonymous),
        Some(&anonymous_value).filter(|_| anonymous),
        None,
    ];
    set_identity_headers(req.headers_mut(), values);
    ctx.consumer = Some(who.consumer.clone());
    ctx.credential = if anonymous { None } else { who.credential.clone() };
}

/// Finds the consumer an `anonymous` setting names (by id, username or custom_id).
pub fn find_consumer(consumers: &[Arc<ConsumerInfo>], key: &str) -> Option<Arc<ConsumerInfo>> {
    consumers
        .iter()
        .find(|c| &*c.id == key || c.username.as_deref() == Some(key) || c.custom_id.as_deref() == Some(key))
        .cloned()
}

/// The consumer an auth plugin's `anonymous` setting names, checked when the plugin is built.
pub fn anonymous_consumer(build: &BuildContext<'_>, anonymous: Option<&str>) -> Result<Option<Identity>, String> {
    anonymous
        .map(|a| {
            find_consumer(build.consumers(), a)
                .map(|c| Identity::new(c, None))
                .ok_or_else(|| format!("anonymous consumer `{a}` does not exist"))
        })
        .transpose()
}

/// The `WWW-Authenticate` value of a 401: the scheme, and the realm when one is configured.
pub fn www_authenticate(scheme: &str, realm: Option<&str>) -> Result<HeaderValue, String> {
    let value = match realm {
        Some(r) => format!("{scheme} realm=\"{r}\""),
        None => scheme.to_string(),
    };
    HeaderValue::from_str(&value).map_err(|_| "`realm` is not a valid header value".to_string())
}

/// Whether an authentication plugin stays out of this request: a CORS preflight when
/// `run_on_preflight` is off, or, by Kong's rule for several auth plugins with `anonymous`
/// (logical OR), a request another plugin already authenticated.
///
/// On the preflight path the client's identity headers are still stripped: only a request
/// another plugin authenticated keeps the headers that plugin set.
pub fn steps_aside(
    run_on_preflight: bool,
    has_anonymous: bool,
    ctx: &RequestContext,
    req: &mut Request<ProxyBody>,
) -> bool {
    if !run_on_preflight && req.method() == http::Method::OPTIONS {
        strip_identity_headers(req);
        return true;
    }
    has_anonymous && ctx.credential.is_some()
}

/// Kong's rule for a failed authentication: with `anonymous` set the request proceeds as the
/// anonymous consumer (another auth plugin or the upstream decides); otherwise `refuse`
/// answers it.
pub fn anonymous_or(
    ctx: &mut RequestContext,
    req: &mut Request<ProxyBody>,
    anonymous: Option<&Identity>,
    refuse: impl FnOnce(&RequestContext) -> Answer,
) -> std::ops::ControlFlow<Answer> {
    match anonymous {
        Some(anon) => {
            set_consumer(ctx, req, anon, true);
            std::ops::ControlFlow::Continue(())
        }
        None => std::ops::ControlFlow::Break(refuse(ctx)),
    }
}
