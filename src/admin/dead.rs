//! Dead messages: finding them, reading one whole, replaying or discarding them.

use std::fmt;
use std::time::SystemTime;

use mysql::prelude::Queryable;
use mysql::{IsolationLevel, Params, Row, TxOpts, Value};
use serde_json::{json, Value as Json};
use uuid::Uuid;

use super::filter::{DeadFilter, MessageRef};
use super::Admin;
use crate::error::{Error, Result};
use crate::store::codec::take;
use crate::store::sql::{
    padded, pending_after, placeholders, RowState, DEAD, DISCARDED, MAX_ID_LIST, PENDING,
};
use crate::time::{micros_of, rfc3339, time, time_or_never};

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Waiting to be published (or being published).
    Pending,
    /// Published.
    Delivered,
    /// Out of attempts.
    Dead,
    /// Dead, and discarded by an operator.
    Discarded,
    /// A value this version does not know (written by hand, or by a later version).
    Unknown(u8),
}

impl State {
    fn of(value: u8) -> State {
        match RowState::of(value) {
            Some(RowState::Pending) => State::Pending,
            Some(RowState::Delivered) => State::Delivered,
            Some(RowState::Dead) => State::Dead,
            Some(RowState::Discarded) => State::Discarded,
            None => State::Unknown(value),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Pending => f.write_str("pending"),
            State::Delivered => f.write_str("delivered"),
            State::Dead => f.write_str("dead"),
            State::Discarded => f.write_str("discarded"),
            State::Unknown(value) => write!(f, "unknown ({value})"),
        }
    }
}

/// A dead message as lists show it: everything but its headers and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadMessage {
    /// The row id.
    pub id: u64,
    /// The message id.
    pub message_id: Uuid,
    /// Its topic.
    pub topic: String,
    /// Its key, if it has one.
    pub key: Option<Vec<u8>>,
    /// Failed sends.
    pub attempts: u32,
    /// The last error.
    pub error: Option<String>,
    /// When it was added.
    pub created: SystemTime,
    /// When it died.
    pub died: SystemTime,
    /// Its payload's size in bytes.
    pub payload_len: u64,
    /// Pending messages of its topic and key after it: the messages it holds back while
    /// the relays run with `dead_blocks_key`.
    pub holds_back: u64,
}

/// A message whole, every column of its row ([`Admin::message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The row id.
    pub id: u64,
    /// The message id.
    pub message_id: Uuid,
    /// Its topic.
    pub topic: String,
    /// Its key, if it has one.
    pub key: Option<Vec<u8>>,
    /// Its headers as stored: a JSON array of `[name, value]` pairs, the value a string,
    /// or an array of bytes when not UTF-8. `None` when it has none.
    pub headers: Option<String>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its state.
    pub state: State,
    /// When it was added.
    pub created: SystemTime,
    /// When it may be tried next (pending messages).
    pub available: SystemTime,
    /// The lease it is held under; 0 when none.
    pub locked_by: u64,
    /// When the lease was taken, if ever.
    pub locked_on: Option<SystemTime>,
    /// When it was delivered, died or was discarded, if it was.
    pub processed: Option<SystemTime>,
    /// When it was last tried, if ever.
    pub last_attempted: Option<SystemTime>,
    /// Sends tried (a delivered message counts its successful one).
    pub attempts: u32,
    /// The last error.
    pub error: Option<String>,
}

/// Columns of a [`DeadMessage`], of the row `o` of `table`.
fn dead_columns(table: &str) -> String {
    format!(
        "o.id, o.message_id, o.topic, o.msg_key, o.number_of_attempts, o.error, {}, {}, \
         LENGTH(o.payload), {}",
        micros_of("o.created_on"),
        micros_of("o.processed_on"),
        pending_after(table)
    )
}

