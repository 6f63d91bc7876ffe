//! The PostgreSQL backend: the same partitioned logs as rows, written under
//! a lease.
//!
//! A [`PgStore`] is a connection pool on one database whose tables come
//! from the migrations in `migrations/postgres`. Coordinator replicas share
//! the database and take turns through lease rows (`tandem_lease`: owner,
//! address, epoch, expiry by the server's clock). A [`PgLog`] is opened
//! under a lease and every write it makes (appends, new partitions,
//! truncation) first locks the lease row and checks that the epoch is still
//! the one it was opened with, in the same transaction as the write: once
//! another replica has taken the lease over (which bumps the epoch), not one
//! row of the old holder's can land, however long it was paused.
//!
//! Offsets are given by the holder, which keeps each partition's next
//! offset in memory; the row of the partition is updated in the same
//! transaction only if its next offset is still the one the holder saw, so
//! two writers can never interleave offsets either. Concurrent appends
//! (over all partitions of the log) are group-committed: one transaction,
//! one multi-row insert.
//!
//! Any failed write (the lease lost, the server gone, a statement refused)
//! leaves what PostgreSQL holds unknown to the holder: the log refuses all
//! further writes and reports the failure through [`PgLog::failed`]; its
//! owner drops it and opens a fresh one, which reads the truth back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::TryStreamExt;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, SqlStr, Transaction};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::log::{AppendAck, Log, Offsets};
use crate::record::{Header, Record, StoredRecord, TopicPartition, validate_topic_name};
use crate::segment::ReadBudget;
use crate::{LogConfig, batch};

/// Records deleted per transaction by retention.
const RETENTION_STEP: u64 = 5_000;

/// A lease held in `tandem_lease`: who holds it and with which epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Lease name.
    pub name: String,
    /// The holder's replica id.
    pub owner: String,
    /// The holder's address, for redirects.
    pub address: String,
    /// Raised by one at every change of holder.
    pub epoch: i64,
    /// Time left before it expires, by the server's clock (negative once
    /// expired).
    pub expires_in: i64,
}

/// A connection pool on a PostgreSQL database holding Tandem's logs.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::Store {
        what,
        cause: e.to_string(),
    }
}

fn migrator() -> Migrator {
    let mut m = Migrator::with_migrations(vec![
        Migration::new(
            1,
            "logs and leases".into(),
            MigrationType::Simple,
            SqlStr::from_static(include_str!("../migrations/postgres/0001_logs.sql")),
            false,
        ),
        Migration::new(
            2,
            "shards".into(),
            MigrationType::Simple,
            SqlStr::from_static(include_str!("../migrations/postgres/0002_shards.sql")),
            false,
        ),
    ]);
    // Apart from a sidecar's migrations, should both share one database.
    m.dangerous_set_table_name("_tandem_coordinator_migrations");
    m
}

impl PgStore {
    /// Connects to `url` (`postgres://…`) and creates or updates Tandem's
    /// tables. Nothing waits longer than `timeout` (a lease's length, for a
    /// coordinator): not for a connection, not a statement, not a lock, and
    /// the server ends a session left idle inside a transaction that long
    /// (a holder frozen mid-write), so that its locks cannot hold a
    /// takeover up.
    pub async fn connect(url: &str, timeout: Duration) -> Result<PgStore> {
        PgStore::connect_sized(url, timeout, 8).await
    }

