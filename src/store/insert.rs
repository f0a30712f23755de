//! The INSERT that adds messages: one statement of many rows, and when to start another.

use uuid::Uuid;

use super::codec::push_row;
use crate::message::Message;

/// Most rows one INSERT carries.
pub(crate) const INSERT_CHUNK: usize = 500;
/// Bytes of messages (as [`Message::size`] counts them) after which a new INSERT starts:
/// as hexadecimal literals they take twice that, well under the servers' default
/// `max_allowed_packet` of 16 MiB and more.
pub(crate) const INSERT_CHUNK_BYTES: usize = 4 << 20;
/// The columns an add writes, in the order [`push_row`] writes their values.
pub(crate) const INSERT_COLUMNS: &str =
    "message_id, topic, msg_key, headers, payload, created_on, available_on";

/// An INSERT being built, row by row, for one outbox table.
#[derive(Debug, Clone)]
pub(crate) struct Insert {
    head: String,
    sql: String,
    rows: usize,
    bytes: usize,
}

impl Insert {
    /// An empty INSERT into `table` (a validated identifier).
    pub fn new(table: &str) -> Insert {
        Insert {
            head: format!("INSERT INTO `{table}` ({INSERT_COLUMNS}) VALUES "),
            sql: String::new(),
            rows: 0,
            bytes: 0,
        }
    }

    /// Whether `message` may join this INSERT: the one rule for where an INSERT ends.
    /// The first row always fits.
    pub fn fits(&self, message: &Message) -> bool {
        self.rows == 0
            || (self.rows < INSERT_CHUNK && self.bytes + message.size() <= INSERT_CHUNK_BYTES)
    }

    /// Adds one row.
    pub fn push(&mut self, id: Uuid, message: &Message) {
        if self.rows == 0 {
            self.sql.push_str(&self.head);
        } else {
            self.sql.push_str(", ");
        }
        push_row(&mut self.sql, id, message);
        self.rows += 1;
        self.bytes += message.size();
    }

    /// Rows added since the last [`take`](Insert::take).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The statement so far (empty when it has no row), leaving this INSERT empty.
    pub fn take(&mut self) -> String {
        self.rows = 0;
        self.bytes = 0;
        std::mem::take(&mut self.sql)
    }

    /// `rows` as statements, in order, each as full as [`fits`](Insert::fits) allows.
    pub fn statements(table: &str, rows: &[(Uuid, &Message)]) -> Vec<String> {
        let mut insert = Insert::new(table);
        let mut statements = Vec::new();
        for (id, message) in rows {
            if !insert.fits(message) {
                statements.push(insert.take());
            }
            insert.push(*id, message);
        }
        if insert.rows() > 0 {
            statements.push(insert.take());
        }
        statements
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_ends_at_its_row_or_byte_limit() {
        let small = Message::new("t", "x");
        let rows: Vec<_> = (0..INSERT_CHUNK * 2 + 1)
            .map(|_| (Uuid::nil(), &small))
            .collect();
        let statements = Insert::statements("o", &rows);
        assert_eq!(statements.len(), 3);
        assert!(statements
            .iter()
            .all(|s| s.starts_with("INSERT INTO `o` (")));
        assert_eq!(statements[2].matches("UTC_TIMESTAMP").count(), 2);

        let big = Message::new("t", vec![0u8; INSERT_CHUNK_BYTES / 3]);
        let rows: Vec<_> = (0..7).map(|_| (Uuid::nil(), &big)).collect();
        assert_eq!(Insert::statements("o", &rows).len(), 3, "3 + 3 + 1");
        let huge = Message::new("t", vec![0u8; INSERT_CHUNK_BYTES + 1]);
        assert_eq!(
            Insert::statements("o", &[(Uuid::nil(), &huge)]).len(),
            1,
            "a row larger than the limit still goes, alone"
        );
    }
}
