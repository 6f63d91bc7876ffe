//! Settings of the embedded log: segment size, index density, fsync policy,
//! size limits and retention. Every default suits a local run.

use std::time::Duration;

/// When appended bytes are forced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// `fdatasync` before any append of the group is acknowledged: nothing
    /// acknowledged can be lost to a crash (the default).
    Always,
    /// Acknowledge once written to the page cache; `fdatasync` at most this
    /// often. A crash of the machine loses up to one interval.
    Interval(Duration),
    /// Acknowledge once written; leave flushing to the operating system.
    Never,
}

/// Retention limits; a segment is deleted whole, never the active one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete a segment once its newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete oldest segments while a partition holds more bytes than this.
    pub max_bytes: Option<u64>,
}

/// Settings of an [`EmbeddedLog`](crate::EmbeddedLog).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment is rolled once the next batch would take it past this size.
    pub segment_bytes: u64,
    /// An index entry is written at least every this many bytes of log.
    pub index_interval_bytes: u32,
    /// When appends are forced to disk.
    pub fsync: FsyncPolicy,
    /// Largest encoded record accepted (default 1 MiB).
    pub max_record_bytes: usize,
    /// Largest encoded batch (one append) accepted.
    pub max_batch_bytes: usize,
    /// A journal file is checkpointed (every segment written since synced)
    /// and replaced once it holds this many bytes.
    pub journal_bytes: u64,
    /// A partition's share of one group commit at least this large is
    /// written and synced in its segment file directly rather than through
    /// the journal (which would write its bytes twice).
    pub direct_write_bytes: usize,
    /// While several appends are waiting to be synced, the writer waits
    /// until this long after its last sync for more to join the group
    /// (fewer `fdatasync` calls at the cost of up to this much latency);
    /// an append alone is synced at once. Zero (the default): never wait;
    /// groups then form while the disk syncs the previous one, which on a
    /// disk with slow syncs (network block storage) is enough.
    pub group_commit_wait: Duration,
    /// Most bytes one group commit gathers before writing.
    pub max_group_bytes: usize,
    /// Appends that may wait for a partition's writer before callers wait.
    pub append_queue: usize,
    /// Retention limits applied by [`EmbeddedLog::enforce_retention`](crate::EmbeddedLog).
    pub retention: Retention,
    /// On open, truncate at the first corrupt batch anywhere (dropping what
    /// follows) instead of refusing to open.
    pub repair: bool,
    /// Relaxed appends become durable within this long even if no synced
    /// append or explicit sync comes (`None`: only with those).
    pub relaxed_sync_within: Option<Duration>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 64 << 20,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Always,
            max_record_bytes: 1 << 20,
            max_batch_bytes: 16 << 20,
            journal_bytes: 64 << 20,
            direct_write_bytes: 32 << 10,
            group_commit_wait: Duration::ZERO,
            max_group_bytes: 4 << 20,
            append_queue: 4096,
            retention: Retention::default(),
            repair: false,
            relaxed_sync_within: None,
        }
    }
}