    /// [`connect`](Self::connect) with a pool of at most `connections`.
    pub async fn connect_sized(url: &str, timeout: Duration, connections: u32) -> Result<PgStore> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| Error::Store {
            what: "parse the PostgreSQL URL",
            cause: e.to_string(),
        })?;
        let ms = timeout.as_millis().max(1).to_string();
        let options = options.options([
            ("statement_timeout", ms.as_str()),
            ("lock_timeout", ms.as_str()),
            ("idle_in_transaction_session_timeout", ms.as_str()),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(2))
            .acquire_timeout(timeout)
            .connect_with(options)
            .await
            .map_err(db("connect to PostgreSQL"))?;
        migrator().run(&pool).await.map_err(|e| Error::Store {
            what: "create the tables",
            cause: e.to_string(),
        })?;
        Ok(PgStore { pool })
    }

    /// Creates database `name` on the server of `url` (any of its
    /// databases) and returns its URL. `name` must be a plain SQL
    /// identifier (letters, digits, `_`).
    pub async fn create_database(url: &str, name: &str) -> Result<String> {
        use sqlx::{Connection, Executor};
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::Store {
                what: "create a database",
                cause: format!("{name:?} is not a plain lower-case identifier"),
            });
        }
        let (base, _) = url.rsplit_once('/').ok_or_else(|| Error::Store {
            what: "create a database",
            cause: "the URL names no database".into(),
        })?;
        let mut c = sqlx::PgConnection::connect(url)
            .await
            .map_err(db("connect to PostgreSQL"))?;
        c.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .map_err(db("create a database"))?;
        let _ = c.close().await;
        Ok(format!("{base}/{name}"))
    }

    /// The pool, for callers with statements of their own.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Takes lease `name` for `owner` if nobody holds it, it has expired, or
    /// `owner` holds it already (a new epoch either way); the lease lasts
    /// `ttl`. `None`: someone else holds it.
    pub async fn acquire(
        &self,
        name: &str,
        owner: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let ttl_ms = ttl.as_millis() as i64;
        sqlx::query(
            "INSERT INTO tandem_lease (name, owner, address, epoch, expires_at) \
             VALUES ($1, '', '', 0, now()) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(&self.pool)
        .await
        .map_err(db("create a lease"))?;
        // The row locked FOR UPDATE first: that waits for every write in
        // flight under the current epoch (they hold it FOR KEY SHARE) to
        // commit or roll back, so none can land after the epoch moves.
        // Expiry is judged by the clock at the statement, not at BEGIN.
        let mut tx = self.pool.begin().await.map_err(db("take a lease"))?;
        sqlx::query("SELECT 1 FROM tandem_lease WHERE name = $1 FOR UPDATE")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db("take a lease"))?;
        let row = sqlx::query(
            "UPDATE tandem_lease SET owner = $2, address = $3, epoch = epoch + 1, \
                 expires_at = clock_timestamp() + make_interval(secs => $4::bigint / 1000.0) \
             WHERE name = $1 AND (expires_at <= clock_timestamp() OR owner = $2) \
             RETURNING epoch",
        )
        .bind(name)
        .bind(owner)
        .bind(address)
        .bind(ttl_ms)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("take a lease"))?;
        tx.commit().await.map_err(db("take a lease"))?;
        Ok(row.map(|r| Lease {
            name: name.to_owned(),
            owner: owner.to_owned(),
            address: address.to_owned(),
            epoch: r.get(0),
            expires_in: ttl_ms,
        }))
    }

    /// Extends `lease` by `ttl` from now; false if it is no longer held with
    /// that epoch. (Not a key update: it does not wait for writes in
    /// flight, which hold the row FOR KEY SHARE.)
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE tandem_lease \
             SET expires_at = clock_timestamp() + make_interval(secs => $3::bigint / 1000.0) \
             WHERE name = $1 AND epoch = $2",
        )
        .bind(&lease.name)
        .bind(lease.epoch)
        .bind(ttl.as_millis() as i64)
        .execute(&self.pool)
        .await
        .map_err(db("renew a lease"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Lets `lease` expire now, so another replica may take it at once.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        sqlx::query(
            "UPDATE tandem_lease SET expires_at = clock_timestamp() WHERE name = $1 AND epoch = $2",
        )
        .bind(&lease.name)
        .bind(lease.epoch)
        .execute(&self.pool)
        .await
        .map_err(db("release a lease"))?;
        Ok(())
    }

    /// Who holds lease `name`, if anyone ever did.
    pub async fn holder(&self, name: &str) -> Result<Option<Lease>> {
        let row = sqlx::query(
            "SELECT owner, address, epoch, \
                 (extract(epoch from expires_at - clock_timestamp()) * 1000)::bigint \
             FROM tandem_lease WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read a lease"))?;
        Ok(row.map(|r| Lease {
            name: name.to_owned(),
            owner: r.get(0),
            address: r.get(1),
            epoch: r.get(2),
            expires_in: r.get(3),
        }))
    }

    /// Leases whose names start with `prefix` and that have not expired.
    pub async fn live_leases(&self, prefix: &str) -> Result<Vec<Lease>> {
        let rows = sqlx::query(
            "SELECT name, owner, address, epoch, \
                 (extract(epoch from expires_at - clock_timestamp()) * 1000)::bigint \
             FROM tandem_lease \
             WHERE left(name, length($1)) = $1 AND expires_at > clock_timestamp() \
             ORDER BY name",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read leases"))?;
        Ok(rows
            .into_iter()
            .map(|r| Lease {
                name: r.get(0),
                owner: r.get(1),
                address: r.get(2),
                epoch: r.get(3),
                expires_in: r.get(4),
            })
            .collect())
    }

    /// Whether log `ns` has any partition.
    pub async fn has_log(&self, ns: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tandem_partition WHERE ns = $1)")
            .bind(ns)
            .fetch_one(&self.pool)
            .await
            .map_err(db("look for a log"))
    }

    /// Forgets leases whose names start with `prefix` that expired more
    /// than `age` ago; answers how many.
    pub async fn forget_leases(&self, prefix: &str, age: Duration) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM tandem_lease WHERE left(name, length($1)) = $1 \
             AND expires_at < clock_timestamp() - make_interval(secs => $2::bigint / 1000.0)",
        )
        .bind(prefix)
        .bind(age.as_millis() as i64)
        .execute(&self.pool)
        .await
        .map_err(db("forget old leases"))?;
        Ok(r.rows_affected())
    }

    /// Setting `key` of the database: the stored value, or `value` stored
    /// now if there was none.
    pub async fn fixed_setting(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO tandem_cluster (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(db("store a setting"))?;
        sqlx::query_scalar("SELECT value FROM tandem_cluster WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(db("read a setting"))
    }

    /// Claims each of `ids` (no two alike) for `shard` unless another
    /// shard holds it (a claim `shard` holds already is renewed); answers,
    /// for each, the shard that holds it now.
    pub async fn claim_ids(&self, ids: &[String], shard: u32) -> Result<Vec<u32>> {
        let shards = vec![shard as i32; ids.len()];
        let rows = sqlx::query(
            "WITH ins AS ( \
                 INSERT INTO tandem_txn_claim (id, shard) \
                 SELECT * FROM unnest($1::text[], $2::integer[]) \
                 ON CONFLICT (id) DO UPDATE SET claimed_at = now() \
                 WHERE tandem_txn_claim.shard = EXCLUDED.shard \
                 RETURNING id, shard) \
             SELECT id, shard FROM ins \
             UNION ALL \
             SELECT id, shard FROM tandem_txn_claim \
             WHERE id = ANY($1) AND id NOT IN (SELECT id FROM ins)",
        )
        .bind(ids)
        .bind(&shards)
        .fetch_all(&self.pool)
        .await
        .map_err(db("claim transaction ids"))?;
        let mut held: HashMap<String, u32> = rows
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i32, _>(1) as u32))
            .collect();
        // A claim another statement committed while this one ran is not in
        // its snapshot: read again.
        let missing: Vec<&String> = ids.iter().filter(|id| !held.contains_key(*id)).collect();
        if !missing.is_empty() {
            let rows = sqlx::query("SELECT id, shard FROM tandem_txn_claim WHERE id = ANY($1)")
                .bind(&missing)
                .fetch_all(&self.pool)
                .await
                .map_err(db("claim transaction ids"))?;
            held.extend(
                rows.into_iter()
                    .map(|r| (r.get::<String, _>(0), r.get::<i32, _>(1) as u32)),
            );
        }
        ids.iter()
            .map(|id| {
                held.get(id).copied().ok_or_else(|| Error::Store {
                    what: "claim transaction ids",
                    cause: format!("no claim came back for {id:?}"),
                })
            })
            .collect()
    }

    /// The shard holding transaction id `id`, if any.
    pub async fn claimed_by(&self, id: &str) -> Result<Option<u32>> {
        let shard: Option<i32> =
            sqlx::query_scalar("SELECT shard FROM tandem_txn_claim WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("read a transaction id's claim"))?;
        Ok(shard.map(|s| s as u32))
    }

    /// Up to `limit` ids `shard` claimed more than `age` ago.
    pub async fn old_claims(&self, shard: u32, age: Duration, limit: i64) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT id FROM tandem_txn_claim \
             WHERE shard = $1 AND claimed_at < now() - make_interval(secs => $2::bigint / 1000.0) \
             ORDER BY claimed_at LIMIT $3",
        )
        .bind(shard as i32)
        .bind(age.as_millis() as i64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read old transaction id claims"))
    }

    /// Forgets the claims of `shard` on `ids` made (or renewed) more than
    /// `age` ago.
    pub async fn drop_claims(&self, shard: u32, ids: &[String], age: Duration) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM tandem_txn_claim WHERE shard = $1 AND id = ANY($2) \
             AND claimed_at < now() - make_interval(secs => $3::bigint / 1000.0)",
        )
        .bind(shard as i32)
        .bind(ids)
        .bind(age.as_millis() as i64)
        .execute(&self.pool)
        .await
        .map_err(db("forget transaction id claims"))?;
        Ok(r.rows_affected())
    }

    /// Opens log `ns` (its partitions and their offsets) for writing under
    /// `lease`.
    pub async fn open(&self, ns: &str, lease: &Lease, config: LogConfig) -> Result<PgLog> {
        let rows = sqlx::query(
            "SELECT topic, partition, log_start, next_offset, size_bytes \
             FROM tandem_partition WHERE ns = $1",
        )
        .bind(ns)
        .fetch_all(&self.pool)
        .await
        .map_err(db("load partitions"))?;
        let mut parts = HashMap::new();
        for r in rows {
            let tp = TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(1) as u32);
            parts.insert(
                tp,
                Arc::new(Part::new(
                    r.get::<i64, _>(2) as u64,
                    r.get::<i64, _>(3) as u64,
                    r.get::<i64, _>(4) as u64,
                )),
            );
        }
        let (queue, rx) = mpsc::channel(config.append_queue.max(1));
        let inner = Arc::new(Inner {
            pool: self.pool.clone(),
            ns: ns.to_owned(),
            lease: lease.clone(),
            config,
            parts: RwLock::new(parts),
            failed: watch::Sender::new(None),
            writer: Mutex::new(None),
        });
        let task = tokio::spawn(write_loop(inner.clone(), rx));
        *lock(&inner.writer) = Some(task);
        Ok(PgLog {
            inner,
            queue: Arc::new(Mutex::new(Some(queue))),
        })
    }
}

