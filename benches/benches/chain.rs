//! Plugin chain overhead per request: the whole request path (routing, plugin phases, request
//! preparation) through the public tower service, against an in-process no-op upstream (a
//! layer that answers without any I/O), with no plugins and with the auth/limit chain.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_core::body::ResponseBody;
use gateway_core::config::Config;
use gateway_core::plugin::{Plugin, UpstreamLayer, UpstreamService, typed_factory};
use gateway_core::{ConnInfo, Gateway};
use http::{Request, Response};
use tower::ServiceExt;

/// Replaces the upstream call with an immediate empty 200.
struct NoopUpstream;

impl Plugin for NoopUpstream {
    fn layer(&self) -> Option<UpstreamLayer> {
        Some(Arc::new(|_inner: UpstreamService| {
            UpstreamService::new(tower::service_fn(|_req| async { Ok(Response::new(ResponseBody::empty())) }))
        }))
    }
}

fn gateway(plugins: &str) -> Gateway {
    let yaml = format!(
        r#"_format_version: "3.0"
consumers:
- username: alice
  keyauth_credentials: [{{key: alice-key}}]
  jwt_secrets: [{{key: alice-iss, secret: alice-secret}}]
services:
- name: s
  url: http://127.0.0.1:9
  routes: [{{name: r, paths: ["/api"]}}]
  plugins: [{{name: noop-upstream}}{plugins}]
"#
    );
    let mut registry = gateway_plugins::registry();
    registry.register(typed_factory("noop-upstream", 0, |_: serde_json::Value, _| Ok(NoopUpstream)));
    Gateway::builder().plugins(registry).build(&Config::from_yaml(&yaml).expect("config")).expect("gateway")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let token = gateway_benches::hs256_token("alice-iss", b"alice-secret");
    let chains = [
        ("0 plugins", ""),
        (
            "key-auth + rate-limiting + jwt + request-transformer",
            ", {name: key-auth}, {name: jwt}, {name: rate-limiting, config: {second: 1000000000}}, \
             {name: request-transformer, config: {remove: {headers: [x-debug]}, add: {headers: [\"x-gateway:1\"]}}}",
        ),
    ];
    let mut group = c.benchmark_group("plugin_chain");
    for (name, plugins) in chains {
        let gw = gateway(plugins);
        let svc = gw.service();
        let conn = ConnInfo {
            client: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:8000".parse().unwrap(),
            tls: false,
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut req = Request::get("http://bench.local/api/items?page=1")
                    .header("apikey", "alice-key")
                    .header("authorization", token.as_str())
                    .body(String::new())
                    .unwrap();
                req.extensions_mut().insert(conn);
                let resp = rt.block_on(svc.clone().oneshot(req)).unwrap();
                assert_eq!(resp.status(), 200);
                resp
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
