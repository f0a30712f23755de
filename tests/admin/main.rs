//! The `outbox` command an operator runs, built and run against the real MariaDB and the
//! real broker: status, dead messages, replay, discard, leases, and bad input.

mod blocked;
#[path = "../common/mod.rs"]
mod common;
mod dead;
mod input;
mod status;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mysql::prelude::Queryable;
use outbox::admin::{Admin, Owner};
use outbox::{DispatcherSettings, Message, Store};
use serde_json::Value as Json;

/// `outbox --table <table> <args>` against the tests' database.
fn outbox(table: &str, args: &[&str]) -> Output {
    Command::new(outbox_command())
        .env("OUTBOX_DATABASE_URL", small_pool_url())
        .env("OUTBOX_TABLE", table)
        .env("RUST_LOG", "warn")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The JSON `outbox` prints for `args` (with `--json` added), which must succeed.
fn outbox_json(table: &str, args: &[&str]) -> Json {
    let mut args = args.to_vec();
    args.push("--json");
    let output = outbox(table, &args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?}: {}",
        printed(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}): {}", printed(&output)))
}

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn too_large(topic: &str, key: &str) -> Message {
    Message::new(topic, vec![b'x'; 20_000]).with_key(key)
}

/// The table's checksum: any change to any row changes it.
fn checksum(table: &TestTable) -> u64 {
    let row: Option<(String, Option<u64>)> = table
        .conn()
        .query_first(format!("CHECKSUM TABLE `{}` EXTENDED", table.name))
        .unwrap();
    row.and_then(|(_, sum)| sum).expect("a checksum")
}

/// The row id of the message with this message id.
fn row_id(table: &TestTable, message_id: &str) -> u64 {
    table
        .conn()
        .exec_first(
            format!(
                "SELECT id FROM `{}` WHERE message_id = UNHEX(REPLACE(?, '-', ''))",
                table.name
            ),
            (message_id,),
        )
        .unwrap()
        .unwrap()
}

fn settings(max_attempts: u32, dead_blocks_key: bool) -> DispatcherSettings {
    DispatcherSettings {
        max_attempts: Some(max_attempts),
        dead_blocks_key,
        ..fast_settings()
    }
}

/// A lease a dispatcher with this owner name takes.
fn lease_of(owner: &str) -> u64 {
    *outbox::MySqlStore::leases_of(owner).start() | 1
}
