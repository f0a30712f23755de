//! The producer side: adding messages inside the caller's transaction.

use mysql::prelude::Queryable;
use uuid::Uuid;

use crate::error::Result;
use crate::message::{with_ids, Message};
use crate::runtime::Waker;
use crate::store::insert::Insert;
use crate::store::MySqlStore;
use crate::transaction::{Connection, OutboxTransaction};

/// Adds messages to an outbox table inside the caller's MySQL transaction, so that they
/// are published if and only if that transaction commits.
///
/// [`add`](Outbox::add) never opens, commits or rolls back anything itself: it is one
/// INSERT on the caller's transaction. To save that INSERT's round trip, start the
/// transaction with [`start_transaction`](Outbox::start_transaction) instead: its
/// messages are written with the COMMIT ([`OutboxTransaction`]). `Outbox` is cheap to
/// clone and can be shared between threads.
///
/// ```no_run
/// use mysql::prelude::Queryable;
/// # fn main() -> outbox::Result<()> {
/// let pool = mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?;
/// let store = outbox::MySqlStore::new(pool.clone());
/// let outbox = outbox::Outbox::new(&store);
///
/// let mut tx = pool.start_transaction(mysql::TxOpts::default())?;
/// tx.exec_drop("UPDATE accounts SET balance = balance - 10 WHERE id = ?", (7,))?;
/// let id = outbox.add(&mut tx, &outbox::Message::new("accounts", "debited").with_key("7"))?;
/// tx.commit()?;
/// println!("queued {id}");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    store: MySqlStore,
    waker: Option<Waker>,
}

impl Outbox {
    /// An outbox writing to `store`'s table.
    pub fn new(store: &MySqlStore) -> Outbox {
        Outbox {
            store: store.clone(),
            waker: None,
        }
    }

    /// This outbox, with its transactions'
    /// [`commit`](OutboxTransaction::commit) waking a dispatcher (from
    /// [`DispatcherHandle::waker`](crate::DispatcherHandle::waker)) when it wrote messages,
    /// so that they are published at once rather than at the next poll. After
    /// [`add`](Outbox::add) on your own transaction, wake it yourself once it committed.
    pub fn with_waker(mut self, waker: Waker) -> Outbox {
        self.waker = Some(waker);
        self
    }

    /// Validates `message` and inserts it through `tx`. Returns its message id (a UUIDv7),
    /// which consumers see in the [`MESSAGE_ID_HEADER`](crate::MESSAGE_ID_HEADER) header.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`](crate::Error::InvalidMessage) before anything is written;
    /// [`Error::Database`](crate::Error::Database) if the INSERT fails (the transaction is
    /// the caller's to roll back).
    pub fn add(&self, tx: &mut mysql::Transaction<'_>, message: &Message) -> Result<Uuid> {
        let mut ids = self.add_all(tx, std::slice::from_ref(message))?;
        Ok(ids.pop().unwrap_or_else(Uuid::nil))
    }

    /// Starts a transaction on a connection from the store's pool whose messages are
    /// written in the same round trip as its COMMIT; see [`OutboxTransaction`].
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if no connection can be had or the
    /// transaction cannot start.
    pub fn start_transaction(&self, opts: mysql::TxOpts) -> Result<OutboxTransaction<'static>> {
        let conn = self.store.pool().get_conn()?;
        OutboxTransaction::start(
            Connection::Pooled(conn),
            self.store.table(),
            self.waker.clone(),
            opts,
        )
    }

    /// As [`start_transaction`](Outbox::start_transaction), on the caller's connection
    /// (for a pooled one, `pooled.as_mut()`).
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the transaction cannot start.
    pub fn start_transaction_on<'a>(
        &self,
        conn: &'a mut mysql::Conn,
        opts: mysql::TxOpts,
    ) -> Result<OutboxTransaction<'a>> {
        OutboxTransaction::start(
            Connection::Borrowed(conn),
            self.store.table(),
            self.waker.clone(),
            opts,
        )
    }

    /// Validates every message, then inserts them all through `tx` in multi-row INSERTs
    /// (of at most 500 rows and about 4 MiB each).
    /// Returns their message ids in the same order. Within a key, they are published in
    /// this order.
    ///
    /// # Errors
    ///
    /// As [`add`](Outbox::add): if any message is invalid, none is written.
    pub fn add_all(
        &self,
        tx: &mut mysql::Transaction<'_>,
        messages: &[Message],
    ) -> Result<Vec<Uuid>> {
        let rows = with_ids(messages)?;
        let rows: Vec<(Uuid, &Message)> = rows.iter().map(|(id, m)| (*id, m.as_ref())).collect();
        for statement in Insert::statements(self.store.table(), &rows) {
            tx.query_drop(statement)?;
        }
        Ok(rows.into_iter().map(|(id, _)| id).collect())
    }
}
