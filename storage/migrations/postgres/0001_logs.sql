-- Coordinator state on PostgreSQL: the same partitioned logs the embedded
-- engine keeps in segment files, as rows, and the leases that say which
-- coordinator replica may write them.

-- One row per lease. The holder renews expires_at; another replica may take
-- the lease once it has expired (by this server's clock), which bumps the
-- epoch. Every write to the logs below checks, in its own transaction, that
-- the epoch it was opened with is still the current one.
CREATE TABLE IF NOT EXISTS tandem_lease (
    name        text        PRIMARY KEY,
    owner       text        NOT NULL,
    address     text        NOT NULL,
    epoch       bigint      NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- One row per partition of a log ("topics" for the user's topics,
-- "internal" for the coordinator's own state logs).
CREATE TABLE IF NOT EXISTS tandem_partition (
    ns          text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    log_start   bigint  NOT NULL DEFAULT 0,
    next_offset bigint  NOT NULL DEFAULT 0,
    size_bytes  bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (ns, topic, partition)
);

-- The records, one row each, at dense offsets per partition.
CREATE TABLE IF NOT EXISTS tandem_record (
    ns           text    NOT NULL,
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint  NOT NULL,
    id           bytea   NOT NULL,
    key          bytea,
    value        bytea   NOT NULL,
    headers      bytea,
    timestamp_ms bigint  NOT NULL,
    PRIMARY KEY (ns, topic, partition, "offset")
);
