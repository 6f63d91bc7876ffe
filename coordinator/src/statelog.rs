//! Internal state logs (`__topics`, `__consumer_offsets`, ...): the
//! coordinator's own state kept the way Kafka keeps `__consumer_offsets`.
//!
//! Every record is an upsert of one key (the record key) to a full value, or
//! a tombstone (empty value), so replaying the log from its start in order
//! rebuilds the state exactly. Compaction appends the live state as a
//! snapshot and then drops whole segments below it; on start-up the state is
//! that snapshot plus the tail after it. Whoever compacts must make sure no
//! upsert of a key slips between that key's snapshot being taken and being
//! appended (one task owns the offsets log; transactions lock the key).

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use tandem_storage::{
    AppendAck, Error as StorageError, Log, ReadBudget, Record, StoredRecord, TopicPartition,
};

use crate::error::Result;

/// One internal state log.
#[derive(Debug)]
pub(crate) struct StateLog<L> {
    log: L,
    tp: TopicPartition,
    since_compaction: AtomicU64,
    compact_every: u64,
}

/// An upsert record of `key` to `value` (a tombstone when `value` is empty).
pub(crate) fn upsert(key: Vec<u8>, value: Vec<u8>) -> Record {
    Record {
        id: Bytes::new(),
        key: Some(Bytes::from(key)),
        value: Bytes::from(value),
        headers: Vec::new(),
        timestamp_ms: now_ms(),
    }
}

/// Most bytes (keys and values) one append of a state log carries: well
/// under the log's largest batch.
const CHUNK_BYTES: usize = 8 << 20;

