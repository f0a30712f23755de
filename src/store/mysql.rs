//! [`Store`] on MySQL 8.0+ and MariaDB 10.6+, through a `mysql::Pool`.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{IsolationLevel, Params, Pool, PooledConn, Row, TxOpts, Value};
use parking_lot::Mutex;
use uuid::Uuid;

use super::claim::{keep_unbroken, Candidate};
use super::codec::{decode_record, RECORD_COLUMNS};
use super::connections::Connections;
use super::handed::{read_handed, Handed};
use super::scan::{choose, Chosen};
use super::sql::{
    bury, fnv1a, micros, padded, placeholders, release_leased, truncate, validate_table_name, DEAD,
    DELIVERED, DISCARDED, MAX_ID_LIST, MAX_TABLE_NAME_LEN, PENDING,
};
use super::{Claim, Failure, Store};
use crate::error::{Error, Result};
use crate::metrics::Backlog;

/// The schema, with `outbox` as the table name.
const SCHEMA: &str = include_str!("../../sql/outbox.sql");

/// The low bits of a lease that number an owner's claims.
const CLAIM_BITS: u64 = 0xffff_ffff;

/// An outbox table in MySQL or MariaDB. Cheap to clone: clones share the pool.
///
/// ```no_run
/// # fn main() -> outbox::Result<()> {
/// let pool = mysql::Pool::new("mysql://root@127.0.0.1:3306/test")?;
/// let store = outbox::MySqlStore::with_table(pool, "billing_outbox")?;
/// store.migrate()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MySqlStore {
    conns: Arc<Connections>,
    table: Arc<str>,
    /// Numbers the claims, for their leases.
    claims: Arc<AtomicU32>,
    /// Leases of claims that failed after they may have committed (the COMMIT's answer
    /// was lost with the connection): their rows, if any, are released before the next
    /// claim.
    orphans: Arc<Mutex<Vec<u64>>>,
    /// Where the claims' sweep past the oldest pending rows goes on from (0: from the
    /// start).
    sweep: Arc<Mutex<u64>>,
    /// The last claim or probe found no pending row: the next claim first asks, in one
    /// statement, whether any row is pending, so that an idle relay costs the database a
    /// statement per poll instead of a transaction.
    none_pending: Arc<AtomicBool>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// A store on the table `outbox`.
    pub fn new(pool: Pool) -> MySqlStore {
        MySqlStore {
            conns: Arc::new(Connections::new(pool)),
            table: Arc::from("outbox"),
            claims: Arc::default(),
            orphans: Arc::default(),
            sweep: Arc::default(),
            none_pending: Arc::default(),
        }
    }

    /// A store on the table `table`: 1 to 64 characters of `A-Z a-z 0-9 _`, not starting
    /// with a digit.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for any other name; nothing reaches the database.
    pub fn with_table(pool: Pool, table: &str) -> Result<MySqlStore> {
        validate_table_name(table, MAX_TABLE_NAME_LEN)?;
        Ok(MySqlStore {
            table: Arc::from(table),
            ..MySqlStore::new(pool)
        })
    }

    /// The leases `owner`'s claims write to `locked_by` (0 means no lease): the high 32
    /// bits are the owner's (of its 64-bit FNV-1a hash, never 0), the low 32 bits number
    /// its claims. So rows leased by an owner are `locked_by BETWEEN start AND end`, and
    /// every claim fences its own rows. A number rather than a name keeps the column fixed
    /// in width, so that taking and ending a lease rewrite the row in place.
    pub fn leases_of(owner: &str) -> RangeInclusive<u64> {
        let hash = fnv1a(owner.as_bytes());
        let high = (hash & !CLAIM_BITS).max(CLAIM_BITS + 1);
        high..=high | CLAIM_BITS
    }

    /// A lease no other claim of `owner` holds (until 2^32 claims later).
    fn next_lease(&self, owner: &str) -> u64 {
        let number = self.claims.fetch_add(1, Ordering::Relaxed);
        Self::leases_of(owner).start() | u64::from(number)
    }

    /// Releases the rows of claims that may have committed without their claimer
    /// knowing. Each is forgotten once its release committed.
    fn release_orphans(&self, conn: &mut PooledConn) -> Result<()> {
        let orphans = self.orphans.lock().clone();
        if orphans.is_empty() {
            return Ok(());
        }
        let condition = format!("locked_by IN ({})", placeholders(orphans.len()));
        let leases: Vec<Value> = orphans.iter().map(|&lease| Value::from(lease)).collect();
        let released = release_leased(conn, &self.table, &condition, &leases)?;
        if released > 0 {
            log::warn!(
                "released {released} rows of claims whose outcome was lost with their connection"
            );
        }
        self.orphans.lock().retain(|lease| !orphans.contains(lease));
        Ok(())
    }

    /// Whether any row is pending, read through the `(state, id)` index in one statement
    /// (its first entry at most); remembered for the next claim.
    fn any_pending(&self, conn: &mut PooledConn) -> Result<bool> {
        let any: Option<bool> = conn.query_first(format!(
            "SELECT EXISTS (SELECT 1 FROM `{}` FORCE INDEX (state_id) WHERE state = {PENDING})",
            self.table
        ))?;
        let any = any.unwrap_or(true);
        self.none_pending.store(!any, Ordering::Relaxed);
        Ok(any)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The pool this store draws its connections from.
    pub fn pool(&self) -> &Pool {
        self.conns.pool()
    }

    /// The connections the store keeps, for the admin API.
    pub(crate) fn connections(&self) -> &Connections {
        &self.conns
    }

    /// Creates the table and its indexes if they do not exist (`sql/outbox.sql`), and
    /// brings the time defaults of a table made by an earlier version to UTC. Safe to call
    /// on every start, from several processes at once.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if a statement fails;
    /// [`Error::Config`] if the table exists with the layout of an earlier version
    /// (`locked_by` not a number), which this store cannot use.
    pub fn migrate(&self) -> Result<()> {
        let ddl = SCHEMA.replacen("`outbox`", &format!("`{}`", self.table), 1);
        self.conns.with(|conn| {
            conn.query_drop(&ddl)?;
            let columns: Vec<(String, String, Option<String>)> = conn.exec(
                "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_DEFAULT FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (&*self.table,),
            )?;
            let lease_type = columns
                .iter()
                .find(|(name, ..)| name == "locked_by")
                .map(|(_, data_type, _)| data_type.as_str());
            if lease_type != Some("bigint") {
                return Err(Error::config(format!(
                    "table `{}` exists with another layout (locked_by is {lease_type:?}, not \
                     bigint): it was made by an earlier outbox version; see sql/outbox.sql",
                    self.table
                )));
            }
            // Defaults that follow the session's time zone (CURRENT_TIMESTAMP): the add
            // writes both times itself, and rows written by hand should agree with it.
            for (name, _, default) in &columns {
                let local = default
                    .as_deref()
                    .is_some_and(|d| d.to_ascii_lowercase().contains("current_timestamp"));
                if local && (name == "created_on" || name == "available_on") {
                    conn.query_drop(format!(
                        "ALTER TABLE `{}` ALTER COLUMN {name} SET DEFAULT (UTC_TIMESTAMP(6))",
                        self.table
                    ))?;
                }
            }
            Ok(())
        })
    }

    /// Claims under `lease` on `conn`; sets `leasing` once the lease is being written,
    /// after which a failure may hide a committed claim.
    fn claim_on(
        &self,
        conn: &mut PooledConn,
        lease: u64,
        limit: usize,
        dead_blocks_key: bool,
        leasing: &mut bool,
    ) -> Result<Claim> {
        let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::ReadCommitted));
        let mut tx = conn.start_transaction(opts)?;
        let Chosen {
            rows: chosen,
            more,
            none_pending,
        } = choose(&mut tx, &self.table, &self.sweep, limit, dead_blocks_key)?;
        self.none_pending.store(none_pending, Ordering::Relaxed);
        if chosen.is_empty() {
            return Ok(Claim::default());
        }
        // Lock what is still unleased; another claimer may have taken some since.
        let ids = padded(&chosen.iter().map(|c| c.id).collect::<Vec<_>>());
        let rows: Vec<Row> = tx.exec(
            format!(
                "SELECT {RECORD_COLUMNS} FROM `{}` o WHERE o.id IN ({}) AND o.state = {PENDING} \
                 AND o.locked_by = 0 FOR UPDATE SKIP LOCKED",
                self.table,
                placeholders(ids.len())
            ),
            Params::Positional(ids),
        )?;
        let mut corrupt = Vec::new();
        let mut locked = HashMap::with_capacity(rows.len());
        for row in rows {
            match decode_record(row) {
                Ok(record) => {
                    locked.insert(record.id, record);
                }
                Err(Error::CorruptRow { id, reason }) => corrupt.push((id, reason)),
                Err(other) => return Err(other),
            }
        }
        bury(&mut tx, &self.table, &corrupt)?;
        let picked: Vec<&Candidate> = chosen.iter().collect();
        let present: HashSet<u64> = locked.keys().copied().collect();
        let kept = keep_unbroken(&picked, &present);
        if kept.is_empty() {
            tx.commit()?;
            return Ok(Claim::default());
        }
        let ids = padded(&kept);
        let sql = format!(
            "UPDATE `{}` SET locked_by = ?, locked_on = UTC_TIMESTAMP(6) WHERE id IN ({})",
            self.table,
            placeholders(ids.len())
        );
        let mut params = vec![Value::from(lease)];
        params.extend(ids);
        *leasing = true;
        tx.exec_drop(sql, Params::Positional(params))?;
        tx.commit()?;
        Ok(Claim {
            records: kept.iter().filter_map(|id| locked.remove(id)).collect(),
            more,
            lease,
        })
    }

    /// Deletes at most `limit` rows in one of `states` (a list such as `(1, 3)`) that got
    /// there longer ago than `older_than`.
    fn purge(&self, states: &str, older_than: Duration, limit: usize) -> Result<u64> {
        self.read_committed(
            &format!(
                "DELETE FROM `{}` WHERE state IN {states} \
                 AND processed_on < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND LIMIT ?",
                self.table
            ),
            (micros(older_than), limit as u64),
        )
    }

    /// Runs one statement that scans an index range in a READ COMMITTED transaction, so
    /// that it locks only the rows it changes: under REPEATABLE READ its gap locks would
    /// stall (and deadlock with) the application's inserts into the outbox.
    fn read_committed(&self, sql: &str, params: impl Into<Params> + Clone) -> Result<u64> {
        self.conns.with(|conn| {
            let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::ReadCommitted));
            let mut tx = conn.start_transaction(opts)?;
            tx.exec_drop(sql, params.clone())?;
            let changed = tx.affected_rows();
            tx.commit()?;
            Ok(changed)
        })
    }

    /// Runs `sql`, whose last condition is `id IN ({ids})`, over `ids` in chunks, after
    /// the `leading` parameters; returns the rows changed.
    fn update_ids(&self, sql: &str, leading: Vec<Value>, ids: &[u64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.conns.with(|conn| {
            let mut changed = 0;
            for chunk in ids.chunks(MAX_ID_LIST) {
                let chunk = padded(chunk);
                let in_list = placeholders(chunk.len());
                let mut params = leading.clone();
                params.extend(chunk);
                conn.exec_drop(sql.replace("{ids}", &in_list), Params::Positional(params))?;
                changed += conn.affected_rows();
            }
            Ok(changed)
        })
    }
}

