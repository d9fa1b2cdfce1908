//! Tracing: the shim joins the traces of whoever calls it and exports its own spans.
//!
//! containerd 2.x's ttrpc client puts the W3C trace context (`traceparent`, `tracestate`,
//! `baggage`) in each request's metadata. Each request the shim serves becomes a server span
//! named `<service>/<method>` under that parent; the work that costs time (runtime commands,
//! guest-agent calls) gets child spans, and calls the shim makes (events to containerd,
//! requests to a guest agent) carry the context on. Spans leave over OTLP/HTTP (protobuf) in
//! batches, from one thread, when the standard `OTEL_*` variables name an endpoint; unset,
//! every function here is one check of a flag.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, ContextGuard, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use ttrpc::proto::{Code, KeyValue as Metadata};

use crate::error::{Error, Result};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TRACING: OnceLock<Tracing> = OnceLock::new();

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TextMapCompositePropagator,
}

/// Whether spans are being made and exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Why tracing is off, or `None` when `env` asks for it: an OTLP endpoint is set
/// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` turns it off. Without an
/// endpoint nothing is exported: a shim never connects anywhere it was not told to.
fn off_because(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Some("OTEL_SDK_DISABLED=true".into());
    }
    match set("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => {}
        Some(other) => {
            return Some(format!(
                "OTEL_TRACES_EXPORTER={other} (only otlp is built in)"
            ))
        }
    }
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
    {
        return Some("no OTLP endpoint set".into());
    }
    let protocol =
        set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match protocol.as_deref().map(str::trim) {
        None | Some("http/protobuf") => None,
        Some(other) => Some(format!(
            "OTLP protocol {other} is not built in (http/protobuf is)"
        )),
    }
}

/// The service name spans carry: `OTEL_SERVICE_NAME`, unless it is unset or names
/// containerd (whose own setting the shim inherits), then `shim`, the binary's name.
fn service_name(env: &dyn Fn(&str) -> Option<String>, shim: &str) -> String {
    match env("OTEL_SERVICE_NAME").map(|s| s.trim().to_string()) {
        Some(s) if !s.is_empty() && s != "containerd" => s,
        _ => shim.to_string(),
    }
}

/// Turns tracing on when the environment asks for it (see the module); `shim` names the
/// service when `OTEL_SERVICE_NAME` does not. Once per process, in the process that serves:
/// the batch exporter's thread does not survive a fork. Whether tracing is on.
pub fn init(shim: &str) -> Result<bool> {
    let env = |k: &str| std::env::var(k).ok();
    if let Some(why) = off_because(&env) {
        log::debug!("tracing off: {why}");
        return Ok(false);
    }
    if TRACING.get().is_some() {
        return Ok(true);
    }
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(EXPORT_TIMEOUT))
        .build();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Http(http.into()))
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| Error::InvalidArgument(format!("tracing: OTLP exporter: {e}")))?;
    let resource = Resource::builder()
        .with_service_name(service_name(&env, shim))
        .build();
    // The SDK panics if it cannot spawn its exporter thread: that is a shim without
    // tracing, not a shim that fails to start.
    let provider = std::panic::catch_unwind(|| {
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build()
    })
    .map_err(|_| Error::InvalidArgument("tracing: the exporter thread did not start".into()))?;
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "containerd-shim");
    let propagator = TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]);
    let tracing = Tracing {
        provider,
        tracer,
        propagator,
    };
    if TRACING.set(tracing).is_ok() {
        ENABLED.store(true, Ordering::Relaxed);
        log::info!("tracing on: spans exported over OTLP/HTTP");
    }
    Ok(true)
}

/// The longest one export may take; a collector that is away costs the exporting thread
/// this much per batch, never a request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a process about to exit gives its last spans to leave: a collector that is
/// away must not hold up the shim's exit (containerd waits for it).
const EXIT_FLUSH: Duration = Duration::from_secs(1);

