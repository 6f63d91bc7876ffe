//! One partition: its segments, the state its writer keeps, and reads
//! bounded by the high-water mark.
//!
//! Durability contract (fsync `always`): an append is acknowledged only
//! after its batch, and every batch before it, is durable: in the log's
//! journal (see `journal`), which the log's one writer syncs for a whole
//! group of appends to any partitions, then written to the partition's
//! active segment file. A new segment file is created only after the
//! previous one was synced, and its folder entry is synced before anything
//! in it is journaled. Readers see offsets below the high-water mark only,
//! and the mark moves only once the group is durable and written, so
//! nothing read can later be lost. Opening syncs the newest segment and the
//! folder before anything is read: a process that crashed while the machine
//! stayed up leaves unsynced bytes and entries in the page cache, readable
//! but not yet durable.
//!
//! A failed write or sync poisons the partition: it refuses writes from
//! then on and never pretends the data is safe, and the log's `failed`
//! signal tells the process to stop (after a failed fsync the kernel may
//! have dropped the dirty pages: retrying it could "succeed" over lost
//! data).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{oneshot, watch};

use crate::batch::{self, HEADER_LEN};
use crate::config::{LogConfig, Retention};
use crate::error::{Error, Result};
use crate::index::SparseIndex;
use crate::log::{AppendAck, Offsets};
use crate::record::{Record, StoredRecord, TopicPartition};
use crate::segment::{self, ReadBudget, Segment, Stop};
use crate::vfs::{VFile, Vfs};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// Syncs a folder so that file creations, renames and deletions in it last.
pub(crate) fn sync_dir(fs: &dyn Vfs, dir: &Path) -> Result<()> {
    fs.sync_dir(dir).map_err(Error::io("fsync folder", dir))
}

/// What readers may see.
#[derive(Clone, Copy, Debug)]
struct Published {
    hwm: u64,
    closed: bool,
}

/// One append waiting for the log's writer.
pub(crate) struct AppendRequest {
    pub(crate) records: Vec<Record>,
    pub(crate) bytes: usize,
    /// Acknowledge only once synced (fsync `always`); else once written.
    pub(crate) sync: bool,
    pub(crate) reply: oneshot::Sender<Result<AppendAck>>,
}

/// The writer's own view of a partition's active segment.
pub(crate) struct WriterState {
    pub(crate) base_offset: u64,
    pub(crate) file: Arc<dyn VFile>,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) next_offset: u64,
    max_timestamp: i64,
    /// Index entries not yet handed to readers.
    index: SparseIndex,
    /// Bytes written to the segment file since its last sync.
    pub(crate) dirty: bool,
}

impl WriterState {
    fn of(seg: &Segment) -> WriterState {
        WriterState {
            base_offset: seg.base_offset,
            file: seg.file.clone(),
            path: seg.path.clone(),
            size: seg.size,
            next_offset: seg.next_offset,
            max_timestamp: seg.max_timestamp,
            index: seg.index.continuation(),
            dirty: false,
        }
    }

    /// Encodes `req`'s batch into `buf`, which is written at the end of the
    /// segment after what `buf` already holds; returns the batch's
    /// position in the segment and its offsets.
    pub(crate) fn encode(
        &mut self,
        records: &[Record],
        buf: &mut Vec<u8>,
        interval: u32,
    ) -> (u64, AppendAck) {
        let pos = self.size + buf.len() as u64;
        let h = batch::encode(self.next_offset, records, buf);
        let rel = (self.next_offset - self.base_offset) as u32;
        self.index.on_batch(rel, pos, h.total_len, interval);
        self.max_timestamp = self.max_timestamp.max(h.max_timestamp);
        self.next_offset = h.next_offset();
        (
            pos,
            AppendAck {
                base_offset: h.base_offset,
                last_offset: h.next_offset() - 1,
            },
        )
    }
}

/// How far the journal vouches for a partition's active segment (see
/// `journal`): opening stops at damage before that point, and treats a
/// stop past it as a torn tail.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Vouched {
    /// No journal: a log written before it existed.
    Unknown,
    /// Segment `base` up to byte `end`; any segment but nothing of it
    /// when `base` is `None`.
    Upto { base: Option<u64>, end: u64 },
}

