//! Sagas per second: a coordinator on its embedded store and four sidecars
//! in this process, as a real deployment has them (each service its own
//! sidecar and its own SQLite database, synchronous FULL). A client starts
//! sagas through the `orders` sidecar; each saga has three branches, on the
//! `stock`, `payment` and `shipping` services, whose apps write the branch
//! barrier and one effect row in one transaction. A saga counts as done
//! when its last branch's effect is committed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::SqlitePool;
use tandem_proto::app as app_pb;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::{CpuWindow, Latencies, Phase, Window, micros_since};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of each phase.
    pub seconds: Duration,
    /// Clients, each one saga at a time.
    pub workers: usize,
    /// The paced phases after the peak.
    pub pacing: super::Pacing,
    /// Where the databases and the coordinator's data go.
    pub dir: std::path::PathBuf,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Sagas started per second, peak, over the whole phase.
    pub started_per_s: f64,
    /// Sagas done per second over the peak's last 80 %.
    pub done_per_s: f64,
    /// This process's CPU per saga over that window, µs (everything: the
    /// coordinator, four sidecars, three apps, SQLite).
    pub cpu_us: f64,
    /// Latency in each paced phase, the main one first.
    pub curve: Vec<super::Point>,
}

/// Sagas waiting for their last branch, by id.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

const SERVICES: [&str; 3] = ["stock", "payment", "shipping"];

struct Participant {
    db: SqlitePool,
    /// The last branch's service tells the waiting client.
    done: Option<Waiting>,
}

fn internal(e: sqlx::Error) -> Status {
    Status::internal(e.to_string())
}

const NOT_HERE: &str = "a saga participant of the bench";

#[tonic::async_trait]
impl App for Participant {
    async fn execute_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        let req = req.into_inner();
        let mut tx = self.db.begin().await.map_err(internal)?;
        if tandem_examples::db::enter_barrier(&mut tx, &req.saga_id, &req.branch, "action")
            .await
            .map_err(internal)?
        {
            sqlx::query("INSERT INTO effects (saga_id) VALUES ($1)")
                .bind(&req.saga_id)
                .execute(&mut *tx)
                .await
                .map_err(internal)?;
        }
        tx.commit().await.map_err(internal)?;
        if let Some(done) = &self.done {
            let waiting = done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&req.saga_id);
            if let Some(w) = waiting {
                let _ = w.send(());
            }
        }
        Ok(Response::new(app_pb::BranchResponse::default()))
    }

    async fn compensate_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::internal("nothing fails in the saga bench"))
    }

    async fn execute_local_transaction(
        &self,
        _: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }

    async fn check_local_transaction(
        &self,
        _: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }

    async fn handle_message(
        &self,
        _: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }

    async fn handle_messages(
        &self,
        _: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }
}

fn saga(id: String) -> pb::StartSagaRequest {
    let branch = |s: &str| pb::SagaBranch {
        name: s.into(),
        service: s.into(),
        action: "do".into(),
        compensation: "undo".into(),
        payload: bytes::Bytes::from_static(&[b'x'; 100]),
        ..Default::default()
    };
    pb::StartSagaRequest {
        saga_id: id,
        service: String::new(),
        definition: Some(pb::SagaDefinition {
            branches: SERVICES.iter().map(|s| branch(s)).collect(),
            concurrent: false,
            timeout_ms: 0,
        }),
    }
}

