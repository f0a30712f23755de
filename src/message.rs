//! The message a service hands to the outbox, and the rules it must follow.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::error::{Error, Result};

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 255;
/// Most headers on one message (the outbox's own header not counted).
pub const MAX_HEADERS: usize = 64;
/// Largest message: payload, key, header names and header values added up, in bytes.
///
/// It stays below Kafka's default `max.message.bytes` (1,048,588) with room for the
/// record's own overhead, so a message `add` accepts is one a default broker accepts.
pub const MAX_MESSAGE_SIZE: usize = 1_000_000;

/// Header carrying the outbox's message id (a hyphenated UUIDv7), added to every record
/// published. Consumers drop duplicates by it. User headers may not use this name.
pub const MESSAGE_ID_HEADER: &str = "outbox-message-id";

/// Farthest a message may be scheduled, ahead or behind: ten years (3,653 days).
/// A time farther away is more likely a unit mistaken than a plan.
pub const MAX_SCHEDULE: Duration = Duration::from_secs(3_653 * 86_400);

/// A message for one Kafka topic: optional key, ordered headers and a payload.
///
/// Build it with [`Message::new`] or [`Message::json`] and the `with_*` methods; it is
/// checked by [`validate`](Message::validate) when it is added to the outbox.
///
/// ```
/// let msg = outbox::Message::new("orders", "{\"id\":42}")
///     .with_key("order-42")
///     .with_header("event-type", "OrderCreated");
/// assert_eq!(msg.key(), Some(&b"order-42"[..]));
/// assert_eq!(msg.key_str(), Some("order-42"));
/// assert!(msg.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    topic: String,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    payload: Vec<u8>,
    due: Due,
}

/// When a message may be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// As soon as its transaction commits.
    Now,
    /// This long after the add, by the database's clock.
    After(Duration),
    /// Not before this time (the database's clock, which runs in UTC).
    At(SystemTime),
}

impl Message {
    /// A message for `topic` with `payload` as its value, no key and no headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Message {
        Message {
            topic: topic.into(),
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
            due: Due::Now,
        }
    }

    /// A message whose payload is `value` serialized as JSON, with the header
    /// `content-type: application/json`.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] if `value` cannot be serialized.
    pub fn json<T: serde::Serialize + ?Sized>(
        topic: impl Into<String>,
        value: &T,
    ) -> Result<Message> {
        let payload = serde_json::to_vec(value)?;
        Ok(Message::new(topic, payload).with_header("content-type", "application/json"))
    }

    /// Sets the key: text, or any bytes (a schema registry's framed Avro or Protobuf key,
    /// say). Messages with the same topic and key are published in commit order,
    /// and Kafka puts them in the same partition.
    pub fn with_key(mut self, key: impl AsRef<[u8]>) -> Message {
        self.key = Some(key.as_ref().to_vec());
        self
    }

    /// Appends a header. Headers keep their order, and a name may repeat.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Message {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Publishes the message no sooner than `delay` after the add, counted on the
    /// database's clock from the moment the INSERT runs (so every relay agrees on it,
    /// whatever the application's clock says). Later messages of the same topic and key
    /// wait for it: per-key order holds, so a delayed message delays its key. A delay of
    /// more than [`MAX_SCHEDULE`] is refused at the add.
    ///
    /// ```
    /// use std::time::Duration;
    /// let reminder = outbox::Message::new("reminders", "cart 42 is waiting")
    ///     .with_key("cart-42")
    ///     .deliver_after(Duration::from_secs(3600));
    /// assert!(reminder.validate().is_ok());
    /// ```
    pub fn deliver_after(mut self, delay: Duration) -> Message {
        self.due = if delay.is_zero() {
            Due::Now
        } else {
            Due::After(delay)
        };
        self
    }

    /// Publishes the message no sooner than `time`, read on the database's clock; a time
    /// already past means at once. As with [`deliver_after`](Message::deliver_after), the
    /// later messages of its key wait for it. A time more than [`MAX_SCHEDULE`] away, in
    /// either direction, is refused at the add.
    pub fn deliver_at(mut self, time: SystemTime) -> Message {
        self.due = Due::At(time);
        self
    }

    /// When the message may be published.
    pub(crate) fn due(&self) -> Due {
        self.due
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The key's bytes, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The topic and key under which order is kept; `None` without a key.
    pub(crate) fn order_key(&self) -> Option<(&str, &[u8])> {
        self.key().map(|key| (self.topic(), key))
    }

    /// The key as text, if there is one and it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|key| std::str::from_utf8(key).ok())
    }

    /// The headers, in the order they were added.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Checks the message against the rules below; [`Outbox::add`](crate::Outbox::add)
    /// calls it before writing anything.
    ///
    /// - topic: 1 to 249 characters of `A-Z a-z 0-9 . _ -`, and not `.` or `..` (Kafka's rule);
    /// - key: at most [`MAX_KEY_LEN`] bytes, any bytes;
    /// - headers: at most [`MAX_HEADERS`]; names of 1 to [`MAX_HEADER_NAME_LEN`] bytes
    ///   with no control characters, not [`MESSAGE_ID_HEADER`]; values any bytes;
    /// - payload, key and headers together: at most [`MAX_MESSAGE_SIZE`] bytes;
    /// - a delivery time at most [`MAX_SCHEDULE`] away.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`] naming the first rule broken.
    pub fn validate(&self) -> Result<()> {
        validate_topic(&self.topic)?;
        if let Some(key) = &self.key {
            if key.len() > MAX_KEY_LEN {
                return Err(Error::invalid(format!(
                    "key is {} bytes, the limit is {MAX_KEY_LEN}",
                    key.len()
                )));
            }
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(Error::invalid(format!(
                "{} headers, the limit is {MAX_HEADERS}",
                self.headers.len()
            )));
        }
        for (name, _) in &self.headers {
            validate_header_name(name)?;
        }
        let size = self.size();
        if size > MAX_MESSAGE_SIZE {
            return Err(Error::invalid(format!(
                "message is {size} bytes (payload, key and headers), the limit is {MAX_MESSAGE_SIZE}"
            )));
        }
        validate_due(self.due)
    }

    /// Payload, key, header names and header values added up, in bytes.
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        self.payload.len() + self.key.as_ref().map_or(0, Vec::len) + headers
    }
}

