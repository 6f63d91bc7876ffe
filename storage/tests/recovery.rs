//! Crash recovery, as properties.
//!
//! Durability contract under test (fsync `always`): after any interleaving
//! of appends, crashes and reopens, the log recovers to a prefix of what was
//! written that holds every acknowledged record, with dense offsets, and
//! every record read back is exactly what was appended (its batch CRC holds).
//!
//! A crash is simulated at the file level: appends issued "during" the
//! crash are treated as never acknowledged, and the bytes written since the
//! last sync (theirs, and those of relaxed appends not yet synced: the only
//! bytes a crash may lose under fsync `always`) are cut at an arbitrary
//! byte, optionally with garbage left behind as by a torn write.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use proptest::prelude::*;
use tandem_storage::{
    EmbeddedLog, Error, Log, LogConfig, ReadBudget, Record, StoredRecord, TopicPartition,
};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn record(seq: u64, size: usize) -> Record {
    Record {
        id: Bytes::from(seq.to_string()),
        key: seq.is_multiple_of(3).then(|| Bytes::from_static(b"key")),
        value: Bytes::from(vec![(seq % 256) as u8; size]),
        headers: Vec::new(),
        timestamp_ms: seq as i64,
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// An acknowledged append of records of these sizes.
    Append(Vec<usize>),
    /// A relaxed append: acknowledged before it is synced, so durable only
    /// once a later synced append or sync has completed.
    AppendRelaxed(Vec<usize>),
    /// An explicit sync.
    Sync,
    /// A crash with these appends in flight; the bytes they wrote are cut
    /// at `cut` (a fraction of them) and `garbage` bytes follow the cut.
    Crash {
        in_flight: Vec<Vec<usize>>,
        cut: prop::sample::Index,
        garbage: Vec<u8>,
    },
    /// A clean close and reopen.
    Reopen,
}

fn arb_batch() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..700, 1..4)
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => arb_batch().prop_map(Op::Append),
        3 => arb_batch().prop_map(Op::AppendRelaxed),
        1 => Just(Op::Sync),
        2 => (
            prop::collection::vec(arb_batch(), 0..5),
            any::<prop::sample::Index>(),
            prop_oneof![Just(Vec::new()), prop::collection::vec(any::<u8>(), 1..80)],
        )
            .prop_map(|(in_flight, cut, garbage)| Op::Crash { in_flight, cut, garbage }),
        1 => Just(Op::Reopen),
    ]
}

fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("partition folder exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let len = std::fs::metadata(&p).map_or(0, |m| m.len());
            (p, len)
        })
        .collect();
    v.sort();
    v
}

async fn read_all(log: &EmbeddedLog, tp: &TopicPartition) -> Result<Vec<StoredRecord>, Error> {
    let mut out = Vec::new();
    let mut from = log.offsets(tp)?.log_start;
    loop {
        let batch = log
            .read(
                tp,
                from,
                ReadBudget {
                    max_bytes: 2000,
                    max_records: 7,
                },
            )
            .await?;
        let Some(last) = batch.last() else {
            return Ok(out);
        };
        from = last.offset + 1;
        out.extend(batch);
    }
}

