//! Tracing: the shim joins the traces of whoever calls it and exports its own spans.
//!
//! containerd 2.x's ttrpc client puts the W3C trace context (`traceparent`, `tracestate`,
//! `baggage`) in each request's metadata. Each request the shim serves becomes a server span
//! named `<service>/<method>` under that parent; the work that costs time (runtime commands,
//! guest-agent calls) gets child spans, and calls the shim makes (events to containerd,
//! requests to a guest agent) carry the context on. Spans leave over OTLP/HTTP (protobuf) in
//! batches, from one thread, when the standard `OTEL_*` variables name an endpoint; unset,
//! every function here is one check of a flag.
//!
//! The span model, the W3C propagation and the OTLP encoding are the SDK's own, small on
//! purpose: the OpenTelemetry SDK and an HTTP client made every shim's resident code
//! ~0.4 MB larger even with tracing off (a static binary's text is mapped in fault-around
//! windows, so code that never runs still costs pages).

mod export;
mod otlp;
mod settings;
mod w3c;

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use ttrpc::proto::{Code, KeyValue as Metadata};

use crate::error::{Error, Result};
use crate::events::Publisher;
use export::Exporter;
pub use otlp::Value;
use otlp::{Finished, Kind, Parent};
use protobuf::well_known_types::any::Any;
use settings::{config, off_because, Sampler};
use w3c::SpanContext;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TRACING: OnceLock<Tracing> = OnceLock::new();

struct Tracing {
    sampler: Sampler,
    sink: Sink,
}

/// Where ended spans go.
enum Sink {
    /// To an OTLP collector, from the exporter's thread.
    Export(Exporter),
    /// To the peer that fetches this process's events (a guest agent's host), one span
    /// per event, each an OTLP export request of its own that the peer sends on with its
    /// own ([`forward`]).
    Peer {
        publisher: Arc<dyn Publisher>,
        resource: otlp::Attributes,
    },
}

/// The topic of the events that carry a guest agent's spans to its host.
pub const SPANS_TOPIC: &str = "/containerd.shim.sdk.v1/spans";

/// The type of those events' payload: an OTLP export request, protobuf.
pub const SPANS_TYPE: &str = "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest";

/// Whether spans are being made and exported.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns tracing on when the environment asks for it (see the module); `shim` names the
/// service when `OTEL_SERVICE_NAME` does not. Once per process, in the process that serves:
/// the exporter's thread does not survive a fork. Whether tracing is on.
#[cold]
pub fn init(shim: &str) -> Result<bool> {
    let env = |k: &str| std::env::var(k).ok();
    if let Some(why) = off_because(&env) {
        log::debug!("tracing off: {why}");
        return Ok(false);
    }
    if TRACING.get().is_some() {
        return Ok(true);
    }
    let config = config(&env, shim).map_err(|e| Error::InvalidArgument(format!("tracing: {e}")))?;
    let endpoint = format!(
        "http://{}{}",
        config.endpoint.authority, config.endpoint.path
    );
    let exporter = Exporter::start(config)
        .map_err(|e| Error::Runtime(format!("tracing: start the exporter thread: {e}")))?;
    if turn_on(Sampler::from_env(&env), Sink::Export(exporter)) {
        log::info!("tracing on: spans exported to {endpoint}");
    }
    Ok(true)
}

/// Tracing for a process whose spans go to the peer that fetches its events (a guest
/// agent, whose host exports them): `publisher` carries them as [`SPANS_TOPIC`] events.
/// Only requests that come with a sampled trace context are recorded, so a host that does
/// not trace costs the agent two random ids per call and nothing else; `name` is the
/// spans' service name.
#[cold]
pub fn init_peer(name: &str, publisher: Arc<dyn Publisher>) {
    let resource = vec![
        ("service.name".into(), name.to_string().into()),
        ("process.pid".into(), i64::from(std::process::id()).into()),
        ("telemetry.sdk.language".into(), "rust".into()),
    ];
    let sampler = Sampler {
        parent_based: true,
        root_bound: 0,
    };
    turn_on(
        sampler,
        Sink::Peer {
            publisher,
            resource,
        },
    );
}

#[cold]
fn turn_on(sampler: Sampler, sink: Sink) -> bool {
    let on = TRACING.set(Tracing { sampler, sink }).is_ok();
    if on {
        ENABLED.store(true, Ordering::Relaxed);
    }
    on
}

