//! `request-transformer`: Kong's `remove / rename / replace / add / append` on the request's
//! headers, query string and body (JSON or form), plus `replace.uri` and `http_method`.
//!
//! ```yaml
//! plugins:
//!   - name: request-transformer
//!     config:
//!       remove: { headers: [x-internal], querystring: [debug] }
//!       replace: { uri: "/v2/users/$(uri_captures.id)" }
//!       add: { headers: ["x-user:$(headers.x-user-id)"], body: ["/meta/source:gateway"] }
//! ```
//!
//! Operations run in Kong's order (remove, rename, replace, add, append); templates read the
//! client's original request (see [`crate::transform`]). The body is read only when body
//! operations are configured, and then at most 8 MiB of it (413 above); bodies that are
//! neither JSON nor form-encoded pass untouched.

use std::ops::ControlFlow;

use gateway_core::body::{ProxyBody, ReadError, read_limited};
use gateway_core::plugin::{Answer, BoxFuture, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use serde::Deserialize;

use crate::transform::{
    Block, Lookup, Ops, Template, apply_headers, apply_json, apply_pairs, entries, header_name, set_query,
};

/// Kong's priority for request-transformer.
pub const PRIORITY: i32 = 801;
const BODY_LIMIT: usize = 8 << 20;

/// request-transformer's config (Kong's fields).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestTransformerConfig {
    /// A new method for the upstream request.
    #[serde(default)]
    pub http_method: Option<String>,
    /// Names to remove.
    #[serde(default)]
    pub remove: Block,
    /// `old:new` renames.
    #[serde(default)]
    pub rename: Block,
    /// `name:value` replacements of present values; `uri` replaces the upstream path.
    #[serde(default)]
    pub replace: Block,
    /// `name:value` additions of absent values.
    #[serde(default)]
    pub add: Block,
    /// `name:value` appended values.
    #[serde(default)]
    pub append: Block,
}

/// The request-transformer plugin.
pub struct RequestTransformer {
    method: Option<Method>,
    headers: Ops,
    query: Ops,
    body: Ops,
    uri: Option<Template>,
    /// Some template reads request headers: keep a copy of the client's headers to read.
    needs_headers: bool,
}

/// The upstream path `replace.uri` chose, applied in `before_upstream`.
#[derive(Clone)]
struct NewPath(String);

/// The factory to register.
pub fn factory() -> TypedFactory<
    RequestTransformerConfig,
    impl Fn(RequestTransformerConfig, &BuildContext<'_>) -> Result<RequestTransformer, String> + Send + Sync,
> {
    typed_factory("request-transformer", PRIORITY, |c: RequestTransformerConfig, _: &BuildContext<'_>| {
        RequestTransformer::new(c)
    })
}

/// Builds the operations of one target from the five blocks.
pub(crate) fn ops_of(c: [&Block; 5], pick: fn(&Block) -> &Vec<String>, what: &str, json: bool) -> Result<Ops, String> {
    let types = |b: &Block| if json { b.json_types.clone() } else { Vec::new() };
    Ok(Ops {
        remove: entries(&format!("remove.{what}"), pick(c[0]), false, &[])?,
        rename: entries(&format!("rename.{what}"), pick(c[1]), true, &[])?,
        replace: entries(&format!("replace.{what}"), pick(c[2]), true, &types(c[2]))?,
        add: entries(&format!("add.{what}"), pick(c[3]), true, &types(c[3]))?,
        append: entries(&format!("append.{what}"), pick(c[4]), true, &types(c[4]))?,
    })
}