/// A row read as [`dead_columns`] lists them, as a [`DeadMessage`]; [`Error::CorruptRow`]
/// when a column is not what the table holds.
fn dead_message(mut row: Row) -> Result<DeadMessage> {
    let id: u64 = take(&mut row, 0, 0)?;
    let message_id: Vec<u8> = take(&mut row, 1, id)?;
    Ok(DeadMessage {
        id,
        message_id: uuid(id, &message_id)?,
        topic: take(&mut row, 2, id)?,
        key: take(&mut row, 3, id)?,
        attempts: take(&mut row, 4, id)?,
        error: take(&mut row, 5, id)?,
        created: time(take(&mut row, 6, id)?),
        died: time(take(&mut row, 7, id)?),
        payload_len: take(&mut row, 8, id)?,
        holds_back: take(&mut row, 9, id)?,
    })
}

fn uuid(id: u64, bytes: &[u8]) -> Result<Uuid> {
    Uuid::from_slice(bytes).map_err(|e| Error::CorruptRow {
        id,
        reason: format!("message_id: {e}"),
    })
}

/// The change an operation makes to the dead rows it selected.
struct Change {
    /// `SET` assignments.
    set: String,
    /// Past tense, for the log.
    done: &'static str,
}

impl Admin {
    /// Dead messages that match `filter`, oldest first. With `filter.messages`, each must
    /// be there and dead.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] for a named message that is not there or not dead;
    /// [`Error::Database`] when the query fails.
    pub fn dead(&self, filter: &DeadFilter) -> Result<Vec<DeadMessage>> {
        self.store().connections().with(|conn| {
            let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::ReadCommitted));
            let mut tx = conn.start_transaction(opts)?;
            self.check_named(&mut tx, &filter.messages)?;
            self.select_dead(&mut tx, filter, "")
        })
    }

    /// One message whole, in whatever state; `None` when the table has no such message.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the query fails; [`Error::CorruptRow`] when its message
    /// id is not 16 bytes.
    pub fn message(&self, message: MessageRef) -> Result<Option<StoredMessage>> {
        let (condition, param) = match message {
            MessageRef::Id(id) => ("id = ?", Value::from(id)),
            MessageRef::MessageId(uuid) => {
                ("message_id = ?", Value::from(uuid.as_bytes().to_vec()))
            }
        };
        let row: Option<Row> = self.store().connections().with(|conn| {
            Ok(conn.exec_first(
                format!(
                    "SELECT id, message_id, topic, msg_key, CAST(headers AS CHAR), payload, state, \
                       {}, {}, locked_by, {}, {}, {}, number_of_attempts, error \
                     FROM `{}` WHERE {condition}",
                    micros_of("created_on"),
                    micros_of("available_on"),
                    micros_of("locked_on"),
                    micros_of("processed_on"),
                    micros_of("last_attempted_on"),
                    self.table()
                ),
                (param.clone(),),
            )?)
        })?;
        let Some(mut row) = row else { return Ok(None) };
        let id: u64 = take(&mut row, 0, 0)?;
        let message_id: Vec<u8> = take(&mut row, 1, id)?;
        Ok(Some(StoredMessage {
            id,
            message_id: uuid(id, &message_id)?,
            topic: take(&mut row, 2, id)?,
            key: take(&mut row, 3, id)?,
            headers: take(&mut row, 4, id)?,
            payload: take(&mut row, 5, id)?,
            state: State::of(take(&mut row, 6, id)?),
            created: time(take(&mut row, 7, id)?),
            available: time(take(&mut row, 8, id)?),
            locked_by: take(&mut row, 9, id)?,
            locked_on: time_or_never(take(&mut row, 10, id)?),
            processed: time_or_never(take(&mut row, 11, id)?),
            last_attempted: time_or_never(take(&mut row, 12, id)?),
            attempts: take(&mut row, 13, id)?,
            error: take(&mut row, 14, id)?,
        }))
    }

    /// Makes the dead messages `filter` selects pending again: attempts back to 0, to be
    /// sent at once, each in its place in its key's order (its row id is unchanged; with
    /// `dead_blocks_key`, the key's held-back messages follow it). The last error stays
    /// until the next attempt. With `dry_run`, changes nothing and returns what it would
    /// replay. Returns the messages replayed.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] for a named message that is not there or not dead (nothing is
    /// replayed); [`Error::Database`] when a statement fails (nothing is replayed).
    pub fn replay(&self, filter: &DeadFilter, dry_run: bool) -> Result<Vec<DeadMessage>> {
        let change = Change {
            set: format!(
                "state = {PENDING}, number_of_attempts = 0, available_on = UTC_TIMESTAMP(6), \
                 processed_on = '1970-01-01 00:00:00', locked_by = 0"
            ),
            done: "replayed",
        };
        self.change(filter, dry_run, &change)
    }

    /// Discards the dead messages `filter` selects: they will never be sent, count as no
    /// work, no longer hold back their keys' later messages (with `dead_blocks_key`), and
    /// are deleted by the delivered rows' retention, counted from now. Each discard is
    /// logged (`info`). With `dry_run`, changes nothing and returns what it would
    /// discard. Returns the messages discarded.
    ///
    /// # Errors
    ///
    /// As [`Admin::replay`].
    pub fn discard(&self, filter: &DeadFilter, dry_run: bool) -> Result<Vec<DeadMessage>> {
        let change = Change {
            set: format!("state = {DISCARDED}, processed_on = UTC_TIMESTAMP(6)"),
            done: "discarded",
        };
        self.change(filter, dry_run, &change)
    }

    /// Selects dead rows and applies `change` to them, in one READ COMMITTED transaction
    /// that locks only the rows selected.
    fn change(
        &self,
        filter: &DeadFilter,
        dry_run: bool,
        change: &Change,
    ) -> Result<Vec<DeadMessage>> {
        let selected = self.store().connections().with(|conn| {
            let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::ReadCommitted));
            let mut tx = conn.start_transaction(opts)?;
            self.check_named(&mut tx, &filter.messages)?;
            if dry_run {
                return self.select_dead(&mut tx, filter, "");
            }
            let selected = self.select_dead(&mut tx, filter, " FOR UPDATE")?;
            let ids: Vec<u64> = selected.iter().map(|message| message.id).collect();
            for chunk in ids.chunks(MAX_ID_LIST) {
                let chunk = padded(chunk);
                tx.exec_drop(
                    format!(
                        "UPDATE `{}` SET {} WHERE state = {DEAD} AND id IN ({})",
                        self.table(),
                        change.set,
                        placeholders(chunk.len())
                    ),
                    Params::Positional(chunk),
                )?;
            }
            tx.commit()?;
            Ok(selected)
        })?;
        if !dry_run && !selected.is_empty() {
            log::info!(
                "{} {} dead messages of `{}`: ids {}",
                change.done,
                selected.len(),
                self.table(),
                id_list(&selected)
            );
        }
        Ok(selected)
    }

    /// Dead rows matching `filter`, oldest first, with `lock` (`FOR UPDATE` or nothing).
    fn select_dead(
        &self,
        tx: &mut mysql::Transaction<'_>,
        filter: &DeadFilter,
        lock: &str,
    ) -> Result<Vec<DeadMessage>> {
        let (conditions, mut params) = filter.conditions(self.table());
        let limit = match filter.limit {
            Some(limit) => {
                params.push(Value::from(limit as u64));
                " LIMIT ?"
            }
            None => "",
        };
        let rows: Vec<Row> = tx.exec(
            format!(
                "SELECT {} FROM `{}` o WHERE o.state = {DEAD}{conditions} ORDER BY o.id{limit}{lock}",
                dead_columns(self.table()),
                self.table()
            ),
            Params::Positional(params),
        )?;
        rows.into_iter().map(dead_message).collect()
    }

    /// Refuses, naming them, messages of `named` that are not in the table or not dead.
    fn check_named(&self, tx: &mut mysql::Transaction<'_>, named: &[MessageRef]) -> Result<()> {
        if named.is_empty() {
            return Ok(());
        }
        let filter = DeadFilter {
            messages: named.to_vec(),
            ..Default::default()
        };
        let (conditions, params) = filter.conditions(self.table());
        let found: Vec<(u64, Vec<u8>, u8)> = tx.exec(
            format!(
                "SELECT o.id, o.message_id, o.state FROM `{}` o WHERE TRUE{conditions}",
                self.table()
            ),
            Params::Positional(params),
        )?;
        let mut problems = Vec::new();
        for wanted in named {
            let row = found.iter().find(|(id, message_id, _)| match wanted {
                MessageRef::Id(want) => id == want,
                MessageRef::MessageId(want) => message_id.as_slice() == want.as_bytes(),
            });
            match row {
                None => problems.push(format!("no message {wanted}")),
                Some((_, _, state)) if *state != DEAD => problems.push(format!(
                    "message {wanted} is {}, not dead",
                    State::of(*state)
                )),
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Refused(format!(
                "{} in `{}`; nothing was changed",
                problems.join(", "),
                self.table()
            )))
        }
    }
}