/// Validates every message, then gives each its message id (a UUIDv7), in order: the
/// first step of every add. Nothing is returned if any message is invalid. With the
/// feature `opentelemetry`, a message added while a span is current carries its trace
/// context.
pub(crate) fn with_ids(messages: &[Message]) -> Result<Vec<(Uuid, Cow<'_, Message>)>> {
    for message in messages {
        message.validate()?;
    }
    Ok(messages
        .iter()
        .map(|m| (Uuid::now_v7(), traced(m)))
        .collect())
}

/// `message` with the current span's trace context added to its headers (feature
/// `opentelemetry`): a header the caller set is kept as it is, and nothing is added that
/// would take the message past [`MAX_HEADERS`] or [`MAX_MESSAGE_SIZE`] (the add would
/// refuse it); then the message goes as it is.
#[cfg(feature = "opentelemetry")]
fn traced(message: &Message) -> Cow<'_, Message> {
    let fields: Vec<(String, String)> = crate::trace::context::current_fields()
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

#[cfg(not(feature = "opentelemetry"))]
fn traced(message: &Message) -> Cow<'_, Message> {
    Cow::Borrowed(message)
}

fn validate_topic(topic: &str) -> Result<()> {
    if topic.is_empty() {
        return Err(Error::invalid("topic is empty"));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid(format!(
            "topic is {} characters, the limit is {MAX_TOPIC_LEN}",
            topic.len()
        )));
    }
    if topic == "." || topic == ".." {
        return Err(Error::invalid(format!("topic may not be {topic:?}")));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(format!(
            "topic {topic:?} contains {c:?}; only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"
        )));
    }
    Ok(())
}

fn validate_due(due: Due) -> Result<()> {
    let years = |d: Duration| d.as_secs_f64() / (365.25 * 86_400.0);
    match due {
        Due::Now => Ok(()),
        Due::After(delay) if delay > MAX_SCHEDULE => Err(Error::invalid(format!(
            "deliver_after is {:.1} years away, the limit is 10",
            years(delay)
        ))),
        Due::After(_) => Ok(()),
        Due::At(time) => {
            let now = SystemTime::now();
            let away = match time.duration_since(now) {
                Ok(ahead) => ahead,
                Err(behind) => behind.duration(),
            };
            if away > MAX_SCHEDULE || time < UNIX_EPOCH {
                return Err(Error::invalid(format!(
                    "deliver_at is {:.1} years {}, the limit is 10",
                    years(away),
                    if time > now { "ahead" } else { "ago" }
                )));
            }
            Ok(())
        }
    }
}

