//! One segment of a partition: the file `<base offset>.log` of whole record
//! batches, its sparse index, and the scan that checks a segment on open.
//!
//! Recovery rule: the scan walks batches from the start and stops at the
//! first one that is cut short, fails its CRC, or does not continue the
//! offsets. That spot is a *torn tail* (an append that was never
//! acknowledged, to be truncated) unless a whole valid batch follows it at
//! its declared end, which only in-place damage of written data produces:
//! that is *corruption*, and opening fails unless repair was asked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::batch::{self, BatchHeader, Found, HEADER_LEN, MAX_ON_DISK};
use crate::error::{Error, Result};
use crate::index::{SealedSummary, SparseIndex};
use crate::record::StoredRecord;
use crate::vfs::{OpenMode, VFile, Vfs};

/// Bytes read at a time while scanning or reading.
const CHUNK: usize = 256 << 10;

/// A segment as shared between the writer and readers.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    /// Offset after the last record written to this segment.
    pub(crate) next_offset: u64,
    /// Bytes of whole batches in the file.
    pub(crate) size: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) index: SparseIndex,
    pub(crate) file: Arc<dyn VFile>,
    pub(crate) path: PathBuf,
}

/// File names of the segment starting at `base`.
pub(crate) fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

pub(crate) fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.index"))
}

/// Base offset named by a segment file name, if it is one.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

fn open_rw(fs: &dyn Vfs, path: &Path, create: bool) -> Result<Arc<dyn VFile>> {
    let mode = if create {
        OpenMode::CreateNew
    } else {
        OpenMode::Existing
    };
    fs.open(path, mode)
        .map_err(Error::io(if create { "create" } else { "open" }, path))
}

/// What a scan found.
#[derive(Debug)]
pub(crate) struct Scan {
    pub(crate) next_offset: u64,
    /// Length of the valid prefix.
    pub(crate) valid_len: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) index: SparseIndex,
    /// Where the valid prefix ends early, if it does.
    pub(crate) stop: Option<Stop>,
}

/// Where and why a segment's valid prefix ends before the end of its file.
#[derive(Debug)]
pub(crate) struct Stop {
    pub(crate) position: u64,
    pub(crate) reason: String,
    /// A torn tail (nothing valid follows) rather than damage before
    /// later valid data.
    pub(crate) torn: bool,
    /// Valid batches follow the spot: what a truncation cuts off is kept
    /// in a file of its own.
    pub(crate) valid_after: bool,
}

/// Reads a file in chunks, keeping the last chunk as shared bytes.
struct Window<'a> {
    file: &'a dyn VFile,
    path: &'a Path,
    end: u64,
    buf: Bytes,
    start: u64,
}

impl<'a> Window<'a> {
    fn new(file: &'a dyn VFile, path: &'a Path, end: u64) -> Self {
        Window {
            file,
            path,
            end,
            buf: Bytes::new(),
            start: 0,
        }
    }

    /// Up to `len` bytes from `pos`; fewer only where the window ends.
    fn get(&mut self, pos: u64, len: usize) -> Result<Bytes> {
        let want_end = (pos + len as u64).min(self.end);
        if pos >= self.start && want_end <= self.start + self.buf.len() as u64 {
            let from = (pos - self.start) as usize;
            return Ok(self.buf.slice(from..(want_end - self.start) as usize));
        }
        let read_len = ((want_end - pos) as usize)
            .max(CHUNK)
            .min((self.end - pos) as usize);
        let mut v = vec![0u8; read_len];
        let mut filled = 0;
        while filled < read_len {
            match self.file.read_at(&mut v[filled..], pos + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", self.path)(e)),
            }
        }
        v.truncate(filled);
        self.buf = Bytes::from(v);
        self.start = pos;
        let n = ((want_end - pos) as usize).min(self.buf.len());
        Ok(self.buf.slice(..n))
    }

    /// Looks for a batch at `pos`, reading as much as its length asks for.
    fn inspect(&mut self, pos: u64) -> Result<(Found, Bytes)> {
        let head = self.get(pos, HEADER_LEN)?;
        if head.len() < 4 {
            return Ok((Found::Truncated, head));
        }
        let claimed = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize + 4;
        let bytes = self.get(pos, claimed.clamp(HEADER_LEN, MAX_ON_DISK))?;
        Ok((batch::inspect(&bytes), bytes))
    }
}

impl Segment {
    /// Creates an empty segment file; the caller syncs the folder.
    pub(crate) fn create(fs: &dyn Vfs, dir: &Path, base_offset: u64) -> Result<Segment> {
        let path = log_path(dir, base_offset);
        let file = open_rw(fs, &path, true)?;
        Ok(Segment {
            base_offset,
            next_offset: base_offset,
            size: 0,
            max_timestamp: i64::MIN,
            index: SparseIndex::default(),
            file,
            path,
        })
    }

