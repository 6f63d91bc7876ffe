//! A reader that follows a partition's tail: it returns what is there and,
//! at the high-water mark, waits for the writer to make more durable instead
//! of polling.

use crate::error::Result;
use crate::log::Log;
use crate::record::{StoredRecord, TopicPartition};
use crate::segment::ReadBudget;

/// Follows one partition from an offset onwards.
#[derive(Debug)]
pub struct Tail<L> {
    log: L,
    tp: TopicPartition,
    next: u64,
}

impl<L: Log> Tail<L> {
    /// A follower that will read `tp` from offset `from`.
    pub fn new(log: L, tp: TopicPartition, from: u64) -> Self {
        Tail {
            log,
            tp,
            next: from,
        }
    }

    /// The offset the next call reads from.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Returns the next records (at least one), waiting for them if needed.
    pub async fn next_batch(&mut self, budget: ReadBudget) -> Result<Vec<StoredRecord>> {
        loop {
            let records = self.log.read(&self.tp, self.next, budget).await?;
            if let Some(last) = records.last() {
                self.next = last.offset + 1;
                return Ok(records);
            }
            self.log.wait_for(&self.tp, self.next).await?;
        }
    }
}
