//! One partition: its segments, the writer that group-commits appends, and
//! reads bounded by the high-water mark.
//!
//! Durability contract (fsync `always`): an append is acknowledged only after
//! the bytes of its batch, and of every batch before it, were written and
//! `fdatasync`ed; a new segment file is created only after the previous one
//! was synced and its folder entry is synced before anything in it is
//! acknowledged. Readers see offsets below the high-water mark only, and the
//! mark moves only after that sync, so nothing read can later be lost.
//! Opening syncs the newest segment and the folder before anything is read:
//! a process that crashed while the machine stayed up leaves unsynced bytes
//! and entries in the page cache, readable but not yet durable.
//!
//! Group commit: appends queue on a bounded channel to the partition's one
//! writer task. The writer takes everything queued (up to
//! `max_group_bytes`), encodes it as consecutive batches, writes them with
//! one `pwrite`, syncs once, and acknowledges them all. While it syncs, the
//! next group gathers. The writer is a thread of its own, so its blocking
//! file I/O never stalls the async runtime. A *relaxed* append is
//! acknowledged once written and readable, before any sync: it becomes
//! durable with the next sync of the partition (a later synced append or an
//! explicit sync), for records a crash may lose; with
//! `relaxed_sync_within` set, a tick syncs them within that bound even when
//! nothing else does. A failed write or sync poisons the partition: it
//! refuses writes from then on and never pretends the data is safe; its
//! active file is cut back to the last synced length, and the log's
//! `failed` signal tells the process to stop (after a failed fsync the
//! kernel may have dropped the dirty pages: retrying it could "succeed"
//! over lost data).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::batch::{self, HEADER_LEN};
use crate::config::{FsyncPolicy, LogConfig, Retention};
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

struct AppendRequest {
    records: Vec<Record>,
    bytes: usize,
    /// Acknowledge only once synced (fsync `always`); else once written.
    sync: bool,
    reply: oneshot::Sender<Result<AppendAck>>,
}

enum Msg {
    Append(AppendRequest),
    /// Sync what was written: on the fsync interval (no reply), or because
    /// a caller asked (reply once durable).
    Sync(Option<oneshot::Sender<Result<()>>>),
    Close,
}

/// The writer's own view of the active segment.
struct WriterState {
    base_offset: u64,
    file: Arc<dyn VFile>,
    path: PathBuf,
    size: u64,
    next_offset: u64,
    max_timestamp: i64,
    /// Index entries not yet handed to readers.
    index: SparseIndex,
    last_sync: Instant,
    dirty: bool,
    /// Bytes of the active file known to be on disk (last sync).
    synced_size: u64,
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
            last_sync: Instant::now(),
            dirty: false,
            synced_size: seg.size,
        }
    }
}

/// One partition of the embedded log.
pub(crate) struct Partition {
    tp: TopicPartition,
    fs: Arc<dyn Vfs>,
    dir: PathBuf,
    config: Arc<LogConfig>,
    segments: RwLock<Vec<Segment>>,
    published: watch::Sender<Published>,
    queue: mpsc::Sender<Msg>,
    poisoned: Mutex<Option<String>>,
    /// Held while old segments are deleted: one deletion at a time, so that
    /// files go oldest first whatever the callers (retention, truncation).
    /// Two at once could each delete and sync a later segment's file before
    /// the other deleted an earlier one: a power cut in between would leave
    /// a gap in the log, which then refuses to open.
    deleting: Mutex<()>,
    /// Resolves when the writer thread has stopped.
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
    /// Sends [`Msg::Sync`] on the fsync interval.
    ticker: Mutex<Option<JoinHandle<()>>>,
    /// Set when the log is dropped without `close`: the writer stops once
    /// the queue is empty.
    stopping: AtomicBool,
    /// `fdatasync` calls made so far.
    syncs: AtomicU64,
    /// The log's failure signal (see `EmbeddedLog::failed`).
    failed: Arc<watch::Sender<Option<String>>>,
    /// Fault point names of this partition.
    fault_write: String,
    fault_sync: String,
    fault_read: String,
}

