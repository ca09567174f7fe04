//! Property tests of routing (proptest): the compiled router agrees with a plain reference
//! model of the documented precedence (a linear scan, no index, no trie), and a config
//! compiled again, reloaded or read back from its own serialisation routes every request as
//! before.

mod common;

use std::cmp::Reverse;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::router::{PathKind, PathSpec, RouteInput, RouteSpec, Router};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::sample::select;
use tower::ServiceExt;

const HOSTS: &[&str] =
    &["a.example.com", "b.example.com", "x.a.example.com", "example.org", "api.example.org", "other.net"];
const HOST_PATTERNS: &[&str] = &[
    "a.example.com",
    "b.example.com",
    "x.a.example.com",
    "example.org",
    "*.example.com",
    "*.a.example.com",
    "example.*",
    "api.*",
];
const SEGMENTS: &[&str] = &["a", "ab", "b", "v1", "7"];
const REGEXES: &[&str] = &[r"/a/\d+", "/a(b)?", "/[ab]+/v1", "/b$", "/v1/.*/a", r"/(?<seg>\w+)/7"];
const METHODS: &[Method] = &[Method::GET, Method::POST, Method::PUT];

/// A request the properties route.
#[derive(Debug, Clone)]
struct Req {
    host: &'static str,
    path: String,
    method: Method,
    header: Option<&'static str>,
}

fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(select(SEGMENTS), 0..4), any::<bool>()).prop_map(|(segs, slash)| {
        let mut p = format!("/{}", segs.join("/"));
        if slash && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

fn path_spec(kinds: &'static [PathKind]) -> impl Strategy<Value = PathSpec> {
    (select(kinds), path(), select(REGEXES)).prop_map(|(kind, path, regex)| match kind {
        PathKind::Regex => PathSpec::new(regex, kind),
        kind => PathSpec::new(path, kind),
    })
}

fn header_name() -> HeaderName {
    HeaderName::from_static("x-v")
}

/// Routes over `kinds` of paths; every route has at least one criterion (as Kong requires).
fn routes(kinds: &'static [PathKind], single_label: bool) -> impl Strategy<Value = Vec<RouteSpec>> {
    let route = (
        prop::collection::vec(select(HOST_PATTERNS), 0..3),
        prop::collection::vec(path_spec(kinds), 0..3),
        prop::collection::vec(select(METHODS), 0..2),
        prop::option::of(prop::collection::vec(select(&["1", "A"][..]), 1..3)),
        if single_label { any::<bool>().boxed() } else { Just(false).boxed() },
        -1i64..2,
    )
        .prop_map(|(hosts, paths, methods, header, wildcard_single_label, regex_priority)| RouteSpec {
            hosts: dedup(hosts.into_iter().map(String::from).collect()),
            wildcard_single_label,
            paths,
            methods: dedup(methods),
            headers: header
                .map(|v| (header_name(), dedup(v.into_iter().map(String::from).collect())))
                .into_iter()
                .collect(),
            regex_priority,
        })
        .prop_filter("a route needs a criterion", |r| {
            !(r.hosts.is_empty() && r.paths.is_empty() && r.methods.is_empty() && r.headers.is_empty())
        });
    prop::collection::vec(route, 1..8)
}

fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(items.len());
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn requests() -> impl Strategy<Value = Vec<Req>> {
    let req = (select(HOSTS), path(), select(METHODS), prop::option::of(select(&["1", "a", "2"][..])))
        .prop_map(|(host, path, method, header)| Req { host, path, method, header });
    prop::collection::vec(req, 1..24)
}

/// The documented host rules: exact names, `*.suffix` (any number of leading labels, or
/// exactly one for Ingress wildcards) and `prefix.*`.
fn host_matches(pattern: &str, single_label: bool, host: &str) -> bool {
    if let Some(suffix) = pattern.strip_prefix("*.") {
        let Some(labels) = host.strip_suffix(suffix).and_then(|h| h.strip_suffix('.')) else { return false };
        !labels.is_empty() && (!single_label || !labels.contains('.'))
    } else if let Some(prefix) = pattern.strip_suffix(".*") {
        host.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('.')).is_some_and(|rest| !rest.is_empty())
    } else {
        pattern == host
    }
}

/// The reference model: every (route, path) entry in declaration order, the matching one with
/// the greatest key wins, the key being the precedence rules of `gateway_core::router`'s docs
/// field by field. Returns (route, path index, matched length).
fn model(routes: &[RouteSpec], req: &Req) -> Option<(usize, usize, usize)> {
    type Key = (usize, bool, usize, bool, i64, usize, bool, Reverse<usize>);
    let mut best: Option<(Key, (usize, usize, usize))> = None;
    let mut order = 0;
    for (i, r) in routes.iter().enumerate() {
        let hosts_ok = r.hosts.is_empty() || r.hosts.iter().any(|h| host_matches(h, r.wildcard_single_label, req.host));
        let methods_ok = r.methods.is_empty() || r.methods.contains(&req.method);
        let headers_ok = r
            .headers
            .iter()
            .all(|(_, values)| req.header.is_some_and(|got| values.iter().any(|v| v.eq_ignore_ascii_case(got))));
        let weight = [!r.hosts.is_empty(), !r.paths.is_empty(), !r.methods.is_empty(), !r.headers.is_empty()]
            .iter()
            .filter(|b| **b)
            .count();
        let plain_hosts = !r.hosts.is_empty() && r.hosts.iter().all(|h| !h.contains('*'));
        let paths: Vec<Option<&PathSpec>> =
            if r.paths.is_empty() { vec![None] } else { r.paths.iter().map(Some).collect() };
        for (j, p) in paths.into_iter().enumerate() {
            let this = order;
            order += 1;
            if !(hosts_ok && methods_ok && headers_ok) {
                continue;
            }
            let path = req.path.as_str();
            // (matched length, regex, length for precedence, exact)
            let (matched, regex, len, exact) = match p {
                None => (Some(0), false, 0, false),
                Some(p) => match p.kind {
                    PathKind::Prefix => {
                        (path.starts_with(&p.pattern).then_some(p.pattern.len()), false, p.pattern.len(), false)
                    }
                    PathKind::Exact => ((path == p.pattern).then_some(p.pattern.len()), false, p.pattern.len(), true),
                    PathKind::ElementPrefix => {
                        // By path element; a trailing slash in the pattern is ignored.
                        let key = match p.pattern.trim_end_matches('/') {
                            "" => "/",
                            k => k,
                        };
                        let hit = path.starts_with(key)
                            && (path.len() == key.len() || path.as_bytes()[key.len()] == b'/' || key.ends_with('/'));
                        (hit.then_some(key.len()), false, key.len(), false)
                    }
                    PathKind::Regex => {
                        let re = regex::Regex::new(&format!("^(?:{})", p.pattern)).unwrap();
                        (re.find(path).map(|m| m.end()), true, 0, false)
                    }
                },
            };
            let Some(matched) = matched else { continue };
            let key: Key = (
                weight,
                plain_hosts,
                r.headers.len(),
                regex,
                if regex { r.regex_priority } else { 0 },
                len,
                exact,
                Reverse(this),
            );
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, (i, j, matched)));
            }
        }
    }
    best.map(|(_, found)| found)
}

fn route(router: &Router, req: &Req) -> Option<(usize, usize, usize)> {
    let mut headers = HeaderMap::new();
    if let Some(v) = req.header {
        headers.insert(header_name(), HeaderValue::from_static(v));
    }
    router
        .find(&RouteInput { host: req.host, port: None, path: &req.path, method: &req.method, headers: &headers })
        .map(|m| (m.route, m.path, m.matched_len))
}

