//! A coordinator on a loopback ephemeral port, and a consumer-session
//! helper, for the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tandem_coordinator::{Config, Coordinator, Store};
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// The stores the behavioural tests run on, each test once per store.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Embedded,
    Postgres,
}

/// Where a test's coordinator keeps its state between restarts: a folder,
/// and for PostgreSQL a fresh database on the server `scripts/test.sh`
/// starts (`TANDEM_TEST_POSTGRES`).
pub struct TestStore {
    dir: tempfile::TempDir,
    url: Option<String>,
}

impl TestStore {
    /// `None` when PostgreSQL is asked for, no server was given and none is
    /// required (`TANDEM_REQUIRE_POSTGRES` unset): the test then says it
    /// skipped. When one is required and missing, this panics.
    pub async fn new(backend: Backend) -> TestResult<Option<TestStore>> {
        let dir = tempfile::tempdir()?;
        let url = match backend {
            Backend::Embedded => None,
            Backend::Postgres => match fresh_database().await? {
                Some(url) => Some(url),
                None => return Ok(None),
            },
        };
        Ok(Some(TestStore { dir, url }))
    }

    /// `config` pointed at this store; restarts are one replica coming
    /// back (same id), so it takes its own lease back at once.
    pub fn apply(&self, mut config: Config) -> Config {
        config.data_dir = self.dir.path().to_owned();
        if let Some(url) = &self.url {
            config.store = Store::Postgres { url: url.clone() };
            config.replication.replica_id = "test-replica".into();
        }
        config
    }
}

/// A new, empty database on the test server; `None` when there is none
/// and none is required.
pub async fn fresh_database() -> TestResult<Option<String>> {
    let Ok(admin) = std::env::var("TANDEM_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("TANDEM_REQUIRE_POSTGRES").is_none(),
            "TANDEM_TEST_POSTGRES is not set but PostgreSQL tests are required"
        );
        eprintln!("skipped: no TANDEM_TEST_POSTGRES (scripts/test.sh provides one)");
        return Ok(None);
    };
    static N: AtomicU32 = AtomicU32::new(0);
    // The clock too: process ids come round again across runs on one
    // server.
    let name = format!(
        "tandem_c{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros()
    );
    Ok(Some(
        tandem_storage::PgStore::create_database(&admin, &name).await?,
    ))
}

/// Runs each named `async fn(Backend) -> TestResult` as two tests,
/// `embedded::<name>` and `postgres::<name>`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> $crate::common::TestResult {
                    super::$name($crate::common::Backend::Embedded).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> $crate::common::TestResult {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<tandem_coordinator::Result<()>>>,
}

impl Running {
    pub async fn start(store: &TestStore) -> TestResult<Running> {
        Self::start_with(store, Config::default()).await
    }

