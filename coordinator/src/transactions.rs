//! Transactional messages: half messages, outcomes, check-back.
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
//! Operations on one transaction are serialised by its lock; different
//! transactions proceed concurrently and share group commits.
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

use bytes::Bytes;
use prost::Message as _;
use tandem_proto::coordinator as pb;
use tandem_storage::{Log, ReadBudget, Record, TopicPartition};
use tokio::sync::{Notify, OwnedMutexGuard, Semaphore, watch};

use crate::broker::{HalfMessage, Outgoing};
use crate::config::{FinalAction, TxnSettings};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::session::Sessions;
use crate::statelog::{StateLog, now_ms, upsert};
use crate::wire::{headers_from_wire, headers_to_wire};

const PREPARED: i32 = 1;
const COMMITTED: i32 = 3;
const ROLLED_BACK: i32 = 4;

/// The half message itself.
#[derive(Clone, PartialEq, prost::Message)]
struct HalfRecord {
    #[prost(bytes = "bytes", optional, tag = "1")]
    key: Option<Bytes>,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
    #[prost(message, repeated, tag = "3")]
    headers: Vec<pb::Header>,
    #[prost(int64, tag = "4")]
    timestamp_ms: i64,
}

/// A transaction's whole state: the value of its upsert in `__txn_state`.
#[derive(Clone, PartialEq, prost::Message)]
struct TxnRecord {
    #[prost(string, tag = "1")]
    service: String,
    #[prost(string, tag = "2")]
    topic: String,
    #[prost(uint32, tag = "3")]
    partition: u32,
    #[prost(int32, tag = "4")]
    state: i32,
    #[prost(int64, tag = "5")]
    prepared_at_ms: i64,
    #[prost(uint32, tag = "6")]
    checks: u32,
    /// PREPARED: the partition's high-water mark when the transaction was
    /// last known not to be appended; the message, if appended, is after it.
    #[prost(uint64, tag = "7")]
    scan_from: u64,
    /// COMMITTED: where the message is.
    #[prost(uint64, tag = "8")]
    offset: u64,
    #[prost(int64, tag = "9")]
    finished_at_ms: i64,
    /// PREPARED only.
    #[prost(message, optional, tag = "10")]
    message: Option<HalfRecord>,
    #[prost(bytes = "bytes", tag = "11")]
    context: Bytes,
    #[prost(bool, tag = "12")]
    resolved_by_check: bool,
    /// The sidecar instance that prepared it (check-backs go there first).
    #[prost(string, tag = "13")]
    instance: String,
    /// Fingerprint of the content (topic, requested partition, key, value,
    /// headers): a retried prepare must match it.
    #[prost(uint64, tag = "14")]
    digest: u64,
    /// Unique per transaction; its appended message carries it in the
    /// `tandem.txn` header, so start-up recovery finds this transaction's
    /// own record and never another one with the same id.
    #[prost(string, tag = "15")]
    marker: String,
}

/// The header that marks a transaction's appended message; reserved: a
/// plain publish may not set it, and deliveries do not show it.
pub(crate) const MARKER_HEADER: &str = "tandem.txn";

/// Fingerprint of a half message's content, for the identity check of a
/// retried prepare (the id and the timestamp are not content).
fn digest(topic: &str, m: &Outgoing) -> u64 {
    let mut parts: Vec<&[u8]> = vec![topic.as_bytes()];
    let partition = m.partition.map(u32::to_le_bytes);
    parts.push(partition.as_ref().map_or(b"-", |p| p.as_slice()));
    let key = m.record.key.as_deref();
    parts.push(if key.is_some() { b"k" } else { b"-" });
    parts.push(key.unwrap_or_default());
    parts.push(&m.record.value);
    for h in &m.record.headers {
        parts.push(h.name.as_bytes());
        parts.push(&h.value);
    }
    let (mut a, mut b) = (0u32, 0x9e37_79b9u32);
    for p in parts {
        let len = (p.len() as u64).to_le_bytes();
        a = crc32c::crc32c_append(crc32c::crc32c_append(a, &len), p);
        b = crc32c::crc32c_append(crc32c::crc32c_append(b, p), &len);
    }
    (u64::from(a) << 32) | u64::from(b)
}

/// How start-up recovery recognises a prepared transaction's message.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Sought {
    /// By its marker header (every transaction prepared by this version).
    Marker(String),
    /// By its id alone (prepared before messages were marked).
    Id(String),
}

