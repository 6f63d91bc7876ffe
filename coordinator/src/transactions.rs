//! Transactional messages: the shell around the protocol core in
//! `txn_core`. The core decides; this module performs what it decides
//! (writes to `__txn_state`, appends to topic partitions, check-backs down
//! sidecar sessions, timers, answers to callers) and holds the locks.
//!
//! Durability contract. Every state change of a transaction is an upsert in
//! the internal `__txn_state` log:
//!
//! 1. `Prepare` writes PREPARED with the half message and the high-water
//!    mark of the partition the message will go to; it is durable (fsync
//!    policy) before Prepare answers, and invisible to consumers.
//! 2. `Commit` appends the message (its id is the transaction id) to its
//!    partition and answers once that append is durable; COMMITTED with the
//!    offset is written after, without making the caller wait. If a crash
//!    comes between the two, start-up finds the transaction PREPARED and
//!    searches its partition from the recorded mark for the message: found,
//!    it is COMMITTED; not found, it was never appended. So a commit is never
//!    lost and recovery never appends twice.
//! 3. `Rollback` writes ROLLED_BACK; the half message is never appended.
//!
//! The mark is moved up whenever a check-back finds the transaction still
//! open, so the search after a crash covers at most what was appended to the
//! partition since the last check-back.
//!
//! Operations on one transaction are serialised by its lock, held while the
//! effects of one event are performed (but not while a check-back waits for
//! its answer); different transactions proceed concurrently and share group
//! commits.
//!
//! Check-back: a transaction still PREPARED `check_after` after it was
//! prepared is asked about through a live session of its service; UNKNOWN,
//! no answer or no live session retries with exponential backoff (the count
//! is kept in the log, so it survives restarts) up to `max_checks`, then the
//! final action decides. Finished transactions are remembered for
//! `retention`, so repeated outcomes stay idempotent and the opposite
//! outcome is refused.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prost::Message as _;
use tandem_proto::coordinator as pb;
use tandem_runtime::telemetry;
use tandem_storage::{Log, ReadBudget, Record, TopicPartition};
use tokio::sync::{Notify, OwnedMutexGuard, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::broker::HalfMessage;
use crate::config::TxnSettings;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::session::Sessions;
use crate::statelog::{StateLog, now_ms, upsert};
use crate::txn_core::{
    CheckBack, Effect, Event, Note, Prepare, Reply, Seek, Sought, TxnRecord, TxnState,
    decode_record,
};
use crate::txn_table::{SHARDS, Table};

pub(crate) use crate::txn_core::MARKER_HEADER;

/// The log of the transactions' records.
const TXN_LOG: &str = "__txn_state";

/// One transaction id's place in the table.
struct Entry {
    core: TxnState,
    /// Offset of this transaction's latest record in `__txn_state`.
    log_offset: u64,
}

type SlotLock = tokio::sync::Mutex<Entry>;
type Slot = Arc<SlotLock>;

/// A transaction read back at start-up.
enum Restored {
    /// In the table as it is.
    Ready(String, Slot),
    /// Prepared: whether its message is in its partition decides.
    Seeking(String, Slot, Seek),
}

/// Fewer items than this are loaded at once, on the caller's thread.
#[cfg(not(test))]
const SHARED_FROM: usize = 16_384;
#[cfg(test)]
const SHARED_FROM: usize = 64;

/// Runs `work` over `items` cut into a share per CPU, each on a blocking
/// thread of its own (a few items: at once, here).
async fn share_out<T, R>(
    items: Vec<T>,
    work: impl Fn(Vec<T>) -> Result<R> + Send + Sync + 'static,
) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let many = items.len() >= SHARED_FROM;
    share_out_if(many, items, work).await
}

/// [`share_out`], shared out only if `many` (of what the items hold).
async fn share_out_if<T, R>(
    many: bool,
    mut items: Vec<T>,
    work: impl Fn(Vec<T>) -> Result<R> + Send + Sync + 'static,
) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
{
    // (tests share out whatever the machine has)
    let cpus = if cfg!(test) {
        2
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    if cpus == 1 || !many {
        return Ok(vec![work(items)?]);
    }
    let (work, size) = (Arc::new(work), items.len().div_ceil(cpus));
    let mut tasks = Vec::with_capacity(cpus);
    while !items.is_empty() {
        let share = items.split_off(items.len().saturating_sub(size));
        let work = work.clone();
        tasks.push(tokio::task::spawn_blocking(move || work(share)));
    }
    // Every share ends before an error is returned: none is left running.
    let mut ended = Vec::with_capacity(tasks.len());
    for task in tasks {
        ended.push(task.await);
    }
    ended
        .into_iter()
        .map(|e| e.map_err(|e| Error::Internal(format!("loading the transaction table: {e}")))?)
        .collect()
}

/// Puts a transaction read back at start-up in the table; two records
/// that read back as one id (keys that are not UTF-8) are a damaged log.
fn install(shard: &mut HashMap<String, Slot>, id: String, slot: Slot) -> Result<()> {
    match shard.entry(id) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(slot);
            Ok(())
        }
        std::collections::hash_map::Entry::Occupied(o) => Err(Error::CorruptState {
            log: TXN_LOG,
            offset: slot.try_lock().map_or(0, |e| e.log_offset),
            reason: format!("two transactions read back as {:?}", o.key()),
        }),
    }
}

/// What the effects of an event leave for the caller to act on.
#[derive(Default)]
struct Outcome {
    reply: Option<Result<Reply>>,
    check: Option<CheckBack>,
    seek: Option<Seek>,
}

/// A locked transaction whose effects are being performed. Dropped before
/// [`Performing::done`] (its future was dropped mid-write), it tells the
/// core that the effects failed.
struct Performing<'a, L: Log + Clone> {
    table: &'a Transactions<L>,
    id: &'a str,
    guard: Option<OwnedMutexGuard<Entry>>,
}

/// What a prepare found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// When the transaction was first prepared.
    pub at_ms: i64,
    /// A retry of a transaction prepared before.
    pub existed: bool,
    /// Where it stands now.
    pub state: pb::TransactionState,
}

impl<L: Log + Clone> Performing<'_, L> {
    fn entry(&mut self) -> &mut Entry {
        self.guard.as_mut().expect("held until done()")
    }

    fn done(mut self) -> OwnedMutexGuard<Entry> {
        self.guard.take().expect("held until done()")
    }
}

impl<L: Log + Clone> Drop for Performing<'_, L> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let undo = guard.core.apply(&self.table.settings, Event::Failed);
        if undo.iter().any(|e| matches!(e, Effect::Forget)) {
            self.table.forget(self.id, guard);
        }
    }
}

/// Counters of the protocol.
#[derive(Default)]
struct Counters {
    prepared: AtomicU64,
    committed: AtomicU64,
    rolled_back: AtomicU64,
    checks_sent: AtomicU64,
    resolved_by_check: AtomicU64,
    final_actions: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn not_found(id: &str) -> Error {
    Error::NotFound {
        what: "transaction",
        name: id.to_owned(),
    }
}

/// The span of an outcome of transaction `id`, a child of its producer's.
fn ended_span(name: &'static str, id: &str, core: &TxnState) -> tracing::Span {
    let span = telemetry::span(name, || core.traceparent());
    span.record("txn", id);
    span
}

/// The trace context among a wire message's headers.
fn pb_traceparent(m: &pb::Message) -> Option<String> {
    telemetry::from_headers(
        m.headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_ref())),
    )
}

/// An operation the core left unanswered: a bug, not a caller mistake.
fn no_reply(id: &str) -> Error {
    Error::Internal(format!("transaction {id:?}: the protocol gave no answer"))
}

/// The transaction table.
pub(crate) struct Transactions<L> {
    data: L,
    log: StateLog<L>,
    txns: Table<SlotLock>,
    due: Mutex<BTreeSet<(i64, String)>>,
    /// While `open` loads the table: the check-backs it schedules, put in
    /// `due` at once at its end (a million inserts one by one, comparing
    /// ids where times are equal, took about half of a start-up).
    loading: Mutex<Option<Vec<(i64, String)>>>,
    /// The earliest start of the next check-back ([`Self::pace`]).
    pacer: Mutex<tokio::time::Instant>,
    wake: Notify,
    pub(crate) sessions: Arc<Sessions>,
    settings: TxnSettings,
    counters: Counters,
    /// (time, high-water mark of `__txn_state`) samples, for compaction.
    marks: Mutex<VecDeque<(i64, u64)>>,
    checking: Arc<Semaphore>,
    open: AtomicU64,
    /// COMMITTED records being written in the background.
    writing: watch::Sender<usize>,
}

