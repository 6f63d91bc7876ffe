-- Dedup by (group, topic, id): the same id on two topics is two messages.
-- Rows recorded before this migration have topic '' and still filter
-- redeliveries of their message on any topic.
ALTER TABLE tandem_inbox ADD COLUMN topic TEXT NOT NULL DEFAULT '';
ALTER TABLE tandem_inbox ALTER COLUMN topic DROP DEFAULT;
ALTER TABLE tandem_inbox DROP CONSTRAINT tandem_inbox_pkey;
ALTER TABLE tandem_inbox ADD PRIMARY KEY (consumer_group, topic, message_id);
