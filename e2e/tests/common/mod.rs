//! A whole Tandem of real processes on loopback: a coordinator, a producer
//! service (test app + sidecar, service `orders`) and a consumer service
//! (test app + sidecar, service `cart`), each app with its own SQLite
//! database shared with its sidecar. Any process can be killed and
//! restarted on the same port, with failpoints armed or not.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::SqlitePool;
use tandem_examples::db::open_sqlite;
use tandem_examples::process::Process;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tonic::transport::Channel;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const BIN: &str = env!("CARGO_BIN_EXE_tandem-e2e");
/// How long any one condition may take to come true.
pub const PATIENCE: Duration = Duration::from_secs(45);

/// Check-back settings for quick tests: first check after 1 s, four checks.
const COORDINATOR_SETTINGS: &[&str] = &[
    "check_after_ms=1000",
    "check_timeout_ms=1000",
    "max_checks=4",
    "max_check_interval_ms=2000",
    "session_timeout_ms=3000",
    "revoke_timeout_ms=3000",
];

pub struct Cluster {
    /// Set by [`Cluster::done`]; a cluster dropped without it (a failed
    /// test) prints its processes' logs.
    finished: bool,
    pub dir: tempfile::TempDir,
    pub coordinator: Process,
    pub producer_app: Process,
    pub producer: Process,
    pub consumer_app: Process,
    pub consumer: Process,
    /// The producer sidecar's database, when not its app's SQLite file.
    producer_db: Option<String>,
}

fn port_of(p: &Process) -> u16 {
    p.addr.port()
}

impl Cluster {
    pub async fn start() -> TestResult<Cluster> {
        Self::start_with(&[], &[]).await
    }

    /// Starts everything; `coordinator_fp` and `producer_fp` arm failpoints
    /// in the coordinator and the producer's sidecar.
    pub async fn start_with(coordinator_fp: &[&str], producer_fp: &[&str]) -> TestResult<Cluster> {
        Self::start_full(coordinator_fp, producer_fp, None).await
    }

    /// Starts everything with the producer sidecar's tables in `db`.
    pub async fn start_with_producer_db(db: &str) -> TestResult<Cluster> {
        Self::start_full(&[], &[], Some(db.to_owned())).await
    }

