//! Power loss, as a property, over the page-cache model of the file system
//! (`tandem_storage::SimFs`).
//!
//! Durability contract under test (fsync `always`): whatever the moment of
//! a power cut (counted in file-system changes: before, inside or after any
//! write, sync, creation, rename or deletion, including during recovery
//! from the previous cut), and whatever the page cache then keeps of the
//! unsynced writes (nothing; a torn prefix; any pages in any order), the
//! log opens again and:
//! - every partition whose creation was acknowledged exists;
//! - every record at or below a partition's durable mark is there, at the
//!   offset it was acknowledged with, with its content (the mark is the
//!   last offset of any acknowledged synced append or the high-water mark
//!   at the start of an acknowledged `sync`), unless a
//!   `truncate_before` asked to drop it;
//! - every record read back is one that was appended, once, with the
//!   content it was appended with, at dense offsets.
//!
//! The disk may also be told to lie (ignore the syncs of some files or
//! folders): `a_missing_fsync_is_caught` shows that each of the log's syncs
//! is needed, by finding a broken contract when any one of them is skipped.
//!
//! A run is generated from a seed; the appenders run concurrently, so a seed
//! fixes the workload, the cut and what survives, not the interleaving.
//! `TANDEM_POWERLOSS_SEEDS=N` runs more seeds.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_storage::{
    EmbeddedLog, Log, LogConfig, Loss, ReadBudget, Record, SimFs, TopicPartition,
};

const ROOT: &str = "/data/log";

