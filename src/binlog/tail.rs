//! The binlog relay's worker: a session takes the table's lock ([`lock`](super::lock)),
//! finds where to start ([`start`](super::start)), follows the binary log and publishes
//! what it reads ([`follow`](super::follow)), while the settler writes the outcomes
//! ([`settle`](super::settle)). A session that fails ends, and the next one begins.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use super::events::{self, Source};
use super::hold::Held;
use super::image::Columns;
use super::settle::SETTLE_QUEUE;
use super::start::dead_keys;
use super::worker::{Session, Tail};
use crate::broker::Broker;
use crate::error::{Error, Result, Worker};

/// Rows of keys held behind a failed publish kept in memory, in batches (at least as
/// many rows): past it, they are read back from the table.
const HELD_PER_BATCH: usize = 16;

/// Longest pause between two sessions that failed.
const SESSION_RETRY_MAX: Duration = Duration::from_secs(5);

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

    fn session(&self, broker: &mut impl Broker) -> Result<()> {
        let Some((mut lock, fence)) = self.acquire()? else {
            return Ok(());
        };
        let fence = Arc::new(fence);
        let table = self.store.table().to_string();
        let columns = Columns::read(&mut lock, &table)?;
        let blocked = if self.settings.dead_blocks_key {
            dead_keys(&mut lock, &table)?
        } else {
            HashSet::new()
        };
        let Some((at, verify_below)) = self.start(broker, &mut lock, &fence, &table)? else {
            return Ok(());
        };
        let (schedule, clock_offset) = self.scheduled_rows(&mut lock, &table)?;
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
        // Set when the session ends: the reader stops at its next event, a heartbeat at
        // the latest, and the scope joins it, so that no reader outlives its session.
        let quit = AtomicBool::new(false);
        let read_through = at.clone();
        thread::scope(|scope| {
            let reader = self.signals.clone();
            let quit = &quit;
            thread::Builder::new()
                .name("outbox-binlog-reader".into())
                .spawn_scoped(scope, move || {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        events::read(source, at, to_relay, quit, &reader)
                    }));
                    if let Err(panic) = outcome {
                        reader.panicked(
                            Worker::BinlogReader,
                            crate::runtime::signal::panic_text(&*panic),
                        );
                    }
                })
                .map_err(Error::Thread)?;
            let (settler, settles) = bounded(SETTLE_QUEUE);
            let settler_fence = fence.clone();
            let settling = thread::Builder::new()
                .name("outbox-binlog-settler".into())
                .spawn_scoped(scope, move || self.settle(lock, settles, &settler_fence))
                .map_err(Error::Thread);
            let settling = match settling {
                Ok(settling) => settling,
                Err(e) => {
                    quit.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            };
            let mut session = Session {
                settler,
                batch: Vec::new(),
                commit: None,
                foreign: false,
                last_save: Instant::now(),
                verify_below,
                blocked,
                ahead: Default::default(),
                fence,
                schedule,
                clock_offset,
                held: Held::new(self.settings.batch_size.max(HELD_PER_BATCH) * HELD_PER_BATCH),
                read_through,
                batch_pin: None,
                batch_since: Instant::now(),
                sweep: Default::default(),
            };
            let followed = self.follow(broker, &mut session, &changes);
            quit.store(true, Ordering::SeqCst);
            drop(changes);
            drop(session);
            let settled = match settling.join() {
                Ok(settled) => settled,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            // The settler's own error explains a queue that closed under the tail.
            settled.and(followed)
        })
    }
}