/// The ids of `messages`, shortened past 20.
fn id_list(messages: &[DeadMessage]) -> String {
    let mut ids: Vec<String> = messages.iter().take(20).map(|m| m.id.to_string()).collect();
    if messages.len() > 20 {
        ids.push(format!("and {} more", messages.len() - 20));
    }
    ids.join(", ")
}

/// The fields that name a message in JSON: `id`, `message_id`, `topic`, `key`, `key_hex`.
fn identity_json(id: u64, message_id: Uuid, topic: &str, key: Option<&[u8]>) -> Json {
    let (key, key_hex) = bytes_json(key);
    json!({
        "id": id,
        "message_id": message_id.to_string(),
        "topic": topic,
        "key": key,
        "key_hex": key_hex,
    })
}

/// `more`'s fields added to the object `json`.
fn with_fields(mut json: Json, more: Json) -> Json {
    if let (Json::Object(fields), Json::Object(more)) = (&mut json, more) {
        fields.extend(more);
    }
    json
}

/// Bytes as JSON: the text when they are UTF-8, else null; and always as hexadecimal.
fn bytes_json(bytes: Option<&[u8]>) -> (Json, Json) {
    match bytes {
        None => (Json::Null, Json::Null),
        Some(bytes) => {
            let text = std::str::from_utf8(bytes).map_or(Json::Null, Json::from);
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            (text, Json::from(hex))
        }
    }
}

