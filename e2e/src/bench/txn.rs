//! Transactional messages end to end through Tandem, fsync on everywhere:
//! Begin (prepare) → the producing service's local transaction → Commit →
//! delivered → the consuming service's effect, deduplicated.
//!
//! One process holds a coordinator, the producer's sidecar (service
//! `orders`), the consumer's sidecar (service `cart`) and the consumer app;
//! all talk gRPC over loopback. Producer workers (the producing app's
//! request handlers) run Begin → local transaction → Commit flat out, then
//! paced; throughput is what the consumer applied per second, latency is
//! from Begin to the consumer's applied effect.
//!
//! Where the services' tables live ([`Tables`]):
//! - nowhere: no local transaction, and the consumer's sidecar deduplicates
//!   on its own (SIDECAR mode, SQLite): Tandem's own part;
//! - SQLite or PostgreSQL: the producer inserts its business row and its
//!   `tandem_txn` row in one local transaction (table mode); the consumer
//!   inserts its `tandem_inbox` row and its effect row in one transaction
//!   (STRONG mode). SQLite syncs every commit (FULL), one writer connection
//!   per file; PostgreSQL pools hold 16 connections per service.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use sqlx::{PgPool, SqlitePool};
use tandem_proto::app as app_pb;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{CpuWindow, Latencies, Phase, Window, micros_since, wait_for};

/// PostgreSQL connections per service.
const PG_CONNECTIONS: u32 = 16;

/// Where the services' tables live.
#[derive(Clone, Debug)]
pub enum Tables {
    /// No local transaction, no effect: Tandem's own part.
    Skipped,
    /// One SQLite file per service (FULL sync).
    Sqlite,
    /// One database per service on the PostgreSQL server of this URL.
    Postgres(String),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of each phase.
    pub seconds: Duration,
    /// Producer workers, each one transaction at a time.
    pub workers: usize,
    /// The paced phases after the peak.
    pub pacing: super::Pacing,
    /// The consumer's `max_batch`: above 1 it takes messages in
    /// `HandleMessages` calls and applies each call's in one transaction.
    pub batch: u32,
    /// The services' tables.
    pub tables: Tables,
    /// Runs the coordinator on this PostgreSQL server (a fresh database)
    /// instead of the embedded store.
    pub coordinator_on: Option<String>,
    /// Shards of that store (`None`: the coordinator's default).
    pub shards: Option<u32>,
    /// The coordinator's group commit wait (`None`: its default).
    pub group_commit_wait: Option<std::time::Duration>,
    /// Folder for the coordinator's data and SQLite files.
    pub dir: PathBuf,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Transactions committed per second, peak.
    pub committed_per_s: f64,
    /// Effects applied per second at the consumer while producers ran flat
    /// out (after a warm-up of a fifth of the phase).
    pub applied_per_s: f64,
    /// This process's CPU per applied transaction over that window, µs (the
    /// coordinator, both sidecars, both apps and the bench; not PostgreSQL).
    pub cpu_us: f64,
    /// Mean Begin, local transaction and Commit times under peak load, ms.
    pub stages_ms: [f64; 3],
    /// The coordinator's `fdatasync` calls per applied transaction over the
    /// peak's last 80 % (`None` on the PostgreSQL store).
    pub fsyncs_per_txn: Option<f64>,
    /// Latency in each paced phase, the main one first.
    pub curve: Vec<super::Point>,
}

/// The consumer app: applies each message's effect (or only counts it)
/// and notes how long it took from Begin.
struct Consumer {
    epoch: Instant,
    /// Distinct messages applied: a redelivery is not counted twice.
    applied: AtomicU64,
    latencies: Latencies,
    /// Ids of the messages applied so far.
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
    effects: Effects,
}