    /// Opens a segment: from its index file when `trust_index` and the file
    /// matches (for the active segment, `check_tail` also reads the batches
    /// after its last index entry and requires them whole, ending where the
    /// index says), else by a scan. Returns the segment (holding the valid
    /// prefix) and where the scan stopped early, if it did.
    pub(crate) fn open(
        fs: &dyn Vfs,
        dir: &Path,
        base_offset: u64,
        trust_index: bool,
        check_tail: bool,
        interval: u32,
    ) -> Result<(Segment, Option<Stop>)> {
        let path = log_path(dir, base_offset);
        let file = open_rw(fs, &path, false)?;
        let len = file.size().map_err(Error::io("stat", &path))?;
        if trust_index
            && let Some(s) =
                SealedSummary::read(fs, &index_path(dir, base_offset), base_offset, len)
            && (!check_tail || tail_is_whole(&*file, &path, base_offset, &s)?)
        {
            let seg = Segment {
                base_offset,
                next_offset: s.next_offset,
                size: s.size,
                max_timestamp: s.max_timestamp,
                index: s.index,
                file,
                path,
            };
            return Ok((seg, None));
        }
        let scan = scan(&*file, &path, base_offset, len, interval)?;
        let seg = Segment {
            base_offset,
            next_offset: scan.next_offset,
            size: scan.valid_len,
            max_timestamp: scan.max_timestamp,
            index: scan.index,
            file,
            path,
        };
        Ok((seg, scan.stop))
    }

    /// Copies what follows the valid prefix to `<base>.log.cut-at-<size>`
    /// (synced, and its folder entry too) so that a truncation never
    /// destroys bytes that might be acknowledged data behind damage.
    pub(crate) fn keep_what_follows(&self, fs: &dyn Vfs, dir: &Path) -> Result<PathBuf> {
        let len = self.file.size().map_err(Error::io("stat", &self.path))?;
        let mut rest = vec![0u8; (len - self.size.min(len)) as usize];
        let mut filled = 0;
        while filled < rest.len() {
            match self
                .file
                .read_at(&mut rest[filled..], self.size + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", &self.path)(e)),
            }
        }
        rest.truncate(filled);
        let path = dir.join(format!("{:020}.log.cut-at-{}", self.base_offset, self.size));
        let f = fs
            .open(&path, OpenMode::Truncate)
            .map_err(Error::io("create", &path))?;
        f.write_all_at(&rest, 0)
            .map_err(Error::io("write", &path))?;
        f.sync_data().map_err(Error::io("fdatasync", &path))?;
        fs.sync_dir(dir).map_err(Error::io("fsync folder", dir))?;
        Ok(path)
    }

    /// Cuts the file back to its valid prefix and syncs it.
    pub(crate) fn truncate_to_valid(&self) -> Result<()> {
        self.file
            .set_len(self.size)
            .map_err(Error::io("truncate", &self.path))?;
        self.file.sync_all().map_err(Error::io("fsync", &self.path))
    }

    /// Writes this (now sealed) segment's index file.
    pub(crate) fn write_index(&self, fs: &dyn Vfs, dir: &Path) -> Result<()> {
        SealedSummary {
            base_offset: self.base_offset,
            next_offset: self.next_offset,
            size: self.size,
            max_timestamp: self.max_timestamp,
            index: self.index.clone(),
        }
        .write(fs, &index_path(dir, self.base_offset))
    }
}

/// Whether the batches from the summary's last index entry to its end are
/// whole and continue the offsets up to its `next_offset`.
fn tail_is_whole(
    file: &dyn VFile,
    path: &Path,
    base_offset: u64,
    s: &SealedSummary,
) -> Result<bool> {
    let (rel, mut pos) = s.index.last();
    let mut next = base_offset + rel;
    let mut w = Window::new(file, path, s.size);
    while pos < s.size {
        match w.inspect(pos)?.0 {
            Found::Batch(h) if h.base_offset == next => {
                pos += h.total_len as u64;
                next = h.next_offset();
            }
            _ => return Ok(false),
        }
    }
    Ok(pos == s.size && next == s.next_offset)
}

