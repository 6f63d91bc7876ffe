//! The storage error type. Caller mistakes (bad input, unknown partition,
//! out-of-range reads) are kept apart from faults of the disk, so services
//! can map the first to client errors and treat the second as fatal.

use std::io;
use std::path::PathBuf;

use crate::TopicPartition;

/// Everything that can go wrong in the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The partition was never created.
    #[error("unknown partition {0}")]
    UnknownPartition(TopicPartition),
    /// `create_partition` on a partition that already exists.
    #[error("partition {0} already exists")]
    PartitionExists(TopicPartition),
    /// A topic name outside `[A-Za-z0-9._-]{1,249}`.
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An append with no records.
    #[error("empty batch: an append needs at least one record")]
    EmptyBatch,
    /// One record is larger than `max_record_bytes`.
    #[error(
        "record {index} of the batch is {size} bytes, over the maximum record size of {max} bytes"
    )]
    RecordTooLarge {
        /// Position of the record in the batch.
        index: usize,
        /// Its encoded size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The whole batch is larger than `max_batch_bytes`.
    #[error("batch is {size} bytes, over the maximum batch size of {max} bytes")]
    BatchTooLarge {
        /// Encoded size of the batch.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A field is longer than the on-disk format can hold.
    #[error("record {index}: field {field} is {len} bytes, over the format's limit of {max}")]
    FieldTooLong {
        /// Position of the record in the batch.
        index: usize,
        /// Which field (`id`, `header name`, ...).
        field: &'static str,
        /// Its length.
        len: usize,
        /// The format's limit.
        max: usize,
    },
    /// A read below the log start or past the high-water mark.
    #[error("offset {offset} is out of range for {tp}: the log holds offsets [{start}, {end})")]
    OffsetOutOfRange {
        /// The partition.
        tp: TopicPartition,
        /// The offset asked for.
        offset: u64,
        /// First offset still held.
        start: u64,
        /// The high-water mark (next offset to be written).
        end: u64,
    },
    /// A log file fails its checks somewhere other than a torn tail.
    #[error("corrupt log file {}: at byte {position}: {reason}", file.display())]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// Byte position of the bad data.
        position: u64,
        /// What check failed.
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`open`, `read`, `fdatasync`, ...).
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A write or sync failed earlier; the partition refuses further writes
    /// until it is reopened (and its tail recovered).
    #[error("partition {tp} stopped accepting writes after a failed write: {cause}")]
    Poisoned {
        /// The partition.
        tp: TopicPartition,
        /// The original failure.
        cause: String,
    },
    /// A setting out of its range.
    #[error("invalid log setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A statement to the database behind the log failed.
    #[error("PostgreSQL: {what}: {cause}")]
    Store {
        /// What was being done.
        what: &'static str,
        /// The database's or the driver's complaint.
        cause: String,
    },
    /// A write under a lease that another replica has since taken over.
    #[error("lease {lease:?} is no longer held with epoch {epoch} (now {}): write refused", current.map_or_else(|| "gone".to_owned(), |c| format!("epoch {c}")))]
    Fenced {
        /// The lease.
        lease: String,
        /// The epoch the writer holds.
        epoch: i64,
        /// The lease's epoch now.
        current: Option<i64>,
    },
    /// The log was closed.
    #[error("the log is closed")]
    Closed,
    /// A schedule that is not a valid cron expression.
    #[error("invalid cron expression {expr:?}: {reason}")]
    Schedule {
        /// The expression as given.
        expr: String,
        /// The parser's complaint.
        reason: String,
    },
}

impl Error {
    /// True for mistakes of the caller (bad input, unknown names, out-of-range
    /// offsets): retrying the same call cannot succeed, and nothing changed.
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            Error::UnknownPartition(_)
                | Error::PartitionExists(_)
                | Error::InvalidTopicName { .. }
                | Error::EmptyBatch
                | Error::RecordTooLarge { .. }
                | Error::BatchTooLarge { .. }
                | Error::FieldTooLong { .. }
                | Error::OffsetOutOfRange { .. }
                | Error::Schedule { .. }
                | Error::InvalidConfig { .. }
        )
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