/// One partition of the embedded log.
pub(crate) struct Partition {
    pub(crate) tp: TopicPartition,
    /// The writer's number for it, which its appends carry.
    pub(crate) id: u64,
    /// Its folder relative to the journal's, as journal entries name it.
    pub(crate) jdir: String,
    fs: Arc<dyn Vfs>,
    dir: PathBuf,
    pub(crate) config: Arc<LogConfig>,
    segments: RwLock<Vec<Segment>>,
    published: watch::Sender<Published>,
    poisoned: Mutex<Option<String>>,
    /// Held while old segments are deleted: one deletion at a time, so that
    /// files go oldest first whatever the callers (retention, truncation).
    /// Two at once could each delete and sync a later segment's file before
    /// the other deleted an earlier one: a power cut in between would leave
    /// a gap in the log, which then refuses to open.
    deleting: Mutex<()>,
    /// Fault point names of this partition.
    fault_write: String,
    pub(crate) fault_sync: String,
    fault_read: String,
}

impl Partition {
    /// Opens (recovering its tail) or creates the partition stored in `dir`;
    /// returns it and its writer's state. Blocking.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        fs: Arc<dyn Vfs>,
        tp: TopicPartition,
        id: u64,
        jdir: String,
        dir: PathBuf,
        config: Arc<LogConfig>,
        vouched: Vouched,
        clean: bool,
    ) -> Result<(Arc<Partition>, WriterState)> {
        let segments = recover(&*fs, &tp, &dir, &config, vouched, clean)?;
        let active = segments
            .last()
            .expect("recover leaves at least one segment");
        let state = WriterState::of(active);
        let (published, _) = watch::channel(Published {
            hwm: state.next_offset,
            closed: false,
        });
        let p = Arc::new(Partition {
            fault_write: format!("storage.write:{tp}"),
            fault_sync: format!("storage.fdatasync:{tp}"),
            fault_read: format!("storage.read:{tp}"),
            fs,
            tp,
            id,
            jdir,
            dir,
            config,
            segments: RwLock::new(segments),
            published,
            poisoned: Mutex::new(None),
            deleting: Mutex::new(()),
        });
        Ok((p, state))
    }

    /// Checks an append against the limits; returns its encoded size.
    pub(crate) fn check(&self, records: &[Record]) -> Result<usize> {
        if records.is_empty() {
            return Err(Error::EmptyBatch);
        }
        let mut bytes = HEADER_LEN;
        for (i, r) in records.iter().enumerate() {
            bytes += batch::check_record(i, r, self.config.max_record_bytes)?;
        }
        if bytes > self.config.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                size: bytes,
                max: self.config.max_batch_bytes,
            });
        }
        self.check_poisoned()?;
        Ok(bytes)
    }

    pub(crate) fn check_poisoned(&self) -> Result<()> {
        match &*lock(&self.poisoned) {
            Some(cause) => Err(Error::Poisoned {
                tp: self.tp.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses writes from now on, naming `cause`.
    pub(crate) fn poison(&self, cause: &str) {
        lock(&self.poisoned).get_or_insert_with(|| cause.to_owned());
    }

    /// Tells readers waiting for new records that none will come.
    /// Its folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn close_readers(&self) {
        self.published.send_modify(|p| p.closed = true);
    }

    /// Log start and high-water mark.
    pub(crate) fn offsets(&self) -> Offsets {
        let segs = read(&self.segments);
        Offsets {
            log_start: segs.first().map_or(0, |s| s.base_offset),
            high_water_mark: self.published.borrow().hwm,
            size_bytes: segs.iter().map(|s| s.size).sum(),
        }
    }

    /// Waits until the high-water mark passes `offset`; returns the mark.
    pub(crate) async fn wait_for(&self, offset: u64) -> Result<u64> {
        let mut rx = self.published.subscribe();
        let p = *rx
            .wait_for(|p| p.hwm > offset || p.closed)
            .await
            .map_err(|_| Error::Closed)?;
        if p.hwm > offset {
            Ok(p.hwm)
        } else {
            Err(Error::Closed)
        }
    }

    /// Reads records from `from` within `budget`. Blocking (file reads).
    pub(crate) fn read(&self, from: u64, budget: ReadBudget) -> Result<Vec<StoredRecord>> {
        if let Some(d) = crate::failpoint::delay(&self.fault_read) {
            std::thread::sleep(d);
        }
        let hwm = self.published.borrow().hwm;
        let out_of_range = |start| Error::OffsetOutOfRange {
            tp: self.tp.clone(),
            offset: from,
            start,
            end: hwm,
        };
        let start = read(&self.segments).first().map_or(0, |s| s.base_offset);
        if from < start || from > hwm {
            return Err(out_of_range(start));
        }
        let mut out = Vec::new();
        let mut used = 0;
        let mut offset = from;
        while offset < hwm && out.len() < budget.max_records && used < budget.max_bytes {
            let (file, path, size, position, seg_next) = {
                let segs = read(&self.segments);
                let i = segs.partition_point(|s| s.base_offset <= offset);
                let Some(s) = i.checked_sub(1).map(|i| &segs[i]) else {
                    // Retention removed the segment since the check above.
                    return Err(out_of_range(segs.first().map_or(0, |s| s.base_offset)));
                };
                let position = s.index.lookup(offset - s.base_offset);
                (
                    s.file.clone(),
                    s.path.clone(),
                    s.size,
                    position,
                    s.next_offset,
                )
            };
            let before = out.len();
            used = segment::read_records(
                &*file, &path, size, position, offset, hwm, budget, &mut out, used,
            )?;
            if let Some(last) = out.last().filter(|_| out.len() > before) {
                offset = last.offset + 1;
            }
            if offset < seg_next.min(hwm) {
                break; // budget reached inside this segment
            }
            if offset < hwm && offset != seg_next {
                return Err(Error::Corrupt {
                    file: path,
                    position,
                    reason: format!("segment ends at offset {offset}, expected {seg_next}"),
                });
            }
        }
        Ok(out)
    }

    /// Deletes whole sealed segments, oldest first, while `drop` says so
    /// (given the segment and the partition's total size). Returns the new
    /// log start.
    fn drop_oldest_while(
        &self,
        mut drop: impl FnMut(&Segment, u64) -> bool,
    ) -> Result<(u64, usize)> {
        let _one_at_a_time = lock(&self.deleting);
        let removed: Vec<Segment> = {
            let mut segs = write(&self.segments);
            let mut total: u64 = segs.iter().map(|s| s.size).sum();
            let mut n = 0;
            while n + 1 < segs.len() && drop(&segs[n], total) {
                total -= segs[n].size;
                n += 1;
            }
            segs.drain(..n).collect()
        };
        for s in &removed {
            self.fs
                .remove_file(&s.path)
                .map_err(Error::io("delete", &s.path))?;
            let idx = segment::index_path(&self.dir, s.base_offset);
            match self.fs.remove_file(&idx) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io("delete", idx)(e));
                }
                _ => {}
            }
        }
        if !removed.is_empty() {
            sync_dir(&*self.fs, &self.dir)?;
            tracing::info!(partition = %self.tp, segments = removed.len(), "deleted old segments");
        }
        Ok((self.offsets().log_start, removed.len()))
    }

    /// Deletes sealed segments wholly below `offset`; returns the log start.
    pub(crate) fn truncate_before(&self, offset: u64) -> Result<u64> {
        Ok(self.drop_oldest_while(|s, _| s.next_offset <= offset)?.0)
    }

    /// Applies retention limits as of `now_ms`; returns segments deleted.
    pub(crate) fn enforce_retention(&self, retention: Retention, now_ms: i64) -> Result<usize> {
        let cutoff = retention
            .max_age
            .map(|age| now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX)));
        Ok(self
            .drop_oldest_while(|s, total| {
                let too_old = cutoff.is_some_and(|c| s.max_timestamp < c);
                let too_big = retention.max_bytes.is_some_and(|m| total - s.size >= m);
                too_old || too_big
            })?
            .1)
    }

    /// Writes `buf` at the end of the active segment.
    pub(crate) fn write_out(&self, st: &mut WriterState, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if crate::failpoint::error(&self.fault_write) {
            return Err(Error::io("write", &st.path)(std::io::Error::other(
                "injected by failpoint",
            )));
        }
        st.file
            .write_all_at(buf, st.size)
            .map_err(Error::io("write", &st.path))?;
        st.size += buf.len() as u64;
        st.dirty = true;
        Ok(())
    }

    /// Cuts the active segment back to `size` (what a failed group had
    /// not yet written there) and syncs it.
    pub(crate) fn cut_back(&self, st: &mut WriterState, size: u64) {
        match st.file.set_len(size).and_then(|()| st.file.sync_all()) {
            Ok(()) => st.size = size.min(st.size),
            Err(e) => tracing::error!(partition = %self.tp, error = %e,
                "cannot cut the failed group off; recovery at restart decides"),
        }
    }

    /// Hands what the writer wrote to the active segment over to readers,
    /// and moves the high-water mark.
    pub(crate) fn publish(&self, st: &mut WriterState) {
        {
            let mut segs = write(&self.segments);
            let active = segs.last_mut().expect("a partition always has a segment");
            active.size = st.size;
            active.next_offset = st.next_offset;
            active.max_timestamp = st.max_timestamp;
            active.index.extend(st.index.take_entries());
        }
        self.published.send_modify(|p| p.hwm = st.next_offset);
    }

    /// Writes the active segment's index file (at a clean close), so that
    /// the next open need not scan the segment. Its folder is not synced:
    /// an index file that did not last, or no longer matches the segment,
    /// is ignored.
    pub(crate) fn write_active_index(&self, st: &mut WriterState) -> Result<()> {
        self.publish(st);
        read(&self.segments)
            .last()
            .expect("a partition always has a segment")
            .write_index(&*self.fs, &self.dir)
    }

    /// Seals the active segment (index written) and starts a new one. The
    /// sealed file is not synced here: its unsynced bytes are in the
    /// journal, which is not deleted before the next checkpoint syncs the
    /// file returned (a sealed segment shorter after a crash than its index
    /// says, or than the segment after it expects, would stop the log from
    /// opening; the journal's redo makes it whole first).
    pub(crate) fn roll(&self, st: &mut WriterState) -> Result<Option<(Arc<dyn VFile>, PathBuf)>> {
        let unsynced = st.dirty.then(|| (st.file.clone(), st.path.clone()));
        self.publish(st);
        read(&self.segments)
            .last()
            .expect("a partition always has a segment")
            .write_index(&*self.fs, &self.dir)?;
        let seg = Segment::create(&*self.fs, &self.dir, st.next_offset)?;
        sync_dir(&*self.fs, &self.dir)?;
        *st = WriterState::of(&seg);
        write(&self.segments).push(seg);
        Ok(unsynced)
    }
}

