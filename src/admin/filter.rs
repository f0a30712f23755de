//! Which dead messages an operator means: a message named by its row id or message id,
//! and a filter of them, as SQL conditions.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use mysql::Value;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::sql::{micros, pending_after, placeholders};
use crate::time::{micros_since_epoch, AT_MICROS};

/// A message named by its row id (`id`, the order it was added in) or by its message id
/// (the UUID `add` returned, which consumers see in the `outbox-message-id` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageRef {
    /// The row's `id`.
    Id(u64),
    /// The row's `message_id`.
    MessageId(Uuid),
}

impl FromStr for MessageRef {
    type Err = Error;

    /// A whole number is a row id; a UUID (with or without hyphens) a message id.
    fn from_str(text: &str) -> Result<MessageRef> {
        let text = text.trim();
        if let Ok(id) = text.parse::<u64>() {
            return Ok(MessageRef::Id(id));
        }
        Uuid::parse_str(text)
            .map(MessageRef::MessageId)
            .map_err(|_| {
                Error::Refused(format!(
                    "{text:?} is neither a row id (a whole number) nor a message id (a UUID)"
                ))
            })
    }
}

impl fmt::Display for MessageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageRef::Id(id) => write!(f, "{id}"),
            MessageRef::MessageId(uuid) => write!(f, "{uuid}"),
        }
    }
}

/// One end of a time range: a moment, or a while before now by the database's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeBound {
    /// This moment.
    At(SystemTime),
    /// This long before the database's `UTC_TIMESTAMP(6)`.
    Ago(Duration),
}

impl TimeBound {
    /// The bound as SQL, and its parameter.
    fn sql(self) -> (&'static str, Value) {
        match self {
            TimeBound::At(at) => (AT_MICROS, Value::from(micros_since_epoch(at))),
            TimeBound::Ago(ago) => (
                "UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND",
                Value::from(micros(ago)),
            ),
        }
    }
}

/// Which dead messages an operation works on. Every field set narrows the selection; the
/// default selects every dead message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadFilter {
    /// Exactly these messages. Each must exist and be dead, or the operation is refused
    /// ([`Error::Refused`]) and changes nothing.
    pub messages: Vec<MessageRef>,
    /// Of this topic.
    pub topic: Option<String>,
    /// With this key.
    pub key: Option<Vec<u8>>,
    /// Whose last error contains this text (ignoring case).
    pub error_contains: Option<String>,
    /// That died at or after this time.
    pub died_after: Option<TimeBound>,
    /// That died before this time.
    pub died_before: Option<TimeBound>,
    /// With a row id above this one: the next page after a list that ended there.
    pub after_id: Option<u64>,
    /// That hold back at least one pending message: a later pending message of their
    /// topic and key (held back while the relays run with `dead_blocks_key`).
    pub blocking: bool,
    /// At most this many, the oldest first.
    pub limit: Option<usize>,
}

impl DeadFilter {
    /// True when the filter narrows nothing: it selects every dead message.
    pub fn selects_all(&self) -> bool {
        DeadFilter {
            limit: None,
            ..self.clone()
        } == DeadFilter::default()
    }

