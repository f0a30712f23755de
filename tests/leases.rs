//! Leases: a claim whose answer is lost leaves nothing leased, and a server that would
//! refuse every claim is refused at start.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::private_db::PrivateDatabase;
use common::*;
use mysql::prelude::Queryable;
use mysql::TxOpts;
use outbox::admin::{Admin, Owner};
use outbox::{Dispatcher, Error, Message, MySqlStore, Store};

/// A TCP proxy to the test database that, when armed, lets the next `COMMIT` reach the
/// server and then cuts the connection before the server's answer comes back: the
/// client cannot tell whether its transaction committed.
struct CommitCutter {
    port: u16,
    armed: Arc<AtomicBool>,
}

impl CommitCutter {
    fn start() -> CommitCutter {
        let url = mysql::Opts::from_url(&database_url()).unwrap();
        let upstream = format!("{}:{}", url.get_ip_or_hostname(), url.get_tcp_port());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let armed_in = armed.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let armed = armed_in.clone();
                let (client_in, server_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || forward_requests(client_in, server_out, armed));
                thread::spawn(move || copy(server, client));
            }
        });
        CommitCutter { port, armed }
    }

    fn url(&self) -> String {
        let opts = mysql::Opts::from_url(&database_url()).unwrap();
        let user = opts.get_user().unwrap_or("root");
        let db = opts.get_db_name().unwrap_or("test");
        format!(
            "mysql://{user}@127.0.0.1:{}/{db}?pool_min=0&pool_max=4&prefer_socket=false",
            self.port
        )
    }
}

