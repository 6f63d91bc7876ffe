//! Tandem's storage: partitioned, append-only logs.
//!
//! [`Log`] is what the coordinator stores into: append a batch to a
//! partition and get its offsets, read from an offset within a budget, wait
//! for the high-water mark to move, drop old records. [`EmbeddedLog`] keeps
//! it in segment files on local disk with CRC-checked batches, group commit,
//! torn-tail recovery, a sparse offset index and retention.
//!
//! This crate knows nothing of messages, transactions or consumer groups:
//! records are opaque to it beyond their id, key, value and headers.

mod batch;
mod config;
mod embedded;
mod error;
mod index;
mod log;
mod partition;
mod record;
mod schedule;
mod segment;
mod tail;

pub mod failpoint;
pub mod vfs;

pub use config::{FsyncPolicy, LogConfig, Retention};
pub use embedded::EmbeddedLog;
pub use error::{Error, Result};
pub use log::{AppendAck, Log, Offsets};
pub use record::{
    Header, MAX_TOPIC_NAME_LEN, Record, StoredRecord, TopicPartition, validate_topic_name,
};
pub use schedule::CronSchedule;
pub use segment::ReadBudget;
pub use tail::Tail;
pub use vfs::{Loss, OsFs, SimFs, Vfs};