    /// `WHERE` conditions on the row `o` of `table` and their parameters, `state` left to
    /// the caller.
    pub(super) fn conditions(&self, table: &str) -> (String, Vec<Value>) {
        let mut sql = String::new();
        let mut params = Vec::new();
        let ids: Vec<u64> = self.messages.iter().filter_map(row_id).collect();
        let uuids: Vec<Uuid> = self.messages.iter().filter_map(message_id).collect();
        if !self.messages.is_empty() {
            let mut any = Vec::new();
            if !ids.is_empty() {
                any.push(format!("o.id IN ({})", placeholders(ids.len())));
                params.extend(ids.iter().map(|&id| Value::from(id)));
            }
            if !uuids.is_empty() {
                any.push(format!("o.message_id IN ({})", placeholders(uuids.len())));
                params.extend(uuids.iter().map(|id| Value::from(id.as_bytes().to_vec())));
            }
            sql.push_str(&format!(" AND ({})", any.join(" OR ")));
        }
        if let Some(topic) = &self.topic {
            sql.push_str(" AND o.topic = ?");
            params.push(Value::from(topic.as_str()));
        }
        if let Some(key) = &self.key {
            sql.push_str(" AND o.msg_key = ?");
            params.push(Value::from(key.clone()));
        }
        if let Some(text) = &self.error_contains {
            sql.push_str(" AND LOCATE(?, o.error) > 0");
            params.push(Value::from(text.as_str()));
        }
        for (bound, op) in [(self.died_after, ">="), (self.died_before, "<")] {
            if let Some(bound) = bound {
                let (expr, param) = bound.sql();
                sql.push_str(&format!(" AND o.processed_on {op} {expr}"));
                params.push(param);
            }
        }
        if let Some(after) = self.after_id {
            sql.push_str(" AND o.id > ?");
            params.push(Value::from(after));
        }
        if self.blocking {
            sql.push_str(&format!(" AND {} > 0", pending_after(table)));
        }
        (sql, params)
    }
}

pub(super) fn row_id(message: &MessageRef) -> Option<u64> {
    match message {
        MessageRef::Id(id) => Some(*id),
        MessageRef::MessageId(_) => None,
    }
}

pub(super) fn message_id(message: &MessageRef) -> Option<Uuid> {
    match message {
        MessageRef::MessageId(id) => Some(*id),
        MessageRef::Id(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::time;

    #[test]
    fn messages_are_named_by_row_id_or_uuid_and_nothing_else() {
        assert_eq!("42".parse::<MessageRef>().unwrap(), MessageRef::Id(42));
        let uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        for text in [uuid.to_string(), uuid.simple().to_string()] {
            assert_eq!(
                text.parse::<MessageRef>().unwrap(),
                MessageRef::MessageId(uuid)
            );
        }
        for bad in ["", "-1", "4x", "0193-0000"] {
            assert!(
                matches!(bad.parse::<MessageRef>(), Err(Error::Refused(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn each_field_of_a_filter_adds_one_condition_with_its_parameters() {
        assert!(DeadFilter::default().selects_all());
        assert!(DeadFilter {
            limit: Some(5),
            ..Default::default()
        }
        .selects_all());
        assert_eq!(
            DeadFilter::default().conditions("t"),
            (String::new(), Vec::new())
        );
        let uuid = Uuid::from_u128(7);
        let filter = DeadFilter {
            messages: vec![MessageRef::Id(3), MessageRef::MessageId(uuid)],
            topic: Some("t".into()),
            key: Some(b"k".to_vec()),
            error_contains: Some("50%_".into()),
            died_after: Some(TimeBound::Ago(Duration::from_secs(2))),
            died_before: Some(TimeBound::At(time(5))),
            after_id: Some(9),
            blocking: true,
            limit: Some(1),
        };
        assert!(!filter.selects_all());
        let (sql, params) = filter.conditions("t");
        assert_eq!(
            sql,
            " AND (o.id IN (?) OR o.message_id IN (?)) AND o.topic = ? AND o.msg_key = ? \
             AND LOCATE(?, o.error) > 0 \
             AND o.processed_on >= UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
             AND o.processed_on < TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00') AND o.id > ? \
             AND (SELECT COUNT(*) FROM `t` p WHERE p.topic = o.topic AND p.msg_key = o.msg_key \
             AND p.state = 0 AND p.id > o.id) > 0"
        );
        assert_eq!(
            params,
            vec![
                Value::from(3u64),
                Value::from(uuid.as_bytes().to_vec()),
                Value::from("t"),
                Value::from(b"k".to_vec()),
                Value::from("50%_"),
                Value::from(2_000_000u64),
                Value::from(5i64),
                Value::from(9u64),
            ]
        );
    }
}