impl<L: Log + Clone> Transactions<L> {
    /// Loads the table from `internal` and completes commits a crash
    /// interrupted.
    pub(crate) async fn open(
        data: L,
        internal: L,
        settings: TxnSettings,
        sessions: Arc<Sessions>,
    ) -> Result<Arc<Self>> {
        let started = std::time::Instant::now();
        // Each transaction's last record, still encoded: only those are
        // decoded (a restart with a million open ones must not decode and
        // move every superseded record too). The map is sized for every
        // record the log holds, up to a million: growing it step by step
        // rewrote it ever larger. (Not beyond: entries land all over a
        // map, so one much larger than what it holds would still have
        // every page of it touched.)
        let held = internal
            .offsets(&TopicPartition::new(TXN_LOG, 0))
            .map_or(0, |o| o.high_water_mark.saturating_sub(o.log_start));
        let mut latest: HashMap<bytes::Bytes, (bytes::Bytes, u64)> =
            HashMap::with_capacity(held.min(1 << 20) as usize);
        let log = StateLog::open_each(internal, TXN_LOG, u64::MAX, |r| {
            let key = r.record.key.unwrap_or_default();
            if r.record.value.is_empty() {
                latest.remove(&key);
            } else {
                latest.insert(key, (r.record.value, r.offset));
            }
        })
        .await?;
        let t = Arc::new(Transactions {
            data,
            log,
            txns: Table::default(),
            due: Mutex::new(BTreeSet::new()),
            loading: Mutex::new(Some(Vec::with_capacity(latest.len()))),
            pacer: Mutex::new(tokio::time::Instant::now()),
            wake: Notify::new(),
            sessions,
            counters: Counters::default(),
            marks: Mutex::new(VecDeque::new()),
            checking: Arc::new(Semaphore::new(256)),
            open: AtomicU64::new(0),
            writing: watch::Sender::new(0),
            settings,
        });
        let now = now_ms();
        // The table is built here, each core fed its start-up events
        // directly: nothing else can reach it before `open` returns, and a
        // lock, a table lookup and an effect queue per transaction were
        // most of a start-up with a million open ones. Decoding and
        // allocating are shared out over the CPUs.
        let count = latest.len();
        let restored = {
            let t = t.clone();
            share_out(latest.into_iter().collect(), move |share| {
                let mut out = Vec::with_capacity(share.len());
                for (key, (value, log_offset)) in share {
                    out.extend(t.restored(&key, value, log_offset, now)?);
                }
                Ok(out)
            })
            .await?
        };
        let mut table = t.txns.empty_shards(count);
        // Prepared transactions whose message may be in its partition
        // already, by partition.
        let mut seeks: HashMap<TopicPartition, Vec<(String, Slot, Seek)>> = HashMap::new();
        for r in restored.into_iter().flatten() {
            match r {
                Restored::Ready(id, slot) => {
                    install(&mut table[t.txns.shard_of(&id)], id, slot)?;
                }
                Restored::Seeking(id, slot, seek) => match seeks.get_mut(&seek.tp) {
                    Some(txns) => txns.push((id, slot, seek)),
                    None => {
                        seeks.insert(seek.tp.clone(), vec![(id, slot, seek)]);
                    }
                },
            }
        }
        // Open ones are scheduled from the end of the load, not its start:
        // the reconnect grace is for producers' sidecars to come back once
        // this coordinator serves (a large table takes seconds to load).
        let now = now_ms();
        let (mut found, mut reopened) = (Vec::new(), Vec::new());
        for (tp, txns) in seeks {
            let from = txns.iter().map(|(_, _, s)| s.from).min().unwrap_or(0);
            let mut wanted: HashMap<Sought, Option<u64>> = HashMap::new();
            if t.data.offsets(&tp)?.high_water_mark > from {
                wanted = txns
                    .iter()
                    .map(|(_, _, s)| (s.sought.clone(), None))
                    .collect();
                t.find(&tp, from, &mut wanted).await?;
            }
            for (id, slot, seek) in txns {
                match wanted.get(&seek.sought).copied().flatten() {
                    // Its COMMITTED record is to be written: through the
                    // table, as every write.
                    Some(offset) => {
                        found.push((id.clone(), offset));
                        install(&mut table[t.txns.shard_of(&id)], id, slot)?;
                    }
                    None => reopened.push((id, slot)),
                }
            }
        }
        let reopened = {
            let t = t.clone();
            share_out(reopened, move |share| {
                // (sorted into their shards here, where the work is shared)
                let mut out: Vec<Vec<(String, Slot)>> = vec![Vec::new(); SHARDS];
                for (id, mut slot) in share {
                    // (nobody else holds it yet)
                    let Some(entry) = Arc::get_mut(&mut slot) else {
                        return Err(Error::Internal(format!(
                            "transaction {id:?} was shared while loading"
                        )));
                    };
                    let event = Event::Found { offset: None, now };
                    for effect in entry.get_mut().core.apply(&t.settings, event) {
                        t.settle(&id, effect)?;
                    }
                    out[t.txns.shard_of(&id)].push((id, slot));
                }
                Ok(out)
            })
            .await?
        };
        // Each shard filled on its own, the shards shared out over the CPUs.
        let mut work: Vec<_> = table
            .into_iter()
            .enumerate()
            .map(|(n, shard)| (n, shard, Vec::new()))
            .collect();
        for share in reopened {
            for (n, sorted) in share.into_iter().enumerate() {
                work[n].2.extend(sorted);
            }
        }
        let many = work.iter().map(|(_, _, e)| e.len()).sum::<usize>() >= SHARED_FROM;
        let mut table = t.txns.empty_shards(0);
        for filled in share_out_if(many, work, |share| {
            let mut out = Vec::with_capacity(share.len());
            for (n, mut shard, entries) in share {
                for (id, slot) in entries {
                    install(&mut shard, id, slot)?;
                }
                out.push((n, shard));
            }
            Ok(out)
        })
        .await?
        {
            for (n, shard) in filled {
                table[n] = shard;
            }
        }
        t.txns.fill(table);
        for (id, offset) in found {
            let guard = t.existing(&id).await?;
            let event = Event::Found {
                offset: Some(offset),
                now,
            };
            t.drive(&id, guard, event).await?;
        }
        // Built in bulk: each share sorted on its own thread, then
        // collecting into a set merges those runs (its sort finds them
        // sorted) and builds it in one pass, and `append` merges two sets
        // in one pass (the schedule is empty here anyway).
        let scheduled = lock(&t.loading).take().unwrap_or_default();
        let sorted = share_out(scheduled, |mut share| {
            share.sort_unstable();
            Ok(share)
        })
        .await?;
        let mut loaded: BTreeSet<(i64, String)> = sorted.into_iter().flatten().collect();
        lock(&t.due).append(&mut loaded);
        if count > 0 {
            tracing::info!(
                transactions = count,
                open = t.open.load(Ordering::Relaxed),
                ms = started.elapsed().as_millis() as u64,
                "transaction table loaded"
            );
        }
        t.wake.notify_one();
        Ok(t)
    }

    /// A transaction as its last record left it, fed the start-up event;
    /// `None` if it expired.
    fn restored(
        &self,
        key: &[u8],
        value: bytes::Bytes,
        log_offset: u64,
        now: i64,
    ) -> Result<Option<Restored>> {
        let id = String::from_utf8_lossy(key).into_owned();
        let rec = decode_record(&value).map_err(|e| Error::CorruptState {
            log: TXN_LOG,
            offset: log_offset,
            reason: format!("transaction {id:?}: {e}"),
        })?;
        let mut entry = Entry {
            core: TxnState::restore(&id, rec),
            log_offset,
        };
        let mut seek = None;
        for effect in entry.core.apply(&self.settings, Event::Restart { now }) {
            match effect {
                Effect::Seek(s) => seek = Some(s),
                Effect::Forget => {}
                other => self.settle(&id, other)?,
            }
        }
        Ok(match seek {
            Some(seek) => Some(Restored::Seeking(id, Arc::new(entry.into()), seek)),
            None if entry.core.exists() => Some(Restored::Ready(id, Arc::new(entry.into()))),
            None => None, // expired: forgotten
        })
    }