/// Opens every segment in `dir` (creating the first if there is none),
/// truncating a torn tail and refusing other damage unless `repair`. The
/// active segment's index is trusted only after a `clean` close; damage
/// past what the journal `vouched` for is a torn tail.
fn recover(
    fs: &dyn Vfs,
    tp: &TopicPartition,
    dir: &Path,
    config: &LogConfig,
    vouched: Vouched,
    clean: bool,
) -> Result<Vec<Segment>> {
    let mut bases = Vec::new();
    for (name, _) in fs.list(dir).map_err(Error::io("list", dir))? {
        if let Some(base) = segment::parse_log_name(&name) {
            bases.push(base);
        } else if name.ends_with(".index.tmp") {
            let _ = fs.remove_file(&dir.join(&name));
        }
    }
    bases.sort_unstable();
    if bases.is_empty() {
        let seg = Segment::create(fs, dir, 0)?;
        sync_dir(fs, dir)?;
        return Ok(vec![seg]);
    }
    let mut segments: Vec<Segment> = Vec::with_capacity(bases.len());
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let (seg, stop) = Segment::open(
            fs,
            dir,
            base,
            !last || clean,
            last,
            config.index_interval_bytes,
        )?;
        let gap = segments
            .last()
            .map(|p| p.next_offset)
            .filter(|&n| n != base);
        let stop = match gap {
            Some(prev_next) => Some(Stop {
                position: 0,
                reason: format!(
                    "segment starts at offset {base}, the previous one ends at {prev_next}"
                ),
                torn: false,
                valid_after: true,
            }),
            None => stop.map(|mut s| {
                // Past what the journal vouches for, nothing was synced.
                let unvouched = match vouched {
                    Vouched::Unknown => false,
                    Vouched::Upto { base: b, end } => {
                        last && b.is_none_or(|b| b == base) && s.position >= end
                    }
                };
                s.torn |= unvouched;
                s
            }),
        };
        let Some(Stop {
            position,
            reason,
            torn,
            valid_after,
        }) = stop
        else {
            segments.push(seg);
            continue;
        };
        if !(config.repair || torn && last) {
            return Err(Error::Corrupt {
                file: seg.path,
                position,
                reason,
            });
        }
        let later = &bases[i + 1..];
        tracing::warn!(
            partition = %tp, file = %seg.path.display(), position, %reason,
            dropped_segments = later.len() + usize::from(gap.is_some()),
            "truncating log at the first bad batch"
        );
        let doomed = if gap.is_some() { &bases[i..] } else { later };
        for &b in doomed {
            for p in [segment::log_path(dir, b), segment::index_path(dir, b)] {
                match fs.remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("delete", p)(e));
                    }
                    _ => {}
                }
            }
        }
        if gap.is_none() {
            if valid_after {
                let kept = seg.keep_what_follows(fs, dir)?;
                tracing::warn!(partition = %tp, file = %kept.display(),
                    "valid batches followed the damage: the bytes cut off are kept in this file");
            }
            seg.truncate_to_valid()?;
            segments.push(seg);
        }
        break;
    }
    // After a crash of the process alone, the page cache may still hold
    // bytes and folder entries it never synced: readable now, lost at the
    // next power cut. Sync them before anything is read or acknowledged.
    if let Some(last) = segments.last() {
        last.file
            .sync_data()
            .map_err(Error::io("fdatasync", &last.path))?;
    }
    sync_dir(fs, dir)?;
    Ok(segments)
}
