//! Trace context that travels with a message (feature `opentelemetry`): the add stores
//! the current span's W3C context in the message's headers, and the relay publishes each
//! record in a span `{topic} publish` (kind PRODUCER) that is a child of it, the record
//! carrying that span's context; the inbox runs its handler in a span `{topic} process`
//! (kind CONSUMER), a child of the record's, so one trace goes from the add to the
//! handler. [`Delivery::context`](crate::inbox::Delivery::context) gives the record's
//! context to a loop of one's own.

pub(crate) mod context;

/// The W3C trace context headers.
pub const TRACEPARENT: &str = "traceparent";
/// The vendors' part of the W3C trace context.
pub const TRACESTATE: &str = "tracestate";
/// The W3C baggage header.
pub const BAGGAGE: &str = "baggage";
