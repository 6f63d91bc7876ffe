//! The sidecar's tables in the application's own database: `tandem_txn`
//! (table mode), `tandem_inbox` (dedup), `tandem_barrier` (saga branches)
//! and `tandem_subscription`. SQLite
//! (the default; WAL mode and a busy timeout, so the app and the sidecar can
//! share the file) or PostgreSQL; the same SQL runs on both (`$n`
//! placeholders, `ON CONFLICT DO NOTHING`). Tables come from migrations
//! embedded in the binary.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqlStr};

use crate::error::{Error, Result};

/// A connection pool to the app's database.
#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Runs the same statement on whichever pool it is.
macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// One processed message: the dedup key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboxRow {
    /// The consumer group.
    pub group: String,
    /// The topic the message came from.
    pub topic: String,
    /// The message's id.
    pub message_id: String,
}

/// A claim asked for by [`Admit`]: `owner` handles the message until
/// `expires_at_ms` (taken over from another owner once theirs expired
/// before `now_ms`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The claiming sidecar process.
    pub owner: String,
    /// The time now, ms since the epoch.
    pub now_ms: i64,
    /// The claim's end, ms since the epoch.
    pub expires_at_ms: i64,
}

/// A delivery about to be handled: is it a duplicate, and (SIDECAR dedup)
/// may this sidecar handle it now?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admit {
    /// Its dedup key.
    pub row: InboxRow,
    /// The claim to take, if any.
    pub claim: Option<ClaimRequest>,
}

/// What [`Db::dedup_batch`] found for an [`Admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Already processed: skip it.
    Seen,
    /// Not processed, and claimed for this owner.
    Mine,
    /// Not processed, but another owner's live claim holds it.
    Taken,
    /// Not processed (no claim asked).
    Fresh,
}

const INBOX_HAS: &str = "SELECT 1 FROM tandem_inbox WHERE consumer_group = $1 AND topic IN ($2, '') AND message_id = $3";

/// [`Db::dedup_batch`] on SQLite: one statement per step, not per row
/// (records, then which admits are processed, then claims for the rest),
/// the rows passed as a JSON array read with `json_each`.
async fn sqlite_dedup_batch(
    pool: &SqlitePool,
    processed: &[InboxRow],
    admits: &[Admit],
) -> Result<Vec<Admission>> {
    fn keys<'a>(rows: impl Iterator<Item = &'a InboxRow>) -> String {
        let rows: Vec<[&str; 3]> = rows
            .map(|r| [r.group.as_str(), r.topic.as_str(), r.message_id.as_str()])
            .collect();
        serde_json::Value::from(rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>()).to_string()
    }
    // Writes take the write lock first, so that the reads see the state
    // they write on; checks alone are WAL reads that wait for nobody.
    let writes = !processed.is_empty() || admits.iter().any(|a| a.claim.is_some());
    let mut tx = if writes {
        pool.begin_with("BEGIN IMMEDIATE").await
    } else {
        pool.begin().await
    }
    .map_err(db_err("begin a transaction"))?;
    if !processed.is_empty() {
        // `WHERE true` keeps SQLite from reading ON CONFLICT as a join's.
        sqlx::query(
            "INSERT INTO tandem_inbox (consumer_group, topic, message_id) \
             SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each($1) WHERE true \
             ON CONFLICT DO NOTHING",
        )
        .bind(keys(processed.iter()))
        .execute(&mut *tx)
        .await
        .map_err(db_err("insert into tandem_inbox"))?;
    }
    let mut answers = vec![Admission::Fresh; admits.len()];
    if !admits.is_empty() {
        let seen: Vec<i64> = sqlx::query_scalar(
            "SELECT q.key FROM json_each($1) AS q WHERE EXISTS (SELECT 1 FROM tandem_inbox i \
               WHERE i.consumer_group = q.value ->> 0 AND i.topic IN (q.value ->> 1, '') \
               AND i.message_id = q.value ->> 2)",
        )
        .bind(keys(admits.iter().map(|a| &a.row)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err("read tandem_inbox"))?;
        for n in seen {
            if let Some(a) = usize::try_from(n).ok().and_then(|i| answers.get_mut(i)) {
                *a = Admission::Seen;
            }
        }
        let (which, now) = claims_wanted(admits, &mut answers);
        if !which.is_empty() {
            let rows: Vec<serde_json::Value> = which
                .iter()
                .map(|&(i, c)| {
                    let r = &admits[i].row;
                    serde_json::json!([r.group, r.topic, r.message_id, c.owner, c.expires_at_ms])
                })
                .collect();
            let mine: Vec<(String, String, String)> = sqlx::query_as(
                "INSERT INTO tandem_claim (consumer_group, topic, message_id, owner, expires_at) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 \
                 FROM json_each($1) WHERE true \
                 ON CONFLICT (consumer_group, topic, message_id) DO UPDATE \
                 SET owner = excluded.owner, expires_at = excluded.expires_at \
                 WHERE tandem_claim.owner = excluded.owner OR tandem_claim.expires_at < $2 \
                 RETURNING consumer_group, topic, message_id",
            )
            .bind(serde_json::Value::from(rows).to_string())
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("claim in tandem_claim"))?;
            settle_claims(admits, &mut answers, &which, mine);
        }
    }
    tx.commit()
        .await
        .map_err(db_err("commit to tandem_inbox and tandem_claim"))?;
    Ok(answers)
}

