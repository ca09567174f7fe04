//! A full round trip over loopback: a keep-alive client → the gateway's server → a small
//! hyper upstream, and back. Everything runs in one process on one current-thread runtime, so
//! the figure is the CPU cost of a request through the whole stack (both ends included).
//!
//! Groups:
//! - `roundtrip/http1` and `roundtrip/http2` (h2c): the gateway with no plugins, metrics and
//!   access log off;
//! - `observability`: the same HTTP/1.1 round trip with metrics and the access log off, then
//!   on. The access log goes through a `tracing` fmt subscriber into a [`BufferedLog`] (as
//!   the `gateway` binary does) over a sink, so formatting is paid but not disk I/O.
//!
//! [`BufferedLog`]: gateway_core::observe::BufferedLog
//!
//! `cargo bench -p gateway-benches --bench roundtrip` (add `-- --quick` for a short run).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use gateway_core::{Gateway, Observability};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A fast upstream: a fixed 64-byte body.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(&[b'x'; 64]))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

async fn gateway(upstream: SocketAddr, observe: Observability) -> SocketAddr {
    let yaml = format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{upstream}\n  routes: [{{name: r, paths: [\"/\"]}}]\n"
    );
    let gw =
        Gateway::builder().observability(observe).build(&Config::from_yaml(&yaml).expect("config")).expect("gateway");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { gw.serve(vec![listener], ServerSettings::default(), std::future::pending()).await });
    addr
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // The access log's real cost: formatting into a writer thread, as the binary does.
    let (log, _flush) = gateway_core::observe::BufferedLog::new(std::io::sink(), Duration::from_millis(200));
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || log.clone()).finish();
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");

    let up = rt.block_on(upstream());
    let http1: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let http2: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new());
    let round_trip = |client: &Client<HttpConnector, Empty<Bytes>>, url: &str| {
        let req = Request::get(url).body(Empty::new()).expect("request");
        rt.block_on(async {
            let resp = client.request(req).await.expect("response");
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.expect("body").to_bytes()
        })
    };

    let plain = rt.block_on(gateway(up, Observability::off()));
    let url = format!("http://{plain}/items?page=1");
    let mut group = c.benchmark_group("roundtrip");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("http1", |b| b.iter(|| round_trip(&http1, &url)));
    group.bench_function("http2", |b| b.iter(|| round_trip(&http2, &url)));
    group.finish();

    let mut metrics_only = Observability::default();
    metrics_only.access_log = false;
    let metrics_only = rt.block_on(gateway(up, metrics_only));
    let metrics_url = format!("http://{metrics_only}/items?page=1");
    let observed = rt.block_on(gateway(up, Observability::default()));
    let observed_url = format!("http://{observed}/items?page=1");
    let mut group = c.benchmark_group("observability");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("metrics and access log off", |b| b.iter(|| round_trip(&http1, &url)));
    group.bench_function("metrics on", |b| b.iter(|| round_trip(&http1, &metrics_url)));
    group.bench_function("metrics and access log on", |b| b.iter(|| round_trip(&http1, &observed_url)));
    group.finish();

    // The groups above run one after the other, and this machine's neighbours change the
    // pace between them. The ratio that matters is measured interleaved: off, metrics,
    // metrics + log, off, ... in one loop, per round, median over rounds.
    let urls = [&url, &metrics_url, &observed_url];
    let mut ratios: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        let mut spent = [Duration::ZERO; 3];
        for _ in 0..PER_ROUND {
            for (i, u) in urls.iter().enumerate() {
                let start = Instant::now();
                std::hint::black_box(round_trip(&http1, u));
                spent[i] += start.elapsed();
            }
        }
        ratios[0].push(spent[1].as_secs_f64() / spent[0].as_secs_f64());
        ratios[1].push(spent[2].as_secs_f64() / spent[0].as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "observability interleaved ({ROUNDS} rounds x {PER_ROUND}): metrics on / off = {:.3}, metrics + access log on / off = {:.3}",
        median(&mut ratios[0]),
        median(&mut ratios[1])
    );
}

const ROUNDS: usize = 9;
const PER_ROUND: usize = 2000;

criterion_group!(benches, bench);
criterion_main!(benches);
