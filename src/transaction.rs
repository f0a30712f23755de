//! A MySQL transaction whose outbox messages travel with its COMMIT.

use std::fmt;

use mysql::prelude::{AsStatement, Queryable};
use mysql::{
    AccessMode, Binary, Conn, Params, PooledConn, QueryResult, Statement, Text, TxOpts, Value,
};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::message::{with_ids, Message};
use crate::runtime::Waker;
use crate::store::insert::Insert;
use crate::store::sql::{placeholders, PENDING};

/// A MySQL transaction whose messages are written in the same round trip as its COMMIT.
///
/// Started by [`Outbox::start_transaction`](crate::Outbox::start_transaction). Run the
/// business statements on it as on a `mysql::Transaction` (it is [`Queryable`]: code
/// that takes `&mut impl Queryable` takes either) and add messages with
/// [`add`](OutboxTransaction::add): each is validated at once and kept.
/// [`commit`](OutboxTransaction::commit) sends their INSERT and the COMMIT in one packet;
/// the server runs the COMMIT only if the INSERT succeeded. The guarantee is the one of
/// [`Outbox::add`](crate::Outbox::add): the messages are published if and only if the
/// transaction commits. What is saved is the INSERT's own round trip, which is most of
/// what an add costs a small transaction, and more the farther away the database is.
///
/// Dropped without `commit`, it rolls back. Unlike with `Outbox::add`:
/// - the messages' rows are written at commit, so the transaction's own statements do not
///   see them, and an error in writing them (a missing table, say) comes from `commit`,
///   after which the transaction is rolled back;
/// - past 500 messages or 4 MiB of them, the ones kept so far are written at once in an
///   INSERT of their own, so that no packet outgrows the server's `max_allowed_packet`;
///   if that fails, `add` returns the error and `commit` will refuse
///   ([`Error::RolledBack`]).
///
/// ```no_run
/// use mysql::prelude::Queryable;
/// # fn main() -> outbox::Result<()> {
/// let pool = mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?;
/// let outbox = outbox::Outbox::new(&outbox::MySqlStore::new(pool));
///
/// let mut tx = outbox.start_transaction(mysql::TxOpts::default())?;
/// tx.exec_drop("UPDATE accounts SET balance = balance - 10 WHERE id = ?", (7,))?;
/// let id = tx.add(&outbox::Message::new("accounts", "debited").with_key("7"))?;
/// tx.commit()?; // the INSERT and the COMMIT, in one round trip
/// println!("queued {id}");
/// # Ok(()) }
/// ```
pub struct OutboxTransaction<'a> {
    conn: Connection<'a>,
    /// The rows added and not yet written.
    unsent: Insert,
    /// Messages added, written or not.
    added: usize,
    /// Woken after a commit that wrote messages.
    waker: Option<Waker>,
    /// Writing messages failed: the transaction may not commit.
    broken: bool,
    /// The outbox table.
    table: String,
    /// Committed or rolled back.
    finished: bool,
}

/// The connection a transaction runs on: its own from a pool, or the caller's.
pub(crate) enum Connection<'a> {
    Pooled(PooledConn),
    Borrowed(&'a mut Conn),
}

impl Connection<'_> {
    fn get(&mut self) -> &mut Conn {
        match self {
            Connection::Pooled(conn) => conn.as_mut(),
            Connection::Borrowed(conn) => conn,
        }
    }

    fn get_ref(&self) -> &Conn {
        match self {
            Connection::Pooled(conn) => conn,
            Connection::Borrowed(conn) => conn,
        }
    }
}

