//! `--features otel`: one OpenTelemetry span per proxied request, exported over OTLP/HTTP.
//!
//! The span is built from the gateway's finished-request hook, with the ids the gateway put
//! in the `traceparent` it sent upstream: the upstream's spans nest under the gateway's, and
//! the gateway's under the client's. The OpenTelemetry SDK picks ids with its `IdGenerator`
//! (a builder's ids are ignored), so the generator here hands out the ids of the request
//! being recorded.

use std::cell::Cell;
use std::sync::Arc;

use gateway_core::observe::{FinishHook, RequestRecord};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};

thread_local! {
    /// The ids of the span being built on this thread, for [`HookIds`].
    static NEXT: Cell<Option<(u128, u64)>> = const { Cell::new(None) };
}

/// Gives the SDK the ids the gateway already sent upstream.
#[derive(Debug, Default)]
struct HookIds(RandomIdGenerator);

impl IdGenerator for HookIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT.with(Cell::get).map_or_else(|| self.0.new_trace_id(), |(t, _)| TraceId::from(t))
    }
    fn new_span_id(&self) -> SpanId {
        NEXT.with(Cell::get).map_or_else(|| self.0.new_span_id(), |(_, s)| SpanId::from(s))
    }
}

/// Starts the exporter to `endpoint` (e.g. `http://127.0.0.1:4318/v1/traces`); returns the
/// hook to install and the provider, to shut down (flush) at exit.
pub(crate) fn start(endpoint: &str) -> Result<(FinishHook, SdkTracerProvider), String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("OTLP exporter for `{endpoint}`: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_id_generator(HookIds::default())
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("gateway").build())
        .build();
    let tracer = provider.tracer("gateway");
    let hook: FinishHook = Arc::new(move |r: &RequestRecord<'_>| {
        let Some(t) = r.trace.filter(|t| t.sampled) else { return };
        let parent = match t.parent_span_id {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(t.trace_id),
                SpanId::from(p),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let name = if r.route.is_empty() { r.method.to_string() } else { format!("{} {}", r.method, r.route) };
        let mut attributes = vec![
            KeyValue::new("http.request.method", r.method.to_string()),
            KeyValue::new("http.response.status_code", i64::from(r.status)),
            KeyValue::new("url.path", r.path.to_string()),
            KeyValue::new("server.address", r.host.to_string()),
            KeyValue::new("http.route", r.route.to_string()),
            KeyValue::new("gateway.service", r.service.to_string()),
        ];
        if let Some(up) = r.upstream {
            attributes.push(KeyValue::new("gateway.upstream", up.to_string()));
        }
        NEXT.with(|n| n.set(Some((t.trace_id, t.span_id))));
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(r.started)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        NEXT.with(|n| n.set(None));
        if r.status >= 500 {
            opentelemetry::trace::Span::set_status(&mut span, Status::error(format!("HTTP {}", r.status)));
        }
        opentelemetry::trace::Span::end_with_timestamp(&mut span, r.started + r.duration);
    });
    Ok((hook, provider))
}
