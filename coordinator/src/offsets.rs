//! Committed offsets per (group, topic, partition), kept in the internal
//! `__consumer_offsets` state log.
//!
//! Commits update memory at once (so a partition handed to another member
//! starts right after what was acknowledged) and reach the log through one
//! committer task that coalesces them: many acks, one append, without a
//! sync of its own. `flush` waits until everything committed so far is
//! durable; sessions call it when they end cleanly and the coordinator calls
//! it on shutdown. A crash can lose only commits newer than the last sync,
//! which means redelivery (at least once), never loss.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use tandem_storage::Log;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::statelog::{StateLog, now_ms, upsert};

/// Names one partition's position for one group.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupPartition {
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) partition: u32,
}

impl GroupPartition {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.group.len() + self.topic.len());
        for s in [&self.group, &self.topic] {
            v.extend_from_slice(&(s.len() as u16).to_le_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        v.extend_from_slice(&self.partition.to_le_bytes());
        v
    }

    fn decode(mut b: &[u8]) -> Option<GroupPartition> {
        let mut take_str = || -> Option<String> {
            let len = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
            let s = String::from_utf8(b.get(2..2 + len)?.to_vec()).ok()?;
            b = &b[2 + len..];
            Some(s)
        };
        let group = take_str()?;
        let topic = take_str()?;
        let partition = u32::from_le_bytes(b.get(..4)?.try_into().ok()?);
        Some(GroupPartition {
            group,
            topic,
            partition,
        })
    }
}

#[derive(Default)]
struct Table {
    committed: HashMap<GroupPartition, u64>,
    /// When each offset was last committed (ms since the epoch).
    at: HashMap<GroupPartition, i64>,
    dirty: HashSet<GroupPartition>,
    /// Expired keys whose tombstones are not written yet.
    deleted: HashSet<GroupPartition>,
}

/// The committed-offsets store.
pub(crate) struct Offsets {
    table: Mutex<Table>,
    wake: Notify,
    flushes: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
}