struct Txn {
    rec: TxnRecord,
    /// Offset of this transaction's latest record in `__txn_state`.
    log_offset: u64,
}

type Slot = Arc<tokio::sync::Mutex<Option<Txn>>>;

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

/// Delay before check-back number `done + 1`: `check_after`, then doubling
/// from there, at most `max_interval`.
pub(crate) fn check_delay(s: &TxnSettings, done: u32) -> Duration {
    let factor = 1u32.checked_shl(done.min(20)).unwrap_or(u32::MAX);
    s.check_after
        .saturating_mul(factor)
        .min(s.max_check_interval.max(s.check_after))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The transaction table.
pub(crate) struct Transactions<L> {
    data: L,
    log: StateLog<L>,
    txns: Mutex<HashMap<String, Slot>>,
    due: Mutex<BTreeSet<(i64, String)>>,
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
    pub(crate) async fn open(data: L, internal: L, settings: TxnSettings) -> Result<Arc<Self>> {
        let (log, records) = StateLog::open(internal, "__txn_state", u64::MAX).await?;
        let mut latest: HashMap<String, (TxnRecord, u64)> = HashMap::new();
        for r in records {
            let id =
                String::from_utf8_lossy(r.record.key.as_deref().unwrap_or_default()).into_owned();
            if r.record.value.is_empty() {
                latest.remove(&id);
                continue;
            }
            let rec =
                TxnRecord::decode(r.record.value.clone()).map_err(|e| Error::CorruptState {
                    log: "__txn_state",
                    offset: r.offset,
                    reason: format!("transaction {id:?}: {e}"),
                })?;
            latest.insert(id, (rec, r.offset));
        }
        let now = now_ms();
        let expired_before = now - settings.retention.as_millis() as i64;
        let t = Arc::new(Transactions {
            data,
            log,
            txns: Mutex::new(HashMap::new()),
            due: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            sessions: Arc::new(Sessions::default()),
            counters: Counters::default(),
            marks: Mutex::new(VecDeque::new()),
            checking: Arc::new(Semaphore::new(256)),
            open: AtomicU64::new(0),
            writing: watch::Sender::new(0),
            settings,
        });
        // Prepared transactions by partition: (id, scan mark, marker).
        type Open = Vec<(String, u64, String)>;
        let mut prepared: HashMap<(String, u32), Open> = HashMap::new();
        for (id, (rec, log_offset)) in latest {
            let finished = matches!(rec.state, COMMITTED | ROLLED_BACK);
            if finished && rec.finished_at_ms < expired_before {
                continue;
            }
            if rec.state == PREPARED {
                prepared
                    .entry((rec.topic.clone(), rec.partition))
                    .or_default()
                    .push((id.clone(), rec.scan_from, rec.marker.clone()));
            }
            lock(&t.txns).insert(
                id,
                Arc::new(tokio::sync::Mutex::new(Some(Txn { rec, log_offset }))),
            );
        }
        // A crash may have come between a commit's append and its COMMITTED
        // record: look for prepared transactions' messages.
        for ((topic, partition), txns) in prepared {
            let tp = TopicPartition::new(topic, partition);
            let from = txns.iter().map(|(_, mark, _)| *mark).min().unwrap_or(0);
            let mut wanted: HashMap<Sought, (String, Option<u64>)> = txns
                .into_iter()
                .map(|(id, _, marker)| {
                    let sought = if marker.is_empty() {
                        // Prepared by a version that did not mark messages.
                        Sought::Id(id.clone())
                    } else {
                        Sought::Marker(marker)
                    };
                    (sought, (id, None))
                })
                .collect();
            t.find(&tp, from, &mut wanted).await?;
            for (id, found) in wanted.into_values() {
                let (_, mut guard) = t.existing(&id).await?;
                let txn = guard.as_mut().expect("existing() returns a filled slot");
                match found {
                    Some(offset) => {
                        t.record_committed(&id, txn, offset).await?;
                        tracing::info!(txn = %id, offset, "found the message of a commit interrupted by a restart");
                    }
                    None => {
                        t.open.fetch_add(1, Ordering::Relaxed);
                        let at = txn.rec.prepared_at_ms
                            + check_delay(&t.settings, txn.rec.checks).as_millis() as i64;
                        t.schedule(&id, at.max(now));
                    }
                }
            }
        }
        Ok(t)
    }

    /// Locks an existing transaction.
    async fn existing(&self, id: &str) -> Result<(Slot, OwnedMutexGuard<Option<Txn>>)> {
        loop {
            let slot = lock(&self.txns)
                .get(id)
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    what: "transaction",
                    name: id.to_owned(),
                })?;
            let guard = slot.clone().lock_owned().await;
            let current = lock(&self.txns)
                .get(id)
                .is_some_and(|s| Arc::ptr_eq(s, &slot));
            if !current {
                continue; // removed (expired or failed prepare) while we waited
            }
            if guard.is_none() {
                return Err(Error::NotFound {
                    what: "transaction",
                    name: id.to_owned(),
                });
            }
            return Ok((slot, guard));
        }
    }

    /// Locks a transaction, creating an empty slot if there is none.
    async fn slot(&self, id: &str) -> (Slot, OwnedMutexGuard<Option<Txn>>) {
        loop {
            let slot = lock(&self.txns)
                .entry(id.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
                .clone();
            let guard = slot.clone().lock_owned().await;
            if lock(&self.txns)
                .get(id)
                .is_some_and(|s| Arc::ptr_eq(s, &slot))
            {
                return (slot, guard);
            }
        }
    }

    fn forget_empty(&self, id: &str, slot: &Slot) {
        let mut txns = lock(&self.txns);
        if txns.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            txns.remove(id);
        }
    }

    fn schedule(&self, id: &str, at_ms: i64) {
        lock(&self.due).insert((at_ms, id.to_owned()));
        self.wake.notify_one();
    }

    async fn persist(&self, id: &str, txn: &mut Txn) -> Result<()> {
        let ack = self
            .log
            .append(vec![upsert(
                id.as_bytes().to_vec(),
                txn.rec.encode_to_vec(),
            )])
            .await?;
        if let Some(ack) = ack {
            txn.log_offset = ack.base_offset;
        }
        Ok(())
    }

    /// Stores a half message (step 1–2). Identity: while the id is
    /// remembered, a retry with the same service and content is idempotent
    /// (answered with the first prepare's time while it is prepared,
    /// FAILED_PRECONDITION once it is decided), and anything else with the
    /// same id is ALREADY_EXISTS. `partition` is where the message goes.
    pub(crate) async fn prepare(&self, half: HalfMessage<'_>, partition: u32) -> Result<i64> {
        let HalfMessage {
            service,
            instance,
            txn_id: id,
            topic,
            message,
            context,
        } = half;
        let digest = digest(topic, &message);
        let (slot, mut guard) = self.slot(id).await;
        if let Some(t) = guard.as_ref() {
            // Digest 0: prepared before content was fingerprinted.
            let same_content = t.rec.digest == digest || t.rec.digest == 0;
            if t.rec.service != service || !same_content {
                return Err(Error::IdConflict {
                    id: id.to_owned(),
                    what: if t.rec.service != service {
                        "another service"
                    } else {
                        "another topic or message"
                    },
                });
            }
            return match t.rec.state {
                PREPARED => Ok(t.rec.prepared_at_ms),
                _ => Err(Error::FailedPrecondition(format!(
                    "transaction {id:?} is already {}",
                    state_name(t.rec.state)
                ))),
            };
        }
        let r = message.record;
        let now = now_ms();
        let scan_from = self
            .data
            .offsets(&TopicPartition::new(topic, partition))?
            .high_water_mark;
        let mut txn = Txn {
            rec: TxnRecord {
                service: service.to_owned(),
                topic: topic.to_owned(),
                partition,
                state: PREPARED,
                prepared_at_ms: now,
                scan_from,
                message: Some(HalfRecord {
                    key: r.key,
                    value: r.value,
                    headers: headers_to_wire(r.headers),
                    timestamp_ms: r.timestamp_ms,
                }),
                context,
                instance: instance.to_owned(),
                digest,
                marker: uuid::Uuid::now_v7().simple().to_string(),
                ..TxnRecord::default()
            },
            log_offset: 0,
        };
        if let Err(e) = self.persist(id, &mut txn).await {
            drop(guard);
            self.forget_empty(id, &slot);
            return Err(e);
        }
        *guard = Some(txn);
        self.counters.prepared.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        self.schedule(id, now + self.settings.check_after.as_millis() as i64);
        Ok(now)
    }

    /// Commits (step 4 and 8). `service` must own the transaction.
    pub(crate) async fn commit(
        self: &Arc<Self>,
        service: &str,
        id: &str,
    ) -> Result<pb::EndTransactionResponse> {
        let (_slot, mut guard) = self.existing(id).await?;
        let txn = guard.as_mut().expect("existing() returns a filled slot");
        owned_by(id, txn, service)?;
        let (response, record_later) = self.decide(id, txn, true, false).await?;
        if record_later {
            self.persist_later(id, guard);
        }
        Ok(response)
    }

    /// Rolls back (step 4). `service` must own the transaction.
    pub(crate) async fn rollback(
        &self,
        service: &str,
        id: &str,
    ) -> Result<pb::EndTransactionResponse> {
        let (_slot, mut guard) = self.existing(id).await?;
        let txn = guard.as_mut().expect("existing() returns a filled slot");
        owned_by(id, txn, service)?;
        Ok(self.decide(id, txn, false, false).await?.0)
    }

    /// Applies an outcome to a locked transaction. A commit is in memory and
    /// in its partition when this returns; the second value says its
    /// COMMITTED record is still to be written.
    async fn decide(
        &self,
        id: &str,
        txn: &mut Txn,
        commit: bool,
        by_check: bool,
    ) -> Result<(pb::EndTransactionResponse, bool)> {
        match (txn.rec.state, commit) {
            (COMMITTED, true) | (ROLLED_BACK, false) => return Ok((response(id, &txn.rec), false)),
            (COMMITTED, false) | (ROLLED_BACK, true) => {
                return Err(Error::FailedPrecondition(format!(
                    "transaction {id:?} is already {}; it cannot be {}",
                    state_name(txn.rec.state),
                    if commit { "committed" } else { "rolled back" }
                )));
            }
            _ => {}
        }
        txn.rec.resolved_by_check = by_check;
        if commit {
            failpoint::hit("coordinator.commit.before_append");
            let offset = self.append_message(id, txn).await?;
            failpoint::hit("coordinator.commit.after_append");
            mark_committed(txn, offset);
            self.counters.committed.fetch_add(1, Ordering::Relaxed);
        } else {
            txn.rec.state = ROLLED_BACK;
            txn.rec.message = None;
            txn.rec.context = Bytes::new();
            txn.rec.finished_at_ms = now_ms();
            self.persist(id, txn).await?;
            self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
        }
        if by_check {
            self.counters
                .resolved_by_check
                .fetch_add(1, Ordering::Relaxed);
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
        Ok((response(id, &txn.rec), commit))
    }

    /// Appends a prepared transaction's message to its partition.
    async fn append_message(&self, id: &str, txn: &Txn) -> Result<u64> {
        let half = txn.rec.message.clone().unwrap_or_default();
        let mut headers = headers_from_wire(half.headers);
        if !txn.rec.marker.is_empty() {
            headers.push(tandem_storage::Header {
                name: MARKER_HEADER.to_owned(),
                value: Bytes::copy_from_slice(txn.rec.marker.as_bytes()),
            });
        }
        let record = Record {
            id: Bytes::copy_from_slice(id.as_bytes()),
            key: half.key,
            value: half.value,
            headers,
            timestamp_ms: half.timestamp_ms,
        };
        let tp = TopicPartition::new(txn.rec.topic.clone(), txn.rec.partition);
        Ok(self.data.append(&tp, vec![record]).await?.base_offset)
    }

    /// Records COMMITTED at `offset` durably (start-up recovery).
    async fn record_committed(&self, id: &str, txn: &mut Txn, offset: u64) -> Result<()> {
        mark_committed(txn, offset);
        self.persist(id, txn).await
    }

    /// Writes a transaction's COMMITTED record in the background, without
    /// a sync of its own (a crash before the next sync is covered by the
    /// PREPARED mark), keeping the transaction locked until it is written.
    fn persist_later(self: &Arc<Self>, id: &str, mut guard: OwnedMutexGuard<Option<Txn>>) {
        let (this, id) = (self.clone(), id.to_owned());
        self.writing.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            let written = match guard.as_mut() {
                Some(txn) => {
                    let record = upsert(id.as_bytes().to_vec(), txn.rec.encode_to_vec());
                    this.log.append_relaxed(vec![record]).await.map(|ack| {
                        if let Some(ack) = ack {
                            txn.log_offset = ack.base_offset;
                        }
                    })
                }
                None => Ok(()),
            };
            if let Err(e) = written {
                // Start-up recovery finds the message from the PREPARED mark.
                tracing::error!(txn = %id, error = %e, "writing COMMITTED failed");
            }
            drop(guard);
            this.writing.send_modify(|n| *n -= 1);
        });
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
        wanted: &mut HashMap<Sought, (String, Option<u64>)>,
    ) -> Result<()> {
        let offsets = self.data.offsets(tp)?;
        let mut next = from.max(offsets.log_start);
        let mut missing = wanted.len();
        while next < offsets.high_water_mark && missing > 0 {
            let batch = self.data.read(tp, next, ReadBudget::default()).await?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            for r in batch {
                let marker = r
                    .record
                    .headers
                    .iter()
                    .find(|h| h.name == MARKER_HEADER)
                    .map(|h| Sought::Marker(String::from_utf8_lossy(&h.value).into_owned()));
                let id = Sought::Id(String::from_utf8_lossy(&r.record.id).into_owned());
                for sought in marker.iter().chain([&id]) {
                    if let Some((_, slot)) = wanted.get_mut(sought)
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
        lock(&self.txns).contains_key(id)
    }

    /// A transaction as the API shows it.
    pub(crate) async fn get(&self, id: &str) -> Result<pb::Transaction> {
        let (_slot, guard) = self.existing(id).await?;
        let t = &guard
            .as_ref()
            .expect("existing() returns a filled slot")
            .rec;
        Ok(pb::Transaction {
            txn_id: id.to_owned(),
            service: t.service.clone(),
            topic: t.topic.clone(),
            state: api_state(t.state) as i32,
            prepared_at_ms: t.prepared_at_ms,
            checks: t.checks,
            resolved_by_check: t.resolved_by_check,
            position: response(id, t).position,
        })
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
                        if let Err(e) = this.check(&entry.1).await {
                            // Never dropped from the schedule: asked again
                            // later (a storage failure stops the process
                            // instead, and start-up schedules every open
                            // transaction again).
                            let retry = this.settings.check_after;
                            tracing::error!(txn = %entry.1, error = %e, retry_in_ms = retry.as_millis() as u64,
                                "check-back failed; will check again");
                            this.schedule(&entry.1, now_ms() + retry.as_millis() as i64);
                        }
                        drop(permit);
                    });
                }
            }
        }
    }

    /// One check-back (steps 5–7).
    async fn check(self: &Arc<Self>, id: &str) -> Result<()> {
        let (service, instance, req) = {
            let (_slot, guard) = match self.existing(id).await {
                Ok(g) => g,
                Err(Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e),
            };
            let t = &guard
                .as_ref()
                .expect("existing() returns a filled slot")
                .rec;
            if t.state != PREPARED {
                return Ok(());
            }
            let half = t.message.clone().unwrap_or_default();
            let req = pb::CheckTransaction {
                check_id: 0,
                txn_id: id.to_owned(),
                topic: t.topic.clone(),
                message: Some(pb::Message {
                    id: id.to_owned(),
                    key: half.key,
                    value: half.value,
                    headers: half.headers,
                    partition: Some(t.partition),
                }),
                context: t.context.clone(),
                prepared_at_ms: t.prepared_at_ms,
                attempt: t.checks + 1,
                check_after_ms: self.settings.check_after.as_millis() as u64,
                timeout_ms: self.settings.check_timeout.as_millis() as u64,
            };
            (t.service.clone(), t.instance.clone(), req)
        };
        self.counters.checks_sent.fetch_add(1, Ordering::Relaxed);
        let attempt = req.attempt;
        let answer = self
            .sessions
            .check(&service, &instance, req, self.settings.check_timeout)
            .await;
        tracing::debug!(txn = id, attempt, ?answer, "check-back answered");
        let (_slot, mut guard) = self.existing(id).await?;
        let txn = guard.as_mut().expect("existing() returns a filled slot");
        if txn.rec.state != PREPARED {
            return Ok(()); // decided meanwhile
        }
        let outcome = match answer {
            Some(pb::LocalState::Commit) => Some(true),
            Some(pb::LocalState::Rollback) => Some(false),
            _ => {
                txn.rec.checks += 1;
                if txn.rec.checks >= self.settings.max_checks {
                    let commit = self.settings.final_action == FinalAction::Commit;
                    tracing::warn!(txn = id, %service, checks = txn.rec.checks, action = if commit { "commit" } else { "rollback" },
                        "no answer after the last check-back: applying the final action");
                    self.counters.final_actions.fetch_add(1, Ordering::Relaxed);
                    Some(commit)
                } else {
                    None
                }
            }
        };
        match outcome {
            Some(commit) => {
                let (_, record_later) = self.decide(id, txn, commit, true).await?;
                if record_later {
                    self.persist_later(id, guard);
                }
            }
            None => {
                // Still open, and nothing is being appended: move the mark up.
                let tp = TopicPartition::new(txn.rec.topic.clone(), txn.rec.partition);
                txn.rec.scan_from = self.data.offsets(&tp)?.high_water_mark;
                self.persist(id, txn).await?;
                let delay = check_delay(&self.settings, txn.rec.checks);
                self.schedule(id, now_ms() + delay.as_millis() as i64);
            }
        }
        Ok(())
    }

    /// Periodic upkeep: forgets transactions finished longer ago than the
    /// retention, carries open ones forward and drops old log segments.
    pub(crate) async fn maintain(&self) -> Result<()> {
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
        let slots: Vec<(String, Slot)> = lock(&self.txns)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, slot) in slots {
            let mut guard = slot.clone().lock_owned().await;
            let Some(txn) = guard.as_mut() else { continue };
            let finished = matches!(txn.rec.state, COMMITTED | ROLLED_BACK);
            if finished && txn.rec.finished_at_ms < horizon {
                *guard = None;
                drop(guard);
                self.forget_empty(&id, &slot);
            } else if !finished && cutoff.is_some_and(|c| txn.log_offset < c) {
                self.persist(&id, txn).await?;
            }
        }
        if let Some(c) = cutoff {
            self.log.truncate_before(c).await?;
        }
        Ok(())
    }
}

