//! Transactional messages end to end: Begin (prepare) → local transaction →
//! Commit → delivered → deduplicated acknowledgement, with fsync `always`.
//!
//! ```text
//! cargo bench -p tandem-e2e --bench txn -- [--seconds S] [--workers N] [--paced RATE] [--no-local] [--postgres URL]
//! ```
//!
//! `--postgres URL` (any database of a PostgreSQL server) runs the
//! coordinator on PostgreSQL instead, in a fresh database it creates there.
//!
//! One process holds a coordinator, a producer sidecar (service `orders`), a
//! consumer sidecar (service `cart`, dedup through `tandem_inbox`) and the
//! consumer app (a HandleMessage that notes the time); all talk gRPC over
//! loopback. Producer workers (the producing app's request handlers) run
//! Begin → a SQLite transaction inserting the business row and the
//! `tandem_txn` row → Commit, flat out; throughput is what the consumer app
//! handled per second. Then the workers are paced at `--paced` per second
//! and the time from Begin to the handler is measured per message.
//! `--no-local` skips the local transaction, to show Tandem's own part.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_proto::app as app_pb;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

/// The consumer app: notes how long each message took from Begin.
struct Handler {
    epoch: Instant,
    handled: AtomicU64,
    latencies: Mutex<Vec<u64>>,
    record: AtomicBool,
}

#[tonic::async_trait]
impl App for Handler {
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
        let now = self.epoch.elapsed().as_micros() as u64;
        self.handled.fetch_add(1, Ordering::Relaxed);
        if self.record.load(Ordering::Relaxed) {
            let m = req.into_inner().message.unwrap_or_default();
            if let Some(h) = m.headers.iter().find(|h| h.name == "bench.begin-us") {
                let begun: u64 = std::str::from_utf8(&h.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(now);
                self.latencies.lock().await.push(now.saturating_sub(begun));
            }
        }
        Ok(Response::new(app_pb::HandleMessageResponse {}))
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("address");
    (l, a)
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

    fn report(&self) -> String {
        let n = self.count.load(Ordering::Relaxed).max(1) as f64 * 1000.0;
        let ms = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / n;
        format!(
            "mean per transaction: Begin {:.2} ms, local transaction {:.2} ms, Commit {:.2} ms",
            ms(&self.begin),
            ms(&self.local),
            ms(&self.commit)
        )
    }
}

/// One producer transaction: Begin, the local transaction (unless `db` is
/// `None`), Commit.
async fn transaction(
    s: &mut SidecarClient<tonic::transport::Channel>,
    db: Option<&sqlx::SqlitePool>,
    epoch: Instant,
    n: u64,
    stages: &Stages,
) {
    let t = Instant::now();
    let begin = sc::BeginRequest {
        topic: "orders".into(),
        message: Some(pb::Message {
            id: String::new(),
            key: Some(Bytes::from(format!("user-{}", n % 1000))),
            value: Bytes::from(vec![b'x'; 100]),
            headers: vec![pb::Header {
                name: "bench.begin-us".into(),
                value: Bytes::from(epoch.elapsed().as_micros().to_string()),
            }],
            partition: None,
        }),
        txn_id: String::new(),
        check_mode: sc::CheckMode::Table as i32,
    };
    let txn_id = s.begin(begin).await.expect("begin").into_inner().txn_id;
    let t = Stages::add(&stages.begin, t);
    if let Some(db) = db {
        let mut tx = db.begin().await.expect("local begin");
        sqlx::query("INSERT INTO business (txn_id, value) VALUES ($1, 'order')")
            .bind(&txn_id)
            .execute(&mut *tx)
            .await
            .expect("business row");
        sqlx::query("INSERT INTO tandem_txn (txn_id) VALUES ($1)")
            .bind(&txn_id)
            .execute(&mut *tx)
            .await
            .expect("tandem_txn row");
        tx.commit().await.expect("local commit");
    }
    let t = Stages::add(&stages.local, t);
    s.commit(sc::EndRequest { txn_id }).await.expect("commit");
    Stages::add(&stages.commit, t);
    stages.count.fetch_add(1, Ordering::Relaxed);
}

fn pct(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

fn main() {
    let mut secs = Duration::from_secs(5);
    let mut workers = 64usize;
    let mut paced = 5000.0f64;
    let mut local = true;
    let mut postgres = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || {
            args.next()
                .and_then(|s| s.parse::<f64>().ok())
                .expect("a number")
        };
        match a.as_str() {
            "--seconds" => secs = Duration::from_secs_f64(num()),
            "--workers" => workers = num() as usize,
            "--paced" => paced = num(),
            "--no-local" => local = false,
            "--postgres" => postgres = Some(args.next().expect("--postgres URL")),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary folder");
        let (cl, caddr) = listener().await;
        let store = match &postgres {
            Some(url) => tandem_e2e::bench::fresh_store(url).await,
            None => tandem_coordinator::Store::Embedded,
        };
        let coordinator = tandem_coordinator::Coordinator::open(tandem_coordinator::Config {
            data_dir: dir.path().join("coordinator"),
            store,
            ..Default::default()
        })
        .await
        .expect("coordinator");
        tokio::spawn(coordinator.serve(cl, std::future::pending()));
        let coordinator_url = format!("http://{caddr}");
        tandem_e2e::bench::wait_serving(&coordinator_url).await;
        CoordinatorClient::connect(coordinator_url.clone())
            .await
            .expect("connect")
            .create_topic(pb::CreateTopicRequest {
                name: "orders".into(),
                partitions: 4,
            })
            .await
            .expect("topic");

        let handler = Arc::new(Handler {
            epoch: Instant::now(),
            handled: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
            record: AtomicBool::new(false),
        });
        let epoch = handler.epoch;
        let (al, aaddr) = listener().await;
        let h = handler.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(AppServer::from_arc(h))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(al).with_nodelay(Some(true)))
                .await
        });

