-- Tandem's tables in the application's own PostgreSQL database.

-- Table mode: the app inserts (txn_id) inside its local transaction; the
-- sidecar inserts (txn_id, 'rolled_back') when a check-back finds nothing,
-- so a late local commit fails on the primary key instead of committing a
-- message that was rolled back.
CREATE TABLE IF NOT EXISTS tandem_txn (
    txn_id     TEXT   NOT NULL PRIMARY KEY,
    state      TEXT   NOT NULL DEFAULT 'committed' CHECK (state IN ('committed', 'rolled_back')),
    created_at BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::BIGINT
);

-- Processed messages per consumer group: the dedup table.
CREATE TABLE IF NOT EXISTS tandem_inbox (
    consumer_group TEXT   NOT NULL,
    message_id     TEXT   NOT NULL,
    processed_at   BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::BIGINT,
    PRIMARY KEY (consumer_group, message_id)
);
CREATE INDEX IF NOT EXISTS tandem_inbox_processed_at ON tandem_inbox (processed_at);

-- Subscriptions made through the sidecar API, resumed after a restart.
CREATE TABLE IF NOT EXISTS tandem_subscription (
    topic          TEXT  NOT NULL,
    consumer_group TEXT  NOT NULL,
    spec           BYTEA NOT NULL,
    PRIMARY KEY (topic, consumer_group)
);
