-- The outbox table, for MySQL 8.0+ and MariaDB 10.6+.
-- MySqlStore::migrate() applies this file with the table name replaced by the configured one.
-- state: 0 pending, 1 delivered, 2 dead, 3 discarded (dead, and given up by an operator).
-- All times are the database's clock in UTC
-- (UTC_TIMESTAMP(6)), whatever the session's time_zone: never NOW() or CURRENT_TIMESTAMP.
-- The columns a dispatcher updates are fixed in width and NOT NULL, so that taking a
-- lease and marking a row rewrite it in place: a row that grows in pages packed by
-- inserts in id order moves or splits its page, at twice the cost (measured). "Never" is
-- 1970-01-01 00:00:00; locked_by is 0 when no dispatcher holds the row, else the lease
-- claim's lease: an owner's leases are MySqlStore::leases_of(owner).
CREATE TABLE IF NOT EXISTS `outbox` (
  id                 BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  message_id         BINARY(16)      NOT NULL,
  topic              VARCHAR(249)    CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  msg_key            VARBINARY(1024) NULL,
  headers            JSON            NULL,
  payload            LONGBLOB        NOT NULL,
  state              TINYINT         NOT NULL DEFAULT 0,
  created_on         DATETIME(6)     NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
  available_on       DATETIME(6)     NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
  locked_by          BIGINT UNSIGNED NOT NULL DEFAULT 0,
  locked_on          DATETIME(6)     NOT NULL DEFAULT '1970-01-01 00:00:00',
  processed_on       DATETIME(6)     NOT NULL DEFAULT '1970-01-01 00:00:00',
  last_attempted_on  DATETIME(6)     NOT NULL DEFAULT '1970-01-01 00:00:00',
  number_of_attempts INT UNSIGNED    NOT NULL DEFAULT 0,
  error              VARCHAR(1000)   NULL,
  PRIMARY KEY (id),
  UNIQUE KEY message_id (message_id),
  -- the claim: pending rows in id order
  KEY state_id (state, id),
  -- per-key order: is an older row of this key still pending?
  KEY key_order (topic, msg_key, state, id),
  -- retention: delivered or dead rows by the time they got there
  KEY state_processed (state, processed_on)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
