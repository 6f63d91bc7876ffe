//! One log type for either backend, so the coordinator is built once and
//! picks the store at start-up.

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::log::{AppendAck, Log, Offsets};
use crate::record::{Record, StoredRecord, TopicPartition};
use crate::schedule::CronSchedule;
use crate::segment::ReadBudget;
use crate::{EmbeddedLog, PgLog};

/// A log on the embedded engine or in PostgreSQL.
#[derive(Clone, Debug)]
pub enum StoreLog {
    /// Segment files on local disk.
    Embedded(EmbeddedLog),
    /// Rows in PostgreSQL, written under a lease.
    Postgres(PgLog),
}

macro_rules! each {
    ($self:ident, $l:ident => $e:expr) => {
        match $self {
            StoreLog::Embedded($l) => $e,
            StoreLog::Postgres($l) => $e,
        }
    };
}

impl StoreLog {
    /// Resolves to the cause once a write failed: the owner must stop using
    /// the log (see [`EmbeddedLog::failed`] and [`PgLog::failed`]).
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        each!(self, l => l.failed())
    }

    /// Applies the retention limits now; returns how many segments
    /// (embedded) or records (PostgreSQL) were deleted.
    pub async fn enforce_retention(&self) -> Result<usize> {
        each!(self, l => l.enforce_retention().await)
    }

    /// Runs retention on `schedule` until the returned task is aborted.
    pub fn spawn_retention(&self, schedule: CronSchedule) -> JoinHandle<()> {
        let (log, unit) = match self {
            StoreLog::Embedded(_) => (self.clone(), "segments"),
            StoreLog::Postgres(_) => (self.clone(), "records"),
        };
        tokio::spawn(schedule.run(move || {
            let log = log.clone();
            async move {
                match log.enforce_retention().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, unit, "retention ran"),
                    Err(e) => tracing::error!(error = %e, "retention failed"),
                }
            }
        }))
    }

    /// Finishes queued appends and stops the log's writers.
    pub async fn close(&self) {
        each!(self, l => l.close().await)
    }
}

impl Log for StoreLog {
    async fn create_partition(&self, tp: &TopicPartition) -> Result<()> {
        each!(self, l => l.create_partition(tp).await)
    }

    async fn delete_partition(&self, tp: &TopicPartition) -> Result<()> {
        each!(self, l => l.delete_partition(tp).await)
    }

    fn partitions(&self) -> Vec<TopicPartition> {
        each!(self, l => l.partitions())
    }

    async fn append(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<AppendAck> {
        each!(self, l => l.append(tp, records).await)
    }

    async fn append_relaxed(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<AppendAck> {
        each!(self, l => l.append_relaxed(tp, records).await)
    }

    async fn sync(&self, tp: &TopicPartition) -> Result<()> {
        each!(self, l => l.sync(tp).await)
    }

    async fn read(
        &self,
        tp: &TopicPartition,
        from: u64,
        budget: ReadBudget,
    ) -> Result<Vec<StoredRecord>> {
        each!(self, l => l.read(tp, from, budget).await)
    }

    fn offsets(&self, tp: &TopicPartition) -> Result<Offsets> {
        each!(self, l => l.offsets(tp))
    }

    async fn wait_for(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        each!(self, l => l.wait_for(tp, offset).await)
    }

    async fn truncate_before(&self, tp: &TopicPartition, offset: u64) -> Result<u64> {
        each!(self, l => l.truncate_before(tp, offset).await)
    }
}
