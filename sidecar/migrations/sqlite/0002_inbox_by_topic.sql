-- Dedup by (group, topic, id): the same id on two topics is two messages.
-- Rows recorded before this migration have topic '' and still filter
-- redeliveries of their message on any topic.
CREATE TABLE tandem_inbox_v2 (
    consumer_group TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    message_id     TEXT    NOT NULL,
    processed_at   INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER) * 1000),
    PRIMARY KEY (consumer_group, topic, message_id)
);
INSERT INTO tandem_inbox_v2 (consumer_group, topic, message_id, processed_at)
    SELECT consumer_group, '', message_id, processed_at FROM tandem_inbox;
DROP TABLE tandem_inbox;
ALTER TABLE tandem_inbox_v2 RENAME TO tandem_inbox;
CREATE INDEX tandem_inbox_processed_at ON tandem_inbox (processed_at);
