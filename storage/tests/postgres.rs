//! What only the PostgreSQL backend has: leases and the fencing of writes
//! by their epoch.

mod common;

use std::time::Duration;

use bytes::Bytes;
use tandem_storage::{Error, Log, LogConfig, PgStore, ReadBudget, Record, TopicPartition};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn rec(v: &str) -> Record {
    Record {
        id: Bytes::from(v.to_owned()),
        key: None,
        value: Bytes::from(v.to_owned()),
        headers: Vec::new(),
        timestamp_ms: 1,
    }
}

async fn store() -> Result<Option<PgStore>, Box<dyn std::error::Error>> {
    Ok(match common::fresh_database().await? {
        Some(url) => Some(PgStore::connect(&url, Duration::from_secs(10)).await?),
        None => None,
    })
}

#[tokio::test]
async fn a_lease_has_one_holder_until_it_expires_or_is_released() -> TestResult {
    let Some(store) = store().await? else {
        return Ok(());
    };
    let ttl = Duration::from_secs(30);
    let a = store
        .acquire("p", "a", "10.0.0.1:7000", ttl)
        .await?
        .ok_or("a free lease is taken")?;
    assert!(
        store
            .acquire("p", "b", "10.0.0.2:7000", ttl)
            .await?
            .is_none()
    );
    let holder = store.holder("p").await?.ok_or("a holder")?;
    assert_eq!(
        (holder.owner.as_str(), holder.address.as_str()),
        ("a", "10.0.0.1:7000")
    );
    assert_eq!(holder.epoch, a.epoch);
    assert!(holder.expires_in > 20_000, "{holder:?}");
    assert!(store.renew(&a, ttl).await?);

    // A short lease not renewed expires; another replica takes it with the
    // next epoch, and the old holder can no longer renew it.
    let a = store
        .acquire("p", "a", "10.0.0.1:7000", Duration::from_millis(200))
        .await?
        .ok_or("its holder takes it again")?;
    assert!(
        store
            .acquire("p", "b", "10.0.0.2:7000", ttl)
            .await?
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = store
        .acquire("p", "b", "10.0.0.2:7000", ttl)
        .await?
        .ok_or("an expired lease is taken")?;
    assert_eq!(b.epoch, a.epoch + 1);
    assert!(!store.renew(&a, ttl).await?);

    // Released, it goes at once.
    store.release(&b).await?;
    let a2 = store
        .acquire("p", "a", "10.0.0.1:7000", ttl)
        .await?
        .ok_or("a released lease is taken")?;
    assert_eq!(a2.epoch, b.epoch + 1);
    Ok(())
}

#[tokio::test]
async fn writes_under_a_lease_taken_over_are_refused_and_leave_no_row() -> TestResult {
    let Some(store) = store().await? else {
        return Ok(());
    };
    let tp = TopicPartition::new("t", 0);
    let old = store
        .acquire("p", "a", "a:1", Duration::from_millis(300))
        .await?
        .ok_or("free")?;
    let stale = store.open("topics", &old, LogConfig::default()).await?;
    stale.create_partition(&tp).await?;
    stale.append(&tp, vec![rec("a0"), rec("a1")]).await?;

    // The holder is paused past its lease; another replica takes over and
    // writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = store
        .acquire("p", "b", "b:1", Duration::from_secs(30))
        .await?
        .ok_or("expired")?;
    let fresh = store.open("topics", &new, LogConfig::default()).await?;
    assert_eq!(fresh.offsets(&tp)?.high_water_mark, 2);
    fresh.append(&tp, vec![rec("b2")]).await?;

    // The old holder wakes up and tries: refused, and its log says so.
    let failed = stale.failed();
    let err = stale
        .append(&tp, vec![rec("a2")])
        .await
        .expect_err("a fenced write");
    assert!(
        err.to_string().contains("no longer held with epoch"),
        "{err}"
    );
    assert!(
        failed
            .borrow()
            .as_deref()
            .is_some_and(|c| c.contains("write refused")),
        "{:?}",
        *failed.borrow()
    );
    let err = stale
        .truncate_before(&tp, 1)
        .await
        .expect_err("a failed log refuses writes");
    assert!(matches!(err, Error::Poisoned { .. }), "{err}");
    let err = stale
        .create_partition(&TopicPartition::new("t", 1))
        .await
        .expect_err("a failed log refuses writes");
    assert!(matches!(err, Error::Poisoned { .. }), "{err}");

    // What the new holder reads is exactly its own history.
    let got = fresh.read(&tp, 0, ReadBudget::default()).await?;
    let values: Vec<_> = got.iter().map(|r| r.record.value.clone()).collect();
    assert_eq!(
        values,
        vec![Bytes::from("a0"), Bytes::from("a1"), Bytes::from("b2")]
    );
    assert_eq!(fresh.partitions(), vec![tp.clone()]);
    let reopened = store.open("topics", &new, LogConfig::default()).await?;
    assert_eq!(reopened.offsets(&tp)?.high_water_mark, 3);
    Ok(())
}

#[tokio::test]
async fn a_fenced_writer_racing_the_takeover_never_interleaves() -> TestResult {
    let Some(store) = store().await? else {
        return Ok(());
    };
    let tp = TopicPartition::new("t", 0);
    let old = store
        .acquire("p", "a", "a:1", Duration::from_millis(300))
        .await?
        .ok_or("free")?;
    let a = store.open("topics", &old, LogConfig::default()).await?;
    a.create_partition(&tp).await?;
    // The old holder appends without pause while the lease expires and
    // another replica takes over and appends too.
    let writer = {
        let (a, tp) = (a.clone(), tp.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10_000u32 {
                match a.append(&tp, vec![rec(&format!("a{i}"))]).await {
                    Ok(ack) => acked.push((ack.base_offset, format!("a{i}"))),
                    Err(_) => break,
                }
            }
            acked
        })
    };
    let new = loop {
        if let Some(l) = store
            .acquire("p", "b", "b:1", Duration::from_secs(30))
            .await?
        {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let b = store.open("topics", &new, LogConfig::default()).await?;
    let mut b_acked = Vec::new();
    for i in 0..20 {
        let ack = b.append(&tp, vec![rec(&format!("b{i}"))]).await?;
        b_acked.push((ack.base_offset, format!("b{i}")));
    }
    let a_acked = tokio::time::timeout(Duration::from_secs(20), writer).await??;
    assert!(a.failed().borrow().is_some(), "the old holder was fenced");
    // Every acknowledged append is where its acknowledgement said, and
    // nothing else is there.
    let mut expected: Vec<_> = a_acked.into_iter().chain(b_acked).collect();
    expected.sort();
    let mut got = Vec::new();
    let mut from = 0;
    loop {
        let batch = b.read(&tp, from, ReadBudget::default()).await?;
        let Some(last) = batch.last() else { break };
        from = last.offset + 1;
        got.extend(batch.into_iter().map(|r| {
            (
                r.offset,
                String::from_utf8_lossy(&r.record.value).into_owned(),
            )
        }));
    }
    assert_eq!(got, expected);
    Ok(())
}

#[tokio::test]
async fn every_kind_of_write_is_fenced() -> TestResult {
    let Some(store) = store().await? else {
        return Ok(());
    };
    let tp = TopicPartition::new("t", 0);
    let old = store
        .acquire("p", "a", "a:1", Duration::from_millis(200))
        .await?
        .ok_or("free")?;
    let setup = store.open("topics", &old, LogConfig::default()).await?;
    setup.create_partition(&tp).await?;
    setup.append(&tp, vec![rec("a0"), rec("a1")]).await?;
    // Three handles of the old holder, none of which failed yet.
    let (for_append, for_truncate, for_create) = (
        store.open("topics", &old, LogConfig::default()).await?,
        store.open("topics", &old, LogConfig::default()).await?,
        store.open("topics", &old, LogConfig::default()).await?,
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let new = store
        .acquire("p", "b", "b:1", Duration::from_secs(30))
        .await?
        .ok_or("expired")?;
    let refused = |r: Result<(), Error>| match r {
        Err(e) if e.to_string().contains("write refused") => Ok(()),
        other => Err(format!("not refused by the fence: {other:?}")),
    };
    refused(for_append.append(&tp, vec![rec("x")]).await.map(|_| ()))?;
    refused(for_truncate.truncate_before(&tp, 1).await.map(|_| ()))?;
    refused(
        for_create
            .create_partition(&TopicPartition::new("t", 1))
            .await,
    )?;
    // Nothing changed.
    let fresh = store.open("topics", &new, LogConfig::default()).await?;
    assert_eq!(fresh.partitions(), vec![tp.clone()]);
    let o = fresh.offsets(&tp)?;
    assert_eq!((o.log_start, o.high_water_mark), (0, 2));
    Ok(())
}

#[tokio::test]
async fn a_takeover_waits_for_a_write_in_flight_and_renewals_do_not() -> TestResult {
    let Some(store) = store().await? else {
        return Ok(());
    };
    let lease = store
        .acquire("p", "a", "a:1", Duration::from_secs(30))
        .await?
        .ok_or("free")?;
    // A write transaction of the holder, open and fenced (as the writer
    // holds it between its statements).
    let mut tx = store.pool().begin().await?;
    sqlx::query("SELECT epoch FROM tandem_lease WHERE name = 'p' FOR KEY SHARE")
        .execute(&mut *tx)
        .await?;
    // The holder renews meanwhile, at once.
    let renewed = tokio::time::timeout(
        Duration::from_secs(2),
        store.renew(&lease, Duration::from_millis(100)),
    )
    .await??;
    assert!(renewed);
    // The lease expires; a takeover must wait for the write to end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let takeover = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .acquire("p", "b", "b:1", Duration::from_secs(30))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover waits for the write in flight"
    );
    tx.commit().await?;
    let taken = tokio::time::timeout(Duration::from_secs(5), takeover).await???;
    assert_eq!(taken.map(|l| l.epoch), Some(lease.epoch + 1));
    Ok(())
}

/// Transaction ids claimed by shards: the first claim wins, a claim of the
/// same shard is renewed, concurrent claims of one id agree, and a claim is
/// forgotten only once old enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_claimed_by_one_shard() -> TestResult {
    let Some(store) = store().await? else {
        return Ok(());
    };
    let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(store.claim_ids(&ids(&["a", "b"]), 1).await?, [1, 1]);
    assert_eq!(store.claim_ids(&ids(&["b", "c"]), 2).await?, [1, 2]);
    assert_eq!(store.claimed_by("c").await?, Some(2));
    assert_eq!(store.claimed_by("d").await?, None);
    // Too young to forget; then forgotten, only by its own shard.
    let hour = Duration::from_secs(3600);
    assert_eq!(store.drop_claims(1, &ids(&["a"]), hour).await?, 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.old_claims(1, Duration::ZERO, 10).await?,
        ids(&["a", "b"])
    );
    assert_eq!(store.drop_claims(2, &ids(&["a"]), Duration::ZERO).await?, 0);
    assert_eq!(store.drop_claims(1, &ids(&["a"]), Duration::ZERO).await?, 1);
    assert_eq!(store.claimed_by("a").await?, None);
    // A claim renewed by its shard is young again (older than 800 ms
    // without the renewal).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(store.claim_ids(&ids(&["b"]), 1).await?, [1]);
    assert_eq!(
        store
            .drop_claims(1, &ids(&["b"]), Duration::from_millis(800))
            .await?,
        0
    );
    // Eight shards racing for the same fresh ids: each id has one holder,
    // and every racer is told the same one.
    let racers: Vec<_> = (0..8u32)
        .map(|shard| {
            let store = store.clone();
            tokio::spawn(async move {
                let wanted: Vec<String> = (0..50).map(|i| format!("race-{i}")).collect();
                store.claim_ids(&wanted, shard).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for r in racers {
        answers.push(r.await??);
    }
    for i in 0..50 {
        let holder = store.claimed_by(&format!("race-{i}")).await?;
        for a in &answers {
            assert_eq!(Some(a[i]), holder, "race-{i}");
        }
    }
    Ok(())
}