/// `records` cut into appends of at most 1 000 records and about
/// [`CHUNK_BYTES`] each.
pub(crate) fn chunks(records: Vec<Record>) -> Vec<Vec<Record>> {
    let mut out = Vec::new();
    let (mut chunk, mut bytes) = (Vec::new(), 0);
    for r in records {
        let size = r.value.len() + r.key.as_ref().map_or(0, |k| k.len());
        if !chunk.is_empty() && (chunk.len() == 1000 || bytes + size > CHUNK_BYTES) {
            out.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(r);
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
    out
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl<L: Log> StateLog<L> {
    /// Opens (creating if needed) the state log `name` and returns it with
    /// every record it holds, oldest first.
    pub(crate) async fn open(
        log: L,
        name: &str,
        compact_every: u64,
    ) -> Result<(Self, Vec<StoredRecord>)> {
        let mut records = Vec::new();
        let s = Self::open_each(log, name, compact_every, |r| records.push(r)).await?;
        Ok((s, records))
    }

    /// Opens (creating if needed) the state log `name`, handing every
    /// record it holds to `each`, oldest first, as they are read (a log of
    /// a million records is not held twice).
    pub(crate) async fn open_each(
        log: L,
        name: &str,
        compact_every: u64,
        mut each: impl FnMut(StoredRecord),
    ) -> Result<Self> {
        let tp = TopicPartition::new(name, 0);
        match log.create_partition(&tp).await {
            Ok(()) | Err(StorageError::PartitionExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let mut count = 0;
        let from = log.offsets(&tp)?.log_start;
        let mut batch = log.read(&tp, from, ReadBudget::default()).await?;
        while let Some(last) = batch.last() {
            count += batch.len() as u64;
            // The next read starts (its first poll) before this batch is
            // handed over, so reading and `each` overlap.
            let mut next = std::pin::pin!(log.read(&tp, last.offset + 1, ReadBudget::default()));
            let early = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
            batch.into_iter().for_each(&mut each);
            batch = match early {
                Poll::Ready(read) => read?,
                Poll::Pending => next.await?,
            };
        }
        Ok(StateLog {
            log,
            tp,
            since_compaction: AtomicU64::new(count),
            compact_every,
        })
    }

    /// Appends upserts durably; concurrent appends are group-committed.
    pub(crate) async fn append(&self, records: Vec<Record>) -> Result<Option<AppendAck>> {
        self.put(records, false).await
    }

    /// Appends upserts that a crash may lose: acknowledged once written,
    /// durable with the next sync of this log.
    pub(crate) async fn append_relaxed(&self, records: Vec<Record>) -> Result<Option<AppendAck>> {
        self.put(records, true).await
    }

    async fn put(&self, records: Vec<Record>, relaxed: bool) -> Result<Option<AppendAck>> {
        if records.is_empty() {
            return Ok(None);
        }
        let n = records.len() as u64;
        let ack = if relaxed {
            self.log.append_relaxed(&self.tp, records).await?
        } else {
            self.log.append(&self.tp, records).await?
        };
        self.since_compaction.fetch_add(n, Ordering::Relaxed);
        Ok(Some(ack))
    }

    /// Makes everything appended so far durable.
    pub(crate) async fn sync(&self) -> Result<()> {
        Ok(self.log.sync(&self.tp).await?)
    }

    /// The next offset to be written.
    pub(crate) fn high_water_mark(&self) -> Result<u64> {
        Ok(self.log.offsets(&self.tp)?.high_water_mark)
    }

    /// The first offset still held.
    #[cfg(test)]
    pub(crate) fn log_start(&self) -> Result<u64> {
        Ok(self.log.offsets(&self.tp)?.log_start)
    }

    /// True once enough has been appended since the last compaction: at
    /// least `compact_every` records and twice the `live` state's, so that
    /// a large state is rewritten only after twice its size in new records
    /// (each append pays for a bounded share of the rewrites).
    pub(crate) fn wants_compaction(&self, live: usize) -> bool {
        self.since_compaction.load(Ordering::Relaxed) >= self.compact_every.max(2 * live as u64)
    }

    /// Records appended since the last compaction (its snapshot included).
    pub(crate) fn appended_since_compaction(&self) -> u64 {
        self.since_compaction.load(Ordering::Relaxed)
    }

    /// Appends `live` (the whole current state as upserts) and drops what
    /// lies wholly before it.
    pub(crate) async fn compact(&self, live: Vec<Record>) -> Result<()> {
        let start = self.high_water_mark()?;
        let n = live.len() as u64;
        for chunk in chunks(live) {
            self.log.append(&self.tp, chunk).await?;
        }
        self.truncate_before(start).await?;
        self.since_compaction.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// Drops whole segments below `offset` (everything before it must be
    /// superseded by later upserts).
    pub(crate) async fn truncate_before(&self, offset: u64) -> Result<u64> {
        Ok(self.log.truncate_before(&self.tp, offset).await?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tandem_storage::{EmbeddedLog, LogConfig};

    use super::*;

    fn replay(records: &[StoredRecord]) -> BTreeMap<Bytes, Bytes> {
        let mut m = BTreeMap::new();
        for r in records {
            let key = r.record.key.clone().unwrap_or_default();
            if r.record.value.is_empty() {
                m.remove(&key);
            } else {
                m.insert(key, r.record.value.clone());
            }
        }
        m
    }

    #[tokio::test]
    async fn compaction_keeps_the_state_and_drops_old_segments()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let cfg = LogConfig {
            segment_bytes: 4096,
            ..LogConfig::default()
        };
        let log = EmbeddedLog::open(dir.path(), cfg.clone()).await?;
        let (s, old) = StateLog::open(log.clone(), "__state", 100).await?;
        assert!(old.is_empty());
        let mut expected = BTreeMap::new();
        for i in 0..300u32 {
            let key = format!("k{}", i % 10).into_bytes();
            let value = if i % 7 == 0 {
                Vec::new()
            } else {
                i.to_le_bytes().to_vec()
            };
            if value.is_empty() {
                expected.remove(&Bytes::from(key.clone()));
            } else {
                expected.insert(Bytes::from(key.clone()), Bytes::from(value.clone()));
            }
            s.append(vec![upsert(key, value)]).await?;
        }
        assert!(s.wants_compaction(10));
        assert!(
            !s.wants_compaction(1000),
            "a state of 1000 keys waits for 2000 records"
        );
        let live = expected
            .iter()
            .map(|(k, v)| upsert(k.to_vec(), v.to_vec()))
            .collect();
        s.compact(live).await?;
        assert!(!s.wants_compaction(10));
        s.append(vec![upsert(b"k1".to_vec(), Vec::new())]).await?;
        expected.remove(&Bytes::from_static(b"k1"));
        log.close().await;

        let log = EmbeddedLog::open(dir.path(), cfg).await?;
        let (_, records) = StateLog::open(log.clone(), "__state", 100).await?;
        assert!(
            records.len() < 300,
            "old segments are gone: {} records",
            records.len()
        );
        assert_eq!(replay(&records), expected);
        Ok(())
    }
}