/// The admits that still need a claim (fresh, asking for one), in key
/// order, and the earliest `now` among them: no claim is taken over before
/// it expired for every admit of the batch. One sidecar never admits one
/// key twice at once (its in-process claims see to it); should a key come
/// twice all the same, its second admit waits (Taken), as one statement
/// cannot upsert a row twice.
fn claims_wanted<'a>(
    admits: &'a [Admit],
    answers: &mut [Admission],
) -> (Vec<(usize, &'a ClaimRequest)>, i64) {
    let mut keys = std::collections::HashSet::new();
    let mut now = i64::MAX;
    let mut which = Vec::new();
    let mut order: Vec<usize> = (0..admits.len()).collect();
    order.sort_by(|&a, &b| admits[a].row.cmp(&admits[b].row));
    for i in order {
        let a = &admits[i];
        if let (Admission::Fresh, Some(claim)) = (answers[i], &a.claim) {
            if !keys.insert(&a.row) {
                answers[i] = Admission::Taken;
                continue;
            }
            now = now.min(claim.now_ms);
            which.push((i, claim));
        }
    }
    (which, now)
}

/// Each admit of `which`: Mine if its key is among the claims the
/// statement took (`mine`), else Taken.
fn settle_claims(
    admits: &[Admit],
    answers: &mut [Admission],
    which: &[(usize, &ClaimRequest)],
    mine: Vec<(String, String, String)>,
) {
    let mine: std::collections::HashSet<(String, String, String)> = mine.into_iter().collect();
    for &(i, _) in which {
        let r = &admits[i].row;
        answers[i] = if mine.contains(&(r.group.clone(), r.topic.clone(), r.message_id.clone())) {
            Admission::Mine
        } else {
            Admission::Taken
        };
    }
}

/// Columns of many rows, as arrays for `UNNEST`.
#[derive(Default)]
struct Columns {
    groups: Vec<String>,
    topics: Vec<String>,
    ids: Vec<String>,
}

impl Columns {
    fn push(&mut self, r: &InboxRow) {
        self.groups.push(r.group.clone());
        self.topics.push(r.topic.clone());
        self.ids.push(r.message_id.clone());
    }
}

/// [`Db::dedup_batch`] on PostgreSQL: a round trip per step, not per row
/// (records, then which admits are processed, then claims for the rest).
async fn postgres_dedup_batch(
    pool: &PgPool,
    processed: &[InboxRow],
    admits: &[Admit],
) -> Result<Vec<Admission>> {
    let mut tx = pool.begin().await.map_err(db_err("begin a transaction"))?;
    if !processed.is_empty() {
        // In key order, as the claims below: two sidecars' batches lock
        // rows in one order and never deadlock.
        let mut sorted: Vec<&InboxRow> = processed.iter().collect();
        sorted.sort();
        let mut c = Columns::default();
        sorted.into_iter().for_each(|r| c.push(r));
        sqlx::query(
            "INSERT INTO tandem_inbox (consumer_group, topic, message_id) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&c.groups)
        .bind(&c.topics)
        .bind(&c.ids)
        .execute(&mut *tx)
        .await
        .map_err(db_err("insert into tandem_inbox"))?;
    }
    let mut answers = vec![Admission::Fresh; admits.len()];
    if !admits.is_empty() {
        let mut c = Columns::default();
        admits.iter().for_each(|a| c.push(&a.row));
        let seen: Vec<i32> = sqlx::query_scalar(
            "SELECT q.n::int4 FROM UNNEST($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(g, t, m, n) \
             WHERE EXISTS (SELECT 1 FROM tandem_inbox i \
               WHERE i.consumer_group = q.g AND i.topic IN (q.t, '') AND i.message_id = q.m)",
        )
        .bind(&c.groups)
        .bind(&c.topics)
        .bind(&c.ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err("read tandem_inbox"))?;
        for n in seen {
            if let Some(a) = usize::try_from(n - 1).ok().and_then(|i| answers.get_mut(i)) {
                *a = Admission::Seen;
            }
        }
        // Claims for the others that ask for one.
        let (which, now) = claims_wanted(admits, &mut answers);
        let mut c = Columns::default();
        let (mut owners, mut expiries) = (Vec::new(), Vec::new());
        for &(i, claim) in &which {
            c.push(&admits[i].row);
            owners.push(claim.owner.clone());
            expiries.push(claim.expires_at_ms);
        }
        if !which.is_empty() {
            let mine: Vec<(String, String, String)> = sqlx::query_as(
                "INSERT INTO tandem_claim AS c (consumer_group, topic, message_id, owner, expires_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) \
                 ON CONFLICT (consumer_group, topic, message_id) DO UPDATE \
                 SET owner = excluded.owner, expires_at = excluded.expires_at \
                 WHERE c.owner = excluded.owner OR c.expires_at < $6 \
                 RETURNING c.consumer_group, c.topic, c.message_id",
            )
            .bind(&c.groups)
            .bind(&c.topics)
            .bind(&c.ids)
            .bind(&owners)
            .bind(&expiries)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("claim in tandem_claim"))?;
            settle_claims(admits, &mut answers, &which, mine);
        }
    }
    tx.commit()
        .await
        .map_err(db_err("commit to tandem_inbox and tandem_claim"))?;
    Ok(answers)
}

/// How a check-back found the local transaction in `tandem_txn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableState {
    /// The app's row is there: it committed.
    Committed,
    /// The rollback marker is there.
    RolledBack,
    /// Nothing yet.
    Absent,
}

