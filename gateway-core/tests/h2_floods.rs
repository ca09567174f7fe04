//! HTTP/2 floods from a raw client that writes frames by hand: rapid reset (CVE-2023-44487)
//! and CONTINUATION flood. Each must end in GOAWAY and a closed connection, with the upstream
//! seeing a bounded number of requests and other clients served throughout.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// `GET /` for authority `x`, HPACK-encoded from the static table: `:method GET`, `:scheme
/// http`, `:path /`, then `:authority` as a literal without indexing.
const GET_ROOT: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'x'];

/// One literal header `x-flood: aaaa…` (62 bytes of value), without indexing and with a
/// new name, so that the decoder keeps none of it in its table.
fn flood_header() -> Vec<u8> {
    let mut h = vec![0x00, 7];
    h.extend_from_slice(b"x-flood");
    h.push(62);
    h.extend_from_slice(&[b'a'; 62]);
    h
}

/// What the server sent until it closed the connection (or 10 s passed): the GOAWAY error
/// code, if any, and whether the connection closed.
async fn read_until_closed(mut rx: OwnedReadHalf) -> (Option<u32>, bool) {
    let mut goaway = None;
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        let mut head = [0u8; 9];
        loop {
            if rx.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if rx.read_exact(&mut payload).await.is_err() {
                return;
            }
            if head[3] == GOAWAY && len >= 8 {
                goaway = Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
            }
        }
    })
    .await;
    (goaway, result.is_ok())
}

/// Opens an HTTP/2 connection by hand: the preface, an empty SETTINGS frame, then `first`;
/// returns the sending half and a task reading the server's frames until it closes.
async fn connect(gw: &RunningGateway, first: &[u8]) -> (OwnedWriteHalf, JoinHandle<(Option<u32>, bool)>) {
    let (rx, mut tx) = TcpStream::connect(gw.addr).await.unwrap().into_split();
    let reader = tokio::spawn(read_until_closed(rx));
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    out.extend_from_slice(first);
    tx.write_all(&out).await.unwrap();
    (tx, reader)
}

fn config(up: std::net::SocketAddr) -> String {
    format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{up}\n  routes: [{{name: r, paths: [\"/\"]}}]\n"
    )
}

async fn others_are_served(gw: &RunningGateway) {
    let h2 = h2_client().request(http::Request::get(gw.url("/")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(h2.status(), http::StatusCode::OK);
    assert_eq!(get(&gw.url("/")).await.status, http::StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway() {
    let (up, seen) = counting_echo_upstream().await;
    let gw = start_gateway(&config(up.addr)).await;
    let (mut tx, reader) = connect(&gw, &[]).await;
    // 10,000 requests, each cancelled as soon as it is sent, 100 to a write; stop when the
    // server hangs up.
    let mut sent = 0;
    for batch in 0..100u32 {
        let mut out = Vec::new();
        for i in 0..100u32 {
            let id = 2 * (batch * 100 + i) + 1;
            frame(&mut out, HEADERS, END_STREAM | END_HEADERS, id, GET_ROOT);
            frame(&mut out, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
        }
        if tx.write_all(&out).await.is_err() {
            break;
        }
        sent += 100;
    }
    let (goaway, closed) = reader.await.unwrap();
    // Whether the writes failed before all 10,000 went out depends on socket buffers; what
    // the server did does not.
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "sent {sent} cancelled requests");
    assert!(closed, "the connection stayed open");
    let reached = seen.load(Ordering::SeqCst);
    assert!(reached < 200, "{reached} cancelled requests reached the upstream");
    others_are_served(&gw).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_gets_goaway() {
    let (up, seen) = counting_echo_upstream().await;
    let gw = start_gateway(&config(up.addr)).await;
    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION frames
    // of one 72-byte header each, up to 16 MiB in all, 1,000 frames to a write.
    let mut first = Vec::new();
    frame(&mut first, HEADERS, END_STREAM, 1, GET_ROOT);
    let (mut tx, reader) = connect(&gw, &first).await;
    let header = flood_header();
    let (mut written, mut refused) = (0usize, false);
    for _ in 0..200 {
        let mut out = Vec::with_capacity(1000 * (9 + header.len()));
        for _ in 0..1000 {
            frame(&mut out, CONTINUATION, 0, 1, &header);
        }
        if tx.write_all(&out).await.is_err() {
            refused = true;
            break;
        }
        written += out.len();
    }
    let (goaway, closed) = reader.await.unwrap();
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "after {written} bytes of CONTINUATION frames");
    assert!(closed, "the connection stayed open");
    // 16 MB is far more than socket buffers hold: had the server kept reading the header
    // block, every write would have gone through.
    assert!(refused, "the server read all {written} bytes of one header block");
    assert_eq!(seen.load(Ordering::SeqCst), 0, "the unfinished request reached the upstream");
    others_are_served(&gw).await;
    gw.shutdown().await;
}
