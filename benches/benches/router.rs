//! Route lookup cost as the table grows: 10, 1,000, 10,000 and 100,000 Ingress-like routes,
//! the same with one route in ten a regex, and the cost of compiling a 10,000-route config
//! (what a hot reload pays): the router alone, and the whole gateway from a parsed config.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway_benches::Lookup;
use gateway_core::Gateway;
use gateway_core::router::{RouteInput, RouteSpec, Router};
use http::{HeaderMap, Method};

fn lookup(c: &mut Criterion) {
    lookup_group(c, "route_lookup", gateway_benches::ingress_like);
    lookup_group(c, "route_lookup_with_regex", gateway_benches::ingress_like_with_regex);
}

fn lookup_group(c: &mut Criterion, name: &str, workload: fn(usize) -> (Vec<RouteSpec>, Vec<Lookup>)) {
    let mut group = c.benchmark_group(name);
    let headers = HeaderMap::new();
    for n in [10usize, 1_000, 10_000, 100_000] {
        let (routes, lookups) = workload(n);
        let router = Router::new(routes).expect("routes compile");
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &lookups, |b, lookups| {
            let mut i = 0usize;
            b.iter(|| {
                let l = &lookups[i % lookups.len()];
                i = i.wrapping_add(1);
                std::hint::black_box(router.find(&RouteInput {
                    host: &l.host,
                    port: None,
                    path: &l.path,
                    method: &Method::GET,
                    headers: &headers,
                }))
            });
        });
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_compile");
    group.sample_size(10);
    for n in [1_000usize, 10_000] {
        let (routes, _) = gateway_benches::ingress_like(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &routes, |b, routes| {
            b.iter(|| Router::new(routes.clone()).expect("routes compile"));
        });
    }
    // The whole reload: services, upstreams, plugins and router, from a parsed config.
    let config = gateway_benches::config_with_routes(10_000);
    let registry = gateway_plugins::registry();
    group.bench_function("gateway_10000", |b| {
        b.iter(|| Gateway::builder().plugins(registry.clone()).build(&config).expect("config compiles"));
    });
    group.finish();
}

criterion_group!(benches, lookup, compile);
criterion_main!(benches);
