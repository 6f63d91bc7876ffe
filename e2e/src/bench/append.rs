//! Appends to the embedded log with fsync `always`, against raw `pwrite` +
//! `fdatasync` measured in the same run, in the same folder: the raw
//! baselines write 1 KiB (what a log without group commit can do per
//! record) and 1 MiB (the disk's sequential bandwidth with syncs) per sync;
//! the log's cases are one appender waiting on each append, 16 appenders
//! with 64 appends in flight each on one partition, and 16 partitions with
//! one appender each and 4 small appends in flight, which one journal sync
//! covers together. Each append is timed from the call to its durable
//! acknowledgement.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_storage::{EmbeddedLog, Log, LogConfig, Record, TopicPartition};
use tokio::task::JoinSet;

use super::{CpuWindow, Latencies, Percentiles, micros_since};

const KIB: usize = 1024;
const MIB: f64 = (1 << 20) as f64;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of each case.
    pub seconds: Duration,
    /// The folder to write in (the disk to measure).
    pub dir: PathBuf,
    /// The log's `group_commit_wait` (`None`: its default).
    pub group_commit_wait: Option<Duration>,
}

/// One case's figures.
#[derive(Clone, Debug)]
pub struct Case {
    /// What it does.
    pub name: &'static str,
    /// Whether it is a raw baseline rather than the log.
    pub raw: bool,
    /// Records appended (raw: 1 KiB units written) per second.
    pub records_per_s: f64,
    /// Records appended (raw: 1 KiB units written) in all.
    pub records: u64,
    /// Bytes of record payload per record.
    pub record_bytes: usize,
    /// MiB per second written to the raw file or the log's segments,
    /// framing included (the journal's copy of small appends is not
    /// counted).
    pub disk_mib_per_s: f64,
    /// `fdatasync` calls per record.
    pub fsyncs_per_record: f64,
    /// This process's CPU per record, µs (NaN when unknown).
    pub cpu_us: f64,
    /// Call → durable acknowledgement of each append (the log's cases).
    pub latency: Option<Percentiles>,
}

/// What one run measured: the raw baselines first, then the log's cases.
#[derive(Clone, Debug)]
pub struct Report {
    /// Every case, in the order run.
    pub cases: Vec<Case>,
}

impl Report {
    /// Records/s of the case named `name`.
    pub fn rate(&self, name: &str) -> Option<f64> {
        self.cases
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.records_per_s)
    }
}

/// The raw baseline of one 1 KiB write and sync per record.
pub const RAW_RECORD: &str = "raw 1 KiB write+fdatasync";
/// The raw baseline of 1 MiB writes, each synced (counted in KiB, the
/// records' size).
pub const RAW_SEQUENTIAL: &str = "raw 1 MiB write+fdatasync, in KiB";
/// The log's case of 16 appenders on one partition.
pub const LOG_GROUPED: &str = "log 16 appenders x 64, 1 KiB";

/// The log's cases: name, appenders, appends in flight each, partitions,
/// record size.
const LOG_CASES: [(&str, usize, usize, u32, usize); 3] = [
    ("log 1 appender, waits on each, 1 KiB", 1, 1, 1, KIB),
    (LOG_GROUPED, 16, 64, 1, KIB),
    ("log 16 partitions x 4, 100 B", 16, 4, 16, 100),
];

/// Runs every case; `label` names it on the progress bar.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.dir)?;
    let mut cases = Vec::new();
    for (name, chunk) in [(RAW_RECORD, KIB), (RAW_SEQUENTIAL, 1 << 20)] {
        let phase = super::Phase::start(format!("{label}: {name}"), opts.seconds);
        let (dir, secs) = (opts.dir.clone(), opts.seconds);
        let case = tokio::task::spawn_blocking(move || raw(&dir, name, chunk, secs)).await??;
        phase.end().await;
        cases.push(case);
    }
    let mut config = LogConfig::default();
    if let Some(w) = opts.group_commit_wait {
        config.group_commit_wait = w;
    }
    for (name, appenders, in_flight, partitions, size) in LOG_CASES {
        let phase = super::Phase::start(format!("{label}: {name}"), opts.seconds);
        let shape = Shape {
            appenders,
            in_flight,
            partitions,
            size,
        };
        let case = log_case(&opts.dir, &config, name, shape, opts.seconds).await?;
        phase.end().await;
        cases.push(case);
    }
    Ok(Report { cases })
}

