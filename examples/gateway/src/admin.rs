//! The admin listener (loopback by default): `/healthz` and `/status`.

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use gateway_core::Gateway;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub(crate) async fn serve(listener: TcpListener, gateway: Gateway) {
    let started = Instant::now();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let gateway = gateway.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/healthz" => (200, serde_json::json!({"status": "ok"})),
                        "/status" => (
                            200,
                            serde_json::json!({
                                "routes": gateway.routes().len(),
                                "uptime_seconds": started.elapsed().as_secs(),
                                "version": env!("CARGO_PKG_VERSION"),
                            }),
                        ),
                        _ => (404, serde_json::json!({"message": "Not found"})),
                    };
                    let mut resp = http::Response::new(Full::new(Bytes::from(body.to_string())));
                    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
                    resp.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
