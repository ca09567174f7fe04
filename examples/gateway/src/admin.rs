//! The admin listener (loopback by default): `gateway_core`'s admin API over HTTP/1.1 and h2c.

use gateway_core::Gateway;
use gateway_core::admin::AdminSettings;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

pub(crate) async fn serve(listener: TcpListener, gateway: Gateway, settings: AdminSettings) {
    let service = gateway.admin(settings);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let svc = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
