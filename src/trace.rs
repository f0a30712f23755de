//! Trace context that travels with a message (feature `opentelemetry`): the add stores
//! the current span's W3C context in the message's headers, and the relay publishes each
//! record in a span `{topic} publish` (kind PRODUCER) that is a child of it, the record
//! carrying that span's context; the inbox runs its handler in a span `{topic} process`
//! (kind CONSUMER), a child of the record's, so one trace goes from the add to the
//! handler. [`Delivery::context`] gives the record's context to a loop of one's own.

use std::borrow::Cow;
use std::time::SystemTime;

use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{global, Context, KeyValue};

use crate::inbox::Delivery;
use crate::message::{Message, MAX_HEADERS, MAX_MESSAGE_SIZE};
use crate::record::Record;

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
    let fields: Vec<(String, String)> = fields_of(&cx)
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

/// The headers that carry `cx`: what the global text-map propagator writes, or, when
/// none is set, W3C trace context and baggage.
fn fields_of(cx: &Context) -> Vec<(String, String)> {
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
fn stored_context(headers: &[(String, Vec<u8>)]) -> Context {
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

/// The publish span of each record of a batch: a child of the context stored with its
/// message, of kind PRODUCER, named `{topic} publish`, with the OpenTelemetry messaging
/// attributes, started through the global tracer provider before the record is sent and
/// ended with its outcome.
pub(crate) struct PublishSpans {
    contexts: Vec<Context>,
}

impl PublishSpans {
    /// Starts a span for each of `records`.
    pub fn begin(records: &[Record]) -> PublishSpans {
        let tracer = global::tracer("outbox");
        let now = SystemTime::now();
        let contexts = records
            .iter()
            .map(|record| {
                let topic = record.message.topic().to_string();
                let parent = stored_context(record.message.headers());
                let waited = now.duration_since(record.created).unwrap_or_default();
                let span = tracer
                    .span_builder(format!("{topic} publish"))
                    .with_kind(SpanKind::Producer)
                    .with_attributes([
                        KeyValue::new("messaging.system", "kafka"),
                        KeyValue::new("messaging.operation.type", "send"),
                        KeyValue::new("messaging.destination.name", topic),
                        KeyValue::new(
                            "messaging.message.id",
                            record.message_id.hyphenated().to_string(),
                        ),
                        KeyValue::new("outbox.wait_seconds", waited.as_secs_f64()),
                    ])
                    .start_with_context(&tracer, &parent);
                parent.with_span(span)
            })
            .collect();
        PublishSpans { contexts }
    }

    /// The trace headers the record at `index` is sent with: its publish span's, in
    /// place of those stored with it.
    pub fn fields(&self, index: usize) -> Vec<(String, String)> {
        self.contexts.get(index).map(fields_of).unwrap_or_default()
    }

    /// Ends each span with its record's outcome and, when it was acknowledged, its
    /// partition and offset.
    pub fn end(self, outcomes: &[std::result::Result<(), String>], placed: &[Option<(i32, i64)>]) {
        for (index, cx) in self.contexts.into_iter().enumerate() {
            let span = cx.span();
            match outcomes.get(index) {
                Some(Ok(())) => {
                    if let Some(Some((partition, offset))) = placed.get(index) {
                        span.set_attribute(KeyValue::new(
                            "messaging.destination.partition.id",
                            partition.to_string(),
                        ));
                        span.set_attribute(KeyValue::new(
                            "messaging.kafka.destination.partition",
                            i64::from(*partition),
                        ));
                        span.set_attribute(KeyValue::new(
                            "messaging.kafka.message.offset",
                            *offset,
                        ));
                    }
                }
                Some(Err(error)) => span.set_status(Status::error(error.clone())),
                None => span.set_status(Status::error("no outcome")),
            }
            span.end();
        }
    }
}

/// Runs `handle` in a span `{topic} process` of kind CONSUMER, a child of the context
/// `delivery`'s record carries, current while it runs (so the handler's own spans are its
/// children); `failure` reads from the result whether, and why, it failed.
pub(crate) fn in_process_span<T>(
    delivery: &Delivery,
    handle: impl FnOnce() -> T,
    failure: impl Fn(&T) -> Option<String>,
) -> T {
    let tracer = global::tracer("outbox");
    let parent = delivery.context();
    let span = tracer
        .span_builder(format!("{} process", delivery.topic()))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", delivery.topic().to_string()),
            KeyValue::new(
                "messaging.message.id",
                delivery.message_id().hyphenated().to_string(),
            ),
            KeyValue::new(
                "messaging.kafka.destination.partition",
                i64::from(delivery.partition()),
            ),
            KeyValue::new("messaging.kafka.message.offset", delivery.offset()),
        ])
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let outcome = {
        let _current = cx.clone().attach();
        handle()
    };
    let span = cx.span();
    if let Some(reason) = failure(&outcome) {
        span.set_status(Status::error(reason));
    }
    span.end();
    outcome
}

impl Delivery {
    /// The trace context the record carries (feature `opentelemetry`): for applications
    /// that run their own loop and start their own span as its child. An empty context
    /// when the record carries none.
    pub fn context(&self) -> Context {
        stored_context(self.headers())
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
