//! `OutboxTransaction`: messages written with the COMMIT, on the real MariaDB. A message
//! lands if and only if the transaction commits, whatever fails on the way.

mod common;

use common::*;
use mysql::prelude::Queryable;
use mysql::{AccessMode, TxOpts};
use outbox::uuid::Uuid;
use outbox::{Error, Message, Outbox, OutboxTransaction};

/// A business table next to the outbox table, dropped at the end.
struct Orders {
    table: TestTable,
    name: String,
}

impl Orders {
    fn new() -> Orders {
        let table = TestTable::new("on_commit");
        let name = unique("orders");
        table.exec(&format!(
            "CREATE TABLE `{name}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, total INT NOT NULL)"
        ));
        Orders { table, name }
    }

    fn outbox(&self) -> Outbox {
        Outbox::new(&self.table.store)
    }

    fn insert(&self, tx: &mut impl Queryable, total: i32) {
        tx.exec_drop(
            format!("INSERT INTO `{}` (total) VALUES (?)", self.name),
            (total,),
        )
        .unwrap();
    }

    /// A transaction on a connection from the outbox's pool.
    fn begin(&self) -> OutboxTransaction<'static> {
        self.outbox().start_transaction(TxOpts::default()).unwrap()
    }

    /// A transaction on the caller's connection `conn`.
    fn begin_on<'c>(&self, conn: &'c mut mysql::PooledConn) -> OutboxTransaction<'c> {
        self.outbox()
            .start_transaction_on(conn.as_mut(), TxOpts::default())
            .unwrap()
    }

    /// Order `i` and its event in `tx`; the event's message id.
    fn place(&self, tx: &mut OutboxTransaction<'_>, i: usize) -> Uuid {
        self.insert(tx, i as i32);
        tx.add(&message(i)).unwrap()
    }

    /// Committed business rows, seen from another connection.
    fn committed(&self) -> u64 {
        self.table
            .conn()
            .query_first(format!("SELECT COUNT(*) FROM `{}`", self.name))
            .unwrap()
            .unwrap_or(0)
    }

    /// Committed outbox rows' message ids, in id order.
    fn messages(&self) -> Vec<String> {
        self.table
            .conn()
            .query(format!(
                "SELECT LOWER(HEX(message_id)) FROM `{}` ORDER BY id",
                self.table.name
            ))
            .unwrap()
    }

    fn drop_outbox_table(&self) {
        self.table.exec("DROP TABLE {t}");
    }
}

impl Drop for Orders {
    fn drop(&mut self) {
        let _ = self
            .table
            .conn()
            .query_drop(format!("DROP TABLE IF EXISTS `{}`", self.name));
    }
}

/// Asserts that `conn` holds no open InnoDB transaction (one that wrote would be listed),
/// on MariaDB and MySQL alike.
fn assert_idle(conn: &mut mysql::PooledConn) {
    let open: Option<u64> = conn
        .query_first(
            "SELECT COUNT(*) FROM information_schema.INNODB_TRX \
             WHERE trx_mysql_thread_id = CONNECTION_ID()",
        )
        .unwrap();
    assert_eq!(open, Some(0), "no transaction left open");
}

fn simple_ids(ids: &[Uuid]) -> Vec<String> {
    ids.iter().map(|id| id.simple().to_string()).collect()
}

fn message(i: usize) -> Message {
    Message::new("orders", format!("order {i}")).with_key(format!("k{}", i % 3))
}

#[test]
fn commit_writes_the_business_rows_and_the_messages_together() {
    let orders = Orders::new();
    let mut tx = orders.begin();
    orders.insert(&mut tx, 10);
    let (order_id, inserted) = (tx.last_insert_id(), tx.affected_rows());
    let first = tx.add(&message(1)).unwrap();
    let rest = tx.add_all(&[message(2), message(3)]).unwrap();
    assert_eq!((orders.committed(), orders.messages().len()), (0, 0));
    tx.commit().unwrap();

    assert_eq!(orders.committed(), 1);
    let committed_id: Option<u64> = orders
        .table
        .conn()
        .query_first(format!("SELECT id FROM `{}`", orders.name))
        .unwrap();
    assert_eq!((order_id, inserted), (committed_id, 1));
    let mut ids = vec![first];
    ids.extend(rest);
    assert_eq!(
        orders.messages(),
        simple_ids(&ids),
        "every message, in add order"
    );
}

#[test]
fn on_the_callers_connection_the_connection_stays_usable() {
    let orders = Orders::new();
    let mut conn = orders.table.conn();
    let mut tx = orders.begin_on(&mut conn);
    let id = orders.place(&mut tx, 1);
    tx.commit().unwrap();
    assert_eq!(orders.messages(), simple_ids(&[id]));

    // Out of the transaction: this insert commits on its own.
    orders.insert(&mut conn, 20);
    assert_eq!(orders.committed(), 2);
}

#[test]
fn dropped_or_rolled_back_it_writes_nothing() {
    let orders = Orders::new();
    let mut conn = orders.table.conn();
    let mut tx = orders.begin_on(&mut conn);
    orders.place(&mut tx, 1);
    drop(tx);
    assert_idle(&mut conn);

    let mut tx = orders.begin_on(&mut conn);
    orders.place(&mut tx, 2);
    tx.rollback().unwrap();
    assert_idle(&mut conn);

    let mut tx = orders.begin();
    orders.place(&mut tx, 3);
    drop(tx);

    assert_eq!((orders.committed(), orders.messages().len()), (0, 0));
}