        let sidecar = |service: &str, db: &str, app: Option<String>| tandem_sidecar::Config {
            service: service.into(),
            coordinator: vec![coordinator_url.clone()],
            db: dir.path().join(db).display().to_string(),
            app,
            ..Default::default()
        };
        let (pl, paddr) = listener().await;
        tokio::spawn(tandem_sidecar::serve(sidecar("orders", "orders.db", None), pl, std::future::pending()));
        let (sl, saddr) = listener().await;
        tokio::spawn(tandem_sidecar::serve(sidecar("cart", "cart.db", Some(format!("http://{aaddr}"))), sl, std::future::pending()));

        // the producing app's own database (the sidecar creates tandem_txn in it)
        let mut producer = SidecarClient::connect(format!("http://{paddr}")).await.expect("producer sidecar");
        // serving means its tables exist
        while producer.list_subscriptions(sc::ListSubscriptionsRequest {}).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let db = {
            use std::str::FromStr;
            // One connection: SQLite takes one writer at a time, and a
            // queue in the pool beats busy-waiting in SQLite.
            let sync = sqlx::sqlite::SqliteSynchronous::Full;
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(&format!("sqlite://{}", dir.path().join("orders.db").display())).expect("url")
                .create_if_missing(true).journal_mode(sqlx::sqlite::SqliteJournalMode::Wal).synchronous(sync).busy_timeout(Duration::from_secs(10));
            sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.expect("orders db")
        };

        sqlx::query("CREATE TABLE IF NOT EXISTS business (txn_id TEXT PRIMARY KEY, value TEXT)")
            .execute(&db)
            .await
            .expect("business table");
        let mut consumer = SidecarClient::connect(format!("http://{saddr}")).await.expect("consumer sidecar");
        consumer
            .subscribe(sc::SubscribeRequest {
                topic: "orders".into(),
                group: "cart".into(),
                start_from: pb::StartFrom::Earliest as i32,
                dedup: sc::DedupMode::Sidecar as i32,
                max_in_flight: 256,
                ..Default::default()
            })
            .await
            .expect("subscribe");
        // wait for the sidecars' tables and sessions
        let db = local.then_some(db);
        let warmup = Stages::default();
        transaction(&mut producer, db.as_ref(), epoch, 0, &warmup).await;
        while handler.handled.load(Ordering::Relaxed) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Peak: workers flat out.
        let stages = Arc::new(Stages::default());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (mut s, db, stages) = (producer.clone(), db.clone(), stages.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = (w as u64) << 32;
                while start.elapsed() < secs {
                    n += 1;
                    transaction(&mut s, db.as_ref(), epoch, n, &stages).await;
                }
            }));
        }
        tokio::time::sleep(secs / 5).await;
        let (h0, t0) = (handler.handled.load(Ordering::Relaxed), Instant::now());
        for t in tasks {
            t.await.expect("worker");
        }
        let (h1, t1) = (handler.handled.load(Ordering::Relaxed), Instant::now());
        let done = stages.count.load(Ordering::Relaxed);
        let committed = done as f64 / start.elapsed().as_secs_f64();
        let handled = (h1 - h0) as f64 / (t1 - t0).as_secs_f64();
        while handler.handled.load(Ordering::Relaxed) < done + 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Paced: latency from Begin to the handler.
        handler.record.store(true, Ordering::Relaxed);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / paced));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let paced_stages = Arc::new(Stages::default());
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < secs {
            tick.tick().await;
            sent += 1;
            let (mut s, db, stages) = (producer.clone(), db.clone(), paced_stages.clone());
            tokio::spawn(async move { transaction(&mut s, db.as_ref(), epoch, (1 << 40) + sent, &stages).await });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while handler.latencies.lock().await.len() < sent as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut lat = handler.latencies.lock().await.clone();
        lat.sort_unstable();
        println!(
            "{workers} workers, local transaction {}, {} s per phase, coordinator on {}",
            if local { "on SQLite (FULL sync, one writer)" } else { "skipped" },
            secs.as_secs_f64(),
            if postgres.is_some() { "PostgreSQL" } else { "the embedded store" }
        );
        println!("peak: {committed:.0} transactions/s committed, {handled:.0} messages/s handled (deduplicated ack)");
        println!("  {}", stages.report());
        println!(
            "paced at {paced:.0}/s ({sent} sent): Begin -> handler p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0),
            lat.len()
        );
        println!("  {}", paced_stages.report());
    });
}