impl Offsets {
    /// Loads committed offsets from `internal` and starts the committer.
    pub(crate) async fn open<L: Log>(internal: L) -> Result<std::sync::Arc<Offsets>> {
        let (state, records) = StateLog::open(internal, "__consumer_offsets", 50_000).await?;
        let mut table = Table::default();
        for r in records {
            let Some(key) = r.record.key.as_deref().and_then(GroupPartition::decode) else {
                continue;
            };
            match r.record.value.get(..8).and_then(|b| b.try_into().ok()) {
                Some(b) => {
                    table.at.insert(key.clone(), r.record.timestamp_ms);
                    table.committed.insert(key, u64::from_le_bytes(b));
                }
                None => {
                    table.at.remove(&key);
                    table.committed.remove(&key);
                }
            }
        }
        let (flushes, rx) = mpsc::channel(1024);
        let offsets = std::sync::Arc::new(Offsets {
            table: Mutex::new(table),
            wake: Notify::new(),
            flushes,
            committer: Mutex::new(None),
        });
        let task = tokio::spawn(offsets.clone().run(state, rx));
        *offsets
            .committer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(offsets)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The committed offset, if the group has one for the partition.
    pub(crate) fn get(&self, key: &GroupPartition) -> Option<u64> {
        self.table().committed.get(key).copied()
    }

    /// Commits `offset` (the next offset the group wants) if it moves forward.
    pub(crate) fn commit(&self, key: &GroupPartition, offset: u64) {
        self.set(key, offset, false);
    }

    /// Sets the committed offset to `offset` even if that moves it back
    /// (the log is shorter than the old mark, see the consumer's grant; or
    /// an operator resets the group).
    pub(crate) fn reset(&self, key: &GroupPartition, offset: u64) {
        self.set(key, offset, true);
    }

    fn set(&self, key: &GroupPartition, offset: u64, backwards: bool) {
        let now = now_ms();
        let mut t = self.table();
        // Every ack comes here: a key already known is updated in place,
        // not cloned again.
        match t.committed.get_mut(key) {
            Some(c) if !backwards && *c >= offset => return,
            Some(c) => *c = offset,
            None => {
                t.committed.insert(key.clone(), offset);
            }
        }
        match t.at.get_mut(key) {
            Some(at) => *at = now,
            None => {
                t.at.insert(key.clone(), now);
            }
        }
        if !t.deleted.is_empty() {
            t.deleted.remove(key);
        }
        if !t.dirty.contains(key) {
            t.dirty.insert(key.clone());
        }
        drop(t);
        self.wake.notify_one();
    }

    /// Forgets the offsets of every (group, topic) that committed nothing
    /// since `before_ms` and was not in use since then (`live(group,
    /// topic)` false: no member seen since `before_ms`), as
    /// Kafka expires the offsets of empty groups: group names are chosen by
    /// clients, and what nobody uses any more must not be kept for ever.
    /// Returns how many partition offsets were forgotten. A group that
    /// comes back starts where a new group starts.
    pub(crate) fn expire(&self, before_ms: i64, live: impl Fn(&str, &str) -> bool) -> usize {
        let mut t = self.table();
        let mut newest: HashMap<(String, String), i64> = HashMap::new();
        for (k, at) in &t.at {
            let e = newest
                .entry((k.group.clone(), k.topic.clone()))
                .or_insert(i64::MIN);
            *e = (*e).max(*at);
        }
        let stale: Vec<GroupPartition> = t
            .committed
            .keys()
            .filter(|k| {
                let key = (k.group.clone(), k.topic.clone());
                newest.get(&key).copied().unwrap_or(i64::MIN) < before_ms
                    && !live(&k.group, &k.topic)
            })
            .cloned()
            .collect();
        for k in &stale {
            t.committed.remove(k);
            t.at.remove(k);
            t.dirty.remove(k);
            t.deleted.insert(k.clone());
        }
        drop(t);
        if !stale.is_empty() {
            self.wake.notify_one();
        }
        stale.len()
    }

    /// Forgets every group's offsets on `topic` (deleted); durable at the
    /// next [`Offsets::flush`].
    pub(crate) fn forget_topic(&self, topic: &str) {
        let mut t = self.table();
        let gone: Vec<GroupPartition> = t
            .committed
            .keys()
            .filter(|k| k.topic == topic)
            .cloned()
            .collect();
        for k in gone {
            t.committed.remove(&k);
            t.at.remove(&k);
            t.dirty.remove(&k);
            t.deleted.insert(k);
        }
        drop(t);
        self.wake.notify_one();
    }

    /// Topics some group has committed offsets on.
    pub(crate) fn topics(&self) -> std::collections::BTreeSet<String> {
        self.table()
            .committed
            .keys()
            .map(|k| k.topic.clone())
            .collect()
    }

    /// Every committed offset in one pass: (topic, group) → partition →
    /// offset (a metrics scrape reads them all at once).
    pub(crate) fn all(&self) -> BTreeMap<(String, String), BTreeMap<u32, u64>> {
        let mut out: BTreeMap<(String, String), BTreeMap<u32, u64>> = BTreeMap::new();
        for (k, v) in &self.table().committed {
            out.entry((k.topic.clone(), k.group.clone()))
                .or_default()
                .insert(k.partition, *v);
        }
        out
    }

    /// Committed offsets of every group on `topic`: group → partition → offset.
    pub(crate) fn for_topic(&self, topic: &str) -> BTreeMap<String, BTreeMap<u32, u64>> {
        let mut out: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
        for (k, v) in &self.table().committed {
            if k.topic == topic {
                out.entry(k.group.clone())
                    .or_default()
                    .insert(k.partition, *v);
            }
        }
        out
    }

    /// Waits until every commit made before the call is durable.
    pub(crate) async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flushes
            .send(tx)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        self.wake.notify_one();
        rx.await.map_err(|_| Error::ShuttingDown)?.map_err(|e| {
            Error::Storage(tandem_storage::Error::Poisoned {
                tp: tandem_storage::TopicPartition::new("__consumer_offsets", 0),
                cause: e,
            })
        })
    }

