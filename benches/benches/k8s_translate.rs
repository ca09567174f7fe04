//! Kubernetes translation at scale: 5,000 Ingresses with 20,000 paths over 2,000 Services
//! (3 ready endpoints each), translated and compiled into a gateway, as a cluster-wide
//! recompile does. Prints the resident memory the compiled gateway adds.
//!
//! `cargo bench -p gateway-benches --bench k8s_translate`

use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_k8s::{Objects, Options, translate};

const INGRESSES: usize = 5_000;
const PATHS_PER_INGRESS: usize = 4;
const SERVICES: usize = 2_000;

fn objects() -> Objects {
    let mut text = String::new();
    for s in 0..SERVICES {
        let ns = format!("team-{}", s % 50);
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: svc-{s}, namespace: {ns} }}\n\
             spec: {{ ports: [ {{ name: http, port: 80, targetPort: 8080 }} ] }}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{ name: svc-{s}-a, namespace: {ns}, labels: {{ kubernetes.io/service-name: svc-{s} }} }}\n\
             addressType: IPv4\nports: [ {{ name: http, port: 8080 }} ]\n\
             endpoints: [ {{ addresses: [10.1.{a}.{b}] }}, {{ addresses: [10.2.{a}.{b}] }}, {{ addresses: [10.3.{a}.{b}] }} ]\n",
            a = s / 250,
            b = s % 250,
        ));
    }
    for i in 0..INGRESSES {
        let s = i % SERVICES;
        let ns = format!("team-{}", s % 50);
        text.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{ name: ing-{i}, namespace: {ns} }}\n\
             spec:\n  ingressClassName: gateway\n  rules:\n    - host: app-{i}.example.com\n      http:\n        paths:\n"
        ));
        for p in 0..PATHS_PER_INGRESS {
            let kind = if p % 2 == 0 { "Prefix" } else { "Exact" };
            text.push_str(&format!(
                "          - {{ path: /api/v{p}/items, pathType: {kind}, backend: {{ service: {{ name: svc-{s}, port: {{ number: 80 }} }} }} }}\n"
            ));
        }
    }
    let mut objects = Objects::default();
    let problems = objects.add_manifest("generated", &text);
    assert!(problems.is_empty(), "{problems:?}");
    objects
}

/// Resident memory of this process, from /proc (Linux); 0 elsewhere.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn build(config: &Config) -> Gateway {
    Gateway::builder().plugins(gateway_plugins::registry()).build(config).expect("the translated config compiles")
}

fn bench(c: &mut Criterion) {
    let objects = objects();
    let options = Options::default();

    // One measured pass first: the headline numbers, and the memory the result holds.
    let before = rss_bytes();
    let start = Instant::now();
    let t = translate(&objects, &options);
    let translated = start.elapsed();
    let gateway = build(&t.config);
    let total = start.elapsed();
    let after = rss_bytes();
    let routes: usize = t.config.services.iter().map(|s| s.routes.len()).sum();
    assert_eq!(routes, INGRESSES * PATHS_PER_INGRESS);
    assert!(t.problems.is_empty(), "{:?}", &t.problems[..t.problems.len().min(3)]);
    println!(
        "k8s_translate: {INGRESSES} Ingresses, {routes} paths, {SERVICES} Services: translate {:.0} ms, \
         translate + compile {:.0} ms; resident memory of the config and compiled gateway: {:.1} MiB",
        translated.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3,
        after.saturating_sub(before) as f64 / (1024.0 * 1024.0)
    );
    drop(gateway);

    let mut group = c.benchmark_group("k8s");
    group.sample_size(10);
    group.bench_function("translate_5000_ingresses", |b| b.iter(|| translate(&objects, &options)));
    group.bench_function("translate_and_compile_5000_ingresses", |b| {
        b.iter(|| build(&translate(&objects, &options).config))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
