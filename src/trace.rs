//! Trace context that travels with a message (feature `opentelemetry`): the add stores
//! the current span's W3C context in the message's headers, so that the relay and the
//! consumer can continue the trace the add was part of.

use std::borrow::Cow;

use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::Injector;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{global, Context};

use crate::message::{Message, MAX_HEADERS, MAX_MESSAGE_SIZE};

/// The W3C trace context headers.
pub const TRACEPARENT: &str = "traceparent";
/// The vendors' part of the W3C trace context.
pub const TRACESTATE: &str = "tracestate";
/// The W3C baggage header.
pub const BAGGAGE: &str = "baggage";

/// `message` with the current context's headers added, when a span is current: what the
/// global text-map propagator writes, or, when none is set, `traceparent` and, when not
/// empty, `tracestate` and `baggage` (W3C). A header the caller set is kept as it is;
/// and nothing is added that would take the message past [`MAX_HEADERS`] or
/// [`MAX_MESSAGE_SIZE`] (the add would refuse it): then the message goes as it is.
pub(crate) fn with_current_context(message: &Message) -> Cow<'_, Message> {
    let cx = Context::current();
    if !cx.span().span_context().is_valid() {
        return Cow::Borrowed(message);
    }
    let mut fields = Fields(Vec::new());
    global::get_text_map_propagator(|propagator| propagator.inject_context(&cx, &mut fields));
    if fields.0.is_empty() {
        fields.0 = w3c(&cx);
    }
    let fields: Vec<(String, String)> = fields
        .0
        .into_iter()
        .filter(|(name, _)| {
            !message
                .headers()
                .iter()
                .any(|(set, _)| set.eq_ignore_ascii_case(name))
        })
        .collect();
    let size: usize = fields.iter().map(|(n, v)| n.len() + v.len()).sum();
    if fields.is_empty()
        || message.headers().len() + fields.len() > MAX_HEADERS
        || message.size() + size > MAX_MESSAGE_SIZE
    {
        return Cow::Borrowed(message);
    }
    let mut message = message.clone();
    for (name, value) in fields {
        message = message.with_header(name, value);
    }
    Cow::Owned(message)
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
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
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
    fn without_a_current_span_the_message_is_left_as_it_is() {
        let message = Message::new("t", "p");
        assert!(matches!(with_current_context(&message), Cow::Borrowed(_)));
    }

    #[test]
    fn with_a_span_current_the_add_stores_its_w3c_context() {
        let state = TraceState::from_key_value([("vendor", "x")]).unwrap();
        let cx = remote(state).with_baggage([KeyValue::new("tenant", "a b")]);
        let _guard = cx.attach();
        let message = Message::new("t", "p").with_header("event-type", "Created");
        let stored = with_current_context(&message);
        assert_eq!(
            stored.headers(),
            &[
                ("event-type".to_string(), b"Created".to_vec()),
                (
                    TRACEPARENT.to_string(),
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec()
                ),
                (TRACESTATE.to_string(), b"vendor=x".to_vec()),
                (BAGGAGE.to_string(), b"tenant=a%20b".to_vec()),
            ]
        );
    }

    #[test]
    fn a_trace_header_the_caller_set_is_kept_and_a_full_message_is_left_alone() {
        let _guard = remote(TraceState::default()).attach();
        let message = Message::new("t", "p").with_header("TraceParent", "mine");
        let stored = with_current_context(&message);
        assert_eq!(
            stored.headers(),
            message.headers(),
            "no tracestate or baggage either"
        );

        let full = (0..MAX_HEADERS).fold(Message::new("t", "p"), |m, i| {
            m.with_header(format!("h{i}"), "v")
        });
        assert!(matches!(with_current_context(&full), Cow::Borrowed(_)));
    }
}
