//! An OTLP/HTTP trace receiver on loopback: what a collector would see of a shim's spans.
//!
//! It takes `POST /v1/traces` with an `ExportTraceServiceRequest` in protobuf, keeps every
//! span with its service name, and answers as a collector does. It also counts the
//! connections it accepted, so a test can show a shim never called it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

/// One span as received.
#[derive(Debug, Clone)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    /// Hex, as in a `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP's `SpanKind` (2 = server, 1 = internal).
    pub kind: i32,
    pub attributes: Vec<(String, String)>,
    /// OTLP's status code (2 = error).
    pub status: i32,
    /// How long it took.
    pub duration: Duration,
}

impl Span {
    /// An attribute's value, as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The receiver; it stops when dropped.
pub struct Receiver {
    server: Arc<tiny_http::Server>,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<AtomicUsize>,
    endpoint: String,
}

impl Receiver {
    /// Listens on a free loopback port.
    pub fn start() -> Result<Receiver, String> {
        let server =
            Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or("no TCP address")?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (s, kept, n) = (server.clone(), spans.clone(), requests.clone());
        std::thread::spawn(move || {
            for mut req in s.incoming_requests() {
                n.fetch_add(1, Ordering::SeqCst);
                let mut body = Vec::new();
                let read = std::io::Read::read_to_end(req.as_reader(), &mut body);
                let got = match (req.url(), read) {
                    ("/v1/traces", Ok(_)) => ExportTraceServiceRequest::decode(&body[..])
                        .map_err(|e| format!("decode: {e}")),
                    (url, _) => Err(format!("unexpected {url}")),
                };
                let status = match got {
                    Ok(export) => {
                        kept.lock().unwrap().extend(spans_of(export));
                        200
                    }
                    Err(e) => {
                        eprintln!("otlp receiver: {e}");
                        400
                    }
                };
                let header = "Content-Type: application/x-protobuf".parse::<tiny_http::Header>();
                let mut res = tiny_http::Response::from_data(Vec::new()).with_status_code(status);
                if let Ok(h) = header {
                    res = res.with_header(h);
                }
                let _ = req.respond(res);
            }
        });
        Ok(Receiver {
            server,
            spans,
            requests,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// HTTP requests received so far (any path).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for spans named each of `names`; the spans so far either way.
    pub fn wait_for(&self, names: &[&str], timeout: Duration) -> Vec<Span> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            let all = names.iter().all(|n| spans.iter().any(|s| s.name == *n));
            if all || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// `spans` as trees, each span under its parent (a span whose parent is not among them is a
/// root), children in the order received: how a trace reads in a tracing UI.
///
/// ```text
/// containerd.task.v3.Task/Create  6.1 ms  (containerd-shim-runc-v2)
/// ├─ stdio open  0.1 ms
/// └─ runc create  5.2 ms
/// ```
pub fn tree(spans: &[Span]) -> String {
    fn walk(spans: &[Span], s: &Span, prefix: &str, out: &mut String) {
        let children: Vec<&Span> = spans
            .iter()
            .filter(|c| c.parent_span_id == s.span_id && c.trace_id == s.trace_id)
            .collect();
        for (i, c) in children.iter().enumerate() {
            let last = i + 1 == children.len();
            let (branch, more) = if last {
                ("└─ ", "   ")
            } else {
                ("├─ ", "│  ")
            };
            // A child in another service (a guest agent's) names it, as a root does.
            let service = match c.service == s.service {
                true => String::new(),
                false => format!("  ({})", c.service),
            };
            out.push_str(&format!("{prefix}{branch}{}{service}\n", label(c)));
            walk(spans, c, &format!("{prefix}{more}"), out);
        }
    }
    fn label(s: &Span) -> String {
        let failed = if s.status == 2 { "  ERROR" } else { "" };
        format!(
            "{}  {:.1} ms{failed}",
            s.name,
            s.duration.as_secs_f64() * 1e3
        )
    }
    let mut out = String::new();
    for root in spans.iter().filter(|s| {
        !spans
            .iter()
            .any(|p| p.span_id == s.parent_span_id && p.trace_id == s.trace_id)
    }) {
        out.push_str(&format!("{}  ({})\n", label(root), root.service));
        walk(spans, root, "", &mut out);
    }
    out
}

fn spans_of(export: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in export.resource_spans {
        let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let service = text_attributes(&attrs)
            .into_iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: text_attributes(&s.attributes),
                    status: s.status.map_or(0, |st| st.code),
                    duration: Duration::from_nanos(
                        s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano),
                    ),
                });
            }
        }
    }
    out
}

fn text_attributes(attrs: &[KeyValue]) -> Vec<(String, String)> {
    attrs
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