impl RequestTransformer {
    /// Builds the plugin from its config.
    pub fn new(c: RequestTransformerConfig) -> Result<Self, String> {
        let blocks = [&c.remove, &c.rename, &c.replace, &c.add, &c.append];
        if blocks.iter().any(|b| !b.json.is_empty()) {
            return Err("`json` belongs to response-transformer; use `body`".into());
        }
        if [&c.remove, &c.rename, &c.add, &c.append].iter().any(|b| b.uri.is_some()) {
            return Err("`uri` is only valid in `replace`".into());
        }
        let headers = ops_of(blocks, |b| &b.headers, "headers", false)?;
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
        let method = c
            .http_method
            .as_deref()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("`http_method` `{m}` is not a method"))
            })
            .transpose()?;
        let uri = c.replace.uri.as_deref().map(Template::parse).transpose()?;
        if let Some(u) = &c.replace.uri
            && !u.starts_with('/')
        {
            return Err(format!("`replace.uri` must start with `/`, got `{u}`"));
        }
        let query = ops_of(blocks, |b| &b.querystring, "querystring", false)?;
        let body = ops_of(blocks, |b| &b.body, "body", true)?;
        let needs_headers = headers
            .templates()
            .chain(query.templates())
            .chain(body.templates())
            .chain(uri.as_ref())
            .any(Template::reads_headers);
        Ok(RequestTransformer { method, headers, query, body, uri, needs_headers })
    }

    /// Everything but the body: headers, query, method, and the new path for later.
    fn transform_head(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) {
        let original: HeaderMap = if self.needs_headers { req.headers().clone() } else { HeaderMap::new() };
        let query = req.uri().query().map(str::to_string);
        let path = {
            let lookup = Lookup { headers: &original, query: query.as_deref(), captures: ctx.uri_captures() };
            apply_headers(&self.headers, req.headers_mut(), &lookup);
            if !self.query.is_empty() {
                let mut pairs: Vec<(String, String)> =
                    form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()).into_owned().collect();
                apply_pairs(&self.query, &mut pairs, &lookup);
                let qs = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
                set_query(req, &qs);
            }
            self.uri.as_ref().map(|t| t.render_path(&lookup))
        };
        if let Some(p) = path {
            ctx.extensions.insert(NewPath(p));
        }
        if let Some(m) = &self.method {
            *req.method_mut() = m.clone();
        }
    }

    async fn transform_body(&self, ctx: &RequestContext, req: &mut Request<ProxyBody>) -> Result<(), Answer> {
        let ct =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let json = ct.starts_with("application/json") || ct.contains("+json");
        let form = ct.starts_with("application/x-www-form-urlencoded");
        if !json && !form {
            return Ok(());
        }
        let bytes = match read_limited(req.body_mut(), BODY_LIMIT).await {
            Ok(b) => b,
            Err(ReadError::TooLarge { .. }) => {
                return Err(ctx.error(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large to transform"));
            }
            Err(e @ ReadError::Failed(_)) => {
                let (status, message) = e.answer();
                return Err(ctx.error(status, message));
            }
        };
        let headers = if self.needs_headers { req.headers().clone() } else { HeaderMap::new() };
        let lookup = Lookup { headers: &headers, query: req.uri().query(), captures: ctx.uri_captures() };
        let out = if json {
            // An empty JSON body is an empty object to add fields to (as in Kong).
            let parsed = if bytes.iter().all(u8::is_ascii_whitespace) {
                Ok(serde_json::Value::Object(Default::default()))
            } else {
                serde_json::from_slice::<serde_json::Value>(&bytes)
            };
            match parsed {
                Ok(mut doc) if doc.is_object() => {
                    apply_json(&self.body, &mut doc, &lookup);
                    serde_json::to_vec(&doc).unwrap_or_else(|_| bytes.to_vec())
                }
                _ => bytes.to_vec(), // not a JSON object: passed untouched
            }
        } else {
            let mut pairs: Vec<(String, String)> = form_urlencoded::parse(&bytes).into_owned().collect();
            apply_pairs(&self.body, &mut pairs, &lookup);
            form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish().into_bytes()
        };
        req.headers_mut().remove(header::TRANSFER_ENCODING);
        req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        *req.body_mut() = ProxyBody::full(out.into());
        Ok(())
    }
}

impl Plugin for RequestTransformer {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        self.transform_head(ctx, req);
        ControlFlow::Continue(())
    }

    fn is_async(&self) -> bool {
        !self.body.is_empty()
    }

    fn access_async<'a>(
        &'a self,
        ctx: &'a mut RequestContext,
        req: &'a mut Request<ProxyBody>,
    ) -> BoxFuture<'a, ControlFlow<Answer>> {
        Box::pin(async move {
            // The body first: its templates read the client's headers before they change.
            if let Err(answer) = self.transform_body(ctx, req).await {
                return ControlFlow::Break(answer);
            }
            self.transform_head(ctx, req);
            ControlFlow::Continue(())
        })
    }

    fn before_upstream(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) {
        if let Some(NewPath(path)) = ctx.extensions.remove::<NewPath>() {
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            if let Ok(uri) = pq.parse::<Uri>() {
                *req.uri_mut() = uri;
            }
        }
    }
}
