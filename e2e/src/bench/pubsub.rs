//! Publish → consume over gRPC on loopback, fsync `always`: a coordinator
//! in this process holds a topic of 4 partitions; 4 publishers send batches
//! of 1 000 keyed messages flat out while one consumer-group member
//! receives, acknowledges and re-grants credit for everything. Throughput is
//! what the consumer received per second while publishers ran; then
//! publishers are paced in batches of 100 and each publish call is timed
//! from send to acknowledgement (durable on disk).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::{CpuWindow, Latencies, Phase, Window, micros_since, wait_for};

const PARTITIONS: u32 = 4;
const PUBLISHERS: u64 = 4;
/// Messages per publish call at peak.
const PEAK_BATCH: usize = 1000;
/// Messages per publish call when paced.
const PACED_BATCH: usize = 100;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of each phase.
    pub seconds: Duration,
    /// Bytes of each message's value.
    pub message_bytes: usize,
    /// The paced phases after the peak (rates in messages per second).
    pub pacing: super::Pacing,
    /// The coordinator's data folder (embedded store).
    pub dir: std::path::PathBuf,
    /// Any database of a PostgreSQL server: the coordinator's store goes in
    /// a fresh database there instead of the embedded one.
    pub store_on: Option<String>,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Messages published per second over the whole peak phase.
    pub published_per_s: f64,
    /// Messages the consumer received per second over the peak's last 80 %.
    pub consumed_per_s: f64,
    /// This process's CPU per message consumed over that window, µs.
    pub cpu_us: f64,
    /// The coordinator's `fdatasync` calls per message over that window
    /// (`None` on PostgreSQL).
    pub fsyncs_per_message: Option<f64>,
    /// Publish call latency (sent → durable acknowledgement) in each paced
    /// phase, the main one first, with rates in messages per second; every
    /// message published was received before the run ends.
    pub curve: Vec<super::Point>,
}

/// Runs the scenario; `label` names it on the progress bar.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    let mut database = None;
    let store = match &opts.store_on {
        Some(server) => {
            let url = super::fresh_database(server, "pubsub").await?;
            database = Some(url.clone());
            tandem_coordinator::Store::Postgres { url }
        }
        None => tandem_coordinator::Store::Embedded,
    };
    let config = tandem_coordinator::Config {
        data_dir: opts.dir.clone(),
        store,
        ..Default::default()
    };
    let coordinator = super::LocalCoordinator::start(config).await?;
    let result = phases(opts, label, &coordinator.url, coordinator.syncs.clone()).await;
    coordinator.stop().await;
    if let Some(url) = database {
        super::drop_database(&url).await;
    }
    result
}

async fn client(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    Ok(CoordinatorClient::connect(url.to_owned())
        .await?
        .max_encoding_message_size(64 << 20))
}

fn batch(size: usize, n: usize, seq: &mut u64) -> Vec<pb::Message> {
    (0..n)
        .map(|_| {
            *seq += 1;
            pb::Message {
                id: String::new(),
                key: Some(Bytes::from(format!("k{}", *seq % 64))),
                value: Bytes::from(vec![b'x'; size]),
                headers: Vec::new(),
                partition: None,
            }
        })
        .collect()
}

async fn phases(
    opts: &Options,
    label: &str,
    url: &str,
    syncs: Option<tandem_storage::SyncCounter>,
) -> anyhow::Result<Report> {
    let topic = "bench".to_owned();
    client(url)
        .await?
        .create_topic(pb::CreateTopicRequest {
            name: topic.clone(),
            partitions: PARTITIONS,
        })
        .await
        .context("CreateTopic")?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(consume(
        url.to_owned(),
        topic.clone(),
        received.clone(),
        stop.clone(),
    ));
    let result = measure(opts, label, url, &topic, &received, syncs).await;
    stop.store(true, Ordering::Relaxed);
    let consumed = consumer.await;
    let report = result?;
    consumed.context("the consumer")??;
    Ok(report)
}

