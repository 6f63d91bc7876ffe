//! The example services' own SQLite databases, opened the way Tandem's
//! sidecar opens them: WAL mode and a busy timeout, so a service and its
//! sidecar can share the file.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// Opens (creating) the database at `path`. With `connections` = 1 the
/// service's writers queue in the pool instead of busy-waiting inside
/// SQLite, which takes one writer at a time anyway.
pub async fn open_sqlite(path: &str, connections: u32) -> anyhow::Result<SqlitePool> {
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    Ok(SqlitePoolOptions::new()
        .max_connections(connections)
        .connect_with(opts)
        .await?)
}

/// The branch barrier inside a saga participant's local transaction:
/// inserts (`saga_id`, `branch`, `op`) into `tandem_barrier`; false if the
/// row was there (the operation ran before, or the action arrives after
/// its compensation): the caller then changes nothing and answers OK.
pub async fn enter_barrier(
    tx: &mut sqlx::SqliteConnection,
    saga_id: &str,
    branch: &str,
    op: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO tandem_barrier (saga_id, branch, op, origin) VALUES ($1, $2, $3, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(saga_id)
    .bind(branch)
    .bind(op)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}