fn migrator(steps: &[(&'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        steps
            .iter()
            .zip(1..)
            .map(|(&(name, sql), version)| {
                Migration::new(
                    version,
                    name.into(),
                    MigrationType::Simple,
                    SqlStr::from_static(sql),
                    false,
                )
            })
            .collect(),
    )
}

fn db_err(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Db { what, source }
}

impl Db {
    /// Connects to `url`: `postgres://…`, `sqlite:…`, or a plain file path
    /// (SQLite, created if missing).
    pub async fn connect(url: &str) -> Result<Db> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(db_err("connect to PostgreSQL"))?;
            return Ok(Db::Postgres(pool));
        }
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(db_err("parse the SQLite URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL syncs at checkpoints, not at every commit.
            // What the sidecar writes survives a crash of any process; a
            // power loss can lose its last rows, which is harmless: a lost
            // dedup row belongs to an acknowledged message (never delivered
            // again), and a lost rollback marker can only matter to a local
            // transaction that was itself in flight when the machine died.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .map_err(db_err("open SQLite"))?;
        Ok(Db::Sqlite(pool))
    }

    /// Creates or updates Tandem's tables. Several sidecars of one service
    /// may start at once on one database: a run that loses the race (the
    /// other applied the same step first) is repeated, and then finds the
    /// step applied.
    pub async fn migrate(&self) -> Result<()> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.migrate_once().await {
                Err(e) if tries < 5 => {
                    tracing::warn!(error = %e, "migration failed; another sidecar may be migrating; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * tries)).await;
                }
                r => return r,
            }
        }
    }

    async fn migrate_once(&self) -> Result<()> {
        let r = match self {
            Db::Sqlite(p) => {
                migrator(&[
                    (
                        "tandem tables",
                        include_str!("../migrations/sqlite/0001_tandem_tables.sql"),
                    ),
                    (
                        "inbox by topic",
                        include_str!("../migrations/sqlite/0002_inbox_by_topic.sql"),
                    ),
                    (
                        "claims",
                        include_str!("../migrations/sqlite/0003_claims.sql"),
                    ),
                    (
                        "saga barrier",
                        include_str!("../migrations/sqlite/0004_barrier.sql"),
                    ),
                ])
                .run(p)
                .await
            }
            Db::Postgres(p) => {
                migrator(&[
                    (
                        "tandem tables",
                        include_str!("../migrations/postgres/0001_tandem_tables.sql"),
                    ),
                    (
                        "inbox by topic",
                        include_str!("../migrations/postgres/0002_inbox_by_topic.sql"),
                    ),
                    (
                        "claims",
                        include_str!("../migrations/postgres/0003_claims.sql"),
                    ),
                    (
                        "saga barrier",
                        include_str!("../migrations/postgres/0004_barrier.sql"),
                    ),
                ])
                .run(p)
                .await
            }
        };
        r.map_err(|e| Error::Migrate(e.to_string()))
    }

    /// Looks a transaction up in `tandem_txn`.
    pub async fn txn_state(&self, txn_id: &str) -> Result<TableState> {
        let row = on_db!(self, |p| sqlx::query(
            "SELECT state FROM tandem_txn WHERE txn_id = $1"
        )
        .bind(txn_id)
        .fetch_optional(p)
        .await
        .map_err(db_err("read tandem_txn"))?
        .map(|r| r.try_get::<String, _>(0)));
        match row
            .transpose()
            .map_err(db_err("read tandem_txn"))?
            .as_deref()
        {
            None => Ok(TableState::Absent),
            Some("rolled_back") => Ok(TableState::RolledBack),
            Some(_) => Ok(TableState::Committed),
        }
    }

    /// Inserts the rollback marker unless the app's row is there; returns
    /// what the table holds afterwards (never `Absent`).
    pub async fn mark_rolled_back(&self, txn_id: &str) -> Result<TableState> {
        on_db!(self, |p| {
            sqlx::query(
            "INSERT INTO tandem_txn (txn_id, state) VALUES ($1, 'rolled_back') ON CONFLICT DO NOTHING"
        )
        .bind(txn_id)
        .execute(p)
        .await
        .map_err(db_err("insert the rollback marker"))?;
        });
        self.txn_state(txn_id).await
    }

    /// True if `group` already processed message `message_id` of `topic`
    /// (rows recorded before dedup knew topics have topic `''` and match
    /// any topic).
    pub async fn inbox_has(&self, group: &str, topic: &str, message_id: &str) -> Result<bool> {
        let row = on_db!(self, |p| {
            sqlx::query(INBOX_HAS)
                .bind(group)
                .bind(topic)
                .bind(message_id)
                .fetch_optional(p)
                .await
                .map_err(db_err("read tandem_inbox"))?
                .is_some()
        });
        Ok(row)
    }

    /// Checks and claims one delivery (see [`dedup_batch`](Self::dedup_batch)).
    pub async fn admit(&self, admit: &Admit) -> Result<Admission> {
        let mut answers = self.dedup_batch(&[], std::slice::from_ref(admit)).await?;
        answers
            .pop()
            .ok_or_else(|| Error::Inbox("no admission answered".into()))
    }

    /// One database transaction for many deliveries: records `processed`
    /// messages in `tandem_inbox`, then for each of `admits`, in order:
    /// [`Admission::Seen`] if its message is in `tandem_inbox` (the rows
    /// just recorded included); else, when it asks for a claim,
    /// [`Admission::Mine`] if the claim in `tandem_claim` is its owner's now
    /// (it was free, expired, or already the owner's) or
    /// [`Admission::Taken`] while another owner's unexpired claim holds it;
    /// else [`Admission::Fresh`]. On SQLite the transaction takes the write
    /// lock first (`BEGIN IMMEDIATE`), so that its reads and writes see one
    /// state.
    pub async fn dedup_batch(
        &self,
        processed: &[InboxRow],
        admits: &[Admit],
    ) -> Result<Vec<Admission>> {
        match self {
            Db::Sqlite(p) => sqlite_dedup_batch(p, processed, admits).await,
            Db::Postgres(p) => postgres_dedup_batch(p, processed, admits).await,
        }
    }

    /// Gives up `owner`'s claim of a message.
    pub async fn unclaim(&self, row: &InboxRow, owner: &str) -> Result<()> {
        on_db!(self, |p| {
            sqlx::query(
            "DELETE FROM tandem_claim WHERE consumer_group = $1 AND topic = $2 AND message_id = $3 AND owner = $4"
        )
        .bind(&row.group)
        .bind(&row.topic)
        .bind(&row.message_id)
        .bind(owner)
        .execute(p)
        .await
        .map(drop)
        .map_err(db_err("delete from tandem_claim"))?
        });
        Ok(())
    }

    /// Records many processed messages in one transaction.
    pub async fn inbox_add_all(&self, rows: &[InboxRow]) -> Result<()> {
        self.dedup_batch(rows, &[]).await.map(drop)
    }

    /// The origin of barrier row (`saga_id`, `branch`, `op`), if it is
    /// there: `"action"` or `"compensation"`.
    pub async fn barrier_origin(
        &self,
        saga_id: &str,
        branch: &str,
        op: &str,
    ) -> Result<Option<String>> {
        let row = on_db!(self, |p| sqlx::query(
            "SELECT origin FROM tandem_barrier WHERE saga_id = $1 AND branch = $2 AND op = $3"
        )
        .bind(saga_id)
        .bind(branch)
        .bind(op)
        .fetch_optional(p)
        .await
        .map_err(db_err("read tandem_barrier"))?
        .map(|r| r.try_get::<String, _>(0)));
        row.transpose().map_err(db_err("read tandem_barrier"))
    }

    /// Inserts barrier row (`saga_id`, `branch`, `op`) with origin `op`
    /// unless one is there (for an app that answered OK without writing
    /// it); returns the origin of the row there afterwards.
    pub async fn barrier_record(&self, saga_id: &str, branch: &str, op: &str) -> Result<String> {
        on_db!(self, |p| sqlx::query(
            "INSERT INTO tandem_barrier (saga_id, branch, op, origin) VALUES ($1, $2, $3, $3) \
             ON CONFLICT DO NOTHING"
        )
        .bind(saga_id)
        .bind(branch)
        .bind(op)
        .execute(p)
        .await
        .map(drop)
        .map_err(db_err("write tandem_barrier"))?);
        self.barrier_origin(saga_id, branch, op)
            .await?
            .ok_or(Error::Db {
                what: "read back a tandem_barrier row",
                source: sqlx::Error::RowNotFound,
            })
    }

    /// Records the compensation of a branch whose action never committed:
    /// inserts the action's row with origin `compensation` (so a late
    /// action conflicts and is refused) and the compensation's row. True if
    /// the action had not committed (nothing to undo, both rows now there);
    /// false if the action's own row is there (the app must undo it).
    pub async fn barrier_null_compensation(&self, saga_id: &str, branch: &str) -> Result<bool> {
        const MARK: &str = "INSERT INTO tandem_barrier (saga_id, branch, op, origin) \
             VALUES ($1, $2, $3, 'compensation') ON CONFLICT DO NOTHING";
        let null = on_db!(self, |p| {
            let mut tx = p.begin().await.map_err(db_err("write tandem_barrier"))?;
            sqlx::query(MARK)
                .bind(saga_id)
                .bind(branch)
                .bind("action")
                .execute(&mut *tx)
                .await
                .map_err(db_err("write tandem_barrier"))?;
            let origin: String = sqlx::query(
                "SELECT origin FROM tandem_barrier WHERE saga_id = $1 AND branch = $2 AND op = 'action'",
            )
            .bind(saga_id)
            .bind(branch)
            .fetch_one(&mut *tx)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db_err("read tandem_barrier"))?;
            let null = origin == "compensation";
            if null {
                sqlx::query(MARK)
                    .bind(saga_id)
                    .bind(branch)
                    .bind("compensation")
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("write tandem_barrier"))?;
            }
            tx.commit().await.map_err(db_err("write tandem_barrier"))?;
            null
        });
        Ok(null)
    }

    /// Deletes dedup rows, rollback markers and barrier rows older than
    /// `before_ms`, and claims expired at `now_ms`; returns the rows
    /// deleted.
    pub async fn cleanup(&self, before_ms: i64, now_ms: i64) -> Result<u64> {
        let claims = on_db!(self, |p| sqlx::query(
            "DELETE FROM tandem_claim WHERE expires_at < $1"
        )
        .bind(now_ms)
        .execute(p)
        .await
        .map_err(db_err("clean tandem_claim"))?
        .rows_affected());
        let inbox = on_db!(self, |p| sqlx::query(
            "DELETE FROM tandem_inbox WHERE processed_at < $1"
        )
        .bind(before_ms)
        .execute(p)
        .await
        .map_err(db_err("clean tandem_inbox"))?
        .rows_affected());
        let txn = on_db!(self, |p| sqlx::query(
            "DELETE FROM tandem_txn WHERE created_at < $1"
        )
        .bind(before_ms)
        .execute(p)
        .await
        .map_err(db_err("clean tandem_txn"))?
        .rows_affected());
        let barrier = on_db!(self, |p| sqlx::query(
            "DELETE FROM tandem_barrier WHERE created_at < $1"
        )
        .bind(before_ms)
        .execute(p)
        .await
        .map_err(db_err("clean tandem_barrier"))?
        .rows_affected());
        Ok(inbox + txn + claims + barrier)
    }

    /// Saves a subscription (replacing one on the same topic and group).
    pub async fn save_subscription(&self, topic: &str, group: &str, spec: &[u8]) -> Result<()> {
        on_db!(self, |p| {
            sqlx::query(
                "INSERT INTO tandem_subscription (topic, consumer_group, spec) VALUES ($1, $2, $3) \
             ON CONFLICT (topic, consumer_group) DO UPDATE SET spec = excluded.spec",
            )
            .bind(topic)
            .bind(group)
            .bind(spec)
            .execute(p)
            .await
            .map_err(db_err("save a subscription"))?;
        });
        Ok(())
    }

    /// Deletes a subscription; returns whether there was one.
    pub async fn delete_subscription(&self, topic: &str, group: &str) -> Result<bool> {
        let n = on_db!(self, |p| sqlx::query(
            "DELETE FROM tandem_subscription WHERE topic = $1 AND consumer_group = $2"
        )
        .bind(topic)
        .bind(group)
        .execute(p)
        .await
        .map_err(db_err("delete a subscription"))?
        .rows_affected());
        Ok(n > 0)
    }

    /// Every saved subscription's spec.
    pub async fn subscriptions(&self) -> Result<Vec<Vec<u8>>> {
        let rows = on_db!(self, |p| {
            let rows =
                sqlx::query("SELECT spec FROM tandem_subscription ORDER BY topic, consumer_group")
                    .fetch_all(p)
                    .await
                    .map_err(db_err("read subscriptions"))?;
            rows.iter()
                .map(|r| r.try_get::<Vec<u8>, _>(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err("read subscriptions"))?
        });
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_of(id: &str) -> InboxRow {
        InboxRow {
            group: "g".into(),
            topic: "t".into(),
            message_id: id.into(),
        }
    }

    async fn exercise(db: &Db) -> Result<()> {
        db.migrate().await?;
        db.migrate().await?; // idempotent
        assert_eq!(db.txn_state("t1").await?, TableState::Absent);
        on_db!(db, |p| sqlx::query(
            "INSERT INTO tandem_txn (txn_id) VALUES ($1)"
        )
        .bind("t1")
        .execute(p)
        .await
        .map(drop)
        .map_err(db_err("insert"))?);
        assert_eq!(db.txn_state("t1").await?, TableState::Committed);
        assert_eq!(
            db.mark_rolled_back("t1").await?,
            TableState::Committed,
            "the app's row wins"
        );
        assert_eq!(db.mark_rolled_back("t2").await?, TableState::RolledBack);
        let late = on_db!(db, |p| sqlx::query(
            "INSERT INTO tandem_txn (txn_id) VALUES ($1)"
        )
        .bind("t2")
        .execute(p)
        .await
        .map(drop));
        assert!(late.is_err(), "a late local commit fails on the marker");
        assert!(!db.inbox_has("g", "t", "m1").await?);
        let row = InboxRow {
            group: "g".into(),
            topic: "t".into(),
            message_id: "m1".into(),
        };
        db.inbox_add_all(std::slice::from_ref(&row)).await?;
        db.inbox_add_all(&[row.clone(), row]).await?;
        assert!(db.inbox_has("g", "t", "m1").await?);
        assert!(!db.inbox_has("other", "t", "m1").await?);
        assert!(
            !db.inbox_has("g", "u", "m1").await?,
            "the same id on another topic is another message"
        );
        let claim = |owner: &str, now_ms, expires_at_ms| Admit {
            row: row_of("m2"),
            claim: Some(ClaimRequest {
                owner: owner.into(),
                now_ms,
                expires_at_ms,
            }),
        };
        use Admission::*;
        assert_eq!(db.admit(&claim("a", 100, 200)).await?, Mine, "free");
        assert_eq!(
            db.admit(&claim("a", 150, 300)).await?,
            Mine,
            "ours: renewed"
        );
        assert_eq!(db.admit(&claim("b", 250, 400)).await?, Taken, "held by a");
        assert_eq!(
            db.admit(&claim("b", 301, 500)).await?,
            Mine,
            "expired: taken over"
        );
        db.unclaim(&row_of("m2"), "a").await?;
        assert_eq!(
            db.admit(&claim("a", 302, 600)).await?,
            Taken,
            "only the owner unclaims"
        );
        db.unclaim(&row_of("m2"), "b").await?;
        assert_eq!(db.admit(&claim("a", 303, 700)).await?, Mine, "released");
        // A processed message is seen before any claim, also when recorded
        // in the same batch.
        let m3 = Admit {
            row: row_of("m3"),
            claim: None,
        };
        assert_eq!(db.admit(&m3).await?, Fresh);
        let claimed = Admit {
            claim: claim("c", 304, 600).claim,
            ..m3.clone()
        };
        let seen = db
            .dedup_batch(std::slice::from_ref(&m3.row), &[m3.clone(), claimed])
            .await?;
        assert_eq!(seen, [Seen, Seen]);
        db.save_subscription("t", "g", b"one").await?;
        db.save_subscription("t", "g", b"two").await?;
        assert_eq!(db.subscriptions().await?, vec![b"two".to_vec()]);
        assert!(db.delete_subscription("t", "g").await?);
        assert!(db.subscriptions().await?.is_empty());
        assert_eq!(db.cleanup(i64::MAX, 0).await?, 4, "the claim is live");
        assert_eq!(db.cleanup(0, 701).await?, 1, "the claim expired");
        // Many admits in one batch, ids that need quoting among them: each
        // gets its own answer.
        let ask = |id: &str, owner: &str| Admit {
            row: row_of(id),
            claim: Some(ClaimRequest {
                owner: owner.into(),
                now_ms: 1000,
                expires_at_ms: 2000,
            }),
        };
        let odd = "quote\" back\\slash ünï 💥";
        db.inbox_add_all(&[row_of("done"), row_of(odd)]).await?;
        assert!(
            db.inbox_has("g", "t", odd).await?,
            "recorded as written, read with plain binds"
        );
        assert_eq!(db.admit(&ask("held", "other")).await?, Mine);
        let answers = db
            .dedup_batch(
                &[row_of("done-now")],
                &[
                    ask("free-1", "me"),
                    ask("done", "me"),
                    ask("held", "me"),
                    ask("free-2", "me"),
                    ask("free-1", "me"),
                    ask(odd, "me"),
                    ask("done-now", "me"),
                    Admit {
                        row: row_of("unclaimed"),
                        claim: None,
                    },
                ],
            )
            .await?;
        assert_eq!(
            answers,
            [Mine, Seen, Taken, Mine, Taken, Seen, Seen, Fresh],
            "free, processed, another's, free, the same key twice, processed (quoted), \
             processed in this batch, no claim asked"
        );
        assert_eq!(
            db.admit(&ask("free-2", "other")).await?,
            Taken,
            "claimed above"
        );
        barrier(db).await
    }

    async fn barrier(db: &Db) -> Result<()> {
        assert_eq!(db.barrier_origin("s", "b", "action").await?, None);
        // The action committed: its compensation is the app's to run.
        let done = on_db!(db, |p| {
            sqlx::query(
            "INSERT INTO tandem_barrier (saga_id, branch, op, origin) VALUES ('s', 'b', 'action', 'action') \
             ON CONFLICT DO NOTHING"
        )
        .execute(p)
        .await
        .map_err(db_err("insert"))?
        .rows_affected()
        });
        assert_eq!(done, 1);
        assert_eq!(
            db.barrier_origin("s", "b", "action").await?.as_deref(),
            Some("action")
        );
        assert!(!db.barrier_null_compensation("s", "b").await?);
        assert_eq!(db.barrier_origin("s", "b", "compensation").await?, None);
        // Another branch's action never committed: a null compensation,
        // after which the late action's own insert conflicts.
        assert!(db.barrier_null_compensation("s", "late").await?);
        assert!(
            db.barrier_null_compensation("s", "late").await?,
            "repeatable"
        );
        assert_eq!(
            db.barrier_origin("s", "late", "action").await?.as_deref(),
            Some("compensation")
        );
        assert_eq!(
            db.barrier_origin("s", "late", "compensation")
                .await?
                .as_deref(),
            Some("compensation")
        );
        let late = on_db!(db, |p| {
            sqlx::query(
            "INSERT INTO tandem_barrier (saga_id, branch, op, origin) VALUES ('s', 'late', 'action', 'action') \
             ON CONFLICT DO NOTHING"
        )
        .execute(p)
        .await
        .map_err(db_err("insert"))?
        .rows_affected()
        });
        assert_eq!(late, 0, "the hanging action's insert conflicts");
        // Rows written for an app that did not write its own.
        assert_eq!(db.barrier_record("s", "r", "action").await?, "action");
        assert_eq!(
            db.barrier_record("s", "late", "action").await?,
            "compensation"
        );
        assert_eq!(db.cleanup(0, 0).await?, 0, "nothing old yet");
        assert!(
            db.cleanup(i64::MAX, 0).await? >= 3,
            "barrier rows and the rest"
        );
        assert_eq!(db.barrier_origin("s", "late", "action").await?, None);
        assert_eq!(db.barrier_origin("s", "b", "action").await?, None);
        Ok(())
    }

    /// Creates an empty database on the server of `url`; returns its URL.
    pub(crate) async fn fresh_postgres_database(url: &str) -> Result<String> {
        let (base, _) = url
            .rsplit_once('/')
            .ok_or_else(|| Error::Migrate(format!("bad URL {url}")))?;
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map_err(db_err("connect"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .map_err(db_err("create a database"))?;
        admin.close().await;
        Ok(format!("{base}/{name}"))
    }

    /// Two sidecars of one service starting together on one database.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_migrations_both_succeed() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Migrate(e.to_string()))?;
        let path = dir.path().join("app.db").display().to_string();
        for _ in 0..5 {
            let _ = std::fs::remove_file(&path);
            let (a, b) = (Db::connect(&path).await?, Db::connect(&path).await?);
            let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
            ra?;
            rb?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn sqlite_tables_behave() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Migrate(e.to_string()))?;
        let db = Db::connect(&dir.path().join("app.db").display().to_string()).await?;
        exercise(&db).await
    }

    /// Runs against the PostgreSQL server that `scripts/test.sh` starts
    /// (`TANDEM_TEST_POSTGRES`); without one it says so and passes, unless
    /// `TANDEM_REQUIRE_POSTGRES` is set, as it is in CI.
    #[tokio::test]
    async fn postgres_tables_behave() -> Result<()> {
        let Ok(url) = std::env::var("TANDEM_TEST_POSTGRES") else {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_POSTGRES").is_none(),
                "TANDEM_TEST_POSTGRES is not set but PostgreSQL tests are required"
            );
            eprintln!("skipped: no TANDEM_TEST_POSTGRES (scripts/test.sh provides one)");
            return Ok(());
        };
        let db = Db::connect(&fresh_postgres_database(&url).await?).await?;
        exercise(&db).await
    }
}