fn mark_committed(txn: &mut Txn, offset: u64) {
    txn.rec.state = COMMITTED;
    txn.rec.offset = offset;
    txn.rec.message = None;
    txn.rec.context = Bytes::new();
    txn.rec.finished_at_ms = now_ms();
}

fn owned_by(id: &str, txn: &Txn, service: &str) -> Result<()> {
    if txn.rec.service == service {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "transaction {id:?} belongs to service {:?}, not {service:?}",
            txn.rec.service
        )))
    }
}

fn state_name(s: i32) -> &'static str {
    match s {
        PREPARED => "prepared",
        COMMITTED => "committed",
        ROLLED_BACK => "rolled back",
        _ => "unknown",
    }
}

fn api_state(s: i32) -> pb::TransactionState {
    match s {
        PREPARED => pb::TransactionState::Prepared,
        COMMITTED => pb::TransactionState::Committed,
        ROLLED_BACK => pb::TransactionState::RolledBack,
        _ => pb::TransactionState::Unspecified,
    }
}

fn response(id: &str, t: &TxnRecord) -> pb::EndTransactionResponse {
    pb::EndTransactionResponse {
        state: api_state(t.state) as i32,
        position: (t.state == COMMITTED).then(|| pb::MessagePosition {
            id: id.to_owned(),
            partition: t.partition,
            offset: t.offset,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
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
                Transactions::open(data, internal, settings).await
            }
        };
        let t = open(settings.clone()).await?;
        t.prepare(prep("open", outgoing("a")), 0).await?;
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
        assert_eq!(
            t.get("open").await?.state,
            pb::TransactionState::Prepared as i32
        );
        drop(t);

        let t = open(settings).await?;
        for id in &done {
            assert!(
                matches!(t.get(id).await, Err(Error::NotFound { .. })),
                "forgotten for good"
            );
        }
        assert_eq!(
            t.get("open").await?.state,
            pb::TransactionState::Prepared as i32
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_commit_cut_short_after_its_append_is_found_on_start_up() -> Result<()> {
        use tandem_storage::{EmbeddedLog, LogConfig};
        let dir = tempfile::tempdir().map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        let tp = TopicPartition::new("t", 0);
        let data = EmbeddedLog::open(dir.path().join("data"), LogConfig::default()).await?;
        data.create_partition(&tp).await?;
        let internal = EmbeddedLog::open(dir.path().join("internal"), LogConfig::default()).await?;
        let settings = TxnSettings {
            check_after: Duration::from_secs(3600),
            ..TxnSettings::default()
        };
        let t = Transactions::open(data.clone(), internal.clone(), settings.clone()).await?;
        t.prepare(prep("x", outgoing("x")), 0).await?;
        t.prepare(prep("y", outgoing("y")), 0).await?;
        // Simulate the crash window: "x" reached its partition, its
        // COMMITTED record did not.
        {
            let (_slot, guard) = t.existing("x").await?;
            let txn = guard.as_ref().expect("filled");
            t.append_message("x", txn).await?;
        }
        drop(t);
        let t = Transactions::open(data.clone(), internal, settings).await?;
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
}