/// One partition's offsets as the holder knows them.
struct Part {
    state: Mutex<PartState>,
    hwm: watch::Sender<(u64, bool)>,
}

#[derive(Clone, Copy)]
struct PartState {
    log_start: u64,
    next: u64,
    size: u64,
}

impl Part {
    fn new(log_start: u64, next: u64, size: u64) -> Part {
        Part {
            state: Mutex::new(PartState {
                log_start,
                next,
                size,
            }),
            hwm: watch::Sender::new((next, false)),
        }
    }

    fn state(&self) -> PartState {
        *lock(&self.state)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Pending {
    tp: TopicPartition,
    part: Arc<Part>,
    records: Vec<Record>,
    bytes: usize,
    reply: oneshot::Sender<Result<AppendAck>>,
}

struct Inner {
    pool: PgPool,
    ns: String,
    lease: Lease,
    config: LogConfig,
    parts: RwLock<HashMap<TopicPartition, Arc<Part>>>,
    failed: watch::Sender<Option<String>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Partitioned logs in PostgreSQL tables, written under a lease.
#[derive(Clone)]
pub struct PgLog {
    inner: Arc<Inner>,
    /// The writer's queue, held by the handles only: taken on close, or
    /// dropped with the last handle, it ends the writer once drained.
    queue: Arc<Mutex<Option<mpsc::Sender<Pending>>>>,
}

impl std::fmt::Debug for PgLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLog")
            .field("ns", &self.inner.ns)
            .field("lease", &self.inner.lease.name)
            .field("epoch", &self.inner.lease.epoch)
            .finish()
    }
}

/// Bytes a record counts for in a partition's size: its size in the
/// embedded format (the SQL statements that free space count the same).
fn stored_len(r: &Record) -> usize {
    batch::record_len(r)
}

fn encode_headers(headers: &[Header]) -> Option<Vec<u8>> {
    if headers.is_empty() {
        return None;
    }
    let mut v = Vec::new();
    v.extend_from_slice(&(headers.len() as u16).to_le_bytes());
    for h in headers {
        v.extend_from_slice(&(h.name.len() as u16).to_le_bytes());
        v.extend_from_slice(h.name.as_bytes());
        v.extend_from_slice(&(h.value.len() as u32).to_le_bytes());
        v.extend_from_slice(&h.value);
    }
    Some(v)
}

fn decode_headers(b: Option<Vec<u8>>) -> std::result::Result<Vec<Header>, String> {
    let Some(b) = b else { return Ok(Vec::new()) };
    let mut b = Bytes::from(b);
    let short = || "headers cut short".to_owned();
    if b.remaining() < 2 {
        return Err(short());
    }
    let n = b.get_u16_le();
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if b.remaining() < 2 {
            return Err(short());
        }
        let len = b.get_u16_le() as usize;
        if b.remaining() < len {
            return Err(short());
        }
        let name = String::from_utf8(b.split_to(len).to_vec())
            .map_err(|_| "header name is not UTF-8".to_owned())?;
        if b.remaining() < 4 {
            return Err(short());
        }
        let len = b.get_u32_le() as usize;
        if b.remaining() < len {
            return Err(short());
        }
        out.push(Header {
            name,
            value: b.split_to(len),
        });
    }
    Ok(out)
}