impl Store for MySqlStore {
    fn check(&self) -> Result<()> {
        let (log_bin, format): (i64, String) = self
            .conns
            .with(|conn| {
                Ok(conn.query_first(
                    "SELECT CAST(@@GLOBAL.log_bin AS SIGNED), CAST(@@SESSION.binlog_format AS CHAR)",
                )?)
            })?
            .unwrap_or_default();
        if log_bin != 0 && format.eq_ignore_ascii_case("STATEMENT") {
            return Err(Error::config(
                "the server writes its binary log with binlog_format = STATEMENT, under which \
                 every READ COMMITTED transaction fails (error 1665), and the dispatcher's claims \
                 use them: set binlog_format to ROW or MIXED (in the server's configuration, with \
                 SET GLOBAL, or for the dispatcher's connections in its pool's init statements)",
            ));
        }
        Ok(())
    }

    /// Sets `wait_timeout` on the connections the store takes from the pool from now
    /// on; they are reset when given back.
    fn end_idle_sessions_after(&self, idle: Duration) {
        self.conns.end_idle_after(idle);
    }

    fn claim(&self, owner: &str, limit: usize, dead_blocks_key: bool) -> Result<Claim> {
        self.conns.with(|conn| {
            self.release_orphans(conn)?;
            if self.none_pending.load(Ordering::Relaxed) && !self.any_pending(conn)? {
                return Ok(Claim::default());
            }
            let lease = self.next_lease(owner);
            let mut leasing = false;
            let claimed = self.claim_on(conn, lease, limit, dead_blocks_key, &mut leasing);
            if claimed.is_err() && leasing {
                self.orphans.lock().push(lease);
            }
            claimed
        })
    }