    /// Starts a coordinator on `store` and waits until it serves (on
    /// PostgreSQL, until it holds the lease).
    pub async fn start_with(store: &TestStore, config: Config) -> TestResult<Running> {
        let config = store.apply(config);
        // TANDEM_TEST_LOG=<filter> (e.g. tandem_coordinator::consumer=debug)
        // prints the coordinator's log with the test's output.
        if let Ok(f) = std::env::var("TANDEM_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(f))
                .with_test_writer()
                .try_init();
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let coordinator = Coordinator::open(config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(coordinator.serve(listener, async {
            let _ = stopped.await;
        }));
        let running = Running {
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = match running.client().await {
                Ok(mut c) => c.list_topics(pb::ListTopicsRequest {}).await.map(|_| ()),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match r {
                Ok(()) => return Ok(running),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    if tokio::time::Instant::now() > deadline {
                        return Err(
                            format!("the coordinator did not serve within {WAIT:?}: {s}").into(),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    pub async fn client(&self) -> TestResult<CoordinatorClient<Channel>> {
        Ok(CoordinatorClient::connect(format!("http://{}", self.addr)).await?)
    }

    /// Graceful shutdown; waits for it to finish.
    pub async fn stop(mut self) -> TestResult {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await???;
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub async fn create_topic(
    c: &mut CoordinatorClient<Channel>,
    name: &str,
    partitions: u32,
) -> TestResult {
    c.create_topic(pb::CreateTopicRequest {
        name: name.into(),
        partitions,
    })
    .await?;
    Ok(())
}

/// `n` messages keyed `"0"`, `"1"`, … with values `"v0"`, `"v1"`, …
pub fn keyed(n: usize) -> Vec<pb::Message> {
    (0..n)
        .map(|i| msg(Some(&format!("{i}")), &format!("v{i}")))
        .collect()
}

pub fn msg(key: Option<&str>, value: &str) -> pb::Message {
    pb::Message {
        id: String::new(),
        key: key.map(|k| k.as_bytes().to_vec().into()),
        value: value.as_bytes().to_vec().into(),
        headers: Vec::new(),
        partition: None,
    }
}

pub async fn publish(
    c: &mut CoordinatorClient<Channel>,
    topic: &str,
    messages: Vec<pb::Message>,
) -> TestResult<Vec<pb::MessagePosition>> {
    Ok(c.publish(pb::PublishRequest {
        topic: topic.into(),
        messages,
    })
    .await?
    .into_inner()
    .positions)
}

/// One consumer-group member.
pub struct Member {
    tx: mpsc::Sender<pb::ConsumeRequest>,
    rx: tonic::Streaming<pb::ConsumeResponse>,
    pub assignment: Vec<pb::AssignedPartition>,
    pub member_id: String,
    /// Deliveries read while waiting for something else.
    early: Vec<pb::Delivery>,
}

pub struct SubscribeOpts {
    pub earliest: bool,
    pub credit: u32,
    pub session_timeout_ms: u32,
}

impl Default for SubscribeOpts {
    fn default() -> Self {
        SubscribeOpts {
            earliest: true,
            credit: 10_000,
            session_timeout_ms: 0,
        }
    }
}

impl Member {
    pub async fn join(
        addr: SocketAddr,
        topic: &str,
        group: &str,
        opts: SubscribeOpts,
    ) -> TestResult<Member> {
        let mut client = CoordinatorClient::connect(format!("http://{addr}")).await?;
        let (tx, rx) = mpsc::channel(1024);
        tx.send(pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Subscribe(pb::Subscribe {
                revoke_timeout_ms: 0,
                topic: topic.into(),
                group: group.into(),
                start_from: if opts.earliest {
                    pb::StartFrom::Earliest
                } else {
                    pb::StartFrom::Latest
                } as i32,
                initial_credit: opts.credit,
                session_timeout_ms: opts.session_timeout_ms,
                client_id: "test".into(),
            })),
        })
        .await?;
        let rx = client
            .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut m = Member {
            tx,
            rx,
            assignment: Vec::new(),
            member_id: String::new(),
            early: Vec::new(),
        };
        // Wait for the first assignment, keeping deliveries that come with
        // it or before it (the session's deliveries may overtake it). Kept
        // aside until then: `next_deliveries` hands back `early` first, and
        // putting them back there would spin for ever without awaiting.
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut early = Vec::new();
        while m.member_id.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(format!("no assignment within {WAIT:?}").into());
            }
            early.extend(m.next_deliveries(left).await?);
        }
        m.early = early;
        Ok(m)
    }

    /// The next batch of deliveries (handling assignment updates on the
    /// way); empty if none arrives within `wait`.
    pub async fn next_deliveries(&mut self, wait: Duration) -> TestResult<Vec<pb::Delivery>> {
        if !self.early.is_empty() {
            return Ok(std::mem::take(&mut self.early));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return Ok(Vec::new()),
                Ok(m) => m?,
            };
            match msg.and_then(|m| m.kind) {
                Some(pb::consume_response::Kind::Assignment(a)) => {
                    let first = self.member_id.is_empty();
                    self.member_id = a.member_id;
                    self.assignment = a.partitions;
                    if first {
                        return Ok(Vec::new());
                    }
                }
                Some(pb::consume_response::Kind::Deliveries(d)) => return Ok(d.deliveries),
                None => return Err("stream ended".into()),
            }
        }
    }

    /// Receives until `n` deliveries arrived (or `WAIT` passed).
    pub async fn receive(&mut self, n: usize) -> TestResult<Vec<pb::Delivery>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(format!("received {} of {n} deliveries", out.len()).into());
            }
            out.extend(self.next_deliveries(left).await?);
        }
        Ok(out)
    }

    pub async fn ack(&self, deliveries: &[pb::Delivery]) -> TestResult {
        self.send(pb::consume_request::Kind::Ack(pb::Ack {
            offsets: deliveries
                .iter()
                .map(|d| pb::AckedOffset {
                    partition: d.partition,
                    offset: d.offset,
                    epoch: d.epoch,
                })
                .collect(),
        }))
        .await
    }

    pub async fn credit(&self, n: u32) -> TestResult {
        self.send(pb::consume_request::Kind::Credit(pb::Credit {
            messages: n,
        }))
        .await
    }

    pub async fn send(&self, kind: pb::consume_request::Kind) -> TestResult {
        self.tx
            .send(pb::ConsumeRequest { kind: Some(kind) })
            .await?;
        Ok(())
    }

    /// Leaves cleanly: closes the request side and waits for the server to
    /// end the stream (after committing acknowledged offsets).
    pub async fn leave(self) -> TestResult {
        let Member { tx, mut rx, .. } = self;
        drop(tx);
        tokio::time::timeout(WAIT, async {
            while let Some(_m) = rx.message().await? {}
            Ok::<_, tonic::Status>(())
        })
        .await??;
        Ok(())
    }

    pub fn partitions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.assignment.iter().map(|a| a.partition).collect();
        v.sort_unstable();
        v
    }
}

pub fn value(d: &pb::Delivery) -> String {
    String::from_utf8_lossy(
        &d.message
            .as_ref()
            .map(|m| m.value.clone())
            .unwrap_or_default(),
    )
    .into_owned()
}