/// Locks the lease row for the rest of `tx` and checks its epoch: a
/// replica taking the lease over (which locks the row FOR UPDATE) waits for
/// this transaction, and this one sees the new epoch if the takeover came
/// first. KEY SHARE, so that the holder's renewals (which change no key)
/// never wait for writes.
async fn fence(tx: &mut Transaction<'_, Postgres>, lease: &Lease) -> Result<()> {
    let epoch: Option<i64> =
        sqlx::query_scalar("SELECT epoch FROM tandem_lease WHERE name = $1 FOR KEY SHARE")
            .bind(&lease.name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("check the lease"))?;
    if epoch == Some(lease.epoch) {
        Ok(())
    } else {
        Err(Error::Fenced {
            lease: lease.name.clone(),
            epoch: lease.epoch,
            current: epoch,
        })
    }
}

impl PgLog {
    /// Resolves to the cause once a write failed; the log then refuses every
    /// write and must be dropped and opened afresh.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.inner.failed.subscribe()
    }

    /// The lease it writes under.
    pub fn lease(&self) -> &Lease {
        &self.inner.lease
    }

    fn part(&self, tp: &TopicPartition) -> Result<Arc<Part>> {
        self.inner
            .parts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tp)
            .cloned()
            .ok_or_else(|| Error::UnknownPartition(tp.clone()))
    }

    fn check_failed(&self, tp: &TopicPartition) -> Result<()> {
        match &*self.inner.failed.borrow() {
            Some(cause) => Err(Error::Poisoned {
                tp: tp.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&self, e: &Error) {
        fail(&self.inner, e);
    }

    /// Applies the retention limits to every partition now; returns the
    /// number of records deleted.
    pub async fn enforce_retention(&self) -> Result<usize> {
        let retention = self.inner.config.retention;
        if retention.max_age.is_none() && retention.max_bytes.is_none() {
            return Ok(0);
        }
        let parts: Vec<(TopicPartition, Arc<Part>)> = self
            .inner
            .parts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(tp, p)| (tp.clone(), p.clone()))
            .collect();
        let mut deleted = 0;
        for (tp, part) in parts {
            let before = part.state();
            let mut target = before.log_start;
            if let Some(age) = retention.max_age {
                let cutoff = chrono::Utc::now().timestamp_millis() - age.as_millis() as i64;
                let first_fresh: Option<i64> = sqlx::query_scalar(
                    "SELECT min(\"offset\") FROM tandem_record \
                     WHERE ns = $1 AND topic = $2 AND partition = $3 AND timestamp_ms >= $4",
                )
                .bind(&self.inner.ns)
                .bind(&tp.topic)
                .bind(tp.partition as i32)
                .bind(cutoff)
                .fetch_one(&self.inner.pool)
                .await
                .map_err(db("find records to keep"))?;
                target = target.max(first_fresh.map_or(before.next, |o| o as u64));
            }
            if let Some(max) = retention.max_bytes
                && before.size > max
            {
                let last_over: Option<i64> = sqlx::query_scalar(
                    "SELECT max(\"offset\") FROM ( \
                         SELECT \"offset\", sum(octet_length(id) + coalesce(octet_length(key), 0) \
                             + octet_length(value) + coalesce(octet_length(headers) - 2, 0) + 24) \
                             OVER (ORDER BY \"offset\" DESC) AS tail \
                         FROM tandem_record WHERE ns = $1 AND topic = $2 AND partition = $3) t \
                     WHERE tail > $4",
                )
                .bind(&self.inner.ns)
                .bind(&tp.topic)
                .bind(tp.partition as i32)
                .bind(max as i64)
                .fetch_one(&self.inner.pool)
                .await
                .map_err(db("find records over the size limit"))?;
                if let Some(o) = last_over {
                    target = target.max(o as u64 + 1);
                }
            }
            // In steps, each its own short transaction: a long delete would
            // hold the lease row (KEY SHARE) and hold a takeover up.
            let mut start = before.log_start;
            while start < target {
                let next = self
                    .truncate_before(&tp, target.min(start + RETENTION_STEP))
                    .await?;
                if next <= start {
                    break;
                }
                deleted += (next - start) as usize;
                start = next;
            }
        }
        Ok(deleted)
    }

    /// Lets queued appends finish and stops the writer; wakes waiters.
    /// Appends after this fail with [`Error::Closed`].
    pub async fn close(&self) {
        drop(lock(&self.queue).take());
        let task = lock(&self.inner.writer).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        for p in self
            .inner
            .parts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            p.hwm.send_modify(|(_, closed)| *closed = true);
        }
    }
}

