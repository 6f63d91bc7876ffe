//! What operators ask of a broker: records read without a consumer group,
//! a message found by its id, and a group's committed offsets moved while
//! it has no members. Nothing here acknowledges, delivers or decides
//! anything.

use tandem_proto::coordinator as pb;
use tandem_storage::{
    Error as StorageError, Log, Offsets as LogOffsets, ReadBudget, StoredRecord, TopicPartition,
};

use crate::broker::Broker;
use crate::consumer::to_message;
use crate::error::{Error, Result};
use crate::offsets::GroupPartition;

/// Most records one `ReadMessages` answers with.
pub(crate) const MAX_READ: u32 = 1000;
/// Records one `ReadMessages` answers with when it names no limit.
pub(crate) const DEFAULT_READ: u32 = 100;
/// Most record bytes one `ReadMessages` answers with (at least one record
/// is always returned, whatever its size).
const READ_BYTES: usize = 4 << 20;

/// Most records one search (by time, or by id past what the transactions
/// and the dedup window remember) reads before it gives up.
pub(crate) const MAX_SCAN: u64 = 5_000_000;

fn scan_limit(what: String) -> Error {
    Error::ScanLimit(format!(
        "{what}: read {MAX_SCAN} records without finding it; name a partition and an offset instead"
    ))
}

/// Where `ResetOffsets` moves a group.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ResetTo {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
}

fn stored(r: StoredRecord, partition: u32) -> pb::StoredMessage {
    pb::StoredMessage {
        partition,
        offset: r.offset,
        timestamp_ms: r.record.timestamp_ms,
        message: Some(to_message(r.record)),
    }
}

impl<L: Log + Clone> Broker<L> {
    /// Partition `partition` of `topic`; NOT_FOUND or INVALID_ARGUMENT
    /// (naming `field`) when either does not exist.
    fn partition_of(&self, field: &str, topic: &str, partition: u32) -> Result<TopicPartition> {
        let meta = self.topics.require(topic)?;
        if partition >= meta.partitions {
            return Err(Error::invalid(
                field,
                format!(
                    "partition {partition} does not exist: topic {topic:?} has {}",
                    meta.partitions
                ),
            ));
        }
        Ok(TopicPartition::new(topic, partition))
    }

