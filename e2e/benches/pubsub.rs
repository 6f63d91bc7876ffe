//! Publish → consume throughput over gRPC on loopback, and publish latency
//! at half of the peak rate, with fsync `always`.
//!
//! ```text
//! cargo bench -p tandem-e2e --bench pubsub -- [--seconds S] [--sizes 100,1024] [--postgres URL]
//! ```
//!
//! `--postgres URL` (any database of a PostgreSQL server) runs the
//! coordinator on PostgreSQL instead, in a fresh database it creates there.
//!
//! A coordinator (in this process, serving on 127.0.0.1) holds a topic of
//! 4 partitions; publisher tasks send batches of 1 000 messages; one
//! consumer-group member receives and acknowledges everything. Throughput is
//! what the consumer received per second while publishers ran flat out.
//! Then publishers are paced at half that rate with batches of 100 and the
//! latency of each publish call (sent → durable and acknowledged) is taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_coordinator::{Config, Coordinator};
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::Channel;

const PARTITIONS: u32 = 4;
const MIB: f64 = (1 << 20) as f64;

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

/// Consumes and acknowledges everything on `topic`; counts what arrives.
async fn consumer(addr: String, topic: String, received: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut client = CoordinatorClient::connect(addr)
        .await
        .expect("connect")
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
    .await
    .expect("subscribe");
    let mut stream = client
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("consume")
        .into_inner();
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_millis(200), stream.message()).await
        else {
            continue;
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
        let _ = tx
            .send(pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Ack(pb::Ack { offsets })),
            })
            .await;
        let _ = tx
            .send(pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Credit(pb::Credit {
                    messages: n as u32,
                })),
            })
            .await;
        received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn client(addr: &str) -> CoordinatorClient<Channel> {
    CoordinatorClient::connect(addr.to_owned())
        .await
        .expect("connect")
        .max_encoding_message_size(64 << 20)
}

/// Publishers flat out for `secs`; returns (published, received) per second.
async fn peak(addr: &str, topic: &str, size: usize, secs: Duration) -> (f64, f64) {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cons = tokio::spawn(consumer(
        addr.to_owned(),
        topic.to_owned(),
        received.clone(),
        stop.clone(),
    ));
    let published = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut pubs = Vec::new();
    for w in 0..4u64 {
        let mut c = client(addr).await;
        let (topic, published) = (topic.to_owned(), published.clone());
        pubs.push(tokio::spawn(async move {
            let mut seq = w << 40;
            while start.elapsed() < secs {
                let messages = batch(size, 1000, &mut seq);
                c.publish(pb::PublishRequest {
                    topic: topic.clone(),
                    messages,
                })
                .await
                .expect("publish");
                published.fetch_add(1000, Ordering::Relaxed);
            }
        }));
    }
    // measure the consumer over the publishing window (after a short warm-up)
    tokio::time::sleep(secs / 5).await;
    let (r0, t0) = (received.load(Ordering::Relaxed), Instant::now());
    for p in pubs {
        p.await.expect("publisher");
    }
    let (r1, t1) = (received.load(Ordering::Relaxed), Instant::now());
    let pub_rate = published.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    // let the consumer catch up before the next phase
    let total = published.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = cons.await;
    (pub_rate, (r1 - r0) as f64 / (t1 - t0).as_secs_f64())
}

/// Publishes at `rate` messages/s in batches of 100; returns sorted call
/// latencies.
async fn paced(addr: &str, topic: &str, size: usize, rate: f64, secs: Duration) -> Vec<Duration> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cons = tokio::spawn(consumer(
        addr.to_owned(),
        topic.to_owned(),
        received.clone(),
        stop.clone(),
    ));
    let per_batch = 100;
    let interval = Duration::from_secs_f64(per_batch as f64 / rate);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let mut seq = 9 << 40;
    let c = client(addr).await;
    while start.elapsed() < secs {
        tick.tick().await;
        let (mut c, tx, topic) = (c.clone(), tx.clone(), topic.to_owned());
        let messages = batch(size, per_batch, &mut seq);
        tokio::spawn(async move {
            let t = Instant::now();
            c.publish(pb::PublishRequest { topic, messages })
                .await
                .expect("publish");
            let _ = tx.send(t.elapsed());
        });
    }
    drop(tx);
    let mut lat = Vec::new();
    while let Some(l) = rx.recv().await {
        lat.push(l);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = cons.await;
    lat.sort();
    lat
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let mut secs = Duration::from_secs(5);
    let mut sizes = vec![100usize, 1024];
    let mut postgres = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                secs = Duration::from_secs_f64(
                    args.next()
                        .and_then(|s| s.parse().ok())
                        .expect("--seconds S"),
                )
            }
            "--sizes" => {
                sizes = args
                    .next()
                    .expect("--sizes A,B")
                    .split(',')
                    .map(|s| s.parse().expect("size in bytes"))
                    .collect()
            }
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
    rt.block_on(async {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary folder");
        let store = match &postgres {
            Some(url) => tandem_e2e::bench::fresh_store(url).await,
            None => tandem_coordinator::Store::Embedded,
        };
        println!(
            "store: {}",
            if postgres.is_some() {
                "PostgreSQL"
            } else {
                "embedded"
            }
        );
        let config = Config {
            data_dir: dir.path().to_owned(),
            store,
            ..Config::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = format!("http://{}", listener.local_addr().expect("address"));
        let coordinator = Coordinator::open(config).await.expect("open coordinator");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(coordinator.serve(listener, async {
            let _ = stop_rx.await;
        }));
        tandem_e2e::bench::wait_serving(&addr).await;
        let mut c = client(&addr).await;
        println!(
            "{:>6} {:>14} {:>14} {:>10} {:>14} {:>10} {:>10}",
            "size", "published/s", "consumed/s", "MiB/s", "paced at /s", "p50", "p99"
        );
        for size in sizes {
            let topic = format!("bench-{size}");
            c.create_topic(pb::CreateTopicRequest {
                name: topic.clone(),
                partitions: PARTITIONS,
            })
            .await
            .expect("create topic");
            let (published, consumed) = peak(&addr, &topic, size, secs).await;
            let lat = paced(&addr, &topic, size, consumed / 2.0, secs).await;
            println!(
                "{:>6} {:>14.0} {:>14.0} {:>10.1} {:>14.0} {:>8.2}ms {:>8.2}ms",
                size,
                published,
                consumed,
                consumed * size as f64 / MIB,
                consumed / 2.0,
                pct(&lat, 0.5).as_secs_f64() * 1e3,
                pct(&lat, 0.99).as_secs_f64() * 1e3
            );
        }
        let _ = stop_tx.send(());
        let _ = server.await;
    });
}
