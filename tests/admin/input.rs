//! Bad input: exit status 2, one line on standard error, nothing changed.

use super::*;

#[test]
fn bad_input_exits_2_with_one_line_and_changes_nothing() {
    let table = TestTable::new("admin_bad");
    let topic = unique("admin_bad");
    let ids = table.commit(&[too_large(&topic, "k"), Message::new(&topic, "fine")]);
    let handle = table.dispatch(small_message_broker(), settings(1, false), "admin_bad");
    assert!(wait_for(Duration::from_secs(30), || table
        .count("state = 2")
        == 1
        && table.count("state = 1") == 1));
    drop(handle);
    let plain = unique("not_outbox");
    table
        .conn()
        .query_drop(format!(
            "CREATE TABLE `{plain}` (id INT PRIMARY KEY, state INT)"
        ))
        .unwrap();
    let delivered = row_id(&table, &ids[1]).to_string();
    let before = checksum(&table);

    let secret = "hunter2secret";
    let refused = |table: &str, url: Option<&str>, args: &[&str], says: &str| {
        let mut command = Command::new(outbox_command());
        command
            .env(
                "OUTBOX_DATABASE_URL",
                url.map_or_else(small_pool_url, str::to_string),
            )
            .env("OUTBOX_TABLE", table)
            .args(args)
            .stdin(Stdio::null());
        let output = command.output().unwrap();
        let text = printed(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(output.stdout.is_empty(), "{args:?}: {text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(!text.contains(secret), "{args:?}: {text}");
    };
    let t = table.name.as_str();
    refused(t, None, &["dead", "show", "999999"], "no message 999999");
    refused(t, None, &["replay", "--id", "999999"], "no message 999999");
    refused(
        t,
        None,
        &["discard", "--id", &delivered],
        "is delivered, not dead",
    );
    refused(
        t,
        None,
        &["replay", "--id", &ids[0], "--id", "999999"],
        "no message 999999",
    );
    refused(t, None, &["replay", "--id", "12ab"], "neither a row id");
    refused(
        t,
        None,
        &["replay", "--died-after", "yesterday"],
        "neither a time",
    );
    refused(
        t,
        None,
        &["dead", "list", "--key-hex", "zz"],
        "not hexadecimal",
    );
    refused(t, None, &["replay"], "--all for every dead message");
    refused(t, None, &["status", "--max-lag", "soon"], "not a duration");
    refused(
        t,
        None,
        &["leases", "--release", " "],
        "8 hexadecimal digits or a name",
    );
    refused(&plain, None, &["replay", "--all"], "is not an outbox table");
    refused(
        "no_such_table",
        None,
        &["status"],
        "no table `no_such_table`",
    );
    refused("bad-name", None, &["status"], "not a plain identifier");
    let unreachable = format!("mysql://root:{secret}@127.0.0.1:1/test");
    refused(
        t,
        Some(&unreachable),
        &["status"],
        "cannot reach the database",
    );
    let wrong_password = format!("mysql://root:{secret}@127.0.0.1:3306/test");
    refused(
        t,
        Some(&wrong_password),
        &["replay", "--all"],
        "cannot reach the database",
    );
    let bad_url = format!("mysql://root:{secret}@127.0.0.1:3306/test?pool_min=x");
    refused(t, Some(&bad_url), &["status"], "is not a MySQL URL");
    assert_eq!(checksum(&table), before, "nothing changed");
    assert_eq!(table.count("state = 2"), 1);
    table
        .conn()
        .query_drop(format!("DROP TABLE `{plain}`"))
        .unwrap();
}
