//! The log's one writer: a thread that takes the appends of every
//! partition from one queue, journals each group with one write and (for
//! synced appends) one `fdatasync`, then writes each batch to its
//! partition's segment file and acknowledges the group. While it syncs,
//! the next group gathers. Its blocking file I/O never stalls the async
//! runtime, and the number of threads does not grow with partitions.
//!
//! A *relaxed* append is acknowledged once written and readable, before
//! any sync: it becomes durable with the next sync of the journal (a later
//! synced append or an explicit sync); with `relaxed_sync_within` set, a
//! tick syncs within that bound even when nothing else does.
//!
//! A failed write or sync fails the whole log: the journal and the
//! segments the group touched are cut back to where the group began,
//! every partition refuses writes from then on, and the log's `failed`
//! signal tells the owner to stop.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{FsyncPolicy, LogConfig};
use crate::error::{Error, Result};
use crate::journal::{self, Active, JournalFile};
use crate::partition::{AppendRequest, Partition, WriterState};
use crate::vfs::Vfs;

/// What the writer is asked to do.
pub(crate) enum Job {
    /// A partition (new, or opened) whose appends will follow.
    Register(Arc<Partition>, WriterState),
    Append(u64, AppendRequest),
    /// Sync what was written: on the fsync interval (no reply), or because
    /// a caller asked (reply once durable, as seen from that partition).
    Sync(Option<(u64, oneshot::Sender<Result<()>>)>),
    /// Sync what was written, and say when done.
    Flush(oneshot::Sender<()>),
    Close,
}

/// The handle the logs sharing a writer keep on it.
pub(crate) struct Writer {
    pub(crate) queue: mpsc::Sender<Job>,
    /// Number for the next partition registered.
    pub(crate) next_id: AtomicU64,
    /// Logs of the group not yet closed: the last one stops the writer.
    pub(crate) open_logs: std::sync::atomic::AtomicUsize,
    done: Mutex<Option<oneshot::Receiver<()>>>,
    ticker: Mutex<Option<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    syncs: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Writer {
    /// Starts the writer on `journal` (in folder `root`) for a group of
    /// logs with these settings (the first one's journal and group
    /// settings apply to all), with the partitions opened so far. Must run
    /// inside a Tokio runtime.
    pub(crate) fn start(
        fs: Arc<dyn Vfs>,
        root: PathBuf,
        configs: &[Arc<LogConfig>],
        journal: JournalFile,
        partitions: Vec<(Arc<Partition>, WriterState)>,
        failed: Arc<watch::Sender<Option<String>>>,
        lock: Option<Box<dyn Send>>,
    ) -> Result<Writer> {
        let config = configs[0].clone();
        let next_id = AtomicU64::new(partitions.len() as u64);
        let (queue, rx) = mpsc::channel(config.append_queue);
        let stopping = Arc::new(AtomicBool::new(false));
        let syncs = Arc::new(AtomicU64::new(0));
        let run = Run {
            slots: partitions
                .into_iter()
                .map(|(p, st)| (p.id, Slot { part: p, st }))
                .collect(),
            fs,
            root: root.clone(),
            config: config.clone(),
            journal,
            failed: None,
            failed_signal: failed,
            stopping: stopping.clone(),
            syncs: syncs.clone(),
        };
        let (done_tx, done_rx) = oneshot::channel();
        let name = root
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        std::thread::Builder::new()
            .name(format!("log-writer {name}"))
            .spawn(move || {
                run.run(rx);
                // the folder is free for the next open once all is written
                drop(lock);
                let _ = done_tx.send(());
            })
            .map_err(Error::io("start writer thread for", &root))?;
        let tick = configs
            .iter()
            .filter_map(|c| match c.fsync {
                FsyncPolicy::Interval(d) => Some(d),
                FsyncPolicy::Always => c.relaxed_sync_within,
                FsyncPolicy::Never => None,
            })
            .min();
        let ticker = tick.map(|d| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(d);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                    if queue.send(Job::Sync(None)).await.is_err() {
                        break;
                    }
                }
            })
        });
        Ok(Writer {
            queue,
            next_id,
            open_logs: std::sync::atomic::AtomicUsize::new(configs.len()),
            done: Mutex::new(Some(done_rx)),
            ticker: Mutex::new(ticker),
            stopping,
            syncs,
        })
    }

    /// `fdatasync` calls made so far (journal and segment files).
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Asks the writer to stop once its queue is empty, without waiting.
    pub(crate) fn stop(&self) {
        if let Some(t) = lock(&self.ticker).take() {
            t.abort();
        }
        self.stopping.store(true, Ordering::Release);
        let _ = self.queue.try_send(Job::Close);
    }

    /// Lets queued appends finish, checkpoints, and stops the writer.
    pub(crate) async fn close(&self) {
        if let Some(t) = lock(&self.ticker).take() {
            t.abort();
        }
        let _ = self.queue.send(Job::Close).await;
        let done = lock(&self.done).take();
        if let Some(done) = done {
            let _ = done.await;
        }
    }
}

