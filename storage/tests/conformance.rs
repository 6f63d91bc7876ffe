//! The behaviour every storage backend owes the coordinator, run on both:
//! the embedded engine (a temporary folder) and PostgreSQL (a fresh
//! database). Each test below exists once per backend, as
//! `embedded::<name>` and `postgres::<name>`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use tandem_storage::{
    EmbeddedLog, Error, Header, Lease, Log, LogConfig, PgStore, ReadBudget, Record, StoreLog,
    StoredRecord, Tail, TopicPartition,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Where a backend keeps its logs between opens.
enum Fixture {
    Embedded(tempfile::TempDir),
    Postgres(PgStore),
}

impl Fixture {
    fn embedded() -> Result<Fixture, Box<dyn std::error::Error>> {
        Ok(Fixture::Embedded(tempfile::tempdir()?))
    }

    async fn postgres() -> Result<Option<Fixture>, Box<dyn std::error::Error>> {
        let Some(url) = common::fresh_database().await? else {
            return Ok(None);
        };
        Ok(Some(Fixture::Postgres(
            PgStore::connect(&url, Duration::from_secs(10)).await?,
        )))
    }

    /// Opens the log (again): small segments on the embedded engine, so
    /// reads cross segment files; a new lease epoch on PostgreSQL, as a
    /// replica taking over would have.
    async fn open(&self) -> Result<StoreLog, Box<dyn std::error::Error>> {
        let config = LogConfig {
            segment_bytes: 8 << 10,
            index_interval_bytes: 512,
            ..LogConfig::default()
        };
        Ok(match self {
            Fixture::Embedded(dir) => {
                StoreLog::Embedded(EmbeddedLog::open(dir.path(), config).await?)
            }
            Fixture::Postgres(store) => {
                let lease: Lease = store
                    .acquire("test", "tester", "127.0.0.1:1", Duration::from_secs(60))
                    .await?
                    .ok_or("the test lease is free")?;
                StoreLog::Postgres(store.open("topics", &lease, config).await?)
            }
        })
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() -> super::TestResult {
                    super::$name(super::Fixture::embedded()?).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() -> super::TestResult {
                    match super::Fixture::postgres().await? {
                        Some(f) => super::$name(f).await,
                        None => Ok(()),
                    }
                }
            )*
        }
    };
}

conformance!(
    records_round_trip_and_survive_a_reopen,
    bad_input_gets_clear_errors_and_changes_nothing,
    waiters_wake_when_records_are_appended,
    concurrent_appenders_get_dense_offsets_in_ack_order,
    reads_keep_to_their_budget,
    truncation_moves_the_start_and_keeps_the_rest,
    a_deleted_partition_is_gone_for_good_and_its_name_starts_afresh,
);

fn rec(i: u64, size: usize) -> Record {
    Record {
        id: Bytes::from(format!("id-{i:06}")),
        key: i
            .is_multiple_of(2)
            .then(|| Bytes::from(format!("k{}", i % 7))),
        value: Bytes::from(vec![(i % 251) as u8; size]),
        headers: if i.is_multiple_of(3) {
            Vec::new()
        } else {
            vec![
                Header {
                    name: "n".into(),
                    value: Bytes::from(i.to_le_bytes().to_vec()),
                },
                Header {
                    name: "empty".into(),
                    value: Bytes::new(),
                },
            ]
        },
        timestamp_ms: 1_700_000_000_000 + i as i64,
    }
}

async fn read_all(log: &StoreLog, tp: &TopicPartition) -> Result<Vec<StoredRecord>, Error> {
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

async fn records_round_trip_and_survive_a_reopen(f: Fixture) -> TestResult {
    let tp = TopicPartition::new("orders", 0);
    let other = TopicPartition::new("orders", 1);
    let log = f.open().await?;
    log.create_partition(&tp).await?;
    log.create_partition(&other).await?;
    let mut expected = Vec::new();
    for chunk in 0..40u64 {
        let records: Vec<_> = (0..5)
            .map(|j| rec(chunk * 5 + j, 100 + (j as usize) * 50))
            .collect();
        let ack = log.append(&tp, records.clone()).await?;
        assert_eq!(
            (ack.base_offset, ack.last_offset),
            (chunk * 5, chunk * 5 + 4)
        );
        expected.extend(records);
    }
    log.append(&other, vec![rec(9, 1)]).await?;
    let check = |got: Vec<StoredRecord>| {
        assert_eq!(got.len(), expected.len());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g.offset, i as u64);
            assert_eq!(&g.record, e);
        }
    };
    if let Fixture::Embedded(dir) = &f {
        let segments = std::fs::read_dir(dir.path().join("orders/0"))?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count();
        assert!(segments > 3, "reads cross segment files: {segments}");
    }
    check(read_all(&log, &tp).await?);
    let mid = log.read(&tp, 123, ReadBudget::default()).await?;
    assert_eq!(mid.first().map(|r| r.offset), Some(123));
    let size = log.offsets(&tp)?.size_bytes;
    assert!(size > 200 * 100, "size counts the records: {size}");
    log.close().await;

    let log = f.open().await?;
    assert_eq!(log.partitions(), vec![tp.clone(), other.clone()]);
    let offsets = log.offsets(&tp)?;
    assert_eq!((offsets.log_start, offsets.high_water_mark), (0, 200));
    check(read_all(&log, &tp).await?);
    assert_eq!(log.append(&tp, vec![rec(200, 10)]).await?.base_offset, 200);
    assert_eq!(log.append(&other, vec![rec(201, 10)]).await?.base_offset, 1);
    Ok(())
}

