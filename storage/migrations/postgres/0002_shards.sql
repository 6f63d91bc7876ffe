-- Shards: replicas own topics shard by shard, each under its own lease row.

-- Settings fixed for the database once a replica has used it: `shards`,
-- the number of shards topics are hashed into (changing it would move
-- topics away from their stored data).
CREATE TABLE IF NOT EXISTS tandem_cluster (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Which shard holds each transaction id: an id names one transaction
-- whichever topic (and so shard) it goes to. A row is written before a
-- new transaction is prepared and deleted once its shard has forgotten it.
CREATE TABLE IF NOT EXISTS tandem_txn_claim (
    id         text        PRIMARY KEY,
    shard      integer     NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tandem_txn_claim_age ON tandem_txn_claim (shard, claimed_at);