impl Partition {
    /// Opens (recovering its tail) or creates the partition stored in `dir`,
    /// and starts its writer. Blocking: call from a blocking context inside a
    /// Tokio runtime.
    pub(crate) fn open(
        fs: Arc<dyn Vfs>,
        tp: TopicPartition,
        dir: PathBuf,
        config: Arc<LogConfig>,
        failed: Arc<watch::Sender<Option<String>>>,
    ) -> Result<Arc<Partition>> {
        let segments = recover(&*fs, &tp, &dir, &config)?;
        let active = segments
            .last()
            .expect("recover leaves at least one segment");
        let state = WriterState::of(active);
        let (published, _) = watch::channel(Published {
            hwm: state.next_offset,
            closed: false,
        });
        let (queue, rx) = mpsc::channel(config.append_queue);
        let p = Arc::new(Partition {
            fault_write: format!("storage.write:{tp}"),
            fault_sync: format!("storage.fdatasync:{tp}"),
            fault_read: format!("storage.read:{tp}"),
            failed,
            fs,
            tp,
            dir,
            config,
            segments: RwLock::new(segments),
            published,
            queue,
            poisoned: Mutex::new(None),
            deleting: Mutex::new(()),
            writer_done: Mutex::new(None),
            ticker: Mutex::new(None),
            stopping: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
        });
        let (done_tx, done_rx) = oneshot::channel();
        let writer = p.clone();
        std::thread::Builder::new()
            .name(format!("log-writer {}", p.tp))
            .spawn(move || {
                writer.run_writer(rx, state);
                let _ = done_tx.send(());
            })
            .map_err(Error::io("start writer thread for", &p.dir))?;
        *lock(&p.writer_done) = Some(done_rx);
        let tick = match p.config.fsync {
            FsyncPolicy::Interval(d) => Some(d),
            FsyncPolicy::Always => p.config.relaxed_sync_within,
            FsyncPolicy::Never => None,
        };
        if let Some(d) = tick {
            let queue = p.queue.clone();
            *lock(&p.ticker) = Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(d);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                    if queue.send(Msg::Sync(None)).await.is_err() {
                        break;
                    }
                }
            }));
        }
        Ok(p)
    }

    /// Appends one batch; resolves once it is acknowledged per the fsync
    /// policy.
    pub(crate) async fn append(&self, records: Vec<Record>, sync: bool) -> Result<AppendAck> {
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
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(Msg::Append(AppendRequest {
                records,
                bytes,
                sync,
                reply,
            }))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Makes everything written so far durable (per the fsync policy:
    /// nothing is forced under `never`).
    pub(crate) async fn sync_now(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(Msg::Sync(Some(reply)))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    fn check_poisoned(&self) -> Result<()> {
        match &*lock(&self.poisoned) {
            Some(cause) => Err(Error::Poisoned {
                tp: self.tp.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
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

    /// Lets queued appends finish, syncs, and stops the writer.
    /// Asks the writer to stop once its queue is empty, without waiting.
    pub(crate) fn stop(&self) {
        if let Some(t) = lock(&self.ticker).take() {
            t.abort();
        }
        self.stopping.store(true, Ordering::Release);
        let _ = self.queue.try_send(Msg::Close);
    }

    pub(crate) async fn close(&self) {
        if let Some(t) = lock(&self.ticker).take() {
            t.abort();
        }
        let _ = self.queue.send(Msg::Close).await;
        let done = lock(&self.writer_done).take();
        if let Some(done) = done {
            let _ = done.await;
        }
    }

    /// The writer: one thread per partition doing blocking file I/O, fed by
    /// the append queue.
    fn run_writer(self: Arc<Self>, mut rx: mpsc::Receiver<Msg>, mut st: WriterState) {
        while let Some(msg) = rx.blocking_recv() {
            let mut group = Vec::new();
            let mut closing = false;
            let mut sync_waiters = Vec::new();
            let mut tick = false;
            match msg {
                Msg::Append(r) => group.push(r),
                Msg::Sync(Some(w)) => sync_waiters.push(w),
                Msg::Sync(None) => tick = true,
                Msg::Close => closing = true,
            }
            let mut bytes = group.first().map_or(0, |r| r.bytes);
            while !closing && bytes < self.config.max_group_bytes {
                match rx.try_recv() {
                    Ok(Msg::Append(r)) => {
                        bytes += r.bytes;
                        group.push(r);
                    }
                    Ok(Msg::Sync(Some(w))) => sync_waiters.push(w),
                    Ok(Msg::Sync(None)) => tick = true,
                    Ok(Msg::Close) => closing = true,
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.write_group(&mut st, group);
            }
            let interval_due = tick
                && match self.config.fsync {
                    FsyncPolicy::Interval(d) => st.last_sync.elapsed() >= d,
                    // Only relaxed appends leave the file dirty: bound how
                    // long they stay unsynced.
                    FsyncPolicy::Always => true,
                    FsyncPolicy::Never => false,
                };
            let flush = closing || interval_due || !sync_waiters.is_empty();
            if flush
                && st.dirty
                && self.config.fsync != FsyncPolicy::Never
                && let Err(e) = self.sync(&mut st)
            {
                self.fail(&mut st, &e);
            }
            for w in sync_waiters {
                let _ = w.send(self.check_poisoned());
            }
            if closing || (self.stopping.load(Ordering::Acquire) && rx.is_empty()) {
                if !closing && st.dirty && self.config.fsync != FsyncPolicy::Never {
                    let _ = self.sync(&mut st);
                }
                break;
            }
        }
        self.published.send_modify(|p| p.closed = true);
    }

    /// A write or sync failed: the partition refuses writes from now on,
    /// its active file is cut back to what the last sync made durable (so
    /// that bytes nobody was told are safe cannot come back after a restart
    /// as if they were), and the log's owner is told to stop.
    fn fail(&self, st: &mut WriterState, e: &Error) {
        tracing::error!(partition = %self.tp, error = %e,
            "log write or fdatasync failed; partition stops accepting writes");
        lock(&self.poisoned).get_or_insert_with(|| e.to_string());
        // Always: a failed write may have left part of its bytes past
        // `size`.
        {
            let cut = st
                .file
                .set_len(st.synced_size)
                .and_then(|()| st.file.sync_all());
            match cut {
                Ok(()) => {
                    tracing::warn!(partition = %self.tp, file = %st.path.display(), kept = st.synced_size,
                        dropped = st.size.saturating_sub(st.synced_size), "unsynced bytes cut off");
                    st.size = st.synced_size;
                    // nothing unsynced is left: no further sync (which
                    // would fail again) is attempted on close or tick
                    st.dirty = false;
                }
                Err(c) => tracing::error!(partition = %self.tp, error = %c,
                    "cannot cut the unsynced bytes off; recovery at restart decides"),
            }
        }
        let cause = format!("{}: {e}", self.tp);
        self.failed.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(cause);
                true
            } else {
                false
            }
        });
    }

    /// Writes a group, acknowledging it in parts: the appends before a
    /// segment roll are acknowledged once synced, before anything goes into
    /// the new segment, so a failure there never reports as failed an append
    /// that is durable (and would come back after a restart).
    fn write_group(&self, st: &mut WriterState, group: Vec<AppendRequest>) {
        let mut group = group;
        while !group.is_empty() {
            let result = self
                .check_poisoned()
                .and_then(|()| self.try_write_group(st, &group));
            let (acks, done) = match result {
                Ok(r) => r,
                Err(e) => return self.refuse(st, group, e),
            };
            let rest = group.split_off(done);
            for (req, ack) in group.into_iter().zip(acks) {
                let _ = req.reply.send(Ok(ack));
            }
            group = rest;
        }
    }

    /// Answers every append of `group` with the failure `e` (after
    /// failing the partition, unless it already was).
    fn refuse(&self, st: &mut WriterState, group: Vec<AppendRequest>, e: Error) {
        if !matches!(e, Error::Poisoned { .. }) {
            self.fail(st, &e);
        }
        let cause = lock(&self.poisoned)
            .clone()
            .unwrap_or_else(|| e.to_string());
        for req in group {
            let _ = req.reply.send(Err(Error::Poisoned {
                tp: self.tp.clone(),
                cause: cause.clone(),
            }));
        }
    }

    /// Writes the appends of `group` that fit before the next segment roll
    /// (all of them if none is needed; at least one); returns their acks
    /// and how many were written.
    fn try_write_group(
        &self,
        st: &mut WriterState,
        group: &[AppendRequest],
    ) -> Result<(Vec<AppendAck>, usize)> {
        let cfg = &self.config;
        let mut buf = Vec::with_capacity(
            group
                .iter()
                .map(|r| r.bytes)
                .sum::<usize>()
                .min(cfg.max_group_bytes * 2),
        );
        let mut acks = Vec::with_capacity(group.len());
        for req in group {
            let pos = st.size + buf.len() as u64;
            if pos > 0 && pos + req.bytes as u64 > cfg.segment_bytes {
                if !acks.is_empty() {
                    // acknowledge what is before the roll first
                    break;
                }
                self.write_out(st, &mut buf)?;
                self.roll(st)?;
            }
            let pos = st.size + buf.len() as u64;
            let h = batch::encode(st.next_offset, &req.records, &mut buf);
            let rel = (st.next_offset - st.base_offset) as u32;
            st.index
                .on_batch(rel, pos, h.total_len, cfg.index_interval_bytes);
            st.max_timestamp = st.max_timestamp.max(h.max_timestamp);
            acks.push(AppendAck {
                base_offset: h.base_offset,
                last_offset: h.next_offset() - 1,
            });
            st.next_offset = h.next_offset();
        }
        self.write_out(st, &mut buf)?;
        let done = acks.len();
        let due = match cfg.fsync {
            FsyncPolicy::Always => group[..done].iter().any(|r| r.sync),
            FsyncPolicy::Interval(d) => st.last_sync.elapsed() >= d,
            FsyncPolicy::Never => false,
        };
        if due {
            self.sync(st)?;
        }
        self.publish(st);
        self.published.send_modify(|p| p.hwm = st.next_offset);
        Ok((acks, done))
    }

    fn write_out(&self, st: &mut WriterState, buf: &mut Vec<u8>) -> Result<()> {
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
        buf.clear();
        Ok(())
    }

    /// `fdatasync` calls this partition made.
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn sync(&self, st: &mut WriterState) -> Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if crate::failpoint::error(&self.fault_sync) {
            return Err(Error::io("fdatasync", &st.path)(std::io::Error::other(
                "injected by failpoint",
            )));
        }
        st.file
            .sync_data()
            .map_err(Error::io("fdatasync", &st.path))?;
        st.last_sync = Instant::now();
        st.dirty = false;
        st.synced_size = st.size;
        Ok(())
    }

    /// Hands what the writer wrote to the active segment over to readers.
    fn publish(&self, st: &mut WriterState) {
        let mut segs = write(&self.segments);
        let active = segs.last_mut().expect("a partition always has a segment");
        active.size = st.size;
        active.next_offset = st.next_offset;
        active.max_timestamp = st.max_timestamp;
        active.index.extend(st.index.take_entries());
    }

    /// Seals the active segment (synced, index written) and starts a new one.
    /// Synced under every policy: a sealed segment shorter after a crash
    /// than its index says, or than the segment after it expects, would
    /// stop the log from opening.
    fn roll(&self, st: &mut WriterState) -> Result<()> {
        self.sync(st)?;
        self.publish(st);
        read(&self.segments)
            .last()
            .expect("a partition always has a segment")
            .write_index(&*self.fs, &self.dir)?;
        let seg = Segment::create(&*self.fs, &self.dir, st.next_offset)?;
        sync_dir(&*self.fs, &self.dir)?;
        let mut next = WriterState::of(&seg);
        next.last_sync = st.last_sync;
        *st = next;
        write(&self.segments).push(seg);
        Ok(())
    }
}

/// Opens every segment in `dir` (creating the first if there is none),
/// truncating a torn tail and refusing other damage unless `repair`.
fn recover(
    fs: &dyn Vfs,
    tp: &TopicPartition,
    dir: &Path,
    config: &LogConfig,
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
        let (seg, stop) = Segment::open(fs, dir, base, !last, config.index_interval_bytes)?;
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
            None => stop,
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
