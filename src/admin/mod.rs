//! What the person on call needs, without reading the schema: how far behind the outbox
//! is and where ([`Admin::status`]), which messages are dead and why
//! ([`Admin::dead`], [`Admin::message`]), and the means to act: [`Admin::replay`],
//! [`Admin::discard`], [`Admin::release_leases`]. The `outbox` command is built on it; a
//! service can serve the same from its own admin endpoints (every type here has a
//! `to_json`, in the shape the command prints with `--json`).
//!
//! Every write is one short transaction that touches only the rows selected, safe while
//! dispatchers run; a selection that matches nothing changes nothing.
//!
//! ```no_run
//! use outbox::admin::{Admin, DeadFilter};
//!
//! # fn main() -> outbox::Result<()> {
//! let pool = mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?;
//! let admin = Admin::new(outbox::MySqlStore::new(pool))?; // checks the table
//! let status = admin.status()?;
//! println!("{} pending, oldest {:?} old", status.total.pending, status.total.lag);
//!
//! // Every dead message of one topic whose error mentions the schema: pending again,
//! // each in its place in its key's order.
//! let filter = DeadFilter {
//!     topic: Some("orders".into()),
//!     error_contains: Some("schema".into()),
//!     ..Default::default()
//! };
//! let would = admin.replay(&filter, true)?; // a dry run: changes nothing
//! let replayed = admin.replay(&filter, false)?;
//! println!("{} of {} replayed", replayed.len(), would.len());
//! # Ok(()) }
//! ```

mod dead;
mod filter;
pub(crate) mod status;

use mysql::prelude::Queryable;

pub use self::dead::{DeadMessage, State, StoredMessage};
pub use self::filter::{DeadFilter, MessageRef, TimeBound};
pub use self::status::{Counts, LeaseHolder, Owner, Status, TopicStatus};
use crate::error::{Error, Result};
use crate::store::MySqlStore;
pub use crate::time::rfc3339;

/// The columns an outbox table has, whatever version made it.
const COLUMNS: [&str; 15] = [
    "id",
    "message_id",
    "topic",
    "msg_key",
    "headers",
    "payload",
    "state",
    "created_on",
    "available_on",
    "locked_by",
    "locked_on",
    "processed_on",
    "last_attempted_on",
    "number_of_attempts",
    "error",
];

/// Reads and operates an outbox table. Cheap to clone; shares the store's connections.
#[derive(Debug, Clone)]
pub struct Admin {
    store: MySqlStore,
}

impl Admin {
    /// An admin over `store`'s table, once it is checked to be an outbox table.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the table does not exist, lacks a column of the outbox, or
    /// was made by an earlier version this crate cannot use; [`Error::Database`] when the
    /// database cannot be reached.
    pub fn new(store: MySqlStore) -> Result<Admin> {
        let table = store.table().to_string();
        let (database, columns) = store.connections().with(|conn| {
            let database: Option<String> = conn.query_first("SELECT DATABASE()")?.flatten();
            let columns: Vec<(String, String)> = conn.exec(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (&table,),
            )?;
            Ok((database, columns))
        })?;
        let Some(database) = database else {
            return Err(Error::config(
                "the connection has no current database: name one in the URL (…:3306/mydb)",
            ));
        };
        if columns.is_empty() {
            return Err(Error::config(format!(
                "there is no table `{table}` in database `{database}` (`outbox migrate` creates it)"
            )));
        }
        let missing: Vec<&str> = COLUMNS
            .iter()
            .copied()
            .filter(|name| !columns.iter().any(|(column, _)| column == name))
            .collect();
        if !missing.is_empty() {
            return Err(Error::config(format!(
                "table `{table}` in database `{database}` is not an outbox table: it has no {}",
                missing.join(", ")
            )));
        }
        let lease_is_number = columns
            .iter()
            .any(|(name, data_type)| name == "locked_by" && data_type == "bigint");
        if !lease_is_number {
            return Err(Error::config(format!(
                "table `{table}` was made by an earlier outbox version (locked_by is not a \
                 number); see sql/outbox.sql"
            )));
        }
        Ok(Admin { store })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        self.store.table()
    }

    fn store(&self) -> &MySqlStore {
        &self.store
    }
}
