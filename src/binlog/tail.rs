//! The binlog relay's worker: takes the table's lock, finds where to start (catching up
//! from the table when it must), follows the binary log and publishes what it reads.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{after, bounded, select, Receiver, RecvTimeoutError, TryRecvError};
use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder, TxOpts};

use super::events::{self, Change, Columns, Source};
use super::position::{self, Position};
use super::server::{self, Server};
use super::BinlogSettings;
use crate::broker::Broker;
use crate::dispatcher::backoff::backoff;
use crate::dispatcher::relay::Relay;
use crate::dispatcher::signal::Signals;
use crate::error::{Error, Result, Worker};
use crate::metrics::Meter;
use crate::record::Record;
use crate::settings::DispatcherSettings;
use crate::store::codec::{decode_record, RECORD_COLUMNS};
use crate::store::mysql::{bury, padded, placeholders, truncate};
use crate::store::MySqlStore;

/// How long a position reached only through other tables' transactions waits before it
/// is saved: saving it costs a write, and only shortens what a restart reads again.
const SAVE_INTERVAL: Duration = Duration::from_secs(10);
/// Longest pause between two sessions that failed.
const SESSION_RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest a position waits to be saved while the settler is busy marking.
const POSITION_INTERVAL: Duration = Duration::from_secs(1);
/// A batch that gathered this many rows without a pause is reading a backlog, and waits
/// up to [`GATHER_GAP`] for each next row before it is published.
const BACKLOG_BATCH: usize = 64;
/// How long a backlog's batch waits for its next row (measured on a 100,000-row drain:
/// a wait of 2 ms halved the produce requests; 0.5 ms gave the fastest drains, about a
/// tenth faster than none).
const GATHER_GAP: Duration = Duration::from_micros(500);
/// Most ids in one marking statement.
const MARK_CHUNK: usize = crate::store::mysql::MAX_ID_LIST;

/// A topic and key whose later messages wait behind a dead one (`dead_blocks_key`).
type Key = (String, Vec<u8>);

pub(crate) struct Tail {
    pub opts: mysql::Opts,
    pub server: Server,
    pub store: Arc<MySqlStore>,
    pub settings: DispatcherSettings,
    pub binlog: BinlogSettings,
    pub owner: String,
    pub signals: Signals,
    pub meter: Meter,
}

/// What the settler writes, in the order the tail sends it, on the connection that
/// holds the lock.
enum Settle {
    /// Rows acknowledged by the broker, to mark delivered, and the position after the
    /// last whole transaction published, to save with them.
    Delivered {
        ids: Vec<u64>,
        commit: Option<(Position, Option<String>)>,
    },
    /// Failed sends: the attempt counted, the error, dead at `max_attempts`.
    Failed(Vec<(Record, String, bool)>),
    /// A position only other tables' transactions moved.
    Position(Position, Option<String>),
    /// Rows that are no message, to make dead with the reason.
    Bury(Vec<(u64, String)>),
}

/// Most writes waiting for the settler: the tail publishes on while the settler marks
/// what was published before, all of it at once.
const SETTLE_QUEUE: usize = 64;

/// What one session keeps between changes.
struct Session {
    /// The settler's queue: every write goes through it, to the lock's connection.
    settler: crossbeam_channel::Sender<Settle>,
    /// Rows read and not yet published, in commit order.
    batch: Vec<Record>,
    /// The end of the last whole transaction read, and its GTID, not yet saved.
    commit: Option<(Position, Option<String>)>,
    /// Whether a transaction since the last save changed anything but the relay's own rows.
    foreign: bool,
    last_save: Instant,
    /// Rows up to this id may have been settled before this session read them (see
    /// [`settled_high`]): their state is read before they are sent.
    verify_below: u64,
    /// Keys held behind a dead message.
    blocked: HashSet<Key>,
}

impl Tail {
    /// Runs sessions until the stop signal: each takes the lock, and ends on an error,
    /// which is reported, and the next one begins after a pause.
    pub fn run(self, mut broker: impl Broker) {
        let mut pause = Duration::from_millis(100);
        while !self.signals.stopped() {
            match self.session(&mut broker) {
                Ok(()) => return,
                Err(e) => {
                    self.signals.report(e);
                    self.signals.pause(pause);
                    pause = (pause * 2).min(SESSION_RETRY_MAX);
                }
            }
        }
    }