fn fail(inner: &Inner, e: &Error) {
    let cause = e.to_string();
    inner.failed.send_if_modified(|f| {
        if f.is_none() {
            tracing::error!(log = %inner.ns, cause = %cause, "write to PostgreSQL failed: the log refuses writes until reopened");
            *f = Some(cause.clone());
            true
        } else {
            false
        }
    });
}

/// Gathers queued appends and writes each gathering in one transaction.
async fn write_loop(inner: Arc<Inner>, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.bytes;
        let mut group = vec![first];
        while bytes < inner.config.max_group_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.bytes;
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        if let Some(cause) = inner.failed.borrow().clone() {
            for p in group {
                let _ = p.reply.send(Err(Error::Poisoned {
                    tp: p.tp,
                    cause: cause.clone(),
                }));
            }
            continue;
        }
        match write_group(&inner, &group).await {
            Ok(acks) => {
                for (p, ack) in group.into_iter().zip(acks) {
                    let added: u64 = p.records.iter().map(|r| stored_len(r) as u64).sum();
                    {
                        let mut s = lock(&p.part.state);
                        s.next = ack.last_offset + 1;
                        s.size += added;
                    }
                    p.part.hwm.send_modify(|(h, _)| *h = ack.last_offset + 1);
                    let _ = p.reply.send(Ok(ack));
                }
            }
            Err(e) => {
                fail(&inner, &e);
                for p in group {
                    let _ = p.reply.send(Err(Error::Poisoned {
                        tp: p.tp,
                        cause: e.to_string(),
                    }));
                }
            }
        }
    }
}