const ALL_KINDS: &[PathKind] = &[PathKind::Prefix, PathKind::Exact, PathKind::ElementPrefix, PathKind::Regex];
const KONG_KINDS: &[PathKind] = &[PathKind::Prefix, PathKind::Regex];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Prefix, element-wise prefix, exact and regex paths, hosts, methods and headers: the
    /// indexed router decides every request as the linear reference model does.
    #[test]
    fn the_router_agrees_with_the_reference_model(routes in routes(ALL_KINDS, true), reqs in requests()) {
        let router = Router::new(routes.clone()).unwrap();
        let again = Router::new(routes.clone()).unwrap();
        for req in &reqs {
            let got = route(&router, req);
            prop_assert_eq!(got, model(&routes, req), "{:?}", req);
            // Compiling the same specs again decides the same.
            prop_assert_eq!(route(&again, req), got, "{:?}", req);
        }
    }
}

/// The routes as a Kong config: route `i` is served by service `s{i}`, whose path `/r{i}` tells
/// the echo upstream's answer apart.
fn kong_config(routes: &[RouteSpec], upstream: std::net::SocketAddr) -> String {
    let services: Vec<serde_json::Value> = routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut route = serde_json::json!({ "name": format!("r{i}"), "regex_priority": r.regex_priority });
            if !r.hosts.is_empty() {
                route["hosts"] = serde_json::json!(r.hosts);
            }
            if !r.paths.is_empty() {
                let paths: Vec<String> = r
                    .paths
                    .iter()
                    .map(|p| if p.kind == PathKind::Regex { format!("~{}", p.pattern) } else { p.pattern.clone() })
                    .collect();
                route["paths"] = serde_json::json!(paths);
            }
            if !r.methods.is_empty() {
                route["methods"] = serde_json::json!(r.methods.iter().map(Method::as_str).collect::<Vec<_>>());
            }
            for (name, values) in &r.headers {
                route["headers"] = serde_json::json!({ name.as_str(): values });
            }
            serde_json::json!({ "name": format!("s{i}"), "url": format!("http://{upstream}/r{i}"), "routes": [route] })
        })
        .collect();
    // JSON is YAML: the config is read by the same YAML front end users feed.
    serde_json::json!({ "_format_version": "3.0", "services": services }).to_string()
}

/// Which route served `req` through the whole gateway (its service's path prefix at the echo
/// upstream), or `None` for the gateway's 404.
async fn served_by(gateway: &Gateway, req: &Req) -> Option<usize> {
    let mut r = http::Request::builder().method(req.method.clone()).uri(req.path.as_str()).header("host", req.host);
    if let Some(v) = req.header {
        r = r.header("x-v", v);
    }
    let resp = gateway.service().oneshot(r.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    if status == http::StatusCode::NOT_FOUND {
        return None;
    }
    assert_eq!(status, http::StatusCode::OK, "{req:?}: {}", String::from_utf8_lossy(&body));
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    let first = echo.uri.trim_start_matches('/').split(['/', '?']).next().unwrap_or("");
    Some(first.strip_prefix('r').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("upstream saw {}", echo.uri)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Through the whole gateway, from a Kong config: every request goes to the route the
    /// model picks; after a reload of the unchanged config, and in a gateway built from the
    /// config's own serialisation, every request goes to the same route again.
    #[test]
    fn recompiling_an_unchanged_config_never_changes_a_routing_decision(
        routes in routes(KONG_KINDS, false),
        reqs in requests(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let upstream = echo_upstream().await;
            let text = kong_config(&routes, upstream.addr);
            let gateway = Gateway::from_yaml(&text).unwrap();
            let mut first = Vec::new();
            for req in &reqs {
                let got = served_by(&gateway, req).await;
                prop_assert_eq!(got, model(&routes, req).map(|m| m.0), "{:?}", req);
                first.push(got);
            }
            gateway.reload(&Config::from_yaml(&text).unwrap()).unwrap();
            let written = serde_norway::to_string(&Config::from_yaml(&text).unwrap()).unwrap();
            let reread = Gateway::from_yaml(&written).unwrap();
            for (req, want) in reqs.iter().zip(&first) {
                prop_assert_eq!(&served_by(&gateway, req).await, want, "after a reload: {:?}", req);
                prop_assert_eq!(&served_by(&reread, req).await, want, "read back from its YAML: {:?}", req);
            }
            Ok(())
        })?;
    }
}