struct Slot {
    part: Arc<Partition>,
    st: WriterState,
}

/// What one pass writes to one partition.
struct Share {
    id: u64,
    /// The batches, encoded one after the other.
    buf: Vec<u8>,
    /// The active segment's size before them (where a failure cuts back).
    size_before: u64,
    /// Each batch's segment, position in it, and start in `buf`.
    batches: Vec<(u64, u64, usize)>,
}

/// The writer thread's state.
struct Run {
    slots: HashMap<u64, Slot>,
    fs: Arc<dyn Vfs>,
    root: PathBuf,
    config: Arc<LogConfig>,
    journal: JournalFile,
    /// Set once a write or sync failed: nothing is written from then on.
    failed: Option<String>,
    failed_signal: Arc<watch::Sender<Option<String>>>,
    stopping: Arc<AtomicBool>,
    syncs: Arc<AtomicU64>,
}

impl Run {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.blocking_recv() {
            let mut group = Vec::new();
            let mut bytes = 0;
            let mut waiters = Vec::new();
            let mut flushes = Vec::new();
            let mut tick = false;
            let mut closing = false;
            let mut next = Some(job);
            while let Some(job) = next.take() {
                match job {
                    Job::Register(p, st) => {
                        self.slots.insert(p.id, Slot { part: p, st });
                    }
                    Job::Append(id, r) => {
                        bytes += r.bytes;
                        group.push((id, r));
                    }
                    Job::Sync(Some(w)) => waiters.push(w),
                    Job::Sync(None) => tick = true,
                    Job::Flush(w) => flushes.push(w),
                    Job::Close => closing = true,
                }
                if !closing && bytes < self.config.max_group_bytes {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.write_group(group);
            }
            // The tick comes at the shortest interval of the group's logs
            // (or bound on relaxed appends); a log that never syncs asks
            // for none but is synced with the others.
            if (tick || !waiters.is_empty() || !flushes.is_empty())
                && self.failed.is_none()
                && let Err(e) = self.sync_journal(&[])
            {
                self.fail(&e);
            }
            for w in flushes {
                let _ = w.send(());
            }
            for (id, w) in waiters {
                let answer = match self.slots.get(&id) {
                    Some(s) => s.part.check_poisoned(),
                    None => Err(Error::Closed),
                };
                let _ = w.send(answer);
            }
            if closing || (self.stopping.load(Ordering::Acquire) && rx.is_empty()) {
                break;
            }
        }
        if self.failed.is_none()
            && let Err(e) = self.checkpoint(true)
        {
            tracing::error!(error = %e, "the log's closing checkpoint failed; the next open redoes the journal");
        }
        for s in self.slots.values() {
            s.part.close_readers();
        }
    }

