//! Behaviour of the embedded log through its public API that only it has:
//! retention by segment, fsync policies, and the difference between a torn
//! tail and corruption before it. What every backend owes is in
//! `conformance.rs`.

use std::time::Duration;

use bytes::Bytes;
use tandem_storage::{
    EmbeddedLog, Error, FsyncPolicy, Header, Log, LogConfig, ReadBudget, Record, Retention,
    TopicPartition,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn rec(i: u64, size: usize) -> Record {
    Record {
        id: Bytes::from(format!("id-{i:06}")),
        key: i
            .is_multiple_of(2)
            .then(|| Bytes::from(format!("k{}", i % 7))),
        value: Bytes::from(vec![(i % 251) as u8; size]),
        headers: vec![Header {
            name: "n".into(),
            value: Bytes::from(i.to_le_bytes().to_vec()),
        }],
        timestamp_ms: 1_700_000_000_000 + i as i64,
    }
}

fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 8 << 10,
        index_interval_bytes: 512,
        ..LogConfig::default()
    }
}

async fn read_all(
    log: &EmbeddedLog,
    tp: &TopicPartition,
) -> Result<Vec<tandem_storage::StoredRecord>, Error> {
    let mut out = Vec::new();
    let mut from = log.offsets(tp)?.log_start;
    loop {
        let batch = log
            .read(
                tp,
                from,
                ReadBudget {
                    max_bytes: 3000,
                    max_records: 17,
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

#[tokio::test]
async fn retention_deletes_whole_old_segments_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = LogConfig {
        retention: Retention {
            max_age: None,
            max_bytes: Some(20 << 10),
        },
        ..small_segments()
    };
    let log = EmbeddedLog::open(dir.path(), cfg).await?;
    let tp = TopicPartition::new("t", 0);
    log.create_partition(&tp).await?;
    for i in 0..100 {
        log.append(&tp, vec![rec(i, 900)]).await?;
    }
    let before = log.offsets(&tp)?;
    let deleted = log.enforce_retention().await?;
    let after = log.offsets(&tp)?;
    assert!(deleted > 0);
    assert!(
        after.size_bytes >= 20 << 10,
        "kept at least the limit: {after:?}"
    );
    assert!(after.size_bytes < before.size_bytes);
    assert!(after.log_start > 0);
    let err = log
        .read(&tp, 0, ReadBudget::default())
        .await
        .expect_err("deleted");
    assert!(matches!(err, Error::OffsetOutOfRange { start, .. } if start == after.log_start));
    let rest = read_all(&log, &tp).await?;
    assert_eq!(rest.first().map(|r| r.offset), Some(after.log_start));
    assert_eq!(rest.len() as u64, 100 - after.log_start);
    // reopening finds the same log start
    log.close().await;
    let log = EmbeddedLog::open(dir.path(), small_segments()).await?;
    assert_eq!(log.offsets(&tp)?.log_start, after.log_start);
    Ok(())
}

#[tokio::test]
async fn retention_by_age_keeps_the_active_segment() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = LogConfig {
        retention: Retention {
            max_age: Some(Duration::from_secs(3600)),
            max_bytes: None,
        },
        ..small_segments()
    };
    let log = EmbeddedLog::open(dir.path(), cfg).await?;
    let tp = TopicPartition::new("t", 0);
    log.create_partition(&tp).await?;
    // old records (timestamps from 2023) fill several segments
    for i in 0..50 {
        log.append(&tp, vec![rec(i, 900)]).await?;
    }
    log.enforce_retention().await?;
    let offsets = log.offsets(&tp)?;
    assert_eq!(offsets.high_water_mark, 50);
    assert!(
        offsets.log_start > 40,
        "only the active segment stays: {offsets:?}"
    );
    assert!(
        !log.read(&tp, offsets.log_start, ReadBudget::default())
            .await?
            .is_empty()
    );
    // fresh records are kept
    let now = chrono_now_ms();
    log.append(
        &tp,
        vec![Record {
            timestamp_ms: now,
            ..rec(50, 5000)
        }],
    )
    .await?;
    log.append(
        &tp,
        vec![Record {
            timestamp_ms: now,
            ..rec(51, 5000)
        }],
    )
    .await?;
    log.enforce_retention().await?;
    let kept = log.read(&tp, 50, ReadBudget::default()).await?;
    assert_eq!(
        kept.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![50, 51]
    );
    Ok(())
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[tokio::test]
async fn truncate_before_drops_whole_segments_below_the_offset() -> TestResult {
    let dir = tempfile::tempdir()?;
    let log = EmbeddedLog::open(dir.path(), small_segments()).await?;
    let tp = TopicPartition::new("t", 0);
    log.create_partition(&tp).await?;
    for i in 0..60 {
        log.append(&tp, vec![rec(i, 900)]).await?;
    }
    let start = log.truncate_before(&tp, 30).await?;
    assert!(start > 0 && start <= 30, "{start}");
    assert_eq!(
        log.read(&tp, 30, ReadBudget::default())
            .await?
            .first()
            .map(|r| r.offset),
        Some(30)
    );
    Ok(())
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn torn_tail_is_truncated_but_earlier_damage_refuses_to_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tp = TopicPartition::new("t", 0);
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
    log.create_partition(&tp).await?;
    for i in 0..10 {
        // equal-sized batches, so batch i starts at i * batch_len
        log.append(
            &tp,
            vec![Record {
                key: None,
                ..rec(i, 100)
            }],
        )
        .await?;
    }
    log.close().await;
    let file = segment_files(&dir.path().join("t/0")).remove(0);
    let len = std::fs::metadata(&file)?.len();
    let batch_len = len / 10;

    // A torn tail: the last batch cut short. Open truncates it.
    let f = std::fs::OpenOptions::new().write(true).open(&file)?;
    f.set_len(len - 7)?;
    drop(f);
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
    assert_eq!(log.offsets(&tp)?.high_water_mark, 9);
    assert_eq!(std::fs::metadata(&file)?.len(), len - batch_len);
    log.close().await;

    // Damage to the third batch with valid batches after it: open fails and
    // names the file and the byte.
    let mut bytes = std::fs::read(&file)?;
    let at = 2 * batch_len as usize + 50;
    bytes[at] ^= 0xFF;
    std::fs::write(&file, &bytes)?;
    let err = EmbeddedLog::open(dir.path(), LogConfig::default())
        .await
        .expect_err("corrupt");
    match &err {
        Error::Corrupt {
            file: f, position, ..
        } => {
            assert_eq!(f, &file);
            assert_eq!(*position, 2 * batch_len);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(
        err.to_string()
            .contains(&format!("at byte {}", 2 * batch_len)),
        "{err}"
    );

    // Asked to repair, it opens and keeps the prefix before the damage.
    let cfg = LogConfig {
        repair: true,
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(dir.path(), cfg).await?;
    assert_eq!(log.offsets(&tp)?.high_water_mark, 2);
    let ack = log.append(&tp, vec![rec(2, 100)]).await?;
    assert_eq!(ack.base_offset, 2);
    Ok(())
}

#[tokio::test]
async fn damage_in_a_sealed_segment_is_found_on_read_or_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tp = TopicPartition::new("t", 0);
    let log = EmbeddedLog::open(dir.path(), small_segments()).await?;
    log.create_partition(&tp).await?;
    for i in 0..40 {
        log.append(&tp, vec![rec(i, 900)]).await?;
    }
    log.close().await;
    let first = segment_files(&dir.path().join("t/0")).remove(0);
    let mut bytes = std::fs::read(&first)?;
    bytes[100] ^= 1;
    std::fs::write(&first, &bytes)?;
    // The sealed segment's index still matches its size, so open trusts it;
    // the read then checks the CRC and names the file.
    let log = EmbeddedLog::open(dir.path(), small_segments()).await?;
    let err = log
        .read(&tp, 0, ReadBudget::default())
        .await
        .expect_err("corrupt read");
    assert!(
        matches!(&err, Error::Corrupt { file, position: 0, .. } if file == &first),
        "{err}"
    );
    log.close().await;
    // Without its index file the segment is scanned on open, and refused.
    std::fs::remove_file(first.with_extension("index"))?;
    let err = EmbeddedLog::open(dir.path(), small_segments())
        .await
        .expect_err("corrupt open");
    assert!(
        matches!(&err, Error::Corrupt { file, .. } if file == &first),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn relaxed_fsync_policies_acknowledge_and_persist_on_close() -> TestResult {
    for fsync in [
        FsyncPolicy::Interval(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir()?;
        let tp = TopicPartition::new("t", 0);
        let cfg = LogConfig {
            fsync,
            ..small_segments()
        };
        let log = EmbeddedLog::open(dir.path(), cfg.clone()).await?;
        log.create_partition(&tp).await?;
        for i in 0..30 {
            log.append(&tp, vec![rec(i, 500)]).await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        log.close().await;
        let err = log.append(&tp, vec![rec(99, 1)]).await.expect_err("closed");
        assert!(matches!(err, Error::Closed), "{err}");
        let log = EmbeddedLog::open(dir.path(), cfg).await?;
        assert_eq!(read_all(&log, &tp).await?.len(), 30, "{fsync:?}");
    }
    Ok(())
}

/// A relaxed append is synced within `relaxed_sync_within` even when no
/// synced append or explicit sync follows it; without the bound nothing
/// syncs it until then (the case the bound exists for).
#[tokio::test]
async fn relaxed_appends_are_synced_within_the_bound() -> TestResult {
    for bound in [None, Some(Duration::from_millis(100))] {
        let dir = tempfile::tempdir()?;
        let tp = TopicPartition::new("t", 0);
        let cfg = LogConfig {
            relaxed_sync_within: bound,
            ..small_segments()
        };
        let log = EmbeddedLog::open(dir.path(), cfg).await?;
        log.create_partition(&tp).await?;
        let before = log.syncs();
        log.append_relaxed(&tp, vec![rec(1, 100)]).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while log.syncs() == before && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let synced = log.syncs() > before;
        assert_eq!(synced, bound.is_some(), "bound {bound:?}");
        log.close().await;
    }
    Ok(())
}

/// Every sync the writer makes for appends is timed once: the histogram's
/// count grows as `syncs()` does (small synced appends, and relaxed ones
/// whose segment rolls sync the journal first; no checkpoint, no segment
/// written directly), and its time in all is at most the time they took.
#[tokio::test]
async fn the_syncs_appends_wait_for_are_timed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tp = TopicPartition::new("t", 0);
    let log = EmbeddedLog::open(dir.path(), small_segments()).await?;
    log.create_partition(&tp).await?;
    let times = log.sync_times();
    let counted = |t: &tandem_storage::SyncTimes| t.counts().iter().sum::<u64>();
    let (syncs, count, sum) = (log.syncs(), counted(&times), times.sum());
    let began = std::time::Instant::now();
    for i in 0..40 {
        log.append(&tp, vec![rec(i, 500)]).await?;
    }
    let rolls = segment_files(&dir.path().join("t/0")).len();
    for i in 40..80 {
        log.append_relaxed(&tp, vec![rec(i, 500)]).await?;
    }
    log.append(&tp, vec![rec(80, 500)]).await?;
    let took = began.elapsed();
    assert!(
        segment_files(&dir.path().join("t/0")).len() > rolls,
        "the relaxed appends rolled no segment"
    );
    assert_eq!(
        times.counts().len(),
        tandem_storage::SyncTimes::BOUNDS_US.len() + 1
    );
    assert!(log.syncs() - syncs >= 40, "{} syncs", log.syncs() - syncs);
    assert_eq!(
        counted(&times) - count,
        log.syncs() - syncs,
        "{:?}",
        times.counts()
    );
    assert!(
        times.sum() - sum <= took,
        "{:?} of syncs in {took:?}",
        times.sum() - sum
    );
    assert!(
        log.offsets(&tp)?.high_water_mark == 81 && segment_files(&dir.path().join("t/0")).len() > 1,
        "the appends rolled no segment"
    );
    log.close().await;
    Ok(())
}

/// A deletion a crash cut short (its folder marked, some files left) is
/// finished when the log opens again: the partition does not come back.
#[tokio::test]
async fn a_deletion_cut_short_is_finished_at_the_next_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tp = TopicPartition::new("half", 0);
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
    log.create_partition(&tp).await?;
    log.append(
        &tp,
        vec![Record {
            id: Bytes::from_static(b"a"),
            key: None,
            value: Bytes::from_static(b"v"),
            headers: Vec::new(),
            timestamp_ms: 0,
        }],
    )
    .await?;
    log.close().await;
    drop(log);
    // What a crash after the mark leaves: the mark, and the files.
    std::fs::write(dir.path().join("half/0/deleted"), b"")?;
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
    assert!(log.partitions().is_empty());
    assert!(!dir.path().join("half/0").exists());
    Ok(())
}
