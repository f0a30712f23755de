//! The handler's span (feature `opentelemetry`): each record is applied in a span
//! `{topic} process`, a child of the trace context the record carries.

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{global, Context, KeyValue};

use super::Delivery;
use crate::trace::context::stored_context;

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
