//! The sparse offset index of a segment: one entry per `index_interval_bytes`
//! of log, mapping a batch's offset (relative to the segment) to its byte
//! position, so a read starts at most one interval before its offset.
//!
//! The active segment's index lives in memory and is rebuilt by the scan on
//! open. When a segment is sealed its index is written to `<base>.index`
//! together with the segment's summary (next offset, size, newest timestamp)
//! and a CRC, so opening a partition need not re-read sealed segments. An
//! index file that does not match its log is ignored and rebuilt by a scan.

use std::path::Path;

use bytes::{Buf, BufMut};

use crate::error::{Error, Result};
use crate::vfs::{OpenMode, Vfs};

/// One index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Offset of a batch, minus the segment's base offset.
    pub(crate) rel_offset: u32,
    /// Byte position of that batch in the segment file.
    pub(crate) position: u32,
}

/// The in-memory sparse index of one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SparseIndex {
    entries: Vec<IndexEntry>,
    bytes_since_entry: u64,
}

impl SparseIndex {
    /// Notes a batch written at `position`; adds an entry when more than
    /// `interval` bytes were written since the last one.
    pub(crate) fn on_batch(&mut self, rel_offset: u32, position: u64, len: usize, interval: u32) {
        if position > 0 && self.bytes_since_entry >= u64::from(interval) {
            self.entries.push(IndexEntry {
                rel_offset,
                position: position as u32,
            });
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += len as u64;
    }

    /// The last entry: where the segment's last indexed batch starts
    /// (`(0, 0)` when there is none).
    pub(crate) fn last(&self) -> (u64, u64) {
        self.entries
            .last()
            .map_or((0, 0), |e| (u64::from(e.rel_offset), u64::from(e.position)))
    }

    /// Byte position from which to scan for `rel_offset`.
    pub(crate) fn lookup(&self, rel_offset: u64) -> u64 {
        let i = self
            .entries
            .partition_point(|e| u64::from(e.rel_offset) <= rel_offset);
        if i == 0 {
            0
        } else {
            u64::from(self.entries[i - 1].position)
        }
    }

    /// Moves the entries out, keeping the count of bytes since the last one,
    /// so the writer can hand new entries to readers one group at a time.
    pub(crate) fn take_entries(&mut self) -> SparseIndex {
        SparseIndex {
            entries: std::mem::take(&mut self.entries),
            bytes_since_entry: self.bytes_since_entry,
        }
    }

    /// An empty index that continues this one: new entries are spaced from
    /// this one's last entry.
    pub(crate) fn continuation(&self) -> SparseIndex {
        SparseIndex {
            entries: Vec::new(),
            bytes_since_entry: self.bytes_since_entry,
        }
    }

    /// Adds what another index (of later bytes of the same segment) holds.
    pub(crate) fn extend(&mut self, later: SparseIndex) {
        self.entries.extend(later.entries);
        self.bytes_since_entry = later.bytes_since_entry;
    }
}

/// What a sealed segment's index file records about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SealedSummary {
    pub(crate) base_offset: u64,
    pub(crate) next_offset: u64,
    pub(crate) size: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) index: SparseIndex,
}

const MAGIC: &[u8; 4] = b"TIX1";
const FIXED: usize = 4 + 8 + 8 + 8 + 8 + 4;

impl SealedSummary {
    /// Writes the summary to `path` (via a temporary file and a rename) and
    /// syncs it; the caller syncs the folder.
    pub(crate) fn write(&self, fs: &dyn Vfs, path: &Path) -> Result<()> {
        let mut buf = Vec::with_capacity(FIXED + 8 * self.index.entries.len() + 4);
        buf.put_slice(MAGIC);
        buf.put_u64_le(self.base_offset);
        buf.put_u64_le(self.next_offset);
        buf.put_u64_le(self.size);
        buf.put_i64_le(self.max_timestamp);
        buf.put_u32_le(self.index.entries.len() as u32);
        for e in &self.index.entries {
            buf.put_u32_le(e.rel_offset);
            buf.put_u32_le(e.position);
        }
        buf.put_u32_le(crc32c::crc32c(&buf));
        let tmp = path.with_extension("index.tmp");
        let f = fs
            .open(&tmp, OpenMode::Truncate)
            .map_err(Error::io("create", &tmp))?;
        f.write_all_at(&buf, 0).map_err(Error::io("write", &tmp))?;
        f.sync_data().map_err(Error::io("fdatasync", &tmp))?;
        fs.rename(&tmp, path).map_err(Error::io("rename", &tmp))
    }

    /// Reads a summary; `None` when the file is missing, damaged, or does not
    /// describe a segment with this base offset and size.
    pub(crate) fn read(
        fs: &dyn Vfs,
        path: &Path,
        base_offset: u64,
        log_size: u64,
    ) -> Option<SealedSummary> {
        let buf = fs.read(path).ok()?;
        if buf.len() < FIXED + 4 {
            return None;
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32c::crc32c(body) != (&crc[..]).get_u32_le() {
            return None;
        }
        let mut b = body;
        if &b[..4] != MAGIC {
            return None;
        }
        b.advance(4);
        let summary_base = b.get_u64_le();
        let next_offset = b.get_u64_le();
        let size = b.get_u64_le();
        let max_timestamp = b.get_i64_le();
        let count = b.get_u32_le() as usize;
        if summary_base != base_offset || size != log_size || b.len() != count * 8 {
            return None;
        }
        let entries = (0..count)
            .map(|_| IndexEntry {
                rel_offset: b.get_u32_le(),
                position: b.get_u32_le(),
            })
            .collect();
        Some(SealedSummary {
            base_offset,
            next_offset,
            size,
            max_timestamp,
            index: SparseIndex {
                entries,
                bytes_since_entry: 0,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::OsFs;
    use std::fs;

    #[test]
    fn lookup_finds_the_entry_at_or_before_the_offset() {
        let mut idx = SparseIndex::default();
        // batches of 10 records and 100 bytes each, an entry every 250 bytes
        for i in 0..10u32 {
            idx.on_batch(i * 10, u64::from(i) * 100, 100, 250);
        }
        assert_eq!(idx.lookup(0), 0);
        assert_eq!(idx.lookup(29), 0);
        assert_eq!(idx.lookup(30), 300);
        assert_eq!(idx.lookup(65), 600);
        assert_eq!(idx.lookup(1_000), 900);
    }

    #[test]
    fn summary_round_trips_and_rejects_mismatches() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir", "/tmp"))?;
        let path = dir.path().join("00000000000000000010.index");
        let mut index = SparseIndex::default();
        index.on_batch(0, 0, 5000, 4096);
        index.on_batch(3, 5000, 10, 4096);
        let s = SealedSummary {
            base_offset: 10,
            next_offset: 14,
            size: 5010,
            max_timestamp: 99,
            index,
        };
        s.write(&OsFs, &path)?;
        let mut back = SealedSummary::read(&OsFs, &path, 10, 5010).expect("summary just written");
        back.index.bytes_since_entry = s.index.bytes_since_entry;
        assert_eq!(back, s);
        assert!(SealedSummary::read(&OsFs, &path, 11, 5010).is_none());
        assert!(SealedSummary::read(&OsFs, &path, 10, 5011).is_none());
        let mut bytes = fs::read(&path).map_err(Error::io("read", &path))?;
        bytes[9] ^= 1;
        fs::write(&path, bytes).map_err(Error::io("write", &path))?;
        assert!(SealedSummary::read(&OsFs, &path, 10, 5010).is_none());
        Ok(())
    }
}
