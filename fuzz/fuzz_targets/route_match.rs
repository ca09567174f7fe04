//! Arbitrary host/path against a fixed mixed table: a match or none, never a panic.
#![no_main]

use gateway_core::router::{PathKind, PathSpec, RouteInput, RouteSpec, Router, split_host};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    thread_local! {
        static ROUTER: Router = Router::new(vec![
            RouteSpec { paths: vec![PathSpec::new("/", PathKind::Prefix)], ..Default::default() },
            RouteSpec { hosts: vec!["*.example.com".into()], paths: vec![PathSpec::new("/api/", PathKind::ElementPrefix)], ..Default::default() },
            RouteSpec { hosts: vec!["a.example.*".into()], paths: vec![PathSpec::new("/exact", PathKind::Exact)], ..Default::default() },
            RouteSpec { paths: vec![PathSpec::new(r"/u/\d+", PathKind::Regex)], ..Default::default() },
        ]).unwrap();
    }
    let text = String::from_utf8_lossy(data);
    let (host, path) = text.split_once(' ').unwrap_or((&text, "/"));
    let (host, port) = split_host(host);
    let headers = http::HeaderMap::new();
    ROUTER.with(|r| {
        if let Some(m) = r.find(&RouteInput { host: &host, port, path, method: &http::Method::GET, headers: &headers })
        {
            assert!(m.matched_len <= path.len());
        }
    });
});
