//! Workload generators shared by the benchmarks.
//!
//! ```
//! let (routes, lookups) = gateway_benches::ingress_like(100);
//! assert_eq!(routes.len(), 100);
//! assert!(!lookups.is_empty());
//! ```

use gateway_core::router::{PathKind, PathSpec, RouteSpec};

/// A request the benchmark looks up: host and path.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// Lower-case host without port.
    pub host: String,
    /// Path without query.
    pub path: String,
}

/// `n` routes shaped like Kubernetes Ingress rules: a host per four paths (one host in ten a
/// `*.` wildcard), element-prefix paths two or three segments deep, one Exact path per host;
/// plus lookups that hit routes (deep paths under them) and some that miss.
pub fn ingress_like(n: usize) -> (Vec<RouteSpec>, Vec<Lookup>) {
    let mut routes = Vec::with_capacity(n);
    let mut lookups = Vec::new();
    let hosts = n.div_ceil(4).max(1);
    for i in 0..n {
        let h = i % hosts;
        let wildcard = h % 10 == 9;
        let host = if wildcard { format!("*.team{h}.example.com") } else { format!("svc{h}.ns{}.example.com", h % 37) };
        let (path, kind) = match i / hosts {
            0 => ("/".to_string(), PathKind::ElementPrefix),
            1 => (format!("/api/v1/orders{i}"), PathKind::ElementPrefix),
            2 => (format!("/api/v2/users{i}"), PathKind::ElementPrefix),
            _ => (format!("/healthz{i}"), PathKind::Exact),
        };
        let req_host = if wildcard { format!("web.team{h}.example.com") } else { host.clone() };
        let req_path = match kind {
            PathKind::Exact => path.clone(),
            _ if path == "/" => "/index.html".to_string(),
            _ => format!("{path}/items/42"),
        };
        lookups.push(Lookup { host: req_host.clone(), path: req_path });
        if i % 8 == 0 {
            lookups.push(Lookup { host: req_host, path: "/api/v9/unknown".to_string() });
            lookups.push(Lookup { host: format!("nohost{i}.example.org"), path: "/x".to_string() });
        }
        routes.push(RouteSpec {
            hosts: vec![host],
            wildcard_single_label: true,
            paths: vec![PathSpec::new(path, kind)],
            ..Default::default()
        });
    }
    (routes, lookups)
}

/// As [`ingress_like`], with a regex path (Kong's `~` paths: an anchored pattern with a
/// character class and a repetition) added to one route in ten, and lookups that exercise
/// it; the plain lookups still find what they found, so the two groups compare.
pub fn ingress_like_with_regex(n: usize) -> (Vec<RouteSpec>, Vec<Lookup>) {
    let (mut routes, mut lookups) = ingress_like(n);
    for (i, route) in routes.iter_mut().enumerate().filter(|(i, _)| i % 10 == 5) {
        route.paths.push(PathSpec::new(format!(r"/reports{i}/[0-9]{{4}}/[a-z]+\.csv$"), PathKind::Regex));
        let host = route.hosts[0].replace("*.", "web.");
        lookups.push(Lookup { host, path: format!("/reports{i}/2026/sales.csv") });
    }
    (routes, lookups)
}

/// A Kong-format config with `n` routes in 100 services (one upstream target each), hosts
/// and paths as [`ingress_like`]: what a large hot reload compiles.
pub fn config_with_routes(n: usize) -> gateway_core::config::Config {
    let mut yaml = String::from("_format_version: \"3.0\"\nservices:\n");
    for s in 0..100 {
        yaml.push_str(&format!("- name: s{s}\n  url: http://10.0.{}.{}:8080\n  routes:\n", s / 250, s % 250 + 1));
        for i in (s..n).step_by(100) {
            yaml.push_str(&format!(
                "  - {{name: r{i}, hosts: [\"svc{i}.ns{}.example.com\"], paths: [\"/api/v1/orders{i}\", \"/healthz{i}\"]}}\n",
                i % 37
            ));
        }
    }
    gateway_core::config::Config::from_yaml(&yaml).expect("generated config parses")
}

/// A `Bearer` HS256 token with `iss` set to `issuer`, signed with `secret`.
pub fn hs256_token(issuer: &str, secret: &[u8]) -> String {
    let claims = std::collections::BTreeMap::from([("iss", issuer)]);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing cannot fail");
    format!("Bearer {token}")
}

/// A small HTTP/1.1 upstream on a free loopback port for the runners: it reads each request's
/// body and answers `ok <body length>`. Runs on the current tokio runtime.
pub async fn loopback_upstream() -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                    let body = http_body_util::Full::new(bytes::Bytes::from(format!("ok {n}")));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    addr
}