    async fn start_full(
        coordinator_fp: &[&str],
        producer_fp: &[&str],
        producer_db: Option<String>,
    ) -> TestResult<Cluster> {
        let dir = tempfile::tempdir()?;
        let coordinator = start_coordinator(dir.path(), 0, coordinator_fp)?;
        let producer_app = start_app(dir.path(), "orders-app", 0, &[])?;
        let consumer_app = start_app(dir.path(), "cart-app", 0, &[])?;
        let producer = start_sidecar(
            dir.path(),
            "orders-sidecar",
            "orders",
            &coordinator,
            &producer_app,
            0,
            producer_fp,
            producer_db.as_deref(),
            &[],
        )?;
        let consumer = start_sidecar(
            dir.path(),
            "cart-sidecar",
            "cart",
            &coordinator,
            &consumer_app,
            0,
            &[],
            None,
            &[],
        )?;
        let mut c = CoordinatorClient::connect(coordinator.url()).await?;
        c.create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            partitions: 2,
        })
        .await?;
        Ok(Cluster {
            finished: false,
            dir,
            coordinator,
            producer_app,
            producer,
            consumer_app,
            consumer,
            producer_db,
        })
    }

    /// Marks the test as passed.
    pub fn done(mut self) -> TestResult {
        self.finished = true;
        Ok(())
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn restart_coordinator(&mut self, failpoints: &[&str]) -> TestResult {
        let port = port_of(&self.coordinator);
        self.coordinator.kill();
        self.coordinator = start_coordinator(&self.path(), port, failpoints)?;
        Ok(())
    }

    pub fn restart_producer(&mut self, failpoints: &[&str]) -> TestResult {
        let port = port_of(&self.producer);
        self.producer.kill();
        self.producer = start_sidecar(
            &self.path(),
            "orders-sidecar",
            "orders",
            &self.coordinator,
            &self.producer_app,
            port,
            failpoints,
            self.producer_db.as_deref(),
            &[],
        )?;
        Ok(())
    }

    pub fn restart_consumer(&mut self, failpoints: &[&str]) -> TestResult {
        self.restart_consumer_with(failpoints, &[])
    }

    /// Restarts the cart sidecar with failpoints and `key=value` settings.
    pub fn restart_consumer_with(&mut self, failpoints: &[&str], settings: &[&str]) -> TestResult {
        let port = port_of(&self.consumer);
        self.consumer.kill();
        self.consumer = start_sidecar(
            &self.path(),
            "cart-sidecar",
            "cart",
            &self.coordinator,
            &self.consumer_app,
            port,
            failpoints,
            None,
            settings,
        )?;
        Ok(())
    }

    /// Starts another sidecar of the cart service (same app, same
    /// database) with `key=value` settings; it resumes the saved
    /// subscriptions, so it joins the `cart` group once one exists.
    pub fn start_second_consumer(&self, settings: &[&str]) -> TestResult<Process> {
        start_sidecar(
            &self.path(),
            "cart-sidecar-2",
            "cart",
            &self.coordinator,
            &self.consumer_app,
            0,
            &[],
            None,
            settings,
        )
    }

    pub fn restart_producer_app(&mut self) -> TestResult {
        let port = port_of(&self.producer_app);
        self.producer_app.kill();
        self.producer_app = start_app(&self.path(), "orders-app", port, &[])?;
        Ok(())
    }

    pub fn restart_consumer_app(&mut self, failpoints: &[&str]) -> TestResult {
        let port = port_of(&self.consumer_app);
        self.consumer_app.kill();
        self.consumer_app = start_app(&self.path(), "cart-app", port, failpoints)?;
        Ok(())
    }

    pub async fn coordinator_client(&self) -> TestResult<CoordinatorClient<Channel>> {
        Ok(CoordinatorClient::connect(self.coordinator.url()).await?)
    }

    pub async fn producer_client(&self) -> TestResult<SidecarClient<Channel>> {
        Ok(SidecarClient::connect(self.producer.url()).await?)
    }

    pub async fn consumer_client(&self) -> TestResult<SidecarClient<Channel>> {
        Ok(SidecarClient::connect(self.consumer.url()).await?)
    }

    /// The cart sidecar consumes `orders` as group `cart`.
    pub async fn subscribe(&self, dedup: sc::DedupMode) -> TestResult {
        self.subscribe_batched(dedup, 1).await
    }

    /// As [`Cluster::subscribe`], with messages handed over in
    /// HandleMessages calls of up to `max_batch`.
    pub async fn subscribe_batched(&self, dedup: sc::DedupMode, max_batch: u32) -> TestResult {
        self.consumer_client()
            .await?
            .subscribe(sc::SubscribeRequest {
                topic: "orders".into(),
                group: "cart".into(),
                start_from: pb::StartFrom::Earliest as i32,
                dedup: dedup as i32,
                max_in_flight: 16,
                max_attempts: 3,
                retry_backoff_ms: 50,
                max_batch,
            })
            .await?;
        Ok(())
    }

    /// Messages in `orders.dlq`.
    pub async fn dead_letters(&self) -> TestResult<u64> {
        self.stored("orders.dlq").await
    }

    /// Records stored in `topic` (its high-water marks added up).
    pub async fn stored(&self, topic: &str) -> TestResult<u64> {
        let d = self
            .coordinator_client()
            .await?
            .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
            .await?
            .into_inner();
        Ok(d.partitions.iter().map(|p| p.high_water_mark).sum())
    }

    /// Waits until the `cart` group has acknowledged everything in `orders`,
    /// so a fault injected next cannot land on an older message's redelivery.
    pub async fn consumer_caught_up(&self) -> TestResult {
        eventually("the cart group to acknowledge everything", || async {
            let d = self
                .coordinator_client()
                .await?
                .describe_topic(pb::DescribeTopicRequest {
                    name: "orders".into(),
                })
                .await?
                .into_inner();
            let lag = d
                .groups
                .iter()
                .find(|g| g.group == "cart")
                .map(|g| g.total_lag);
            Ok((lag == Some(0)).then_some(()))
        })
        .await
    }

    /// Publishes `poison` and then `successors` on one key through the
    /// producer's sidecar, and waits until every successor took effect;
    /// returns the effects' values in the order they were applied.
    pub async fn poison_then(
        &self,
        poison: &str,
        successors: &[String],
    ) -> TestResult<Vec<String>> {
        let key = |v: &str| pb::Message {
            key: Some(bytes::Bytes::from_static(b"same-key")),
            ..message(v)
        };
        let mut messages = vec![key(poison)];
        messages.extend(successors.iter().map(|v| key(v)));
        self.producer_client()
            .await?
            .publish(pb::PublishRequest {
                topic: "orders".into(),
                messages,
            })
            .await?;
        let refs: Vec<&str> = successors.iter().map(String::as_str).collect();
        self.expect_effects(&refs).await?;
        let db = self.consumer_db().await?;
        let order = sqlx::query_scalar("SELECT value FROM effects ORDER BY seq")
            .fetch_all(&db)
            .await?;
        db.close().await;
        Ok(order)
    }

    /// The consumer sidecar's counters.
    pub async fn consumer_stats(&self) -> TestResult<sc::Stats> {
        Ok(self
            .consumer_client()
            .await?
            .get_stats(sc::GetStatsRequest {})
            .await?
            .into_inner())
    }

    pub async fn producer_db(&self) -> TestResult<SqlitePool> {
        Ok(open_sqlite(&self.path().join("orders-app.db").display().to_string(), 8).await?)
    }

    pub async fn consumer_db(&self) -> TestResult<SqlitePool> {
        Ok(open_sqlite(&self.path().join("cart-app.db").display().to_string(), 8).await?)
    }

    /// Effects the consumer app made: value → how many times.
    pub async fn effects(&self) -> TestResult<BTreeMap<String, i64>> {
        let db = self.consumer_db().await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT value, COUNT(*) FROM effects GROUP BY value")
                .fetch_all(&db)
                .await?;
        db.close().await;
        Ok(rows.into_iter().collect())
    }

    /// Waits until the consumer's effects are exactly `expected` (each once)
    /// and stay so for a moment longer.
    pub async fn expect_effects(&self, expected: &[&str]) -> TestResult {
        let want: BTreeMap<String, i64> = expected.iter().map(|v| (v.to_string(), 1)).collect();
        eventually("the expected effects", || async {
            let got = self.effects().await?;
            Ok((got.len() >= want.len() && want.keys().all(|k| got.contains_key(k))).then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let got = self.effects().await?;
        assert_eq!(
            got, want,
            "each committed message has its effect exactly once, and nothing else has any"
        );
        Ok(())
    }

    pub async fn txn(&self, id: &str) -> TestResult<pb::Transaction> {
        Ok(self
            .coordinator_client()
            .await?
            .get_transaction(pb::GetTransactionRequest { txn_id: id.into() })
            .await?
            .into_inner())
    }

    /// Waits until the coordinator has `id` in `state`.
    pub async fn expect_state(
        &self,
        id: &str,
        state: pb::TransactionState,
    ) -> TestResult<pb::Transaction> {
        eventually(&format!("transaction {id} to be {state:?}"), || async {
            let t = match self.txn(id).await {
                Ok(t) => t,
                Err(_) => return Ok(None), // coordinator restarting
            };
            Ok((t.state == state as i32).then_some(t))
        })
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.finished {
            for p in [
                &self.coordinator,
                &self.producer_app,
                &self.producer,
                &self.consumer_app,
                &self.consumer,
            ] {
                eprintln!("---- {} log (tail) ----\n{}", p.name(), p.log_tail());
            }
        }
    }
}

/// Waits until `check` returns `Some`, at most [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> TestResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = TestResult<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn listen(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn failpoints(fp: &[&str]) -> Vec<(&'static str, String)> {
    if fp.is_empty() {
        Vec::new()
    } else {
        vec![("TANDEM_FAILPOINTS", fp.join(","))]
    }
}

fn start_coordinator(dir: &std::path::Path, port: u16, fp: &[&str]) -> TestResult<Process> {
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--listen".into(),
        listen(port),
        "--data-dir".into(),
        dir.join("coordinator").display().to_string(),
    ];
    for s in COORDINATOR_SETTINGS {
        args.extend(["--set".into(), (*s).into()]);
    }
    Ok(Process::start(
        "coordinator",
        BIN.as_ref(),
        &args,
        &failpoints(fp),
        dir,
    )?)
}

fn start_app(dir: &std::path::Path, name: &str, port: u16, fp: &[&str]) -> TestResult<Process> {
    let args = vec![
        "test-app".into(),
        "--listen".into(),
        listen(port),
        "--db".into(),
        dir.join(format!("{name}.db")).display().to_string(),
    ];
    Ok(Process::start(
        name,
        BIN.as_ref(),
        &args,
        &failpoints(fp),
        dir,
    )?)
}

#[allow(clippy::too_many_arguments)]
fn start_sidecar(
    dir: &std::path::Path,
    name: &str,
    service: &str,
    coordinator: &Process,
    app: &Process,
    port: u16,
    fp: &[&str],
    db: Option<&str>,
    settings: &[&str],
) -> TestResult<Process> {
    let db = db.map_or_else(
        || dir.join(format!("{}.db", app.name())).display().to_string(),
        str::to_owned,
    );
    let args = vec![
        "sidecar".into(),
        "--listen".into(),
        listen(port),
        "--coordinator".into(),
        coordinator.url(),
        "--service".into(),
        service.into(),
        "--app".into(),
        app.url(),
        "--db".into(),
        db,
        "--set".into(),
        "callback_timeout_ms=5000".into(),
        "--set".into(),
        "handler_timeout_ms=5000".into(),
    ];
    let mut args = args;
    for s in settings {
        args.extend(["--set".into(), (*s).into()]);
    }
    Ok(Process::start(
        name,
        BIN.as_ref(),
        &args,
        &failpoints(fp),
        dir,
    )?)
}

pub fn message(value: &str) -> pb::Message {
    pb::Message {
        id: String::new(),
        key: Some(bytes::Bytes::from(format!("key-{value}"))),
        value: bytes::Bytes::from(value.to_owned()),
        headers: Vec::new(),
        partition: None,
    }
}

/// Callback mode: PublishTransactional through the producer's sidecar.
pub async fn publish_transactional(
    c: &mut SidecarClient<Channel>,
    txn_id: &str,
    value: &str,
) -> TestResult<sc::TransactionResponse> {
    Ok(c.publish_transactional(sc::PublishTransactionalRequest {
        topic: "orders".into(),
        message: Some(message(value)),
        txn_id: txn_id.into(),
    })
    .await?
    .into_inner())
}

/// Table mode, step 1: Begin.
pub async fn begin(
    c: &mut SidecarClient<Channel>,
    txn_id: &str,
    value: &str,
) -> TestResult<String> {
    Ok(c.begin(sc::BeginRequest {
        topic: "orders".into(),
        message: Some(message(value)),
        txn_id: txn_id.into(),
        check_mode: sc::CheckMode::Table as i32,
    })
    .await?
    .into_inner()
    .txn_id)
}

/// Table mode, step 3: the app's local transaction, with its business row
/// and the `tandem_txn` row committed together (or rolled back).
pub async fn local_transaction(
    db: &SqlitePool,
    txn_id: &str,
    value: &str,
    commit: bool,
) -> TestResult {
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO business (txn_id, value) VALUES ($1, $2)")
        .bind(txn_id)
        .bind(value)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO tandem_txn (txn_id) VALUES ($1)")
        .bind(txn_id)
        .execute(&mut *tx)
        .await?;
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(())
}

pub fn end(txn_id: &str) -> sc::EndRequest {
    sc::EndRequest {
        txn_id: txn_id.into(),
    }
}

/// The PostgreSQL server `scripts/test.sh` starts (`TANDEM_TEST_POSTGRES`),
/// or `None` (with a note) when there is none and none is required.
pub fn postgres() -> Option<String> {
    match std::env::var("TANDEM_TEST_POSTGRES") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_POSTGRES").is_none(),
                "TANDEM_TEST_POSTGRES is not set but PostgreSQL tests are required"
            );
            eprintln!("skipped: no TANDEM_TEST_POSTGRES (scripts/test.sh provides one)");
            None
        }
    }
}

/// The `promtool` binary `scripts/test.sh` installs (`TANDEM_TEST_PROMTOOL`),
/// or `None` (with a note) when there is none and none is required.
pub fn promtool() -> Option<String> {
    match std::env::var("TANDEM_TEST_PROMTOOL") {
        Ok(path) => Some(path),
        Err(_) => {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_PROMTOOL").is_none(),
                "TANDEM_TEST_PROMTOOL is not set but promtool checks are required"
            );
            eprintln!("skipped promtool: no TANDEM_TEST_PROMTOOL (scripts/test.sh provides one)");
            None
        }
    }
}

/// Creates an empty database on the server of `url`; returns its URL.
pub async fn fresh_postgres_database(url: &str) -> TestResult<String> {
    let name = format!(
        "e2e_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    Ok(tandem_storage::PgStore::create_database(url, &name).await?)
}
