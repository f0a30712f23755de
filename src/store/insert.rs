//! The INSERT that adds messages: one statement of many rows, and when to start another.

use uuid::Uuid;

use super::codec::push_row;
use crate::message::{Due, Message};

/// Most rows one INSERT carries.
pub(crate) const INSERT_CHUNK: usize = 500;
/// Bytes of messages (as [`Message::size`] counts them) after which a new INSERT starts:
/// as hexadecimal literals they take twice that, well under the servers' default
/// `max_allowed_packet` of 16 MiB and more.
pub(crate) const INSERT_CHUNK_BYTES: usize = 4 << 20;
/// The columns an add writes, in the order [`push_row`] writes their values.
pub(crate) const INSERT_COLUMNS: &str =
    "message_id, topic, msg_key, headers, payload, created_on, available_on";

/// The columns a leasable INSERT writes after [`INSERT_COLUMNS`].
const LEASE_COLUMNS: &str = ", locked_by, locked_on";
/// A row's `locked_by` and `locked_on` as written before the commit names a lease: no
/// lease, never locked. Its two values keep their width when [`Insert::take_leased`]
/// writes a lease over them.
const UNLEASED: &str = "00000000000000000000, '1970-01-01 00:00:00'";
/// Where `locked_on` starts in [`UNLEASED`].
const LOCKED_ON_AT: usize = 22;

/// An INSERT being built, row by row, for one outbox table.
#[derive(Debug, Clone)]
pub(crate) struct Insert {
    head: String,
    sql: String,
    rows: usize,
    bytes: usize,
    /// Whether its rows may be written leased ([`Insert::leasable`]).
    leasable: bool,
    /// Where each row that may be leased has its [`UNLEASED`] values, and its message id.
    slots: Vec<(usize, Uuid)>,
}

impl Insert {
    /// An empty INSERT into `table` (a validated identifier).
    pub fn new(table: &str) -> Insert {
        Insert {
            head: format!("INSERT INTO `{table}` ({INSERT_COLUMNS}) VALUES "),
            sql: String::new(),
            rows: 0,
            bytes: 0,
            leasable: false,
            slots: Vec::new(),
        }
    }

    /// An empty INSERT into `table` whose rows [`take_leased`](Insert::take_leased) can
    /// write already leased: it writes `locked_by` and `locked_on` too.
    pub fn leasable(table: &str) -> Insert {
        Insert {
            head: format!("INSERT INTO `{table}` ({INSERT_COLUMNS}{LEASE_COLUMNS}) VALUES "),
            leasable: true,
            ..Insert::new(table)
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
        if self.leasable {
            // Before the row's closing parenthesis. A delayed message is never leased: it
            // is not the dispatcher's to publish now.
            self.sql.pop();
            self.sql.push_str(", ");
            if message.due() == Due::Now {
                self.slots.push((self.sql.len(), id));
            }
            self.sql.push_str(UNLEASED);
            self.sql.push(')');
        }
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
        self.slots.clear();
        std::mem::take(&mut self.sql)
    }

    /// As [`take`](Insert::take), with the rows not delayed written leased under `lease`
    /// from the statement's time; with them, their message ids.
    pub fn take_leased(&mut self, lease: u64) -> (String, Vec<Uuid>) {
        let leased = format!("{lease:020}, UTC_TIMESTAMP(6)     ");
        debug_assert_eq!(leased.len(), UNLEASED.len());
        debug_assert_eq!(&UNLEASED[LOCKED_ON_AT - 2..LOCKED_ON_AT], ", ");
        let slots = std::mem::take(&mut self.slots);
        for (at, _) in &slots {
            self.sql.replace_range(*at..*at + UNLEASED.len(), &leased);
        }
        let ids = slots.into_iter().map(|(_, id)| id).collect();
        (self.take(), ids)
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
    use std::time::Duration;

    #[test]
    fn a_leasable_insert_leases_its_rows_due_now_only_when_taken_leased() {
        let (now, later) = (
            Message::new("t", "now"),
            Message::new("t", "later").deliver_after(Duration::from_secs(60)),
        );
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut insert = Insert::leasable("o");
        insert.push(a, &now);
        insert.push(b, &later);
        let plain = insert.clone().take();
        assert!(plain.contains("locked_by, locked_on) VALUES"));
        assert_eq!(plain.matches(UNLEASED).count(), 2, "{plain}");
        let (sql, ids) = insert.take_leased(42);
        assert_eq!(ids, vec![a], "the delayed row is not leased");
        assert_eq!(sql.len(), plain.len(), "written in place");
        assert_eq!(
            sql.matches("00000000000000000042, UTC_TIMESTAMP(6)     )")
                .count(),
            1,
            "{sql}"
        );
        assert_eq!(sql.matches(UNLEASED).count(), 1);
        assert_eq!(insert.rows(), 0);
        assert_eq!(insert.take_leased(7), (String::new(), Vec::new()));
    }

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