/// Runs the scenario; `label` names it on the progress bar.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    let (stop, _) = tokio::sync::watch::channel(false);
    let shutdown = || {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    let result = async {
        std::fs::create_dir_all(&opts.dir)?;
        let (cl, coordinator_url) = super::txn::listener().await?;
        let coordinator = tandem_coordinator::Coordinator::open(tandem_coordinator::Config {
            data_dir: opts.dir.join("coordinator"),
            ..Default::default()
        })
        .await
        .context("opening the coordinator")?;
        let down = shutdown();
        tasks.push(tokio::spawn(async move {
            let _ = coordinator.serve(cl, down).await;
        }));
        super::wait_serving(&coordinator_url).await;

        let waiting: Waiting = Arc::default();
        let mut clients = Vec::new();
        for (i, service) in ["orders"].iter().chain(&SERVICES).enumerate() {
            let db = opts.dir.join(format!("{service}.db"));
            let app = if i == 0 {
                None
            } else {
                let pool = super::txn::sqlite(&db).await?;
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY, saga_id TEXT NOT NULL)",
                )
                .execute(&pool)
                .await?;
                let (al, app_url) = super::txn::listener().await?;
                let participant = Participant {
                    db: pool,
                    done: (*service == "shipping").then(|| waiting.clone()),
                };
                let down = shutdown();
                tasks.push(tokio::spawn(async move {
                    let _ = tonic::transport::Server::builder()
                        .add_service(AppServer::new(participant))
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(al)
                                .with_nodelay(Some(true)),
                            down,
                        )
                        .await;
                }));
                Some(app_url)
            };
            let config = tandem_sidecar::Config {
                service: (*service).into(),
                coordinator: vec![coordinator_url.clone()],
                db: db.display().to_string(),
                app,
                ..Default::default()
            };
            let (sl, sidecar_url) = super::txn::listener().await?;
            let down = shutdown();
            tasks.push(tokio::spawn(async move {
                let _ = tandem_sidecar::serve(config, sl, down).await;
            }));
            clients.push(SidecarClient::connect(sidecar_url).await?);
        }
        // Serving means the sidecars' tables exist.
        for s in &mut clients {
            let deadline = Instant::now() + Duration::from_secs(30);
            while s
                .list_subscriptions(sc::ListSubscriptionsRequest {})
                .await
                .is_err()
            {
                anyhow::ensure!(Instant::now() < deadline, "a sidecar did not serve");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        sagas(opts, label, clients.swap_remove(0), waiting).await
    }
    .await;
    stop.send_replace(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    result
}

/// Starts saga `n` and waits for its last branch.
async fn one(
    client: &mut SidecarClient<tonic::transport::Channel>,
    waiting: &Waiting,
    n: u64,
) -> anyhow::Result<()> {
    let id = format!("saga-{n}");
    let (tx, rx) = oneshot::channel();
    waiting
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id.clone(), tx);
    client.start_saga(saga(id)).await?;
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .context("a saga did not finish within 60 s")??;
    Ok(())
}

async fn sagas(
    opts: &Options,
    label: &str,
    client: SidecarClient<tonic::transport::Channel>,
    waiting: Waiting,
) -> anyhow::Result<Report> {
    let secs = opts.seconds;
    let (started, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let phase = Phase::start(format!("{label}: peak"), secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..opts.workers {
        let (mut c, waiting) = (client.clone(), waiting.clone());
        let (started, done) = (started.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = (w as u64) << 32;
            while start.elapsed() < secs {
                n += 1;
                started.fetch_add(1, Ordering::Relaxed);
                one(&mut c, &waiting, n).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(secs / 5).await;
    let window = Window::open(&done);
    let cpu = CpuWindow::open(&done);
    tokio::time::sleep(secs.saturating_sub(secs / 5)).await;
    let done_per_s = window.rate(&done);
    let cpu_us = cpu.micros_per_event(&done);
    let started_per_s = started.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    phase.end().await;

    let latencies = Arc::new(Latencies::default());
    let epoch = Instant::now();
    let curve = super::paced(
        label,
        &opts.pacing,
        done_per_s,
        secs,
        &latencies,
        "sagas",
        |n, due| {
            let (mut c, waiting, latencies) = (client.clone(), waiting.clone(), latencies.clone());
            async move {
                let began = super::micros_at(epoch, due);
                one(&mut c, &waiting, (1 << 62) + n).await?;
                latencies.add(micros_since(epoch).saturating_sub(began));
                Ok(())
            }
        },
    )
    .await?;
    Ok(Report {
        started_per_s,
        done_per_s,
        cpu_us,
        curve,
    })
}
