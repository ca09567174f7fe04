//! `cors`: Kong's Cross-Origin Resource Sharing plugin. Answers preflight requests itself and
//! adds CORS headers to the responses of allowed origins.
//!
//! ```yaml
//! plugins:
//!   - name: cors
//!     config:
//!       origins: ["https://app.example.com", "https://.*\\.example\\.org"]
//!       exposed_headers: [x-request-id]
//!       credentials: true
//!       max_age: 3600
//! ```
//!
//! Why not tower-http's `CorsLayer`: a plugin layer wraps only the upstream call, which runs
//! after every access hook, so a preflight would first meet the authentication plugins and be
//! refused for want of credentials. Kong answers preflights at priority 2000, before
//! authentication; doing the same needs the access and response phases, and Kong's field set
//! (regex origins, `preflight_continue`, private network access) does not map onto
//! `CorsLayer`'s options.
//!
//! # Origins
//!
//! No origins, or only `*`, allows every origin: `Access-Control-Allow-Origin: *`, or the
//! request's origin echoed when `credentials` is set (browsers refuse `*` with credentials).
//! Otherwise each entry is an exact origin (`scheme://host[:port]`, compared without a path, in
//! lower case and with the scheme's default port dropped) or, when it holds a character other
//! than letters, digits and `.:/-`, a regular expression that must match the whole `Origin`.
//! An allowed origin is echoed, with `Vary: Origin`. A `*` among other entries allows all.
//!
//! # Requests
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered with
//! 200 in the access phase, before authentication plugins run (priority 2000), unless
//! `preflight_continue` sends it on to the upstream (whose response then gets the same
//! headers). Any other request with an `Origin` goes on; if the origin is allowed, its response
//! (the upstream's, or an answer such as key-auth's 401) gets `Access-Control-Allow-Origin`,
//! `Access-Control-Allow-Credentials`, `Access-Control-Expose-Headers` and `Vary: Origin`. A
//! disallowed origin gets no CORS headers, and neither does a request without `Origin`.
//!
//! Every header value but the echoed origin and request headers is computed when the plugin
//! is built.

use std::ops::ControlFlow;

use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::plugin::{Answer, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use gateway_core::regex::Regex;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use serde::Deserialize;

/// Kong's priority for cors.
pub const PRIORITY: i32 = 2000;

/// The methods allowed when `methods` is not set (Kong's default).
pub const DEFAULT_METHODS: [&str; 9] = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"];

const ALLOW_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-allow-private-network");
const REQUEST_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-request-private-network");
const TRUE: HeaderValue = HeaderValue::from_static("true");
const STAR: HeaderValue = HeaderValue::from_static("*");
const ORIGIN_VALUE: HeaderValue = HeaderValue::from_static("Origin");

/// cors's config (Kong's fields). Lists may be `null`, as Kong's exported configs write them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins: `*`, exact origins, or regular expressions. None or empty: all.
    #[serde(default)]
    pub origins: Option<Vec<String>>,
    /// `Access-Control-Allow-Methods` (default: [`DEFAULT_METHODS`]).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// `Access-Control-Allow-Headers` (default: the preflight's `Access-Control-Request-Headers`).
    #[serde(default)]
    pub headers: Option<Vec<String>>,
    /// `Access-Control-Expose-Headers` on actual responses.
    #[serde(default)]
    pub exposed_headers: Option<Vec<String>>,
    /// Send `Access-Control-Allow-Credentials: true`.
    #[serde(default)]
    pub credentials: bool,
    /// `Access-Control-Max-Age`, in seconds.
    #[serde(default)]
    pub max_age: Option<u64>,
    /// Proxy preflight requests to the upstream instead of answering them.
    #[serde(default)]
    pub preflight_continue: bool,
    /// Answer `Access-Control-Request-Private-Network: true` with
    /// `Access-Control-Allow-Private-Network: true`.
    #[serde(default)]
    pub private_network: bool,
}

/// Which origins are allowed.
#[derive(Debug)]
enum Origins {
    /// All of them.
    Any,
    /// Normalised exact origins, and one anchored regex of the others.
    Listed { exact: Vec<String>, regex: Option<Regex> },
}

/// The cors plugin.
#[derive(Debug)]
pub struct Cors {
    origins: Origins,
    credentials: bool,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    preflight_continue: bool,
    private_network: bool,
}

/// What the access phase decided, for the response phase.
#[derive(Clone)]
enum Decision {
    /// An actual request from an allowed origin: the `Access-Control-Allow-Origin` value.
    Actual(HeaderValue),
    /// A preflight sent on to the upstream (`preflight_continue`): its headers.
    Preflight(HeaderMap),
}

