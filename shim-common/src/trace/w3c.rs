//! The W3C trace context as it travels in ttrpc metadata: `traceparent`
//! (`00-<trace id>-<parent id>-<flags>`), `tracestate` and `baggage`, read and written the
//! way containerd's Go propagators do (keys lower-case, read case-insensitively; an empty
//! `tracestate` left out).

use std::sync::Arc;

use ttrpc::proto::KeyValue as Metadata;

/// The sampled bit of the trace flags.
pub(super) const SAMPLED: u8 = 0x01;

/// The identity of a span as others see it: what `traceparent` and `tracestate` carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Trace flags; only [`SAMPLED`] is kept.
    pub flags: u8,
    /// `tracestate`, passed on as received.
    pub state: Option<Arc<str>>,
}

impl SpanContext {
    #[cold]
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    #[cold]
    fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

/// What a request's metadata says of its caller's trace.
#[derive(Default)]
pub(super) struct Incoming {
    pub parent: Option<SpanContext>,
    pub baggage: Option<Arc<str>>,
}

/// The longest `tracestate` and `baggage` passed on (the W3C limits).
const MAX_STATE: usize = 512;
const MAX_BAGGAGE: usize = 8192;

/// Reads the caller's context; a malformed `traceparent` is no parent at all.
#[cold]
pub(super) fn extract(metadata: &[Metadata]) -> Incoming {
    let get = |key: &str| {
        metadata
            .iter()
            .find(|kv| kv.key.eq_ignore_ascii_case(key))
            .map(|kv| kv.value.trim())
            .filter(|v| !v.is_empty())
    };
    let parent = get("traceparent")
        .and_then(parse_traceparent)
        .map(|mut cx| {
            cx.state = get("tracestate")
                .filter(|s| s.len() <= MAX_STATE && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
                .map(Arc::from);
            cx
        });
    let baggage = get("baggage")
        .filter(|b| b.len() <= MAX_BAGGAGE)
        .map(Arc::from);
    Incoming { parent, baggage }
}

/// Writes `cx` (and the baggage carried with it) into an outgoing request's metadata,
/// replacing what was there.
#[cold]
pub(super) fn inject(cx: &SpanContext, baggage: Option<&str>, metadata: &mut Vec<Metadata>) {
    set(metadata, "traceparent", Some(cx.traceparent()));
    set(
        metadata,
        "tracestate",
        cx.state.as_deref().map(str::to_string),
    );
    set(metadata, "baggage", baggage.map(str::to_string));
}

#[cold]
fn set(metadata: &mut Vec<Metadata>, key: &str, value: Option<String>) {
    metadata.retain(|kv| !kv.key.eq_ignore_ascii_case(key));
    if let Some(value) = value.filter(|v| !v.is_empty()) {
        metadata.push(Metadata {
            key: key.to_string(),
            value,
            ..Default::default()
        });
    }
}

/// `traceparent` by the W3C rules: version `ff` is invalid, version `00` has exactly four
/// fields, ids are lower-case hex and not all zeros; a later version is read for its first
/// four fields.
#[cold]
fn parse_traceparent(v: &str) -> Option<SpanContext> {
    let mut parts = v.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let version: [u8; 1] = unhex(version)?;
    if version[0] == 0xff || (version[0] == 0 && parts.next().is_some()) {
        return None;
    }
    let trace_id: [u8; 16] = unhex(trace)?;
    let span_id: [u8; 8] = unhex(span)?;
    let flags: [u8; 1] = unhex(flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(SpanContext {
        trace_id,
        span_id,
        flags: flags[0] & SAMPLED,
        state: None,
    })
}

/// Lower-case hex of exactly `N` bytes.
#[cold]
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cold]
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Vec<Metadata> {
        pairs
            .iter()
            .map(|(k, v)| Metadata {
                key: k.to_string(),
                value: v.to_string(),
                ..Default::default()
            })
            .collect()
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn metadata_carries_the_trace_context_both_ways() {
        let incoming = extract(&md(&[
            ("Traceparent", PARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("baggage", "userId=alice"),
        ]));
        let cx = incoming.parent.expect("a parent");
        assert_eq!(hex(&cx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&cx.span_id), "00f067aa0ba902b7");
        assert!(cx.sampled());
        let mut out = md(&[("traceparent", "stale"), ("other", "kept")]);
        inject(&cx, incoming.baggage.as_deref(), &mut out);
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("other", "kept"),
                ("traceparent", PARENT),
                ("tracestate", "congo=t61rcWkgMzE"),
                ("baggage", "userId=alice"),
            ]
        );
    }

    #[test]
    fn a_malformed_traceparent_is_no_parent() {
        let bad = [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ];
        for v in bad {
            let incoming = extract(&md(&[("traceparent", v), ("tracestate", "a=b")]));
            assert!(incoming.parent.is_none(), "{v}");
        }
        // A later version is read for what version 00 defines.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-next";
        let cx = extract(&md(&[("traceparent", later)])).parent.unwrap();
        assert!(!cx.sampled());
    }

    #[test]
    fn an_empty_tracestate_is_left_out() {
        let cx = extract(&md(&[("traceparent", PARENT), ("tracestate", "")]))
            .parent
            .unwrap();
        let mut out = Vec::new();
        inject(&cx, None, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, "traceparent");
    }
}
