//! The journal: one sequential file per log folder into which every
//! partition's appends go first, so that one `fdatasync` makes a whole
//! group of appends durable, whatever partitions they went to.
//!
//! Each append is written to the journal (and synced, for a synced append)
//! before it is written to its partition's segment file, which is not
//! synced then. A partition's segment file is synced when it is sealed, and
//! every partition's active segment at each *checkpoint*: when the journal
//! file reaches `journal_bytes`, and at a clean close. A checkpoint starts a
//! new journal file whose first entry lists every partition's active
//! segment and its size (all synced); the old file is deleted after the new
//! one is durable.
//!
//! Recovery (at open) redoes every batch entry of every journal file left
//! in its partition's segment file at the position it was written to: the
//! bytes are the same, so redoing twice is harmless, and a segment file
//! whose unsynced pages a power cut lost is whole again. What the newest
//! checkpoint and the entries after it name is *vouched for*: the segment
//! scan may stop (damage, a torn write) only past it; past it, a stop is the
//! torn tail of writes never acknowledged as durable.
//!
//! ```text
//! file:   entry*          (named journal-<sequence, 20 digits>.wal)
//! entry:  len u32 | crc32c u32 | kind u8 | body    (len: bytes after itself)
//! kind 1, checkpoint: clean u8 | count u32 | (partition | size u64)*
//! kind 2, batch:      partition | position u64 | the batch's bytes
//! partition: dir_len u16 | dir | segment base u64
//!         (dir: the partition's folder relative to the journal's, such as
//!         `topics/orders/3`)
//! ```
//! A partition's share of a group large enough to be written and synced in
//! its segment directly skips the journal; nothing vouches for it until the
//! next checkpoint lists the segment's size.
//! The CRC covers everything after the CRC field. A checkpoint is `clean`
//! when the log was closed: every active segment's index was written
//! then, so opening trusts it instead of scanning the segment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, BufMut};

use crate::error::{Error, Result};
use crate::segment;
use crate::vfs::{OpenMode, VFile, Vfs};

const CHECKPOINT: u8 = 1;
const BATCH: u8 = 2;
const ENTRY_HEADER: usize = 9;

/// File name of the journal file with sequence number `seq`.
pub(crate) fn file_name(seq: u64) -> String {
    format!("journal-{seq:020}.wal")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("journal-")?.strip_suffix(".wal")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// A partition's active segment and its size, as a checkpoint lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Active {
    /// The partition's folder, relative to the journal's.
    pub(crate) dir: String,
    pub(crate) base: u64,
    pub(crate) size: u64,
}

fn put_partition(dir: &str, base: u64, out: &mut Vec<u8>) {
    out.put_u16_le(dir.len() as u16);
    out.put_slice(dir.as_bytes());
    out.put_u64_le(base);
}

fn start_entry(kind: u8, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.push(kind);
    start
}

fn finish_entry(start: usize, out: &mut [u8]) {
    let len = (out.len() - start - 4) as u32;
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a checkpoint entry to `out`.
pub(crate) fn encode_checkpoint(clean: bool, actives: &[Active], out: &mut Vec<u8>) {
    let start = start_entry(CHECKPOINT, out);
    out.push(u8::from(clean));
    out.put_u32_le(actives.len() as u32);
    for a in actives {
        put_partition(&a.dir, a.base, out);
        out.put_u64_le(a.size);
    }
    finish_entry(start, out);
}

/// Appends an entry for `batch`, written to segment `base` of the
/// partition in folder `dir` at `position`, to `out`.
pub(crate) fn encode_batch(dir: &str, base: u64, position: u64, batch: &[u8], out: &mut Vec<u8>) {
    let start = start_entry(BATCH, out);
    put_partition(dir, base, out);
    out.put_u64_le(position);
    out.put_slice(batch);
    finish_entry(start, out);
}

/// One entry read back.
#[derive(Debug)]
enum Entry<'a> {
    Checkpoint {
        clean: bool,
        actives: Vec<Active>,
    },
    Batch {
        dir: String,
        base: u64,
        position: u64,
        bytes: &'a [u8],
    },
}

fn take_partition(b: &mut &[u8]) -> Option<(String, u64)> {
    if b.len() < 2 {
        return None;
    }
    let n = b.get_u16_le() as usize;
    if b.len() < n + 8 {
        return None;
    }
    let dir = std::str::from_utf8(&b[..n]).ok()?.to_owned();
    // a folder below the journal's, never above or beside it
    if dir.is_empty()
        || dir
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    b.advance(n);
    let base = b.get_u64_le();
    Some((dir, base))
}