/// The factory to register.
pub fn factory()
-> TypedFactory<CorsConfig, impl Fn(CorsConfig, &BuildContext<'_>) -> Result<Cors, String> + Send + Sync> {
    typed_factory("cors", PRIORITY, |c: CorsConfig, _: &BuildContext<'_>| Cors::new(c)).no_consumer()
}

/// Kong's test for a regex origin: any character but letters, digits and `.:/-`.
fn is_regex(origin: &str) -> bool {
    origin.chars().any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '/' | '-')))
}

/// `scheme://host[:port]` in lower case, without a path and without the scheme's default port.
fn normalize_origin(origin: &str) -> String {
    let lower = origin.trim().to_ascii_lowercase();
    let Some((scheme, rest)) = lower.split_once("://") else { return lower };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = match (scheme, authority.rsplit_once(':')) {
        ("http", Some((host, "80"))) | ("https", Some((host, "443"))) => host,
        _ => authority,
    };
    format!("{scheme}://{authority}")
}

/// Joins a list into one header value, Kong's way (`a,b,c`).
fn joined(field: &str, list: &[String]) -> Result<Option<HeaderValue>, String> {
    let items: Vec<&str> = list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
    if items.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&items.join(","))
        .map(Some)
        .map_err(|_| format!("`{field}`: `{}` is not a valid header value", items.join(",")))
}

impl Cors {
    /// Builds the plugin from its config.
    pub fn new(c: CorsConfig) -> Result<Self, String> {
        let origins = c.origins.unwrap_or_default();
        let origins = if origins.is_empty() || origins.iter().any(|o| o.trim() == "*") {
            Origins::Any
        } else {
            let mut exact = Vec::new();
            let mut patterns = Vec::new();
            for o in &origins {
                let o = o.trim();
                if is_regex(o) {
                    Regex::new(o).map_err(|e| format!("`origins`: `{o}` is not a valid regex: {e}"))?;
                    patterns.push(format!("(?:{o})"));
                } else {
                    exact.push(normalize_origin(o));
                }
            }
            let regex = if patterns.is_empty() {
                None
            } else {
                let all = format!("^(?:{})$", patterns.join("|"));
                Some(Regex::new(&all).map_err(|e| format!("`origins`: {e}"))?)
            };
            Origins::Listed { exact, regex }
        };
        let methods = match c.methods {
            Some(m) if !m.is_empty() => m,
            _ => DEFAULT_METHODS.iter().map(|m| m.to_string()).collect(),
        };
        let methods: Vec<String> = methods
            .iter()
            .map(|m| {
                let upper = m.trim().to_ascii_uppercase();
                Method::from_bytes(upper.as_bytes()).map_err(|_| format!("`methods`: `{m}` is not a method"))?;
                Ok(upper)
            })
            .collect::<Result<_, String>>()?;
        let allow_methods = joined("methods", &methods)?.unwrap_or(HeaderValue::from_static(""));
        for (field, list) in [("headers", &c.headers), ("exposed_headers", &c.exposed_headers)] {
            for h in list.iter().flatten() {
                let h = h.trim();
                if h != "*" && HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(format!("`{field}`: `{h}` is not a header name"));
                }
            }
        }
        Ok(Cors {
            origins,
            credentials: c.credentials,
            allow_methods,
            allow_headers: joined("headers", c.headers.as_deref().unwrap_or_default())?,
            expose_headers: joined("exposed_headers", c.exposed_headers.as_deref().unwrap_or_default())?,
            max_age: c.max_age.map(HeaderValue::from),
            preflight_continue: c.preflight_continue,
            private_network: c.private_network,
        })
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, when allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match &self.origins {
            Origins::Any if !self.credentials => Some(STAR),
            Origins::Any => Some(origin.clone()),
            Origins::Listed { exact, regex } => {
                let o = origin.to_str().ok()?;
                let normalized = normalize_origin(o);
                let found = exact.contains(&normalized) || regex.as_ref().is_some_and(|r| r.is_match(o));
                found.then(|| origin.clone())
            }
        }
    }

    /// The headers of a preflight from an allowed origin, in Kong's order.
    fn preflight_headers(&self, allow_origin: HeaderValue, req: &HeaderMap) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(8);
        let echoed = allow_origin != STAR;
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        if echoed {
            h.insert(VARY, ORIGIN_VALUE);
        }
        if self.credentials {
            h.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        if let Some(v) = self.allow_headers.clone().or_else(|| req.get(ACCESS_CONTROL_REQUEST_HEADERS).cloned()) {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        if let Some(v) = &self.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.private_network
            && req.get(REQUEST_PRIVATE_NETWORK).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
        {
            h.insert(ALLOW_PRIVATE_NETWORK, TRUE);
        }
        h
    }
}

