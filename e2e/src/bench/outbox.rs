//! The baseline: the transactional outbox a user would write by hand on
//! PostgreSQL, with a relay polling it with `FOR UPDATE SKIP LOCKED`.
//!
//! Two databases on one server, one per service. The producing service
//! (`orders`) inserts its business row and an outbox row in one local
//! transaction, from `clients` connections flat out (then paced). Relay
//! workers each loop: lock a batch of the oldest outbox rows others have not
//! locked (`SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`), insert
//! their ids into the consuming service's (`cart`) inbox table
//! (`ON CONFLICT DO NOTHING`) and apply the effect of the new ones in one
//! transaction there, commit it, then delete the batch from the outbox and
//! commit. A relay crashing between the two commits redelivers the batch,
//! which the inbox filters: the same at-least-once delivery with
//! deduplicated effects as Tandem's. Relays sleep 1 ms when the outbox is
//! empty. With more than one relay, messages of one key may be applied out
//! of order (Tandem keeps per-key order); the baseline does not pay for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};

use super::{Latencies, Phase, Window, micros_since, wait_for};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of each phase.
    pub seconds: Duration,
    /// Producer connections, each one local transaction at a time.
    pub clients: usize,
    /// Relay workers.
    pub relays: usize,
    /// Outbox rows a relay moves per round.
    pub batch: i64,
    /// The paced phases after the peak.
    pub pacing: super::Pacing,
    /// Any database of the PostgreSQL server to run on.
    pub server: String,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Local transactions (business row + outbox row) committed per second.
    pub committed_per_s: f64,
    /// Effects applied per second in the consuming service's database while
    /// clients ran flat out (after a warm-up of a fifth of the phase).
    pub applied_per_s: f64,
    /// Latency in each paced phase, the main one first.
    pub curve: Vec<super::Point>,
}

const ORDERS_SCHEMA: [&str; 2] = [
    "CREATE TABLE business (id TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE outbox (id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, topic TEXT NOT NULL, \
     key TEXT, payload BYTEA NOT NULL, begun_us BIGINT NOT NULL)",
];
const CART_SCHEMA: [&str; 2] = [
    "CREATE TABLE inbox (message_id TEXT PRIMARY KEY, processed_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    "CREATE TABLE effects (message_id TEXT NOT NULL, value BYTEA NOT NULL)",
];

struct Shared {
    orders: PgPool,
    cart: PgPool,
    epoch: Instant,
    committed: AtomicU64,
    applied: AtomicU64,
    latencies: Latencies,
    stop: AtomicBool,
    batch: i64,
}