/// Writes `group` in one transaction; the offsets each append was given.
async fn write_group(inner: &Inner, group: &[Pending]) -> Result<Vec<AppendAck>> {
    // Offsets, per partition in queue order, from what the holder knows.
    let mut next: HashMap<&TopicPartition, (u64, u64)> = HashMap::new();
    let mut acks = Vec::with_capacity(group.len());
    let n: usize = group.iter().map(|p| p.records.len()).sum();
    let (mut topics, mut partitions, mut offsets) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut ids, mut keys, mut values, mut headers, mut stamps) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut added: HashMap<&TopicPartition, i64> = HashMap::new();
    for p in group {
        let entry = next.entry(&p.tp).or_insert_with(|| {
            let s = p.part.state();
            (s.next, s.next)
        });
        let base = entry.1;
        for (i, r) in p.records.iter().enumerate() {
            topics.push(p.tp.topic.as_str());
            partitions.push(p.tp.partition as i32);
            offsets.push((base + i as u64) as i64);
            ids.push(r.id.to_vec());
            keys.push(r.key.as_ref().map(|k| k.to_vec()));
            values.push(r.value.to_vec());
            headers.push(encode_headers(&r.headers));
            stamps.push(r.timestamp_ms);
            *added.entry(&p.tp).or_default() += stored_len(r) as i64;
        }
        entry.1 = base + p.records.len() as u64;
        acks.push(AppendAck {
            base_offset: base,
            last_offset: entry.1 - 1,
        });
    }
    let point = format!("storage.pg.write:{}", inner.ns);
    if let Some(d) = crate::failpoint::delay(&point) {
        tokio::time::sleep(d).await;
    }
    if crate::failpoint::error(&point) {
        return Err(Error::Store {
            what: "append",
            cause: "failpoint".into(),
        });
    }
    let mut tx = inner.pool.begin().await.map_err(db("begin an append"))?;
    fence(&mut tx, &inner.lease).await?;
    sqlx::query(
        "INSERT INTO tandem_record \
             (ns, topic, partition, \"offset\", id, key, value, headers, timestamp_ms) \
         SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bytea[], \
             $6::bytea[], $7::bytea[], $8::bytea[], $9::bigint[])",
    )
    .bind(&inner.ns)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&ids)
    .bind(&keys)
    .bind(&values)
    .bind(&headers)
    .bind(&stamps)
    .execute(&mut *tx)
    .await
    .map_err(db("append"))?;
    let (mut u_topics, mut u_parts, mut u_expected, mut u_next, mut u_added) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (tp, (expected, next)) in &next {
        u_topics.push(tp.topic.as_str());
        u_parts.push(tp.partition as i32);
        u_expected.push(*expected as i64);
        u_next.push(*next as i64);
        u_added.push(added.get(tp).copied().unwrap_or(0));
    }
    let updated = sqlx::query(
        "UPDATE tandem_partition p SET next_offset = u.next, size_bytes = p.size_bytes + u.added \
         FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[]) \
             AS u(topic, partition, expected, next, added) \
         WHERE p.ns = $1 AND p.topic = u.topic AND p.partition = u.partition \
             AND p.next_offset = u.expected",
    )
    .bind(&inner.ns)
    .bind(&u_topics)
    .bind(&u_parts)
    .bind(&u_expected)
    .bind(&u_next)
    .bind(&u_added)
    .execute(&mut *tx)
    .await
    .map_err(db("advance the partitions"))?;
    if updated.rows_affected() != next.len() as u64 {
        return Err(Error::Store {
            what: "advance the partitions",
            cause: "a partition's next offset moved under the lease holder".into(),
        });
    }
    tx.commit().await.map_err(db("commit an append"))?;
    Ok(acks)
}