/// Sends on an OTLP export request that a peer's [`SPANS_TOPIC`] event carried (the spans
/// of a guest agent) with this process's own spans. Not an event of that type, or tracing
/// off here: nothing.
#[cold]
pub fn forward(event: &Any) {
    if event.type_url != SPANS_TYPE {
        return;
    }
    if let Some(Tracing {
        sink: Sink::Export(exporter),
        ..
    }) = tracing()
    {
        exporter.push_encoded(event.value.clone());
    }
}

/// The instrumentation scope of every span: the SDK, at its version.
const SCOPE: (&str, &str) = ("containerd-shim", env!("CARGO_PKG_VERSION"));

/// How long a process about to exit gives its last spans to leave: a collector that is
/// away must not hold up the shim's exit (containerd waits for it).
const EXIT_FLUSH: Duration = Duration::from_secs(1);

/// Exports what is queued (for at most a second) and stops exporting; for a process
/// about to exit.
#[cold]
pub fn shutdown() {
    if let Some(Tracing {
        sink: Sink::Export(exporter),
        ..
    }) = TRACING.get()
    {
        ENABLED.store(false, Ordering::Relaxed);
        if !exporter.shutdown(EXIT_FLUSH) {
            log::warn!("tracing: spans still queued at exit were not all exported");
        }
    }
}

#[inline]
fn tracing() -> Option<&'static Tracing> {
    if enabled() {
        TRACING.get()
    } else {
        None
    }
}

/// A span being recorded: ended once, by whoever holds it last or ends it first.
struct Recording {
    cx: SpanContext,
    parent: Option<Parent>,
    name: Cow<'static, str>,
    kind: Kind,
    start: SystemTime,
    data: Mutex<Data>,
}

#[derive(Default)]
struct Data {
    attributes: otlp::Attributes,
    error: Option<String>,
    ended: bool,
}

impl Recording {
    #[cold]
    fn new(
        cx: SpanContext,
        parent: Option<Parent>,
        name: Cow<'static, str>,
        kind: Kind,
        attributes: otlp::Attributes,
    ) -> Arc<Recording> {
        Arc::new(Recording {
            cx,
            parent,
            name,
            kind,
            start: SystemTime::now(),
            data: Mutex::new(Data {
                attributes,
                ..Data::default()
            }),
        })
    }

    #[cold]
    fn set(&self, key: Cow<'static, str>, value: Value) {
        let mut d = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        if !d.ended {
            d.attributes.retain(|(k, _)| *k != key);
            d.attributes.push((key, value));
        }
    }

    /// Records how the request or call was answered: `code`, and when not OK its message
    /// as the span's error.
    #[cold]
    fn outcome(&self, code: Code, message: &str) {
        self.set("rpc.grpc.status_code".into(), (code as i64).into());
        if code != Code::OK {
            self.data
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .error = Some(message.to_string());
        }
    }

    #[cold]
    fn end(&self) {
        let end = SystemTime::now();
        let (attributes, error) = {
            let mut d = self.data.lock().unwrap_or_else(PoisonError::into_inner);
            if std::mem::replace(&mut d.ended, true) {
                return;
            }
            (std::mem::take(&mut d.attributes), d.error.take())
        };
        let Some(t) = TRACING.get() else { return };
        let finished = Finished {
            trace_id: self.cx.trace_id,
            span_id: self.cx.span_id,
            parent: self.parent,
            state: self.cx.state.clone(),
            flags: self.cx.flags,
            name: self.name.clone(),
            kind: self.kind,
            start: self.start,
            end,
            attributes,
            error,
        };
        match &t.sink {
            Sink::Export(exporter) => exporter.push(finished),
            Sink::Peer {
                publisher,
                resource,
            } => {
                let value = otlp::encode(resource, SCOPE, std::slice::from_ref(&finished));
                let event = Any {
                    type_url: SPANS_TYPE.into(),
                    value,
                    ..Default::default()
                };
                publisher.publish(SPANS_TOPIC, event);
            }
        }
    }
}