    /// Up to `limit` records of `tp` from `from` (from the log start when
    /// `from` is before it), with the partition's offsets as they were.
    async fn read_from(
        &self,
        tp: &TopicPartition,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<StoredRecord>, LogOffsets)> {
        let budget = ReadBudget {
            max_bytes: READ_BYTES,
            max_records: limit,
        };
        loop {
            let o = self.data.offsets(tp)?;
            let start = from.max(o.log_start);
            if start >= o.high_water_mark {
                return Ok((Vec::new(), o));
            }
            match self.data.read(tp, start, budget).await {
                Ok(records) => return Ok((records, o)),
                // Retention removed the start meanwhile: from the new one.
                Err(StorageError::OffsetOutOfRange { start: now, .. }) if now > start => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The first offset of `tp` whose record is stamped `at_ms` or later;
    /// the high-water mark when none is. Records are stamped when appended
    /// (a transactional message at its commit), but requests appended
    /// concurrently may land a millisecond out of order, so the partition
    /// is read from its start rather than searched.
    async fn offset_at(&self, tp: &TopicPartition, at_ms: i64) -> Result<u64> {
        let mut next = 0;
        let mut read = 0u64;
        loop {
            if read >= MAX_SCAN {
                return Err(scan_limit(format!(
                    "a record of {tp} stamped {at_ms} or later"
                )));
            }
            let (batch, o) = self
                .read_from(tp, next, ReadBudget::default().max_records)
                .await?;
            let Some(last) = batch.last().map(|r| r.offset) else {
                return Ok(o.high_water_mark);
            };
            if let Some(r) = batch.iter().find(|r| r.record.timestamp_ms >= at_ms) {
                return Ok(r.offset);
            }
            read += batch.len() as u64;
            next = last + 1;
        }
    }

    /// Records of `topic`'s `partition` from an offset (`Ok`) or a time
    /// (`Err`), at most `limit`.
    pub(crate) async fn read_messages(
        &self,
        topic: &str,
        partition: u32,
        from: std::result::Result<u64, i64>,
        limit: u32,
    ) -> Result<pb::ReadMessagesResponse> {
        let tp = self.partition_of("partition", topic, partition)?;
        let from = match from {
            Ok(offset) => offset,
            Err(at_ms) => self.offset_at(&tp, at_ms).await?,
        };
        let (records, o) = self.read_from(&tp, from, limit as usize).await?;
        Ok(pb::ReadMessagesResponse {
            messages: records.into_iter().map(|r| stored(r, partition)).collect(),
            log_start: o.log_start,
            high_water_mark: o.high_water_mark,
        })
    }

    /// The record of `topic` whose id is `id`: where the transactions or
    /// the publish dedup window say it is, else the first found reading
    /// every partition from its start (at most [`MAX_SCAN`] records).
    pub(crate) async fn find_message(&self, topic: &str, id: &str) -> Result<pb::StoredMessage> {
        let meta = self.topics.require(topic)?;
        let mut hints = Vec::new();
        if self.txns.knows(id)
            && let Ok(t) = self.txns.get(id).await
            && t.topic == topic
            && let Some(p) = t.position
        {
            hints.push((p.partition, p.offset));
        }
        if let Some(p) = self.recent.position_of(topic, id) {
            hints.push((p.partition, p.offset));
        }
        for (partition, offset) in hints {
            let tp = TopicPartition::new(topic, partition);
            let (records, _) = self.read_from(&tp, offset, 1).await?;
            if let Some(r) = records.into_iter().next()
                && r.offset == offset
                && r.record.id == id.as_bytes()
            {
                return Ok(stored(r, partition));
            }
        }
        let mut read = 0u64;
        for partition in 0..meta.partitions {
            let tp = TopicPartition::new(topic, partition);
            let mut next = 0;
            loop {
                if read >= MAX_SCAN {
                    return Err(scan_limit(format!("message {id:?} in topic {topic:?}")));
                }
                let (batch, _) = self
                    .read_from(&tp, next, ReadBudget::default().max_records)
                    .await?;
                let Some(last) = batch.last().map(|r| r.offset) else {
                    break;
                };
                read += batch.len() as u64;
                if let Some(r) = batch.into_iter().find(|r| r.record.id == id.as_bytes()) {
                    return Ok(stored(r, partition));
                }
                next = last + 1;
            }
        }
        Err(Error::NotFound {
            what: "message",
            name: id.to_owned(),
        })
    }

    /// Moves `group`'s committed offsets on `topic` (every partition when
    /// `partitions` is empty) to `to` (with `only_back`, never forward),
    /// durably, while the group has no members there.
    pub(crate) async fn reset_offsets(
        &self,
        topic: &str,
        group: &str,
        partitions: &[u32],
        to: ResetTo,
        only_back: bool,
    ) -> Result<Vec<pb::OffsetMove>> {
        let meta = self.topics.require(topic)?;
        let mut chosen: Vec<u32> = if partitions.is_empty() {
            (0..meta.partitions).collect()
        } else {
            for (i, &p) in partitions.iter().enumerate() {
                self.partition_of(&format!("partitions[{i}]"), topic, p)?;
            }
            partitions.to_vec()
        };
        chosen.sort_unstable();
        chosen.dedup();
        // Targets come from the log, before the group is held: finding a
        // time reads partitions, and joiners should not wait for that.
        let mut targets = Vec::with_capacity(chosen.len());
        for p in chosen {
            let tp = TopicPartition::new(topic, p);
            let o = self.data.offsets(&tp)?;
            let target = match to {
                ResetTo::Earliest => o.log_start,
                ResetTo::Latest => o.high_water_mark,
                ResetTo::Offset(n) => n.clamp(o.log_start, o.high_water_mark),
                ResetTo::Time(t) => self.offset_at(&tp, t).await?,
            };
            targets.push((p, o.log_start, target));
        }
        let moves = self
            .groups
            .without_members(group, topic, meta.partitions, || {
                targets
                    .iter()
                    .map(|&(partition, log_start, target)| {
                        let key = GroupPartition {
                            group: group.to_owned(),
                            topic: topic.to_owned(),
                            partition,
                        };
                        let had = self.offsets.get(&key);
                        let from = had.unwrap_or(log_start);
                        let target = match had {
                            Some(c) if only_back && c <= target => c,
                            _ => target,
                        };
                        self.offsets.reset(&key, target);
                        pb::OffsetMove {
                            partition,
                            from,
                            to: target,
                            had_offset: had.is_some(),
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        self.offsets.flush().await?;
        for m in &moves {
            tracing::info!(
                topic,
                group,
                partition = m.partition,
                from = m.from,
                to = m.to,
                "offset reset"
            );
        }
        Ok(moves)
    }

    /// Gives `topic` `partitions` partitions in all; every live group of
    /// it gets the new ones at once. Returns the count before.
    pub(crate) async fn add_partitions(&self, topic: &str, partitions: u32) -> Result<u32> {
        let _alone = self.appending.write().await;
        // Every group that consumes the topic starts the new partitions at
        // their beginning, whatever its start_from: what is published to
        // them before one of its members holds them (a group stopped for
        // the change, or the moment between publishing and handing them
        // out) is delivered, not skipped as a "latest" start would skip it.
        // Committed (durably) before the partitions can be published to.
        let current = self.topics.require(topic)?.partitions;
        let mut groups: std::collections::BTreeSet<String> =
            self.offsets.for_topic(topic).into_keys().collect();
        groups.extend(self.groups.members_of(topic).await.into_keys());
        let valid = partitions <= crate::topics::MAX_PARTITIONS;
        for group in groups.iter().filter(|_| valid) {
            for partition in current..partitions {
                self.offsets.commit(
                    &GroupPartition {
                        group: group.clone(),
                        topic: topic.to_owned(),
                        partition,
                    },
                    0,
                );
            }
        }
        self.offsets.flush().await?;
        let before = self.topics.add_partitions(topic, partitions).await?;
        self.groups.grow(topic, partitions).await;
        Ok(before)
    }

    /// Deletes `topic`: its partitions and their messages, every group's
    /// offsets on it and its ids in the publish dedup window. Refused while
    /// a group has members on it or a transaction for it is open (its
    /// commit would have nowhere to go); no publish, prepare, creation or
    /// growth runs meanwhile, and nobody joins its groups. Once begun it
    /// runs to its end even if the caller goes away. Its dead-letter topic
    /// is a topic of its own.
    pub(crate) async fn delete_topic(self: &std::sync::Arc<Self>, topic: &str) -> Result<()> {
        if topic.starts_with("__") {
            return Err(Error::invalid(
                "name",
                "Tandem's own topics cannot be deleted",
            ));
        }
        let this = self.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move { this.delete_detached(&topic).await })
            .await
            .map_err(|e| Error::Internal(format!("deleting a topic failed: {e}")))?
    }

    async fn delete_detached(&self, topic: &str) -> Result<()> {
        let _alone = self.appending.write().await;
        self.topics.require(topic)?;
        self.groups.close_topic(topic);
        let done = self.delete_closed(topic).await;
        self.groups.reopen(topic, done.is_ok());
        done
    }

    async fn delete_closed(&self, topic: &str) -> Result<()> {
        let members = self.groups.members_of(topic).await;
        if let Some((group, m)) = members.iter().find(|(_, m)| !m.is_empty()) {
            return Err(Error::FailedPrecondition(format!(
                "group {group:?} has {} member(s) on topic {topic:?}: stop its consumers first",
                m.len()
            )));
        }
        let (open, n) = self
            .txns
            .list(
                Some(pb::TransactionState::Prepared as i32),
                "",
                None,
                usize::MAX,
            )
            .await;
        let open: Vec<&pb::Transaction> = open.iter().filter(|t| t.topic == topic).collect();
        if let Some(t) = open.first() {
            return Err(Error::FailedPrecondition(format!(
                "{} open transaction(s) will commit to topic {topic:?} (of {n} open), such as {:?} of service {:?}: let them end first",
                open.len(),
                t.txn_id,
                t.service
            )));
        }
        let meta = self.topics.delete(topic).await?;
        for partition in 0..meta.partitions {
            self.data
                .delete_partition(&TopicPartition::new(topic, partition))
                .await?;
        }
        self.offsets.forget_topic(topic);
        self.offsets.flush().await?;
        self.recent.forget_topic(topic);
        Ok(())
    }
}