/// One producer transaction.
/// One producer transaction, due at `due` (its latency counts from there).
async fn transaction(s: &Shared, n: u64, due: Instant) -> anyhow::Result<()> {
    let begun = super::micros_at(s.epoch, due) as i64;
    let id = uuid::Uuid::now_v7().to_string();
    let mut tx = s.orders.begin().await?;
    sqlx::query("INSERT INTO business (id, value) VALUES ($1, 'order')")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO outbox (message_id, topic, key, payload, begun_us) VALUES ($1, 'orders', $2, $3, $4)")
        .bind(&id)
        .bind(format!("user-{}", n % 1000))
        .bind(vec![b'x'; 100])
        .bind(begun)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    s.committed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// One relay worker, until stopped.
async fn relay(s: Arc<Shared>) -> anyhow::Result<()> {
    while !s.stop.load(Ordering::Relaxed) {
        let mut outbox = s.orders.begin().await?;
        let rows = sqlx::query(
            "SELECT id, message_id, payload, begun_us FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(s.batch)
        .fetch_all(&mut *outbox)
        .await?;
        if rows.is_empty() {
            outbox.rollback().await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut message_ids = Vec::with_capacity(rows.len());
        let mut payloads = Vec::with_capacity(rows.len());
        let mut begun = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.push(r.try_get::<i64, _>(0)?);
            message_ids.push(r.try_get::<String, _>(1)?);
            payloads.push(r.try_get::<Vec<u8>, _>(2)?);
            begun.push(r.try_get::<i64, _>(3)?);
        }
        let mut inbox = s.cart.begin().await?;
        let fresh: Vec<String> = sqlx::query_scalar(
            "INSERT INTO inbox (message_id) SELECT * FROM UNNEST($1::text[]) ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(&message_ids)
        .fetch_all(&mut *inbox)
        .await?;
        let fresh: std::collections::HashSet<String> = fresh.into_iter().collect();
        let (effect_ids, effect_values): (Vec<String>, Vec<Vec<u8>>) = message_ids
            .iter()
            .zip(payloads)
            .filter(|(id, _)| fresh.contains(*id))
            .map(|(id, p)| (id.clone(), p))
            .unzip();
        sqlx::query(
            "INSERT INTO effects (message_id, value) SELECT * FROM UNNEST($1::text[], $2::bytea[])",
        )
        .bind(&effect_ids)
        .bind(&effect_values)
        .execute(&mut *inbox)
        .await?;
        inbox.commit().await?;
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *outbox)
            .await?;
        outbox.commit().await?;
        let now = micros_since(s.epoch);
        for (id, b) in message_ids.iter().zip(begun) {
            if fresh.contains(id) {
                s.latencies.add(now.saturating_sub(b as u64));
            }
        }
        s.applied.fetch_add(fresh.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Runs the baseline; `label` names it on the progress bar.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    let orders_url = super::fresh_database(&opts.server, "outbox_orders").await?;
    let cart_url = super::fresh_database(&opts.server, "outbox_cart").await?;
    let result = baseline(opts, label, &orders_url, &cart_url).await;
    super::drop_database(&orders_url).await;
    super::drop_database(&cart_url).await;
    result
}

async fn pool(url: &str, connections: usize) -> anyhow::Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections as u32)
        .connect(url)
        .await?)
}

async fn baseline(
    opts: &Options,
    label: &str,
    orders_url: &str,
    cart_url: &str,
) -> anyhow::Result<Report> {
    let shared = Arc::new(Shared {
        orders: pool(orders_url, opts.clients + opts.relays).await?,
        cart: pool(cart_url, opts.relays).await?,
        epoch: Instant::now(),
        committed: AtomicU64::new(0),
        applied: AtomicU64::new(0),
        latencies: Latencies::default(),
        stop: AtomicBool::new(false),
        batch: opts.batch,
    });
    for s in ORDERS_SCHEMA {
        sqlx::query(s).execute(&shared.orders).await?;
    }
    for s in CART_SCHEMA {
        sqlx::query(s).execute(&shared.cart).await?;
    }
    let relays: Vec<_> = (0..opts.relays)
        .map(|_| tokio::spawn(relay(shared.clone())))
        .collect();
    let result = phases(opts, label, &shared).await;
    shared.stop.store(true, Ordering::Relaxed);
    for r in relays {
        r.await??;
    }
    shared.orders.close().await;
    shared.cart.close().await;
    result
}

async fn phases(opts: &Options, label: &str, s: &Arc<Shared>) -> anyhow::Result<Report> {
    // Warm-up: one transaction all the way through.
    transaction(s, 0, Instant::now()).await?;
    anyhow::ensure!(
        wait_for(&s.applied, 1, Duration::from_secs(30)).await,
        "the first outbox row was not relayed within 30 s"
    );

    let secs = opts.seconds;
    let phase = Phase::start(format!("{label}: peak"), secs);
    let start = Instant::now();
    let before = s.committed.load(Ordering::Relaxed);
    let clients: Vec<_> = (0..opts.clients)
        .map(|c| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut n = (c as u64) << 32;
                while start.elapsed() < secs {
                    n += 1;
                    transaction(&s, n, Instant::now()).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(secs / 5).await;
    let window = Window::open(&s.applied);
    for c in clients {
        c.await??;
    }
    let applied_per_s = window.rate(&s.applied);
    let committed = s.committed.load(Ordering::Relaxed);
    let committed_per_s = (committed - before) as f64 / start.elapsed().as_secs_f64();
    phase.end().await;
    anyhow::ensure!(
        wait_for(&s.applied, committed, Duration::from_secs(120)).await,
        "the peak phase's outbox rows were not all relayed within 120 s"
    );

    let curve = super::paced(
        label,
        &opts.pacing,
        applied_per_s,
        secs,
        &s.latencies,
        "outbox rows",
        |n, due| {
            let s = s.clone();
            async move { transaction(&s, n, due).await }
        },
    )
    .await?;
    Ok(Report {
        committed_per_s,
        applied_per_s,
        curve,
    })
}