/// The entry at the start of `buf` and its length; `None` where the
/// entries end (the end of the file, or a torn or damaged entry).
fn next_entry(buf: &[u8]) -> Option<(Entry<'_>, usize)> {
    if buf.len() < ENTRY_HEADER {
        return None;
    }
    let total = u32::from_le_bytes(buf[..4].try_into().ok()?) as usize + 4;
    if total < ENTRY_HEADER || total > buf.len() {
        return None;
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().ok()?);
    if crc32c::crc32c(&buf[8..total]) != crc {
        return None;
    }
    let mut b = &buf[9..total];
    let entry = match buf[8] {
        CHECKPOINT => {
            if b.len() < 5 {
                return None;
            }
            let clean = b.get_u8() == 1;
            let count = b.get_u32_le() as usize;
            let mut actives = Vec::with_capacity(count.min(b.len() / 22));
            for _ in 0..count {
                let (dir, base) = take_partition(&mut b)?;
                if b.len() < 8 {
                    return None;
                }
                actives.push(Active {
                    dir,
                    base,
                    size: b.get_u64_le(),
                });
            }
            Entry::Checkpoint { clean, actives }
        }
        BATCH => {
            let (dir, base) = take_partition(&mut b)?;
            if b.len() < 8 {
                return None;
            }
            let position = b.get_u64_le();
            Entry::Batch {
                dir,
                base,
                position,
                bytes: b,
            }
        }
        _ => return None,
    };
    Some((entry, total))
}

/// What opening found in the journal files, after redoing them.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Whether any journal file was found (a log written before the
    /// journal existed has none).
    pub(crate) found: bool,
    /// The log was closed cleanly and nothing was written since.
    pub(crate) clean: bool,
    /// Per partition, the active segment and how far into it the newest
    /// checkpoint and the entries after it vouch for its bytes.
    /// Keyed by the partition's folder relative to the journal's.
    pub(crate) vouched: HashMap<String, (u64, u64)>,
    /// Journal files to delete once the new one is durable.
    pub(crate) files: Vec<PathBuf>,
    /// Sequence number for the next journal file.
    pub(crate) next_seq: u64,
    /// Batch entries written back into segment files.
    pub(crate) redone: usize,
}

impl Recovered {
    /// Records a batch redone into segment `base` of the partition in
    /// `dir` at `position..end`. The journal vouches for a segment only up
    /// to where its coverage is unbroken: bytes written directly (not
    /// journaled) before a journaled batch may not have been synced when
    /// the power went, so the batch's end says nothing about them.
    fn vouch(&mut self, dir: String, base: u64, position: u64, end: u64) {
        let v = self.vouched.entry(dir).or_insert((base, 0));
        if base > v.0 {
            *v = (base, if position == 0 { end } else { 0 });
        } else if base == v.0 && position <= v.1 {
            v.1 = v.1.max(end);
        }
    }
}

/// Reads every journal file in `root`, redoes its batch entries into the
/// segment files and syncs those; returns what the partitions' recovery
/// needs to know.
pub(crate) fn recover(fs: &dyn Vfs, root: &Path) -> Result<Recovered> {
    let mut seqs: Vec<u64> = fs
        .list(root)
        .map_err(Error::io("list", root))?
        .into_iter()
        .filter(|(_, dir)| !dir)
        .filter_map(|(name, _)| parse_name(&name))
        .collect();
    seqs.sort_unstable();
    let mut out = Recovered {
        next_seq: seqs.last().map_or(0, |s| s + 1),
        found: !seqs.is_empty(),
        ..Recovered::default()
    };
    let mut written: HashMap<PathBuf, Arc<dyn VFile>> = HashMap::new();
    for seq in seqs {
        let path = root.join(file_name(seq));
        let buf = fs.read(&path).map_err(Error::io("read", &path))?;
        out.files.push(path.clone());
        let mut pos = 0;
        let mut first = true;
        while let Some((entry, len)) = next_entry(&buf[pos..]) {
            match entry {
                Entry::Checkpoint { clean, actives } if first => {
                    out.clean = clean;
                    out.vouched = actives
                        .into_iter()
                        .map(|a| (a.dir, (a.base, a.size)))
                        .collect();
                }
                Entry::Checkpoint { .. } => {
                    return Err(Error::Corrupt {
                        file: path,
                        position: pos as u64,
                        reason: "a checkpoint inside the journal file".into(),
                    });
                }
                // A file whose checkpoint did not make it was being created
                // when the process stopped: nothing was written to it.
                Entry::Batch { .. } if first => break,
                Entry::Batch {
                    dir,
                    base,
                    position,
                    bytes,
                } => {
                    out.clean = false;
                    redo(fs, &root.join(&dir), base, position, bytes, &mut written)?;
                    out.redone += 1;
                    out.vouch(dir, base, position, position + bytes.len() as u64);
                }
            }
            first = false;
            pos += len;
        }
    }
    for (path, file) in written {
        file.sync_data().map_err(Error::io("fdatasync", &path))?;
    }
    Ok(out)
}