/// Adds `Origin` to `Vary` unless it is there already (or `Vary: *`).
fn vary_origin(h: &mut HeaderMap) {
    let present = h.get_all(VARY).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|t| {
        let t = t.trim();
        t == "*" || t.eq_ignore_ascii_case("origin")
    });
    if !present {
        h.append(VARY, ORIGIN_VALUE);
    }
}

impl Plugin for Cors {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        let Some(origin) = req.headers().get(ORIGIN) else { return ControlFlow::Continue(()) };
        let allowed = self.allow(origin);
        let preflight = req.method() == Method::OPTIONS && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        if !preflight {
            if let Some(v) = allowed {
                ctx.extensions.insert(Decision::Actual(v));
            }
            return ControlFlow::Continue(());
        }
        let headers = allowed.map(|v| self.preflight_headers(v, req.headers())).unwrap_or_default();
        if self.preflight_continue {
            if !headers.is_empty() {
                ctx.extensions.insert(Decision::Preflight(headers));
            }
            return ControlFlow::Continue(());
        }
        let mut answer = Response::new(ResponseBody::empty());
        *answer.status_mut() = StatusCode::OK;
        *answer.headers_mut() = headers;
        ControlFlow::Break(answer)
    }

    fn response(&self, ctx: &mut RequestContext, resp: &mut Response<ResponseBody>) {
        let h = resp.headers_mut();
        match ctx.extensions.remove::<Decision>() {
            None => {}
            Some(Decision::Actual(allow_origin)) => {
                let echoed = allow_origin != STAR;
                h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
                if echoed {
                    vary_origin(h);
                }
                if self.credentials {
                    h.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
                }
                if let Some(v) = &self.expose_headers {
                    h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
                }
            }
            Some(Decision::Preflight(headers)) => {
                for (name, value) in &headers {
                    if name == VARY {
                        vary_origin(h);
                    } else {
                        h.insert(name, value.clone());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], credentials: bool) -> Cors {
        Cors::new(CorsConfig {
            origins: Some(origins.iter().map(|s| s.to_string()).collect()),
            credentials,
            ..CorsConfig::default()
        })
        .unwrap()
    }

    fn allow(c: &Cors, origin: &'static str) -> Option<HeaderValue> {
        c.allow(&HeaderValue::from_static(origin))
    }

    #[test]
    fn exact_origins_are_normalised() {
        let c = cors(&["https://app.example.com", "http://localhost:8080", "http://plain.test:80/"], false);
        assert_eq!(allow(&c, "https://app.example.com").unwrap(), "https://app.example.com");
        assert!(allow(&c, "https://APP.example.com:443").is_some());
        assert!(allow(&c, "http://localhost:8080").is_some());
        assert!(allow(&c, "http://plain.test").is_some());
        assert!(allow(&c, "http://app.example.com").is_none(), "scheme matters");
        assert!(allow(&c, "http://localhost:8081").is_none());
        assert!(allow(&c, "https://appxexample.com").is_none(), "a `.` in an exact origin is literal");
        assert!(allow(&c, "null").is_none());
    }

    #[test]
    fn regex_origins_are_anchored() {
        let c = cors(&[r"https://.*\.example\.org", "https://exact.test"], false);
        assert!(allow(&c, "https://api.example.org").is_some());
        assert!(allow(&c, "https://exact.test").is_some());
        assert!(allow(&c, "https://api.example.org.evil.io").is_none());
        assert!(allow(&c, "http://api.example.org").is_none());
    }

    #[test]
    fn star_allows_all_and_credentials_echo() {
        assert_eq!(allow(&cors(&["*"], false), "https://a.test").unwrap(), "*");
        assert_eq!(allow(&cors(&[], false), "https://a.test").unwrap(), "*");
        assert_eq!(allow(&cors(&["*"], true), "https://a.test").unwrap(), "https://a.test");
        assert_eq!(allow(&cors(&["https://b.test", "*"], false), "https://a.test").unwrap(), "*");
    }

    #[test]
    fn bad_config_is_refused() {
        let err = |c: CorsConfig| Cors::new(c).unwrap_err();
        assert!(err(CorsConfig { origins: Some(vec!["https://(".into()]), ..Default::default() }).contains("regex"));
        assert!(err(CorsConfig { methods: Some(vec!["GET POST".into()]), ..Default::default() }).contains("method"));
        assert!(err(CorsConfig { headers: Some(vec!["x bad".into()]), ..Default::default() }).contains("header"));
    }

    #[test]
    fn vary_is_merged() {
        let mut h = HeaderMap::new();
        h.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        vary_origin(&mut h);
        vary_origin(&mut h);
        let all: Vec<_> = h.get_all(VARY).iter().collect();
        assert_eq!(all, ["Accept-Encoding", "Origin"]);
    }
}