    /// Journals and writes a group of appends, in passes: an append that
    /// needs its partition's segment rolled after others of the same
    /// partition in this pass waits for the next pass, so that a segment is
    /// sealed only with everything before the roll written.
    fn write_group(&mut self, mut pending: Vec<(u64, AppendRequest)>) {
        while !pending.is_empty() {
            let mut shares: Vec<Share> = Vec::new();
            let mut share_of: HashMap<u64, usize> = HashMap::new();
            let mut done = Vec::new();
            let mut deferred = Vec::new();
            let mut blocked = HashSet::new();
            let mut want_sync = false;
            for (id, req) in pending {
                let Some(slot) = self.slots.get_mut(&id) else {
                    let _ = req.reply.send(Err(Error::Closed));
                    continue;
                };
                if let Some(cause) = &self.failed {
                    let _ = req.reply.send(Err(Error::Poisoned {
                        tp: slot.part.tp.clone(),
                        cause: cause.clone(),
                    }));
                    continue;
                }
                if blocked.contains(&id) {
                    deferred.push((id, req));
                    continue;
                }
                let i = *share_of.entry(id).or_insert_with(|| {
                    shares.push(Share {
                        id,
                        buf: Vec::new(),
                        size_before: slot.st.size,
                        batches: Vec::new(),
                    });
                    shares.len() - 1
                });
                let share = &mut shares[i];
                let end = slot.st.size + share.buf.len() as u64;
                if end > 0 && end + req.bytes as u64 > slot.part.config.segment_bytes {
                    if !share.buf.is_empty() {
                        blocked.insert(id);
                        deferred.push((id, req));
                        continue;
                    }
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = slot.part.roll(&mut slot.st) {
                        let tp = slot.part.tp.clone();
                        self.fail(&e);
                        let _ = req.reply.send(Err(Error::Poisoned {
                            tp,
                            cause: e.to_string(),
                        }));
                        continue;
                    }
                    share.size_before = slot.st.size;
                }
                let start = share.buf.len();
                let interval = slot.part.config.index_interval_bytes;
                let (pos, ack) = slot.st.encode(&req.records, &mut share.buf, interval);
                share.batches.push((slot.st.base_offset, pos, start));
                want_sync |= req.sync;
                done.push((id, req, ack));
            }
            match self.write_pass(&shares, want_sync) {
                Ok(()) => {
                    for (_, req, ack) in done {
                        let _ = req.reply.send(Ok(ack));
                    }
                }
                Err(e) => {
                    self.fail(&e);
                    for sh in &shares {
                        if let Some(s) = self.slots.get_mut(&sh.id) {
                            s.part.cut_back(&mut s.st, sh.size_before);
                        }
                    }
                    let cause = self.failed.clone().unwrap_or_else(|| e.to_string());
                    for (id, req, _) in done {
                        let tp = self.slots[&id].part.tp.clone();
                        let _ = req.reply.send(Err(Error::Poisoned {
                            tp,
                            cause: cause.clone(),
                        }));
                    }
                }
            }
            pending = deferred;
        }
        if self.failed.is_none()
            && self.journal.size >= self.config.journal_bytes
            && let Err(e) = self.checkpoint(false)
        {
            self.fail(&e);
        }
    }

    /// Writes one pass. Small shares go to the journal (one write, synced if
    /// due) and then to their segments; a share of at least
    /// `direct_write_bytes` is written to its segment and that file synced
    /// instead, since journaling would write its bytes twice. Then the pass
    /// is handed to readers.
    fn write_pass(&mut self, shares: &[Share], want_sync: bool) -> Result<()> {
        // (a log whose policy is not `always` never asks to sync an append)
        let due = want_sync;
        // Only a share synced now may skip the journal: an unsynced one
        // must become durable with the journal's next sync.
        let limit = self.config.direct_write_bytes;
        let direct = move |sh: &Share| due && sh.buf.len() >= limit;
        let mut journal = Vec::new();
        let mut journaled = Vec::new();
        for sh in shares {
            let dir = &self.slots[&sh.id].part.jdir;
            if direct(sh) {
                // vouches for the bytes synced in place (see `journal`)
                if let Some(&(base, pos, start)) = sh.batches.last() {
                    let end = pos + (sh.buf.len() - start) as u64;
                    journal::encode_synced(dir, base, end, &mut journal);
                }
                continue;
            }
            for (i, &(base, pos, start)) in sh.batches.iter().enumerate() {
                let end = sh.batches.get(i + 1).map_or(sh.buf.len(), |b| b.2);
                journal::encode_batch(dir, base, pos, &sh.buf[start..end], &mut journal);
            }
            journaled.push(sh.id);
        }
        let at = self.journal.size;
        if !journal.is_empty() {
            let written = self
                .journal
                .file
                .write_all_at(&journal, at)
                .map_err(Error::io("write", &self.journal.path));
            if let Err(e) = written {
                self.cut_journal(at);
                return Err(e);
            }
            self.journal.size += journal.len() as u64;
            // (markers of direct writes alone need no sync: losing one only
            // vouches for less)
            self.journal.dirty |= !journaled.is_empty();
            if due && let Err(e) = self.sync_journal(&journaled) {
                self.cut_journal(at);
                return Err(e);
            }
        }
        for sh in shares {
            let s = self
                .slots
                .get_mut(&sh.id)
                .expect("a touched partition is registered");
            let mut written = s.part.write_out(&mut s.st, &sh.buf);
            if written.is_ok() && due && direct(sh) {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                written = if crate::failpoint::error(&s.part.fault_sync) {
                    Err(Error::io("fdatasync", "segment")(std::io::Error::other(
                        "injected by failpoint",
                    )))
                } else {
                    s.part.sync(&mut s.st)
                };
            }
            if let Err(e) = written {
                self.cut_journal(at);
                return Err(e);
            }
        }
        for sh in shares {
            let s = self
                .slots
                .get_mut(&sh.id)
                .expect("a touched partition is registered");
            s.part.publish(&mut s.st);
        }
        Ok(())
    }