enum Effects {
    None,
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

fn internal(e: sqlx::Error) -> Status {
    Status::internal(e.to_string())
}

impl Consumer {
    /// The inbox rows and effects of a batch in one transaction (on
    /// PostgreSQL set-based, as the outbox's relay writes its batches); a
    /// message already in the inbox changes nothing.
    async fn apply_batch(&self, reqs: &[app_pb::HandleMessageRequest]) -> Result<(), Status> {
        match &self.effects {
            Effects::None => Ok(()),
            Effects::Sqlite(pool) => {
                // One writer connection: the batch's statements in a row,
                // one commit.
                let mut tx = pool.begin().await.map_err(internal)?;
                for req in reqs {
                    let m = req.message.clone().unwrap_or_default();
                    let fresh = sqlx::query("INSERT INTO tandem_inbox (consumer_group, topic, message_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                        .bind(&req.group)
                        .bind(&req.topic)
                        .bind(&m.id)
                        .execute(&mut *tx)
                        .await
                        .map_err(internal)?
                        .rows_affected()
                        == 1;
                    if fresh {
                        sqlx::query("INSERT INTO effects (message_id, value) VALUES ($1, $2)")
                            .bind(&m.id)
                            .bind(&m.value[..])
                            .execute(&mut *tx)
                            .await
                            .map_err(internal)?;
                    }
                }
                tx.commit().await.map_err(internal)
            }
            Effects::Postgres(pool) => {
                let (mut groups, mut topics, mut ids, mut values) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for req in reqs {
                    let m = req.message.clone().unwrap_or_default();
                    groups.push(req.group.clone());
                    topics.push(req.topic.clone());
                    ids.push(m.id);
                    values.push(m.value.to_vec());
                }
                let mut tx = pool.begin().await.map_err(internal)?;
                let fresh: Vec<String> = sqlx::query_scalar(
                    "INSERT INTO tandem_inbox (consumer_group, topic, message_id) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) \
                     ON CONFLICT DO NOTHING RETURNING message_id",
                )
                .bind(&groups)
                .bind(&topics)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(internal)?;
                let fresh: std::collections::HashSet<String> = fresh.into_iter().collect();
                let (ids, values): (Vec<String>, Vec<Vec<u8>>) = ids
                    .into_iter()
                    .zip(values)
                    .filter(|(id, _)| fresh.contains(id))
                    .unzip();
                sqlx::query(
                    "INSERT INTO effects (message_id, value) SELECT * FROM UNNEST($1::text[], $2::bytea[])",
                )
                .bind(&ids)
                .bind(&values)
                .execute(&mut *tx)
                .await
                .map_err(internal)?;
                tx.commit().await.map_err(internal)
            }
        }
    }

    /// Counts an applied message and its latency from Begin, the first
    /// time its id is handed over.
    fn applied(&self, req: &app_pb::HandleMessageRequest) {
        let now = micros_since(self.epoch);
        let id = req.message.as_ref().map_or("", |m| m.id.as_str());
        let first = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned());
        if !first && !id.is_empty() {
            return;
        }
        self.applied.fetch_add(1, Ordering::Relaxed);
        let begun = req.message.as_ref().and_then(|m| {
            let h = m.headers.iter().find(|h| h.name == "bench.begin-us")?;
            std::str::from_utf8(&h.value).ok()?.parse::<u64>().ok()
        });
        if let Some(begun) = begun {
            self.latencies.add(now.saturating_sub(begun));
        }
    }
}

#[tonic::async_trait]
impl App for Consumer {
    async fn execute_local_transaction(
        &self,
        _: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("table mode"))
    }

    async fn check_local_transaction(
        &self,
        _: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("table mode"))
    }

    async fn handle_message(
        &self,
        req: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        let req = req.into_inner();
        self.apply_batch(std::slice::from_ref(&req)).await?;
        self.applied(&req);
        Ok(Response::new(app_pb::HandleMessageResponse {}))
    }

    async fn execute_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented(
            "the transaction bench app takes part in no saga",
        ))
    }

    async fn compensate_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented(
            "the transaction bench app takes part in no saga",
        ))
    }

    async fn handle_messages(
        &self,
        req: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        let reqs = req.into_inner().messages;
        self.apply_batch(&reqs).await?;
        for r in &reqs {
            self.applied(r);
        }
        // No results: every message was handled.
        Ok(Response::new(app_pb::HandleMessagesResponse::default()))
    }
}