async fn bad_input_gets_clear_errors_and_changes_nothing(f: Fixture) -> TestResult {
    let log = f.open().await?;
    let tp = TopicPartition::new("t", 0);
    log.create_partition(&tp).await?;
    log.append(&tp, vec![rec(0, 10)]).await?;

    let err = log.append(&tp, vec![]).await.expect_err("empty batch");
    assert!(matches!(err, Error::EmptyBatch), "{err}");

    let big = Record {
        value: Bytes::from(vec![0; 1 << 20]),
        ..rec(1, 0)
    };
    let err = log
        .append(&tp, vec![rec(1, 10), big])
        .await
        .expect_err("over-size record");
    assert!(
        matches!(
            err,
            Error::RecordTooLarge {
                index: 1,
                max: 1_048_576,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("record 1"), "{err}");

    let err = log
        .read(&tp, 2, ReadBudget::default())
        .await
        .expect_err("past the high-water mark");
    assert!(
        matches!(
            err,
            Error::OffsetOutOfRange {
                offset: 2,
                start: 0,
                end: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(log.read(&tp, 1, ReadBudget::default()).await?.is_empty());

    let unknown = TopicPartition::new("t", 1);
    let err = log
        .append(&unknown, vec![rec(0, 1)])
        .await
        .expect_err("unknown partition");
    assert!(
        matches!(&err, Error::UnknownPartition(tp) if tp == &unknown),
        "{err}"
    );
    assert!(err.to_string().contains("t/1"), "{err}");
    assert!(matches!(
        log.offsets(&unknown),
        Err(Error::UnknownPartition(_))
    ));
    let err = log
        .read(&unknown, 0, ReadBudget::default())
        .await
        .expect_err("unknown partition");
    assert!(matches!(err, Error::UnknownPartition(_)), "{err}");

    let err = log.create_partition(&tp).await.expect_err("exists");
    assert!(matches!(err, Error::PartitionExists(_)), "{err}");
    let err = log
        .create_partition(&TopicPartition::new("../etc", 0))
        .await
        .expect_err("bad name");
    assert!(matches!(err, Error::InvalidTopicName { .. }), "{err}");
    assert!(err.is_caller_error());

    let offsets = log.offsets(&tp)?;
    assert_eq!((offsets.log_start, offsets.high_water_mark), (0, 1));
    assert_eq!(log.partitions(), vec![tp.clone()]);
    log.close().await;
    let log = f.open().await?;
    assert_eq!(log.partitions(), vec![tp.clone()]);
    assert_eq!(read_all(&log, &tp).await?.len(), 1);
    Ok(())
}

async fn waiters_wake_when_records_are_appended(f: Fixture) -> TestResult {
    let log = f.open().await?;
    let tp = TopicPartition::new("t", 3);
    log.create_partition(&tp).await?;
    let mut tail = Tail::new(log.clone(), tp.clone(), 0);
    let follower = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 30 {
            seen.extend(
                tail.next_batch(ReadBudget::default())
                    .await?
                    .into_iter()
                    .map(|r| r.offset),
            );
        }
        Ok::<_, Error>(seen)
    });
    for i in 0..30 {
        log.append(&tp, vec![rec(i, 20)]).await?;
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), follower).await???;
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    assert_eq!(log.wait_for(&tp, 29).await?, 30);
    Ok(())
}

async fn concurrent_appenders_get_dense_offsets_in_ack_order(f: Fixture) -> TestResult {
    let tp = TopicPartition::new("t", 0);
    let log = f.open().await?;
    log.create_partition(&tp).await?;
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let (log, tp) = (log.clone(), tp.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..50 {
                let id = w * 1000 + i;
                acks.push((log.append(&tp, vec![rec(id, 64)]).await?.base_offset, id));
            }
            Ok::<_, Error>(acks)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let acks = t.await??;
        assert!(
            acks.windows(2).all(|w| w[0].0 < w[1].0),
            "one appender's acks are in order"
        );
        all.extend(acks);
    }
    all.sort_unstable();
    assert_eq!(
        all.iter().map(|a| a.0).collect::<Vec<_>>(),
        (0..400).collect::<Vec<_>>()
    );
    let stored = read_all(&log, &tp).await?;
    for ((offset, id), r) in all.iter().zip(&stored) {
        assert_eq!(r.offset, *offset);
        assert_eq!(r.record.id, Bytes::from(format!("id-{id:06}")));
    }
    Ok(())
}

async fn reads_keep_to_their_budget(f: Fixture) -> TestResult {
    let tp = TopicPartition::new("t", 0);
    let log = f.open().await?;
    log.create_partition(&tp).await?;
    // One record per append: the embedded engine never splits a batch.
    for i in 0..50 {
        log.append(&tp, vec![rec(i, 500)]).await?;
    }
    let got = log
        .read(
            &tp,
            5,
            ReadBudget {
                max_bytes: 1 << 20,
                max_records: 7,
            },
        )
        .await?;
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (5..12).collect::<Vec<_>>()
    );
    // A budget smaller than one record still returns that record.
    let got = log
        .read(
            &tp,
            10,
            ReadBudget {
                max_bytes: 1,
                max_records: 100,
            },
        )
        .await?;
    assert_eq!(got.first().map(|r| r.offset), Some(10));
    let got = log
        .read(
            &tp,
            0,
            ReadBudget {
                max_bytes: 5000,
                max_records: 100,
            },
        )
        .await?;
    assert!(
        !got.is_empty() && got.len() < 50,
        "a byte budget cuts the read short: {} records",
        got.len()
    );
    Ok(())
}

async fn truncation_moves_the_start_and_keeps_the_rest(f: Fixture) -> TestResult {
    let tp = TopicPartition::new("t", 0);
    let log = f.open().await?;
    log.create_partition(&tp).await?;
    for i in 0..100 {
        log.append(&tp, vec![rec(i, 300)]).await?;
    }
    let before = log.offsets(&tp)?;
    let start = log.truncate_before(&tp, 60).await?;
    assert!(start <= 60, "never past what was asked: {start}");
    if let Fixture::Postgres(_) = &f {
        // Rows go one by one, not by segment.
        assert_eq!(start, 60);
    }
    let after = log.offsets(&tp)?;
    assert_eq!(after.log_start, start);
    assert_eq!(after.high_water_mark, 100);
    if start > 0 {
        assert!(
            after.size_bytes < before.size_bytes,
            "{after:?} vs {before:?}"
        );
        let err = log
            .read(&tp, start - 1, ReadBudget::default())
            .await
            .expect_err("below the start");
        assert!(matches!(err, Error::OffsetOutOfRange { .. }), "{err}");
    }
    // Asking for more than the log holds stops at the high-water mark.
    assert!(log.truncate_before(&tp, 1000).await? <= 100);
    log.close().await;
    let log = f.open().await?;
    let offsets = log.offsets(&tp)?;
    let kept = read_all(&log, &tp).await?;
    assert_eq!(
        kept.first().map(|r| r.offset),
        (offsets.log_start < 100).then_some(offsets.log_start)
    );
    assert_eq!(offsets.high_water_mark, 100);
    assert_eq!(log.append(&tp, vec![rec(100, 1)]).await?.base_offset, 100);
    Ok(())
}

async fn a_deleted_partition_is_gone_for_good_and_its_name_starts_afresh(f: Fixture) -> TestResult {
    let gone = TopicPartition::new("old", 0);
    let kept = TopicPartition::new("old", 1);
    let log = f.open().await?;
    log.create_partition(&gone).await?;
    log.create_partition(&kept).await?;
    for chunk in 0..20u64 {
        let records: Vec<_> = (0..5).map(|j| rec(chunk * 5 + j, 200)).collect();
        log.append(&gone, records.clone()).await?;
        log.append(&kept, records).await?;
    }
    log.delete_partition(&gone).await?;
    assert_eq!(log.partitions(), vec![kept.clone()]);
    for e in [
        log.read(&gone, 0, ReadBudget::default()).await.err(),
        log.append(&gone, vec![rec(1, 1)]).await.err(),
        log.delete_partition(&gone).await.err(),
    ] {
        assert!(matches!(e, Some(Error::UnknownPartition(_))), "{e:?}");
    }
    if let Fixture::Embedded(dir) = &f {
        assert!(!dir.path().join("old/0").exists(), "its folder is deleted");
    }
    // Its neighbour keeps everything, and the log writes on.
    assert_eq!(read_all(&log, &kept).await?.len(), 100);
    assert_eq!(
        log.append(&kept, vec![rec(100, 10)]).await?.base_offset,
        100
    );
    log.close().await;

    let log = f.open().await?;
    assert_eq!(log.partitions(), vec![kept.clone()], "gone after a reopen");
    assert_eq!(read_all(&log, &kept).await?.len(), 101);
    log.create_partition(&gone).await?;
    let offsets = log.offsets(&gone)?;
    assert_eq!(
        (offsets.log_start, offsets.high_water_mark),
        (0, 0),
        "a new one"
    );
    assert_eq!(log.append(&gone, vec![rec(7, 10)]).await?.base_offset, 0);
    log.delete_partition(&gone).await?;
    log.delete_partition(&kept).await?;
    assert!(log.partitions().is_empty());
    if let Fixture::Embedded(dir) = &f {
        assert!(
            !dir.path().join("old").exists(),
            "the empty topic folder goes too"
        );
    }
    Ok(())
}
