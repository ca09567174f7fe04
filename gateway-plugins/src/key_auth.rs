//! `key-auth`: authenticates a consumer by an API key in a header, the query string or the
//! body, with Kong's config fields, messages and upstream headers.
//!
//! ```yaml
//! plugins:
//!   - name: key-auth
//!     config: { key_names: [apikey], hide_credentials: true }
//! consumers:
//!   - username: alice
//!     keyauth_credentials: [{ key: alice-secret-key }]
//! ```
//!
//! Keys are found by a secret-keyed hash and compared in constant time (see `Keys`), so how
//! long a lookup takes says nothing about the stored keys. Whatever the outcome, identity
//! headers sent by the client (`X-Consumer-*`, `X-Credential-Identifier`,
//! `X-Anonymous-Consumer`) never reach the upstream.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::ops::ControlFlow;
use std::sync::Arc;

use gateway_core::body::{ProxyBody, ReadError, read_limited};
use gateway_core::plugin::{Answer, BoxFuture, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::identity::{
    Identity, anonymous_consumer, anonymous_or, is_identity_header, set_consumer, steps_aside, www_authenticate,
};
use crate::transform::set_query;

/// Kong's priority for key-auth.
pub const PRIORITY: i32 = 1250;
/// The largest body read when `key_in_body` is on.
const BODY_LIMIT: usize = 1 << 20;

/// key-auth's config (Kong's fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyAuthConfig {
    /// Where to look for the key: header names, query parameters, body fields. Not an identity
    /// header (`X-Consumer-*`, `X-Credential-Identifier`, `X-Anonymous-Consumer`): the build
    /// refuses it.
    #[serde(default = "default_key_names")]
    pub key_names: Vec<String>,
    /// Remove the key before proxying.
    #[serde(default)]
    pub hide_credentials: bool,
    /// A consumer (id, username or custom_id) to use when no key is given.
    #[serde(default)]
    pub anonymous: Option<String>,
    /// Look in headers.
    #[serde(default = "yes")]
    pub key_in_header: bool,
    /// Look in the query string.
    #[serde(default = "yes")]
    pub key_in_query: bool,
    /// Look in form or JSON bodies (reads the body, up to 1 MiB).
    #[serde(default)]
    pub key_in_body: bool,
    /// Authenticate CORS preflight (`OPTIONS`) requests too.
    #[serde(default = "yes")]
    pub run_on_preflight: bool,
    /// Realm in `WWW-Authenticate`.
    #[serde(default)]
    pub realm: Option<String>,
    /// Kong's field; accepted and ignored.
    #[serde(default)]
    pub tags: Option<serde_json::Value>,
}

