//! A coordinator restarting with many open half messages: how long until it
//! serves again, and whether the check-backs that are due come all at once.
//!
//! The coordinator (embedded store, fsync on) is loaded with `open`
//! prepared transactions of service `orders`, straight through `Transact`
//! calls of 4 096 prepares, with no sidecar to check them back; it is shut
//! down cleanly and opened again on the same folder. Measured: prepares per
//! second while loading, the clean stop, the open (recovery), the time to
//! the first answered call, the process's resident memory, and then, with
//! a session of service `orders` connected that answers UNKNOWN, the
//! check-backs it receives per second.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::net::TcpListener;

use super::Phase;

/// Prepares per `Transact` call.
const PER_CALL: usize = 4096;
/// `Transact` calls in flight while loading.
const CALLERS: usize = 4;
/// How long check-backs are counted after the restart.
const WATCH: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Open half messages to restart with.
    pub open: u64,
    /// The coordinator's `check_after`: transactions older than this are
    /// due for a check-back when it restarts.
    pub check_after: Duration,
    /// Folder for the coordinator's data.
    pub dir: std::path::PathBuf,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Open half messages.
    pub open: u64,
    /// Prepares per second while loading.
    pub prepared_per_s: f64,
    /// The clean stop, from the shutdown signal to the server's end.
    pub stop: Duration,
    /// Opening the coordinator on its folder (recovery).
    pub open_time: Duration,
    /// From the start of the open to the first answered call.
    pub serving: Duration,
    /// Open half messages the restarted coordinator reports.
    pub open_after: u64,
    /// The process's resident memory after the restart, MiB.
    pub rss_mib: f64,
    /// Check-backs received in the [`WATCH`] seconds after the session
    /// connected.
    pub checks: u64,
    /// Check-backs received in the busiest of those seconds.
    pub busiest_second: u64,
}

fn config(opts: &Options) -> tandem_coordinator::Config {
    let mut c = tandem_coordinator::Config {
        data_dir: opts.dir.join("coordinator"),
        ..Default::default()
    };
    c.txn.check_after = opts.check_after;
    c
}

/// Starts the coordinator in this process; returns its URL, a sender that
/// stops it and the server's task.
async fn start(
    opts: &Options,
) -> anyhow::Result<(
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let coordinator = tandem_coordinator::Coordinator::open(config(opts))
        .await
        .context("opening the coordinator")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = coordinator
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((url, stop, task))
}

/// Resident memory of this process, MiB (NaN where unknown).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Runs the scenario.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.dir)?;
    let (url, stop, task) = start(opts).await?;
    super::wait_serving(&url).await;
    let client = CoordinatorClient::connect(url.clone()).await?;
    client
        .clone()
        .create_topic(pb::CreateTopicRequest {
            name: "orders".into(),
            partitions: 4,
        })
        .await?;

    // Loading.
    let phase = Phase::start(
        format!("{label}: preparing {} transactions", opts.open),
        Duration::from_secs((opts.open / 20_000).max(1)),
    );
    let started = Instant::now();
    let calls = opts.open.div_ceil(PER_CALL as u64);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (mut c, next, open) = (client.clone(), next.clone(), opts.open);
        tasks.push(tokio::spawn(async move {
            loop {
                let call = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if call >= calls {
                    return anyhow::Ok(());
                }
                let first = call * PER_CALL as u64;
                let items = (first..(first + PER_CALL as u64).min(open))
                    .map(|n| pb::TransactItem {
                        kind: Some(pb::transact_item::Kind::Prepare(pb::PrepareRequest {
                            service: "orders".into(),
                            txn_id: format!("open-{n:09}"),
                            topic: "orders".into(),
                            message: Some(pb::Message {
                                key: Some(Bytes::from(format!("k{}", n % 1024))),
                                value: Bytes::from(vec![b'x'; 100]),
                                ..Default::default()
                            }),
                            attempt: format!("a-{n}"),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let r = c
                    .transact(pb::TransactRequest { items })
                    .await?
                    .into_inner();
                if let Some(bad) = r.results.iter().find(|r| r.code != 0) {
                    anyhow::bail!("a prepare failed: {}", bad.message);
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let prepared_per_s = opts.open as f64 / started.elapsed().as_secs_f64();
    phase.end().await;
    drop(client);

    // The clean stop, then the restart.
    let phase = Phase::start(format!("{label}: restarting"), Duration::from_secs(5));
    let stopping = Instant::now();
    let _ = stop.send(());
    task.await?;
    let stop_time = stopping.elapsed();
    let opening = Instant::now();
    let (url, stop, task) = start(opts).await?;
    let open_time = opening.elapsed();
    let mut client = loop {
        if let Ok(mut c) = CoordinatorClient::connect(url.clone()).await
            && c.list_topics(pb::ListTopicsRequest {}).await.is_ok()
        {
            break c;
        }
        anyhow::ensure!(
            opening.elapsed() < Duration::from_secs(600),
            "the restarted coordinator did not serve within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let serving = opening.elapsed();
    let open_after = client
        .get_stats(pb::GetStatsRequest {})
        .await?
        .into_inner()
        .open;
    let rss_mib = rss_mib();
    phase.end().await;

    // The check-backs that follow, answered UNKNOWN.
    let phase = Phase::start(format!("{label}: counting check-backs"), WATCH);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tx.send(pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Hello(pb::Hello {
            service: "orders".into(),
            instance: "bench".into(),
        })),
    })
    .await?;
    let mut stream = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let watching = Instant::now();
    let mut per_second = vec![0u64; WATCH.as_secs() as usize];
    loop {
        let left = WATCH.saturating_sub(watching.elapsed());
        if left.is_zero() {
            break;
        }
        let Ok(m) = tokio::time::timeout(left, stream.message()).await else {
            break;
        };
        let Some(m) = m? else { break };
        if let Some(pb::session_response::Kind::Check(c)) = m.kind {
            let second = watching.elapsed().as_secs() as usize;
            if let Some(n) = per_second.get_mut(second) {
                *n += 1;
            }
            tx.send(pb::SessionRequest {
                kind: Some(pb::session_request::Kind::CheckResult(pb::CheckResult {
                    check_id: c.check_id,
                    txn_id: c.txn_id,
                    state: pb::LocalState::Unknown as i32,
                })),
            })
            .await?;
        }
    }
    phase.end().await;
    drop(tx);
    let _ = stop.send(());
    let _ = task.await;
    Ok(Report {
        open: opts.open,
        prepared_per_s,
        stop: stop_time,
        open_time,
        serving,
        open_after,
        rss_mib,
        checks: per_second.iter().sum(),
        busiest_second: per_second.iter().copied().max().unwrap_or(0),
    })
}
