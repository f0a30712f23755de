//! `outbox leases`: who holds rows leased, and releasing those of a dispatcher that is gone.

use std::process::ExitCode;

use outbox::admin::{Admin, Owner};
use serde_json::json;

use crate::render::{duration, Table};
use crate::Failure;

#[derive(clap::Args)]
pub struct Args {
    /// Release every row this owner holds, so other dispatchers take them at once: the
    /// owner as this command lists it (8 hexadecimal digits), or the lease owner name a
    /// dispatcher logs and `outbox relay` prints (`name#suffix`). Only for a dispatcher
    /// known to be gone: a live one loses its batches in flight, which may then be
    /// published twice.
    #[arg(long, value_name = "OWNER", value_parser = parse_owner)]
    release: Option<Owner>,
    /// Print JSON: {"leases": [...]}, or {"owner": "...", "released": n} with --release.
    #[arg(long)]
    json: bool,
}

fn parse_owner(text: &str) -> Result<Owner, String> {
    Owner::parse(text).ok_or_else(|| "an owner is 8 hexadecimal digits or a name".to_string())
}

pub fn run(admin: &Admin, args: &Args) -> Result<ExitCode, Failure> {
    if let Some(owner) = args.release {
        let released = admin.release_leases(owner)?;
        if args.json {
            println!(
                "{}",
                json!({ "owner": owner.to_string(), "released": released })
            );
        } else if released == 0 {
            println!("owner {owner} holds no rows; nothing changed");
        } else {
            println!("released {released} rows leased by owner {owner}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let leases = admin.leases()?;
    if args.json {
        let leases: Vec<_> = leases.iter().map(|l| l.to_json()).collect();
        println!("{}", json!({ "leases": leases }));
    } else if leases.is_empty() {
        println!("no leases held");
    } else {
        let mut table = Table::new(&["lease owner", "rows>", "oldest lease", "newest lease"]);
        for holder in &leases {
            table.row(vec![
                holder.owner.to_string(),
                holder.rows.to_string(),
                duration(holder.oldest),
                duration(holder.newest),
            ]);
        }
        println!("{}", table.render());
    }
    Ok(ExitCode::SUCCESS)
}
