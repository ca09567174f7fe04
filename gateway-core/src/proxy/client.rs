//! The pooled keep-alive upstream client, with nginx-style timeouts on the socket.
//!
//! hyper-util's client pools connections per authority; this module only adds a connector that
//! wraps each TCP stream in `tokio-io-timeout`, so `read_timeout` and `write_timeout` mean what
//! they mean in Kong and nginx: the longest wait between two successive reads (writes) on the
//! upstream connection. A timer that fires surfaces as an `io::ErrorKind::TimedOut` inside the
//! hyper error, which the proxy answers with 504.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;

use crate::body::{BoxError, ProxyBody};

/// The client type every service uses.
pub(crate) type UpstreamClient = Client<TimeoutConnector, ProxyBody>;

/// Timeouts of one service, the key of the shared client cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) read: Duration,
    pub(crate) write: Duration,
}

/// Builds a pooled client for a set of timeouts.
pub(crate) fn build_client(t: Timeouts) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(t.connect));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        // An idle pooled connection must be dropped before its own read timer would fire.
        .pool_idle_timeout(t.read.min(Duration::from_secs(60)).mul_f32(0.9))
        .build(TimeoutConnector {
            http,
            read: t.read,
            write: t.write,
        })
}

/// `HttpConnector` plus read/write timeouts on the stream.
#[derive(Debug, Clone)]
pub(crate) struct TimeoutConnector {
    http: HttpConnector,
    read: Duration,
    write: Duration,
}

impl tower_service::Service<Uri> for TimeoutConnector {
    type Response = TimedIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TimedIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let (read, write) = (self.read, self.write);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let mut stream = TimeoutStream::new(tcp);
            stream.set_read_timeout(Some(read));
            stream.set_write_timeout(Some(write));
            Ok(TimedIo(TokioIo::new(Box::pin(stream))))
        })
    }
}

/// An upstream connection with read/write timeouts.
#[derive(Debug)]
pub(crate) struct TimedIo(TokioIo<Pin<Box<TimeoutStream<TcpStream>>>>);

impl Connection for TimedIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}
