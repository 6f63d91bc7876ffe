//! Append throughput of the embedded log with fsync `always`, against raw
//! `write` + `fdatasync` of the same 1 KiB records measured in the same run.
//!
//! ```text
//! cargo bench -p tandem-storage --bench append -- [--seconds S] [--dir DIR]
//!     [--group-commit-wait-us N]
//! ```
//!
//! Prints one row per case: records/s, MiB/s of record payload, bytes
//! written to disk per second, and `fdatasync` calls per record. `--dir`
//! should be on the disk to measure (default: a temporary folder under
//! `target/`). The last case spreads small records over 16 partitions, where
//! the log's one journal lets one `fdatasync` cover all of them.

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
    size: usize,
    disk_bytes: u64,
    syncs: Option<u64>,
    elapsed: Duration,
}

impl Row {
    fn per_sec(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
    fn payload_mib(&self) -> f64 {
        self.per_sec() * self.size as f64 / MIB
    }
    fn disk_mib(&self) -> f64 {
        self.disk_bytes as f64 / self.elapsed.as_secs_f64() / MIB
    }
}

fn record(i: u64, size: usize) -> Record {
    Record {
        id: Bytes::from(i.to_string()),
        key: None,
        value: Bytes::from(vec![(i % 251) as u8; size]),
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
        size: RECORD,
        disk_bytes: pos,
        syncs: None,
        elapsed,
    }
}

/// How a log case appends.
struct Case {
    name: &'static str,
    appenders: usize,
    in_flight: usize,
    partitions: u32,
    size: usize,
}

async fn log_case(dir: &Path, config: &LogConfig, case: Case, secs: Duration) -> Row {
    let root = dir.join(format!("log-{}-{}", case.appenders, case.partitions));
    let log = EmbeddedLog::open(&root, config.clone())
        .await
        .expect("open log");
    let tps: Vec<_> = (0..case.partitions)
        .map(|p| TopicPartition::new("bench", p))
        .collect();
    for tp in &tps {
        log.create_partition(tp).await.expect("create partition");
    }
    let syncs_before = log.syncs();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for a in 0..case.appenders {
        let (log, tp) = (log.clone(), tps[a % tps.len()].clone());
        let (in_flight, size) = (case.in_flight, case.size);
        tasks.spawn(async move {
            let mut pending = JoinSet::new();
            let mut done = 0u64;
            let mut i = (a as u64) << 40;
            while start.elapsed() < secs {
                while pending.len() < in_flight {
                    let (log, tp) = (log.clone(), tp.clone());
                    i += 1;
                    pending.spawn(async move { log.append(&tp, vec![record(i, size)]).await });
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
    let syncs = log.syncs() - syncs_before;
    let disk_bytes = tps
        .iter()
        .map(|tp| log.offsets(tp).expect("offsets").size_bytes)
        .sum();
    log.close().await;
    std::fs::remove_dir_all(&root).expect("remove bench log");
    Row {
        name: case.name.into(),
        records,
        size: case.size,
        disk_bytes,
        syncs: Some(syncs),
        elapsed,
    }
}

fn main() {
    let mut secs = Duration::from_secs(3);
    let mut dir: Option<PathBuf> = None;
    let mut config = LogConfig::default();
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
            "--group-commit-wait-us" => {
                config.group_commit_wait = Duration::from_micros(
                    args.next()
                        .and_then(|s| s.parse().ok())
                        .expect("--group-commit-wait-us N"),
                )
            }
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

    let mut rows = vec![
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
    ];
    let cases = [
        ("log: 1 appender, waits on each", 1, 1, 1, RECORD),
        ("log: 16 appenders x 64 in flight", 16, 64, 1, RECORD),
        ("log: 16 partitions x 4 in flight, 100 B", 16, 4, 16, 100),
    ];
    for (name, appenders, in_flight, partitions, size) in cases {
        let case = Case {
            name,
            appenders,
            in_flight,
            partitions,
            size,
        };
        rows.push(rt.block_on(log_case(tmp.path(), &config, case, secs)));
    }
    println!(
        "{:<40} {:>10} {:>14} {:>11} {:>15}",
        "case", "records/s", "payload MiB/s", "disk MiB/s", "fdatasync/rec"
    );
    for r in &rows {
        let syncs = r.syncs.map_or("1".into(), |n| {
            format!("{:.3}", n as f64 / r.records.max(1) as f64)
        });
        println!(
            "{:<40} {:>10.0} {:>14.1} {:>11.1} {:>15}",
            r.name,
            r.per_sec(),
            r.payload_mib(),
            r.disk_mib(),
            syncs
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