impl DeadMessage {
    /// As JSON: `{"id", "message_id", "topic", "key" (text, or null when none or not
    /// UTF-8), "key_hex" (null when none), "attempts", "error", "created", "died" (RFC
    /// 3339), "payload_bytes", "holds_back"}`.
    pub fn to_json(&self) -> Json {
        let identity = identity_json(self.id, self.message_id, &self.topic, self.key.as_deref());
        let more = json!({
            "attempts": self.attempts,
            "error": self.error,
            "created": rfc3339(self.created),
            "died": rfc3339(self.died),
            "payload_bytes": self.payload_len,
            "holds_back": self.holds_back,
        });
        with_fields(identity, more)
    }
}

impl StoredMessage {
    /// As JSON: the fields of [`DeadMessage::to_json`] but `died`, and `"state"`,
    /// `"headers"` (the stored array; a string if it is not valid JSON), `"payload"` (text,
    /// or null when not UTF-8), `"payload_hex"`, `"available"`, `"locked_by"`, and
    /// `"locked_on"`, `"processed"`, `"last_attempted"` (null when never).
    pub fn to_json(&self) -> Json {
        let identity = identity_json(self.id, self.message_id, &self.topic, self.key.as_deref());
        let (payload, payload_hex) = bytes_json(Some(&self.payload));
        let headers = self.headers.as_deref().map_or(Json::Null, |text| {
            serde_json::from_str(text).unwrap_or_else(|_| Json::from(text))
        });
        let more = json!({
            "state": self.state.to_string(),
            "headers": headers,
            "payload": payload,
            "payload_hex": payload_hex,
            "payload_bytes": self.payload.len(),
            "attempts": self.attempts,
            "error": self.error,
            "created": rfc3339(self.created),
            "available": rfc3339(self.available),
            "locked_by": self.locked_by,
            "locked_on": self.locked_on.map(rfc3339),
            "processed": self.processed.map(rfc3339),
            "last_attempted": self.last_attempted.map(rfc3339),
        });
        with_fields(identity, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_show_as_text_when_utf8_and_always_as_hex() {
        assert_eq!(bytes_json(None), (Json::Null, Json::Null));
        assert_eq!(bytes_json(Some(b"ok")), (json!("ok"), json!("6f6b")));
        assert_eq!(bytes_json(Some(&[0xff])), (Json::Null, json!("ff")));
    }
}
