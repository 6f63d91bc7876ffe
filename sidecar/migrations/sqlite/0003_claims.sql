-- SIDECAR dedup mode: a message being handled is claimed first, so two
-- sidecars of a group never hand one message to the app at once (a
-- partition moving while its old holder still runs the handler, or one id on
-- two partitions). A claim expires, so a dead holder's claim is taken over.
CREATE TABLE tandem_claim (
    consumer_group TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    message_id     TEXT    NOT NULL,
    owner          TEXT    NOT NULL,
    expires_at     INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic, message_id)
);