    /// Syncs the journal if anything was written since its last sync.
    /// `touched` names the partitions whose appends the sync covers (their
    /// `storage.fdatasync:<partition>` fault points apply to it).
    fn sync_journal(&mut self, touched: &[u64]) -> Result<()> {
        if !self.journal.dirty {
            return Ok(());
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let path = &self.journal.path;
        for id in touched {
            if let Some(s) = self.slots.get(id)
                && crate::failpoint::error(&s.part.fault_sync)
            {
                return Err(Error::io("fdatasync", path)(std::io::Error::other(
                    "injected by failpoint",
                )));
            }
        }
        self.journal
            .file
            .sync_data()
            .map_err(Error::io("fdatasync", path))?;
        self.journal.dirty = false;
        Ok(())
    }

    /// Cuts the journal back to `size` (dropping a failed group's entries,
    /// so that a restart does not bring back appends reported as failed).
    fn cut_journal(&mut self, size: u64) {
        let j = &mut self.journal;
        match j.file.set_len(size).and_then(|()| j.file.sync_all()) {
            Ok(()) => j.size = size,
            Err(e) => tracing::error!(file = %j.path.display(), error = %e,
                "cannot cut the failed group off the journal; recovery at restart decides"),
        }
    }

    /// Syncs every segment written since the last checkpoint and starts a
    /// new journal file listing the active segments; deletes the old one.
    /// At a `clean` close, also writes the active segments' indexes.
    fn checkpoint(&mut self, clean: bool) -> Result<()> {
        let mut actives = Vec::with_capacity(self.slots.len());
        for s in self.slots.values_mut() {
            if s.st.dirty {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                s.part.sync(&mut s.st)?;
            }
            if clean {
                s.part.write_active_index(&mut s.st)?;
            }
            actives.push(Active {
                dir: s.part.jdir.clone(),
                base: s.st.base_offset,
                size: s.st.size,
            });
        }
        actives.sort_by(|a, b| a.dir.cmp(&b.dir));
        let next =
            JournalFile::create(&*self.fs, &self.root, self.journal.seq + 1, clean, &actives)?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.journal, next);
        self.fs
            .remove_file(&old.path)
            .map_err(Error::io("delete", &old.path))?;
        self.fs
            .sync_dir(&self.root)
            .map_err(Error::io("fsync folder", &self.root))
    }

    /// A write or sync failed: every partition refuses writes from now on,
    /// and the log's owner is told to stop.
    fn fail(&mut self, e: &Error) {
        tracing::error!(error = %e, "log write or fdatasync failed; the log stops accepting writes");
        let cause = e.to_string();
        self.failed.get_or_insert_with(|| cause.clone());
        for s in self.slots.values() {
            s.part.poison(&cause);
        }
        self.failed_signal.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(cause);
                true
            } else {
                false
            }
        });
    }
}
