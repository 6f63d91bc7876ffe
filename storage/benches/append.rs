//! Append throughput of the embedded log with fsync `always`, against raw
//! `write` + `fdatasync` of the same 1 KiB records measured in the same run.
//!
//! ```text
//! cargo bench -p tandem-storage --bench append -- [--seconds S] [--dir DIR]
//! ```
//!
//! Prints one row per case: records/s, MiB/s of record payload, and bytes
//! written to disk per second. `--dir` should be on the disk to measure
//! (default: a temporary folder under `target/`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_storage::{EmbeddedLog, Log, LogConfig, Record, TopicPartition};
use tokio::task::JoinSet;

const RECORD: usize = 1024;
const MIB: f64 = (1 << 20) as f64;

struct Row {
    name: String,
    records: u64,
    disk_bytes: u64,
    elapsed: Duration,
}

impl Row {
    fn per_sec(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
    fn payload_mib(&self) -> f64 {
        self.per_sec() * RECORD as f64 / MIB
    }
    fn disk_mib(&self) -> f64 {
        self.disk_bytes as f64 / self.elapsed.as_secs_f64() / MIB
    }
}

fn record(i: u64) -> Record {
    Record {
        id: Bytes::from(i.to_string()),
        key: None,
        value: Bytes::from(vec![(i % 251) as u8; RECORD]),
        headers: Vec::new(),
        timestamp_ms: 0,
    }
}

fn create(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("bench file can be created")
}

/// `chunk` bytes per `pwrite`, `fdatasync` after each, for `secs`.
fn raw(dir: &Path, name: &str, chunk: usize, secs: Duration) -> Row {
    let path = dir.join(format!("raw-{chunk}"));
    let f = create(&path);
    let buf = vec![7u8; chunk];
    let start = Instant::now();
    let mut pos = 0u64;
    while start.elapsed() < secs {
        f.write_all_at(&buf, pos).expect("write");
        f.sync_data().expect("fdatasync");
        pos += chunk as u64;
    }
    let elapsed = start.elapsed();
    std::fs::remove_file(&path).expect("remove bench file");
    Row {
        name: name.into(),
        records: pos / RECORD as u64,
        disk_bytes: pos,
        elapsed,
    }
}

async fn log_case(
    dir: &Path,
    name: &str,
    appenders: usize,
    in_flight: usize,
    secs: Duration,
) -> Row {
    let root = dir.join(format!("log-{appenders}-{in_flight}"));
    let log = EmbeddedLog::open(&root, LogConfig::default())
        .await
        .expect("open log");
    let tp = TopicPartition::new("bench", 0);
    log.create_partition(&tp).await.expect("create partition");
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for a in 0..appenders {
        let (log, tp) = (log.clone(), tp.clone());
        tasks.spawn(async move {
            let mut pending = JoinSet::new();
            let mut done = 0u64;
            let mut i = (a as u64) << 40;
            while start.elapsed() < secs {
                while pending.len() < in_flight {
                    let (log, tp) = (log.clone(), tp.clone());
                    i += 1;
                    pending.spawn(async move { log.append(&tp, vec![record(i)]).await });
                }
                pending
                    .join_next()
                    .await
                    .expect("appends pending")
                    .expect("join")
                    .expect("append");
                done += 1;
            }
            while let Some(r) = pending.join_next().await {
                r.expect("join").expect("append");
                done += 1;
            }
            done
        });
    }
    let mut records = 0;
    while let Some(n) = tasks.join_next().await {
        records += n.expect("appender");
    }
    let elapsed = start.elapsed();
    let disk_bytes = log.offsets(&tp).expect("offsets").size_bytes;
    log.close().await;
    std::fs::remove_dir_all(&root).expect("remove bench log");
    Row {
        name: name.into(),
        records,
        disk_bytes,
        elapsed,
    }
}

fn main() {
    let mut secs = Duration::from_secs(3);
    let mut dir: Option<PathBuf> = None;
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
            "--dir" => dir = args.next().map(PathBuf::from),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let base = dir.unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let tmp = tempfile::tempdir_in(&base).expect("temporary folder");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let rows = vec![
        raw(
            tmp.path(),
            "raw: 1 KiB write + fdatasync each",
            RECORD,
            secs,
        ),
        raw(
            tmp.path(),
            "raw: 1 MiB write + fdatasync each",
            1 << 20,
            secs,
        ),
        rt.block_on(log_case(
            tmp.path(),
            "log: 1 appender, waits on each",
            1,
            1,
            secs,
        )),
        rt.block_on(log_case(
            tmp.path(),
            "log: 16 appenders x 64 in flight",
            16,
            64,
            secs,
        )),
    ];
    println!(
        "{:<36} {:>12} {:>14} {:>12}",
        "case", "records/s", "payload MiB/s", "disk MiB/s"
    );
    for r in &rows {
        println!(
            "{:<36} {:>12.0} {:>14.1} {:>12.1}",
            r.name,
            r.per_sec(),
            r.payload_mib(),
            r.disk_mib()
        );
    }
    let (per_record, seq, log16) = (&rows[0], &rows[1], &rows[3]);
    println!();
    println!(
        "16 appenders vs raw sequential: {:.0} % of disk bandwidth ({:.1} of {:.1} MiB/s written)",
        100.0 * log16.disk_mib() / seq.disk_mib(),
        log16.disk_mib(),
        seq.disk_mib()
    );
    println!(
        "16 appenders vs one fdatasync per record: {:.1}x records/s",
        log16.per_sec() / per_record.per_sec()
    );
}