impl<'a> OutboxTransaction<'a> {
    /// Starts a transaction on `conn` for messages to the outbox table `table`; its
    /// commit wakes `waker`.
    pub(crate) fn start(
        mut conn: Connection<'a>,
        table: &str,
        waker: Option<Waker>,
        opts: TxOpts,
    ) -> Result<OutboxTransaction<'a>> {
        run(conn.get(), &start_statement(&opts))?;
        // Rows a dispatcher in this process may take at commit are written leasable.
        let unsent = match waker.as_ref().and_then(Waker::handoff) {
            Some(_) => Insert::leasable(table),
            None => Insert::new(table),
        };
        Ok(OutboxTransaction {
            conn,
            unsent,
            added: 0,
            waker,
            broken: false,
            table: table.to_string(),
            finished: false,
        })
    }

    /// Validates `message` and keeps it to be written with the COMMIT. Returns its message
    /// id (a UUIDv7), as [`Outbox::add`](crate::Outbox::add) does.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`] before anything is kept or written (the transaction can
    /// go on); [`Error::Database`] if the messages kept so far had to be written and that
    /// failed (the transaction will not commit).
    pub fn add(&mut self, message: &Message) -> Result<Uuid> {
        let mut ids = self.add_all(std::slice::from_ref(message))?;
        Ok(ids.pop().unwrap_or_else(Uuid::nil))
    }

    /// Validates every message, then keeps them all, in order, as [`add`] does. Returns
    /// their message ids in the same order.
    ///
    /// [`add`]: OutboxTransaction::add
    ///
    /// # Errors
    ///
    /// As [`add`]: if any message is invalid, none is kept.
    pub fn add_all(&mut self, messages: &[Message]) -> Result<Vec<Uuid>> {
        let rows = with_ids(messages)?;
        for (id, message) in &rows {
            self.keep(*id, message.as_ref())?;
        }
        Ok(rows.into_iter().map(|(id, _)| id).collect())
    }

    /// Writes the messages added and commits, in one round trip. Then, if it wrote
    /// messages, wakes the dispatcher set by
    /// [`Outbox::with_waker`](crate::Outbox::with_waker).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the INSERT or the COMMIT fails: the transaction is rolled
    /// back. [`Error::RolledBack`] if an earlier `add` failed to write messages.
    pub fn commit(mut self) -> Result<()> {
        if self.broken {
            return Err(Error::RolledBack);
        }
        let waker = self.waker.take();
        let handoff = waker.as_ref().and_then(Waker::handoff);
        let ticket = handoff.and_then(|handoff| handoff.begin(&self.table));
        let (mut sql, leased) = match ticket {
            Some(ticket) => self.unsent.take_leased(ticket.lease),
            None => (self.unsent.take(), Vec::new()),
        };
        if !sql.is_empty() {
            sql.push_str("; ");
        }
        sql.push_str("COMMIT");
        let committed = run(self.conn.get(), &sql);
        if let (Some(handoff), Some(ticket)) = (handoff, ticket) {
            // Handed over whatever the outcome: rows that were not written are not found.
            let taken = handoff.end(ticket, &leased);
            if !taken && committed.is_ok() {
                self.release(ticket.lease, &leased);
            }
        }
        committed?;
        self.finished = true;
        if let (Some(waker), true) = (&waker, self.added > 0) {
            if self.added > leased.len() {
                waker.wake();
            } else {
                waker.handed();
            }
        }
        Ok(())
    }

    /// Releases rows this transaction wrote leased to a dispatcher that stopped before it
    /// could take them; if that fails, they wait for their lease to expire.
    fn release(&mut self, lease: u64, ids: &[Uuid]) {
        if ids.is_empty() {
            return;
        }
        let sql = format!(
            "UPDATE `{}` SET locked_by = 0 WHERE locked_by = ? AND state = {PENDING} \
             AND message_id IN ({})",
            self.table,
            placeholders(ids.len())
        );
        let mut params = vec![Value::from(lease)];
        params.extend(ids.iter().map(|id| Value::from(id.as_bytes().to_vec())));
        if let Err(e) = self.conn.get().exec_drop(sql, Params::Positional(params)) {
            log::warn!(
                "{} messages written for a dispatcher that stopped wait for their lease to \
                 expire: releasing them failed: {e}",
                ids.len()
            );
        }
    }

    /// Rolls back: nothing the transaction did, messages included, is written.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the ROLLBACK could not be sent (the server rolls back a
    /// transaction whose connection is lost).
    pub fn rollback(mut self) -> Result<()> {
        self.finished = true;
        run(self.conn.get(), "ROLLBACK")
    }

    /// The AUTO_INCREMENT id the last statement run on this transaction generated, if
    /// any, as `mysql::Transaction::last_insert_id`. Read it before adding more messages:
    /// an `add` past 500 messages or 4 MiB runs an INSERT of its own.
    pub fn last_insert_id(&self) -> Option<u64> {
        Some(self.conn.get_ref().last_insert_id()).filter(|&id| id != 0)
    }

    /// Rows the last statement run on this transaction changed, as the server reports.
    pub fn affected_rows(&self) -> u64 {
        self.conn.get_ref().affected_rows()
    }

    /// Warnings of the last statement run on this transaction.
    pub fn warnings(&self) -> u16 {
        self.conn.get_ref().warnings()
    }

    /// Adds one row to the unsent INSERT, writing the unsent rows first when the INSERT
    /// is full.
    fn keep(&mut self, id: Uuid, message: &Message) -> Result<()> {
        if self.broken {
            return Err(Error::RolledBack);
        }
        if !self.unsent.fits(message) {
            let sql = self.unsent.take();
            if let Err(e) = run(self.conn.get(), &sql) {
                self.broken = true;
                return Err(e);
            }
        }
        self.unsent.push(id, message);
        self.added += 1;
        Ok(())
    }
}