fn validate_header_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("header name is empty"));
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return Err(Error::invalid(format!(
            "header name is {} bytes, the limit is {MAX_HEADER_NAME_LEN}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "header name {name:?} contains a control character"
        )));
    }
    if name.eq_ignore_ascii_case(MESSAGE_ID_HEADER) {
        return Err(Error::invalid(format!(
            "header name {MESSAGE_ID_HEADER:?} is reserved"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(msg: Message) -> String {
        match msg.validate() {
            Err(Error::InvalidMessage(reason)) => reason,
            other => panic!("expected InvalidMessage, got {other:?}"),
        }
    }

    #[test]
    fn accepts_kafka_legal_topics() {
        for topic in [
            "a",
            "orders",
            "billing.v1_events-2",
            &"x".repeat(MAX_TOPIC_LEN),
        ] {
            assert!(Message::new(topic, "p").validate().is_ok(), "{topic}");
        }
    }

    #[test]
    fn refuses_illegal_topics() {
        assert!(refused(Message::new("", "p")).contains("empty"));
        assert!(refused(Message::new(".", "p")).contains("may not"));
        assert!(refused(Message::new("..", "p")).contains("may not"));
        assert!(refused(Message::new("a b", "p")).contains("' '"));
        assert!(refused(Message::new("ordérs", "p")).contains("'é'"));
        assert!(refused(Message::new("x".repeat(MAX_TOPIC_LEN + 1), "p")).contains("250"));
    }

    #[test]
    fn refuses_bad_keys_and_header_names() {
        assert!(
            refused(Message::new("t", "p").with_key("k".repeat(MAX_KEY_LEN + 1))).contains("key")
        );
        assert!(refused(Message::new("t", "p").with_header("", "v")).contains("empty"));
        assert!(refused(Message::new("t", "p").with_header("a\0", "v")).contains("control"));
        assert!(
            refused(Message::new("t", "p").with_header(MESSAGE_ID_HEADER, "v"))
                .contains("reserved")
        );
        let many = (0..=MAX_HEADERS).fold(Message::new("t", "p"), |m, i| {
            m.with_header(format!("h{i}"), "v")
        });
        assert!(refused(many).contains("headers"));
    }

    #[test]
    fn keys_may_be_any_bytes() {
        let framed = vec![0u8, 0, 0, 0, 7, 2, b'k', 0xff];
        let msg = Message::new("t", "p").with_key(framed.clone());
        assert!(msg.validate().is_ok());
        assert_eq!(msg.key(), Some(&framed[..]));
        assert_eq!(msg.key_str(), None, "not text");
        assert_eq!(Message::new("t", "p").with_key("k").key_str(), Some("k"));
    }

    #[test]
    fn header_values_may_be_any_bytes() {
        let msg = Message::new("t", "p").with_header("bin", vec![0u8, 255, 10]);
        assert!(msg.validate().is_ok());
        assert_eq!(msg.headers()[0].1, vec![0u8, 255, 10]);
    }

    #[test]
    fn size_limit_counts_payload_key_and_headers() {
        let at_limit = Message::new("t", vec![0u8; MAX_MESSAGE_SIZE - 3]).with_key("abc");
        assert!(at_limit.validate().is_ok());
        let over = at_limit.with_header("h", "");
        assert!(refused(over).contains("1000001"));
    }

    #[test]
    fn a_delivery_time_more_than_ten_years_away_is_refused() {
        let year = Duration::from_secs(365 * 86_400);
        let ok = Message::new("t", "p").deliver_after(9 * year);
        assert!(ok.validate().is_ok());
        assert_eq!(ok.due(), Due::After(9 * year));
        assert_eq!(
            Message::new("t", "p").deliver_after(Duration::ZERO).due(),
            Due::Now
        );
        assert!(
            refused(Message::new("t", "p").deliver_after(11 * year)).contains("the limit is 10")
        );
        assert!(refused(Message::new("t", "p").deliver_after(Duration::MAX)).contains("years"));

        let now = SystemTime::now();
        assert!(Message::new("t", "p")
            .deliver_at(now + 9 * year)
            .validate()
            .is_ok());
        assert!(Message::new("t", "p")
            .deliver_at(now - year)
            .validate()
            .is_ok());
        assert!(refused(Message::new("t", "p").deliver_at(now + 11 * year)).contains("ahead"));
        assert!(refused(Message::new("t", "p").deliver_at(now - 11 * year)).contains("ago"));
        assert!(refused(Message::new("t", "p").deliver_at(UNIX_EPOCH)).contains("ago"));
    }

    #[test]
    fn json_sets_payload_and_content_type() {
        let msg = Message::json("t", &serde_json::json!({"id": 7})).unwrap();
        assert_eq!(msg.payload(), br#"{"id":7}"#);
        assert_eq!(
            msg.headers(),
            &[("content-type".to_string(), b"application/json".to_vec())]
        );
    }

    #[cfg(feature = "opentelemetry")]
    #[test]
    fn a_trace_header_the_caller_set_is_kept_and_a_full_message_is_left_alone() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId};
        let context = SpanContext::new(
            TraceId::from(1),
            SpanId::from(1),
            TraceFlags::SAMPLED,
            true,
            Default::default(),
        );
        let _guard = opentelemetry::Context::new()
            .with_remote_span_context(context)
            .attach();
        let plain = Message::new("t", "p");
        assert_eq!(traced(&plain).headers()[0].0, "traceparent");
        let message = Message::new("t", "p").with_header("TraceParent", "mine");
        assert_eq!(traced(&message).headers(), message.headers());
        let full = (0..MAX_HEADERS).fold(Message::new("t", "p"), |m, i| {
            m.with_header(format!("h{i}"), "v")
        });
        assert!(matches!(traced(&full), Cow::Borrowed(_)));
    }
}
