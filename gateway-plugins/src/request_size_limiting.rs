//! `request-size-limiting`: refuses request bodies over a size (413), optionally requiring a
//! `Content-Length` (411).
//!
//! A body with a `Content-Length` is judged by the header alone. A body without one
//! (chunked, HTTP/2) is read up to the limit before it goes upstream, so memory stays bounded
//! by the limit and an oversized body is refused before the upstream sees a byte.

use std::ops::ControlFlow;

use gateway_core::body::{ProxyBody, ReadError, read_limited};
use gateway_core::plugin::{Answer, BoxFuture, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{Request, StatusCode, header};
use http_body::Body;
use serde::Deserialize;

/// Kong's priority for request-size-limiting.
pub const PRIORITY: i32 = 951;

/// Units of `allowed_payload_size`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SizeUnit {
    /// Bytes.
    Bytes,
    /// 1024 bytes.
    Kilobytes,
    /// 1024 * 1024 bytes (the default).
    #[default]
    Megabytes,
}

/// request-size-limiting's config (Kong's fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSizeLimitingConfig {
    /// The largest body allowed, in `size_unit` (default 128).
    #[serde(default = "default_size")]
    pub allowed_payload_size: u64,
    /// Unit of `allowed_payload_size` (default megabytes).
    #[serde(default)]
    pub size_unit: SizeUnit,
    /// Refuse requests without a valid `Content-Length` with 411.
    #[serde(default)]
    pub require_content_length: bool,
}

fn default_size() -> u64 {
    128
}

/// The request-size-limiting plugin.
pub struct RequestSizeLimiting {
    limit: u64,
    require_content_length: bool,
}

/// The factory to register.
pub fn factory() -> TypedFactory<
    RequestSizeLimitingConfig,
    impl Fn(RequestSizeLimitingConfig, &BuildContext<'_>) -> Result<RequestSizeLimiting, String> + Send + Sync,
> {
    typed_factory("request-size-limiting", PRIORITY, |c: RequestSizeLimitingConfig, _: &BuildContext<'_>| {
        let unit = match c.size_unit {
            SizeUnit::Bytes => 1,
            SizeUnit::Kilobytes => 1024,
            SizeUnit::Megabytes => 1024 * 1024,
        };
        let limit = c.allowed_payload_size.checked_mul(unit).ok_or("`allowed_payload_size` is too large")?;
        Ok(RequestSizeLimiting { limit, require_content_length: c.require_content_length })
    })
}

impl RequestSizeLimiting {
    fn too_large(ctx: &RequestContext) -> Answer {
        ctx.error(StatusCode::PAYLOAD_TOO_LARGE, "Request size limit exceeded")
    }
}

impl Plugin for RequestSizeLimiting {
    fn is_async(&self) -> bool {
        true
    }

    fn access_async<'a>(
        &'a self,
        ctx: &'a mut RequestContext,
        req: &'a mut Request<ProxyBody>,
    ) -> BoxFuture<'a, ControlFlow<Answer>> {
        Box::pin(async move {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            match declared {
                Some(len) if len > self.limit => return ControlFlow::Break(Self::too_large(ctx)),
                Some(_) => return ControlFlow::Continue(()),
                None if self.require_content_length => {
                    return ControlFlow::Break(
                        ctx.error(StatusCode::LENGTH_REQUIRED, "A valid Content-Length header is required"),
                    );
                }
                None => {}
            }
            if req.body().is_end_stream() {
                return ControlFlow::Continue(());
            }
            let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
            match read_limited(req.body_mut(), limit).await {
                Ok(bytes) => {
                    *req.body_mut() = ProxyBody::full(bytes);
                    ControlFlow::Continue(())
                }
                Err(ReadError::TooLarge { .. }) => ControlFlow::Break(Self::too_large(ctx)),
                Err(e @ ReadError::Failed(_)) => {
                    tracing::debug!(error = %e, "request body failed while counting it");
                    let (status, message) = e.answer();
                    ControlFlow::Break(ctx.error(status, message))
                }
            }
        })
    }
}
