//! A 1 GiB upload streams through with bounded memory. Alone in its own test binary, so the
//! process's peak RSS belongs to this test only.

mod common;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_with_bounded_memory() {
    const SIZE: u64 = 1 << 30;
    let up = echo_upstream().await;
    let gw = start_gateway(&format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{}\n  routes: [{{name: r, paths: [\"/\"]}}]\n",
        up.addr
    ))
    .await;
    let before = peak_rss_kib();
    let body = Generated { remaining: SIZE, chunk: bytes::Bytes::from(vec![7u8; 256 * 1024]) };
    let req = Request::post(gw.url("/upload")).body(body.boxed_unsync()).unwrap();
    let resp = send(req).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.echo().body_len, SIZE, "the upstream received every byte");
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    assert!(grown_mib < 128, "peak RSS grew by {grown_mib} MiB while streaming 1 GiB");
    gw.shutdown().await;
}