/// Client to server, watching for a `COMMIT` (a COM_QUERY packet) while armed.
fn forward_requests(mut client: TcpStream, mut server: TcpStream, armed: Arc<AtomicBool>) {
    let mut buffer = [0u8; 65536];
    while let Ok(n) = client.read(&mut buffer) {
        if n == 0 {
            break;
        }
        let chunk = &buffer[..n];
        let commit = chunk.windows(7).any(|w| w == b"\x03COMMIT");
        if commit && armed.swap(false, Ordering::SeqCst) {
            // The client hears nothing more; the server gets the COMMIT and runs it.
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.write_all(chunk);
            thread::sleep(Duration::from_millis(300));
            let _ = server.shutdown(Shutdown::Both);
            return;
        }
        if server.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn a_claim_whose_commit_answer_was_lost_leaves_no_row_leased_to_nobody() {
    let table = TestTable::new("orphans");
    let messages: Vec<Message> = (0..10)
        .map(|i| Message::new("t", format!("m{i}")))
        .collect();
    table.commit(&messages);

    let cutter = CommitCutter::start();
    let pool = mysql::Pool::new(cutter.url().as_str()).unwrap();
    let store = MySqlStore::with_table(pool, &table.name).unwrap();
    cutter.armed.store(true, Ordering::SeqCst);
    let lost = store.claim("lost#1", 100, false);
    assert!(lost.is_err(), "the claim's answer was cut: {lost:?}");
    assert!(lost.unwrap_err().is_retryable());
    // The proxy hangs up on the client first, then hands the COMMIT to the server.
    assert!(
        wait_for(Duration::from_secs(5), || table.count("locked_by <> 0")
            == 10),
        "its COMMIT reached the server: the rows are leased"
    );

    let retried = store.claim("lost#1", 100, false).unwrap();
    assert_eq!(
        retried.records.len(),
        10,
        "the next claim released what the lost one took, and took it"
    );
    assert_eq!(
        table.count(&format!("locked_by = {}", retried.lease)),
        10,
        "every row is held by the claim that knows it"
    );
}

#[test]
fn a_server_that_would_refuse_every_claim_is_refused_at_start() {
    let mut database = PrivateDatabase::new();
    database.options = vec![
        "--server-id=1".into(),
        "--log-bin=binlog".into(),
        "--binlog-format=STATEMENT".into(),
    ];
    database.start();
    let store = MySqlStore::with_table(
        mysql::Pool::new(database.url().as_str()).unwrap(),
        "statement_outbox",
    )
    .unwrap();
    store.migrate().unwrap();
    let mut tx = store
        .pool()
        .start_transaction(mysql::TxOpts::default())
        .unwrap();
    outbox::Outbox::new(&store)
        .add(&mut tx, &Message::new("t", "p"))
        .unwrap();
    tx.commit().unwrap();
    match store.claim("x#1", 10, false) {
        Err(Error::Database(mysql::Error::MySqlError(e))) => assert_eq!(e.code, 1665),
        other => panic!("a claim fails with error 1665 on such a server: {other:?}"),
    }

    let refused = Dispatcher::new(store, broker(), fast_settings(), "binlog")
        .unwrap()
        .start();
    match refused {
        Err(Error::Config(reason)) => assert!(reason.contains("binlog_format"), "{reason}"),
        other => panic!("expected a Config error, got {other:?}"),
    }

    // The advice given works: the dispatcher's sessions at ROW.
    let opts = mysql::OptsBuilder::from_opts(mysql::Opts::from_url(&database.url()).unwrap())
        .init(vec!["SET SESSION binlog_format = 'ROW'"]);
    let row = MySqlStore::with_table(mysql::Pool::new(opts).unwrap(), "statement_outbox").unwrap();
    row.check().unwrap();
    assert_eq!(row.claim("row#1", 10, false).unwrap().records.len(), 1);
}

/// A relay marks a row whose lease has just run out while the lease cleaner releases it.
/// The mark holds the row, then moves its `state_id` entry; a release that scanned
/// `state_id` with locks held that entry and waited for the row, and one of the two died
/// in a deadlock.
#[test]
fn releasing_an_expired_lease_waits_for_a_mark_of_its_row_without_a_deadlock() {
    a_release_waits_for_a_mark_of_its_row("release_expired", 7, |store| {
        store.release_expired(Duration::from_secs(60))
    });
}

/// The same for an operator's `outbox leases release` of a dispatcher believed gone,
/// while another relay marks one of its rows.
#[test]
fn releasing_an_owners_leases_waits_for_a_mark_of_its_row_without_a_deadlock() {
    let lease = MySqlStore::leases_of("gone#1").start() | 1;
    a_release_waits_for_a_mark_of_its_row("release_owner", lease, |store| {
        Admin::new(store)?.release_leases(Owner::of("gone#1"))
    });
}

/// One pending row leased under `lease` an hour ago is held by a mark in progress while
/// `release` runs: the release waits for it, the mark goes through, and the release then
/// finds the row delivered.
fn a_release_waits_for_a_mark_of_its_row(
    prefix: &str,
    lease: u64,
    release: impl FnOnce(MySqlStore) -> outbox::Result<u64> + Send + 'static,
) {
    let table = TestTable::new(prefix);
    table.commit(&[Message::new("t", "m")]);
    table.exec(&format!(
        "UPDATE {{t}} SET locked_by = {lease}, locked_on = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR"
    ));
    let id: u64 = table
        .conn()
        .query_first(format!("SELECT id FROM `{}`", table.name))
        .unwrap()
        .unwrap();

    let mut marker = table.conn();
    let mut mark = marker.start_transaction(TxOpts::default()).unwrap();
    let held: Option<u64> = mark
        .exec_first(
            format!("SELECT id FROM `{}` WHERE id = ? FOR UPDATE", table.name),
            (id,),
        )
        .unwrap();
    assert_eq!(held, Some(id));

    let store = table.store.clone();
    let release = thread::spawn(move || release(store));
    // Its statement, a second into it: waiting for the row. (MySQL 9.7 does not list an
    // autocommit statement's lock wait in INNODB_TRX.)
    let waiting = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
         WHERE COMMAND <> 'Sleep' AND TIME >= 1 AND INFO LIKE 'UPDATE `{}`%'",
        table.name
    );
    assert!(
        wait_for(Duration::from_secs(10), || table
            .conn()
            .query_first::<u64, _>(&waiting)
            .unwrap()
            == Some(1)),
        "the release waits for the marked row"
    );
    assert!(!release.is_finished());
    let marked = mark.exec_drop(
        format!(
            "UPDATE `{}` SET state = 1, locked_by = 0, processed_on = UTC_TIMESTAMP(6) WHERE id = ?",
            table.name
        ),
        (id,),
    );
    assert!(marked.is_ok(), "the mark goes through: {marked:?}");
    mark.commit().unwrap();

    let released = release.join().unwrap();
    assert_eq!(
        released.unwrap(),
        0,
        "the release goes through, and finds the row delivered, not leased"
    );
    assert_eq!(table.count("state = 1 AND locked_by = 0"), 1);
}