    /// Locks an existing transaction (the guard names its slot).
    async fn existing(&self, id: &str) -> Result<OwnedMutexGuard<Entry>> {
        loop {
            let slot = self.txns.get(id).ok_or_else(|| not_found(id))?;
            let guard = slot.clone().lock_owned().await;
            if !self.txns.holds(id, &slot) {
                continue; // removed (expired or failed prepare) while we waited
            }
            if !guard.core.exists() {
                return Err(not_found(id));
            }
            return Ok(guard);
        }
    }

    /// Locks a transaction, creating an empty slot if there is none (the
    /// guard names its slot).
    async fn slot(&self, id: &str) -> OwnedMutexGuard<Entry> {
        loop {
            let slot = self.txns.get_or_insert_with(id, || {
                tokio::sync::Mutex::new(Entry {
                    core: TxnState::new(id),
                    log_offset: 0,
                })
            });
            let guard = slot.clone().lock_owned().await;
            if self.txns.holds(id, &slot) {
                return guard;
            }
        }
    }

    /// Takes a forgotten transaction's slot (the one whose lock `guard`
    /// holds) out of the table, then lets its lock go: a caller waiting for
    /// the lock (a prepare of the same id) then finds the slot gone and
    /// takes a new one. Were the lock let go first, that caller could
    /// prepare in the old slot just before it left the table, and its
    /// PREPARED transaction would be in the log but in no table: no
    /// commit, check-back or upkeep would find it again.
    fn forget(&self, id: &str, guard: OwnedMutexGuard<Entry>) {
        self.txns
            .remove_if_holds(id, OwnedMutexGuard::mutex(&guard));
        drop(guard);
    }

    /// When the next check-back may start: at most `max_check_rate` per
    /// second, with bursts of up to a tenth of a second's worth.
    fn pace(&self) -> tokio::time::Instant {
        let gap = Duration::from_secs(1) / self.settings.max_check_rate.max(1);
        let now = tokio::time::Instant::now();
        let mut next = lock(&self.pacer);
        let slot = (*next).max(now);
        *next = slot + gap;
        slot.checked_sub(Duration::from_millis(100))
            .map_or(now, |s| s.max(now))
    }

    fn schedule(&self, id: &str, at_ms: i64) {
        if let Some(loading) = lock(&self.loading).as_mut() {
            loading.push((at_ms, id.to_owned()));
            return;
        }
        lock(&self.due).insert((at_ms, id.to_owned()));
        self.wake.notify_one();
    }

    /// Takes a decided transaction's check-back off the schedule, so that
    /// it costs no check task later (the checker, asleep until the
    /// earliest entry, may still wake once at its time). During start-up
    /// it stays in the list being loaded (searching it would cost more
    /// than the check-back, which finds the transaction decided and does
    /// nothing).
    fn unschedule(&self, id: &str, at_ms: i64) {
        if lock(&self.loading).is_none() {
            lock(&self.due).remove(&(at_ms, id.to_owned()));
        }
    }

    /// Performs an effect that writes nothing: a schedule or a note. Any
    /// other is a bug of the caller.
    fn settle(&self, id: &str, effect: Effect) -> Result<()> {
        match effect {
            Effect::Schedule { at_ms } => self.schedule(id, at_ms),
            Effect::Unschedule { at_ms } => self.unschedule(id, at_ms),
            Effect::Note(note) => self.note(id, note),
            other => {
                return Err(Error::Internal(format!(
                    "transaction {id:?}: {other:?} cannot be performed here"
                )));
            }
        }
        Ok(())
    }

    /// Feeds `event` to a locked transaction's core and performs the
    /// effects, in order. The first that fails stops the rest and is
    /// reported back to the core, which undoes the event; its error is
    /// returned. Cut short (the caller went away mid-write), it is reported
    /// the same way, so memory never runs ahead of the log.
    async fn drive(
        self: &Arc<Self>,
        id: &str,
        guard: OwnedMutexGuard<Entry>,
        event: Event,
    ) -> Result<Outcome> {
        let mut locked = Performing {
            table: self,
            id,
            guard: Some(guard),
        };
        let mut effects = VecDeque::from(locked.entry().core.apply(&self.settings, event));
        let mut out = Outcome::default();
        let (mut later, mut forget, mut failure) = (None, false, None);
        while let Some(effect) = effects.pop_front() {
            let performed = match effect {
                Effect::Persist(rec) => self.persist(id, locked.entry(), &rec).await,
                Effect::PersistLater(rec) => {
                    later = Some(rec);
                    Ok(())
                }
                Effect::Append { tp, record } => self.append(&tp, record).await.map(|offset| {
                    let appended = Event::Appended {
                        offset,
                        now: now_ms(),
                    };
                    effects.extend(locked.entry().core.apply(&self.settings, appended));
                }),
                Effect::Check(check) => {
                    out.check = Some(*check);
                    Ok(())
                }
                Effect::Schedule { .. } | Effect::Unschedule { .. } | Effect::Note(_) => {
                    self.settle(id, effect)
                }
                Effect::Reply(r) => {
                    out.reply = Some(r);
                    Ok(())
                }
                Effect::Seek(seek) => {
                    out.seek = Some(seek);
                    Ok(())
                }
                Effect::Forget => {
                    forget = true;
                    Ok(())
                }
            };
            if let Err(e) = performed {
                if failure.is_some() {
                    break; // undoing cannot fail; stop rather than loop
                }
                effects = locked
                    .entry()
                    .core
                    .apply(&self.settings, Event::Failed)
                    .into();
                failure = Some(e);
            }
        }
        let guard = locked.done();
        if let Some(rec) = later {
            self.persist_later(id, rec, guard);
        } else if forget {
            self.forget(id, guard);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    async fn persist(&self, id: &str, entry: &mut Entry, rec: &TxnRecord) -> Result<()> {
        let ack = self
            .log
            .append(vec![upsert(id.as_bytes().to_vec(), rec.encode_to_vec())])
            .await?;
        if let Some(ack) = ack {
            entry.log_offset = ack.base_offset;
        }
        Ok(())
    }

    /// Writes a transaction's COMMITTED record in the background, without
    /// a sync of its own (a crash before the next sync is covered by the
    /// PREPARED mark), keeping the transaction locked until it is written.
    fn persist_later(
        self: &Arc<Self>,
        id: &str,
        rec: Arc<TxnRecord>,
        mut guard: OwnedMutexGuard<Entry>,
    ) {
        let (this, id) = (self.clone(), id.to_owned());
        self.writing.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            let record = upsert(id.as_bytes().to_vec(), rec.encode_to_vec());
            match this.log.append_relaxed(vec![record]).await {
                Ok(Some(ack)) => guard.log_offset = ack.base_offset,
                Ok(None) => {}
                // Start-up recovery finds the message from the PREPARED mark.
                Err(e) => tracing::error!(txn = %id, error = %e, "writing COMMITTED failed"),
            }
            drop(guard);
            this.writing.send_modify(|n| *n -= 1);
        });
    }

    /// Appends a committed transaction's message to its partition.
    async fn append(&self, tp: &TopicPartition, record: Record) -> Result<u64> {
        failpoint::hit("coordinator.commit.before_append");
        let offset = self.data.append(tp, vec![record]).await?.base_offset;
        failpoint::hit("coordinator.commit.after_append");
        Ok(offset)
    }

