//! The log trait: what every storage backend offers the coordinator.
//! Appends return the offsets they were given; reads take a budget; the
//! high-water mark is the first offset not yet readable.

use std::future::Future;

use crate::error::Result;
use crate::record::{Record, StoredRecord, TopicPartition};
use crate::segment::ReadBudget;

/// The offsets an append was given: `base_offset..=last_offset`, one per
/// record, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendAck {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Offset of the last record.
    pub last_offset: u64,
}

/// Where a partition's log starts and ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// First offset still held (older ones were removed by retention).
    pub log_start: u64,
    /// Next offset to be written; every offset below it is readable.
    pub high_water_mark: u64,
    /// Bytes the partition takes on disk.
    pub size_bytes: u64,
}

/// Partitioned, append-only logs.
pub trait Log: Send + Sync + 'static {
    /// Creates an empty partition.
    fn create_partition(&self, tp: &TopicPartition) -> impl Future<Output = Result<()>> + Send;

    /// Deletes a partition and everything it holds. Appends queued before
    /// the call are written first; later ones fail. Durable when it
    /// returns; a crash half way finishes the deletion at the next open.
    fn delete_partition(&self, tp: &TopicPartition) -> impl Future<Output = Result<()>> + Send;

    /// The partitions that exist.
    fn partitions(&self) -> Vec<TopicPartition>;

    /// Appends a batch of records; resolves once it is acknowledged (per the
    /// backend's durability setting) with the offsets it was given.
    fn append(
        &self,
        tp: &TopicPartition,
        records: Vec<Record>,
    ) -> impl Future<Output = Result<AppendAck>> + Send;

    /// Appends like [`append`](Log::append), but is acknowledged once the
    /// records are written and readable, without waiting for them to be
    /// synced: they become durable with the partition's next sync (any later
    /// synced append, or [`sync`](Log::sync)). For records a crash may lose.
    fn append_relaxed(
        &self,
        tp: &TopicPartition,
        records: Vec<Record>,
    ) -> impl Future<Output = Result<AppendAck>> + Send;

    /// Makes everything appended to the partition so far durable (per the
    /// backend's durability setting).
    fn sync(&self, tp: &TopicPartition) -> impl Future<Output = Result<()>> + Send;

    /// Reads records from offset `from` within `budget`. Reading at the
    /// high-water mark returns nothing; below the log start or past the mark
    /// is an error.
    fn read(
        &self,
        tp: &TopicPartition,
        from: u64,
        budget: ReadBudget,
    ) -> impl Future<Output = Result<Vec<StoredRecord>>> + Send;

    /// Log start and high-water mark of a partition.
    fn offsets(&self, tp: &TopicPartition) -> Result<Offsets>;

    /// Resolves once the high-water mark is above `offset`, with the mark.
    fn wait_for(
        &self,
        tp: &TopicPartition,
        offset: u64,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Removes records below `offset` (whole segments or rows, as the backend
    /// stores them); returns the new log start, which may stay below `offset`.
    fn truncate_before(
        &self,
        tp: &TopicPartition,
        offset: u64,
    ) -> impl Future<Output = Result<u64>> + Send;
}
