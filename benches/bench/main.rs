//! `make bench`: the outbox's costs and rates on this machine, against the local MariaDB
//! and broker. Every figure is the median of `BENCH_RUNS` runs (default 3) with its
//! spread; rates are compared only with baselines measured in the same run.
//!
//! - add cost: a business transaction (one INSERT, commit) with and without `Outbox::add`,
//!   with a no-op statement instead (the ceiling of any add that is a statement of its
//!   own), as an `OutboxTransaction` whose add rides on the COMMIT, and with a row of one
//!   value riding on the COMMIT (the ceiling of any add that writes a row); the batch add
//!   (100 messages per transaction);
//! - drain: a backlog of `BENCH_BACKLOG` messages (default 100,000; 200-byte payloads,
//!   3 headers, 1,000 keys) drained by 1 and by 4 dispatchers, and on a single key; by one
//!   dispatcher again with `outbox.strict.key.order` (and a tenth of the hot key's backlog);
//! - raw limits: the same messages produced straight through rdkafka (no database), and
//!   a plain claim-and-mark loop over the same rows (no broker);
//! - latency: commit to broker acknowledgement at a steady 1,000 messages/s, with the
//!   default `process_interval` and with a wake-up after each commit;
//! - memory: peak resident memory of an `outbox relay` process draining the backlog.
//! - metrics: the backlog drained by one `outbox relay` process serving Prometheus
//!   metrics (`--metrics-addr`, its gauges at their default interval) and by one without,
//!   interleaved.
//! - status: `outbox status` (the process, connecting included), `Admin::status` and the
//!   dispatcher's gauge read (`Store::backlog`) on a table of `BENCH_STATUS_ROWS` rows (default 1,000,000: 90 % delivered, 9.9 % pending,
//!   0.1 % dead, over 10 topics).
//!
//! - web: `examples/web_service` under 8 concurrent clients (creates and payments), in
//!   requests per second against the same service with its event writes taken out
//!   (`WEB_WITHOUT_EVENTS=1`), alternating, its dispatcher in the process claiming or
//!   taking what commits hand it (`WEB_HAND_OFF=1`), or a relay apart, or none (events
//!   written, relayed by nobody); and, with events, from each 2xx answer to
//!   the event's arrival at a consumer. For each way of running it, where the CPU went
//!   while the clients ran (the service, a relay apart, the database server, the broker
//!   and the bench's own clients and consumer, read from `/proc`, in ms per request) and
//!   the database's statements per request (`Questions`): the machine is saturated, so
//!   the throughput ratios follow the CPU per request.
//!
//! - binlog: `outbox relay --source binlog` against `outbox relay` (polling), each a process
//!   of its own, on a MariaDB of the benchmark's own with the binary log on
//!   (`BENCH_BINLOG_DATABASE_URL`, which `make bench` starts): commit to acknowledgement at
//!   1,000 messages/s with no wake-up; a backlog of `BENCH_BACKLOG` messages committed while
//!   the relay was stopped, drained, with the server's work per message (`SHOW GLOBAL
//!   STATUS` deltas); statements while nothing is committed for 10 s. Both drains run
//!   again with the database pinned to CPU 0 and the broker and relays to the others
//!   (`taskset`), as when the database has a host of its own. The polling drain
//!   runs on the machine's server too, to compare the two servers. `BENCH_RELAY_LOG` sets
//!   the relay processes' log filter (`outbox::binlog=debug` shows each batch's timings).
//!
//! - inbox: `BENCH_INBOX_RECORDS` records (default 20,000, with message ids) consumed from
//!   the beginning of their topic into MySQL, one row written per record: by an
//!   `InboxConsumer` (id recorded, row written and offset saved in one transaction); by
//!   the same loop written out without the inbox's record (row and offset in one
//!   transaction); and by the raw consumer alone (no database), interleaved.
//!
//! - trace: adds (3,000 transactions of one each) with no span current and with one, in
//!   a build with the feature `opentelemetry`, interleaved; and, when `BENCH_PEER` names
//!   the bench built without it (`make bench` builds and names it), that build's adds,
//!   run in turn with this one's.
//!
//! `BENCH_ONLY=drain,latency` runs only the sections named (add, drain, latency, memory,
//! metrics, status, web, binlog, inbox, trace).

mod add;
mod binlog;
mod common;
mod cpu;
mod drain;
mod inbox;
mod latency;
mod status;
mod trace;
mod web;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Pool, TxOpts};
use outbox::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use outbox::rdkafka::ClientConfig;
use outbox::{
    Broker, Dispatcher, DispatcherSettings, KafkaBroker, Message, MySqlStore, Outbox, Record, Store,
};
use parking_lot::Mutex;

use add::*;
use binlog::*;
use common::*;
use cpu::*;
use drain::*;
use inbox::*;
use latency::*;
use status::*;
use trace::*;
use web::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let runs = env_number("BENCH_RUNS", 3);
    let backlog = env_number("BENCH_BACKLOG", 100_000);
    let hot_backlog = env_number("BENCH_HOT_BACKLOG", backlog);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let section = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let bench = Bench::new()?;
    let mut table = Table::default();

    if only == "adds" {
        return print_adds(&bench);
    }
    if section("add") {
        add_cost(&bench, runs, &mut table)?;
    }
    if section("trace") {
        trace_cost(&bench, runs, &mut table)?;
    }
    if section("drain") {
        drain(&bench, runs, backlog, hot_backlog, &mut table)?;
    }
    if section("latency") {
        latency(&bench, runs, &mut table)?;
    }
    if section("memory") {
        memory(&bench, runs, backlog, &mut table)?;
    }
    if section("metrics") {
        metrics_cost(&bench, runs, backlog, &mut table)?;
    }
    if section("web") {
        web(&bench, runs, &mut table)?;
    }
    if section("status") {
        let rows = env_number("BENCH_STATUS_ROWS", 1_000_000);
        status(&bench, runs, rows, &mut table)?;
    }
    if section("binlog") {
        binlog(&bench, runs, backlog, &mut table)?;
    }
    if section("inbox") {
        inbox(
            &bench,
            runs,
            env_number("BENCH_INBOX_RECORDS", 20_000),
            &mut table,
        )?;
    }
    println!("{}", table.render());
    Ok(())
}