/// Cuts the bytes written after `durable` (file sizes before the in-flight
/// appends) at `cut`, leaving `garbage` after the cut.
fn crash(dir: &Path, durable: &[(PathBuf, u64)], cut: prop::sample::Index, garbage: &[u8]) {
    let now = files(dir);
    let regions: Vec<(PathBuf, u64, u64)> = now
        .iter()
        .map(|(p, len)| {
            let from = durable.iter().find(|(d, _)| d == p).map_or(0, |(_, l)| *l);
            (p.clone(), from, *len)
        })
        .filter(|(_, from, len)| len > from || *from == 0)
        .collect();
    let total: u64 = regions.iter().map(|(_, f, l)| l - f).sum();
    let mut at = cut.index(total as usize + 1) as u64;
    let mut cut_done = false;
    for (path, from, len) in regions {
        if cut_done {
            std::fs::remove_file(&path).expect("delete segment");
            let _ = std::fs::remove_file(path.with_extension("index"));
            continue;
        }
        let span = len - from;
        if at <= span && (at < span || garbage.is_empty()) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open segment");
            f.set_len(from + at).expect("truncate");
            if !garbage.is_empty() {
                use std::os::unix::fs::FileExt;
                f.write_all_at(garbage, from + at).expect("write garbage");
            }
            cut_done = true;
        } else {
            at -= span.min(at);
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    rt.block_on(async move {
        let fail = |e: Error| TestCaseError::fail(e.to_string());
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let tp = TopicPartition::new("p", 0);
        let pdir = dir.path().join("p/0");
        let mut log = EmbeddedLog::open(dir.path(), config())
            .await
            .map_err(fail)?;
        log.create_partition(&tp).await.map_err(fail)?;
        // What the log must hold: durably acknowledged records, in offset
        // order; then relaxed ones not yet synced; and the files as of the
        // last sync (what a crash cannot take away).
        let mut model: Vec<Record> = Vec::new();
        let mut unsynced: Vec<Record> = Vec::new();
        let mut durable = files(&pdir);
        let mut seq = 0u64;
        let mut batch = |sizes: &[usize]| -> Vec<Record> {
            sizes
                .iter()
                .map(|&s| {
                    seq += 1;
                    record(seq, s)
                })
                .collect()
        };
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let records = batch(&sizes);
                    let ack = log.append(&tp, records.clone()).await.map_err(fail)?;
                    prop_assert_eq!(ack.base_offset, (model.len() + unsynced.len()) as u64);
                    model.append(&mut unsynced);
                    model.extend(records);
                    durable = files(&pdir);
                }
                Op::AppendRelaxed(sizes) => {
                    let records = batch(&sizes);
                    let ack = log
                        .append_relaxed(&tp, records.clone())
                        .await
                        .map_err(fail)?;
                    prop_assert_eq!(ack.base_offset, (model.len() + unsynced.len()) as u64);
                    unsynced.extend(records);
                }
                Op::Sync => {
                    log.sync(&tp).await.map_err(fail)?;
                    model.append(&mut unsynced);
                    durable = files(&pdir);
                }
                Op::Reopen => {
                    log.close().await; // a clean close syncs
                    model.append(&mut unsynced);
                    log = EmbeddedLog::open(dir.path(), config())
                        .await
                        .map_err(fail)?;
                    durable = files(&pdir);
                }
                Op::Crash {
                    in_flight,
                    cut,
                    garbage,
                } => {
                    // Unsynced relaxed appends and the in-flight ones may be lost.
                    let mut maybe = std::mem::take(&mut unsynced);
                    for sizes in in_flight {
                        let records = batch(&sizes);
                        log.append(&tp, records.clone()).await.map_err(fail)?;
                        maybe.extend(records);
                    }
                    log.close().await;
                    crash(&pdir, &durable, cut, &garbage);
                    log = EmbeddedLog::open(dir.path(), config())
                        .await
                        .map_err(fail)?;
                    let got = read_all(&log, &tp).await.map_err(fail)?;
                    prop_assert!(
                        got.len() >= model.len(),
                        "lost acknowledged records: {} < {}",
                        got.len(),
                        model.len()
                    );
                    prop_assert!(got.len() <= model.len() + maybe.len());
                    // the survivors of the crash are a prefix of what was not yet durable
                    let survived = got.len() - model.len();
                    model.extend(maybe.into_iter().take(survived));
                    durable = files(&pdir);
                }
            }
            let got = read_all(&log, &tp).await.map_err(fail)?;
            let expected: Vec<&Record> = model.iter().chain(&unsynced).collect();
            prop_assert_eq!(
                log.offsets(&tp).map_err(fail)?.high_water_mark,
                expected.len() as u64
            );
            prop_assert_eq!(got.len(), expected.len());
            for (i, (g, m)) in got.iter().zip(expected).enumerate() {
                prop_assert_eq!(g.offset, i as u64, "offsets are dense");
                prop_assert_eq!(&g.record, m, "record {} differs", i);
            }
        }
        log.close().await;
        Ok(())
    })
}

/// Damage anywhere (a cut or a flipped bit in any file, as by a bad disk):
/// open either refuses with an error naming a file, or recovers a prefix of
/// what was written; and no read ever returns a record that differs.
fn damage(
    sizes: Vec<Vec<usize>>,
    file: prop::sample::Index,
    at: prop::sample::Index,
    flip: Option<u8>,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    rt.block_on(async move {
        let fail = |e: Error| TestCaseError::fail(e.to_string());
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let tp = TopicPartition::new("p", 0);
        let log = EmbeddedLog::open(dir.path(), config())
            .await
            .map_err(fail)?;
        log.create_partition(&tp).await.map_err(fail)?;
        let mut written = Vec::new();
        for (i, s) in sizes.iter().enumerate() {
            let records: Vec<_> = s
                .iter()
                .enumerate()
                .map(|(j, &n)| record((i * 10 + j) as u64, n))
                .collect();
            log.append(&tp, records.clone()).await.map_err(fail)?;
            written.extend(records);
        }
        log.close().await;
        let all = files(&dir.path().join("p/0"));
        let (path, len) = &all[file.index(all.len())];
        let pos = at.index(*len as usize + 1) as u64;
        match flip {
            None => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                f.set_len(pos)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Some(bit) if pos < *len => {
                let mut bytes =
                    std::fs::read(path).map_err(|e| TestCaseError::fail(e.to_string()))?;
                bytes[pos as usize] ^= 1 << (bit % 8);
                std::fs::write(path, bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Some(_) => {}
        }
        let log = match EmbeddedLog::open(dir.path(), config()).await {
            Ok(log) => log,
            Err(Error::Corrupt { file, .. }) => {
                prop_assert!(file.exists(), "error names a real file");
                return Ok(());
            }
            Err(e) => return Err(fail(e)),
        };
        let mut from = 0;
        loop {
            match log.read(&tp, from, ReadBudget::default()).await {
                Ok(batch) if batch.is_empty() => break,
                Ok(batch) => {
                    for r in &batch {
                        prop_assert_eq!(r.offset, from);
                        prop_assert_eq!(&r.record, &written[from as usize]);
                        from += 1;
                    }
                }
                Err(Error::Corrupt { .. }) => break,
                Err(e) => return Err(fail(e)),
            }
        }
        log.close().await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn recovers_every_acknowledged_record_after_any_crash(ops in prop::collection::vec(arb_op(), 1..25)) {
        run(ops)?;
    }

    #[test]
    fn damage_never_yields_a_wrong_record(
        sizes in prop::collection::vec(arb_batch(), 1..20),
        file in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        flip in proptest::option::of(any::<u8>()),
    ) {
        damage(sizes, file, at, flip)?;
    }
}
