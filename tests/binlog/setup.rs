//! The server settings the relay refuses to start without, each with its fix.

use super::*;

fn each_missing_server_setting_is_refused_with_its_fix(server: Server) {
    // The shared server writes no binary log.
    let (_, _, table) = outbox_table(&small_pool_url(), "binlog_off");
    match start_relay(&small_pool_url(), &table, "binlog-off") {
        Err(Error::Config(why)) => assert!(
            why.contains("log_bin") && why.contains("--log-bin"),
            "{why}"
        ),
        other => panic!("expected a refusal naming log_bin, got {other:?}"),
    }
    let _ = mysql::Pool::new(small_pool_url().as_str())
        .unwrap()
        .get_conn()
        .unwrap()
        .query_drop(format!("DROP TABLE IF EXISTS `{table}`"));

    let db = binlog_database(server);
    let url = db.url();
    let (pool, _, table) = outbox_table(&url, "binlog_settings");
    let mut conn = pool.get_conn().unwrap();
    let refused = |setting: &str, fix: &str| match start_relay(&url, &table, "binlog-refused") {
        Err(Error::Config(why)) => {
            assert!(why.contains(setting) && why.contains(fix), "{why}")
        }
        other => panic!("expected a refusal naming {setting}, got {other:?}"),
    };
    conn.query_drop("SET GLOBAL binlog_format = 'MIXED'")
        .unwrap();
    refused("binlog_format", "SET GLOBAL binlog_format = 'ROW'");
    conn.query_drop("SET GLOBAL binlog_format = 'ROW'").unwrap();
    conn.query_drop("SET GLOBAL binlog_row_image = 'MINIMAL'")
        .unwrap();
    refused("binlog_row_image", "SET GLOBAL binlog_row_image = 'FULL'");
    conn.query_drop("SET GLOBAL binlog_row_image = 'FULL'")
        .unwrap();
    let compression = compression(server);
    conn.query_drop(format!("SET GLOBAL {compression} = ON"))
        .unwrap();
    refused(compression, &format!("SET GLOBAL {compression} = OFF"));
    conn.query_drop(format!("SET GLOBAL {compression} = OFF"))
        .unwrap();
    if server == Server::MySql {
        // Commits made visible out of the log's order: MariaDB has no such setting.
        conn.query_drop("SET GLOBAL binlog_order_commits = OFF")
            .unwrap();
        refused(
            "binlog_order_commits",
            "SET GLOBAL binlog_order_commits = ON",
        );
        conn.query_drop("SET GLOBAL binlog_order_commits = ON")
            .unwrap();
    }

    // A user with rights on the tables only, then with REPLICATION SLAVE only.
    conn.query_drop("CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'app'")
        .unwrap();
    conn.query_drop("GRANT ALL ON test.* TO 'app'@'127.0.0.1'")
        .unwrap();
    let app_url = url.replace("root@", "app:app@");
    let refused_for_app = |privilege: &str| match start_relay(&app_url, &table, "binlog-app") {
        Err(Error::Config(why)) => assert!(
            why.contains(privilege) && why.contains("GRANT REPLICATION SLAVE, REPLICATION CLIENT"),
            "{why}"
        ),
        other => panic!("expected a refusal naming {privilege}, got {other:?}"),
    };
    refused_for_app("REPLICATION SLAVE");
    conn.query_drop("GRANT REPLICATION SLAVE ON *.* TO 'app'@'127.0.0.1'")
        .unwrap();
    refused_for_app("REPLICATION CLIENT");
    conn.query_drop("GRANT REPLICATION CLIENT ON *.* TO 'app'@'127.0.0.1'")
        .unwrap();
    let mut relay = start_relay(&app_url, &table, "binlog-app").expect("all granted");
    // And it relays. MySQL does not let this user log its marks with minimal row images
    // (that takes SESSION_VARIABLES_ADMIN): the reader skips them in full.
    let store = MySqlStore::with_table(pool.clone(), &table).unwrap();
    let topic = unique("binlog_app");
    let ids: HashSet<String> = commit(&pool, &store, &keyed(&topic, 0, 20))
        .into_iter()
        .collect();
    assert!(
        delivered(&pool, &table, 20),
        "the granted user's relay publishes"
    );
    let got = consume(&topic, 20, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(
        got.iter().map(Consumed::message_id).collect::<HashSet<_>>(),
        ids
    );
    assert_eq!(got.len(), 20, "each once");
    relay.stop().unwrap();
}

on_both_servers!(each_missing_server_setting_is_refused_with_its_fix,);
