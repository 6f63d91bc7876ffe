-- The saga branch barrier. A participant's app inserts (saga_id, branch,
-- 'action', 'action') in the same transaction as a branch's action, and
-- (saga_id, branch, 'compensation', 'compensation') in the same transaction
-- as its compensation; a conflict means the operation already ran (a
-- duplicate call), so the app does nothing. When a compensation arrives
-- for an action that never committed, the sidecar inserts the action's row
-- itself with origin 'compensation' (a null compensation): the late action,
-- should it still arrive, then conflicts and is refused (hanging).
CREATE TABLE IF NOT EXISTS tandem_barrier (
    saga_id    TEXT   NOT NULL,
    branch     TEXT   NOT NULL,
    op         TEXT   NOT NULL CHECK (op IN ('action', 'compensation')),
    origin     TEXT   NOT NULL CHECK (origin IN ('action', 'compensation')),
    created_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER) * 1000),
    PRIMARY KEY (saga_id, branch, op)
);
CREATE INDEX IF NOT EXISTS tandem_barrier_created_at ON tandem_barrier (created_at);