/// What is current on a thread: a span's context (recorded or not) and the baggage that
/// came with the request.
#[derive(Clone)]
struct Current {
    cx: SpanContext,
    recording: Option<Arc<Recording>>,
    baggage: Option<Arc<str>>,
    /// The trace is the caller's (not one made up here and left unrecorded): its id is
    /// worth a log line.
    joined: bool,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

#[cold]
fn current() -> Option<Current> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Random, non-zero ids: SipHash (std's `RandomState`, keyed from the OS's randomness once
/// per thread) of a per-thread counter.
#[cold]
fn random_u64() -> u64 {
    thread_local! {
        static KEYS: RandomState = RandomState::new();
        static COUNTER: Cell<u64> = const { Cell::new(0) };
    }
    let n = COUNTER.with(|c| {
        c.set(c.get().wrapping_add(1));
        c.get()
    });
    KEYS.with(|k| k.hash_one(n)).max(1)
}

#[cold]
fn new_span_id() -> [u8; 8] {
    random_u64().to_be_bytes()
}

#[cold]
fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&random_u64().to_be_bytes());
    id
}

/// The span of one ttrpc request the shim serves: a child of the caller's context (from
/// the request's metadata), ended with the status the request was answered with.
pub struct RpcSpan(Current);

impl RpcSpan {
    /// A server span for `/service/method`, or `None` when tracing is off.
    #[inline]
    pub fn start(service: &str, method: &str, metadata: &[Metadata]) -> Option<RpcSpan> {
        let t = tracing()?;
        Some(RpcSpan::traced(t, service, method, metadata))
    }

    #[cold]
    fn traced(t: &Tracing, service: &str, method: &str, metadata: &[Metadata]) -> RpcSpan {
        let incoming = w3c::extract(metadata);
        let parent = incoming.parent.as_ref();
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        let sampled = t.sampler.sampled(parent, &trace_id);
        let cx = SpanContext {
            trace_id,
            span_id: new_span_id(),
            flags: if sampled { w3c::SAMPLED } else { 0 },
            state: parent.and_then(|p| p.state.clone()),
        };
        let recording = sampled.then(|| {
            Recording::new(
                cx.clone(),
                parent.map(|p| Parent {
                    span_id: p.span_id,
                    remote: true,
                }),
                Cow::Owned(format!("{service}/{method}")),
                Kind::Server,
                rpc_attributes(service, method),
            )
        });
        RpcSpan(Current {
            cx,
            joined: parent.is_some() || recording.is_some(),
            recording,
            baggage: incoming.baggage,
        })
    }

    /// The span as a context to enter on the thread that handles the request: the spans
    /// and calls made there are its children.
    #[cold]
    pub fn carried(&self) -> Carried {
        Carried(Some(self.0.clone()))
    }

    /// Ends the span with the request's answer: `code` and, when not OK, its message.
    #[cold]
    pub fn end(self, code: Code, message: &str) {
        if let Some(r) = &self.0.recording {
            r.outcome(code, message);
        }
    }
}

impl Drop for RpcSpan {
    #[cold]
    fn drop(&mut self) {
        if let Some(r) = &self.0.recording {
            r.end();
        }
    }
}

/// A span for a piece of work inside the current one; it ends when dropped. The default
/// is no span.
#[derive(Default)]
#[must_use = "the span ends when dropped"]
pub struct Span(Option<Current>);

impl Drop for Span {
    #[inline]
    fn drop(&mut self) {
        if self.0.is_some() {
            self.finish();
        }
    }
}

impl Span {
    /// Adds an attribute (a no-op when tracing is off).
    #[inline]
    pub fn attribute(&self, key: &'static str, value: impl Into<Value>) {
        if self.0.is_some() {
            self.set(key, value.into());
        }
    }

    #[cold]
    fn set(&self, key: &'static str, value: Value) {
        if let Some(r) = self.recording() {
            r.set(key.into(), value);
        }
    }

    #[cold]
    fn finish(&mut self) {
        if let Some(r) = self.0.take().and_then(|c| c.recording) {
            r.end();
        }
    }

    /// Makes this span current on this thread until the guard drops: spans and calls made
    /// meanwhile are its children.
    #[inline]
    pub fn enter(&self) -> Entered {
        match &self.0 {
            None => Entered(None),
            Some(c) => Carried::enter_cold(c),
        }
    }

    /// Records how the call this span stands for was answered (its status code, and the
    /// error as the span's); nothing is formatted when there is no span.
    #[inline]
    pub fn answered<T>(&self, res: &Result<T>) {
        if self.0.is_some() {
            self.answered_cold(res.as_ref().err());
        }
    }

    #[cold]
    fn answered_cold(&self, error: Option<&Error>) {
        if let Some(r) = self.recording() {
            match error {
                None => r.outcome(Code::OK, ""),
                Some(e) => r.outcome(e.code(), &e.to_string()),
            }
        }
    }