/// Exports what is queued (for at most a second) and stops exporting; for a process
/// about to exit.
pub fn shutdown() {
    if let Some(t) = TRACING.get() {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = t.provider.shutdown_with_timeout(EXIT_FLUSH) {
            log::warn!("tracing: flush at exit: {e}");
        }
    }
}

/// The span of one ttrpc request the shim serves: a child of the caller's context (from
/// the request's metadata), ended with the status the request was answered with.
pub struct RpcSpan(Context);

impl RpcSpan {
    /// A server span for `/service/method`, or `None` when tracing is off.
    pub fn start(service: &str, method: &str, metadata: &[Metadata]) -> Option<RpcSpan> {
        let t = tracing()?;
        let parent = t.propagator.extract(&MetadataReader(metadata));
        let span = t
            .tracer
            .span_builder(format!("{service}/{method}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "ttrpc"),
                KeyValue::new("rpc.service", service.to_string()),
                KeyValue::new("rpc.method", method.to_string()),
            ])
            .start_with_context(&t.tracer, &parent);
        Some(RpcSpan(parent.with_span(span)))
    }

    /// The span as a context to enter on the thread that handles the request: the spans
    /// and calls made there are its children.
    pub fn carried(&self) -> Carried {
        Carried(Some(self.0.clone()))
    }

    /// Ends the span with the request's answer: `code` and, when not OK, its message.
    pub fn end(self, code: Code, message: &str) {
        let span = self.0.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        if code != Code::OK {
            span.set_status(Status::error(message.to_string()));
        }
        span.end();
    }
}

/// A span for a piece of work inside the current one; it ends when dropped. The default
/// is no span.
#[derive(Default)]
#[must_use = "the span ends when dropped"]
pub struct Span(Option<Context>);

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(cx) = self.0.take() {
            cx.span().end();
        }
    }
}

impl Span {
    /// Adds an attribute (a no-op when tracing is off).
    pub fn attribute(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(cx) = &self.0 {
            cx.span().set_attribute(KeyValue::new(key, value));
        }
    }
}

/// A child of the current span named `name` (`runc create`), for work that takes time.
/// Only within a traced request: with no current span it makes none.
pub fn span(name: impl Into<Cow<'static, str>>) -> Span {
    let Some(t) = tracing() else {
        return Span(None);
    };
    let cx = Context::current();
    if !cx.has_active_span() {
        return Span(None);
    }
    let span = t
        .tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .start_with_context(&t.tracer, &cx);
    Span(Some(cx.with_span(span)))
}

/// Sets an attribute on the current span, if there is one.
pub fn annotate(key: &'static str, value: impl Into<opentelemetry::Value>) {
    if tracing().is_some() {
        Context::current()
            .span()
            .set_attribute(KeyValue::new(key, value));
    }
}

/// The current context, to carry to another thread (a queued event's sender).
#[derive(Clone, Default)]
pub struct Carried(Option<Context>);

impl Carried {
    /// What is current on this thread (nothing when tracing is off or no span is).
    pub fn current() -> Carried {
        if !enabled() {
            return Carried(None);
        }
        let cx = Context::current();
        Carried(cx.has_active_span().then_some(cx))
    }

    /// Makes it current on this thread until the guard drops.
    pub fn enter(&self) -> Option<ContextGuard> {
        self.0.clone().map(Context::attach)
    }
}

/// Adds the current context (`traceparent`, ...) to an outgoing request's metadata.
pub fn inject(metadata: &mut Vec<Metadata>) {
    let Some(t) = tracing() else { return };
    let cx = Context::current();
    if cx.has_active_span() {
        t.propagator
            .inject_context(&cx, &mut MetadataWriter(metadata));
    }
}

/// The current trace's id (32 hex digits), for log lines.
pub fn trace_id() -> Option<String> {
    tracing()?;
    let cx = Context::current();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

fn tracing() -> Option<&'static Tracing> {
    if enabled() {
        TRACING.get()
    } else {
        None
    }
}