/// Writes one journaled batch back into its segment file.
fn redo(
    fs: &dyn Vfs,
    dir: &Path,
    base: u64,
    position: u64,
    bytes: &[u8],
    written: &mut HashMap<PathBuf, Arc<dyn VFile>>,
) -> Result<()> {
    let path = segment::log_path(dir, base);
    if !written.contains_key(&path) {
        let file = match fs.open(&path, OpenMode::Existing) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Retention deleted the (sealed, synced) segment since.
                let later = fs
                    .list(dir)
                    .ok()
                    .into_iter()
                    .flatten()
                    .any(|(n, _)| segment::parse_log_name(&n).is_some_and(|b| b > base));
                if later {
                    return Ok(());
                }
                return Err(Error::Corrupt {
                    file: path,
                    position,
                    reason: "the journal holds a batch for this segment file, which is missing"
                        .into(),
                });
            }
            Err(e) => return Err(Error::io("open", &path)(e)),
        };
        written.insert(path.clone(), file);
    }
    written[&path]
        .write_all_at(bytes, position)
        .map_err(Error::io("write", &path))
}

/// The journal file being written.
pub(crate) struct JournalFile {
    pub(crate) seq: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn VFile>,
    pub(crate) size: u64,
    /// Written since the last sync.
    pub(crate) dirty: bool,
}

impl JournalFile {
    /// Creates journal file `seq` in `root` starting with a checkpoint of
    /// `actives`, synced, and syncs `root`.
    pub(crate) fn create(
        fs: &dyn Vfs,
        root: &Path,
        seq: u64,
        clean: bool,
        actives: &[Active],
    ) -> Result<JournalFile> {
        let path = root.join(file_name(seq));
        let file = fs
            .open(&path, OpenMode::Truncate)
            .map_err(Error::io("create", &path))?;
        let mut buf = Vec::new();
        encode_checkpoint(clean, actives, &mut buf);
        file.write_all_at(&buf, 0)
            .map_err(Error::io("write", &path))?;
        file.sync_data().map_err(Error::io("fdatasync", &path))?;
        fs.sync_dir(root).map_err(Error::io("fsync folder", root))?;
        Ok(JournalFile {
            seq,
            path,
            file,
            size: buf.len() as u64,
            dirty: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_ends_them() {
        let dir = "topics/orders/3";
        let mut buf = Vec::new();
        let actives = vec![Active {
            dir: dir.into(),
            base: 40,
            size: 1234,
        }];
        encode_checkpoint(true, &actives, &mut buf);
        let first = buf.len();
        encode_batch(dir, 40, 1234, b"batch bytes", &mut buf);
        let (e, n) = next_entry(&buf).expect("checkpoint");
        assert_eq!(n, first);
        assert!(matches!(e, Entry::Checkpoint { clean: true, actives: a } if a == actives));
        let (e, n) = next_entry(&buf[first..]).expect("batch");
        assert_eq!(first + n, buf.len());
        assert!(matches!(
            e,
            Entry::Batch {
                base: 40,
                position: 1234,
                bytes: b"batch bytes",
                ..
            }
        ));
        for cut in first..buf.len() {
            assert!(next_entry(&buf[first..cut]).is_none(), "cut at {cut}");
        }
        let mut flipped = buf.clone();
        flipped[first + 12] ^= 4;
        assert!(next_entry(&flipped[first..]).is_none());
    }

    #[test]
    fn only_journal_file_names_parse() {
        assert_eq!(parse_name(&file_name(7)), Some(7));
        assert_eq!(parse_name("journal-7.wal"), None);
        assert_eq!(parse_name("journal-0000000000000000000x.wal"), None);
    }
}