/// Checks every batch of a segment file of `len` bytes.
pub(crate) fn scan(
    file: &dyn VFile,
    path: &Path,
    base_offset: u64,
    len: u64,
    interval: u32,
) -> Result<Scan> {
    let mut w = Window::new(file, path, len);
    let mut out = Scan {
        next_offset: base_offset,
        valid_len: 0,
        max_timestamp: i64::MIN,
        index: SparseIndex::default(),
        stop: None,
    };
    let mut pos = 0u64;
    while pos < len {
        let (found, bytes) = w.inspect(pos)?;
        let problem = match found {
            Found::Batch(h) if h.base_offset == out.next_offset => {
                let rel = (h.base_offset - base_offset) as u32;
                out.index.on_batch(rel, pos, h.total_len, interval);
                out.next_offset = h.next_offset();
                out.max_timestamp = out.max_timestamp.max(h.max_timestamp);
                pos += h.total_len as u64;
                out.valid_len = pos;
                continue;
            }
            Found::Batch(h) => {
                // A whole, checksummed batch in the wrong place is never a torn write.
                let reason = format!(
                    "batch has base offset {}, expected {}",
                    h.base_offset, out.next_offset
                );
                out.stop = Some(Stop {
                    position: pos,
                    reason,
                    torn: false,
                    valid_after: true,
                });
                break;
            }
            Found::Truncated => {
                out.stop = Some(Stop {
                    position: pos,
                    reason: "batch cut short at end of file".into(),
                    torn: true,
                    valid_after: false,
                });
                break;
            }
            Found::Invalid(reason) => reason,
        };
        let claimed = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as u64 + 4;
        let next = pos + claimed;
        let valid_after = claimed >= HEADER_LEN as u64
            && next < len
            && matches!(w.inspect(next)?.0, Found::Batch(_));
        let lost_page = zero_page_inside(&bytes, pos);
        out.stop = Some(Stop {
            position: pos,
            reason: if lost_page {
                format!(
                    "{problem}; a whole page inside it reads as zeros (a write a power cut lost)"
                )
            } else {
                problem
            },
            torn: !valid_after || lost_page,
            valid_after,
        });
        break;
    }
    Ok(out)
}

/// Page size assumed by [`zero_page_inside`].
const PAGE: u64 = 4096;

/// Whether a whole page-aligned 4 KiB of `batch` (found at byte `pos` of
/// its file) is zeros. The page cache writes pages back in any order, so a
/// power cut may keep later pages of an unsynced write and lose an earlier
/// one, which then reads as zeros: the batch fails its CRC although valid
/// batches follow it. Such a page means the batch was never synced, nor was
/// anything written after it (syncs cover the whole file, and the log only
/// appends), so it is a torn tail, not damage of acknowledged data.
fn zero_page_inside(batch: &[u8], pos: u64) -> bool {
    let end = pos + batch.len() as u64;
    let mut page = pos.div_ceil(PAGE) * PAGE;
    while page + PAGE <= end {
        let from = (page - pos) as usize;
        if batch[from..from + PAGE as usize].iter().all(|&b| b == 0) {
            return true;
        }
        page += PAGE;
    }
    false
}

/// A read's limits: it stops after `max_records`, or once `max_bytes` of
/// records are gathered (but always returns at least one record if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadBudget {
    /// Most record bytes (batch bytes, as stored) to return.
    pub max_bytes: usize,
    /// Most records to return.
    pub max_records: usize,
}

impl Default for ReadBudget {
    fn default() -> Self {
        ReadBudget {
            max_bytes: 1 << 20,
            max_records: 10_000,
        }
    }
}

/// Reads records with offsets in `[from, until)` from `segment`, starting at
/// byte `position`, within `budget`; appends them to `out` and returns the
/// number of bytes of batches used.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_records(
    file: &dyn VFile,
    path: &Path,
    size: u64,
    position: u64,
    from: u64,
    until: u64,
    budget: ReadBudget,
    out: &mut Vec<StoredRecord>,
    mut used: usize,
) -> Result<usize> {
    let mut w = Window::new(file, path, size);
    let mut pos = position;
    while pos < size && out.len() < budget.max_records {
        let (found, bytes) = w.inspect(pos)?;
        let h: BatchHeader = match found {
            Found::Batch(h) => h,
            Found::Truncated => {
                return Err(corrupt(path, pos, "batch cut short inside the log".into()));
            }
            Found::Invalid(reason) => return Err(corrupt(path, pos, reason)),
        };
        let at = pos;
        pos += h.total_len as u64;
        if h.next_offset() <= from {
            continue;
        }
        if h.base_offset >= until {
            break;
        }
        if !out.is_empty() && used + h.total_len > budget.max_bytes {
            break;
        }
        used += h.total_len;
        let records = batch::decode(&bytes, &h).map_err(|reason| corrupt(path, at, reason))?;
        for r in records {
            if r.offset >= from && r.offset < until && out.len() < budget.max_records {
                out.push(r);
            }
        }
        if used >= budget.max_bytes {
            break;
        }
    }
    Ok(used)
}

fn corrupt(path: &Path, position: u64, reason: String) -> Error {
    Error::Corrupt {
        file: path.to_owned(),
        position,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_segment_file_names_parse() {
        assert_eq!(parse_log_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_log_name("42.log"), None);
        assert_eq!(parse_log_name("00000000000000000042.index"), None);
        assert_eq!(parse_log_name("0000000000000000004x.log"), None);
    }
}