    fn lock_name(&self) -> String {
        let name = format!(
            "outbox-binlog:{}.{}",
            self.server.database,
            self.store.table()
        );
        if name.len() <= 64 {
            return name;
        }
        // FNV-1a: the same name from every relay, whatever its build.
        let digest = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("outbox-binlog:{digest:016x}")
    }

    /// A connection of its own that holds the table's named lock; `None` on the stop
    /// signal. A standby waits here.
    fn acquire(&self) -> Result<Option<Conn>> {
        let opts = OptsBuilder::from_opts(self.opts.clone()).tcp_keepalive_time_ms(Some(10_000));
        let mut conn = Conn::new(opts)?;
        // The lock lives as long as this connection: the server must not close it for
        // being idle while nothing is committed.
        conn.query_drop("SET SESSION wait_timeout = 31536000")?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")?;
        // The relay's own writes need no more in the binary log than each row's key and
        // what changed: in full, every mark would log its row's payload twice, for the
        // server to write and send and the reader to read back and skip. The reader needs
        // full images only of inserts and of other sessions' updates.
        if let Err(e) = conn.query_drop("SET SESSION binlog_row_image = 'MINIMAL'") {
            log::info!(
                "binlog relay {}: its marks are logged in full rows, as the user may not \
                 set binlog_row_image for its session ({e})",
                self.owner
            );
        }
        let name = self.lock_name();
        let wait = self.binlog.lock_wait.as_secs_f64();
        let mut told = false;
        loop {
            let got: Option<Option<i64>> =
                conn.exec_first("SELECT GET_LOCK(?, ?)", (&name, wait))?;
            if got.flatten() == Some(1) {
                log::info!(
                    "binlog relay {} is the active relay of {}",
                    self.owner,
                    name
                );
                return Ok(Some(conn));
            }
            if !told {
                log::info!(
                    "binlog relay {} waits as a standby: another holds {name}",
                    self.owner
                );
                told = true;
            }
            if self.signals.stopped() {
                return Ok(None);
            }
        }
    }