/// ttrpc metadata as the propagator reads it. Go's ttrpc lower-cases keys; so do we.
struct MetadataReader<'a>(&'a [Metadata]);

impl Extractor for MetadataReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|kv| kv.key.eq_ignore_ascii_case(key))
            .map(|kv| kv.value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|kv| kv.key.as_str()).collect()
    }
}

struct MetadataWriter<'a>(&'a mut Vec<Metadata>);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = key.to_ascii_lowercase();
        self.0.retain(|kv| kv.key != key);
        // An empty `tracestate` is left out, as Go's propagator does.
        if value.is_empty() {
            return;
        }
        self.0.push(Metadata {
            key,
            value,
            ..Default::default()
        });
    }
}

/// The exporter's HTTP client: ureq, blocking, on the batch exporter's own thread (the
/// exporter's future is driven there by a plain `block_on`), so no async runtime is needed.
#[derive(Debug)]
struct Http(ureq::Agent);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Http {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> std::result::Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let (parts, body) = request.into_parts();
        let res = self.0.run(opentelemetry_http::Request::from_parts(
            parts,
            body.to_vec(),
        ))?;
        let (parts, mut body) = res.into_parts();
        let body = body.read_to_vec()?;
        Ok(opentelemetry_http::Response::from_parts(parts, body.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn tracing_is_on_only_with_an_endpoint_and_not_disabled() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert_eq!(off_because(&env(&[ep])), None);
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://h:4318/v1/traces",
        );
        assert_eq!(off_because(&env(&[traces])), None);
        let said = |vars: &[(&str, &str)]| off_because(&env(vars)).unwrap_or_default();
        assert!(said(&[]).contains("no OTLP endpoint"));
        assert!(said(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).contains("no OTLP endpoint"));
        assert!(said(&[ep, ("OTEL_SDK_DISABLED", "TRUE")]).contains("OTEL_SDK_DISABLED"));
        assert_eq!(
            off_because(&env(&[ep, ("OTEL_SDK_DISABLED", "false")])),
            None
        );
        assert!(said(&[ep, ("OTEL_TRACES_EXPORTER", "none")]).contains("none"));
        let grpc = ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        assert!(said(&[ep, grpc]).contains("grpc is not built in"));
        let http = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf");
        assert_eq!(off_because(&env(&[ep, grpc, http])), None);
    }

    #[test]
    fn the_service_is_named_after_the_shim_unless_set_for_it() {
        let name = |vars: &[(&str, &str)]| service_name(&env(vars), "containerd-shim-runc-v2");
        assert_eq!(name(&[]), "containerd-shim-runc-v2");
        assert_eq!(
            name(&[("OTEL_SERVICE_NAME", "containerd")]),
            "containerd-shim-runc-v2"
        );
        assert_eq!(name(&[("OTEL_SERVICE_NAME", "node-shims")]), "node-shims");
    }

    #[test]
    fn metadata_carries_the_trace_context_both_ways() {
        let prop = TraceContextPropagator::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let md = vec![Metadata {
            key: "Traceparent".into(),
            value: parent.into(),
            ..Default::default()
        }];
        let cx = prop.extract(&MetadataReader(&md));
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
        let mut out = vec![Metadata {
            key: "traceparent".into(),
            value: "stale".into(),
            ..Default::default()
        }];
        prop.inject_context(&cx, &mut MetadataWriter(&mut out));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            (out[0].key.as_str(), out[0].value.as_str()),
            ("traceparent", parent)
        );
    }

    #[test]
    fn with_tracing_off_nothing_is_made() {
        assert!(RpcSpan::start("s", "m", &[]).is_none());
        let s = span("runc create");
        assert!(s.0.is_none(), "no span, so nothing to enter");
        let mut md = Vec::new();
        inject(&mut md);
        assert!(md.is_empty() && trace_id().is_none() && Carried::current().0.is_none());
    }
}