    fn mark_delivered(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        let sql = format!(
            "UPDATE `{}` SET state = {DELIVERED}, processed_on = UTC_TIMESTAMP(6), last_attempted_on = UTC_TIMESTAMP(6), \
             number_of_attempts = number_of_attempts + 1, locked_by = 0 \
             WHERE locked_by = ? AND state = {PENDING} AND id IN ({{ids}})",
            self.table
        );
        self.update_ids(&sql, vec![Value::from(lease)], ids)
    }

    fn mark_failed(&self, lease: u64, failures: &[Failure]) -> Result<u64> {
        if failures.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE `{}` SET number_of_attempts = number_of_attempts + 1, error = ?, \
             last_attempted_on = UTC_TIMESTAMP(6), locked_by = 0, \
             available_on = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, state = ?, \
             processed_on = IF(? = {DEAD}, UTC_TIMESTAMP(6), processed_on) \
             WHERE id = ? AND locked_by = ? AND state = {PENDING}",
            self.table
        );
        self.conns.with(|conn| {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let mut changed = 0;
            for failure in failures {
                let state = if failure.dead { DEAD } else { PENDING };
                tx.exec_drop(
                    &sql,
                    (
                        truncate(&failure.error),
                        micros(failure.retry_in),
                        state,
                        state,
                        failure.id,
                        lease,
                    ),
                )?;
                changed += tx.affected_rows();
            }
            tx.commit()?;
            Ok(changed)
        })
    }

    fn release(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        let sql = format!(
            "UPDATE `{}` SET locked_by = 0 \
             WHERE locked_by = ? AND state = {PENDING} AND id IN ({{ids}})",
            self.table
        );
        self.update_ids(&sql, vec![Value::from(lease)], ids)
    }

    fn renew(&self, lease: u64, ids: &[u64]) -> Result<u64> {
        // Rows found by primary key, in id order, as the marks find them.
        let sql = format!(
            "UPDATE `{}` SET locked_on = UTC_TIMESTAMP(6) \
             WHERE locked_by = ? AND state = {PENDING} AND id IN ({{ids}})",
            self.table
        );
        self.update_ids(&sql, vec![Value::from(lease)], ids)
    }

    fn hand_off_table(&self) -> Option<String> {
        Some(self.table.to_string())
    }

    fn hand_off_lease(&self, owner: &str) -> u64 {
        self.next_lease(owner)
    }

    fn take_handed(&self, lease: u64, ids: &[Uuid], dead_blocks_key: bool) -> Result<Claim> {
        if ids.is_empty() {
            return Ok(Claim {
                lease,
                ..Claim::default()
            });
        }
        let Handed { records, refused } = self
            .conns
            .with(|conn| read_handed(conn, &self.table, lease, ids, dead_blocks_key))?;
        if !refused.is_empty() {
            let released = self.release(lease, &refused)?;
            log::debug!("{released} handed rows left to the claims, behind rows held elsewhere");
        }
        Ok(Claim {
            records,
            more: !refused.is_empty(),
            lease,
        })
    }

    fn release_expired(&self, older_than: Duration) -> Result<u64> {
        self.conns.with(|conn| {
            release_leased(
                conn,
                &self.table,
                "locked_on < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND",
                &[Value::from(micros(older_than))],
            )
        })
    }

    /// Deletes delivered rows and discarded ones (dead rows an operator gave up on,
    /// counted from when they were discarded).
    fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.purge(&format!("({DELIVERED}, {DISCARDED})"), older_than, limit)
    }

    fn purge_dead(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.purge(&format!("({DEAD})"), older_than, limit)
    }

    fn backlog(&self) -> Result<Option<Backlog>> {
        self.conns
            .with(|conn| super::backlog::backlog(conn, &self.table))
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_carry_the_owner_in_their_high_bits_and_are_never_zero() {
        // FNV-1a 64 reference values: "a" 0xaf63dc4c8601ec8c, "foobar" 0x85944171f73967e8.
        assert_eq!(
            MySqlStore::leases_of("a"),
            0xaf63_dc4c_0000_0000..=0xaf63_dc4c_ffff_ffff
        );
        assert_eq!(
            *MySqlStore::leases_of("foobar").start(),
            0x8594_4171_0000_0000
        );
        assert_ne!(
            MySqlStore::leases_of("billing#00000001"),
            MySqlStore::leases_of("billing#00000002")
        );
        let store = MySqlStore::new(
            mysql::Pool::new("mysql://127.0.0.1:1/d?pool_min=0&pool_max=1").unwrap(),
        );
        let first = store.next_lease("a");
        let second = store.next_lease("a");
        assert_ne!(first, second, "each claim its own lease");
        assert!(MySqlStore::leases_of("a").contains(&second));
        assert!(*MySqlStore::leases_of("").start() > 0);
    }

    #[test]
    fn schema_names_the_table_once() {
        assert_eq!(SCHEMA.matches("`outbox`").count(), 1);
    }
}