/// `chunk` bytes per `pwrite`, `fdatasync` after each, for `secs`.
fn raw(dir: &Path, name: &'static str, chunk: usize, secs: Duration) -> anyhow::Result<Case> {
    let path = dir.join(format!("raw-{chunk}"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let buf = vec![7u8; chunk];
    let counter = AtomicU64::new(0);
    let cpu = CpuWindow::open(&counter);
    let start = Instant::now();
    let mut pos = 0u64;
    while start.elapsed() < secs {
        f.write_all_at(&buf, pos)?;
        f.sync_data()?;
        pos += chunk as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let records = pos / KIB as u64;
    counter.store(records, std::sync::atomic::Ordering::Relaxed);
    std::fs::remove_file(&path)?;
    Ok(Case {
        name,
        raw: true,
        records_per_s: records as f64 / elapsed,
        records,
        record_bytes: KIB,
        disk_mib_per_s: pos as f64 / elapsed / MIB,
        fsyncs_per_record: (pos / chunk as u64) as f64 / records.max(1) as f64,
        cpu_us: cpu.micros_per_event(&counter),
        latency: None,
    })
}

/// How a log case appends.
struct Shape {
    appenders: usize,
    in_flight: usize,
    partitions: u32,
    size: usize,
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

async fn log_case(
    dir: &Path,
    config: &LogConfig,
    name: &'static str,
    shape: Shape,
    secs: Duration,
) -> anyhow::Result<Case> {
    let root = dir.join(format!("log-{}-{}", shape.appenders, shape.partitions));
    let log = EmbeddedLog::open(&root, config.clone()).await?;
    let tps: Vec<_> = (0..shape.partitions)
        .map(|p| TopicPartition::new("bench", p))
        .collect();
    for tp in &tps {
        log.create_partition(tp).await?;
    }
    let latencies = Arc::new(Latencies::default());
    latencies.restart();
    let epoch = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let cpu = CpuWindow::open(&done);
    let syncs_before = log.syncs();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for a in 0..shape.appenders {
        let (log, tp) = (log.clone(), tps[a % tps.len()].clone());
        let (in_flight, size) = (shape.in_flight, shape.size);
        let (latencies, done) = (latencies.clone(), done.clone());
        tasks.spawn(async move {
            let mut pending = JoinSet::new();
            let mut i = (a as u64) << 40;
            loop {
                while start.elapsed() < secs && pending.len() < in_flight {
                    let (log, tp, latencies) = (log.clone(), tp.clone(), latencies.clone());
                    i += 1;
                    pending.spawn(async move {
                        let began = micros_since(epoch);
                        log.append(&tp, vec![record(i, size)]).await?;
                        latencies.add(micros_since(epoch).saturating_sub(began));
                        anyhow::Ok(())
                    });
                }
                let Some(r) = pending.join_next().await else {
                    break;
                };
                r??;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let records = done.load(std::sync::atomic::Ordering::Relaxed);
    let cpu_us = cpu.micros_per_event(&done);
    let syncs = log.syncs() - syncs_before;
    let mut disk_bytes = 0;
    for tp in &tps {
        disk_bytes += log.offsets(tp)?.size_bytes;
    }
    log.close().await;
    std::fs::remove_dir_all(&root)?;
    Ok(Case {
        name,
        raw: false,
        records_per_s: records as f64 / elapsed,
        records,
        record_bytes: shape.size,
        disk_mib_per_s: disk_bytes as f64 / elapsed / MIB,
        fsyncs_per_record: syncs as f64 / records.max(1) as f64,
        cpu_us,
        latency: Some(latencies.summary()),
    })
}
