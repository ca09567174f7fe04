//! `correlation-id`: gives every request an id header (kept when the client sent one), and
//! optionally echoes it on the response.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};

use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::plugin::{Answer, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use gateway_core::proxy::next_request_id;
use http::{HeaderName, HeaderValue, Request, Response};
use serde::Deserialize;

/// Kong's priority for correlation-id.
pub const PRIORITY: i32 = 100_001;

/// How ids are made.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum Generator {
    /// A random UUID per request.
    #[serde(rename = "uuid")]
    Uuid,
    /// A random UUID per gateway instance, then `#` and a counter (the default).
    #[default]
    #[serde(rename = "uuid#counter")]
    UuidCounter,
    /// Client address and port, local port, a counter and the time in milliseconds.
    #[serde(rename = "tracker")]
    Tracker,
}

/// correlation-id's config (Kong's fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelationIdConfig {
    /// The header (default `Kong-Request-ID`).
    #[serde(default = "default_header")]
    pub header_name: String,
    /// How ids are made.
    #[serde(default)]
    pub generator: Generator,
    /// Send the id back on the response too.
    #[serde(default)]
    pub echo_downstream: bool,
}

fn default_header() -> String {
    "Kong-Request-ID".to_string()
}

/// The id chosen for a request, for the response hook.
#[derive(Debug, Clone)]
struct Chosen(HeaderValue);

/// The correlation-id plugin.
pub struct CorrelationId {
    header: HeaderName,
    generator: Generator,
    echo: bool,
    instance: String,
    counter: AtomicU64,
}

/// The factory to register.
pub fn factory() -> TypedFactory<
    CorrelationIdConfig,
    impl Fn(CorrelationIdConfig, &BuildContext<'_>) -> Result<CorrelationId, String> + Send + Sync,
> {
    typed_factory("correlation-id", PRIORITY, |c: CorrelationIdConfig, _: &BuildContext<'_>| {
        let header = HeaderName::from_bytes(c.header_name.as_bytes())
            .map_err(|_| format!("`header_name` `{}` is not a header name", c.header_name))?;
        Ok(CorrelationId {
            header,
            generator: c.generator,
            echo: c.echo_downstream,
            instance: uuid(),
            counter: AtomicU64::new(0),
        })
    })
}

/// A random version-4 UUID, from the gateway's id generator.
fn uuid() -> String {
    let hex = next_request_id();
    let h = hex.to_str().unwrap_or("00000000000000000000000000000000");
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

impl CorrelationId {
    fn make(&self, ctx: &RequestContext) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        match self.generator {
            Generator::Uuid => uuid(),
            Generator::UuidCounter => format!("{}#{n}", self.instance),
            Generator::Tracker => {
                let ms =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
                format!("{}-{}-{}-{n}-{ms}", ctx.conn.client.ip(), ctx.conn.client.port(), ctx.conn.local.port())
            }
        }
    }
}

impl Plugin for CorrelationId {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        let value = match req.headers().get(&self.header) {
            Some(v) => v.clone(),
            None => {
                let v = HeaderValue::from_str(&self.make(ctx)).unwrap_or(HeaderValue::from_static("invalid"));
                req.headers_mut().insert(self.header.clone(), v.clone());
                v
            }
        };
        if self.echo {
            ctx.extensions.insert(Chosen(value));
        }
        ControlFlow::Continue(())
    }

    fn response(&self, ctx: &mut RequestContext, resp: &mut Response<ResponseBody>) {
        if let Some(Chosen(v)) = ctx.extensions.get::<Chosen>() {
            resp.headers_mut().insert(self.header.clone(), v.clone());
        }
    }
}