#[test]
fn a_failed_insert_at_commit_commits_nothing() {
    let orders = Orders::new();
    let mut conn = orders.table.conn();
    let mut tx = orders.begin_on(&mut conn);
    orders.place(&mut tx, 1);
    // The transaction has not touched the outbox table yet, so it can go.
    orders.drop_outbox_table();

    let err = tx.commit().unwrap_err();
    assert!(
        matches!(&err, Error::Database(mysql::Error::MySqlError(e)) if e.code == 1146),
        "{err}"
    );
    assert_eq!(
        orders.committed(),
        0,
        "the business row went with the message"
    );
    assert_idle(&mut conn);
}

#[test]
fn a_refused_message_keeps_nothing_and_the_transaction_goes_on() {
    let orders = Orders::new();
    let mut tx = orders.begin();
    let kept = orders.place(&mut tx, 1);
    let bad = Message::new("no spaces in topics", "x");
    assert!(matches!(tx.add(&bad), Err(Error::InvalidMessage(_))));
    assert!(matches!(
        tx.add_all(&[message(2), bad]),
        Err(Error::InvalidMessage(_))
    ));
    tx.commit().unwrap();

    assert_eq!(orders.committed(), 1);
    assert_eq!(
        orders.messages(),
        simple_ids(&[kept]),
        "only the valid message"
    );
}

#[test]
fn large_batches_are_written_in_several_inserts_in_order() {
    let orders = Orders::new();
    let mut conn = orders.table.conn();
    let inserts = |conn: &mut mysql::PooledConn| -> u64 {
        let row: (String, u64) = conn
            .query_first("SHOW SESSION STATUS LIKE 'Com_insert'")
            .unwrap()
            .unwrap();
        row.1
    };
    let inserts_before = inserts(&mut conn);
    let mut tx = orders.begin_on(&mut conn);
    orders.insert(&mut tx, 10);
    // More rows than one INSERT carries, then more bytes than one INSERT carries.
    let small: Vec<Message> = (0..1_201).map(message).collect();
    let mut ids = tx.add_all(&small).unwrap();
    for i in 0..6 {
        ids.push(
            tx.add(&Message::new("big", vec![i as u8; 900_000]))
                .unwrap(),
        );
    }
    assert!(
        orders.messages().is_empty(),
        "rows written early are not committed before the transaction"
    );
    tx.commit().unwrap();
    // The order's INSERT, then the messages': 500 rows, 500 rows, then the last 201 small
    // ones with four of 900 kB (a fifth would pass 4 MiB), then the last two with the
    // COMMIT.
    assert_eq!(inserts(&mut conn) - inserts_before, 1 + 4);

    assert_eq!(orders.messages(), simple_ids(&ids));
    let sizes: Vec<u64> = orders
        .table
        .conn()
        .query(format!(
            "SELECT LENGTH(payload) FROM `{}` WHERE topic = 'big' ORDER BY id",
            orders.table.name
        ))
        .unwrap();
    assert_eq!(sizes, vec![900_000; 6]);
}

#[test]
fn when_writing_early_fails_commit_refuses_and_rolls_back() {
    let orders = Orders::new();
    let mut tx = orders.begin();
    orders.insert(&mut tx, 10);
    let full: Vec<Message> = (0..500).map(message).collect();
    tx.add_all(&full).unwrap();
    orders.drop_outbox_table();
    // The 501st message sends the first 500 on their own, into a missing table.
    assert!(matches!(tx.add(&message(500)), Err(Error::Database(_))));
    assert!(matches!(tx.add(&message(501)), Err(Error::RolledBack)));
    assert!(matches!(tx.commit(), Err(Error::RolledBack)));
    assert_eq!(orders.committed(), 0);
}

#[test]
fn transaction_options_reach_the_server() {
    let orders = Orders::new();
    let opts = TxOpts::default().set_access_mode(Some(AccessMode::ReadOnly));
    let mut tx = orders.outbox().start_transaction(opts).unwrap();
    tx.add(&message(1)).unwrap();
    let err = tx.commit().unwrap_err();
    assert!(
        matches!(&err, Error::Database(mysql::Error::MySqlError(e)) if e.code == 1792),
        "a read-only transaction cannot write its messages: {err}"
    );
    assert!(orders.messages().is_empty());
}

#[test]
fn a_connection_killed_before_commit_is_an_error_and_commits_nothing() {
    let orders = Orders::new();
    let mut tx = orders.begin();
    orders.place(&mut tx, 1);
    let id: Option<u64> = tx.query_first("SELECT CONNECTION_ID()").unwrap();
    orders
        .table
        .conn()
        .query_drop(format!("KILL CONNECTION {}", id.unwrap()))
        .unwrap();

    let err = tx.commit().unwrap_err();
    assert!(matches!(err, Error::Database(_)), "{err}");
    assert!(
        err.is_retryable(),
        "a lost connection is worth another try: {err}"
    );
    assert_eq!((orders.committed(), orders.messages().len()), (0, 0));
}