impl Drop for OutboxTransaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.conn.get().query_drop("ROLLBACK") {
                log::debug!("outbox transaction: ROLLBACK on drop failed: {e}");
            }
        }
    }
}

impl fmt::Debug for OutboxTransaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxTransaction")
            .field("added", &self.added)
            .field("unsent_rows", &self.unsent.rows())
            .field("broken", &self.broken)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Queryable for OutboxTransaction<'_> {
    fn query_iter<Q: AsRef<str>>(
        &mut self,
        query: Q,
    ) -> mysql::Result<QueryResult<'_, '_, '_, Text>> {
        self.conn.get().query_iter(query)
    }

    fn prep<Q: AsRef<str>>(&mut self, query: Q) -> mysql::Result<Statement> {
        self.conn.get().prep(query)
    }

    fn close(&mut self, stmt: Statement) -> mysql::Result<()> {
        self.conn.get().close(stmt)
    }

    fn exec_iter<S, P>(
        &mut self,
        stmt: S,
        params: P,
    ) -> mysql::Result<QueryResult<'_, '_, '_, Binary>>
    where
        S: AsStatement,
        P: Into<Params>,
    {
        self.conn.get().exec_iter(stmt, params)
    }

    fn exec_batch<S, P, I>(&mut self, stmt: S, params: I) -> mysql::Result<()>
    where
        Self: Sized,
        S: AsStatement,
        P: Into<Params>,
        I: IntoIterator<Item = P>,
    {
        self.conn.get().exec_batch(stmt, params)
    }
}

/// Runs `sql`, one statement or several, and reads every result: the first statement that
/// fails is the error (the server runs none after it).
fn run(conn: &mut Conn, sql: &str) -> Result<()> {
    let mut result = conn.query_iter(sql)?;
    while let Some(set) = result.iter() {
        for row in set {
            row?;
        }
    }
    Ok(())
}

/// The statements that start a transaction with `opts`, as `mysql::Conn` would send them,
/// in one string.
fn start_statement(opts: &TxOpts) -> String {
    let mut sql = String::new();
    if let Some(level) = opts.isolation_level() {
        sql.push_str(&format!("SET TRANSACTION ISOLATION LEVEL {level}; "));
    }
    sql.push_str("START TRANSACTION");
    let mut characteristics = Vec::new();
    if opts.with_consistent_snapshot() {
        characteristics.push("WITH CONSISTENT SNAPSHOT");
    }
    match opts.access_mode() {
        Some(AccessMode::ReadOnly) => characteristics.push("READ ONLY"),
        Some(AccessMode::ReadWrite) => characteristics.push("READ WRITE"),
        None => {}
    }
    if !characteristics.is_empty() {
        sql.push(' ');
        sql.push_str(&characteristics.join(", "));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use mysql::IsolationLevel;

    #[test]
    fn default_options_start_a_plain_transaction() {
        assert_eq!(start_statement(&TxOpts::default()), "START TRANSACTION");
    }

    #[test]
    fn options_become_the_statements_mysql_conn_sends() {
        let opts = TxOpts::default()
            .set_isolation_level(Some(IsolationLevel::ReadCommitted))
            .set_with_consistent_snapshot(true)
            .set_access_mode(Some(AccessMode::ReadOnly));
        assert_eq!(
            start_statement(&opts),
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; \
             START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"
        );
        let opts = TxOpts::default().set_access_mode(Some(AccessMode::ReadWrite));
        assert_eq!(start_statement(&opts), "START TRANSACTION READ WRITE");
    }
}
