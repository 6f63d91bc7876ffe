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
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{FsyncPolicy, LogConfig};
use crate::error::{Error, Result};
use crate::journal::{self, Active, JournalFile};
use crate::log::AppendAck;
use crate::partition::{AppendRequest, Partition, WriterState};
use crate::record::TopicPartition;
use crate::vfs::{VFile, Vfs};

/// How long the writer's sync rounds for appends took (the journal's, or
/// the journal's and segment files' written directly, which run at once;
/// the journal's before a segment roll; a tick's for relaxed appends), as
/// a histogram. Not in it: the syncs of checkpoints, made in the
/// background (though appends wait when one is still running as the next
/// is due), and the folder syncs of a roll. A reader of the log's counts
/// that holds nothing of the log open.
#[derive(Clone, Debug, Default)]
pub struct SyncTimes(Arc<SyncBuckets>);

#[derive(Debug, Default)]
struct SyncBuckets {
    /// Syncs per bucket of [`SyncTimes::BOUNDS_US`], the last one past
    /// the largest bound.
    counts: [AtomicU64; SyncTimes::BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl SyncTimes {
    /// Upper bounds of the buckets, µs (inclusive).
    pub const BOUNDS_US: [u64; 12] = [
        100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    ];

    fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = Self::BOUNDS_US.partition_point(|&b| b < us);
        self.0.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.0.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Syncs in each bucket (not cumulative), in the order of
    /// [`BOUNDS_US`](Self::BOUNDS_US), then those that took longer.
    pub fn counts(&self) -> Vec<u64> {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The syncs' time in all.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.0.sum_us.load(Ordering::Relaxed))
    }
}

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
    /// Stop writing a partition (its appends queued before this are
    /// written first) and checkpoint, so that no journal file names it any
    /// more; answered once that is durable.
    Unregister(u64, oneshot::Sender<Result<()>>),
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
    sync_times: SyncTimes,
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
        let sync_times = SyncTimes::default();
        let run = Run {
            slots: partitions
                .into_iter()
                .map(|(p, st)| (p.id, Slot { part: p, st }))
                .collect(),
            fs,
            root: root.clone(),
            config: config.clone(),
            journal,
            last_sync: Instant::now(),
            sealed: Vec::new(),
            checkpointing: None,
            failed: None,
            failed_signal: failed,
            stopping: stopping.clone(),
            syncs: syncs.clone(),
            sync_times: sync_times.clone(),
            unregistering: Vec::new(),
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
            sync_times,
        })
    }

    /// `fdatasync` calls made so far (journal and segment files).
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// The counter behind [`syncs`](Self::syncs).
    pub(crate) fn sync_count(&self) -> Arc<AtomicU64> {
        self.syncs.clone()
    }

    /// How long the syncs appends waited for took.
    pub(crate) fn sync_times(&self) -> SyncTimes {
        self.sync_times.clone()
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

/// `fdatasync` of each file, on threads of their own when there are
/// several (the disk may serve them at once).
fn sync_files(files: &[(Arc<dyn VFile>, PathBuf)]) -> Result<()> {
    let results: Vec<std::io::Result<()>> = match files {
        [] => Vec::new(),
        [(f, _)] => vec![f.sync_data()],
        _ => std::thread::scope(|scope| {
            let running: Vec<_> = files
                .iter()
                .map(|(f, _)| scope.spawn(|| f.sync_data()))
                .collect();
            running
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("fdatasync thread panicked")))
                })
                .collect()
        }),
    };
    for (r, (_, path)) in results.into_iter().zip(files) {
        r.map_err(Error::io("fdatasync", path))?;
    }
    Ok(())
}

/// What one pass writes to one partition.
struct Share {
    id: u64,
    /// The batches, encoded one after the other.
    buf: Vec<u8>,
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
    /// When the journal's last sync ended.
    last_sync: Instant,
    /// Segments sealed since the last checkpoint with bytes not yet synced.
    sealed: Vec<(Arc<dyn VFile>, PathBuf)>,
    /// The checkpoint running in the background, if any.
    checkpointing: Option<std::thread::JoinHandle<Result<()>>>,
    /// Set once a write or sync failed: nothing is written from then on.
    failed: Option<String>,
    failed_signal: Arc<watch::Sender<Option<String>>>,
    stopping: Arc<AtomicBool>,
    syncs: Arc<AtomicU64>,
    sync_times: SyncTimes,
    /// Unregistrations waiting for appends a roll carried over.
    unregistering: Vec<(u64, oneshot::Sender<Result<()>>)>,
}