    fn session(&self, broker: &mut impl Broker) -> Result<()> {
        let Some(mut lock) = self.acquire()? else {
            return Ok(());
        };
        let table = self.store.table().to_string();
        let columns = Columns::read(&mut lock, &table)?;
        let blocked = if self.settings.dead_blocks_key {
            dead_keys(&mut lock, &table)?
        } else {
            HashSet::new()
        };
        let saved = position::load(&mut lock, &table)?;
        let files = server::files(&mut lock)?;
        let start = match saved {
            Some((at, server)) if server == self.server.server_id && files.contains(&at.file) => {
                log::info!("binlog relay {} resumes at {at}", self.owner);
                let high = settled_high(&mut lock, &table)?;
                (at, high)
            }
            other => {
                match other {
                    Some((at, server)) if server != self.server.server_id => log::warn!(
                        "binlog relay {}: the saved position {at} is on server {server}, not on \
                         this one ({}): after a failover; catching up from the table",
                        self.owner,
                        self.server.server_id
                    ),
                    Some((at, _)) => log::warn!(
                        "binlog relay {}: the saved position {at} is no longer on the server \
                         (purged); catching up from the table",
                        self.owner
                    ),
                    None => log::info!(
                        "binlog relay {}: no saved position; catching up from the table",
                        self.owner
                    ),
                }
                let at = server::current(&mut lock)?;
                let high = max_id(&mut lock, &table)?;
                if !self.catch_up(broker, &mut lock, high)? {
                    return Ok(());
                }
                // The catch-up may have published rows committed after `at`, which the
                // binary log brings again.
                let high = settled_high(&mut lock, &table)?;
                position::save(&mut lock, &table, &at, None, &self.owner)?;
                log::info!("binlog relay {} caught up; follows from {at}", self.owner);
                (at, high)
            }
        };
        let (at, verify_below) = start;
        let source = Source {
            opts: self.opts.clone(),
            server_id: self.binlog.server_id,
            heartbeat: self.binlog.heartbeat,
            mariadb: self.server.mariadb,
            database: self.server.database.clone(),
            table,
            columns,
        };
        let (to_relay, changes) = bounded(self.settings.batch_size.max(64) * 2);
        let reader = self.signals.clone();
        thread::Builder::new()
            .name("outbox-binlog-reader".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    events::read(source, at, to_relay)
                }));
                if let Err(panic) = outcome {
                    reader.panicked(
                        Worker::BinlogReader,
                        crate::dispatcher::signal::panic_text(&*panic),
                    );
                }
            })
            .map_err(Error::Thread)?;
        thread::scope(|scope| {
            let (settler, settles) = bounded(SETTLE_QUEUE);
            let settling = thread::Builder::new()
                .name("outbox-binlog-settler".into())
                .spawn_scoped(scope, move || self.settle(lock, settles))
                .map_err(Error::Thread)?;
            let mut session = Session {
                settler,
                batch: Vec::new(),
                commit: None,
                foreign: false,
                last_save: Instant::now(),
                verify_below,
                blocked,
            };
            let followed = self.follow(broker, &mut session, &changes);
            drop(session);
            let settled = match settling.join() {
                Ok(settled) => settled,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            // The settler's own error explains a queue that closed under the tail.
            settled.and(followed)
        })
    }

    /// Writes what the tail sends, in order, on the lock's connection: a relay that lost
    /// the lock lost that connection, and writes nothing more. Batches that queued up
    /// while the last write ran are marked together. The position after them is saved at
    /// most every [`POSITION_INTERVAL`], and once nothing came for that long: rows marked
    /// past a saved position are looked up, not sent again, by the next session (see
    /// [`settled_high`]). A write that fails is tried again a few times
    /// (a lock wait, a deadlock); then the session ends.
    fn settle(&self, mut lock: Conn, settles: Receiver<Settle>) -> Result<()> {
        let table = self.store.table();
        let mut unsaved: Option<(Position, Option<String>)> = None;
        let mut saved = Instant::now();
        loop {
            let first = match settles.recv_timeout(POSITION_INTERVAL) {
                Ok(first) => first,
                Err(RecvTimeoutError::Timeout) => {
                    // Quiet: the position the last marks reached.
                    if let Some((at, gtid)) = unsaved.take() {
                        self.write(|| {
                            position::save(&mut lock, table, &at, gtid.as_deref(), &self.owner)
                        })?;
                        saved = Instant::now();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut queued = vec![first];
            queued.extend(settles.try_iter().take(SETTLE_QUEUE));
            for settle in coalesce(queued) {
                let marking = Instant::now();
                match settle {
                    Settle::Delivered { ids, commit } => {
                        self.write(|| mark(&mut lock, table, &ids))?;
                        self.meter.stage("mark", marking.elapsed());
                        log::debug!("marked {} in {:?}", ids.len(), marking.elapsed());
                        unsaved = commit.or(unsaved);
                    }
                    Settle::Failed(failures) => {
                        self.write(|| record_failures(&mut lock, table, &failures))?
                    }
                    Settle::Position(at, gtid) => unsaved = Some((at, gtid)),
                    Settle::Bury(corrupt) => self.write(|| bury(&mut lock, table, &corrupt))?,
                }
            }
            if saved.elapsed() >= POSITION_INTERVAL {
                if let Some((at, gtid)) = unsaved.take() {
                    self.write(|| {
                        position::save(&mut lock, table, &at, gtid.as_deref(), &self.owner)
                    })?;
                    saved = Instant::now();
                }
            }
        }
        if let Some((at, gtid)) = unsaved {
            self.write(|| position::save(&mut lock, table, &at, gtid.as_deref(), &self.owner))?;
        }
        Ok(())
    }

    /// Runs a write of the settler, again after a pause when it fails on anything but a
    /// lost connection, up to five times.
    fn write(&self, mut write: impl FnMut() -> Result<()>) -> Result<()> {
        let mut pause = Duration::from_millis(50);
        for _ in 0..5 {
            match write() {
                Err(e) if !matches!(e, Error::Database(mysql::Error::IoError(_))) => {
                    self.signals.report(e);
                    Signals::wait(pause);
                    pause *= 2;
                }
                done => return done,
            }
        }
        write()
    }

    /// Publishes what is pending with the polling relay's claim until nothing is left
    /// that may be sent (rows up to `high`, the newest when the catch-up began). False
    /// on the stop signal.
    fn catch_up(&self, broker: &mut impl Broker, lock: &mut Conn, high: u64) -> Result<bool> {
        let mut relay = Relay {
            store: self.store.clone(),
            settings: self.settings.clone(),
            owner: self.owner.clone(),
            signals: self.signals.clone(),
            held: Default::default(),
            meter: self.meter.clone(),
        };
        let table = self.store.table();
        let blocked_rule = if self.settings.dead_blocks_key {
            format!(
                "AND (o.msg_key IS NULL OR NOT EXISTS (SELECT 1 FROM `{table}` p WHERE \
                 p.topic = o.topic AND p.msg_key = o.msg_key AND p.state = 2 AND p.id < o.id))"
            )
        } else {
            String::new()
        };
        let left = format!(
            "SELECT EXISTS (SELECT 1 FROM `{table}` o WHERE o.state = 0 AND o.id <= ? {blocked_rule})"
        );
        let mut caught = 0;
        loop {
            if self.signals.stopped() {
                return Ok(false);
            }
            let round = relay.round(broker)?;
            caught += round.delivered;
            if round.claimed > 0 {
                continue;
            }
            let more: Option<bool> = lock.exec_first(&left, (high,))?;
            if !more.unwrap_or(false) {
                log::info!(
                    "binlog relay {}: catch-up published {caught} messages",
                    self.owner
                );
                return Ok(true);
            }
            // Rows backing off after a failure, or leased by a relay that died.
            self.signals
                .pause(self.settings.backoff_min.min(Duration::from_secs(1)));
        }
    }

    /// Publishes each change as it comes, in the order of the binary log: rows are
    /// gathered while more are waiting and published as soon as none is, or when a
    /// batch is full.
    fn follow(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        changes: &Receiver<Result<Change>>,
    ) -> Result<()> {
        let gone = events::stream_ended;
        loop {
            let change = match changes.try_recv() {
                Ok(change) => change?,
                Err(TryRecvError::Disconnected) => return Err(gone()),
                Err(TryRecvError::Empty) => {
                    if let Some(change) = self.gather(session, changes)? {
                        change
                    } else {
                        if !self.flush(broker, session)? {
                            return Ok(());
                        }
                        self.signals.succeeded(Worker::Relay);
                        let due = if session.foreign && session.commit.is_some() {
                            SAVE_INTERVAL.saturating_sub(session.last_save.elapsed())
                        } else {
                            Duration::from_secs(3600)
                        };
                        select! {
                            recv(changes) -> change => match change {
                                Ok(change) => change?,
                                Err(_) => return Err(gone()),
                            },
                            recv(self.signals.stop) -> _ => return Ok(()),
                            recv(after(due)) -> _ => continue,
                        }
                    }
                }
            };
            match change {
                Change::Inserted(record) => {
                    if self.held(session, &record) {
                        continue;
                    }
                    session.batch.push(record);
                    if session.batch.len() >= self.settings.batch_size
                        && !self.flush(broker, session)?
                    {
                        return Ok(());
                    }
                }
                Change::Committed { at, gtid, foreign } => {
                    session.commit = Some((at, gtid));
                    session.foreign |= foreign;
                }
                Change::Corrupt { id, reason, key } => {
                    // Its key's later rows wait behind it as behind any dead row.
                    if let Some(key) = key.filter(|_| self.settings.dead_blocks_key) {
                        session.blocked.insert(key);
                    }
                    self.hand_over(session, Settle::Bury(vec![(id, reason)]))?;
                }
                Change::Revived { id, key, replayed } => {
                    if !self.flush(broker, session)?
                        || !self.revive(broker, session, id, key, replayed)?
                    {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The next change, if it comes within [`GATHER_GAP`] while a backlog is read (the
    /// batch holds [`BACKLOG_BATCH`] rows or more and is not full): fuller batches are
    /// fewer produce requests, which cost the broker less. A batch of a few rows, the
    /// steady trickle of commits, does not wait.
    fn gather(
        &self,
        session: &Session,
        changes: &Receiver<Result<Change>>,
    ) -> Result<Option<Change>> {
        let gathered = session.batch.len();
        if gathered < BACKLOG_BATCH || gathered >= self.settings.batch_size {
            return Ok(None);
        }
        match changes.recv_timeout(GATHER_GAP) {
            Ok(change) => change.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(events::stream_ended()),
        }
    }

    /// Whether `record` waits behind a dead message of its key.
    fn held(&self, session: &Session, record: &Record) -> bool {
        let Some(key) = record.message.key() else {
            return false;
        };
        !session.blocked.is_empty()
            && session
                .blocked
                .contains(&(record.message.topic().to_string(), key.to_vec()))
    }

    /// Publishes the batch and hands its rows to the settler, with the position after it;
    /// or hands over a position that only other tables' transactions moved once it is
    /// [`SAVE_INTERVAL`] old. False when the stop signal came during retries (what was
    /// acknowledged is still marked).
    fn flush(&self, broker: &mut impl Broker, session: &mut Session) -> Result<bool> {
        let table = self.store.table();
        if session.batch.is_empty() {
            if session.foreign && session.last_save.elapsed() >= SAVE_INTERVAL {
                if let Some((at, gtid)) = session.commit.take() {
                    self.hand_over(session, Settle::Position(at, gtid))?;
                }
                session.foreign = false;
                session.last_save = Instant::now();
            }
            return Ok(true);
        }
        let mut records = std::mem::take(&mut session.batch);
        if records.iter().any(|r| r.id <= session.verify_below) {
            let below: Vec<u64> = records
                .iter()
                .filter(|r| r.id <= session.verify_below)
                .map(|r| r.id)
                .collect();
            // Padded to a few lengths, so that the connection reuses its prepared statements.
            let ids = padded(&below);
            // Reads need no lock: any connection of the pool.
            let pending: HashSet<u64> = self
                .store
                .pool()
                .get_conn()?
                .exec::<u64, _, _>(
                    format!(
                        "SELECT id FROM `{table}` WHERE state = 0 AND id IN ({})",
                        placeholders(ids.len())
                    ),
                    ids,
                )?
                .into_iter()
                .collect();
            records.retain(|r| r.id > session.verify_below || pending.contains(&r.id));
        }
        let started = Instant::now();
        let (delivered, finished) = self.publish(broker, session, records)?;
        let published = Instant::now();
        self.meter.stage("publish", published - started);
        self.meter.settled(
            delivered.iter(),
            SystemTime::now(),
            std::iter::empty(),
            std::iter::empty(),
        );
        let commit = if finished {
            session.commit.take()
        } else {
            None
        };
        if commit.is_some() {
            session.foreign = false;
            session.last_save = Instant::now();
        }
        let ids: Vec<u64> = delivered.iter().map(|r| r.id).collect();
        let count = ids.len();
        self.hand_over(session, Settle::Delivered { ids, commit })?;
        log::debug!(
            "published {count} in {:?}, handed over in {:?}",
            published - started,
            published.elapsed()
        );
        Ok(finished)
    }

    /// Queues a write for the settler; an error when the settler has ended (its error
    /// is the session's).
    fn hand_over(&self, session: &Session, settle: Settle) -> Result<()> {
        session
            .settler
            .send(settle)
            .map_err(|_| Error::Refused("the binlog relay's settler ended".into()))
    }

    /// Publishes `records` until each is acknowledged or dead, retrying failures after a
    /// backoff, a key's later records behind its failed one. Returns the acknowledged
    /// records, and false if the stop signal cut the retries short.
    fn publish(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        mut pending: Vec<Record>,
    ) -> Result<(Vec<Record>, bool)> {
        let mut delivered = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let mut outcomes = broker.publish(&pending);
            outcomes.resize_with(pending.len(), || {
                Err(Error::Broker("the broker returned no outcome".into()))
            });
            let mut retry = Vec::new();
            let mut failed_keys = HashSet::new();
            let mut failures: Vec<(Record, String, bool)> = Vec::new();
            let mut first_error = None;
            for (mut record, outcome) in pending.into_iter().zip(outcomes) {
                let key = record
                    .message
                    .order_key()
                    .map(|(topic, key)| (topic.to_string(), key.to_vec()));
                let behind = key.as_ref().is_some_and(|k| failed_keys.contains(k));
                match outcome {
                    Ok(()) => {
                        if behind {
                            log::error!(
                                "message {} was acknowledged after an earlier message of its key \
                                 failed: that key's order is broken in Kafka",
                                record.message_id
                            );
                        }
                        delivered.push(record);
                    }
                    Err(_) if behind => retry.push(record),
                    Err(Error::NotSent(_)) => {
                        failed_keys.extend(key);
                        retry.push(record);
                    }
                    Err(e) => {
                        failed_keys.extend(key);
                        record.attempts = record.attempts.saturating_add(1);
                        let dead = self
                            .settings
                            .max_attempts
                            .is_some_and(|max| record.attempts >= max);
                        failures.push((record.clone(), e.to_string(), dead));
                        if dead {
                            log::error!(
                                "message {} (row {}) is dead after {} attempts: {e}",
                                record.message_id,
                                record.id,
                                record.attempts
                            );
                            if self.settings.dead_blocks_key {
                                if let Some(k) = record.message.key() {
                                    session
                                        .blocked
                                        .insert((record.message.topic().to_string(), k.to_vec()));
                                }
                            }
                        } else {
                            retry.push(record);
                        }
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                self.signals.report(e);
            }
            if !failures.is_empty() {
                let failed: Vec<&Record> = failures.iter().map(|(r, ..)| r).collect();
                let dead: Vec<&Record> = failures.iter().filter(|f| f.2).map(|(r, ..)| r).collect();
                self.meter
                    .settled(std::iter::empty(), SystemTime::now(), failed, dead);
                self.hand_over(session, Settle::Failed(failures))?;
            }
            // Behind a message that just died: later rows of its key stay pending.
            retry.retain(|record| !self.held(session, record));
            pending = retry;
            if let Some(most) = pending.iter().map(|r| r.attempts).max() {
                let wait = backoff(
                    most.max(1),
                    self.settings.backoff_min,
                    self.settings.backoff_max,
                );
                self.signals.pause(wait);
                if self.signals.stopped() {
                    return Ok((delivered, false));
                }
            }
        }
        Ok((delivered, true))
    }

    /// A dead row `id` an operator replayed (`replayed`, its record) or discarded:
    /// publishes the replayed one and, when its key was held behind it and no other dead
    /// row of the key is left, the key's pending rows in id order.
    fn revive(
        &self,
        broker: &mut impl Broker,
        session: &mut Session,
        id: u64,
        key: Option<Key>,
        replayed: Option<Record>,
    ) -> Result<bool> {
        let table = self.store.table();
        let mut records: Vec<Record> = replayed.into_iter().collect();
        if let Some(entry) = key.filter(|entry| session.blocked.contains(entry)) {
            let (topic, key) = &entry;
            let dead_left: Option<bool> = self.store.pool().get_conn()?.exec_first(
                format!(
                    "SELECT EXISTS (SELECT 1 FROM `{table}` WHERE topic = ? AND msg_key = ? \
                     AND state = 2)"
                ),
                (topic, key),
            )?;
            if !dead_left.unwrap_or(true) {
                let rows: Vec<mysql::Row> = self.store.pool().get_conn()?.exec(
                    format!(
                        "SELECT {RECORD_COLUMNS} FROM `{table}` o WHERE o.topic = ? AND \
                         o.msg_key = ? AND o.state = 0 AND o.locked_by = 0 AND o.id <> ? \
                         ORDER BY o.id"
                    ),
                    (topic, key, id),
                )?;
                session.blocked.remove(&entry);
                let mut corrupt = Vec::new();
                for row in rows {
                    match decode_record(row) {
                        Ok(record) => records.push(record),
                        Err(Error::CorruptRow { id, reason }) => corrupt.push((id, reason)),
                        Err(e) => return Err(e),
                    }
                }
                if !corrupt.is_empty() {
                    // Dead again, and holding the key back again, at the first of them:
                    // only the rows before it go.
                    let first = corrupt.iter().map(|(id, _)| *id).min().unwrap_or(0);
                    records.retain(|r| r.id < first);
                    session.blocked.insert(entry.clone());
                    self.hand_over(session, Settle::Bury(corrupt))?;
                }
                // Rows of this key the binary log brings later were read here already.
                let newest = records.iter().map(|r| r.id).max().unwrap_or(0);
                session.verify_below = session.verify_below.max(newest);
            }
        }
        records.sort_by_key(|r| r.id);
        if records.is_empty() {
            return Ok(true);
        }
        session.batch = records;
        self.flush(broker, session)
    }
}

/// Writes in the order given, with each run of consecutive [`Settle::Delivered`] made one:
/// their ids together and the last position among them.
fn coalesce(queued: Vec<Settle>) -> Vec<Settle> {
    let mut out: Vec<Settle> = Vec::with_capacity(queued.len());
    for settle in queued {
        match (out.last_mut(), settle) {
            (
                Some(Settle::Delivered { ids, commit }),
                Settle::Delivered {
                    ids: more,
                    commit: later,
                },
            ) => {
                ids.extend(more);
                if later.is_some() {
                    *commit = later;
                }
            }
            (_, settle) => out.push(settle),
        }
    }
    out
}

/// Marks `ids` delivered, by primary key only (the lock's connection reads in READ
/// COMMITTED: the rows of transactions still open, writers' new rows, are neither scanned
/// nor waited for).
fn mark(lock: &mut Conn, table: &str, ids: &[u64]) -> Result<()> {
    // Padded to a few lengths, so that the connection reuses its prepared statements.
    for chunk in ids.chunks(MARK_CHUNK) {
        let params = padded(chunk);
        lock.exec_drop(
            format!(
                "UPDATE `{table}` FORCE INDEX (PRIMARY) SET state = 1, \
                 processed_on = UTC_TIMESTAMP(6), last_attempted_on = UTC_TIMESTAMP(6), number_of_attempts = number_of_attempts + 1 \
                 WHERE state = 0 AND locked_by = 0 AND id IN ({})",
                placeholders(params.len())
            ),
            params,
        )?;
    }
    Ok(())
}

/// Writes failed attempts: the count, the error, and dead at `max_attempts`.
fn record_failures(
    lock: &mut Conn,
    table: &str,
    failures: &[(Record, String, bool)],
) -> Result<()> {
    let mut tx = lock.start_transaction(TxOpts::default())?;
    for (record, error, dead) in failures {
        let state = if *dead { 2 } else { 0 };
        tx.exec_drop(
            format!(
                "UPDATE `{table}` SET number_of_attempts = ?, error = ?, \
                 last_attempted_on = UTC_TIMESTAMP(6), state = ?, \
                 processed_on = IF(? = 2, UTC_TIMESTAMP(6), processed_on) \
                 WHERE id = ? AND state = 0 AND locked_by = 0"
            ),
            (record.attempts, truncate(error), state, state, record.id),
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The keys of the table's dead rows.
fn dead_keys(conn: &mut Conn, table: &str) -> Result<HashSet<Key>> {
    let rows: Vec<(String, Vec<u8>)> = conn.query(format!(
        "SELECT DISTINCT topic, msg_key FROM `{table}` WHERE state = 2 AND msg_key IS NOT NULL"
    ))?;
    Ok(rows.into_iter().collect())
}

/// The newest id of a row no longer pending (delivered, dead or discarded), 0 when there
/// is none: rows the binary log brings up to it may have been settled already (by a
/// catch-up, a polling relay, or a relay that died between a mark and the position
/// after it), and are looked up before they are sent. Each state's newest id is one
/// index lookup.
fn settled_high(conn: &mut Conn, table: &str) -> Result<u64> {
    let newest =
        |state: u8| format!("COALESCE((SELECT MAX(id) FROM `{table}` WHERE state = {state}), 0)");
    let id: Option<u64> = conn.query_first(format!(
        "SELECT GREATEST({}, {}, {})",
        newest(1),
        newest(2),
        newest(3)
    ))?;
    Ok(id.unwrap_or(0))
}

/// The table's newest id, 0 when it is empty.
fn max_id(conn: &mut Conn, table: &str) -> Result<u64> {
    let id: Option<Option<u64>> = conn.query_first(format!("SELECT MAX(id) FROM `{table}`"))?;
    Ok(id.flatten().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(ids: &[u64], at: Option<u64>) -> Settle {
        Settle::Delivered {
            ids: ids.to_vec(),
            commit: at.map(|offset| {
                (
                    Position {
                        file: "b.000001".into(),
                        offset,
                    },
                    None,
                )
            }),
        }
    }

    #[test]
    fn consecutive_marks_become_one_with_the_last_position_and_other_writes_keep_their_place() {
        let position = |offset| Position {
            file: "b.000001".into(),
            offset,
        };
        let queued = vec![
            delivered(&[1, 2], Some(10)),
            delivered(&[3], None),
            Settle::Position(position(20), None),
            delivered(&[4], Some(30)),
            delivered(&[5], Some(40)),
        ];
        let out = coalesce(queued);
        assert_eq!(out.len(), 3);
        match &out[0] {
            Settle::Delivered { ids, commit } => {
                assert_eq!(ids, &[1, 2, 3]);
                assert_eq!(
                    commit.as_ref().map(|c| c.0.offset),
                    Some(10),
                    "a run without a later position keeps its own"
                );
            }
            _ => panic!("marks first"),
        }
        assert!(matches!(&out[1], Settle::Position(p, _) if p.offset == 20));
        match &out[2] {
            Settle::Delivered { ids, commit } => {
                assert_eq!(ids, &[4, 5]);
                assert_eq!(commit.as_ref().map(|c| c.0.offset), Some(40));
            }
            _ => panic!("marks last"),
        }
    }
}
