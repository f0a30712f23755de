-- The inbox: the consumer's side of the outbox. Its three tables share a name: `inbox`
-- (the processed messages), `inbox_dead` and `inbox_offsets`; `Inbox::with_table` names
-- them after another table. Every time is the database's clock in UTC.

-- One row per message a consumer applied, written in the transaction of its effect:
-- the primary key makes a second delivery of the same message a duplicate.
CREATE TABLE IF NOT EXISTS `inbox` (
  consumer        VARCHAR(100)    NOT NULL,
  message_id      BINARY(16)      NOT NULL,
  topic           VARCHAR(249)    NOT NULL,
  kafka_partition INT             NOT NULL,
  kafka_offset    BIGINT          NOT NULL,
  processed_on    DATETIME(6)     NOT NULL,
  PRIMARY KEY (consumer, message_id),
  KEY inbox_retention (consumer, processed_on)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Records whose handler failed `max_attempts` times, kept whole until they are replayed
-- (the consumer runs the handler on them again) or deleted by an operator.
CREATE TABLE IF NOT EXISTS `inbox_dead` (
  id                 BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  consumer           VARCHAR(100)    NOT NULL,
  message_id         BINARY(16)      NOT NULL,
  topic              VARCHAR(249)    NOT NULL,
  kafka_partition    INT             NOT NULL,
  kafka_offset       BIGINT          NOT NULL,
  msg_key            VARBINARY(2048) NULL,
  headers            JSON            NOT NULL,
  payload            LONGBLOB        NOT NULL,
  record_timestamp   BIGINT          NULL,
  error              TEXT            NOT NULL,
  number_of_attempts INT UNSIGNED    NOT NULL,
  died_on            DATETIME(6)     NOT NULL,
  replay_requested_on DATETIME(6)    NULL,
  PRIMARY KEY (id),
  UNIQUE KEY inbox_dead_message (consumer, message_id),
  KEY inbox_dead_replay (consumer, replay_requested_on)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- For partitions assigned explicitly (no consumer group): the next offset to read, written
-- in the transaction of the record before it.
CREATE TABLE IF NOT EXISTS `inbox_offsets` (
  consumer        VARCHAR(100)    NOT NULL,
  topic           VARCHAR(249)    NOT NULL,
  kafka_partition INT             NOT NULL,
  next_offset     BIGINT          NOT NULL,
  updated_on      DATETIME(6)     NOT NULL,
  PRIMARY KEY (consumer, topic, kafka_partition)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
