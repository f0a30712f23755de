//! The inbox's cleaner thread: processed ids past their retention deleted in chunks.

use crossbeam_channel::{select, tick};
use mysql::PooledConn;

use super::{Inbox, InboxSettings};
use crate::error::Worker;
use crate::metrics::InboxMeter;
use crate::runtime::purge::purge_all;
use crate::runtime::signal::Signals;

/// Deletes processed ids past their retention.
pub(super) struct Cleaner {
    pub inbox: Inbox,
    pub name: String,
    pub meter: InboxMeter,
    pub settings: InboxSettings,
}

impl Cleaner {
    pub fn run(self, signals: Signals) {
        let ticks = tick(self.settings.cleanup_interval);
        let mut conn: Option<PooledConn> = None;
        loop {
            let purged = (|| {
                let conn = match conn.as_mut() {
                    Some(conn) => conn,
                    None => conn.insert(self.inbox.pool().get_conn()?),
                };
                purge_all(&signals, self.settings.cleanup_batch_size, |limit| {
                    self.inbox
                        .purge(conn, &self.name, self.settings.retention, limit)
                })
            })();
            match purged {
                Ok(n) => {
                    if n > 0 {
                        self.meter.deleted(n);
                        log::info!(
                            "inbox {}: deleted {n} processed ids past their retention",
                            self.name
                        );
                    }
                    signals.succeeded(Worker::Cleaner);
                }
                Err(e) => {
                    conn = None;
                    signals.report(e);
                }
            }
            select! {
                recv(signals.stop) -> _ => return,
                recv(ticks) -> _ => {},
            }
        }
    }
}
