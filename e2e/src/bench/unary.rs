//! The floor under every hop of a transaction: one unary gRPC call over
//! loopback, in this process, to a handler that answers at once (the app's
//! `HandleMessage`, as a sidecar calls it, with a 100-byte message). A
//! transaction through Tandem makes several such calls (app → sidecar
//! Begin and Commit, sidecar → coordinator, sidecar → app), so the calls
//! per second of this scenario, divided by the calls a transaction makes,
//! bound what any design built on gRPC calls can do on this machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_proto::app as app_pb;
use tandem_proto::app::app_client::AppClient;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::coordinator as pb;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::{CpuWindow, Latencies, Phase, Window, micros_since};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of each phase.
    pub seconds: Duration,
    /// Callers, each one call at a time.
    pub workers: usize,
    /// The paced phases after the peak.
    pub pacing: super::Pacing,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Calls answered per second, peak, over the whole phase.
    pub calls_per_s: f64,
    /// Calls answered per second over the peak's last 80 %.
    pub window_per_s: f64,
    /// This process's CPU per call over that window, µs.
    pub cpu_us: f64,
    /// Latency in each paced phase, the main one first.
    pub curve: Vec<super::Point>,
}

struct Echo;

#[tonic::async_trait]
impl App for Echo {
    async fn execute_local_transaction(
        &self,
        _: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("unary bench"))
    }

    async fn check_local_transaction(
        &self,
        _: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("unary bench"))
    }

    async fn handle_message(
        &self,
        _: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        Ok(Response::new(app_pb::HandleMessageResponse {}))
    }

    async fn execute_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented(
            "the unary bench app takes part in no saga",
        ))
    }

    async fn compensate_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented(
            "the unary bench app takes part in no saga",
        ))
    }

    async fn handle_messages(
        &self,
        _: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        Err(Status::unimplemented("unary bench"))
    }
}

fn request(n: u64) -> app_pb::HandleMessageRequest {
    app_pb::HandleMessageRequest {
        topic: "orders".into(),
        group: "cart".into(),
        partition: 0,
        offset: n,
        message: Some(pb::Message {
            id: format!("m-{n}"),
            value: Bytes::from(vec![b'x'; 100]),
            ..Default::default()
        }),
        attempt: 1,
        dedup: "SIDECAR".into(),
    }
}

/// Runs the scenario: the server, then callers flat out, then paced.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AppServer::new(Echo))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let result = calls(opts, label, &url).await;
    let _ = stop.send(());
    let _ = server.await;
    result
}

async fn calls(opts: &Options, label: &str, url: &str) -> anyhow::Result<Report> {
    // One connection, as a sidecar holds one to its app.
    let client = AppClient::connect(url.to_owned()).await?;
    client.clone().handle_message(request(0)).await?;
    let secs = opts.seconds;
    let answered = Arc::new(AtomicU64::new(0));
    let phase = Phase::start(format!("{label}: peak"), secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..opts.workers {
        let (mut c, answered) = (client.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = (w as u64) << 32;
            while start.elapsed() < secs {
                n += 1;
                c.handle_message(request(n)).await?;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(secs / 5).await;
    let window = Window::open(&answered);
    let cpu = CpuWindow::open(&answered);
    for t in tasks {
        t.await??;
    }
    let window_per_s = window.rate(&answered);
    let cpu_us = cpu.micros_per_event(&answered);
    let calls_per_s = answered.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    phase.end().await;

    let latencies = Arc::new(Latencies::default());
    let epoch = Instant::now();
    let curve = super::paced(
        label,
        &opts.pacing,
        window_per_s,
        secs,
        &latencies,
        "calls",
        |n, due| {
            let (mut c, latencies) = (client.clone(), latencies.clone());
            async move {
                let began = super::micros_at(epoch, due);
                c.handle_message(request(n)).await?;
                latencies.add(micros_since(epoch).saturating_sub(began));
                Ok(())
            }
        },
    )
    .await?;
    Ok(Report {
        calls_per_s,
        window_per_s,
        cpu_us,
        curve,
    })
}