    /// Flushes and stops the committer.
    pub(crate) async fn close(&self) {
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "final offset flush failed");
        }
        let task = self
            .committer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    async fn run<L: Log>(
        self: std::sync::Arc<Self>,
        state: StateLog<L>,
        mut flushes: mpsc::Receiver<oneshot::Sender<Result<(), String>>>,
    ) {
        let mut waiting = Vec::new();
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                f = flushes.recv() => match f {
                    Some(f) => waiting.push(f),
                    None => return,
                },
            }
            while let Ok(f) = flushes.try_recv() {
                waiting.push(f);
            }
            let records: Vec<_> = {
                let mut t = self.table();
                let dirty: Vec<_> = t.dirty.drain().collect();
                let deleted: Vec<_> = t.deleted.drain().collect();
                let mut records: Vec<_> = dirty
                    .into_iter()
                    .filter_map(|k| {
                        let v = *t.committed.get(&k)?;
                        Some(upsert(k.encode(), v.to_le_bytes().to_vec()))
                    })
                    .collect();
                records.extend(deleted.into_iter().map(|k| upsert(k.encode(), Vec::new())));
                records
            };
            // Commits may be lost in a crash (they are redelivered), so they
            // sync only when someone waits for them.
            let mut result = state
                .append_relaxed(records)
                .await
                .map(drop)
                .map_err(|e| e.to_string());
            if result.is_ok() && !waiting.is_empty() {
                result = state.sync().await.map_err(|e| e.to_string());
            }
            if result.is_ok() && state.wants_compaction(self.table().committed.len()) {
                let live = self
                    .table()
                    .committed
                    .iter()
                    .map(|(k, v)| upsert(k.encode(), v.to_le_bytes().to_vec()))
                    .collect();
                result = state.compact(live).await.map_err(|e| e.to_string());
            }
            if let Err(e) = &result {
                tracing::error!(error = %e, "committing offsets failed");
            }
            for f in waiting.drain(..) {
                let _ = f.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_storage::{EmbeddedLog, LogConfig};

    use super::*;

    fn gp(group: &str, p: u32) -> GroupPartition {
        GroupPartition {
            group: group.into(),
            topic: "orders".into(),
            partition: p,
        }
    }

    #[tokio::test]
    async fn commits_only_move_forward_and_survive_reopen() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
        let offsets = Offsets::open(log.clone()).await?;
        offsets.commit(&gp("a", 0), 10);
        offsets.commit(&gp("a", 0), 7);
        offsets.commit(&gp("a/b", 3), 5);
        offsets.commit(&gp("shrunk", 0), 100);
        offsets.reset(&gp("shrunk", 0), 95);
        offsets.commit(&gp("shrunk", 0), 96);
        offsets.flush().await?;
        assert_eq!(offsets.get(&gp("a", 0)), Some(10));
        offsets.close().await;
        log.close().await;

        let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
        let offsets = Offsets::open(log.clone()).await?;
        assert_eq!(offsets.get(&gp("a", 0)), Some(10));
        assert_eq!(offsets.get(&gp("a/b", 3)), Some(5));
        assert_eq!(offsets.get(&gp("c", 0)), None);
        assert_eq!(
            offsets.get(&gp("shrunk", 0)),
            Some(96),
            "after a reset, commits count from the new mark"
        );
        let by_group = offsets.for_topic("orders");
        assert_eq!(by_group.len(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn offsets_of_groups_nobody_uses_expire_durably() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
        let offsets = Offsets::open(log.clone()).await?;
        offsets.commit(&gp("gone", 0), 10);
        offsets.commit(&gp("gone", 1), 4);
        offsets.commit(&gp("alive", 0), 3);
        offsets.commit(&gp("recent", 0), 3);
        let past = now_ms() - 1;
        assert_eq!(
            offsets.expire(past, |_, _| false),
            0,
            "all committed just now"
        );
        let future = now_ms() + 60_000;
        // "recent" commits again after the cut-off is taken: kept
        let n = offsets.expire(future, |g, _| g == "alive" || g == "recent");
        assert_eq!(n, 2, "both partitions of the unused group");
        assert_eq!(offsets.get(&gp("gone", 0)), None);
        assert_eq!(offsets.get(&gp("alive", 0)), Some(3));
        offsets.flush().await?;
        offsets.close().await;
        log.close().await;

        let log = EmbeddedLog::open(dir.path(), LogConfig::default()).await?;
        let offsets = Offsets::open(log.clone()).await?;
        assert_eq!(
            offsets.get(&gp("gone", 0)),
            None,
            "the expiry survives a restart"
        );
        assert_eq!(offsets.get(&gp("gone", 1)), None);
        assert_eq!(offsets.get(&gp("alive", 0)), Some(3));
        assert_eq!(offsets.get(&gp("recent", 0)), Some(3));
        Ok(())
    }

    #[test]
    fn keys_round_trip() {
        let k = gp("group with spaces/and slashes", 42);
        assert_eq!(GroupPartition::decode(&k.encode()), Some(k));
        assert_eq!(GroupPartition::decode(&[5, 0, b'a']), None);
    }
}
