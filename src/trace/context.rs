//! The trace context a message carries: written from the current span at the add, read
//! back by the relay and the consumer; through the global text-map propagator, or as W3C
//! trace context and baggage when none is set.

use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{global, Context};

use super::{BAGGAGE, TRACEPARENT, TRACESTATE};

/// The headers that carry the current context, when a span is current; none otherwise.
pub(crate) fn current_fields() -> Vec<(String, String)> {
    let cx = Context::current();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    fields_of(&cx)
}

/// The headers that carry `cx`: what the global text-map propagator writes, or, when
/// none is set, W3C trace context and baggage.
pub(crate) fn fields_of(cx: &Context) -> Vec<(String, String)> {
    let mut fields = Fields(Vec::new());
    let set = global::get_text_map_propagator(|propagator| {
        propagator.inject_context(cx, &mut fields);
        propagator.fields().next().is_some()
    });
    if !set && cx.span().span_context().is_valid() {
        fields.0 = w3c(cx);
    }
    fields.0
}

/// The context stored in `headers`: through the global text-map propagator, or, when
/// none is set (the no-op one answers the current context, whatever the headers say), a
/// W3C `traceparent` and `tracestate`. Empty when they carry none.
pub(crate) fn stored_context(headers: &[(String, Vec<u8>)]) -> Context {
    let stored = Stored(headers);
    let extracted = global::get_text_map_propagator(|propagator| {
        propagator
            .fields()
            .next()
            .is_some()
            .then(|| propagator.extract_with_context(&Context::new(), &stored))
    });
    if let Some(cx) = extracted {
        return cx;
    }
    match stored
        .get(TRACEPARENT)
        .and_then(|value| parse_traceparent(value, stored.get(TRACESTATE)))
    {
        Some(context) => Context::new().with_remote_span_context(context),
        None => Context::new(),
    }
}

/// A W3C `traceparent` (version 00) and its `tracestate`, if they are well formed.
fn parse_traceparent(value: &str, state: Option<&str>) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let state = state
        .and_then(|state| state.parse::<TraceState>().ok())
        .unwrap_or_default();
    let context = SpanContext::new(trace, span, flags, true, state);
    context.is_valid().then_some(context)
}

/// Headers read as a propagator's carrier (names compared without case).
struct Stored<'a>(&'a [(String, Vec<u8>)]);

impl Extractor for Stored<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

/// What a propagator writes, in order.
struct Fields(Vec<(String, String)>);

impl Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_ascii_lowercase(), value));
    }
}

/// The W3C trace context (and baggage) of `cx`, whose span is valid.
fn w3c(cx: &Context) -> Vec<(String, String)> {
    let span = cx.span();
    let context = span.span_context();
    let mut fields = vec![(
        TRACEPARENT.to_string(),
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        ),
    )];
    let state = context.trace_state().header();
    if !state.is_empty() {
        fields.push((TRACESTATE.to_string(), state));
    }
    let baggage: Vec<String> = cx
        .baggage()
        .iter()
        .map(|(key, (value, _))| format!("{}={}", key.as_str(), percent_encoded(value.as_str())))
        .collect();
    if !baggage.is_empty() {
        fields.push((BAGGAGE.to_string(), baggage.join(",")));
    }
    fields
}

/// `value` with every byte outside the W3C baggage value characters percent-encoded.
fn percent_encoded(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        let plain = byte.is_ascii_graphic() && !matches!(byte, b',' | b';' | b'\\' | b'"' | b'%');
        if plain {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use opentelemetry::KeyValue;

    use super::*;

    fn remote(state: TraceState) -> Context {
        let context = SpanContext::new(
            TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c),
            SpanId::from(0xb7ad_6b71_6920_3331),
            TraceFlags::SAMPLED,
            true,
            state,
        );
        Context::new().with_remote_span_context(context)
    }

    #[test]
    fn without_a_current_span_there_is_nothing_to_store() {
        assert!(current_fields().is_empty());
    }

    #[test]
    fn with_a_span_current_its_w3c_context_and_baggage_are_written() {
        let state = TraceState::from_key_value([("vendor", "x")]).unwrap();
        let cx = remote(state).with_baggage([KeyValue::new("tenant", "a b")]);
        let _guard = cx.attach();
        assert_eq!(
            current_fields(),
            [
                (
                    TRACEPARENT.to_string(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()
                ),
                (TRACESTATE.to_string(), "vendor=x".to_string()),
                (BAGGAGE.to_string(), "tenant=a%20b".to_string()),
            ]
        );
    }

    #[test]
    fn a_stored_w3c_context_is_read_back_and_a_malformed_one_is_none() {
        let headers = vec![
            (
                "TraceParent".to_string(),
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
            ),
            ("tracestate".to_string(), b"vendor=x".to_vec()),
        ];
        let cx = stored_context(&headers);
        let span = cx.span();
        let context = span.span_context();
        assert!(context.is_valid() && context.is_remote());
        assert_eq!(
            context.trace_id(),
            TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c)
        );
        assert_eq!(context.span_id(), SpanId::from(0xb7ad_6b71_6920_3331));
        assert_eq!(context.trace_state().get("vendor"), Some("x"));
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-xyz-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
    }
}