    /// Counts and logs.
    fn note(&self, id: &str, note: Note) {
        let c = &self.counters;
        match note {
            Note::Prepared => {
                c.prepared.fetch_add(1, Ordering::Relaxed);
                self.open.fetch_add(1, Ordering::Relaxed);
            }
            Note::Reopened => {
                self.open.fetch_add(1, Ordering::Relaxed);
            }
            Note::CheckSent => {
                c.checks_sent.fetch_add(1, Ordering::Relaxed);
            }
            Note::Decided { commit, by_check } => {
                let outcome = if commit { &c.committed } else { &c.rolled_back };
                outcome.fetch_add(1, Ordering::Relaxed);
                if by_check {
                    c.resolved_by_check.fetch_add(1, Ordering::Relaxed);
                }
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
            Note::FinalAction {
                commit,
                checks,
                service,
            } => {
                tracing::warn!(txn = id, %service, checks, action = if commit { "commit" } else { "rollback" },
                    "no answer after the last check-back: applying the final action");
                c.final_actions.fetch_add(1, Ordering::Relaxed);
            }
            Note::FoundAfterRestart { offset } => {
                tracing::info!(txn = %id, offset, "found the message of a commit interrupted by a restart");
            }
        }
    }

    /// Stores a half message (steps 1–2); see `txn_core` for the identity
    /// rules. `partition` is where the message goes.
    pub(crate) async fn prepare(
        self: &Arc<Self>,
        half: HalfMessage<'_>,
        partition: u32,
    ) -> Result<Prepared> {
        let HalfMessage {
            service,
            instance,
            txn_id: id,
            topic,
            message,
            context,
            attempt,
        } = half;
        // Read before the transaction is locked: nothing of it can be
        // appended before it is prepared, so its message will be after.
        let mark = self
            .data
            .offsets(&TopicPartition::new(topic, partition))?
            .high_water_mark;
        let span = telemetry::span("coordinator.prepare", || {
            telemetry::from_headers(
                message
                    .record
                    .headers
                    .iter()
                    .map(|h| (h.name.as_str(), h.value.as_ref())),
            )
        });
        span.record("txn", id);
        span.record("topic", topic);
        let guard = self.slot(id).await;
        let prepare = Prepare {
            service: service.to_owned(),
            instance: instance.to_owned(),
            topic: topic.to_owned(),
            partition,
            message,
            context,
            attempt: attempt.to_owned(),
            marker: uuid::Uuid::now_v7().simple().to_string(),
            mark,
            now: now_ms(),
        };
        let out = self
            .drive(id, guard, Event::Prepare(Box::new(prepare)))
            .instrument(span)
            .await?;
        match out.reply {
            Some(Ok(Reply::Prepared {
                at_ms,
                existed,
                state,
            })) => Ok(Prepared {
                at_ms,
                existed,
                state,
            }),
            Some(Err(e)) => Err(e),
            _ => Err(no_reply(id)),
        }
    }

    /// Commits (steps 4 and 8). `service` must own the transaction.
    pub(crate) async fn commit(
        self: &Arc<Self>,
        service: &str,
        id: &str,
    ) -> Result<pb::EndTransactionResponse> {
        let guard = self.existing(id).await?;
        let span = ended_span("coordinator.commit", id, &guard.core);
        let event = Event::Commit {
            service: service.to_owned(),
            now: now_ms(),
        };
        ended(id, self.drive(id, guard, event).instrument(span).await?)
    }

    /// Rolls back (step 4). `service` must own the transaction.
    pub(crate) async fn rollback(
        self: &Arc<Self>,
        service: &str,
        id: &str,
    ) -> Result<pb::EndTransactionResponse> {
        let guard = self.existing(id).await?;
        let span = ended_span("coordinator.rollback", id, &guard.core);
        let event = Event::Rollback {
            service: service.to_owned(),
            now: now_ms(),
        };
        ended(id, self.drive(id, guard, event).instrument(span).await?)
    }

    /// Waits (at most `limit`) for background writes to finish, and syncs.
    pub(crate) async fn quiesce(&self, limit: Duration) {
        let mut rx = self.writing.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        if let Err(e) = self.log.sync().await {
            tracing::error!(error = %e, "syncing the transaction log failed");
        }
    }

    /// Finds which of `wanted`'s messages are in `tp` from offset `from` on.
    async fn find(
        &self,
        tp: &TopicPartition,
        from: u64,
        wanted: &mut HashMap<Sought, Option<u64>>,
    ) -> Result<()> {
        let offsets = self.data.offsets(tp)?;
        let mut next = from.max(offsets.log_start);
        let mut missing = wanted.len();
        while next < offsets.high_water_mark && missing > 0 {
            let batch = self.data.read(tp, next, ReadBudget::default()).await?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            for r in batch {
                for sought in Sought::keys(&r.record) {
                    if let Some(slot) = wanted.get_mut(&sought)
                        && slot.is_none()
                    {
                        *slot = Some(r.offset);
                        missing -= 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `id` names a transaction remembered now (open, or finished
    /// within the retention).
    pub(crate) fn knows(&self, id: &str) -> bool {
        self.txns.contains(id)
    }

    /// A transaction as the API shows it.
    pub(crate) async fn get(&self, id: &str) -> Result<pb::Transaction> {
        let guard = self.existing(id).await?;
        guard.core.view().ok_or_else(|| not_found(id))
    }

    /// The `limit` oldest remembered transactions as the API shows them
    /// that are in `state` (any when `None`), of `service` (any when
    /// empty) and after `after` (prepare time and id) in that order, and
    /// how many match.
    pub(crate) async fn list(
        &self,
        state: Option<i32>,
        service: &str,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> (Vec<pb::Transaction>, u64) {
        let slots: Vec<Slot> = self.txns.values();
        let oldest = |v: &mut Vec<pb::Transaction>| {
            v.sort_by(|a, b| (a.prepared_at_ms, &a.txn_id).cmp(&(b.prepared_at_ms, &b.txn_id)));
            v.truncate(limit);
        };
        let mut out = Vec::new();
        let mut matched = 0;
        for slot in slots {
            let Some(t) = slot.lock().await.core.view() else {
                continue; // forgotten, or a prepare that failed
            };
            if state.is_none_or(|s| s == t.state)
                && (service.is_empty() || service == t.service)
                && after.is_none_or(|a| (t.prepared_at_ms, t.txn_id.as_str()) > a)
            {
                matched += 1;
                out.push(t);
                if out.len() >= limit.saturating_mul(2).max(64) {
                    oldest(&mut out);
                }
            }
        }
        oldest(&mut out);
        (out, matched)
    }

    /// The protocol's counters.
    pub(crate) fn stats(&self) -> pb::Stats {
        let c = &self.counters;
        pb::Stats {
            prepared: c.prepared.load(Ordering::Relaxed),
            committed: c.committed.load(Ordering::Relaxed),
            rolled_back: c.rolled_back.load(Ordering::Relaxed),
            checks_sent: c.checks_sent.load(Ordering::Relaxed),
            resolved_by_check: c.resolved_by_check.load(Ordering::Relaxed),
            final_actions: c.final_actions.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
        }
    }

    /// Runs check-backs as they fall due, until aborted.
    pub(crate) async fn run_checks(self: Arc<Self>) {
        loop {
            let next = lock(&self.due).first().cloned();
            let now = now_ms();
            match next {
                None => self.wake.notified().await,
                Some((at, _)) if at > now => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis((at - now) as u64)) => {}
                        () = self.wake.notified() => {}
                    }
                }
                Some(entry) => {
                    lock(&self.due).remove(&entry);
                    let Ok(permit) = self.checking.clone().acquire_owned().await else {
                        return;
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        let (at, id) = entry;
                        if let Err(e) = this.check(&id, at).await {
                            // Never dropped from the schedule: asked again
                            // later (a storage failure stops the process
                            // instead, and start-up schedules every open
                            // transaction again).
                            let retry = this.settings.check_after;
                            tracing::error!(txn = %id, error = %e, retry_in_ms = retry.as_millis() as u64,
                                "check-back failed; will check again");
                            this.schedule(&id, now_ms() + retry.as_millis() as i64);
                        }
                        drop(permit);
                    });
                }
            }
        }
    }

    /// One check-back (steps 5–7), scheduled for `at_ms`. The transaction
    /// is not locked while its producer is being asked.
    async fn check(self: &Arc<Self>, id: &str, at_ms: i64) -> Result<()> {
        let guard = match self.existing(id).await {
            Ok(g) => g,
            Err(Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let out = self.drive(id, guard, Event::CheckDue { at_ms }).await?;
        let Some(CheckBack {
            service,
            instance,
            mut request,
            fence,
        }) = out.check
        else {
            return Ok(()); // decided meanwhile
        };
        // The producer's answer is a child of this check-back's span: the
        // trace context the request carries is this span's.
        let span = telemetry::span("coordinator.check_back", || {
            request.message.as_ref().and_then(pb_traceparent)
        });
        span.record("txn", id);
        span.record("topic", request.topic.as_str());
        // (Not exporting, the message's own context passes on unchanged.)
        if let Some(m) = request.message.as_mut()
            && let Some(tp) = telemetry::traceparent(&span)
        {
            m.headers.retain(|h| h.name != telemetry::TRACEPARENT);
            m.headers.push(pb::Header {
                name: telemetry::TRACEPARENT.to_owned(),
                value: bytes::Bytes::from(tp),
            });
        }
        // Only check-backs that go out are paced: the schedule's entries of
        // transactions decided meanwhile (most of them under load) cost
        // nothing. Waiting here holds one of the `checking` permits, so at
        // most that many wait, a fraction of a second's worth.
        tokio::time::sleep_until(self.pace()).await;
        let answer = self
            .sessions
            .check(&service, &instance, request, self.settings.check_timeout)
            .instrument(span)
            .await;
        tracing::debug!(
            txn = id,
            attempt = fence.attempt,
            ?answer,
            "check-back answered"
        );
        let guard = self.existing(id).await?;
        let mark = match guard.core.open_partition() {
            Some(tp) => self.data.offsets(&tp)?.high_water_mark,
            None => 0, // decided meanwhile: the answer changes nothing
        };
        let event = Event::CheckAnswer {
            fence,
            answer,
            now: now_ms(),
            mark,
        };
        self.drive(id, guard, event).await?;
        Ok(())
    }

    /// Periodic upkeep: forgets transactions finished longer ago than the
    /// retention, carries open ones forward and drops old log segments.
    pub(crate) async fn maintain(self: &Arc<Self>) -> Result<()> {
        let now = now_ms();
        let horizon = now - self.settings.retention.as_millis() as i64;
        let cutoff = {
            let mut marks = lock(&self.marks);
            marks.push_back((now, self.log.high_water_mark()?));
            let mut cutoff = None;
            while marks.front().is_some_and(|(t, _)| *t <= horizon) {
                cutoff = marks.pop_front().map(|(_, hwm)| hwm);
            }
            cutoff
        };
        // Shard by shard: a lookup waits at most for one shard's copy.
        // Open transactions whose record is about to be compacted away are
        // written again many at once, so that they share syncs (one after
        // the other, each waited for a sync of its own: ten thousand took a
        // second here).
        let mut rewriting: JoinSet<Result<()>> = JoinSet::new();
        let mut failure = None;
        'walk: for shard in 0..SHARDS {
            for (id, slot) in self.txns.entries_of(shard) {
                // Room first: no slot stays locked while rewrites finish.
                while rewriting.len() >= REWRITTEN_AT_ONCE {
                    if let Err(e) = joined(rewriting.join_next().await) {
                        failure = Some(e);
                        break 'walk;
                    }
                }
                let guard = slot.clone().lock_owned().await;
                if !self.txns.holds(&id, &slot) {
                    continue; // forgotten while we waited
                }
                let compacting = cutoff.is_some_and(|c| guard.log_offset < c);
                if !guard.core.upkeep_due(&self.settings, now, compacting) {
                    continue; // (kept, its record past the cutoff: most)
                }
                let event = Event::Upkeep { now, compacting };
                if !compacting {
                    // (expired: forgotten, nothing to write)
                    if let Err(e) = self.drive(&id, guard, event).await {
                        failure = Some(e);
                        break 'walk;
                    }
                    continue;
                }
                let this = self.clone();
                rewriting.spawn(async move { this.drive(&id, guard, event).await.map(drop) });
            }
        }
        // Every rewrite ends before compaction, and before any return.
        while !rewriting.is_empty() {
            if let Err(e) = joined(rewriting.join_next().await) {
                failure.get_or_insert(e);
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(c) = cutoff {
            // COMMITTED records are written without a sync of their own:
            // synced before the PREPARED ones they replace are dropped.
            self.log.sync().await?;
            self.log.truncate_before(c).await?;
        }
        Ok(())
    }
}

/// Open transactions upkeep writes again at once.
const REWRITTEN_AT_ONCE: usize = 256;

/// A rewrite's result from its task.
fn joined(r: Option<std::result::Result<Result<()>, tokio::task::JoinError>>) -> Result<()> {
    match r {
        Some(Ok(done)) => done,
        Some(Err(e)) => Err(Error::Internal(format!("rewriting a transaction: {e}"))),
        None => Ok(()),
    }
}

/// The outcome a commit or rollback answered with.
fn ended(id: &str, out: Outcome) -> Result<pb::EndTransactionResponse> {
    match out.reply {
        Some(Ok(Reply::Ended(response))) => Ok(response),
        Some(Err(e)) => Err(e),
        _ => Err(no_reply(id)),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::broker::Outgoing;
    use crate::txn_core::check_delay;

    #[test]
    fn check_back_backs_off_exponentially_up_to_the_cap() {
        let s = TxnSettings {
            check_after: Duration::from_secs(6),
            max_check_interval: Duration::from_secs(60),
            ..TxnSettings::default()
        };
        let delays: Vec<u64> = (0..7).map(|n| check_delay(&s, n).as_secs()).collect();
        assert_eq!(delays, vec![6, 12, 24, 48, 60, 60, 60]);
        assert_eq!(check_delay(&s, 1000), Duration::from_secs(60));
    }

    fn prep(id: &str, message: Outgoing) -> HalfMessage<'_> {
        HalfMessage {
            service: "svc",
            instance: "",
            txn_id: id,
            topic: "t",
            message,
            context: Bytes::new(),
            attempt: "",
        }
    }

    fn outgoing(value: &str) -> Outgoing {
        Outgoing {
            chosen_id: true,
            partition: None,
            record: Record {
                id: Bytes::new(),
                key: None,
                value: Bytes::copy_from_slice(value.as_bytes()),
                headers: Vec::new(),
                timestamp_ms: 0,
            },
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upkeep_forgets_finished_transactions_and_keeps_open_ones() -> Result<()> {
        use tandem_storage::{EmbeddedLog, LogConfig};
        let dir = tempfile::tempdir().map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        let data = EmbeddedLog::open(dir.path().join("data"), LogConfig::default()).await?;
        data.create_partition(&TopicPartition::new("t", 0)).await?;
        let settings = TxnSettings {
            retention: Duration::from_millis(300),
            check_after: Duration::from_secs(3600),
            ..TxnSettings::default()
        };
        let open = |settings: TxnSettings| {
            let (data, dir) = (data.clone(), dir.path().to_owned());
            async move {
                // Small segments, so that upkeep really drops some.
                let small = LogConfig {
                    segment_bytes: 4096,
                    ..LogConfig::default()
                };
                let internal = EmbeddedLog::open(dir.join("internal"), small).await?;
                Transactions::open(data, internal, settings, Default::default()).await
            }
        };
        let t = open(settings.clone()).await?;
        // Many more open ones than upkeep writes again at once, in every
        // shard but by a chance of (255/256)^2048 < 0.0004 each.
        let open_ids: Vec<String> = (0..REWRITTEN_AT_ONCE * 8)
            .map(|i| format!("open-{i}"))
            .collect();
        prepare_all(&t, &open_ids).await?;
        let done: Vec<String> = (0..60).map(|i| format!("done-{i}")).collect();
        for id in &done {
            t.prepare(prep(id, outgoing("b")), 0).await?;
            t.commit("svc", id).await?;
        }
        t.quiesce(Duration::from_secs(5)).await;
        let records_before = t.log.high_water_mark()? - t.log.log_start()?;
        t.maintain().await?; // first mark
        tokio::time::sleep(Duration::from_millis(400)).await;
        t.maintain().await?; // the "done-*" finished longer ago than the retention
        let records_after = t.log.high_water_mark()? - t.log.log_start()?;
        assert!(t.log.log_start()? > 0, "old segments were dropped");
        assert!(
            records_after < records_before,
            "{records_after} records kept of {records_before}"
        );
        for id in &done {
            assert!(matches!(t.get(id).await, Err(Error::NotFound { .. })));
        }
        for id in &open_ids {
            assert_eq!(
                t.get(id).await?.state,
                pb::TransactionState::Prepared as i32
            );
        }
        drop(t);

        let t = open(settings).await?;
        for id in &done {
            assert!(
                matches!(t.get(id).await, Err(Error::NotFound { .. })),
                "forgotten for good"
            );
        }
        // Every open one was written again, so it survived its records
        // being dropped: it is still open, and its commit appends its
        // message.
        let tp = TopicPartition::new("t", 0);
        let appended_from = data.offsets(&tp)?.high_water_mark;
        open_then_committed(&t, &open_ids).await?;
        let appended = data.read(&tp, appended_from, ReadBudget::default()).await?;
        let mut values: Vec<&[u8]> = appended.iter().map(|r| r.record.value.as_ref()).collect();
        let mut expected: Vec<&[u8]> = open_ids.iter().map(|id| id.as_bytes()).collect();
        values.sort_unstable();
        expected.sort_unstable();
        assert_eq!(values, expected);
        Ok(())
    }

    /// Randomized runs: producers prepare, commit, roll back, cut prepares
    /// short and reuse their ids while upkeep forgets and compacts every
    /// few milliseconds. Checked over each run: a prepare that answered
    /// PREPARED is found open until its producer decides it, every commit
    /// and rollback of an open transaction succeeds, a prepare cut short
    /// leaves nothing open in memory, and after a restart every transaction
    /// still open is open and commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transactions_stay_as_their_producers_left_them_while_upkeep_runs() -> Result<()> {
        // TANDEM_TEST_SEED=<seed> repeats a run's random draws; which
        // draws follow which depends on timing too (whether a prepare cut
        // short had finished), so it repeats the run's choices only up to
        // the first step that timing decided.
        let seed = match std::env::var("TANDEM_TEST_SEED") {
            Ok(s) => s
                .parse::<u64>()
                .map_err(|e| Error::Internal(format!("TANDEM_TEST_SEED={s}: {e}")))?,
            Err(_) => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            }
        };
        eprintln!("seed {seed} (TANDEM_TEST_SEED={seed} repeats its choices)");
        let (_dir, data, internal, settings) = compactable(Duration::from_millis(20)).await?;
        let open = || reopen(&data, &internal, &settings);
        let t = open().await?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upkeep = {
            let (t, stop) = (t.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rounds = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    t.maintain().await?;
                    rounds += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                Ok::<_, Error>(rounds)
            })
        };
        let mut producers = JoinSet::new();
        for p in 0..8u64 {
            let t = t.clone();
            // (each producer its own stream, whatever the seed)
            let mut rng = (seed ^ (p + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
            producers.spawn(async move {
                let mut next = move |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                // Each id of this producer: open or not, as it left it.
                let ids: Vec<String> = (0..3).map(|i| format!("p{p}-{i}")).collect();
                let mut open = [false; 3];
                for step in 0..150 {
                    let i = next(3) as usize;
                    let id = &ids[i];
                    let at = format!("producer {p}, step {step}, {id}");
                    if open[i] {
                        assert_open(&t, id, &at).await;
                        if next(2) == 0 {
                            t.commit("svc", id)
                                .await
                                .map_err(|e| Error::Internal(format!("{at}: {e}")))?;
                        } else {
                            t.rollback("svc", id)
                                .await
                                .map_err(|e| Error::Internal(format!("{at}: {e}")))?;
                        }
                        open[i] = false;
                    } else if next(4) == 0 {
                        // Cut short: polled once, then dropped.
                        let mut fut = Box::pin(t.prepare(prep(id, outgoing(id)), 0));
                        let done = std::future::poll_fn(|cx| {
                            std::task::Poll::Ready(match fut.as_mut().poll(cx) {
                                std::task::Poll::Ready(r) => Some(r),
                                std::task::Poll::Pending => None,
                            })
                        })
                        .await;
                        drop(fut);
                        match done {
                            Some(r) => {
                                let prepared = r?;
                                open[i] = prepared.state == pb::TransactionState::Prepared;
                            }
                            None => {
                                // Nothing open in memory: gone, or its
                                // earlier outcome still remembered.
                                let state = t.get(id).await.map(|v| v.state).ok();
                                let prepared = Some(pb::TransactionState::Prepared as i32);
                                assert_ne!(
                                    state, prepared,
                                    "{at}: a prepare cut short left it open"
                                );
                            }
                        }
                    } else {
                        let prepared = t.prepare(prep(id, outgoing(id)), 0).await?;
                        open[i] = prepared.state == pb::TransactionState::Prepared;
                        if open[i] {
                            assert_open(&t, id, &format!("{at}: just prepared")).await;
                        }
                    }
                    if next(8) == 0 {
                        // (sometimes long enough for a decided one to be
                        // forgotten)
                        tokio::time::sleep(Duration::from_millis(next(40))).await;
                    }
                }
                let left: Vec<String> = ids
                    .into_iter()
                    .zip(open)
                    .filter(|(_, o)| *o)
                    .map(|(id, _)| id)
                    .collect();
                Ok::<_, Error>(left)
            });
        }
        let mut left_open = Vec::new();
        while let Some(done) = producers.join_next().await {
            left_open.extend(done.map_err(|e| Error::Internal(format!("seed {seed}: {e}")))??);
        }
        // Upkeep goes on past the retention, so that the records of the
        // transactions left open fall below a compaction's cutoff.
        tokio::time::sleep(settings.retention * 5).await;
        stop.store(true, Ordering::Relaxed);
        let rounds = upkeep.await.map_err(|e| Error::Internal(e.to_string()))??;
        assert!(rounds > 10, "upkeep ran {rounds} times");
        assert!(t.log.log_start()? > 0, "upkeep compacted the log");
        t.quiesce(Duration::from_secs(5)).await;
        drop(t);
        let t = open().await?;
        for id in &left_open {
            assert_open(&t, id, &format!("seed {seed}: {id} after a restart")).await;
            t.commit("svc", id).await?;
        }
        Ok(())
    }

    /// Upkeep whose rewrites fail drops nothing: the error is returned, the
    /// log keeps its start and every transaction stays open. When every
    /// rewrite fails, the next round, with writes working again, rewrites
    /// every open transaction and compacts. When the round fails part way
    /// through (some rewritten, the rest not), a restart right after it
    /// finds every one open, and rounds after the restart compact. Either
    /// way all of them survive a last restart and commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upkeep_whose_rewrites_fail_drops_nothing() -> Result<()> {
        // Every rewrite fails (the walk stops with rewrites in flight);
        // 1½ × REWRITTEN_AT_ONCE succeed (it stops part way); or all but the
        // last succeed (the failure comes while the last ones are joined).
        let r = REWRITTEN_AT_ONCE as u64;
        for let_through in [0, r + r / 2, 2 * r - 1] {
            let (_dir, data, internal, settings) = compactable(Duration::from_millis(300)).await?;
            let (data, internal) = (Faulty::new(data), Faulty::new(internal));
            let open = || reopen(&data, &internal, &settings);
            let t = open().await?;
            let ids: Vec<String> = (0..REWRITTEN_AT_ONCE * 2)
                .map(|i| format!("open-{i}"))
                .collect();
            prepare_all(&t, &ids).await?;
            t.maintain().await?; // the first mark
            tokio::time::sleep(settings.retention + Duration::from_millis(100)).await;
            let start = t.log.log_start()?;
            internal.fail_after(let_through);
            let failed = t.maintain().await;
            assert!(
                matches!(
                    failed,
                    Err(Error::Storage(tandem_storage::Error::Poisoned { .. }))
                ),
                "{let_through} let through: a round whose rewrites failed: {failed:?}"
            );
            assert_eq!(
                t.log.log_start()?,
                start,
                "{let_through} let through: nothing dropped"
            );
            still_open(&t, &ids).await?;
            internal.heal();
            let t = if let_through > 0 {
                // A restart right after the failed round.
                drop(t);
                let t = open().await?;
                still_open(&t, &ids).await?;
                t.maintain().await?; // its first mark
                t
            } else {
                t
            };
            tokio::time::sleep(settings.retention + Duration::from_millis(100)).await;
            t.maintain().await?;
            assert!(
                t.log.log_start()? > start,
                "{let_through} let through: compacted once the rewrites succeed"
            );
            drop(t);
            open_then_committed(&open().await?, &ids).await?;
        }
        Ok(())
    }

    /// Upkeep syncs the log before it drops segments: a COMMITTED record is
    /// written without a sync of its own, and once the segment holding its
    /// PREPARED record is dropped it is all that is left of the
    /// transaction. Transactions prepared before a mark and committed after
    /// it (so their latest records lie past the cutoff, and upkeep does not
    /// rewrite them) are all still known as committed after a power cut
    /// that keeps nothing unsynced, right after compaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_power_cut_right_after_compaction_keeps_every_commit() -> Result<()> {
        use tandem_storage::{EmbeddedLog, LogConfig, Loss, SimFs};
        async fn logs(fs: &SimFs) -> Result<(EmbeddedLog, EmbeddedLog)> {
            let fs: Arc<dyn tandem_storage::Vfs> = Arc::new(fs.clone());
            let data = EmbeddedLog::open_on(fs.clone(), "/data", LogConfig::default()).await?;
            let small = LogConfig {
                segment_bytes: 4096,
                ..LogConfig::default()
            };
            let internal = EmbeddedLog::open_on(fs, "/internal", small).await?;
            Ok((data, internal))
        }
        // (a retention far longer than committing, compacting and
        // reopening take: commits older than it would be forgotten anyway)
        let settings = TxnSettings {
            retention: Duration::from_secs(2),
            check_after: Duration::from_secs(3600),
            ..TxnSettings::default()
        };
        let fs = SimFs::new();
        let (data, internal) = logs(&fs).await?;
        data.create_partition(&TopicPartition::new("t", 0)).await?;
        let t = reopen(&data, &internal, &settings).await?;
        let ids: Vec<String> = (0..64).map(|i| format!("committed-{i}")).collect();
        // One after the other, so that the first prepared lie in the
        // oldest segments, which compaction drops.
        for id in &ids {
            t.prepare(prep(id, outgoing(id)), 0).await?;
        }
        t.maintain().await?; // the mark: the cutoff of the round after the retention
        tokio::time::sleep(settings.retention + Duration::from_millis(100)).await;
        // Last first: the COMMITTED records left unsynced (those after the
        // last segment roll, which syncs the journal) are the first
        // prepared ones', whose PREPARED records compaction drops.
        let committing = std::time::Instant::now();
        for id in ids.iter().rev() {
            t.commit("svc", id).await?;
        }
        let start = t.log.log_start()?;
        t.maintain().await?;
        assert!(t.log.log_start()? > start, "nothing was compacted");
        let disk = fs.after_power_cut(Loss::All);
        drop(t);
        let (data, internal) = logs(&disk).await?;
        let t = reopen(&data, &internal, &settings).await?;
        assert!(
            committing.elapsed() < settings.retention,
            "inconclusive: {:?} from the first commit to the restart, past the retention",
            committing.elapsed()
        );
        for id in &ids {
            let state = t.get(id).await.map(|v| v.state);
            assert_eq!(
                state.ok(),
                Some(pb::TransactionState::Committed as i32),
                "{id} after the power cut"
            );
        }
        Ok(())
    }

    /// Asserts `id`'s transaction is open (PREPARED) in `t`; `at` says where.
    async fn assert_open<L: Log + Clone>(t: &Transactions<L>, id: &str, at: &str) {
        let state = t.get(id).await.map(|v| v.state).ok();
        assert_eq!(state, Some(pb::TransactionState::Prepared as i32), "{at}");
    }

    /// Asserts each id's transaction is open in `t`'s memory.
    async fn still_open<L: Log + Clone>(t: &Arc<Transactions<L>>, ids: &[String]) -> Result<()> {
        at_once(ids, |id| {
            let t = t.clone();
            async move {
                assert_open(&t, &id, &id).await;
                Ok(())
            }
        })
        .await
    }

    /// Fresh logs as [`restartable`] makes them, but the transaction log
    /// in segments of 4 KiB (so that upkeep really drops some), and
    /// settings with `retention`.
    async fn compactable(
        retention: Duration,
    ) -> Result<(
        tempfile::TempDir,
        tandem_storage::EmbeddedLog,
        tandem_storage::EmbeddedLog,
        TxnSettings,
    )> {
        let small = tandem_storage::LogConfig {
            segment_bytes: 4096,
            ..tandem_storage::LogConfig::default()
        };
        let (dir, data, internal, settings) = fresh(small).await?;
        Ok((
            dir,
            data,
            internal,
            TxnSettings {
                retention,
                ..settings
            },
        ))
    }

    /// A log whose appends fail, as a disk that went bad would make them,
    /// once the number of appends it still lets through (`left`, unlimited
    /// at first) is used up.
    #[derive(Clone)]
    struct Faulty {
        inner: tandem_storage::EmbeddedLog,
        left: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Faulty {
        fn new(inner: tandem_storage::EmbeddedLog) -> Self {
            Faulty {
                inner,
                left: Arc::new(u64::MAX.into()),
            }
        }

        /// Lets `n` more appends through, then fails the rest.
        fn fail_after(&self, n: u64) {
            self.left.store(n, Ordering::SeqCst);
        }

        fn heal(&self) {
            self.fail_after(u64::MAX);
        }

        fn refused(&self, tp: &TopicPartition) -> tandem_storage::Result<()> {
            let taken = self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n > 0).then(|| if n == u64::MAX { n } else { n - 1 })
                });
            if taken.is_err() {
                return Err(tandem_storage::Error::Poisoned {
                    tp: tp.clone(),
                    cause: "the test made appends fail".into(),
                });
            }
            Ok(())
        }
    }

    impl Log for Faulty {
        async fn create_partition(&self, tp: &TopicPartition) -> tandem_storage::Result<()> {
            self.inner.create_partition(tp).await
        }
        async fn delete_partition(&self, tp: &TopicPartition) -> tandem_storage::Result<()> {
            self.inner.delete_partition(tp).await
        }
        fn partitions(&self) -> Vec<TopicPartition> {
            self.inner.partitions()
        }
        async fn append(
            &self,
            tp: &TopicPartition,
            records: Vec<Record>,
        ) -> tandem_storage::Result<tandem_storage::AppendAck> {
            self.refused(tp)?;
            self.inner.append(tp, records).await
        }
        async fn append_relaxed(
            &self,
            tp: &TopicPartition,
            records: Vec<Record>,
        ) -> tandem_storage::Result<tandem_storage::AppendAck> {
            self.refused(tp)?;
            self.inner.append_relaxed(tp, records).await
        }
        async fn sync(&self, tp: &TopicPartition) -> tandem_storage::Result<()> {
            self.inner.sync(tp).await
        }
        async fn read(
            &self,
            tp: &TopicPartition,
            from: u64,
            budget: ReadBudget,
        ) -> tandem_storage::Result<Vec<tandem_storage::StoredRecord>> {
            self.inner.read(tp, from, budget).await
        }
        fn offsets(&self, tp: &TopicPartition) -> tandem_storage::Result<tandem_storage::Offsets> {
            self.inner.offsets(tp)
        }
        async fn wait_for(&self, tp: &TopicPartition, offset: u64) -> tandem_storage::Result<u64> {
            self.inner.wait_for(tp, offset).await
        }
        async fn truncate_before(
            &self,
            tp: &TopicPartition,
            offset: u64,
        ) -> tandem_storage::Result<u64> {
            self.inner.truncate_before(tp, offset).await
        }
    }

    /// The table on `data` and `internal`, loaded from what they hold.
    fn reopen<L: Log + Clone>(
        data: &L,
        internal: &L,
        settings: &TxnSettings,
    ) -> impl Future<Output = Result<Arc<Transactions<L>>>> {
        Transactions::open(
            data.clone(),
            internal.clone(),
            settings.clone(),
            Default::default(),
        )
    }

    /// Prepares a transaction for each id (its message: the id), all at once.
    async fn prepare_all<L: Log + Clone>(t: &Arc<Transactions<L>>, ids: &[String]) -> Result<()> {
        at_once(ids, |id| {
            let t = t.clone();
            async move { t.prepare(prep(&id, outgoing(&id)), 0).await.map(drop) }
        })
        .await
    }

    /// Asserts each id's transaction is open, and commits them all at once.
    async fn open_then_committed<L: Log + Clone>(
        t: &Arc<Transactions<L>>,
        ids: &[String],
    ) -> Result<()> {
        at_once(ids, |id| {
            let t = t.clone();
            async move {
                assert_open(&t, &id, &id).await;
                t.commit("svc", &id).await.map(drop)
            }
        })
        .await
    }

    /// Runs `f` for every id at once, and returns the first failure.
    async fn at_once<F, Fut>(ids: &[String], f: F) -> Result<()>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let mut running = JoinSet::new();
        for id in ids {
            running.spawn(f(id.clone()));
        }
        let mut first = Ok(());
        while let Some(done) = running.join_next().await {
            let done = done
                .map_err(|e| Error::Internal(e.to_string()))
                .and_then(|r| r);
            if first.is_ok() {
                first = done;
            }
        }
        first
    }

    /// A commit or rollback takes the transaction's check-back off the
    /// schedule; an open transaction keeps its own.
    #[tokio::test]
    async fn a_decided_transaction_leaves_no_check_back_scheduled() -> Result<()> {
        let (_dir, data, internal, settings) = restartable().await?;
        let t = Transactions::open(data, internal, settings, Default::default()).await?;
        for id in ["committed", "rolled-back", "open"] {
            t.prepare(prep(id, outgoing(id)), 0).await?;
        }
        assert_eq!(lock(&t.due).len(), 3);
        t.commit("svc", "committed").await?;
        t.rollback("svc", "rolled-back").await?;
        let due: Vec<String> = lock(&t.due).iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(due, vec!["open".to_owned()]);
        // The same outcome again changes nothing.
        t.commit("svc", "committed").await?;
        assert_eq!(lock(&t.due).len(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_prepare_cut_short_is_not_remembered_and_can_be_retried() -> Result<()> {
        use tandem_storage::{EmbeddedLog, LogConfig};
        let dir = tempfile::tempdir().map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        let data = EmbeddedLog::open(dir.path().join("data"), LogConfig::default()).await?;
        data.create_partition(&TopicPartition::new("t", 0)).await?;
        let internal = EmbeddedLog::open(dir.path().join("internal"), LogConfig::default()).await?;
        let t =
            Transactions::open(data, internal, TxnSettings::default(), Default::default()).await?;
        // Dropped while its PREPARED record is being written (the caller
        // went away): nothing in memory may claim it was prepared. The
        // future is polled once and dropped; a prepare that happened to
        // finish in that one poll proves nothing, so another id is tried.
        let mut cut = None;
        for i in 0..50 {
            let id = format!("x{i}");
            let mut fut = Box::pin(t.prepare(prep(&id, outgoing("x")), 0));
            let first = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())
            })
            .await;
            drop(fut);
            if first {
                cut = Some(id);
                break;
            }
        }
        let id = cut.expect("a prepare was cut short while writing");
        assert!(matches!(t.get(&id).await, Err(Error::NotFound { .. })));
        assert!(!t.knows(&id));
        let at = t.prepare(prep(&id, outgoing("x")), 0).await?;
        assert_eq!(t.get(&id).await?.prepared_at_ms, at.at_ms);
        assert!(!at.existed, "the cut prepare left nothing behind");
        Ok(())
    }

    /// Two fresh logs (topic "t", one partition, in `data`) and settings
    /// whose check-backs do not come during a test; the folder goes with
    /// the first.
    async fn restartable() -> Result<(
        tempfile::TempDir,
        tandem_storage::EmbeddedLog,
        tandem_storage::EmbeddedLog,
        TxnSettings,
    )> {
        fresh(tandem_storage::LogConfig::default()).await
    }

    /// [`restartable`]'s logs, the transaction log with `internal`.
    async fn fresh(
        internal: tandem_storage::LogConfig,
    ) -> Result<(
        tempfile::TempDir,
        tandem_storage::EmbeddedLog,
        tandem_storage::EmbeddedLog,
        TxnSettings,
    )> {
        use tandem_storage::{EmbeddedLog, LogConfig};
        let dir = tempfile::tempdir().map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        let data = EmbeddedLog::open(dir.path().join("data"), LogConfig::default()).await?;
        data.create_partition(&TopicPartition::new("t", 0)).await?;
        let internal = EmbeddedLog::open(dir.path().join("internal"), internal).await?;
        let settings = TxnSettings {
            check_after: Duration::from_secs(3600),
            ..TxnSettings::default()
        };
        Ok((dir, data, internal, settings))
    }

    /// The crash window of a commit: its message reaches its partition,
    /// its COMMITTED record does not.
    async fn append_without_record<L: Log + Clone>(t: &Transactions<L>, id: &str) -> Result<()> {
        let mut guard = t.existing(id).await?;
        let commit = Event::Commit {
            service: "svc".into(),
            now: now_ms(),
        };
        let effects = guard.core.apply(&t.settings, commit);
        let Some(Effect::Append { tp, record }) = effects.into_iter().next() else {
            panic!("a commit appends first");
        };
        t.append(&tp, record).await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_commit_cut_short_after_its_append_is_found_on_start_up() -> Result<()> {
        let (_dir, data, internal, settings) = restartable().await?;
        let tp = TopicPartition::new("t", 0);
        let t = Transactions::open(
            data.clone(),
            internal.clone(),
            settings.clone(),
            Default::default(),
        )
        .await?;
        t.prepare(prep("x", outgoing("x")), 0).await?;
        t.prepare(prep("y", outgoing("y")), 0).await?;
        append_without_record(&t, "x").await?;
        drop(t);
        let t = Transactions::open(data.clone(), internal, settings, Default::default()).await?;
        let x = t.get("x").await?;
        assert_eq!(x.state, pb::TransactionState::Committed as i32);
        assert_eq!(x.position.map(|p| p.offset), Some(0));
        assert_eq!(
            t.get("y").await?.state,
            pb::TransactionState::Prepared as i32
        );
        // committing "x" again is idempotent and appends nothing
        t.commit("svc", "x").await?;
        assert_eq!(data.offsets(&tp)?.high_water_mark, 1);
        Ok(())
    }

    /// Hundreds of transactions (loaded in shares, as a large table is):
    /// open ones stay open and are scheduled, decided ones stay decided,
    /// and commits a crash cut short after their append are found.
    #[tokio::test]
    async fn a_table_loaded_in_shares_is_as_it_was_left() -> Result<()> {
        let (_dir, data, internal, settings) = restartable().await?;
        let tp = TopicPartition::new("t", 0);
        let open = || reopen(&data, &internal, &settings);
        let t = open().await?;
        let ids: Vec<String> = (0..400).map(|i| format!("txn-{i}")).collect();
        for id in &ids {
            t.prepare(prep(id, outgoing(id)), 0).await?;
        }
        // 0..100 committed, 100..150 rolled back, 150..200 appended but
        // never recorded as committed, the rest open.
        for id in &ids[..100] {
            t.commit("svc", id).await?;
        }
        for id in &ids[100..150] {
            t.rollback("svc", id).await?;
        }
        for id in &ids[150..200] {
            append_without_record(&t, id).await?;
        }
        t.quiesce(Duration::from_secs(5)).await;
        drop(t);
        let state = TopicPartition::new(TXN_LOG, 0);
        let written_before = internal.offsets(&state)?.high_water_mark;
        let t = open().await?;
        assert!(ids.len() >= SHARED_FROM * 2, "the load is shared out");
        let mut offsets = std::collections::HashSet::new();
        for (i, id) in ids.iter().enumerate() {
            let view = t.get(id).await?;
            assert_eq!(&view.txn_id, id);
            let want = match i {
                0..100 | 150..200 => pb::TransactionState::Committed,
                100..150 => pb::TransactionState::RolledBack,
                _ => pb::TransactionState::Prepared,
            };
            assert_eq!(view.state, want as i32, "{id}");
            if want == pb::TransactionState::Prepared {
                assert!(view.next_check_at_ms > 0, "{id} is scheduled");
            }
            if want == pb::TransactionState::Committed {
                let offset = view.position.map(|p| p.offset);
                assert!(offsets.insert(offset), "{id} at {offset:?} twice");
                // Its own message is there.
                let at = offset.unwrap_or(u64::MAX);
                let read = data.read(&tp, at, ReadBudget::default()).await?;
                assert_eq!(
                    read.first().map(|r| r.record.id.as_ref()),
                    Some(id.as_bytes())
                );
            }
        }
        assert_eq!(t.stats().open, 200);
        assert_eq!(lock(&t.due).len(), 200);
        // Each committed one's message is where its record says, once.
        assert_eq!(data.offsets(&tp)?.high_water_mark, 150);
        for id in &ids[150..200] {
            t.commit("svc", id).await?;
        }
        assert_eq!(data.offsets(&tp)?.high_water_mark, 150);
        // The commits found were written down as COMMITTED records.
        t.quiesce(Duration::from_secs(5)).await;
        let mut written = std::collections::HashSet::new();
        let mut from = written_before;
        loop {
            let read = internal.read(&state, from, ReadBudget::default()).await?;
            let Some(last) = read.last() else { break };
            from = last.offset + 1;
            for r in read {
                let id = String::from_utf8_lossy(r.record.key.as_deref().unwrap_or_default())
                    .into_owned();
                let rec = TxnRecord::decode(r.record.value).map_err(|e| {
                    Error::Internal(format!("a record of {id:?} does not decode: {e}"))
                })?;
                let view = TxnState::restore(&id, rec).view();
                if view.is_some_and(|v| v.state == pb::TransactionState::Committed as i32) {
                    written.insert(id);
                }
            }
        }
        for id in &ids[150..200] {
            assert!(written.contains(id), "{id}'s COMMITTED record");
        }
        Ok(())
    }
}