/// Small segments roll often; larger ones let an unsynced group of
/// batches span several pages. A small journal is replaced often.
fn config(seed: u64) -> LogConfig {
    LogConfig {
        segment_bytes: if seed.is_multiple_of(2) { 4096 } else { 40_000 },
        // a small journal is checkpointed (and replaced) while appends run
        journal_bytes: if seed.is_multiple_of(3) {
            4096
        } else {
            64 << 20
        },
        // and a group's larger shares skip it (written and synced in place)
        direct_write_bytes: if seed.is_multiple_of(5) {
            1024
        } else {
            128 << 10
        },
        // and syncs may wait for more appends to join
        group_commit_wait: Duration::from_micros(if seed.is_multiple_of(4) { 300 } else { 0 }),
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
enum Step {
    Create(TopicPartition),
    Append {
        tp: TopicPartition,
        sizes: Vec<usize>,
        synced: bool,
    },
    Sync(TopicPartition),
    TruncateBefore(TopicPartition, u64),
}

/// How a round ends (unless the power went during it).
#[derive(Clone, Copy, Debug)]
enum End {
    /// The power goes.
    PowerCut,
    /// The process dies and restarts; the page cache survives.
    ProcessCrash,
}

#[derive(Debug)]
struct Round {
    /// Concurrent appenders, each with its steps in order.
    workers: Vec<Vec<Step>>,
    cut_after: u64,
    /// What the disk keeps of the unsynced at a power cut.
    loss: Loss,
    end: End,
}

fn plan(seed: u64) -> Vec<Round> {
    let mut rng = Rng(seed);
    let tps: Vec<TopicPartition> = vec![
        TopicPartition::new("t", 0),
        TopicPartition::new("t", 1),
        TopicPartition::new("u", 0),
    ];
    let rounds = 2 + rng.below(3);
    // With the larger segments, records up to 6 KB: a batch may cover
    // whole pages.
    let biggest = if seed.is_multiple_of(2) { 900 } else { 6000 };
    (0..rounds)
        .map(|r| {
            let workers = (0..1 + rng.below(3))
                .map(|w| {
                    let mut steps = Vec::new();
                    if r == 0 && w == 0 {
                        steps.push(Step::Create(tps[0].clone()));
                        steps.push(Step::Create(tps[1].clone()));
                    }
                    if w == 1 && rng.below(3) == 0 {
                        steps.push(Step::Create(tps[2].clone()));
                    }
                    for _ in 0..5 + rng.below(20) {
                        let tp = tps[rng.below(2) as usize].clone();
                        steps.push(match rng.below(12) {
                            0 => Step::Sync(tp),
                            1..=2 => Step::TruncateBefore(tp, rng.below(40)),
                            3..=4 => Step::Append {
                                tp,
                                sizes: (0..1 + rng.below(3))
                                    .map(|_| rng.below(biggest) as usize)
                                    .collect(),
                                synced: false,
                            },
                            _ => Step::Append {
                                tp,
                                sizes: (0..1 + rng.below(3))
                                    .map(|_| rng.below(biggest) as usize)
                                    .collect(),
                                synced: true,
                            },
                        });
                    }
                    steps
                })
                .collect();
            let loss = match rng.below(3) {
                0 => Loss::All,
                1 => Loss::Prefix(rng.next()),
                _ => Loss::Pages(rng.next()),
            };
            let end = if rng.below(3) == 0 {
                End::ProcessCrash
            } else {
                End::PowerCut
            };
            Round {
                workers,
                cut_after: rng.below(150),
                loss,
                end,
            }
        })
        .collect()
}

/// What the runs were told, shared by the appenders.
#[derive(Default)]
struct Acks {
    /// Partitions whose creation was acknowledged.
    created: Vec<TopicPartition>,
    /// Acknowledged records by partition and offset: (id, value).
    records: HashMap<TopicPartition, BTreeMap<u64, (Bytes, Bytes)>>,
    /// Every record ever handed to an append: id → value.
    attempted: HashMap<Bytes, Bytes>,
    /// Per partition: every offset at or below this is durable.
    durable: HashMap<TopicPartition, u64>,
    /// Per partition: the highest truncation point asked for.
    truncated: HashMap<TopicPartition, u64>,
}

fn lock(a: &Mutex<Acks>) -> std::sync::MutexGuard<'_, Acks> {
    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn work(log: EmbeddedLog, steps: Vec<Step>, acks: Arc<Mutex<Acks>>, tag: String) {
    let mut seq = 0;
    for step in steps {
        match step {
            Step::Create(tp) => {
                if log.create_partition(&tp).await.is_ok() {
                    lock(&acks).created.push(tp);
                }
            }
            Step::Append { tp, sizes, synced } => {
                let records: Vec<Record> = sizes
                    .iter()
                    .map(|&s| {
                        seq += 1;
                        let id = Bytes::from(format!("{tag}-{seq}"));
                        let value = Bytes::from(vec![(seq % 251) as u8; s]);
                        Record {
                            id,
                            key: None,
                            value,
                            headers: Vec::new(),
                            timestamp_ms: seq as i64,
                        }
                    })
                    .collect();
                {
                    let mut a = lock(&acks);
                    for r in &records {
                        a.attempted.insert(r.id.clone(), r.value.clone());
                    }
                }
                let result = if synced {
                    log.append(&tp, records.clone()).await
                } else {
                    log.append_relaxed(&tp, records.clone()).await
                };
                if let Ok(ack) = result {
                    let mut a = lock(&acks);
                    let m = a.records.entry(tp.clone()).or_default();
                    for (i, r) in records.into_iter().enumerate() {
                        m.insert(ack.base_offset + i as u64, (r.id, r.value));
                    }
                    if synced {
                        let d = a.durable.entry(tp).or_insert(0);
                        *d = (*d).max(ack.last_offset + 1);
                    }
                }
            }
            Step::Sync(tp) => {
                let Ok(o) = log.offsets(&tp) else { continue };
                if log.sync(&tp).await.is_ok() {
                    let mut a = lock(&acks);
                    let d = a.durable.entry(tp).or_insert(0);
                    *d = (*d).max(o.high_water_mark);
                }
            }
            Step::TruncateBefore(tp, offset) => {
                // Records below `offset` may go from the moment it is asked
                // (a concurrent sync of the folder may make the deletion
                // durable even if this call then fails).
                {
                    let mut a = lock(&acks);
                    let t = a.truncated.entry(tp.clone()).or_insert(0);
                    *t = (*t).max(offset);
                }
                let _ = log.truncate_before(&tp, offset).await;
            }
        }
    }
}

/// Checks the log on `fs` against what was acknowledged; then forgets the
/// acknowledged records the cut could take and did (relaxed ones above the
/// durable mark), whose offsets the next round may reuse.
async fn check(fs: &SimFs, acks: &mut Acks, seed: u64) -> Result<(), String> {
    let log = EmbeddedLog::open_on(Arc::new(fs.clone()), ROOT, config(seed))
        .await
        .map_err(|e| format!("the log does not open after the power cut: {e}"))?;
    let have = log.partitions();
    for tp in &acks.created {
        if !have.contains(tp) {
            log.close().await;
            return Err(format!("partition {tp} was created, and is gone"));
        }
    }
    let result = check_partitions(&log, acks).await;
    log.close().await;
    result
}

async fn check_partitions(log: &EmbeddedLog, acks: &mut Acks) -> Result<(), String> {
    for tp in log.partitions() {
        let o = log.offsets(&tp).map_err(|e| e.to_string())?;
        let mut seen = HashMap::new();
        let mut next = o.log_start;
        let mut read = BTreeMap::new();
        while next < o.high_water_mark {
            let batch = log
                .read(&tp, next, ReadBudget::default())
                .await
                .map_err(|e| format!("{tp}: reading from {next}: {e}"))?;
            for r in batch {
                if r.offset != next {
                    return Err(format!(
                        "{tp}: offset {} read where {next} was due",
                        r.offset
                    ));
                }
                next += 1;
                match acks.attempted.get(&r.record.id) {
                    Some(v) if *v == r.record.value => {}
                    Some(_) => return Err(format!("{tp}@{}: content changed", r.offset)),
                    None => return Err(format!("{tp}@{}: a record nobody appended", r.offset)),
                }
                if let Some(at) = seen.insert(r.record.id.clone(), r.offset) {
                    return Err(format!(
                        "{tp}: {:?} at {at} and again at {}",
                        r.record.id, r.offset
                    ));
                }
                read.insert(r.offset, r.record.id);
            }
        }
        let durable = acks.durable.get(&tp).copied().unwrap_or(0);
        let truncated = acks.truncated.get(&tp).copied().unwrap_or(0);
        if o.log_start > truncated {
            return Err(format!(
                "{tp}: the log starts at {}, but no truncation asked for more than {truncated}",
                o.log_start
            ));
        }
        for (offset, (id, _)) in acks.records.get(&tp).into_iter().flatten() {
            if *offset < o.log_start {
                continue;
            }
            match read.get(offset) {
                Some(got) if got == id => {}
                Some(got) => {
                    return Err(format!("{tp}@{offset}: acknowledged {id:?}, found {got:?}"));
                }
                None if *offset < durable => {
                    return Err(format!(
                        "{tp}@{offset}: {id:?}, acknowledged and durable (synced, or read after a restart), is lost (log {}..{})",
                        o.log_start, o.high_water_mark
                    ));
                }
                None => {}
            }
        }
        if let Some(m) = acks.records.get_mut(&tp) {
            m.retain(|offset, _| read.contains_key(offset));
        }
        // What readers saw can never be lost afterwards.
        let d = acks.durable.entry(tp.clone()).or_insert(0);
        *d = (*d).max(o.high_water_mark);
    }
    Ok(())
}

/// One seeded run: rounds of concurrent work, each ended by a power cut,
/// each checked after it. `lie` names files or folders whose syncs the disk
/// ignores.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// What a run did, for the report.
#[derive(Default)]
struct Tally {
    rounds: u64,
    cut_while_opening: u64,
    cut_while_working: u64,
    process_crashes: u64,
    acknowledged_checked: u64,
}

fn run(seed: u64, lie: Option<&str>) -> Result<Tally, String> {
    let rt = runtime().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut fs = SimFs::new();
        if let Some(l) = lie {
            fs.lie_about_syncs_of(l);
        }
        let acks = Arc::new(Mutex::new(Acks::default()));
        let mut tally = Tally::default();
        for (r, round) in plan(seed).into_iter().enumerate() {
            tally.rounds += 1;
            fs.cut_after(round.cut_after);
            // The cut may come while opening (recovering from the last cut).
            let opened = EmbeddedLog::open_on(Arc::new(fs.clone()), ROOT, config(seed)).await;
            if opened.is_err() {
                tally.cut_while_opening += 1;
            }
            if let Ok(log) = opened {
                let tasks: Vec<_> = round
                    .workers
                    .into_iter()
                    .enumerate()
                    .map(|(w, steps)| {
                        tokio::spawn(work(log.clone(), steps, acks.clone(), format!("r{r}w{w}")))
                    })
                    .collect();
                for t in tasks {
                    t.await.map_err(|e| e.to_string())?;
                }
                if fs.is_off() {
                    tally.cut_while_working += 1;
                } else if let End::PowerCut = round.end {
                    fs.cut_now();
                }
                if fs.is_off() {
                    log.close().await;
                } else {
                    // the process dies: its writers fail from now on
                    let next = fs.crash_process();
                    log.close().await;
                    fs = next;
                    tally.process_crashes += 1;
                }
            }
            if fs.is_off() {
                fs = fs.after_power_cut(round.loss);
            }
            let mut a = std::mem::take(&mut *lock(&acks));
            tally.acknowledged_checked += a.records.values().map(|m| m.len() as u64).sum::<u64>();
            let checked = check(&fs, &mut a, seed).await;
            *lock(&acks) = a;
            if let Err(e) = checked {
                let history = fs.history().join("\n  ");
                return Err(format!(
                    "round {r} ({:?}): {e}\n  the disk's latest changes:\n  {history}",
                    round.loss
                ));
            }
        }
        Ok(tally)
    })
}

