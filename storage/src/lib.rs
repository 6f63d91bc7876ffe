//! Tandem's storage: partitioned, append-only logs.
//!
//! [`Log`] is what the coordinator stores into: append a batch to a
//! partition and get its offsets, read from an offset within a budget, wait
//! for the high-water mark to move, drop old records. [`EmbeddedLog`] keeps
//! it in segment files on local disk with CRC-checked batches, group commit,
//! torn-tail recovery, a sparse offset index and retention. [`PgLog`] keeps
//! the same logs as rows in PostgreSQL, written under a lease with a fencing
//! epoch so that several coordinator replicas can share one database.
//!
//! This crate knows nothing of messages, transactions or consumer groups:
//! records are opaque to it beyond their id, key, value and headers.

mod batch;
mod config;
mod embedded;
mod error;
mod index;
mod journal;
mod log;
mod partition;
mod postgres;
mod record;
mod schedule;
mod segment;
mod store;
mod tail;
mod writer;

pub mod failpoint;
pub mod vfs;

pub use config::{FsyncPolicy, LogConfig, Retention};
pub use embedded::{EmbeddedLog, SyncCounter};
pub use error::{Error, Result};
pub use log::{AppendAck, Log, Offsets};
pub use postgres::{Lease, PgLog, PgStore};
pub use record::{
    Header, MAX_TOPIC_NAME_LEN, Record, StoredRecord, TopicPartition, validate_topic_name,
};
pub use schedule::CronSchedule;
pub use segment::ReadBudget;
pub use store::StoreLog;
pub use tail::Tail;
pub use vfs::{Loss, OsFs, SimFs, Vfs};
pub use writer::SyncTimes;
