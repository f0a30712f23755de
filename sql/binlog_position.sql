-- Where each outbox table's binlog relay stands, one row per outbox table, in the same
-- database. The relay writes it on the connection that holds its named lock, after the
-- marks of the rows it published, so that a relay that lost the lock writes nothing.
-- `gtid` is the last transaction read, for people; the relay resumes from `file` and
-- `position` only on the server they belong to (`server_id`): after a failover to
-- another server it catches up from the table instead. Server id 0 marks a row written
-- before a first catch-up finished: no position to resume from.
CREATE TABLE IF NOT EXISTS `outbox_binlog_position` (
  outbox_table VARCHAR(64)     NOT NULL,
  file         VARCHAR(512)    NOT NULL,
  position     BIGINT UNSIGNED NOT NULL,
  server_id    INT UNSIGNED    NOT NULL,
  gtid         VARCHAR(1000)   NULL,
  relay        VARCHAR(100)    NOT NULL,
  saved_on     DATETIME(6)     NOT NULL,
  PRIMARY KEY (outbox_table)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