fn seeds() -> u64 {
    std::env::var("TANDEM_POWERLOSS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

#[test]
fn every_acknowledged_record_survives_any_power_cut() {
    let mut failures = Vec::new();
    let only: Option<u64> = std::env::var("TANDEM_POWERLOSS_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut total = Tally::default();
    for seed in only.map_or(0..seeds(), |s| s..s + 1) {
        match run(seed, None) {
            Ok(t) => {
                total.rounds += t.rounds;
                total.cut_while_opening += t.cut_while_opening;
                total.cut_while_working += t.cut_while_working;
                total.process_crashes += t.process_crashes;
                total.acknowledged_checked += t.acknowledged_checked;
            }
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    eprintln!(
        "{} rounds: {} ended by a crash of the process alone, the others by a power cut \
         ({} while recovering, {} while appending, the rest when idle); \
         {} checks of acknowledged records after them",
        total.rounds,
        total.process_crashes,
        total.cut_while_opening,
        total.cut_while_working,
        total.acknowledged_checked
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        only.is_some() || total.cut_while_working * 4 > total.rounds,
        "too few cuts fell while appending to test anything"
    );
}

/// Each sync the log makes, skipped in turn (the disk lies about it): the
/// check above finds a broken contract within a few seeds.
#[test]
fn a_missing_fsync_is_caught() {
    for (lie, what) in [
        (".log", "fdatasync of segment files"),
        (".wal", "fdatasync of the journal"),
        ("/data/log/t/0", "fsync of a partition folder"),
        ("/data/log/t", "fsync of a topic folder"),
        ("/data/log", "fsync of the log's root folder"),
        ("/data", "fsync of the folder holding the root"),
    ] {
        let caught = (0..seeds()).find_map(|seed| run(seed, Some(lie)).err());
        assert!(
            caught.is_some(),
            "skipping the {what} went unnoticed in {} seeds",
            seeds()
        );
        eprintln!("skipping the {what}: {}", caught.unwrap_or_default());
    }
}

#[test]
fn the_model_drops_unsynced_writes_and_entries() -> Result<(), Box<dyn std::error::Error>> {
    use tandem_storage::Vfs;
    use tandem_storage::vfs::OpenMode;
    let fs = SimFs::new();
    fs.create_dir_all(Path::new("/d"))?;
    fs.sync_dir(Path::new("/"))?;
    let f = fs.open(Path::new("/d/a"), OpenMode::CreateNew)?;
    f.write_all_at(b"hello", 0)?;
    f.sync_data()?;
    // the file's bytes are synced, its folder entry is not
    let gone = fs.after_power_cut(Loss::All);
    assert!(gone.list(Path::new("/d"))?.is_empty());
    fs.sync_dir(Path::new("/d"))
        .err()
        .ok_or("the power is off")?;
    let fs = SimFs::new();
    fs.create_dir_all(Path::new("/d"))?;
    fs.sync_dir(Path::new("/"))?;
    let f = fs.open(Path::new("/d/a"), OpenMode::CreateNew)?;
    fs.sync_dir(Path::new("/d"))?;
    f.write_all_at(b"hello", 0)?;
    f.sync_data()?;
    f.write_all_at(b" world", 5)?;
    let kept = fs.after_power_cut(Loss::All);
    assert_eq!(kept.read(Path::new("/d/a"))?, b"hello");
    Ok(())
}

/// A write of several pages, not yet synced when the power goes, of which
/// the page cache kept later pages and lost an earlier one: the damaged
/// batch has valid batches after it, and is still a torn tail (nothing
/// after an unsynced byte was synced), not damage that stops the log from
/// opening. Before the log knew this, at least 5 of these 200 cuts left
/// a log that refused to open.
#[test]
fn a_write_whose_later_pages_outlived_an_earlier_one_is_a_torn_tail() {
    let rt = runtime().expect("runtime");
    rt.block_on(async {
        let tp = TopicPartition::new("t", 0);
        let mut cut_inside = 0;
        let mut kept = 0;
        for seed in 0..200u64 {
            let fs = SimFs::new();
            let log = EmbeddedLog::open_on(Arc::new(fs.clone()), ROOT, config(1))
                .await
                .expect("open");
            log.create_partition(&tp).await.expect("create");
            let first = log
                .append(&tp, vec![record("synced", 700)])
                .await
                .expect("append");
            // relaxed: written, not synced, when the power goes
            for (i, size) in [10_000, 3_000, 300].into_iter().enumerate() {
                log.append_relaxed(&tp, vec![record(&i.to_string(), size)])
                    .await
                    .expect("append");
            }
            fs.cut_now();
            log.close().await;
            let disk = fs.after_power_cut(Loss::Pages(seed));
            let disk_view = disk.clone();
            let log = EmbeddedLog::open_on(Arc::new(disk), ROOT, config(1))
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: the log does not open: {e}"));
            let read = log.read(&tp, 0, ReadBudget::default()).await.expect("read");
            assert_eq!(read[0].offset, first.base_offset);
            assert_eq!(read[0].record.id, "synced", "seed {seed}");
            let ids: Vec<_> = read.iter().map(|r| r.record.id.clone()).collect();
            let expected: Vec<Bytes> = ["synced", "0", "1", "2"]
                .iter()
                .take(read.len())
                .map(|s| Bytes::from(*s))
                .collect();
            assert_eq!(ids, expected, "seed {seed}: not a prefix");
            if read.len() == 1 {
                cut_inside += 1;
            }
            log.close().await;
            if segment_files(&disk_view, "cut-at") > 0 {
                kept += 1;
            }
        }
        assert!(cut_inside > 0, "no cut fell inside the unsynced write");
        assert!(
            kept > 0,
            "the bytes cut off behind valid batches were never kept"
        );
    });
}

fn record(id: &str, size: usize) -> Record {
    Record {
        id: Bytes::from(id.to_owned()),
        key: None,
        value: Bytes::from(vec![7u8; size]),
        headers: Vec::new(),
        timestamp_ms: 0,
    }
}

/// Two deletions of old segments at once (retention and a truncation, say):
/// the second deleted a later segment and synced the folder while the first
/// had yet to delete an earlier one. A power cut then left a gap: the log
/// refused to open ("segment starts at offset 4, the previous one ends at
/// 2"). Deletions now go one at a time, oldest first.
#[test]
fn concurrent_deletions_never_leave_a_gap_at_a_power_cut() {
    let rt = runtime().expect("runtime");
    rt.block_on(async {
        let fs = SimFs::new();
        let log = EmbeddedLog::open_on(Arc::new(fs.clone()), ROOT, config(0))
            .await
            .expect("open");
        let tp = TopicPartition::new("t", 0);
        log.create_partition(&tp).await.expect("create");
        let mut bases = Vec::new();
        for _ in 0..100 {
            log.append(&tp, vec![record("r", 1500)])
                .await
                .expect("append");
            bases = segment_bases(&fs);
            if bases.len() >= 4 {
                break;
            }
        }
        let (b1, b2) = (bases[1], bases[2]);
        let first = Path::new(ROOT).join(format!("t/0/{:020}.log", bases[0]));
        fs.hold_deletion_of(&first);
        let (l1, tp1) = (log.clone(), tp.clone());
        let older = tokio::spawn(async move { l1.truncate_before(&tp1, b1).await });
        assert!(
            fs.deletion_waits(&first, std::time::Duration::from_secs(10)),
            "the first deletion never started"
        );
        let (l2, tp2) = (log.clone(), tp.clone());
        let newer = tokio::spawn(async move { l2.truncate_before(&tp2, b2).await });
        // let the second deletion run as far as it can
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        fs.cut_now();
        fs.release(&first);
        let _ = older.await;
        let _ = newer.await;
        log.close().await;
        let disk = fs.after_power_cut(Loss::All);
        let log = EmbeddedLog::open_on(Arc::new(disk), ROOT, config(0))
            .await
            .unwrap_or_else(|e| panic!("the log does not open after the power cut: {e}"));
        log.close().await;
    });
}

/// Files of partition t/0 whose name contains `part`.
fn segment_files(fs: &SimFs, part: &str) -> usize {
    use tandem_storage::Vfs;
    fs.list(&Path::new(ROOT).join("t/0"))
        .expect("partition folder")
        .into_iter()
        .filter(|(n, _)| n.contains(part))
        .count()
}

fn segment_bases(fs: &SimFs) -> Vec<u64> {
    use tandem_storage::Vfs;
    let mut v: Vec<u64> = fs
        .list(&Path::new(ROOT).join("t/0"))
        .expect("partition folder")
        .into_iter()
        .filter_map(|(n, _)| n.strip_suffix(".log")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Two logs opened as a group (as the coordinator opens its topics and
/// its internal state) share one journal in the folder above them: a power
/// cut that loses every unsynced page loses nothing either log
/// acknowledged, and no journal is left inside either log's folder.
#[test]
fn logs_of_a_group_share_one_journal_through_a_power_cut() {
    let rt = runtime().expect("runtime");
    rt.block_on(async {
        let tp = TopicPartition::new("t", 0);
        for seed in 0..40u64 {
            let open = |fs: SimFs| {
                EmbeddedLog::open_group_on(
                    Arc::new(fs),
                    "/data",
                    vec![
                        ("topics".to_owned(), config(seed)),
                        ("internal".to_owned(), config(seed)),
                    ],
                )
            };
            let fs = SimFs::new();
            let logs = open(fs.clone()).await.expect("open");
            for l in &logs {
                l.create_partition(&tp).await.expect("create");
            }
            for i in 0..20 {
                let (a, b) = tokio::join!(
                    logs[0].append(&tp, vec![record(&format!("a{i}"), 300)]),
                    logs[1].append_relaxed(&tp, vec![record(&format!("b{i}"), 200)]),
                );
                assert_eq!(a.expect("append").base_offset, i);
                assert_eq!(b.expect("append").base_offset, i);
            }
            // the relaxed ones become durable with this sync of the journal
            logs[1].sync(&tp).await.expect("sync");
            fs.cut_now();
            for l in &logs {
                l.close().await;
            }
            let disk = fs.after_power_cut(Loss::Pages(seed));
            let view = disk.clone();
            let logs = open(disk)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: does not open: {e}"));
            for (l, prefix) in logs.iter().zip(["a", "b"]) {
                let read = l.read(&tp, 0, ReadBudget::default()).await.expect("read");
                let ids: Vec<_> = read.iter().map(|r| r.record.id.clone()).collect();
                let expected: Vec<Bytes> = (0..20).map(|i| format!("{prefix}{i}").into()).collect();
                assert_eq!(ids, expected, "seed {seed}");
                l.close().await;
            }
            let journals = |dir: &str| {
                use tandem_storage::Vfs;
                view.list(Path::new(dir))
                    .expect("list")
                    .into_iter()
                    .filter(|(name, _)| name.ends_with(".wal"))
                    .count()
            };
            assert_eq!(journals("/data"), 1, "seed {seed}");
            assert_eq!(journals("/data/topics") + journals("/data/internal"), 0);
        }
    });
}
