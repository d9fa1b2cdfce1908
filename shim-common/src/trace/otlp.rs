//! Spans as OTLP protobuf (`opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest`),
//! written field by field: the shim only ever encodes these few messages, and a hand-written
//! encoder is a few hundred bytes of code where generated types with their reflection tables
//! would be resident in every shim, traced or not. Field numbers are those of
//! opentelemetry-proto's `trace/v1/trace.proto`, `common/v1/common.proto`,
//! `resource/v1/resource.proto`; the tests decode the result with the OpenTelemetry
//! project's own generated types.

use std::borrow::Cow;
use std::time::SystemTime;

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `string_value`.
    Str(Cow<'static, str>),
    /// `int_value`.
    I64(i64),
    /// `bool_value`.
    Bool(bool),
}

impl From<&'static str> for Value {
    #[cold]
    fn from(s: &'static str) -> Value {
        Value::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Value {
    #[cold]
    fn from(s: String) -> Value {
        Value::Str(Cow::Owned(s))
    }
}

impl From<i64> for Value {
    #[cold]
    fn from(v: i64) -> Value {
        Value::I64(v)
    }
}

impl From<bool> for Value {
    #[cold]
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

pub(super) type Attributes = Vec<(Cow<'static, str>, Value)>;

/// `Span.SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// A span that has ended, waiting to be exported.
#[derive(Debug)]
pub(super) struct Finished {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<Parent>,
    pub state: Option<std::sync::Arc<str>>,
    pub flags: u8,
    pub name: Cow<'static, str>,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Attributes,
    /// `Some(message)` for a span whose work failed (status ERROR).
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Parent {
    pub span_id: [u8; 8],
    /// The parent is the caller's (it came in a request's metadata).
    pub remote: bool,
}

/// `SpanFlags`: the W3C flags in bits 0-7; bit 8 says whether bit 9 (parent is remote) is
/// known.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// One export request: `spans` of one resource and one instrumentation scope.
#[cold]
pub(super) fn encode(resource: &Attributes, scope: (&str, &str), spans: &[Finished]) -> Vec<u8> {
    let mut req = Pb::default();
    // ExportTraceServiceRequest.resource_spans = 1
    req.message(1, |rs| {
        // ResourceSpans.resource = 1; Resource.attributes = 1
        rs.message(1, |r| attributes(r, 1, resource));
        // ResourceSpans.scope_spans = 2
        rs.message(2, |ss| {
            // ScopeSpans.scope = 1; InstrumentationScope.name = 1, version = 2
            ss.message(1, |s| {
                s.string(1, scope.0);
                s.string(2, scope.1);
            });
            for span in spans {
                // ScopeSpans.spans = 2
                ss.message(2, |s| encode_span(s, span));
            }
        });
    });
    req.0
}

#[cold]
fn encode_span(s: &mut Pb, span: &Finished) {
    s.bytes(1, &span.trace_id);
    s.bytes(2, &span.span_id);
    if let Some(state) = &span.state {
        s.string(3, state);
    }
    let mut flags = u32::from(span.flags) | HAS_IS_REMOTE;
    if let Some(p) = &span.parent {
        s.bytes(4, &p.span_id);
        if p.remote {
            flags |= IS_REMOTE;
        }
    }
    s.string(5, &span.name);
    s.varint_field(6, span.kind as u64);
    s.fixed64(7, unix_nanos(span.start));
    s.fixed64(8, unix_nanos(span.end));
    attributes(s, 9, &span.attributes);
    if let Some(message) = &span.error {
        // Span.status = 15; Status.message = 2, code = 3 (STATUS_CODE_ERROR = 2)
        s.message(15, |st| {
            st.string(2, message);
            st.varint_field(3, 2);
        });
    }
    s.fixed32(16, flags);
}

/// Repeated `KeyValue` (key = 1, value = 2) in field `field`.
#[cold]
fn attributes(pb: &mut Pb, field: u32, attributes: &Attributes) {
    for (key, value) in attributes {
        pb.message(field, |kv| {
            kv.string(1, key);
            // AnyValue: a oneof, written even when its value is the default.
            kv.message(2, |v| match value {
                Value::Str(s) => v.bytes(1, s.as_bytes()),
                Value::Bool(b) => {
                    v.key(2, VARINT);
                    v.varint(u64::from(*b));
                }
                Value::I64(i) => {
                    v.key(3, VARINT);
                    v.varint(*i as u64);
                }
            });
        });
    }
}

#[cold]
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A protobuf message being written.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    #[cold]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    #[cold]
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// A length-delimited field, written even when empty.
    #[cold]
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    /// A proto3 string: the empty string is the default, and not written.
    #[cold]
    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }

    #[cold]
    fn varint_field(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, VARINT);
            self.varint(v);
        }
    }

    #[cold]
    fn fixed64(&mut self, field: u32, v: u64) {
        self.key(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    #[cold]
    fn fixed32(&mut self, field: u32, v: u32) {
        self.key(field, FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    #[cold]
    fn message(&mut self, field: u32, write: impl FnOnce(&mut Pb)) {
        let mut inner = Pb::default();
        write(&mut inner);
        self.bytes(field, &inner.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_written_as_protobuf_says() {
        let mut pb = Pb::default();
        pb.varint(300);
        assert_eq!(pb.0, [0xac, 0x02]);
        let mut status = Pb::default();
        status.message(15, |st| {
            st.string(2, "x");
            st.varint_field(3, 2);
        });
        // key 15/LEN = 0x7a, length 5, then key 2/LEN "x", key 3/VARINT 2.
        assert_eq!(status.0, [0x7a, 5, 0x12, 1, b'x', 0x18, 2]);
        let mut any = Pb::default();
        attributes(&mut any, 9, &vec![("n".into(), Value::I64(-1))]);
        // A negative int64 is ten varint bytes.
        assert_eq!(any.0.len(), 2 + 3 + 2 + 11);
    }
}