/// What one round of the writer gathered and wrote, until it is synced
/// and acknowledged.
#[derive(Default)]
struct Cycle {
    /// Appends gathered, not yet written.
    group: Vec<(u64, AppendRequest)>,
    /// Bytes gathered so far this cycle.
    bytes: usize,
    /// Appends written, with their offsets, to acknowledge once synced.
    written: Vec<(u64, AppendRequest, AppendAck)>,
    /// Partitions written to, in order, to hand to readers.
    touched: Vec<u64>,
    /// Each touched partition's active segment size before this cycle.
    sizes: HashMap<u64, u64>,
    /// The journal's size before this cycle.
    journal_at: Option<u64>,
    /// Partitions whose journaled appends the sync covers.
    journaled: HashSet<u64>,
    /// Partitions whose segment files were written directly, to sync.
    direct: HashSet<u64>,
    /// Appends that asked to be synced.
    synced: usize,
    waiters: Vec<(u64, oneshot::Sender<Result<()>>)>,
    flushes: Vec<oneshot::Sender<()>>,
    unregister: Vec<(u64, oneshot::Sender<Result<()>>)>,
    tick: bool,
    closing: bool,
}

impl Run {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut siblings_before = 0;
        // appends left for the next cycle by a segment roll
        let mut carry = Vec::new();
        let mut closing = false;
        loop {
            let mut cy = Cycle::default();
            if carry.is_empty() {
                let Some(job) = rx.blocking_recv() else { break };
                self.take(job, &mut cy);
            } else {
                cy.bytes = carry
                    .iter()
                    .map(|(_, r): &(u64, AppendRequest)| r.bytes)
                    .sum();
                cy.group = std::mem::take(&mut carry);
            }
            self.drain(&mut rx, &mut cy);
            self.write_group(&mut cy);
            // Group commit: while others are appending too (this cycle or
            // the last one had several appends to sync), wait until
            // `group_commit_wait` after the last sync for more to join
            // this one, as PostgreSQL's commit_delay does.
            let wait = self.config.group_commit_wait;
            if cy.synced > 0 && !wait.is_zero() && (cy.synced > 1 || siblings_before > 1) {
                let until = self.last_sync + wait;
                loop {
                    let now = Instant::now();
                    if cy.closing
                        || !cy.group.is_empty()
                        || now >= until
                        || cy.bytes >= self.config.max_group_bytes
                    {
                        break;
                    }
                    std::thread::sleep((until - now).min(Duration::from_micros(200)));
                    self.drain(&mut rx, &mut cy);
                    self.write_group(&mut cy);
                }
            }
            siblings_before = cy.synced;
            self.finish(&mut cy);
            carry = std::mem::take(&mut cy.group);
            let mut asked = std::mem::take(&mut self.unregistering);
            asked.append(&mut cy.unregister);
            for (id, reply) in asked {
                if carry.iter().any(|(i, _)| *i == id) {
                    // after the appends a roll carried over
                    self.unregistering.push((id, reply));
                } else {
                    let _ = reply.send(self.unregister(id));
                }
            }
            if self.checkpointing.as_ref().is_some_and(|h| h.is_finished())
                && let Err(e) = self.wait_checkpoint()
            {
                self.fail(&e);
            }
            if self.failed.is_none()
                && self.journal.size >= self.config.journal_bytes
                && let Err(e) = self.checkpoint(false)
            {
                self.fail(&e);
            }
            closing |= cy.closing;
            // (appends a roll carried over are written before stopping)
            if carry.is_empty()
                && (closing || (self.stopping.load(Ordering::Acquire) && rx.is_empty()))
            {
                break;
            }
        }
        for (_, reply) in self.unregistering.drain(..) {
            let _ = reply.send(Err(Error::Closed));
        }
        if let Err(e) = self.wait_checkpoint() {
            self.fail(&e);
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

    fn take(&mut self, job: Job, cy: &mut Cycle) {
        match job {
            Job::Register(p, st) => {
                self.slots.insert(p.id, Slot { part: p, st });
            }
            Job::Append(id, r) => {
                cy.bytes += r.bytes;
                cy.group.push((id, r));
            }
            Job::Sync(Some(w)) => cy.waiters.push(w),
            Job::Sync(None) => cy.tick = true,
            Job::Flush(w) => cy.flushes.push(w),
            Job::Unregister(id, w) => cy.unregister.push((id, w)),
            Job::Close => cy.closing = true,
        }
    }

    /// Takes what is queued, up to `max_group_bytes` for the cycle.
    fn drain(&mut self, rx: &mut mpsc::Receiver<Job>, cy: &mut Cycle) {
        while !cy.closing && cy.bytes < self.config.max_group_bytes {
            match rx.try_recv() {
                Ok(job) => self.take(job, cy),
                Err(_) => break,
            }
        }
    }

    /// Syncs what the cycle wrote (if any append asked, a tick came, or a
    /// caller asked), hands it to readers and acknowledges it.
    fn finish(&mut self, cy: &mut Cycle) {
        let sync = cy.synced > 0 || cy.tick || !cy.waiters.is_empty() || !cy.flushes.is_empty();
        if sync
            && self.failed.is_none()
            && let Err(e) = self.sync_cycle(cy)
        {
            self.fail_cycle(cy, &e);
        }
        // Nothing is handed to readers or acknowledged once the log failed
        // (a failure in this cycle after these were written).
        if let Some(cause) = self.failed.clone()
            && (!cy.written.is_empty() || !cy.touched.is_empty())
        {
            let e = Error::Poisoned {
                tp: TopicPartition::new("", 0),
                cause,
            };
            self.fail_cycle(cy, &e);
        }
        for id in &cy.touched {
            let s = self
                .slots
                .get_mut(id)
                .expect("a touched partition is registered");
            s.part.publish(&mut s.st);
        }
        for (_, req, ack) in cy.written.drain(..) {
            let _ = req.reply.send(Ok(ack));
        }
        for w in cy.flushes.drain(..) {
            let _ = w.send(());
        }
        for (id, w) in cy.waiters.drain(..) {
            let answer = match self.slots.get(&id) {
                Some(s) => s.part.check_poisoned(),
                None => Err(Error::Closed),
            };
            let _ = w.send(answer);
        }
    }

    /// A write or sync of the cycle failed: the log fails, the journal and
    /// every segment the cycle wrote to are cut back to where the cycle
    /// began (so that a restart does not bring back appends reported as
    /// failed), and every append of the cycle is answered with the failure.
    fn fail_cycle(&mut self, cy: &mut Cycle, e: &Error) {
        self.fail(e);
        if let Some(at) = cy.journal_at {
            self.cut_journal(at);
        }
        for (id, size) in &cy.sizes {
            if let Some(s) = self.slots.get_mut(id) {
                s.part.cut_back(&mut s.st, *size);
            }
        }
        cy.touched.clear();
        let cause = self.failed.clone().unwrap_or_else(|| e.to_string());
        for (id, req, _) in cy.written.drain(..) {
            let tp = self.slots[&id].part.tp.clone();
            let _ = req.reply.send(Err(Error::Poisoned {
                tp,
                cause: cause.clone(),
            }));
        }
    }

    /// Journals and writes the appends the cycle gathered, in passes: an
    /// append that needs its partition's segment rolled after others of the
    /// same partition in this pass waits for the next pass, so that a
    /// segment is sealed only with everything before the roll written.
    fn write_group(&mut self, cy: &mut Cycle) {
        let mut pending = std::mem::take(&mut cy.group);
        while !pending.is_empty() {
            let mut shares: Vec<Share> = Vec::new();
            let mut share_of: HashMap<u64, usize> = HashMap::new();
            let mut done = Vec::new();
            let mut deferred = Vec::new();
            let mut blocked = HashSet::new();
            let mut want_sync = false;
            let mut roll_next = false;
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
                cy.sizes.entry(id).or_insert(slot.st.size);
                let i = *share_of.entry(id).or_insert_with(|| {
                    shares.push(Share {
                        id,
                        buf: Vec::new(),
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
                    if cy.touched.contains(&id) {
                        // Sealing would make durable what an earlier pass of
                        // this cycle wrote before it is acknowledged: roll
                        // in the next cycle, after this one is.
                        roll_next = true;
                        blocked.insert(id);
                        deferred.push((id, req));
                        continue;
                    }
                    // What the sealed segment holds must be durable in the
                    // journal before a later segment exists (relaxed
                    // appends may not be yet). The new segment is empty: a
                    // failure later in the cycle cuts back to its start.
                    let journal = &mut self.journal;
                    let journaled = if journal.dirty {
                        self.syncs.fetch_add(1, Ordering::Relaxed);
                        let began = Instant::now();
                        let synced = journal.file.sync_data();
                        self.sync_times.record(began.elapsed());
                        synced
                            .map_err(Error::io("fdatasync", &journal.path))
                            .map(|()| journal.dirty = false)
                    } else {
                        Ok(())
                    };
                    match journaled.and_then(|()| slot.part.roll(&mut slot.st)) {
                        Ok(unsynced) => self.sealed.extend(unsynced),
                        Err(e) => {
                            let tp = slot.part.tp.clone();
                            let _ = req.reply.send(Err(Error::Poisoned {
                                tp,
                                cause: e.to_string(),
                            }));
                            self.fail_cycle(cy, &e);
                            continue;
                        }
                    }
                    cy.sizes.insert(id, 0);
                }
                let start = share.buf.len();
                let interval = slot.part.config.index_interval_bytes;
                let (pos, ack) = slot.st.encode(&req.records, &mut share.buf, interval);
                share.batches.push((slot.st.base_offset, pos, start));
                want_sync |= req.sync;
                if req.sync {
                    cy.synced += 1;
                }
                done.push((id, req, ack));
            }
            // A roll failed in this pass: the log has failed, and nothing
            // encoded before it may be written or acknowledged.
            let result = match &self.failed {
                Some(cause) => Err(Error::Poisoned {
                    tp: TopicPartition::new("", 0),
                    cause: cause.clone(),
                }),
                None => self.write_pass(&shares, want_sync, cy),
            };
            match result {
                Ok(()) => {
                    for sh in &shares {
                        if !cy.touched.contains(&sh.id) {
                            cy.touched.push(sh.id);
                        }
                    }
                    cy.written.extend(done);
                }
                Err(e) => {
                    cy.written.extend(done);
                    self.fail_cycle(cy, &e);
                }
            }
            if roll_next {
                cy.group = deferred;
                return;
            }
            pending = deferred;
        }
    }

    /// Writes one pass, unsynced: small shares go to the journal (one
    /// write) and then to their segments; a share of at least
    /// `direct_write_bytes` that must be synced is written to its segment
    /// and that file synced instead, since journaling would write its bytes
    /// twice.
    fn write_pass(&mut self, shares: &[Share], want_sync: bool, cy: &mut Cycle) -> Result<()> {
        // (a log whose policy is not `always` never asks to sync an append)
        let due = want_sync;
        // Only a share synced now may skip the journal: an unsynced one
        // must become durable with the journal's next sync.
        let limit = self.config.direct_write_bytes;
        let direct = move |sh: &Share| due && sh.buf.len() >= limit;
        let mut journal = Vec::new();
        for sh in shares {
            let dir = &self.slots[&sh.id].part.jdir;
            if direct(sh) {
                // Synced in place, in this cycle, before it is acknowledged.
                // Nothing in the journal vouches for it: a record of it
                // could become durable before its bytes do (the syncs run
                // at once), and vouch for bytes a power cut then took.
                continue;
            }
            for (i, &(base, pos, start)) in sh.batches.iter().enumerate() {
                let end = sh.batches.get(i + 1).map_or(sh.buf.len(), |b| b.2);
                journal::encode_batch(dir, base, pos, &sh.buf[start..end], &mut journal);
            }
            cy.journaled.insert(sh.id);
            self.journal.dirty = true;
        }
        let at = self.journal.size;
        cy.journal_at.get_or_insert(at);
        if !journal.is_empty() {
            self.journal
                .file
                .write_all_at(&journal, at)
                .map_err(Error::io("write", &self.journal.path))?;
            self.journal.size += journal.len() as u64;
        }
        for sh in shares {
            let s = self
                .slots
                .get_mut(&sh.id)
                .expect("a touched partition is registered");
            s.part.write_out(&mut s.st, &sh.buf)?;
            if direct(sh) {
                cy.direct.insert(sh.id);
            }
        }
        Ok(())
    }

    /// Syncs the journal (if written since its last sync) and the segment
    /// files the cycle wrote directly, all at once: one `fdatasync` per
    /// file, each on a thread of its own when there are several.
    fn sync_cycle(&mut self, cy: &Cycle) -> Result<()> {
        if cy.direct.is_empty() {
            let touched: Vec<u64> = cy.journaled.iter().copied().collect();
            return self.sync_journal(&touched);
        }
        let mut files: Vec<(Arc<dyn VFile>, PathBuf)> = Vec::new();
        if self.journal.dirty {
            files.push((self.journal.file.clone(), self.journal.path.clone()));
        }
        let injected = |path: &PathBuf| {
            Err(Error::io("fdatasync", path)(std::io::Error::other(
                "injected by failpoint",
            )))
        };
        for id in &cy.journaled {
            if crate::failpoint::error(&self.slots[id].part.fault_sync) {
                return injected(&self.journal.path);
            }
        }
        for id in &cy.direct {
            let s = &self.slots[id];
            if crate::failpoint::error(&s.part.fault_sync) {
                return injected(&s.st.path);
            }
            files.push((s.st.file.clone(), s.st.path.clone()));
        }
        self.syncs.fetch_add(files.len() as u64, Ordering::Relaxed);
        let began = Instant::now();
        let synced = sync_files(&files);
        self.sync_times.record(began.elapsed());
        synced?;
        self.journal.dirty = false;
        self.last_sync = Instant::now();
        for id in &cy.direct {
            if let Some(s) = self.slots.get_mut(id) {
                s.st.dirty = false;
            }
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
        let began = Instant::now();
        let synced = self.journal.file.sync_data();
        self.sync_times.record(began.elapsed());
        synced.map_err(Error::io("fdatasync", path))?;
        self.journal.dirty = false;
        self.last_sync = Instant::now();
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

    /// Starts a new journal file listing the active segments, then syncs
    /// every segment written since the last checkpoint (sealed or active)
    /// and deletes the old journal file: in the background, while appends
    /// go on into the new file (a crash meanwhile redoes both files), or at
    /// once for a `clean` close, which also writes the active segments'
    /// indexes. One checkpoint runs at a time.
    fn checkpoint(&mut self, clean: bool) -> Result<()> {
        self.wait_checkpoint()?;
        // The new file vouches for every segment's size: what the old one
        // holds unsynced (relaxed appends) must be durable first, as the
        // segments will not be until the background sync ends.
        self.sync_journal(&[])?;
        let mut files = std::mem::take(&mut self.sealed);
        let mut actives = Vec::with_capacity(self.slots.len());
        for s in self.slots.values_mut() {
            if s.st.dirty {
                files.push((s.st.file.clone(), s.st.path.clone()));
                s.st.dirty = false;
            }
            actives.push(Active {
                dir: s.part.jdir.clone(),
                base: s.st.base_offset,
                size: s.st.size,
            });
        }
        actives.sort_by(|a, b| a.dir.cmp(&b.dir));
        self.syncs
            .fetch_add(files.len() as u64 + 1, Ordering::Relaxed);
        if clean {
            sync_files(&files)?;
            for s in self.slots.values_mut() {
                s.part.write_active_index(&mut s.st)?;
            }
        }
        let next =
            JournalFile::create(&*self.fs, &self.root, self.journal.seq + 1, clean, &actives)?;
        let old = std::mem::replace(&mut self.journal, next);
        let (fs, root) = (self.fs.clone(), self.root.clone());
        let finish = move || -> Result<()> {
            sync_files(&files)?;
            fs.remove_file(&old.path)
                .map_err(Error::io("delete", &old.path))?;
            fs.sync_dir(&root).map_err(Error::io("fsync folder", &root))
        };
        if clean {
            return finish();
        }
        let handle = std::thread::Builder::new()
            .name("log-checkpoint".into())
            .spawn(finish)
            .map_err(Error::io("start checkpoint thread for", &self.root))?;
        self.checkpointing = Some(handle);
        Ok(())
    }

    /// Stops writing partition `id` and checkpoints, waiting for the old
    /// journal file to be gone: then no journal file names the partition,
    /// and its folder may be deleted.
    fn unregister(&mut self, id: u64) -> Result<()> {
        if let Some(cause) = &self.failed {
            return Err(Error::Store {
                what: "delete a partition",
                cause: cause.clone(),
            });
        }
        let Some(slot) = self.slots.remove(&id) else {
            return Ok(());
        };
        slot.part.close_readers();
        let done = self.checkpoint(false).and_then(|()| self.wait_checkpoint());
        if let Err(e) = &done {
            self.fail(e);
        }
        done
    }

    /// Waits for the background checkpoint, if one runs; its failure is
    /// the log's.
    fn wait_checkpoint(&mut self) -> Result<()> {
        match self.checkpointing.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(Error::io("checkpoint", &self.root)(std::io::Error::other(
                    "the checkpoint thread panicked",
                )))
            }),
            None => Ok(()),
        }
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