/// Sums of time spent per stage of the producer's transactions (µs).
#[derive(Default)]
struct Stages {
    begin: AtomicU64,
    local: AtomicU64,
    commit: AtomicU64,
    count: AtomicU64,
}

impl Stages {
    fn add(c: &AtomicU64, since: Instant) -> Instant {
        c.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        Instant::now()
    }

    fn means_ms(&self) -> [f64; 3] {
        let n = self.count.load(Ordering::Relaxed).max(1) as f64 * 1000.0;
        let ms = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / n;
        [ms(&self.begin), ms(&self.local), ms(&self.commit)]
    }
}

/// The producing app's database.
#[derive(Clone)]
enum Local {
    None,
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One producer transaction: Begin, the local transaction, Commit.
async fn transaction(
    s: &mut SidecarClient<Channel>,
    db: &Local,
    epoch: Instant,
    n: u64,
    due: Instant,
    stages: &Stages,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let begin = sc::BeginRequest {
        topic: "orders".into(),
        message: Some(pb::Message {
            id: String::new(),
            key: Some(Bytes::from(format!("user-{}", n % 1000))),
            value: Bytes::from(vec![b'x'; 100]),
            headers: vec![pb::Header {
                name: "bench.begin-us".into(),
                value: Bytes::from(super::micros_at(epoch, due).to_string()),
            }],
            partition: None,
        }),
        txn_id: String::new(),
        check_mode: sc::CheckMode::Table as i32,
    };
    let txn_id = s.begin(begin).await.context("Begin")?.into_inner().txn_id;
    let t = Stages::add(&stages.begin, t);
    const BUSINESS: &str = "INSERT INTO business (txn_id, value) VALUES ($1, 'order')";
    const TXN: &str = "INSERT INTO tandem_txn (txn_id) VALUES ($1)";
    macro_rules! local {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await?;
            sqlx::query(BUSINESS)
                .bind(&txn_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(TXN).bind(&txn_id).execute(&mut *tx).await?;
            tx.commit().await?;
        }};
    }
    match db {
        Local::None => {}
        Local::Sqlite(p) => local!(p),
        Local::Postgres(p) => local!(p),
    }
    let t = Stages::add(&stages.local, t);
    s.commit(sc::EndRequest { txn_id })
        .await
        .context("Commit")?;
    Stages::add(&stages.commit, t);
    stages.count.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

pub(super) async fn listener() -> anyhow::Result<(TcpListener, String)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = format!("http://{}", l.local_addr()?);
    Ok((l, a))
}

pub(super) async fn sqlite(path: &std::path::Path) -> anyhow::Result<SqlitePool> {
    use std::str::FromStr;
    // One connection: SQLite takes one writer at a time, and a queue in
    // the pool beats busy-waiting in SQLite.
    let opts =
        sqlx::sqlite::SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
    Ok(sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?)
}

async fn postgres(url: &str) -> anyhow::Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(PG_CONNECTIONS)
        .connect(url)
        .await?)
}

/// Servers started for one run, stopped when it ends.
struct Servers {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    databases: Vec<String>,
}

impl Servers {
    fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        for db in &self.databases {
            super::drop_database(db).await;
        }
    }
}

/// Runs the scenario; `label` names it on the progress bar.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut servers = Servers {
        stop,
        tasks: Vec::new(),
        databases: Vec::new(),
    };
    let result = scenario(opts, label, &mut servers).await;
    servers.stop().await;
    result
}