fn default_key_names() -> Vec<String> {
    vec!["apikey".to_string()]
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credential {
    key: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    tags: Option<serde_json::Value>,
    #[serde(default)]
    ttl: Option<serde_json::Value>,
    #[serde(default)]
    created_at: Option<serde_json::Value>,
}

struct Found {
    /// The key itself, compared in constant time with the key sent.
    key: Box<[u8]>,
    who: Identity,
}

/// The key-auth plugin.
pub struct KeyAuth {
    config: KeyAuthConfig,
    header_names: Vec<HeaderName>,
    keys: Keys,
    anonymous: Option<Identity>,
    www_authenticate: HeaderValue,
}

/// The factory to register.
pub fn factory()
-> TypedFactory<KeyAuthConfig, impl Fn(KeyAuthConfig, &BuildContext<'_>) -> Result<KeyAuth, String> + Send + Sync> {
    typed_factory("key-auth", PRIORITY, KeyAuth::new).no_consumer().with_credentials(&["keyauth_credentials"])
}

/// The consumers' keys. Found by a hash of the key under a random secret made when the plugin
/// is built (std's SipHash `RandomState`): a client can neither predict nor choose where a key
/// it sends lands, so the time a lookup takes says nothing about the stored keys. The
/// candidate found is then compared with the key in constant time. A SHA-256 digest of the key
/// as the map's key did the same at about 3,600 instructions per request in software SHA-256
/// (less on a CPU with SHA extensions); this costs a tenth of that.
struct Keys {
    secret: std::hash::RandomState,
    by_hash: HashMap<u64, Vec<Found>>,
}

impl Keys {
    fn new() -> Self {
        Keys { secret: std::hash::RandomState::new(), by_hash: HashMap::new() }
    }

    /// Adds a key; `false` when it is there already.
    fn insert(&mut self, found: Found) -> bool {
        if self.get(&found.key).is_some() {
            return false;
        }
        self.by_hash.entry(self.secret.hash_one(&*found.key)).or_default().push(found);
        true
    }

    fn get(&self, key: &[u8]) -> Option<&Found> {
        let candidates = self.by_hash.get(&self.secret.hash_one(key))?;
        candidates.iter().find(|found| bool::from(found.key.ct_eq(key)))
    }
}

enum Lookup {
    Missing,
    Duplicate,
    Key(String, Source),
}

#[derive(Clone, Copy)]
enum Source {
    Header,
    Query,
    Body,
}

impl KeyAuth {
    /// Builds the plugin from its config and the consumers' `keyauth_credentials`.
    pub fn new(config: KeyAuthConfig, build: &BuildContext<'_>) -> Result<Self, String> {
        if config.key_names.is_empty() {
            return Err("`key_names` must name at least one key".into());
        }
        let header_names = config
            .key_names
            .iter()
            .map(|n| {
                let name = HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("`key_names`: `{n}` is not a valid header name"))?;
                if is_identity_header(&name) {
                    return Err(format!("`key_names`: `{n}` is a header the gateway sets for the upstream"));
                }
                Ok(name)
            })
            .collect::<Result<_, _>>()?;
        let mut keys = Keys::new();
        for (consumer, raw) in build.credentials("keyauth_credentials") {
            let cred: Credential = serde_json::from_value(raw.clone())
                .map_err(|e| format!("keyauth_credentials of consumer `{}`: {e}", consumer.id))?;
            let _ = (&cred.tags, &cred.ttl, &cred.created_at);
            if cred.key.is_empty() {
                return Err(format!("keyauth_credentials of consumer `{}`: empty key", consumer.id));
            }
            let credential: Arc<str> = cred.id.clone().unwrap_or_else(|| format!("{}:key-auth", consumer.id)).into();
            let found =
                Found { key: cred.key.as_bytes().into(), who: Identity::new(consumer.clone(), Some(credential)) };
            if !keys.insert(found) {
                return Err(format!("keyauth_credentials: a key of consumer `{}` is not unique", consumer.id));
            }
        }
        let anonymous = anonymous_consumer(build, config.anonymous.as_deref())?;
        let www_authenticate = www_authenticate("Key", config.realm.as_deref())?;
        Ok(KeyAuth { config, header_names, keys, anonymous, www_authenticate })
    }

    fn unauthorized(&self, ctx: &RequestContext, message: &str) -> Answer {
        let mut a = ctx.error(StatusCode::UNAUTHORIZED, message);
        a.headers_mut().insert(header::WWW_AUTHENTICATE, self.www_authenticate.clone());
        a
    }

    fn find_in_head(&self, req: &Request<ProxyBody>) -> Lookup {
        for (i, name) in self.config.key_names.iter().enumerate() {
            if self.config.key_in_header {
                let mut values = req.headers().get_all(&self.header_names[i]).iter();
                if let Some(v) = values.next() {
                    if values.next().is_some() {
                        return Lookup::Duplicate;
                    }
                    if let Ok(s) = v.to_str() {
                        return Lookup::Key(s.to_string(), Source::Header);
                    }
                }
            }
            if self.config.key_in_query
                && let Some(q) = req.uri().query()
            {
                let mut found = form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == name).map(|(_, v)| v);
                if let Some(v) = found.next() {
                    if found.next().is_some() {
                        return Lookup::Duplicate;
                    }
                    return Lookup::Key(v.into_owned(), Source::Query);
                }
            }
        }
        Lookup::Missing
    }

    /// The key from a form or JSON body; the body is put back (without the key when hiding).
    async fn find_in_body(&self, req: &mut Request<ProxyBody>) -> Result<Lookup, String> {
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let form = content_type.starts_with("application/x-www-form-urlencoded");
        let json = content_type.starts_with("application/json");
        if !form && !json {
            return Ok(Lookup::Missing);
        }
        let bytes = match read_limited(req.body_mut(), BODY_LIMIT).await {
            Ok(b) => b,
            Err(ReadError::TooLarge { read, .. }) => {
                // Too large to search: put it back whole and look no further.
                let rest = std::mem::replace(req.body_mut(), ProxyBody::Empty);
                *req.body_mut() = ProxyBody::prefixed(read, rest);
                return Ok(Lookup::Missing);
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut found = Lookup::Missing;
        let mut rewritten = None;
        if form {
            let pairs: Vec<(String, String)> = form_urlencoded::parse(&bytes).into_owned().collect();
            for name in &self.config.key_names {
                let hits: Vec<&String> = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v).collect();
                match hits.len() {
                    0 => continue,
                    1 => found = Lookup::Key(hits[0].clone(), Source::Body),
                    _ => found = Lookup::Duplicate,
                }
                if self.config.hide_credentials {
                    let kept = pairs.iter().filter(|(k, _)| k != name);
                    rewritten =
                        Some(form_urlencoded::Serializer::new(String::new()).extend_pairs(kept).finish().into_bytes());
                }
                break;
            }
        } else if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            for name in &self.config.key_names {
                if let Some(v) = map.get(name) {
                    found = match v.as_str() {
                        Some(s) => Lookup::Key(s.to_string(), Source::Body),
                        None => Lookup::Duplicate,
                    };
                    if self.config.hide_credentials {
                        map.remove(name);
                        rewritten = serde_json::to_vec(&map).ok();
                    }
                    break;
                }
            }
        }
        let body = match rewritten {
            Some(b) => {
                req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                bytes::Bytes::from(b)
            }
            None => bytes,
        };
        *req.body_mut() = ProxyBody::full(body);
        Ok(found)
    }

    fn hide(&self, req: &mut Request<ProxyBody>, source: Source) {
        match source {
            Source::Header => {
                for name in &self.header_names {
                    req.headers_mut().remove(name);
                }
            }
            Source::Query => {
                let Some(q) = req.uri().query() else { return };
                let kept: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .filter(|(k, _)| !self.config.key_names.contains(k))
                    .collect();
                let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(kept).finish();
                set_query(req, &query);
            }
            Source::Body => {} // already rewritten while reading
        }
    }

    fn decide(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>, lookup: Lookup) -> ControlFlow<Answer> {
        let failure = match lookup {
            Lookup::Key(key, source) => match self.keys.get(key.as_bytes()) {
                Some(found) => {
                    if self.config.hide_credentials {
                        self.hide(req, source);
                    }
                    set_consumer(ctx, req, &found.who, false);
                    return ControlFlow::Continue(());
                }
                None => "Unauthorized",
            },
            Lookup::Duplicate => "Duplicate API key found",
            Lookup::Missing => "No API key found in request",
        };
        anonymous_or(ctx, req, self.anonymous.as_ref(), |ctx| self.unauthorized(ctx, failure))
    }

    fn skip(&self, ctx: &RequestContext, req: &mut Request<ProxyBody>) -> bool {
        steps_aside(self.config.run_on_preflight, self.anonymous.is_some(), ctx, req)
    }
}

impl Plugin for KeyAuth {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        if self.skip(ctx, req) {
            return ControlFlow::Continue(());
        }
        let lookup = self.find_in_head(req);
        self.decide(ctx, req, lookup)
    }

    fn is_async(&self) -> bool {
        self.config.key_in_body
    }

    fn access_async<'a>(
        &'a self,
        ctx: &'a mut RequestContext,
        req: &'a mut Request<ProxyBody>,
    ) -> BoxFuture<'a, ControlFlow<Answer>> {
        Box::pin(async move {
            if self.skip(ctx, req) {
                return ControlFlow::Continue(());
            }
            let mut lookup = self.find_in_head(req);
            if matches!(lookup, Lookup::Missing) {
                lookup = match self.find_in_body(req).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::debug!(error = %e, "key-auth could not read the body");
                        Lookup::Missing
                    }
                };
            }
            self.decide(ctx, req, lookup)
        })
    }
}