impl Log for PgLog {
    async fn create_partition(&self, tp: &TopicPartition) -> Result<()> {
        validate_topic_name(&tp.topic)?;
        self.check_failed(tp)?;
        if self.part(tp).is_ok() {
            return Err(Error::PartitionExists(tp.clone()));
        }
        let result: Result<bool> = async {
            let mut tx = self.inner.pool.begin().await.map_err(db("begin"))?;
            fence(&mut tx, &self.inner.lease).await?;
            let r = sqlx::query(
                "INSERT INTO tandem_partition (ns, topic, partition) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&self.inner.ns)
            .bind(&tp.topic)
            .bind(tp.partition as i32)
            .execute(&mut *tx)
            .await
            .map_err(db("create a partition"))?;
            tx.commit().await.map_err(db("commit a new partition"))?;
            Ok(r.rows_affected() == 1)
        }
        .await;
        match result {
            Ok(true) => {
                self.inner
                    .parts
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(tp.clone(), Arc::new(Part::new(0, 0, 0)));
                Ok(())
            }
            // Made by an earlier holder after this one loaded the table:
            // impossible under the lease, so the holder's view is stale.
            Ok(false) => {
                let e = Error::Store {
                    what: "create a partition",
                    cause: format!("{tp} exists in PostgreSQL but not in the lease holder's view"),
                };
                self.fail(&e);
                Err(e)
            }
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }

    async fn delete_partition(&self, tp: &TopicPartition) -> Result<()> {
        self.check_failed(tp)?;
        self.part(tp)?;
        // Gone from this holder's view first: appends from now on are
        // refused rather than racing the deletion.
        self.inner
            .parts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(tp);
        let result: Result<()> = async {
            let mut tx = self.inner.pool.begin().await.map_err(db("begin"))?;
            fence(&mut tx, &self.inner.lease).await?;
            for sql in [
                "DELETE FROM tandem_record WHERE ns = $1 AND topic = $2 AND partition = $3",
                "DELETE FROM tandem_partition WHERE ns = $1 AND topic = $2 AND partition = $3",
            ] {
                sqlx::query(sql)
                    .bind(&self.inner.ns)
                    .bind(&tp.topic)
                    .bind(tp.partition as i32)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("delete a partition"))?;
            }
            tx.commit()
                .await
                .map_err(db("commit a partition's deletion"))?;
            Ok(())
        }
        .await;
        if let Err(e) = &result {
            // Unknown what the database kept: this holder stops.
            self.fail(e);
        }
        result
    }

    fn partitions(&self) -> Vec<TopicPartition> {
        let mut v: Vec<_> = self
            .inner
            .parts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    async fn append(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<AppendAck> {
        if records.is_empty() {
            return Err(Error::EmptyBatch);
        }
        let mut bytes = batch::HEADER_LEN;
        for (i, r) in records.iter().enumerate() {
            bytes += batch::check_record(i, r, self.inner.config.max_record_bytes)?;
        }
        if bytes > self.inner.config.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                size: bytes,
                max: self.inner.config.max_batch_bytes,
            });
        }
        let part = self.part(tp)?;
        self.check_failed(tp)?;
        let (reply, rx) = oneshot::channel();
        let queue = lock(&self.queue).clone().ok_or(Error::Closed)?;
        queue
            .send(Pending {
                tp: tp.clone(),
                part,
                records,
                bytes,
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Every append is committed in PostgreSQL before it is acknowledged.
    async fn append_relaxed(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<AppendAck> {
        self.append(tp, records).await
    }

    async fn sync(&self, tp: &TopicPartition) -> Result<()> {
        self.part(tp)?;
        self.check_failed(tp)
    }

    async fn read(
        &self,
        tp: &TopicPartition,
        from: u64,
        budget: ReadBudget,
    ) -> Result<Vec<StoredRecord>> {
        let part = self.part(tp)?;
        let s = part.state();
        if from < s.log_start || from > s.next {
            return Err(Error::OffsetOutOfRange {
                tp: tp.clone(),
                offset: from,
                start: s.log_start,
                end: s.next,
            });
        }
        if from == s.next || budget.max_records == 0 {
            return Ok(Vec::new());
        }
        if let Some(d) = crate::failpoint::delay(&format!("storage.read:{tp}")) {
            tokio::time::sleep(d).await;
        }
        // Streamed, and dropped once the byte budget is spent: a budget of
        // 1 MiB never fetches more than about that.
        let mut rows = sqlx::query(
            "SELECT \"offset\", id, key, value, headers, timestamp_ms FROM tandem_record \
             WHERE ns = $1 AND topic = $2 AND partition = $3 AND \"offset\" >= $4 \
                 AND \"offset\" < $5 \
             ORDER BY \"offset\" LIMIT $6",
        )
        .bind(&self.inner.ns)
        .bind(&tp.topic)
        .bind(tp.partition as i32)
        .bind(from as i64)
        .bind(s.next as i64)
        .bind(budget.max_records.min(i64::MAX as usize) as i64)
        .fetch(&self.inner.pool);
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(r) = rows.try_next().await.map_err(db("read"))? {
            let offset = r.get::<i64, _>(0) as u64;
            let headers = decode_headers(r.get(4)).map_err(|reason| Error::Store {
                what: "read",
                cause: format!("record {tp}@{offset}: {reason}"),
            })?;
            let record = Record {
                id: Bytes::from(r.get::<Vec<u8>, _>(1)),
                key: r.get::<Option<Vec<u8>>, _>(2).map(Bytes::from),
                value: Bytes::from(r.get::<Vec<u8>, _>(3)),
                headers,
                timestamp_ms: r.get(5),
            };
            bytes += stored_len(&record);
            if !out.is_empty() && bytes > budget.max_bytes {
                break;
            }
            out.push(StoredRecord { offset, record });
        }
        // Rows below the start may have gone since the check: a gap would
        // mean records removed under a reader, which is what retention does.
        Ok(out)
    }

    fn offsets(&self, tp: &TopicPartition) -> Result<Offsets> {
        let s = self.part(tp)?.state();
        Ok(Offsets {
            log_start: s.log_start,
            high_water_mark: s.next,
            size_bytes: s.size,
        })
    }

    async fn wait_for(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        let mut rx = self.part(tp)?.hwm.subscribe();
        let (hwm, _) = *rx
            .wait_for(|(h, closed)| *h > offset || *closed)
            .await
            .map_err(|_| Error::Closed)?;
        if hwm > offset {
            Ok(hwm)
        } else {
            Err(Error::Closed)
        }
    }

    async fn truncate_before(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        let part = self.part(tp)?;
        self.check_failed(tp)?;
        let s = part.state();
        let target = offset.min(s.next);
        if target <= s.log_start {
            return Ok(s.log_start);
        }
        let result: Result<i64> = async {
            let mut tx = self.inner.pool.begin().await.map_err(db("begin"))?;
            fence(&mut tx, &self.inner.lease).await?;
            let freed: i64 = sqlx::query_scalar(
                "WITH d AS (DELETE FROM tandem_record \
                     WHERE ns = $1 AND topic = $2 AND partition = $3 AND \"offset\" < $4 \
                     RETURNING octet_length(id) + coalesce(octet_length(key), 0) \
                         + octet_length(value) + coalesce(octet_length(headers) - 2, 0) + 24 AS n) \
                 UPDATE tandem_partition SET log_start = greatest(log_start, $4), \
                     size_bytes = greatest(0, size_bytes - (SELECT coalesce(sum(n), 0) FROM d)) \
                 WHERE ns = $1 AND topic = $2 AND partition = $3 \
                 RETURNING (SELECT coalesce(sum(n), 0) FROM d)::bigint",
            )
            .bind(&self.inner.ns)
            .bind(&tp.topic)
            .bind(tp.partition as i32)
            .bind(target as i64)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("truncate"))?;
            tx.commit().await.map_err(db("commit a truncation"))?;
            Ok(freed)
        }
        .await;
        match result {
            Ok(freed) => {
                let mut st = lock(&part.state);
                st.log_start = st.log_start.max(target);
                st.size = st.size.saturating_sub(freed as u64);
                Ok(st.log_start)
            }
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }
}
