//! The relay's span for each record it publishes (feature `opentelemetry`).

use std::time::SystemTime;

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{global, Context, KeyValue};

use crate::record::Record;
use crate::trace::context::{fields_of, stored_context};

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