async fn scenario(opts: &Options, label: &str, servers: &mut Servers) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.dir)?;
    let (cl, coordinator_url) = listener().await?;
    let store = match &opts.coordinator_on {
        Some(server) => {
            let url = super::fresh_database(server, "store").await?;
            servers.databases.push(url.clone());
            tandem_coordinator::Store::Postgres { url }
        }
        None => tandem_coordinator::Store::Embedded,
    };
    let mut config = tandem_coordinator::Config {
        data_dir: opts.dir.join("coordinator"),
        store,
        ..Default::default()
    };
    if let Some(n) = opts.shards {
        config.replication.shards = n;
    }
    if let Some(w) = opts.group_commit_wait {
        config.log.group_commit_wait = w;
    }
    let coordinator = tandem_coordinator::Coordinator::open(config)
        .await
        .context("opening the coordinator")?;
    let syncs = coordinator.sync_counter();
    let shutdown = servers.shutdown();
    servers.tasks.push(tokio::spawn(async move {
        let _ = coordinator.serve(cl, shutdown).await;
    }));
    super::wait_serving(&coordinator_url).await;
    CoordinatorClient::connect(coordinator_url.clone())
        .await?
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            partitions: 4,
        })
        .await?;

    // The services' databases.
    let (orders_db, cart_db) = match &opts.tables {
        Tables::Postgres(server) => {
            let orders = super::fresh_database(server, "orders").await?;
            let cart = super::fresh_database(server, "cart").await?;
            servers.databases.extend([orders.clone(), cart.clone()]);
            (orders, cart)
        }
        Tables::Skipped | Tables::Sqlite => (
            opts.dir.join("orders.db").display().to_string(),
            opts.dir.join("cart.db").display().to_string(),
        ),
    };

    let epoch = Instant::now();
    let (al, app_url) = listener().await?;

    let sidecar = |service: &str, db: &str, app: Option<String>| tandem_sidecar::Config {
        service: service.into(),
        coordinator: vec![coordinator_url.clone()],
        db: db.to_owned(),
        app,
        ..Default::default()
    };
    let (pl, producer_url) = listener().await?;
    let shutdown = servers.shutdown();
    let config = sidecar("orders", &orders_db, None);
    servers.tasks.push(tokio::spawn(async move {
        let _ = tandem_sidecar::serve(config, pl, shutdown).await;
    }));
    let (sl, consumer_url) = listener().await?;
    let shutdown = servers.shutdown();
    let config = sidecar("cart", &cart_db, Some(app_url));
    servers.tasks.push(tokio::spawn(async move {
        let _ = tandem_sidecar::serve(config, sl, shutdown).await;
    }));

    // Serving means the sidecars' tables exist.
    let mut producer = SidecarClient::connect(producer_url).await?;
    let mut cart = SidecarClient::connect(consumer_url).await?;
    for s in [&mut producer, &mut cart] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while s
            .list_subscriptions(sc::ListSubscriptionsRequest {})
            .await
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "a sidecar did not serve within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (local, effects) = match &opts.tables {
        Tables::Skipped => (Local::None, Effects::None),
        Tables::Sqlite => (
            Local::Sqlite(sqlite(&opts.dir.join("orders.db")).await?),
            Effects::Sqlite(sqlite(&opts.dir.join("cart.db")).await?),
        ),
        Tables::Postgres(_) => (
            Local::Postgres(postgres(&orders_db).await?),
            Effects::Postgres(postgres(&cart_db).await?),
        ),
    };
    const BUSINESS: &str =
        "CREATE TABLE IF NOT EXISTS business (txn_id TEXT PRIMARY KEY, value TEXT NOT NULL)";
    const EFFECTS: &str =
        "CREATE TABLE IF NOT EXISTS effects (message_id TEXT NOT NULL, value BYTEA NOT NULL)";
    match (&local, &effects) {
        (Local::Sqlite(o), Effects::Sqlite(c)) => {
            sqlx::query(BUSINESS).execute(o).await?;
            sqlx::query(sqlx::AssertSqlSafe(EFFECTS.replace("BYTEA", "BLOB")))
                .execute(c)
                .await?;
        }
        (Local::Postgres(o), Effects::Postgres(c)) => {
            sqlx::query(BUSINESS).execute(o).await?;
            sqlx::query(EFFECTS).execute(c).await?;
        }
        _ => {}
    }
    let strong = !matches!(effects, Effects::None);
    // The app server, now that its tables exist (its sidecar retries until
    // it answers).
    let consumer = Arc::new(Consumer {
        epoch,
        applied: AtomicU64::new(0),
        latencies: Latencies::default(),
        seen: Default::default(),
        effects,
    });
    let shutdown = servers.shutdown();
    let app = consumer.clone();
    servers.tasks.push(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AppServer::from_arc(app))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(al).with_nodelay(Some(true)),
                shutdown,
            )
            .await;
    }));
    cart.subscribe(sc::SubscribeRequest {
        topic: "orders".into(),
        group: "cart".into(),
        start_from: pb::StartFrom::Earliest as i32,
        dedup: if strong {
            sc::DedupMode::Strong
        } else {
            sc::DedupMode::Sidecar
        } as i32,
        max_in_flight: 256,
        max_batch: opts.batch,
        ..Default::default()
    })
    .await
    .context("Subscribe")?;

    // Warm-up: one transaction all the way through.
    transaction(
        &mut producer,
        &local,
        epoch,
        0,
        Instant::now(),
        &Stages::default(),
    )
    .await?;
    anyhow::ensure!(
        wait_for(&consumer.applied, 1, Duration::from_secs(30)).await,
        "the first transaction was not applied within 30 s"
    );

    // Peak: workers flat out.
    let secs = opts.seconds;
    let phase = Phase::start(format!("{label}: peak"), secs);
    let stages = Arc::new(Stages::default());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..opts.workers {
        let (mut s, db, stages) = (producer.clone(), local.clone(), stages.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = (w as u64) << 32;
            while start.elapsed() < secs {
                n += 1;
                transaction(&mut s, &db, epoch, n, Instant::now(), &stages).await?;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(secs / 5).await;
    let window = Window::open(&consumer.applied);
    let cpu = CpuWindow::open(&consumer.applied);
    let (syncs_before, applied_before) = (
        syncs.as_ref().map(|s| s.get()),
        consumer.applied.load(Ordering::Relaxed),
    );
    for t in tasks {
        t.await??;
    }
    let applied_per_s = window.rate(&consumer.applied);
    let cpu_us = cpu.micros_per_event(&consumer.applied);
    let fsyncs_per_txn = match (&syncs, syncs_before) {
        (Some(s), Some(before)) => {
            let applied = consumer.applied.load(Ordering::Relaxed) - applied_before;
            Some((s.get() - before) as f64 / applied.max(1) as f64)
        }
        _ => None,
    };
    let done = stages.count.load(Ordering::Relaxed);
    let committed_per_s = done as f64 / start.elapsed().as_secs_f64();
    phase.end().await;
    anyhow::ensure!(
        wait_for(&consumer.applied, done + 1, Duration::from_secs(120)).await,
        "the peak phase's transactions were not all applied within 120 s"
    );

    // Paced: latency from Begin to the applied effect.
    let paced_stages = Arc::new(Stages::default());
    let curve = super::paced(
        label,
        &opts.pacing,
        applied_per_s,
        secs,
        &consumer.latencies,
        "transactions",
        |n, due| {
            let (mut s, db, stages) = (producer.clone(), local.clone(), paced_stages.clone());
            async move { transaction(&mut s, &db, epoch, n, due, &stages).await }
        },
    )
    .await?;
    Ok(Report {
        committed_per_s,
        applied_per_s,
        cpu_us,
        stages_ms: stages.means_ms(),
        fsyncs_per_txn,
        curve,
    })
}