    fn recording(&self) -> Option<&Arc<Recording>> {
        self.0.as_ref().and_then(|c| c.recording.as_ref())
    }
}

/// A child of the current span named `name` (`runc create`), for work that takes time.
/// Only within a recorded request: with no current span it makes none.
#[inline]
pub fn span(name: impl Into<Cow<'static, str>>) -> Span {
    if !enabled() {
        return Span(None);
    }
    child(name.into(), Kind::Internal, Vec::new())
}

/// The client span of a ttrpc call this process makes (`/service/method`), within a
/// recorded request; entered while the call is made, its context is what the call carries.
#[inline]
pub fn client_span(service: &str, method: &str) -> Span {
    if !enabled() {
        return Span(None);
    }
    client_child(service, method)
}

#[cold]
fn client_child(service: &str, method: &str) -> Span {
    child(
        Cow::Owned(format!("{service}/{method}")),
        Kind::Client,
        rpc_attributes(service, method),
    )
}

#[cold]
fn rpc_attributes(service: &str, method: &str) -> otlp::Attributes {
    vec![
        ("rpc.system".into(), "ttrpc".into()),
        ("rpc.service".into(), service.to_string().into()),
        ("rpc.method".into(), method.to_string().into()),
    ]
}

#[cold]
fn child(name: Cow<'static, str>, kind: Kind, attributes: otlp::Attributes) -> Span {
    if tracing().is_none() {
        return Span(None);
    }
    let Some(current) = current() else {
        return Span(None);
    };
    let Some(parent) = &current.recording else {
        return Span(None);
    };
    let cx = SpanContext {
        span_id: new_span_id(),
        ..current.cx.clone()
    };
    let parent = Parent {
        span_id: parent.cx.span_id,
        remote: false,
    };
    let recording = Recording::new(cx.clone(), Some(parent), name, kind, attributes);
    Span(Some(Current {
        cx,
        recording: Some(recording),
        ..current
    }))
}

/// Sets an attribute on the current span, if there is one.
#[inline]
pub fn annotate(key: &'static str, value: impl Into<Value>) {
    if enabled() {
        annotate_current(key, value.into());
    }
}

#[cold]
fn annotate_current(key: &'static str, value: Value) {
    if let Some(r) = current().and_then(|c| c.recording) {
        r.set(key.into(), value);
    }
}

/// The current context, to carry to another thread (a queued event's sender).
#[derive(Clone, Default)]
pub struct Carried(Option<Current>);

impl Carried {
    /// What is current on this thread (nothing when tracing is off or no span is).
    #[inline]
    pub fn current() -> Carried {
        if !enabled() {
            return Carried(None);
        }
        Carried(current())
    }

    /// Makes it current on this thread until the guard drops.
    #[inline]
    pub fn enter(&self) -> Entered {
        match &self.0 {
            None => Entered(None),
            Some(cx) => Carried::enter_cold(cx),
        }
    }

    #[cold]
    fn enter_cold(cx: &Current) -> Entered {
        let before = CURRENT.with(|c| c.replace(Some(cx.clone())));
        Entered(Some(before))
    }
}

/// What [`Carried::enter`] replaced, put back when dropped.
pub struct Entered(Option<Option<Current>>);

impl Drop for Entered {
    #[inline]
    fn drop(&mut self) {
        if self.0.is_some() {
            self.leave();
        }
    }
}

impl Entered {
    #[cold]
    fn leave(&mut self) {
        if let Some(before) = self.0.take() {
            CURRENT.with(|c| *c.borrow_mut() = before);
        }
    }
}

/// Adds the current context (`traceparent`, ...) to an outgoing request's metadata.
#[inline]
pub fn inject(metadata: &mut Vec<Metadata>) {
    if enabled() {
        inject_current(metadata);
    }
}

#[cold]
fn inject_current(metadata: &mut Vec<Metadata>) {
    if let Some(c) = current() {
        w3c::inject(&c.cx, c.baggage.as_deref(), metadata);
    }
}

/// The current trace's id (32 hex digits), for log lines.
#[inline]
pub fn trace_id() -> Option<String> {
    if !enabled() {
        return None;
    }
    current_trace_id()
}

#[cold]
fn current_trace_id() -> Option<String> {
    current()
        .filter(|c| c.joined)
        .map(|c| w3c::hex(&c.cx.trace_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_not_zero() {
        let a = new_trace_id();
        let b = new_trace_id();
        assert!(a != b && a != [0; 16] && new_span_id() != new_span_id());
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