async fn measure(
    opts: &Options,
    label: &str,
    url: &str,
    topic: &str,
    received: &AtomicU64,
    syncs: Option<tandem_storage::SyncCounter>,
) -> anyhow::Result<Report> {
    let secs = opts.seconds;
    let size = opts.message_bytes;
    let published = Arc::new(AtomicU64::new(0));
    let phase = Phase::start(format!("{label}: peak"), secs);
    let start = Instant::now();
    let mut publishers = Vec::new();
    for w in 0..PUBLISHERS {
        let mut c = client(url).await?;
        let (topic, published) = (topic.to_owned(), published.clone());
        publishers.push(tokio::spawn(async move {
            let mut seq = w << 40;
            while start.elapsed() < secs {
                let messages = batch(size, PEAK_BATCH, &mut seq);
                c.publish(pb::PublishRequest {
                    topic: topic.clone(),
                    messages,
                })
                .await?;
                published.fetch_add(PEAK_BATCH as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(secs / 5).await;
    let window = Window::open(received);
    let cpu = CpuWindow::open(received);
    let (syncs_before, received_before) = (
        syncs.as_ref().map(|s| s.get()),
        received.load(Ordering::Relaxed),
    );
    for p in publishers {
        p.await??;
    }
    let consumed_per_s = window.rate(received);
    let cpu_us = cpu.micros_per_event(received);
    let fsyncs_per_message = match (&syncs, syncs_before) {
        (Some(s), Some(before)) => {
            let n = received.load(Ordering::Relaxed) - received_before;
            Some((s.get() - before) as f64 / n.max(1) as f64)
        }
        _ => None,
    };
    let total = published.load(Ordering::Relaxed);
    let published_per_s = total as f64 / start.elapsed().as_secs_f64();
    phase.end().await;
    anyhow::ensure!(
        wait_for(received, total, Duration::from_secs(120)).await,
        "the consumer received {} of the {total} messages published at peak within 120 s",
        received.load(Ordering::Relaxed)
    );

    // Paced: one publish call of PACED_BATCH messages per tick.
    let latencies = Arc::new(Latencies::default());
    let epoch = Instant::now();
    let c = client(url).await?;
    let per_call = super::Pacing {
        rate: opts.pacing.rate.map(|r| r / PACED_BATCH as f64),
        curve: opts.pacing.curve,
    };
    let mut curve = super::paced(
        &format!("{label}, in publish calls of {PACED_BATCH}"),
        &per_call,
        consumed_per_s / PACED_BATCH as f64,
        secs,
        &latencies,
        "publish calls",
        |n, due| {
            let (mut c, latencies, topic) = (c.clone(), latencies.clone(), topic.to_owned());
            let mut seq = n << 10;
            let messages = batch(size, PACED_BATCH, &mut seq);
            async move {
                let began = super::micros_at(epoch, due);
                c.publish(pb::PublishRequest { topic, messages }).await?;
                latencies.add(micros_since(epoch).saturating_sub(began));
                Ok(())
            }
        },
    )
    .await?;
    let paced_total: u64 = curve.iter().map(|p| p.sent * PACED_BATCH as u64).sum();
    anyhow::ensure!(
        wait_for(received, total + paced_total, Duration::from_secs(120)).await,
        "the consumer received {} of the {} messages published within 120 s",
        received.load(Ordering::Relaxed),
        total + paced_total
    );
    for p in &mut curve {
        p.rate *= PACED_BATCH as f64;
        p.sent *= PACED_BATCH as u64;
    }
    Ok(Report {
        published_per_s,
        consumed_per_s,
        cpu_us,
        fsyncs_per_message,
        curve,
    })
}

/// Consumes and acknowledges everything on `topic` until `stop`, counting
/// what arrives.
async fn consume(
    url: String,
    topic: String,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut client = CoordinatorClient::connect(url)
        .await?
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(256);
    tx.send(pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Subscribe(pb::Subscribe {
            revoke_timeout_ms: 0,
            topic,
            group: "bench".into(),
            start_from: pb::StartFrom::Earliest as i32,
            initial_credit: 20_000,
            session_timeout_ms: 30_000,
            client_id: "bench".into(),
        })),
    })
    .await?;
    let mut stream = client
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("Consume")?
        .into_inner();
    while !stop.load(Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
            Err(_) => continue,
            Ok(m) => m.context("the consume stream")?,
        };
        let Some(msg) = msg else {
            anyhow::bail!("the coordinator ended the consume stream");
        };
        let Some(pb::consume_response::Kind::Deliveries(d)) = msg.kind else {
            continue;
        };
        let n = d.deliveries.len();
        let offsets = d
            .deliveries
            .iter()
            .map(|d| pb::AckedOffset {
                partition: d.partition,
                offset: d.offset,
                epoch: d.epoch,
            })
            .collect();
        tx.send(pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Ack(pb::Ack { offsets })),
        })
        .await?;
        tx.send(pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Credit(pb::Credit {
                messages: n as u32,
            })),
        })
        .await?;
        received.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}
