//! Route lookup cost as the table grows: 10, 1,000, 10,000 and 100,000 Ingress-like routes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway_core::router::{RouteInput, Router};
use http::{HeaderMap, Method};

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    let headers = HeaderMap::new();
    for n in [10usize, 1_000, 10_000, 100_000] {
        let (routes, lookups) = gateway_benches::ingress_like(n);
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
    group.finish();
}

criterion_group!(benches, lookup, compile);
criterion_main!(benches);
